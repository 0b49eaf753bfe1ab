//! The effective configuration written back as TOML in the file's own
//! format (`bootfleet check-config` prints it): every key with the value
//! `serve` would use, defaults included. Loading the output again gives the
//! same [`Config`] (a test checks), so it is also a complete, current
//! configuration file to start from.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::Serialize;

use super::{BodyMode, Config, DhcpMode, EngineChoice, Quirk};

#[derive(Serialize)]
struct Effective<'a> {
    root: &'a PathBuf,
    engine: EngineChoice,
    workers: usize,
    tftp: Tftp<'a>,
    http: Http<'a>,
    dhcp: Dhcp<'a>,
    inventory: Inventory<'a>,
    panel: Panel<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    database: Option<Database<'a>>,
    cache: Cache,
    log: Log<'a>,
}

#[derive(Serialize)]
struct Database<'a> {
    url: &'a String,
}

#[derive(Serialize)]
struct Tftp<'a> {
    listen: String,
    max_blksize: u16,
    max_windowsize: u16,
    timeout_ms: u64,
    max_timeout_ms: u64,
    max_retries: u32,
    max_transfers: usize,
    max_transfers_per_client: usize,
    upload_dirs: &'a [PathBuf],
    max_upload_mib: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    multicast_groups: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    multicast_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    multicast_ttl: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    multicast_interface: Option<Ipv4Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    multicast_gather_ms: Option<u64>,
}

#[derive(Serialize)]
struct Http<'a> {
    listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    public_url: Option<&'a String>,
    max_connections: usize,
    max_connections_per_client: usize,
    max_header_bytes: usize,
    header_timeout_ms: u64,
    idle_timeout_ms: u64,
    send_timeout_ms: u64,
    body: BodyMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_cert: Option<&'a std::path::Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_key: Option<&'a std::path::Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_names: Option<&'a [String]>,
}

#[derive(Serialize)]
struct Dhcp<'a> {
    mode: DhcpMode,
    interfaces: &'a [String],
    ranges: Vec<String>,
    lease_seconds: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    router: Option<Ipv4Addr>,
    dns: &'a [Ipv4Addr],
    #[serde(skip_serializing_if = "Option::is_none")]
    domain: Option<&'a String>,
    relay_pool_share: f64,
    max_requests_per_second_per_source: u32,
    max_requests_per_second_per_client: u32,
    relays: &'a [Ipv4Addr],
    sync_leases: bool,
    gather_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    answer_router_solicitations: Option<bool>,
    bios: &'a str,
    uefi_x64: &'a str,
    uefi_ia32: &'a str,
    uefi_arm64: &'a str,
    http_x64: &'a str,
    http_arm64: &'a str,
    secure_boot_x64: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    script_url: Option<&'a String>,
    loader_dirs: &'a [PathBuf],
    quirks: &'a [Quirk],
}

#[derive(Serialize)]
struct Inventory<'a> {
    file: &'a PathBuf,
    state_dir: &'a PathBuf,
}

#[derive(Serialize)]
struct Panel<'a> {
    listen: String,
    database: &'a PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_cert: Option<&'a PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_key: Option<&'a PathBuf>,
    event_retention_hours: u64,
    stuck_after_seconds: u64,
    max_upload_mib: u64,
    max_discovered: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_name: Option<&'a String>,
}

#[derive(Serialize)]
struct Cache {
    max_mib: u64,
}

#[derive(Serialize)]
struct Log<'a> {
    level: &'a str,
}

const MIB: u64 = 1 << 20;

