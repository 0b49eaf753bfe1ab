//! Command-line subcommands besides `serve`: users and tokens are written
//! straight into the inventory database (they must work before anyone can
//! log in); machines and images go through the running server's API, so
//! that they are audited and reach the data plane like panel changes.
//! `ipxe build` runs iPXE's own build on the operator's source tree.

use std::io::BufRead;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use bootfleet::config::Config;
use bootfleet::inventory::bmc::read_secret_file;
use bootfleet::panel::auth;
use bootfleet::store::sqlite::SqliteStore;
use bootfleet::store::{InventoryStore, Scope, StoreLocation};

use super::{
    ApiArgs, DatabaseArgs, DbCommand, ImagesCommand, IpxeBuildArgs, MachinesCommand, PowerArgs,
    TokensCommand, UsersCommand,
};

fn open(args: &DatabaseArgs) -> Result<Box<dyn InventoryStore>> {
    let location = location(args)?;
    location
        .open()
        .with_context(|| format!("inventory database {location}"))
}

/// Where the inventory database is, as `serve` would find it.
fn location(args: &DatabaseArgs) -> Result<StoreLocation> {
    Ok(match &args.database {
        Some(text) => StoreLocation::from(text.as_str()),
        None => {
            let mut config = match &args.config {
                Some(file) => Config::load(file)?,
                None => Config::default(),
            };
            if let Some(dir) = &args.state_dir {
                config.state_dir = dir.clone();
            }
            bootfleet::app::database_location(&config)
        }
    })
}

/// The SQLite file `args` name; backup and restore work on that file.
fn database_path(args: &DatabaseArgs) -> Result<std::path::PathBuf> {
    match location(args)? {
        StoreLocation::Sqlite(path) => Ok(path),
        StoreLocation::Postgres(url) => bail!(
            "{} is a PostgreSQL database: back it up with pg_dump and restore it with pg_restore, \
             or copy it to an SQLite file with `bootfleet db copy --from URL --to sqlite:FILE`",
            bootfleet::store::postgres::redact(&url)
        ),
    }
}

pub fn db(command: DbCommand) -> Result<()> {
    match command {
        DbCommand::Backup { file, database } => {
            let path = database_path(&database)?;
            if !path.is_file() {
                bail!(
                    "no inventory database at {} (pass --config, --state-dir or --database)",
                    path.display()
                );
            }
            let store = SqliteStore::open(&path)
                .with_context(|| format!("inventory database {}", path.display()))?;
            let summary = store
                .backup_to(&file)
                .with_context(|| format!("backing up {} to {}", path.display(), file.display()))?;
            println!(
                "backed up {} to {}: {summary}",
                path.display(),
                file.display()
            );
        }
        DbCommand::Restore { file, database } => {
            let live = database_path(&database)?;
            if !file.is_file() {
                bail!("no backup file {}", file.display());
            }
            // The backup is copied, brought to this version's schema and
            // checked beside the live database, then renamed over it: the
            // operator's backup file is never changed, and a failure on the
            // way leaves the live database as it was.
            let staging = live.with_extension("restore-staging");
            let checked = live.with_extension("restore-checked");
            for leftover in [&staging, &checked] {
                let _ = std::fs::remove_file(leftover);
            }
            std::fs::copy(&file, &staging)
                .with_context(|| format!("copying {} to {}", file.display(), staging.display()))?;
            let summary = SqliteStore::open(&staging)
                .and_then(|store| store.backup_to(&checked))
                .with_context(|| {
                    format!("{} is not a usable bootfleet database", file.display())
                })?;
            for sidecar in ["-wal", "-shm"] {
                let mut name = live.clone().into_os_string();
                name.push(sidecar);
                let _ = std::fs::remove_file(name);
            }
            std::fs::rename(&checked, &live)
                .with_context(|| format!("replacing {}", live.display()))?;
            bootfleet::durable::sync_parent_dir(&live)
                .with_context(|| format!("syncing the directory of {}", live.display()))?;
            for suffix in ["", "-wal", "-shm"] {
                let mut name = staging.clone().into_os_string();
                name.push(suffix);
                let _ = std::fs::remove_file(name);
            }
            println!(
                "restored {} from {}: {summary}",
                live.display(),
                file.display()
            );
        }
        DbCommand::Copy { from, to } => {
            let (from, to) = (
                StoreLocation::from(from.as_str()),
                StoreLocation::from(to.as_str()),
            );
            if from == to {
                bail!("--from and --to name the same database ({from})");
            }
            let source = from
                .open()
                .with_context(|| format!("the database to copy from, {from}"))?;
            let target = to
                .open()
                .with_context(|| format!("the database to copy to, {to}"))?;
            let copied = bootfleet::store::copy(source.as_ref(), target.as_ref())
                .with_context(|| format!("copying {from} to {to}"))?;
            println!("copied {from} to {to}, and read the copy back identical: {copied}");
        }
    }
    Ok(())
}

