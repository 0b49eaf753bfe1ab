//! The architecture, checked on the source (`docs/architecture.md` draws
//! it): layers point one way, no two modules import each other (directly
//! or round a circle), and no function in the library is longer than a
//! reader can hold in mind.
//!
//! These read `src/` as text: `crate::` paths and `super::` paths in code
//! (comments are skipped), resolved to the longest module they name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module and its layer: a module may use only modules of a
/// strictly lower layer. `proto` ← `boot` ← `server` ← `engine` ← `app`/
/// `panel`, with the small helpers every layer needs at the bottom.
const LAYERS: &[(&str, u8)] = &[
    // Sans-I/O cores and helpers with no policy.
    ("proto", 0),
    ("limit", 0),
    ("shutdown", 0),
    ("durable", 0),
    ("metrics", 0),
    ("cache", 0),
    // The inventory model every layer above reads, and the operator's key.
    ("inventory", 1),
    ("seal", 1),
    // Boot policy, and the configuration format.
    ("boot", 2),
    ("config", 2),
    // Services independent of the I/O backend, and the inventory database.
    ("server", 3),
    ("store", 3),
    ("power", 3),
    ("ipxe", 3),
    // Sockets, rings and system calls.
    ("engine", 4),
    // The control panel, then the process that wires everything together.
    ("panel", 5),
    ("app", 6),
];

/// Functions the line limit leaves alone: none today. A table or a test
/// helper that must be long goes here with the reason.
const LONG_FUNCTIONS_ALLOWED: &[&str] = &[];

/// Library functions that may still return `Result<_, String>`: each
/// error is one sentence for the operator that no caller takes apart — a
/// field's validation message (shown by the API as a 422, by the
/// inventory loader with its line), a `FromStr` for clap and serde, why a
/// value cannot be quoted into a boot command, why io_uring is not used.
const STRING_ERRORS_ALLOWED: &[&str] = &[
    "inventory::fields:",
    "inventory::bmc:",
    "power: fn from_str",
    "inventory: ",
    "config: ",
    "store: ",
    "boot::render: pub fn quote",
    "panel::auth: pub fn check_password_strength",
    "panel: pub fn check_files",
    "engine::uring: pub fn probe",
];

