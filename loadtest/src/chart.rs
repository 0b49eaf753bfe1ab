//! A storm report drawn as one self-contained HTML page with inline SVG (no
//! scripts, no fonts or styles from elsewhere): how long machines took to
//! boot, and how many were in each phase as the storm went on.

use std::fmt::Write;

use crate::storm::{Report, PHASES};

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 260.0;
const MARGIN: f64 = 40.0;
const COLOURS: [&str; 6] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#222222",
];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Draws the time axis (0 to `end`), labels the top of the count axis and
/// closes the picture.
fn close_with_axes(svg: &mut String, plot_w: f64, end: &str, top: f64) {
    let plot_h = HEIGHT - 2.0 * MARGIN;
    let _ = write!(
        svg,
        r#"<line x1="{MARGIN}" y1="{y}" x2="{x2}" y2="{y}" stroke="black"/><text x="{MARGIN}" y="{ty}">0 s</text><text x="{x2}" y="{ty}" text-anchor="end">{end}</text><text x="{MARGIN}" y="{t}">{top} machines</text></svg>"#,
        y = MARGIN + plot_h,
        x2 = MARGIN + plot_w,
        ty = MARGIN + plot_h + 15.0,
        t = MARGIN - 8.0,
    );
}

/// The boot-time distribution: `booted_seconds` in 30 bars.
fn histogram(booted_seconds: &[f64]) -> String {
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="11">"#
    );
    if booted_seconds.is_empty() {
        svg.push_str(r#"<text x="40" y="40">no machine booted</text></svg>"#);
        return svg;
    }
    let max = booted_seconds
        .iter()
        .copied()
        .fold(0.0, f64::max)
        .max(0.001);
    const BARS: usize = 30;
    let mut counts = [0usize; BARS];
    for &s in booted_seconds {
        counts[((s / max * BARS as f64) as usize).min(BARS - 1)] += 1;
    }
    let top = *counts.iter().max().unwrap_or(&1) as f64;
    let plot_w = WIDTH - 2.0 * MARGIN;
    let plot_h = HEIGHT - 2.0 * MARGIN;
    let bar_w = plot_w / BARS as f64;
    for (i, &count) in counts.iter().enumerate() {
        let h = count as f64 / top * plot_h;
        let _ = write!(
            svg,
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{count} machines</title></rect>"#,
            MARGIN + i as f64 * bar_w,
            MARGIN + plot_h - h,
            bar_w - 1.0,
            COLOURS[0]
        );
    }
    close_with_axes(&mut svg, plot_w, &format!("{max:.2} s"), top);
    svg
}

/// Machines per phase over time, one line each.
fn phases_over_time(report: &Report) -> String {
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="11">"#
    );
    let series: Vec<(&str, &Vec<usize>)> = PHASES
        .iter()
        .chain(["booted"].iter())
        .filter_map(|p| report.in_phase.get(*p).map(|s| (*p, s)))
        .collect();
    let ticks = series.first().map_or(1, |(_, s)| s.len()).max(2);
    let top = series
        .iter()
        .flat_map(|(_, s)| s.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let plot_w = WIDTH - 2.0 * MARGIN - 70.0;
    let plot_h = HEIGHT - 2.0 * MARGIN;
    for (k, (name, values)) in series.iter().enumerate() {
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                format!(
                    "{:.1},{:.1}",
                    MARGIN + i as f64 / (ticks - 1) as f64 * plot_w,
                    MARGIN + plot_h - v as f64 / top * plot_h
                )
            })
            .collect();
        let colour = COLOURS[k % COLOURS.len()];
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/><text x="{:.1}" y="{:.1}" fill="{colour}">{}</text>"#,
            points.join(" "),
            MARGIN + plot_w + 8.0,
            MARGIN + 14.0 * (k as f64 + 1.0),
            escape(name)
        );
    }
    let end = (ticks - 1) as f64 * report.tick_seconds;
    close_with_axes(&mut svg, plot_w, &format!("{end:.1} s"), top);
    svg
}

/// The whole page.
pub fn html(report: &Report) -> String {
    let mut rows = String::new();
    for phase in PHASES.iter().chain(["total"].iter()) {
        if let Some(p) = report.phases.get(*phase) {
            let _ = write!(
                rows,
                "<tr><td>{phase}</td><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td></tr>",
                p.count, p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms
            );
        }
    }
    let mut failures = String::new();
    for (cause, count) in &report.failures {
        let _ = write!(failures, "<li>{count} × {}</li>", escape(cause));
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>bootfleet storm {label}</title></head>\
         <body style=\"font-family:sans-serif;max-width:800px\"><h1>Storm: {machines} machines</h1>\
         <p>{label} server {server}, {firmware} firmware, {profile} profile: <b>{booted} booted</b>, {failed} failed, \
         {cut} cut by the time limit, in {seconds:.2} s ({goodput:.1} MB/s).</p>\
         <table border=\"1\" cellpadding=\"4\" style=\"border-collapse:collapse\"><tr><th>phase</th><th>count</th>\
         <th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>max ms</th></tr>{rows}</table>\
         <ul>{failures}</ul><h2>Time to boot</h2>{histogram}<h2>Machines per phase</h2>{phases}</body></html>\n",
        label = escape(&report.label),
        machines = report.machines,
        server = escape(&report.server),
        firmware = report.firmware,
        profile = report.profile,
        booted = report.booted,
        failed = report.failed,
        cut = report.cut,
        seconds = report.seconds,
        goodput = report.goodput_mb_s,
        histogram = histogram(&report.boot_seconds),
        phases = phases_over_time(report),
    )
}