fn scope(text: &str) -> Result<Scope> {
    text.parse().map_err(anyhow::Error::msg)
}

pub fn users(command: UsersCommand) -> Result<()> {
    match command {
        UsersCommand::Add {
            name,
            scope: wanted,
            database,
        } => {
            let wanted = scope(&wanted)?;
            let mut password = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut password)
                .context("reading the password from standard input")?;
            let password = password.trim_end_matches(['\n', '\r']);
            auth::check_password_strength(password).map_err(anyhow::Error::msg)?;
            let hash = auth::hash_password(password)
                .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))?;
            let store = open(&database)?;
            store.add_user(&name, &hash, wanted, "cli")?;
            println!("user {name} ({}) saved", wanted.as_str());
        }
        UsersCommand::List { database } => {
            for user in open(&database)?.users()? {
                println!("{}\t{}", user.name, user.scope.as_str());
            }
        }
    }
    Ok(())
}

pub fn tokens(command: TokensCommand) -> Result<()> {
    let TokensCommand::Add {
        name,
        scope: wanted,
        user,
        database,
    } = command;
    let wanted = scope(&wanted)?;
    let secret = format!("bft_{}", auth::random_hex(32));
    open(&database)?.add_token(&name, &user, wanted, &auth::secret_hash(&secret), "cli")?;
    println!("{secret}");
    eprintln!(
        "token {name} ({}) created; it is shown only this once",
        wanted.as_str()
    );
    Ok(())
}

/// Calls the API and returns its JSON (or its error message).
fn call(api: &ApiArgs, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    if !api.url.starts_with("http://") {
        bail!("--url {:?}: this build's command line speaks plain http:// only (use it on the panel's loopback address)", api.url);
    }
    let url = format!("{}/api/v1{path}", api.url.trim_end_matches('/'));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let auth = format!("Bearer {}", api.token);
    let response = match (method, body) {
        ("GET", _) => agent.get(&url).header("Authorization", &auth).call(),
        ("DELETE", _) => agent.delete(&url).header("Authorization", &auth).call(),
        (_, body) => {
            let request = match method {
                "PUT" => agent.put(&url),
                _ => agent.post(&url),
            };
            request
                .header("Authorization", &auth)
                .send_json(body.unwrap_or(json!({})))
        }
    }
    .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let text = response.into_body().read_to_string().unwrap_or_default();
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if !status.is_success() {
        bail!(
            "{status}: {}",
            value["error"].as_str().unwrap_or(text.as_str())
        );
    }
    Ok(value)
}