/// The longest function body, in lines, the library may have.
const MAX_FUNCTION_LINES: usize = 120;

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every library source file (the binary's `main.rs`, `cli/` and
/// `systemd.rs` are not part of the layering) with its module path, e.g. `["server", "tftp"]`.
fn library_files() -> Vec<(Vec<String>, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = src_dir();
    let mut paths = Vec::new();
    walk(&root, &mut paths);
    paths.sort();
    paths
        .into_iter()
        .filter_map(|path| {
            let relative = path.strip_prefix(&root).unwrap().with_extension("");
            let mut module: Vec<String> = relative
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect();
            if matches!(module.as_slice(), [m] if ["main", "systemd", "lib"].contains(&m.as_str()))
                || module[0] == "cli"
            {
                return None;
            }
            if module.last().is_some_and(|m| m == "mod") {
                module.pop();
            }
            Some((module, std::fs::read_to_string(&path).unwrap()))
        })
        .collect()
}

/// The code lines of a file: comments and everything from its test module
/// on (tests may reach across layers to build what they check) are left out.
fn code_lines(source: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    let mut previous_was_cfg_test = false;
    for line in source.lines() {
        let trimmed = line.trim_start();
        if previous_was_cfg_test && trimmed.starts_with("mod ") {
            lines.pop();
            break;
        }
        previous_was_cfg_test = trimmed.starts_with("#[cfg(test)]");
        if trimmed.starts_with("//") {
            continue;
        }
        lines.push(line);
    }
    lines
}

/// The module paths a file's code names: `crate::a::b::Item` gives
/// `["a", "b", "Item"]`, `super::x` is made absolute, groups are expanded
/// one level (`crate::a::{b, c::d}`).
fn named_paths(module: &[String], code: &[&str]) -> Vec<Vec<String>> {
    let text = code.join("\n");
    let mut paths = Vec::new();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    for start in ["crate::", "super::"] {
        let mut rest = text.as_str();
        while let Some(at) = rest.find(start) {
            let before = rest[..at].chars().last();
            rest = &rest[at + start.len()..];
            if before.is_some_and(|c| ident(c) || c == ':') {
                continue;
            }
            let mut base: Vec<String> = if start == "crate::" {
                Vec::new()
            } else {
                // `super` of `a/b.rs` and of `a/b/mod.rs` is `a`.
                let mut parent = module.to_vec();
                parent.pop();
                parent
            };
            let mut tail = rest;
            loop {
                let end = tail.find(|c: char| !ident(c)).unwrap_or(tail.len());
                if end == 0 {
                    break;
                }
                base.push(tail[..end].to_string());
                tail = &tail[end..];
                match tail.strip_prefix("::") {
                    Some(next) => tail = next,
                    None => break,
                }
            }
            if let Some(group) = tail.strip_prefix('{') {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                for item in group.split(',') {
                    let mut path = base.clone();
                    path.extend(
                        item.trim()
                            .split("::")
                            .map(|s| s.trim().to_string())
                            .filter(|s| !s.is_empty() && s.chars().all(ident)),
                    );
                    paths.push(path);
                }
            } else {
                paths.push(base);
            }
        }
    }
    paths
}

fn layer_of(top: &str) -> u8 {
    LAYERS
        .iter()
        .find(|(name, _)| *name == top)
        .unwrap_or_else(|| {
            panic!("module `crate::{top}` has no layer: add it to LAYERS in tests/integration/architecture.rs")
        })
        .1
}

#[test]
fn layers_point_one_way() {
    let mut violations = BTreeSet::new();
    for (module, source) in library_files() {
        let code = code_lines(&source);
        let own = layer_of(&module[0]);
        for path in named_paths(&module, &code) {
            let Some(top) = path.first() else { continue };
            if *top == module[0] || top == "self" {
                continue;
            }
            if layer_of(top) >= own {
                violations.insert(format!(
                    "src/{}: {} (layer {own}) uses crate::{} (layer {})",
                    module.join("/"),
                    module[0],
                    path.join("::"),
                    layer_of(top)
                ));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "a lower layer imports a higher one (see docs/architecture.md):\n{}",
        violations.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn no_two_modules_import_each_other_even_round_a_circle() {
    let files = library_files();
    let modules: BTreeSet<Vec<String>> = files.iter().map(|(m, _)| m.clone()).collect();
    // Module → the other modules it names (its ancestors and descendants
    // aside: a parent declaring and re-exporting its children is not a
    // circle).
    let mut graph: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (module, source) in &files {
        let edges = graph.entry(module.clone()).or_default();
        for path in named_paths(module, &code_lines(source)) {
            let target = (1..=path.len())
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|prefix| modules.contains(prefix));
            let Some(target) = target else { continue };
            let related = target.starts_with(module) || module.starts_with(&target);
            if !related {
                edges.insert(target);
            }
        }
    }
    // Depth-first search; a grey node reached again closes a circle.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Grey,
        Black,
    }
    fn visit(
        node: &Vec<String>,
        graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        marks: &mut BTreeMap<Vec<String>, Mark>,
        stack: &mut Vec<Vec<String>>,
        circles: &mut Vec<String>,
    ) {
        marks.insert(node.clone(), Mark::Grey);
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            match marks.get(next) {
                Some(Mark::Grey) => {
                    let from = stack.iter().position(|n| n == next).unwrap();
                    let mut circle: Vec<String> =
                        stack[from..].iter().map(|m| m.join("::")).collect();
                    circle.push(next.join("::"));
                    circles.push(circle.join(" -> "));
                }
                Some(Mark::Black) => {}
                None => visit(next, graph, marks, stack, circles),
            }
        }
        stack.pop();
        marks.insert(node.clone(), Mark::Black);
    }
    let mut marks = BTreeMap::new();
    let mut circles = Vec::new();
    for node in graph.keys() {
        if !marks.contains_key(node) {
            visit(node, &graph, &mut marks, &mut Vec::new(), &mut circles);
        }
    }
    assert!(
        circles.is_empty(),
        "modules import each other:\n{}",
        circles.join("\n")
    );
}

#[test]
fn no_library_function_is_longer_than_the_limit() {
    let mut long = Vec::new();
    for (module, source) in library_files() {
        let code = code_lines(&source);
        let mut index = 0;
        while index < code.len() {
            let line = code[index];
            let trimmed = line.trim_start();
            let indent = line.len() - trimmed.len();
            let signature = trimmed
                .trim_start_matches("pub ")
                .trim_start_matches("pub(crate) ")
                .trim_start_matches("const ")
                .trim_start_matches("async ")
                .trim_start_matches("unsafe ");
            if let Some(name) = signature.strip_prefix("fn ") {
                let name: String = name
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                // A declaration without a body ends at `;` before any `{`;
                // a body ends at the first `}` at the signature's indent
                // (rustfmt's layout).
                let opening = (index..code.len())
                    .find(|&i| code[i].ends_with('{') || code[i].ends_with(';'))
                    .filter(|&i| code[i].ends_with('{'));
                let close = format!("{}}}", " ".repeat(indent));
                let end = opening.and_then(|open| (open..code.len()).find(|&i| code[i] == close));
                let lines = end.map_or(0, |end| end - index + 1);
                let key = format!("{}::{name}", module.join("::"));
                if lines > MAX_FUNCTION_LINES && !LONG_FUNCTIONS_ALLOWED.contains(&key.as_str()) {
                    long.push(format!("{key}: {lines} lines"));
                }
            }
            index += 1;
        }
    }
    assert!(
        long.is_empty(),
        "functions longer than {MAX_FUNCTION_LINES} lines (split them by what they decide):\n{}",
        long.join("\n")
    );
}

#[test]
fn the_library_has_typed_errors_and_anyhow_stays_in_the_binary() {
    // The library's callers (the binary, the tests, a future second binary)
    // match on what went wrong; `anyhow` is for the binary that prints it.
    let mut offenders = Vec::new();
    for (module, source) in library_files() {
        let code = code_lines(&source);
        if code.iter().any(|line| line.contains("anyhow")) {
            offenders.push(format!("{}: uses anyhow", module.join("::")));
        }
        for line in &code {
            let returns = line.split("-> ").nth(1).unwrap_or("");
            if line.contains("fn ")
                && returns.starts_with("Result<")
                && returns.trim_end_matches(['{', ' ']).ends_with(", String>")
            {
                offenders.push(format!("{}: {}", module.join("::"), line.trim()));
            }
        }
    }
    let allowed = STRING_ERRORS_ALLOWED;
    offenders.retain(|o| !allowed.iter().any(|a| o.starts_with(a)));
    assert!(
        offenders.is_empty(),
        "library code without typed errors (use a thiserror enum):\n{}",
        offenders.join("\n")
    );
}

#[test]
fn the_protocol_cores_do_no_io_and_read_no_clock() {
    // What a separate `bootfleet-proto` crate would make the compiler say:
    // the cores take bytes and `now` in and give bytes and deadlines out.
    const IO: &[&str] = &[
        "std::fs",
        "std::net::UdpSocket",
        "TcpStream",
        "TcpListener",
        "std::thread",
        "libc::",
        "nix::",
        "tokio",
        "io_uring",
        "Instant::now",
        "SystemTime::now",
    ];
    let mut offenders = Vec::new();
    for (module, source) in library_files() {
        if module.first().map(String::as_str) != Some("proto") {
            continue;
        }
        for line in code_lines(&source) {
            if let Some(word) = IO.iter().find(|word| line.contains(*word)) {
                offenders.push(format!("{}: {word}: {}", module.join("::"), line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "I/O or the clock in a sans-I/O core (take it as an argument instead):\n{}",
        offenders.join("\n")
    );
}
