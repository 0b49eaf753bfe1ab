//! Command-line subcommands besides `serve`: users, tokens and `db` work
//! on the inventory database itself (they must work before anyone can log
//! in, and with the server stopped); everything else goes through the
//! running server's API ([`api`]), so that it is audited and reaches the
//! data plane like panel changes. `ipxe build` runs iPXE's own build on the
//! operator's source tree.

pub mod api;
pub mod args;

use std::io::BufRead;

use anyhow::{bail, Context, Result};

use bootfleet::config::Config;
use bootfleet::panel::auth;
use bootfleet::store::sqlite::SqliteStore;
use bootfleet::store::{InventoryStore, Scope, StoreLocation};

use args::{DatabaseArgs, DbCommand, IpxeBuildArgs, TokensCommand, UsersCommand};

/// The exit status for a failed command (`docs/cli.md`): 3 the panel
/// cannot be reached or failed, 4 the token is refused or lacks the scope,
/// 5 not found, 6 any other refusal, 7 some machines failed; 1 for
/// everything else (a file, the database, a bad value). clap exits 2 on a
/// usage error before any of this runs.
pub fn exit_status(error: &anyhow::Error) -> u8 {
    error
        .chain()
        .find_map(|cause| cause.downcast_ref::<api::ApiFailure>())
        .map_or(1, api::ApiFailure::exit_status)
}

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

/// A password from one line of standard input, checked for strength.
fn read_password() -> Result<String> {
    let mut password = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut password)
        .context("reading the password from standard input")?;
    let password = password.trim_end_matches(['\n', '\r']);
    auth::check_password_strength(password).map_err(anyhow::Error::msg)?;
    auth::hash_password(password).map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))
}

pub fn users(command: UsersCommand) -> Result<()> {
    match command {
        UsersCommand::Add {
            name,
            scope: wanted,
            database,
        } => {
            let wanted = scope(&wanted)?;
            let hash = read_password()?;
            let store = open(&database)?;
            store.add_user(&name, &hash, wanted, "cli")?;
            println!("user {name} ({}) saved", wanted.as_str());
        }
        UsersCommand::Passwd { name, database } => {
            let store = open(&database)?;
            let user = store
                .user(&name)?
                .with_context(|| format!("no user {name:?} (bootfleet users list)"))?;
            let hash = read_password()?;
            store.add_user(&name, &hash, user.scope, "cli")?;
            println!("password of {name} changed; its sessions ended");
        }
        UsersCommand::Remove { name, database } => {
            let revoked = open(&database)?.remove_user(&name, "cli")?;
            println!("user {name} removed; {revoked} token(s) acting for it revoked");
        }
        UsersCommand::List { json, database } => {
            let users = open(&database)?.users()?;
            if json {
                let list: Vec<_> = users
                    .iter()
                    .map(|u| serde_json::json!({ "name": u.name, "scope": u.scope.as_str(), "created_ms": u.created_ms }))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for user in users {
                    println!("{}\t{}", user.name, user.scope.as_str());
                }
            }
        }
    }
    Ok(())
}

pub fn tokens(command: TokensCommand) -> Result<()> {
    match command {
        TokensCommand::Add {
            name,
            scope: wanted,
            user,
            database,
        } => {
            let wanted = scope(&wanted)?;
            let secret = format!("bft_{}", auth::random_hex(32));
            open(&database)?.add_token(&name, &user, wanted, &auth::secret_hash(&secret), "cli")?;
            println!("{secret}");
            eprintln!(
                "token {name} ({}) created; it is shown only this once",
                wanted.as_str()
            );
        }
        TokensCommand::List { json, database } => {
            let tokens = open(&database)?.tokens()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tokens)?);
            } else {
                println!("ID\tNAME\tSCOPE\tUSER\tLAST USED");
                for t in tokens {
                    let used = t
                        .last_used_ms
                        .map_or("never".to_string(), |ms| api::when(&ms.into()));
                    println!(
                        "{}\t{}\t{}\t{}\t{used}",
                        t.id,
                        t.name,
                        t.scope.as_str(),
                        t.user
                    );
                }
            }
        }
        TokensCommand::Revoke { id, database } => {
            open(&database)?.revoke_token(id, "cli")?;
            println!("token {id} revoked");
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