impl Config {
    /// This configuration as a TOML file that loads back to it.
    pub fn to_toml(&self) -> String {
        let t = &self.tftp;
        let multicast = t.multicast.as_ref();
        let h = &self.http;
        let d = &self.dhcp;
        let p = &self.panel;
        let effective = Effective {
            root: &self.root,
            engine: self.engine,
            workers: self.workers,
            tftp: Tftp {
                listen: t.listen.to_string(),
                max_blksize: t.max_blksize,
                max_windowsize: t.max_windowsize,
                timeout_ms: t.timeout.as_millis() as u64,
                max_timeout_ms: t.max_timeout.as_millis() as u64,
                max_retries: t.max_retries,
                max_transfers: t.max_transfers,
                max_transfers_per_client: t.max_transfers_per_client,
                upload_dirs: &t.upload_dirs,
                max_upload_mib: t.max_upload_bytes / MIB,
                multicast_groups: multicast.map(|m| format!("{}-{}", m.groups.0, m.groups.1)),
                multicast_port: multicast.map(|m| m.port),
                multicast_ttl: multicast.map(|m| m.ttl),
                multicast_interface: multicast.and_then(|m| m.interface),
                multicast_gather_ms: multicast.map(|m| m.gather.as_millis() as u64),
            },
            http: Http {
                listen: h.listen.to_string(),
                public_url: h.public_url.as_ref(),
                max_connections: h.max_connections,
                max_connections_per_client: h.max_connections_per_client,
                max_header_bytes: h.max_header_bytes,
                header_timeout_ms: h.header_timeout.as_millis() as u64,
                idle_timeout_ms: h.idle_timeout.as_millis() as u64,
                send_timeout_ms: h.send_timeout.as_millis() as u64,
                body: h.body,
                tls_listen: h.tls.as_ref().map(|t| t.listen.to_string()),
                tls_cert: h
                    .tls
                    .as_ref()
                    .and_then(|t| t.cert_and_key.as_ref())
                    .map(|(c, _)| c.as_path()),
                tls_key: h
                    .tls
                    .as_ref()
                    .and_then(|t| t.cert_and_key.as_ref())
                    .map(|(_, k)| k.as_path()),
                tls_names: h
                    .tls
                    .as_ref()
                    .filter(|t| !t.names.is_empty())
                    .map(|t| t.names.as_slice()),
            },
            dhcp: Dhcp {
                mode: d.mode,
                interfaces: &d.interfaces,
                ranges: d
                    .ranges
                    .iter()
                    .map(|(first, last, prefix)| match prefix {
                        Some(prefix) => format!("{first}-{last}/{prefix}"),
                        None => format!("{first}-{last}"),
                    })
                    .collect(),
                lease_seconds: d.lease_time.as_secs(),
                router: d.router,
                dns: &d.dns,
                domain: d.domain.as_ref(),
                relay_pool_share: d.relay_pool_share,
                max_requests_per_second_per_source: d.max_requests_per_second_per_source,
                max_requests_per_second_per_client: d.max_requests_per_second_per_client,
                relays: &d.relays,
                sync_leases: d.sync_leases,
                gather_ms: d.gather.as_millis() as u64,
                answer_router_solicitations: d.answer_router_solicitations,
                bios: &d.boot.bios,
                uefi_x64: &d.boot.uefi_x64,
                uefi_ia32: &d.boot.uefi_ia32,
                uefi_arm64: &d.boot.uefi_arm64,
                http_x64: &d.boot.http_x64,
                http_arm64: &d.boot.http_arm64,
                secure_boot_x64: &d.boot.secure_boot_x64,
                script_url: d.boot.script_url.as_ref(),
                loader_dirs: &d.boot.loader_dirs,
                quirks: &d.quirks,
            },
            inventory: Inventory {
                file: &self.inventory_file,
                state_dir: &self.state_dir,
            },
            panel: Panel {
                listen: p
                    .listen
                    .map_or_else(|| "off".to_string(), |a| a.to_string()),
                database: &p.database,
                tls_cert: p.tls_cert.as_ref(),
                tls_key: p.tls_key.as_ref(),
                event_retention_hours: p.event_retention.as_secs() / 3600,
                stuck_after_seconds: p.stuck_after.as_secs(),
                max_upload_mib: p.max_upload_bytes / MIB,
                max_discovered: p.max_discovered,
                metrics_listen: p.metrics_listen.map(|a| a.to_string()),
                server_name: p.server_name.as_ref(),
            },
            database: self.database_url.as_ref().map(|url| Database { url }),
            cache: Cache {
                max_mib: self.cache_max_bytes / MIB,
            },
            log: Log {
                level: &self.log_level,
            },
        };
        toml::to_string(&effective).expect("the effective configuration is TOML")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key set away from its default, loaded, written and loaded
    /// again: nothing is lost or changed on the way.
    #[test]
    fn the_effective_configuration_loads_back_to_itself() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("boot");
        let file = dir.path().join("bootfleet.toml");
        std::fs::write(
            &file,
            format!(
                r#"root = "{}"
engine = "epoll"
workers = 3
[tftp]
listen = "10.0.0.1:6969"
max_blksize = 1400
max_windowsize = 16
timeout_ms = 700
max_retries = 7
upload_dirs = ["incoming"]
max_upload_mib = 8
multicast_groups = "239.255.66.1-239.255.66.9"
multicast_port = 1759
multicast_interface = "10.0.0.1"
[http]
listen = "10.0.0.1:8080"
public_url = "http://boot.example"
body = "sendfile"
idle_timeout_ms = 5000
[dhcp]
mode = "full"
interfaces = ["eth1"]
ranges = ["10.0.0.100-10.0.0.200", "10.9.0.10-10.9.0.20/24"]
router = "10.0.0.1"
dns = ["10.0.0.2"]
domain = "lab"
relays = ["10.9.0.1"]
sync_leases = false
answer_router_solicitations = false
bios = "bios/undionly.kpxe"
script_url = "http://10.0.0.1/boot.ipxe"
loader_dirs = ["/opt/ipxe"]
[[dhcp.quirks]]
mac_prefix = "b8:27:eb"
arch = "uefi-arm64"
[inventory]
state_dir = "{}"
[panel]
listen = "off"
stuck_after_seconds = 30
metrics_listen = "10.0.0.1:9100"
server_name = "boot-a"
tls_cert = "/etc/bootfleet/panel.crt"
tls_key = "/etc/bootfleet/panel.key"
[database]
url = "postgres://bootfleet@db.example/inventory"
[cache]
max_mib = 64
[log]
level = "bootfleet=debug"
"#,
                root.display(),
                dir.path().join("state").display()
            ),
        )
        .unwrap();
        let first = Config::load(&file).unwrap();
        let written = first.to_toml();
        std::fs::write(&file, &written).unwrap();
        let second = Config::load(&file).unwrap();
        assert_eq!(first, second, "{written}");
        // Defaults are written out too, so the file says what runs.
        assert!(
            written.contains("max_transfers_per_client = 64"),
            "{written}"
        );
    }
}