pub fn machines(command: MachinesCommand) -> Result<()> {
    match command {
        MachinesCommand::List { api } => {
            let machines = call(&api, "GET", "/machines", None)?;
            println!("MAC\tHOSTNAME\tIMAGE\tSTATE");
            for m in machines.as_array().into_iter().flatten() {
                println!(
                    "{}\t{}\t{}\t{}{}",
                    m["mac"].as_str().unwrap_or(""),
                    m["hostname"].as_str().unwrap_or("-"),
                    m["image"].as_str().unwrap_or("-"),
                    m["state"].as_str().unwrap_or(""),
                    if m["stuck"] == true { " (stuck)" } else { "" }
                );
            }
        }
        MachinesCommand::Assign { image, macs, api } => {
            let image = (image != "none").then_some(image);
            let result = call(
                &api,
                "POST",
                "/machines/assign",
                Some(json!({ "macs": macs, "image": image })),
            )?;
            println!("{} machine(s) assigned", result["changed"]);
        }
        MachinesCommand::Forget { mac, api } => {
            call(&api, "DELETE", &format!("/machines/{mac}"), None)?;
            println!("forgot {mac}");
        }
        MachinesCommand::Set {
            mac,
            bmc,
            bmc_password_file,
            bmc_password_stdin,
            bmc_kg_file,
            api,
        } => set_bmc(
            &mac,
            &bmc,
            bmc_password_file,
            bmc_password_stdin,
            bmc_kg_file,
            &api,
        )?,
    }
    Ok(())
}

/// `bootfleet machines set MAC --bmc URL`: the password from the URL, a
/// file or standard input, and an IPMI K_g key from a file (never echoed
/// back).
fn set_bmc(
    mac: &str,
    url: &str,
    password_file: Option<std::path::PathBuf>,
    password_stdin: bool,
    kg_file: Option<std::path::PathBuf>,
    api: &ApiArgs,
) -> Result<()> {
    if url == "none" {
        call(api, "DELETE", &format!("/machines/{mac}/bmc"), None)?;
        println!("{mac}: BMC removed");
        return Ok(());
    }
    let password = match (password_file, password_stdin) {
        (Some(file), _) => Some(
            read_secret_file(&file)
                .with_context(|| format!("reading the BMC password from {}", file.display()))?,
        ),
        (None, true) => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("reading the BMC password from standard input")?;
            Some(line.trim_end_matches(['\n', '\r']).to_string())
        }
        (None, false) => None,
    };
    let mut body = json!({ "url": url });
    if let Some(password) = password {
        body["password"] = json!(password);
    }
    if let Some(file) = kg_file {
        let kg = read_secret_file(&file)
            .with_context(|| format!("reading the BMC's K_g key from {}", file.display()))?;
        body["kg_key"] = json!(kg);
    }
    let answer = call(api, "PUT", &format!("/machines/{mac}/bmc"), Some(body))?;
    println!(
        "{}: BMC {}",
        answer["mac"].as_str().unwrap_or(mac),
        answer["bmc"].as_str().unwrap_or("")
    );
    Ok(())
}

