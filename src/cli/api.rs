//! The commands that go through the running server's API: machines,
//! images, pools, events, files, settings, power and its jobs, iPXE
//! builds. Changes made here are audited under the token's user and reach
//! the data plane exactly like the panel's.
//!
//! Every read prints a short table, or with `--json` the API's own answer
//! (one JSON document; `events --follow` prints one per line). Failures
//! pick the exit status ([`super::exit_status`], `docs/cli.md`).

use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use bootfleet::inventory::bmc::read_secret_file;

use super::args::{
    ApiArgs, AuditArgs, EventsArgs, FilesCommand, ImageAddArgs, ImageEditArgs, ImagesCommand,
    IpxeCommand, JobsCommand, MachineSetArgs, MachinesCommand, PoolsCommand, PowerArgs,
    SettingsCommand,
};

/// How a call to the API failed; [`super::exit_status`] turns it into the
/// command's exit status.
#[derive(Debug, thiserror::Error)]
pub enum ApiFailure {
    /// No answer: connection refused, a TLS certificate not trusted, a
    /// timeout, or a server error (5xx).
    #[error("{0}")]
    Unreachable(String),
    /// The panel answered with a client error (4xx) and its reason.
    #[error("{status}: {message}")]
    Refused { status: u16, message: String },
    /// The action ran but some machines failed (a power job).
    #[error("{0} machine(s) failed")]
    MachinesFailed(u64),
}

impl ApiFailure {
    /// The exit status `docs/cli.md` documents for this failure.
    pub fn exit_status(&self) -> u8 {
        match self {
            ApiFailure::Unreachable(_) => 3,
            ApiFailure::Refused {
                status: 401 | 403, ..
            } => 4,
            ApiFailure::Refused { status: 404, .. } => 5,
            ApiFailure::Refused { .. } => 6,
            ApiFailure::MachinesFailed(_) => 7,
        }
    }
}

/// A connection to the panel's API with one token.
pub struct Client {
    base: String,
    authorization: String,
    agent: ureq::Agent,
    /// For streams (`events --follow`): no overall deadline.
    streaming: ureq::Agent,
    /// `--json`: print the API's answers as they are.
    pub json: bool,
}

