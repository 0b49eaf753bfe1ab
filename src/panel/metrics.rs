//! `GET /metrics` (Prometheus text format), `GET /healthz` and
//! `GET /readyz`: unauthenticated, on the panel's listener and, with
//! `panel.metrics_listen`, on a listener of their own.
//!
//! The data plane only bumps sharded counters ([`crate::metrics`]); a
//! scrape reads them through `DataPlaneCollector`, which
//! `prometheus-client` encodes. Nothing is locked on the data plane's
//! side; the scrape takes the lease table's lock once (leases per pool)
//! and reads the machines from the store (machines per state).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::{machine_view, now_ms, PanelState};
use crate::boot::events::Phase;
use crate::metrics::{HistogramSnapshot, Labelled};
use crate::server::dhcp::service::DhcpService;
use crate::server::http::HttpService;
use crate::server::tftp::TftpService;

/// The services whose counters `/metrics` reads, and whether the server
/// has finished starting (for `/readyz`).
#[derive(Default)]
pub struct DataPlane {
    pub tftp: Option<Arc<TftpService>>,
    pub http: Option<Arc<HttpService>>,
    pub dhcp: Option<Arc<DhcpService>>,
    /// Every configured listener is bound and every engine runs.
    pub started: AtomicBool,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane")
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

/// `/metrics`, `/healthz` and `/readyz`: merged into the panel's router,
/// and alone the router of `panel.metrics_listen`.
pub fn routes() -> axum::Router<Arc<PanelState>> {
    use axum::routing::get;
    axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// Serves [`routes`] on `listener` until `stop` resolves.
pub async fn serve(
    state: Arc<PanelState>,
    listener: std::net::TcpListener,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::warn!(%error, "metrics listener unusable");
            return;
        }
    };
    if let Err(error) = axum::serve(listener, routes().with_state(state))
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::warn!(%error, "metrics listener stopped");
    }
}

/// `GET /healthz`: the process answers.
pub async fn healthz() -> Response {
    (StatusCode::OK, "ok\n").into_response()
}

/// `GET /readyz`: every listener bound and every engine running, the
/// inventory store reachable and its snapshot installed. 503 with the
/// reasons otherwise.
pub async fn readyz(State(state): State<Arc<PanelState>>) -> Response {
    let check = Arc::clone(&state);
    let problems = tokio::task::spawn_blocking(move || readiness_problems(&check))
        .await
        .unwrap_or_else(|_| vec!["the readiness check failed".to_string()]);
    if problems.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let mut body = String::from("not ready:\n");
        for problem in problems {
            body.push_str("- ");
            body.push_str(&problem);
            body.push('\n');
        }
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

fn readiness_problems(state: &PanelState) -> Vec<String> {
    let mut problems = Vec::new();
    if !state.data_plane.started.load(Ordering::Acquire) {
        problems.push("the data plane is still starting".to_string());
    }
    if let Err(error) = state.store.unknown_policy() {
        problems.push(format!("the inventory store is unreachable: {error}"));
    }
    if !state.snapshot_installed.load(Ordering::Acquire) {
        problems
            .push("no snapshot from the inventory database is installed (see the log)".to_string());
    }
    problems
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<Arc<PanelState>>) -> Response {
    let text = tokio::task::spawn_blocking(move || {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(DataPlaneCollector(state)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).map(|()| text)
    })
    .await;
    match text {
        Ok(Ok(text)) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics\n",
        )
            .into_response(),
    }
}

/// Reads every counter at scrape time.
struct DataPlaneCollector(Arc<PanelState>);

impl std::fmt::Debug for DataPlaneCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataPlaneCollector")
    }
}

/// A counter or gauge with no labels.
#[derive(Clone, Copy)]
enum Plain {
    Counter(u64),
    Gauge(i64),
}

impl EncodeMetric for Plain {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        match self {
            Plain::Counter(value) => encoder.encode_counter::<NoLabelSet, _, u64>(value, None),
            Plain::Gauge(value) => encoder.encode_gauge(value),
        }
    }
    fn metric_type(&self) -> MetricType {
        match self {
            Plain::Counter(_) => MetricType::Counter,
            Plain::Gauge(_) => MetricType::Gauge,
        }
    }
}