/// `bootfleet power ACTION MAC... [--pool NAME]`: starts a power job and
/// follows it, one line per change of its counts, then one per machine
/// that failed; exits non-zero when any did.
pub fn power(args: PowerArgs) -> Result<()> {
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
    let job = call(&args.api, "POST", "/power", Some(request))?;
    let id = job["id"].as_u64().unwrap_or(0);
    println!(
        "power job {id}: {} {} machine(s)",
        args.action,
        job["machines"].as_array().map_or(0, Vec::len)
    );
    if args.no_wait {
        return Ok(());
    }
    let mut last = (String::new(), std::time::Instant::now());
    let job = loop {
        let job = call(&args.api, "GET", &format!("/power/jobs/{id}"), None)?;
        let counts = format!(
            "{}: waves {}, {}",
            job["status"].as_str().unwrap_or(""),
            job["waves_sent"],
            stage_counts(&job["stages"]),
        );
        // A line when the counts change, and every 10 s while they do not.
        if counts != last.0 || last.1.elapsed() >= std::time::Duration::from_secs(10) {
            let left = job["estimated_seconds_left"]
                .as_u64()
                .map_or(String::new(), |s| format!(", about {s} s left"));
            println!("{counts}{left}");
            last = (counts, std::time::Instant::now());
        }
        if job["finished_ms"].is_u64() {
            break job;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    print_machines(&job);
    let failed = job["failures"].as_u64().unwrap_or(0);
    if failed > 0 {
        bail!("{failed} machine(s) failed");
    }
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
fn print_machines(job: &Value) {
    for m in job["machines"].as_array().into_iter().flatten() {
        println!(
            "{}\t{}\t{}",
            m["mac"].as_str().unwrap_or(""),
            m["stage"].as_str().unwrap_or(""),
            m["detail"].as_str().unwrap_or("")
        );
    }
}

pub fn images(command: ImagesCommand) -> Result<()> {
    match command {
        ImagesCommand::List { api } => {
            let images = call(&api, "GET", "/images", None)?;
            for i in images.as_array().into_iter().flatten() {
                println!(
                    "{}\t{}\t{}",
                    i["name"].as_str().unwrap_or(""),
                    i["kernel"].as_str().unwrap_or(""),
                    i["cmdline"].as_str().unwrap_or("")
                );
            }
        }
        ImagesCommand::Add {
            name,
            kernel,
            initrds,
            cmdline,
            transport,
            api,
        } => {
            let image = call(
                &api,
                "POST",
                "/images",
                Some(json!({ "name": name, "kernel": kernel, "initrds": initrds,
                    "cmdline": cmdline, "transport": transport })),
            )?;
            for file in image["files"].as_array().into_iter().flatten() {
                println!(
                    "{}\t{} bytes\tsha256 {}",
                    file["path"].as_str().unwrap_or(""),
                    file["size"],
                    file["sha256"].as_str().unwrap_or("")
                );
            }
            println!("image {name} registered");
        }
        ImagesCommand::Remove { name, api } => {
            call(&api, "DELETE", &format!("/images/{name}"), None)?;
            println!("removed {name}");
        }
    }
    Ok(())
}

/// `bootfleet ipxe build`: the binaries with the embedded script, their
/// SHA-256, and the DHCP settings that point firmware at them.
pub fn ipxe_build(args: IpxeBuildArgs) -> Result<()> {
    use bootfleet::ipxe;
    let config = match &args.config {
        Some(file) => Config::load(file)?,
        None => Config::default(),
    };
    let servers = if args.servers.is_empty() {
        // With a CA to trust and HTTPS on, the script fetches over HTTPS.
        let (scheme, port, default_port) = match &config.http.tls {
            Some(tls) if !args.trust.is_empty() => ("https", tls.listen.port(), 443),
            _ => ("http", config.http.listen.port(), 80),
        };
        vec![if port == default_port {
            format!("{scheme}://${{next-server}}")
        } else {
            format!("{scheme}://${{next-server}}:{port}")
        }]
    } else {
        args.servers.clone()
    };
    let out = args.out.clone().unwrap_or_else(|| config.root.join("ipxe"));
    let request = ipxe::BuildRequest {
        source: args.source.clone(),
        out: out.clone(),
        servers,
        targets: if args.targets.is_empty() {
            ipxe::DEFAULT_TARGETS
                .iter()
                .map(|t| t.to_string())
                .collect()
        } else {
            args.targets.clone()
        },
        jobs: args
            .jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        multicast_fix: !args.no_multicast_fix,
        trust: args.trust.clone(),
    };
    let built = ipxe::build(&request)?;
    match built.fix {
        ipxe::FixState::Applied => eprintln!("multicast TFTP fix applied to the tree's tftp.c"),
        ipxe::FixState::AlreadyThere => eprintln!("multicast TFTP fix: already in the tree"),
        ipxe::FixState::NotApplied => {
            eprintln!("multicast TFTP fix NOT applied: these binaries drop tftm:// data")
        }
    }
    for (name, sha256) in &built.files {
        println!("{sha256}  {}", out.join(name).display());
    }
    eprintln!(
        "embedded script: {} (SHA256SUMS beside it)",
        out.join(ipxe::SCRIPT_NAME).display()
    );
    if args.out.is_none() {
        eprintln!(
            "for method 4 set dhcp.bios = \"ipxe/undionly.kpxe\" and dhcp.uefi_x64 = \
             \"ipxe/snponly.efi\"; for method 2 flash the .rom into the NICs"
        );
    }
    Ok(())
}