/// A path segment as it goes into a URL: names and MACs are
/// percent-encoded so that nothing in them changes the path.
pub fn segment(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

impl Client {
    pub fn new(api: &ApiArgs) -> Result<Self> {
        let base = api.url.trim_end_matches('/');
        let tls = match (base.split_once("://").map(|(scheme, _)| scheme), &api.ca) {
            (Some("https"), ca) => Some(tls_config(ca.as_deref())?),
            (Some("http"), Some(_)) => bail!(
                "--ca is for an https:// panel, and --url {:?} is plain http://",
                api.url
            ),
            (Some("http"), None) => None,
            _ => bail!(
                "--url {:?}: write http://HOST:PORT, or https://HOST:PORT when the panel serves TLS",
                api.url
            ),
        };
        let agent = |timeout: Option<Duration>| -> ureq::Agent {
            let mut config = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(0)
                .timeout_connect(Some(Duration::from_secs(10)))
                .timeout_global(timeout);
            if let Some(tls) = &tls {
                config = config.tls_config(tls.clone());
            }
            config.build().into()
        };
        Ok(Client {
            base: format!("{base}/api/v1"),
            authorization: format!("Bearer {}", api.token),
            agent: agent(Some(Duration::from_secs(120))),
            streaming: agent(None),
            json: api.json,
        })
    }

    /// Sends one request; a client or server error becomes an
    /// [`ApiFailure`] carrying the API's own message.
    fn send(
        &self,
        agent: &ureq::Agent,
        method: &str,
        path: &str,
        body: Option<Body<'_>>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        let url = format!("{}{path}", self.base);
        let auth = self.authorization.as_str();
        let result = match (method, body) {
            ("GET", _) => agent.get(&url).header("Authorization", auth).call(),
            ("DELETE", _) => agent.delete(&url).header("Authorization", auth).call(),
            (_, body) => {
                let request = match method {
                    "PUT" => agent.put(&url),
                    _ => agent.post(&url),
                }
                .header("Authorization", auth);
                match body {
                    Some(Body::Bytes(bytes)) => request
                        .header("Content-Type", "application/octet-stream")
                        .send(bytes),
                    Some(Body::Json(value)) => request.send_json(value),
                    None => request.send_json(json!({})),
                }
            }
        };
        let response = result.map_err(|error| {
            ApiFailure::Unreachable(format!("cannot reach {url}: {}", describe(&error)))
        })?;
        let status = response.status().as_u16();
        if status < 400 {
            return Ok(response);
        }
        let text = response.into_body().read_to_string().unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| text.trim().chars().take(300).collect());
        Err(if status >= 500 {
            ApiFailure::Unreachable(format!("{method} {url}: {status}: {message}"))
        } else {
            ApiFailure::Refused { status, message }
        }
        .into())
    }

    /// The JSON the API answers (`null` for an empty answer).
    fn call(&self, method: &str, path: &str, body: Option<Body<'_>>) -> Result<Value> {
        let response = self.send(&self.agent, method, path, body)?;
        let text = response
            .into_body()
            .read_to_string()
            .context("reading the panel's answer")?;
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).context("the panel's answer is not JSON")
    }

    pub fn get(&self, path: &str) -> Result<Value> {
        self.call("GET", path, None)
    }

    pub fn put(&self, path: &str, body: Value) -> Result<Value> {
        self.call("PUT", path, Some(Body::Json(body)))
    }

    pub fn post(&self, path: &str, body: Value) -> Result<Value> {
        self.call("POST", path, Some(Body::Json(body)))
    }

    pub fn delete(&self, path: &str) -> Result<Value> {
        self.call("DELETE", path, None)
    }

    /// Every item of a paged list (`limit`/`offset`, the whole count in
    /// `X-Total-Count`), fetched page by page.
    fn get_all(&self, path: &str) -> Result<Vec<Value>> {
        const PAGE: usize = 10_000;
        let joiner = if path.contains('?') { '&' } else { '?' };
        let mut all = Vec::new();
        loop {
            let page_path = format!("{path}{joiner}limit={PAGE}&offset={}", all.len());
            let response = self.send(&self.agent, "GET", &page_path, None)?;
            let total = response
                .headers()
                .get("x-total-count")
                .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
            let page: Vec<Value> = response
                .into_body()
                .read_json()
                .context("the panel's answer is not a JSON list")?;
            let got = page.len();
            all.extend(page);
            if got == 0 || total.is_none_or(|total| all.len() >= total) {
                return Ok(all);
            }
        }
    }

    /// Prints `value` as JSON with `--json`, else as `text` says.
    fn show(&self, value: &Value, text: impl FnOnce(&Value)) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(value).expect("JSON prints")
            );
        } else {
            text(value);
        }
    }
}

/// A request body.
enum Body<'a> {
    Json(Value),
    Bytes(&'a [u8]),
}

/// A transport error in one line, with the cause an operator acts on.
fn describe(error: &ureq::Error) -> String {
    let text = error.to_string();
    if text.contains("CaUsedAsEndEntity") {
        format!(
            "{text} (the panel serves a CA certificate as its own, which TLS clients refuse: \
             make its certificate with basicConstraints CA:FALSE, or sign it with that CA; docs/cli.md)"
        )
    } else if text.contains("UnknownIssuer") || text.contains("invalid peer certificate") {
        format!("{text} (the panel's certificate is not trusted: pass --ca with its certificate or its CA)")
    } else {
        text
    }
}

/// TLS for an https:// panel: the certificates in `ca` and only them, or
/// the public web roots.
fn tls_config(ca: Option<&Path>) -> Result<ureq::tls::TlsConfig> {
    use ureq::tls::{PemItem, RootCerts, TlsConfig, TlsProvider};
    let mut tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(Arc::new(
            tokio_rustls::rustls::crypto::aws_lc_rs::default_provider(),
        ));
    if let Some(file) = ca {
        let pem = std::fs::read(file).with_context(|| format!("--ca {}", file.display()))?;
        let certificates = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(PemItem::Certificate(certificate)) => Some(Ok(certificate.to_owned())),
                Ok(_) => None,
                Err(error) => Some(Err(error)),
            })
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("--ca {}: not PEM", file.display()))?;
        if certificates.is_empty() {
            bail!("--ca {}: no certificate in it", file.display());
        }
        tls = tls.root_certs(RootCerts::Specific(Arc::new(certificates)));
    }
    Ok(tls.build())
}