/// Writes one metric with no labels.
fn plain(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: Plain,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, value.metric_type())?;
    value.encode(metric)
}

/// Writes one counter per value of `labelled`, with `extra` labels first.
fn labelled(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    families: &[(Vec<(&str, &str)>, &Labelled)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (extra, counters) in families {
        for (value, count) in counters.iter() {
            let mut labels = extra.clone();
            labels.push((counters.label, value));
            metric
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(&count, None)?;
        }
    }
    Ok(())
}

/// Writes counters told apart by one `label`, from values read now.
fn counters_by<const N: usize>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: [(&str, u64); N],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, count) in values {
        metric
            .encode_family(&[(label, value)])?
            .encode_counter::<NoLabelSet, _, u64>(&count, None)?;
    }
    Ok(())
}

/// Writes gauges told apart by their labels.
fn gauges<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Vec<(&'a str, String)>, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in values {
        metric.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

/// The DHCP service's counters and lease gauges.
fn encode_dhcp(
    encoder: &mut DescriptorEncoder,
    dhcp: &crate::server::dhcp::service::DhcpService,
) -> Result<(), std::fmt::Error> {
    let stats = &dhcp.stats;
    labelled(
        encoder,
        "bootfleet_dhcp_messages",
        "DHCP messages parsed, by type",
        &[(Vec::new(), &stats.by_type)],
    )?;
    counters_by(
            encoder,
            "bootfleet_dhcp_outcomes",
            "DHCP datagrams received, replies sent, and datagrams dropped (malformed, untrusted relay, over a rate limit)",
            "outcome",
            [
                ("received", stats.received.get()),
                ("replied", stats.replied.get()),
                ("dropped", stats.dropped.get()),
            ],
        )?;
    gauges(
        encoder,
        "bootfleet_dhcp_leases_bound",
        "Bound, unexpired leases per pool",
        dhcp.bound_per_pool()
            .into_iter()
            .map(|(first, last, count)| (vec![("pool", format!("{first}-{last}"))], count as i64)),
    )?;
    if let Some(sharing) = &dhcp.sharing {
        use std::sync::atomic::Ordering::Relaxed;
        counters_by(
                encoder,
                "bootfleet_dhcp_shared_leases",
                "With a lease table shared with other servers: ACKs not sent because the table had the address for another machine, and requests to the lease keeper dropped because its queue was full",
                "outcome",
                [
                    ("refused", sharing.refused.load(Relaxed)),
                    ("dropped", sharing.dropped.load(Relaxed)),
                ],
            )?;
        gauges(
                encoder,
                "bootfleet_dhcp_shared_database_away",
                "1 while the shared lease database does not confirm writes (only this server's own blocks are answered)",
                [(Vec::new(), i64::from(sharing.is_away()))],
            )?;
    }
    Ok(())
}

impl Collector for DataPlaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let state = &self.0;
        let plane = &state.data_plane;
        if let Some(dhcp) = &plane.dhcp {
            encode_dhcp(&mut encoder, dhcp)?;
        }
        if let Some(tftp) = &plane.tftp {
            let stats = tftp.stats();
            for (name, help, value) in [
                (
                    "bootfleet_tftp_transfers_started",
                    "TFTP transfers started",
                    stats.started,
                ),
                (
                    "bootfleet_tftp_transfers_completed",
                    "TFTP transfers completed",
                    stats.completed,
                ),
                (
                    "bootfleet_tftp_transfers_failed",
                    "TFTP transfers that failed (timed out, aborted, client error)",
                    stats.failed,
                ),
                (
                    "bootfleet_tftp_errors_sent",
                    "TFTP requests refused with an ERROR",
                    stats.refused,
                ),
                (
                    "bootfleet_tftp_bytes",
                    "Bytes of completed TFTP transfers",
                    stats.bytes_completed,
                ),
                (
                    "bootfleet_tftp_retransmitted_blocks",
                    "TFTP blocks sent again",
                    stats.retransmitted_blocks,
                ),
            ] {
                plain(&mut encoder, name, help, Plain::Counter(value))?;
            }
            plain(
                &mut encoder,
                "bootfleet_tftp_open_transfers",
                "TFTP transfers running now",
                Plain::Gauge(stats.active as i64),
            )?;
        }
        if let Some(http) = &plane.http {
            let stats = &http.stats;
            labelled(
                &mut encoder,
                "bootfleet_http_responses",
                "HTTP responses on the boot listener, by status",
                &[(Vec::new(), &stats.by_status)],
            )?;
            plain(
                &mut encoder,
                "bootfleet_http_body_bytes",
                "Bytes of file bodies sent over HTTP (scripts go out with their heads and are counted in bootfleet_scripts_rendered)",
                Plain::Counter(stats.body_bytes.get()),
            )?;
            plain(
                &mut encoder,
                "bootfleet_http_open_connections",
                "HTTP connections open now",
                Plain::Gauge(stats.open_connections.get()),
            )?;
            plain(
                &mut encoder,
                "bootfleet_http_body_bytes_in_flight",
                "Body bytes of HTTP responses under way that the sockets have not yet taken (what adaptive power-on waves measure the LAN's backlog by)",
                Plain::Gauge(stats.body_bytes_in_flight() as i64),
            )?;
            counters_by(
                &mut encoder,
                "bootfleet_http_file_bodies",
                "File bodies sent, by how (http.body: sendfile or copied from the mapping)",
                "mode",
                [
                    ("sendfile", stats.file_bodies_by_sendfile.get()),
                    ("copy", stats.file_bodies_copied.get()),
                ],
            )?;
            labelled(
                &mut encoder,
                "bootfleet_scripts_rendered",
                "Per-MAC iPXE scripts rendered, by decision",
                &[(Vec::new(), &stats.scripts)],
            )?;
        }
        self.encode_boot(&mut encoder)
    }
}