/// `text`, or `-` when absent or empty.
fn or_dash(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(text) if text.is_empty() => "-".into(),
        Value::String(text) => text.clone(),
        Value::Array(items) if items.is_empty() => "-".into(),
        Value::Array(items) => items.iter().map(or_dash).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// A time from the API (milliseconds since the epoch) in UTC.
pub(crate) fn when(ms: &Value) -> String {
    ms.as_u64()
        .and_then(|ms| {
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
        })
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second]Z"
            ))
            .ok()
        })
        .unwrap_or_else(|| "-".into())
}

pub fn machines(command: MachinesCommand) -> Result<()> {
    match command {
        MachinesCommand::List {
            search,
            state,
            image,
            label,
            api,
        } => {
            let client = Client::new(&api)?;
            let query: Vec<String> = [
                ("q", search),
                ("state", state),
                ("image", image),
                ("label", label),
            ]
            .into_iter()
            .filter_map(|(key, value)| Some(format!("{key}={}", segment(&value?))))
            .collect();
            let path = format!("/machines?{}", query.join("&"));
            let machines = Value::Array(client.get_all(&path)?);
            client.show(&machines, |machines| {
                println!("MAC\tHOSTNAME\tIMAGE\tSTATE");
                for m in machines.as_array().into_iter().flatten() {
                    println!(
                        "{}\t{}\t{}\t{}{}",
                        or_dash(&m["mac"]),
                        or_dash(&m["hostname"]),
                        or_dash(&m["image"]),
                        or_dash(&m["state"]),
                        if m["stuck"] == true { " (stuck)" } else { "" }
                    );
                }
            });
        }
        MachinesCommand::Show { mac, api } => {
            let client = Client::new(&api)?;
            let machine = client.get(&format!("/machines/{}", segment(&mac)))?;
            client.show(&machine, print_machine);
        }
        MachinesCommand::Discovered { api } => {
            let client = Client::new(&api)?;
            let machines = client.get("/discovered")?;
            client.show(&machines, |machines| {
                println!("MAC\tFIRST SEEN\tLAST SEEN\tFACTS");
                for m in machines.as_array().into_iter().flatten() {
                    let facts = m["facts"]
                        .as_object()
                        .map(|facts| {
                            facts
                                .iter()
                                .map(|(k, v)| format!("{k}={}", or_dash(v)))
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                        .unwrap_or_default();
                    println!(
                        "{}\t{}\t{}\t{facts}",
                        or_dash(&m["mac"]),
                        when(&m["first_seen_ms"]),
                        when(&m["last_seen_ms"])
                    );
                }
            });
        }
        MachinesCommand::Assign { image, macs, api } => {
            let client = Client::new(&api)?;
            let image = (image != "none").then_some(image);
            let result =
                client.post("/machines/assign", json!({ "macs": macs, "image": image }))?;
            client.show(&result, |result| {
                println!("{} machine(s) assigned", result["changed"])
            });
        }
        MachinesCommand::Set(args) => set_machine(args)?,
        MachinesCommand::Rearm { mac, api } => {
            let client = Client::new(&api)?;
            let path = format!("/machines/{}", segment(&mac));
            client.put(&path, json!({ "rearm": true }))?;
            let machine = client.get(&path)?;
            client.show(&machine, |m| {
                println!(
                    "{}: one-shot {} re-armed: it installs at its next boot",
                    or_dash(&m["mac"]),
                    or_dash(&m["image"])
                )
            });
        }
        MachinesCommand::Forget { mac, api } => {
            let client = Client::new(&api)?;
            let answer = client.delete(&format!("/machines/{}", segment(&mac)))?;
            client.show(&answer, |_| println!("forgot {mac}"));
        }
    }
    Ok(())
}

/// `machines show`: one field per line.
fn print_machine(m: &Value) {
    let from = match m["image_from"].as_str() {
        Some(rule) => format!(" (from {rule})"),
        None => String::new(),
    };
    println!("mac\t{}", or_dash(&m["mac"]));
    println!("hostname\t{}", or_dash(&m["hostname"]));
    println!("image\t{}{from}", or_dash(&m["image"]));
    println!("state\t{}", or_dash(&m["state"]));
    if let Some(failure) = m["failure"].as_str() {
        println!("failure\t{failure}");
    }
    println!("ip\t{}", or_dash(&m["ip"]));
    println!("labels\t{}", or_dash(&m["labels"]));
    println!("one_shot\t{}", m["one_shot"]);
    println!("netboot\t{}", m["netboot"]);
    println!("cmdline_append\t{}", or_dash(&m["cmdline_append"]));
    println!("bmc\t{}", or_dash(&m["bmc"]));
    println!("last_seen\t{}", when(&m["last_seen_ms"]));
    for (key, value) in m["facts"].as_object().into_iter().flatten() {
        println!("fact.{key}\t{}", or_dash(value));
    }
}

/// `bootfleet machines set MAC [--image ...] [--bmc URL]`: the machine's
/// fields in one change, then its BMC (the password from the URL, a file
/// or standard input, and an IPMI K_g key from a file; never echoed back).
fn set_machine(args: MachineSetArgs) -> Result<()> {
    let client = Client::new(&args.api)?;
    let path = format!("/machines/{}", segment(&args.mac));
    let none_is_null =
        |value: Option<String>| value.map(|v| if v == "none" { Value::Null } else { json!(v) });
    let mut patch = serde_json::Map::new();
    for (key, value) in [
        ("image", none_is_null(args.image)),
        ("hostname", none_is_null(args.hostname)),
        ("ip", none_is_null(args.ip)),
        ("image_revision", pin(args.pin.as_deref())?),
        ("one_shot", args.one_shot.map(Value::from)),
        ("netboot", args.netboot.map(Value::from)),
        ("cmdline_append", args.cmdline_append.map(Value::from)),
        ("notes", args.notes.map(Value::from)),
    ] {
        if let Some(value) = value {
            patch.insert(key.into(), value);
        }
    }
    if args.clear_labels || !args.labels.is_empty() {
        patch.insert("labels".into(), json!(args.labels));
    }
    if patch.is_empty() && args.bmc.is_none() {
        bail!("nothing to change: give at least one option (bootfleet machines set --help)");
    }
    if !patch.is_empty() {
        client.put(&path, Value::Object(patch))?;
    }
    if let Some(url) = args.bmc {
        if url == "none" {
            client.delete(&format!("{path}/bmc"))?;
        } else {
            let mut body = json!({ "url": url });
            if let Some(password) =
                bmc_password(args.bmc_password_file.as_deref(), args.bmc_password_stdin)?
            {
                body["password"] = json!(password);
            }
            if let Some(file) = args.bmc_kg_file {
                let kg = read_secret_file(&file).with_context(|| {
                    format!("reading the BMC's K_g key from {}", file.display())
                })?;
                body["kg_key"] = json!(kg);
            }
            client.put(&format!("{path}/bmc"), body)?;
        }
    }
    // The machine as it is now, its state and BMC (without the password)
    // included.
    let machine = client.get(&path)?;
    client.show(&machine, print_machine);
    Ok(())
}

/// `--pin REVISION|none` as the API's `image_revision`.
fn pin(text: Option<&str>) -> Result<Option<Value>> {
    Ok(match text {
        None => None,
        Some("none") => Some(Value::Null),
        Some(number) => Some(json!(number.parse::<u64>().with_context(|| {
            format!("--pin {number:?}: give a revision number (images revisions NAME) or none")
        })?)),
    })
}

/// A BMC password from a file or one line of standard input, if asked.
fn bmc_password(file: Option<&Path>, stdin: bool) -> Result<Option<String>> {
    if let Some(file) = file {
        return read_secret_file(file)
            .map(Some)
            .with_context(|| format!("reading the BMC password from {}", file.display()));
    }
    if !stdin {
        return Ok(None);
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the BMC password from standard input")?;
    Ok(Some(line.trim_end_matches(['\n', '\r']).to_string()))
}

pub fn images(command: ImagesCommand) -> Result<()> {
    match command {
        ImagesCommand::List { api } => {
            let client = Client::new(&api)?;
            let images = client.get("/images")?;
            client.show(&images, |images| {
                for i in images.as_array().into_iter().flatten() {
                    println!(
                        "{}\t{}\t{}",
                        or_dash(&i["name"]),
                        or_dash(&i["kernel"]),
                        i["cmdline"].as_str().unwrap_or("")
                    );
                }
            });
        }
        ImagesCommand::Show { name, api } => {
            let client = Client::new(&api)?;
            let image = client.get(&format!("/images/{}", segment(&name)))?;
            client.show(&image, print_image);
        }
        ImagesCommand::Add(args) => add_image(args)?,
        ImagesCommand::Edit(args) => edit_image(args)?,
        ImagesCommand::Revisions { name, api } => {
            let client = Client::new(&api)?;
            let revisions = client.get(&format!("/images/{}/revisions", segment(&name)))?;
            client.show(&revisions, |revisions| {
                for r in revisions.as_array().into_iter().flatten() {
                    println!(
                        "{}\t{}\t{}\t{}",
                        r["revision"],
                        when(&r["at_ms"]),
                        or_dash(&r["actor"]),
                        or_dash(&r["changes"])
                    );
                }
            });
        }
        ImagesCommand::Rollback {
            name,
            revision,
            api,
        } => {
            let client = Client::new(&api)?;
            let image = client.post(
                &format!("/images/{}/rollback", segment(&name)),
                json!({ "revision": revision }),
            )?;
            client.show(&image, |i| {
                println!(
                    "{name}: revision {} has revision {revision}'s content",
                    i["revision"]
                )
            });
        }
        ImagesCommand::Remove { name, api } => {
            let client = Client::new(&api)?;
            let answer = client.delete(&format!("/images/{}", segment(&name)))?;
            client.show(&answer, |_| println!("removed {name}"));
        }
    }
    Ok(())
}

/// `images show`: its settings, then one line per file.
fn print_image(i: &Value) {
    println!("revision\t{}", i["revision"]);
    for key in [
        "name",
        "kernel",
        "initrds",
        "cmdline",
        "transport",
        "architecture",
        "description",
    ] {
        println!("{key}\t{}", or_dash(&i[key]));
    }
    println!("secure_boot\t{}", i["secure_boot"]);
    if let Some(signature) = i["kernel_signature"].as_str() {
        println!("kernel_signature\t{signature}");
    }
    if let Some(warning) = i["warning"].as_str() {
        println!("warning\t{warning}");
    }
    print_files(&i["files"]);
}

fn print_files(files: &Value) {
    for file in files.as_array().into_iter().flatten() {
        println!(
            "{}\t{} bytes\tsha256 {}",
            or_dash(&file["path"]),
            file["size"],
            or_dash(&file["sha256"])
        );
    }
}

fn add_image(args: ImageAddArgs) -> Result<()> {
    let client = Client::new(&args.api)?;
    let image = client.post(
        "/images",
        json!({
            "name": args.name, "kernel": args.kernel, "initrds": args.initrds,
            "cmdline": args.cmdline, "transport": args.transport,
            "architecture": args.architecture, "description": args.description,
            "checkin_deadline_seconds": args.checkin_deadline, "secure_boot": args.secure_boot,
        }),
    )?;
    client.show(&image, |image| {
        print_files(&image["files"]);
        if let Some(warning) = image["warning"].as_str() {
            eprintln!("warning: {warning}");
        }
        println!("image {} registered", args.name);
    });
    Ok(())
}

fn edit_image(args: ImageEditArgs) -> Result<()> {
    let client = Client::new(&args.api)?;
    let mut edit = serde_json::Map::new();
    for (key, value) in [
        ("kernel", args.kernel.map(Value::from)),
        ("cmdline", args.cmdline.map(Value::from)),
        ("transport", args.transport.map(Value::from)),
        ("architecture", args.architecture.map(Value::from)),
        ("description", args.description.map(Value::from)),
        (
            "checkin_deadline_seconds",
            args.checkin_deadline.map(Value::from),
        ),
        ("secure_boot", args.secure_boot.map(Value::from)),
    ] {
        if let Some(value) = value {
            edit.insert(key.into(), value);
        }
    }
    if args.no_initrds || !args.initrds.is_empty() {
        edit.insert("initrds".into(), json!(args.initrds));
    }
    if edit.is_empty() {
        bail!("nothing to change: give at least one option (bootfleet images edit --help)");
    }
    let image = client.put(
        &format!("/images/{}", segment(&args.name)),
        Value::Object(edit),
    )?;
    client.show(&image, print_image);
    Ok(())
}

pub fn pools(command: PoolsCommand) -> Result<()> {
    match command {
        PoolsCommand::List { api } => {
            let client = Client::new(&api)?;
            let pools = client.get("/pools")?;
            client.show(&pools, |pools| {
                println!("NAME\tIMAGE\tSELECTOR\tMACHINES");
                for p in pools.as_array().into_iter().flatten() {
                    println!(
                        "{}\t{}\t{}\t{}",
                        or_dash(&p["name"]),
                        or_dash(&p["image"]),
                        or_dash(&p["selector"]),
                        p["machines"].as_array().map_or(0, Vec::len)
                    );
                }
            });
        }
        PoolsCommand::Show { name, api } => {
            let client = Client::new(&api)?;
            let pool = client.get(&format!("/pools/{}", segment(&name)))?;
            client.show(&pool, |p| {
                for key in ["name", "image", "selector", "members"] {
                    println!("{key}\t{}", or_dash(&p[key]));
                }
                for mac in p["machines"].as_array().into_iter().flatten() {
                    println!("machine\t{}", or_dash(mac));
                }
            });
        }
        PoolsCommand::Set {
            name,
            members,
            selector,
            image,
            api,
        } => {
            let client = Client::new(&api)?;
            let pool = json!({ "members": members, "selector": selector, "image": image });
            let path = format!("/pools/{}", segment(&name));
            client.put(&path, pool)?;
            let answer = client.get(&path)?;
            client.show(&answer, |p| {
                println!(
                    "pool {name} saved: {} machine(s) now, image {}",
                    p["machines"].as_array().map_or(0, Vec::len),
                    or_dash(&p["image"])
                )
            });
        }
        PoolsCommand::Assign { name, image, api } => {
            let client = Client::new(&api)?;
            let image = (image != "none").then_some(image);
            let answer = client.post(
                &format!("/pools/{}/assign", segment(&name)),
                json!({ "image": image }),
            )?;
            client.show(&answer, |a| {
                println!("{} machine(s) assigned", a["changed"])
            });
        }
        PoolsCommand::Remove { name, api } => {
            let client = Client::new(&api)?;
            let answer = client.delete(&format!("/pools/{}", segment(&name)))?;
            client.show(&answer, |_| println!("removed pool {name}"));
        }
    }
    Ok(())
}

/// One boot event per line: time, MAC, phase, transport, status, what,
/// bytes, server.
fn print_event(e: &Value) {
    println!(
        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
        when(&e["at_ms"]),
        or_dash(&e["mac"]),
        or_dash(&e["phase"]),
        or_dash(&e["transport"]),
        e["status"],
        or_dash(&e["detail"]),
        e["bytes"],
        or_dash(&e["server"]),
    );
}

pub fn events(args: EventsArgs) -> Result<()> {
    let client = Client::new(&args.api)?;
    let filter = args
        .mac
        .as_deref()
        .map(|mac| format!("mac={}", segment(mac)));
    let mut query = vec![format!("limit={}", args.limit)];
    query.extend(filter.clone());
    let events = client.get(&format!("/events?{}", query.join("&")))?;
    // `--follow` prints one JSON document per line, past events included.
    let print = |event: &Value| {
        if client.json {
            println!("{event}");
        } else {
            print_event(event);
        }
    };
    if args.follow {
        events.as_array().into_iter().flatten().for_each(print);
    } else {
        client.show(&events, |events| {
            events
                .as_array()
                .into_iter()
                .flatten()
                .for_each(print_event)
        });
        return Ok(());
    }
    let _ = std::io::stdout().flush();
    let path = format!(
        "/events/stream{}",
        filter.map_or(String::new(), |f| format!("?{f}"))
    );
    let response = client.send(&client.streaming, "GET", &path, None)?;
    let mut reader = std::io::BufReader::new(response.into_body().into_reader());
    let mut line = String::new();
    loop {
        line.clear();
        if reader
            .read_line(&mut line)
            .context("reading the event stream")?
            == 0
        {
            return Err(ApiFailure::Unreachable("the panel closed the event stream".into()).into());
        }
        if let Some(data) = line.trim_end().strip_prefix("data:") {
            match serde_json::from_str::<Value>(data.trim_start()) {
                Ok(event) => print(&event),
                Err(error) => eprintln!("bootfleet: skipping an event that is not JSON: {error}"),
            }
            let _ = std::io::stdout().flush();
        }
    }
}

pub fn fleet(api: &ApiArgs) -> Result<()> {
    let client = Client::new(api)?;
    let fleet = client.get("/fleet")?;
    client.show(&fleet, |f| {
        println!("machines\t{}", f["machines"]);
        for (state, count) in f["states"].as_object().into_iter().flatten() {
            println!("state.{state}\t{count}");
        }
        for (cause, count) in f["failures"].as_object().into_iter().flatten() {
            println!("failed at {cause}\t{count}");
        }
        for m in f["stuck"].as_array().into_iter().flatten() {
            println!(
                "stuck\t{}\t{}\tsince {}",
                or_dash(&m["mac"]),
                or_dash(&m["state"]),
                when(&m["since_ms"])
            );
        }
    });
    Ok(())
}

pub fn audit(args: AuditArgs) -> Result<()> {
    let client = Client::new(&args.api)?;
    let entries = client.get(&format!("/audit?limit={}", args.limit))?;
    client.show(&entries, |entries| {
        for e in entries.as_array().into_iter().flatten() {
            println!(
                "{}\t{}\t{}\t{}\t{}",
                when(&e["at_ms"]),
                or_dash(&e["actor"]),
                or_dash(&e["action"]),
                or_dash(&e["target"]),
                e["detail"].as_str().unwrap_or("")
            );
        }
    });
    Ok(())
}

pub fn files(command: FilesCommand) -> Result<()> {
    match command {
        FilesCommand::List { api } => {
            let client = Client::new(&api)?;
            let files = client.get("/files")?;
            client.show(&files, |files| {
                for f in files.as_array().into_iter().flatten() {
                    println!("{}\t{}", or_dash(&f["path"]), f["size"]);
                }
            });
        }
        FilesCommand::Upload { file, target, api } => {
            let client = Client::new(&api)?;
            let target = match target {
                Some(target) => target,
                None => file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(str::to_string)
                    .with_context(|| format!("{}: give --as PATH", file.display()))?,
            };
            let mut bytes = Vec::new();
            std::fs::File::open(&file)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .with_context(|| format!("reading {}", file.display()))?;
            let path = target.split('/').map(segment).collect::<Vec<_>>().join("/");
            let answer =
                client.call("PUT", &format!("/files/{path}"), Some(Body::Bytes(&bytes)))?;
            client.show(&answer, |a| {
                println!("{}\t{} bytes", or_dash(&a["path"]), a["size"])
            });
        }
    }
    Ok(())
}

pub fn settings(command: SettingsCommand) -> Result<()> {
    let SettingsCommand::Unknown {
        policy,
        poll_seconds,
        api,
    } = command;
    let client = Client::new(&api)?;
    if let Some(policy) = policy {
        client.put(
            "/settings/unknown",
            json!({ "policy": policy, "poll_seconds": poll_seconds }),
        )?;
    }
    let setting = client.get("/settings/unknown")?;
    client.show(&setting, |s| {
        println!(
            "unknown machines: {} (poll every {} s)",
            or_dash(&s["policy"]),
            s["poll_seconds"]
        )
    });
    Ok(())
}

pub fn ipxe(command: IpxeCommand) -> Result<()> {
    match command {
        IpxeCommand::List { api } => {
            let client = Client::new(&api)?;
            let builds = client.get("/ipxe")?;
            client.show(&builds, |builds| {
                for b in builds["files"].as_array().into_iter().flatten() {
                    println!(
                        "{}\t{}\t{}",
                        or_dash(&b["name"]),
                        b["size"],
                        or_dash(&b["sha256"])
                    );
                }
            });
        }
        IpxeCommand::Download { name, output, api } => {
            let client = Client::new(&api)?;
            let response = client.send(
                &client.agent,
                "GET",
                &format!("/ipxe/{}", segment(&name)),
                None,
            )?;
            let output = output.unwrap_or_else(|| name.clone().into());
            let mut bytes = Vec::new();
            response
                .into_body()
                .into_reader()
                .read_to_end(&mut bytes)
                .context("reading the build")?;
            bootfleet::durable::write_new(&output, &bytes, 0o644)
                .with_context(|| format!("writing {}", output.display()))?;
            println!("{}\t{} bytes", output.display(), bytes.len());
        }
        IpxeCommand::Build(_) => unreachable!("`ipxe build` runs locally"),
    }
    Ok(())
}

/// `bootfleet power ACTION MAC... [--pool NAME]`: starts a power job and
/// follows it, one line per change of its counts, then one per machine
/// that failed; exits with status 7 when any did.
pub fn power(args: PowerArgs) -> Result<()> {
    let client = Client::new(&args.api)?;
    let pacing = match args.waves.as_str() {
        "all" => json!({ "mode": "all-at-once" }),
        "adaptive" => json!({ "mode": "adaptive" }),
        fixed => {
            let (size, seconds) = fixed
                .split_once('/')
                .and_then(|(n, s)| Some((n.parse::<usize>().ok()?, s.parse::<f64>().ok()?)))
                .with_context(|| {
                    format!("--waves {fixed:?}: write all, adaptive or SIZE/SECONDS (e.g. 50/10)")
                })?;
            json!({ "mode": "fixed", "size": size, "interval_ms": (seconds * 1000.0) as u64 })
        }
    };
    let mut request = json!({
        "macs": args.macs,
        "action": args.action,
        "boot": args.boot,
        "pacing": pacing,
        "checkin_deadline": args.deadline,
        "retry_by_cycle": args.retry_by_cycle,
    });
    if let Some(pool) = &args.pool {
        request["pool"] = json!(pool);
    }
    let job = client.post("/power", request)?;
    let id = job["id"].as_u64().unwrap_or(0);
    if !client.json {
        println!(
            "power job {id}: {} {} machine(s)",
            args.action,
            job["machines"].as_array().map_or(0, Vec::len)
        );
    }
    if args.no_wait {
        client.show(&job, |_| {});
        return Ok(());
    }
    let mut last = (String::new(), std::time::Instant::now());
    let job = loop {
        let job = client.get(&format!("/power/jobs/{id}"))?;
        let counts = format!(
            "{}: waves {}, {}",
            job["status"].as_str().unwrap_or(""),
            job["waves_sent"],
            stage_counts(&job["stages"]),
        );
        // A line when the counts change, and every 10 s while they do not.
        if !client.json && (counts != last.0 || last.1.elapsed() >= Duration::from_secs(10)) {
            let left = job["estimated_seconds_left"]
                .as_u64()
                .map_or(String::new(), |s| format!(", about {s} s left"));
            println!("{counts}{left}");
            last = (counts, std::time::Instant::now());
        }
        if job["finished_ms"].is_u64() {
            break job;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    client.show(&job, print_job_machines);
    match job["failures"].as_u64().unwrap_or(0) {
        0 => Ok(()),
        failed => Err(ApiFailure::MachinesFailed(failed).into()),
    }
}

pub fn jobs(command: JobsCommand) -> Result<()> {
    let (api, id, action) = match &command {
        JobsCommand::List { api } => (api, None, None),
        JobsCommand::Show { id, api } => (api, Some(*id), None),
        JobsCommand::Pause { id, api } => (api, Some(*id), Some("pause")),
        JobsCommand::Resume { id, api } => (api, Some(*id), Some("resume")),
        JobsCommand::Cancel { id, api } => (api, Some(*id), Some("cancel")),
    };
    let client = Client::new(api)?;
    let job = match (id, action) {
        (None, _) => {
            let jobs = client.get("/power/jobs")?;
            client.show(&jobs, |jobs| {
                for j in jobs.as_array().into_iter().flatten() {
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        j["id"],
                        or_dash(&j["spec"]["action"]),
                        or_dash(&j["status"]),
                        when(&j["created_ms"]),
                        stage_counts(&j["stages"])
                    );
                }
            });
            return Ok(());
        }
        (Some(id), Some(action)) => {
            client.post(&format!("/power/jobs/{id}/{action}"), json!({}))?
        }
        (Some(id), None) => client.get(&format!("/power/jobs/{id}"))?,
    };
    client.show(&job, |j| {
        println!(
            "job {}: {} {}, waves {}, {}",
            j["id"],
            or_dash(&j["spec"]["action"]),
            or_dash(&j["status"]),
            j["waves_sent"],
            stage_counts(&j["stages"])
        );
        print_job_machines(j);
    });
    Ok(())
}

/// `up 10, loading 3, failed 1`.
fn stage_counts(stages: &Value) -> String {
    const ORDER: [&str; 9] = [
        "waiting", "sending", "powered", "starting", "loading", "up", "done", "failed", "skipped",
    ];
    ORDER
        .iter()
        .filter_map(|stage| Some(format!("{stage} {}", stages.get(stage)?.as_u64()?)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line per machine: MAC, stage, and what happened.
fn print_job_machines(job: &Value) {
    for m in job["machines"].as_array().into_iter().flatten() {
        println!(
            "{}\t{}\t{}",
            or_dash(&m["mac"]),
            or_dash(&m["stage"]),
            m["detail"].as_str().unwrap_or("")
        );
    }
}