impl DataPlaneCollector {
    /// Boot events, failures, phase durations and machines per state.
    fn encode_boot(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let state = &self.0;
        let boot = &state.router.events.metrics;
        labelled(
            encoder,
            "bootfleet_boot_events",
            "Boot events, by phase",
            &[(Vec::new(), &boot.events)],
        )?;
        let failures: Vec<(Vec<(&str, &str)>, &Labelled)> = Phase::ALL
            .iter()
            .map(|phase| {
                (
                    vec![("phase", phase.as_str())],
                    &boot.failures[phase.index()],
                )
            })
            .collect();
        labelled(
            encoder,
            "bootfleet_boot_failures",
            "Refused or failed fetches of loaders, kernels and initrds, by phase and status (404 not found, 408 timed out, 499 client gone...)",
            &failures,
        )?;
        let mut durations = encoder.encode_descriptor(
            "bootfleet_boot_phase_duration_seconds",
            "How long each successful loader, kernel and initrd fetch took, by phase",
            None,
            MetricType::Histogram,
        )?;
        for phase in Phase::ALL {
            let HistogramSnapshot {
                sum_seconds,
                count,
                buckets,
            } = boot.durations[phase.index()].snapshot();
            durations
                .encode_family(&[("phase", phase.as_str())])?
                .encode_histogram::<NoLabelSet>(sum_seconds, count, &buckets, None)?;
        }
        plain(
            encoder,
            "bootfleet_events_dropped",
            "Boot events the inventory database or a live view lost by falling behind",
            Plain::Counter(state.router.events.dropped()),
        )?;
        let mut per_state: BTreeMap<&str, usize> = BTreeMap::new();
        if let Ok(machines) = state.store.machines_brief() {
            let now = now_ms();
            let rules = state.view_rules();
            for machine in machines {
                *per_state
                    .entry(machine_view(machine, now, &rules).state)
                    .or_default() += 1;
            }
        }
        gauges(
            encoder,
            "bootfleet_machines",
            "Machines in the inventory, by state",
            per_state
                .into_iter()
                .map(|(name, count)| (vec![("state", name.to_string())], count as i64)),
        )
    }
}
