//! Configuration in two layers.
//!
//! [`FileConfig`] is the TOML file format: serde structs that refuse unknown
//! keys (`deny_unknown_fields`), every field optional. [`Config`] is the
//! validated runtime configuration; it is built from the built-in defaults,
//! then the file, then the command line (`serve` flags override the file).
//! Every error names the key, and the line when it came from the file.
//!
//! ```toml
//! root = "/srv/bootfleet"      # the boot directory
//! engine = "auto"              # auto | io-uring | epoll
//! workers = 0                  # data-plane threads; 0 = one per core
//!
//! [tftp]
//! listen = "0.0.0.0:69"
//! max_blksize = 1468           # RFC 2348 upper bound granted to clients
//! max_windowsize = 64          # RFC 7440 upper bound
//! timeout_ms = 1000            # first retransmission interval
//! max_timeout_ms = 5000        # back-off ceiling
//! max_retries = 5
//! max_transfers = 10000        # concurrent, whole server
//! max_transfers_per_client = 64
//! upload_dirs = []             # directories (under root) that accept uploads
//! max_upload_mib = 64          # largest accepted upload
//! multicast_groups = "239.255.66.1-239.255.66.254"  # RFC 2090 sessions (off when absent)
//! multicast_port = 1758        # UDP port of every group
//! multicast_ttl = 1            # hops a group datagram may cross
//! multicast_interface = "10.0.0.1"  # address of the interface groups leave by
//! multicast_gather_ms = 500     # a session's first block waits this long for more machines
//!
//! [http]
//! listen = "0.0.0.0:80"
//! public_url = "http://10.0.0.1"  # how scripts name this server (default: the Host header)
//! max_connections = 10000
//! max_connections_per_client = 2048  # one host cannot hold them all
//! max_header_bytes = 16384     # larger request heads get 431
//! header_timeout_ms = 10000    # a request head must arrive within this (slowloris)
//! idle_timeout_ms = 60000      # keep-alive connections idle longer are closed
//! send_timeout_ms = 30000      # a client that takes no bytes for this long is dropped
//! body = "auto"                # auto | sendfile | mmap: how file bodies reach the socket
//! tls_listen = "0.0.0.0:443"   # HTTPS as well, for iPXE built with this server's CA (off by default)
//! tls_cert = "/etc/bootfleet/https.crt"  # PEM chain and key (both or neither); without them
//! tls_key = "/etc/bootfleet/https.key"   # bootfleet signs its own with a CA it keeps in the
//!                              # state directory (https-ca.crt: give it to `ipxe build --trust`)
//! tls_names = ["10.0.0.1", "boot.example.org"]  # in that certificate (default: the
//!                              # tls_listen address, or every IPv4 address of this host)
//!
//! [dhcp]
//! mode = "off"                 # off | proxy | full
//! interfaces = ["eth1"]        # answered only on these (required unless off)
//! ranges = ["10.0.0.100-10.0.0.200"]  # full mode; subnet from the interface
//! lease_seconds = 3600
//! router = "10.0.0.1"          # option 3 (full mode)
//! dns = ["10.0.0.1"]           # option 6 (full mode)
//! domain = "cluster.local"     # option 15 (full mode)
//! relay_pool_share = 0.75      # most of a pool one relay may hold
//! max_requests_per_second_per_source = 20000  # per sending address (never 0.0.0.0)
//! max_requests_per_second_per_client = 20      # per MAC (and relay, when relayed)
//! relays = ["10.1.0.1"]        # relay agents trusted besides each packet's own giaddr
//! sync_leases = true           # fdatasync leases before ACKs (false: write only)
//! gather_ms = 5                # while busy, let requests gather this long per batch (0: none)
//! answer_router_solicitations = true  # end iPXE's ~15 s IPv6 wait (default: full mode only)
//! bios = "undionly.kpxe"       # first-stage loaders by architecture
//! uefi_x64 = "ipxe.efi"
//! uefi_ia32 = "ipxe-i386.efi"
//! uefi_arm64 = "arm64/snponly.efi"
//! http_x64 = "ipxe.efi"        # UEFI HTTP boot: served as http://SERVER:PORT/<file>
//! http_arm64 = "arm64/snponly.efi"
//! secure_boot_x64 = "secureboot/shimx64.efi"  # UEFI x64 PXE machines booting an image marked
//!                              # secure_boot: signed shim, which fetches grubx64.efi (signed
//!                              # GRUB) beside it; both served from Debian's shim-signed and
//!                              # grub-efi-amd64-signed when the boot directory has none
//! script_url = "http://10.0.0.1/boot.ipxe"   # for iPXE; default: this server's HTTP
//! loader_dirs = ["/usr/lib/ipxe"]  # loaders missing from root are served from here (Debian's ipxe)
//! [[dhcp.quirks]]              # matched by MAC prefix and/or vendor-class prefix
//! mac_prefix = "b8:27:eb"
//! vendor_class = "PXEClient:Arch:00000"
//! arch = "uefi-arm64"          # treat as this architecture, and/or
//! boot_file = "rpi/bootcode.bin"  # answer this file
//! also_ipxe = false            # true: to iPXE clients too (an iPXE ROM chainloading
//!                              # `bootfleet ipxe build`'s undionly.kpxe)
//! secure_boot = false          # true: UEFI x64 PXE machines it matches boot the Secure Boot
//!                              # chain (secure_boot_x64), whatever their image says
//!
//! [inventory]
//! file = "inventory.toml"      # relative to root
//! state_dir = "state"          # one-shot state; relative to the config file
//!
//! [cache]
//! max_mib = 1024               # mapped bytes kept alive between transfers
//!
//! [log]
//! level = "info"               # or a tracing filter such as "bootfleet=debug"
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

mod effective;

/// Which data-plane backend to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineChoice {
    /// io_uring when the kernel allows it, else epoll.
    Auto,
    /// io_uring, or fail at start-up.
    IoUring,
    /// The tokio/epoll fallback.
    Epoll,
}

impl std::str::FromStr for EngineChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "io-uring" | "io_uring" | "uring" => Ok(Self::IoUring),
            "epoll" | "tokio" => Ok(Self::Epoll),
            other => Err(format!(
                "unknown engine {other:?}: use auto, io-uring or epoll"
            )),
        }
    }
}

/// The TOML file, as written. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub root: Option<Spanned<PathBuf>>,
    pub engine: Option<EngineChoice>,
    pub workers: Option<Spanned<u64>>,
    #[serde(default)]
    pub tftp: FileTftp,
    #[serde(default)]
    pub http: FileHttp,
    #[serde(default)]
    pub cache: FileCache,
    #[serde(default)]
    pub inventory: FileInventory,
    #[serde(default)]
    pub dhcp: FileDhcp,
    #[serde(default)]
    pub log: FileLog,
    #[serde(default)]
    pub panel: FilePanel,
    #[serde(default)]
    pub database: FileDatabase,
    #[serde(default)]
    pub power: FilePower,
}

/// `[power]`: BMC power control and the check-in of booted machines.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePower {
    /// The key that seals BMC passwords and signs check-in tokens.
    pub key_file: Option<PathBuf>,
    /// PEM CA certificates Redfish BMCs' certificates must chain to.
    pub ca_file: Option<PathBuf>,
    /// BMCs talked to at once.
    pub concurrency: Option<Spanned<u64>>,
    /// For each request to a BMC.
    pub timeout_seconds: Option<Spanned<u64>>,
    /// Where booted machines reach the panel's check-in endpoint.
    pub checkin_url: Option<Spanned<String>>,
    /// From power-on (or the kernel fetch) to check-in.
    pub checkin_deadline_seconds: Option<Spanned<u64>>,
}

/// Power control and check-in settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PowerConfig {
    /// Relative paths are taken inside `state_dir`.
    pub key_file: PathBuf,
    pub ca_file: Option<PathBuf>,
    pub concurrency: usize,
    pub timeout: Duration,
    /// `None`: the panel's own address when booted machines can reach it
    /// (see `app`), else no check-in.
    pub checkin_url: Option<String>,
    pub checkin_deadline: Duration,
}

/// `[database]`: where the inventory is kept when not in the SQLite file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDatabase {
    /// `postgres://user:password@host:port/database`.
    pub url: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePanel {
    /// `ADDR:PORT`, or `"off"` (the inventory is then read from the file).
    pub listen: Option<Spanned<String>>,
    pub database: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub event_retention_hours: Option<Spanned<u64>>,
    pub stuck_after_seconds: Option<Spanned<u64>>,
    pub max_upload_mib: Option<Spanned<u64>>,
    pub max_discovered: Option<Spanned<u64>>,
    /// `ADDR:PORT` for `/metrics`, `/healthz` and `/readyz` alone.
    pub metrics_listen: Option<SocketAddr>,
    /// This server's name on the boot events it stores.
    pub server_name: Option<String>,
}

/// The control panel and its inventory database.
#[derive(Debug, Clone, PartialEq)]
pub struct PanelConfig {
    /// Where the panel and API listen; `None`: no panel, and the inventory
    /// comes from the inventory file instead of the database.
    pub listen: Option<SocketAddr>,
    /// The SQLite file (relative paths are taken inside `state_dir`).
    pub database: PathBuf,
    /// PEM certificate chain and key: the panel is served over TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// How long boot events are kept.
    pub event_retention: Duration,
    /// A machine that has not moved on for this long is shown as stuck.
    pub stuck_after: Duration,
    /// Largest file the panel accepts as an upload.
    pub max_upload_bytes: u64,
    /// Most discovered (not adopted) machines kept; the least recently
    /// seen go first. Unauthenticated script requests for made-up MACs
    /// can then never grow the inventory without bound.
    pub max_discovered: usize,
    /// A listener of their own for `/metrics`, `/healthz` and `/readyz`
    /// (they are on the panel's listener too), e.g. on the address a
    /// Prometheus server scrapes.
    pub metrics_listen: Option<SocketAddr>,
    /// This server's name on the boot events it stores (several servers
    /// may share one database); `None`: the host name.
    pub server_name: Option<String>,
    /// Where other servers fetch image files from this one (its data
    /// plane: `http.public_url`, or `http.listen` when that is a specific
    /// address); set at start, not read from the file.
    pub data_plane_url: Option<String>,
}

impl PanelConfig {
    /// This server's name among the servers of one database: the
    /// configured one, or the host name.
    pub fn server_name(&self) -> String {
        self.server_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|name| name.trim().to_string())
                .ok()
                .filter(|name| !name.is_empty())
                .unwrap_or_else(|| "bootfleet".to_string())
        })
    }
}

/// Parses the panel's listen setting: an address, or `off`.
pub fn parse_panel_listen(text: &str) -> Result<Option<SocketAddr>, String> {
    if text == "off" {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|_| format!("{text:?} is not ADDR:PORT (e.g. 127.0.0.1:9090) or \"off\""))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTftp {
    pub listen: Option<SocketAddr>,
    pub max_blksize: Option<Spanned<u64>>,
    pub max_windowsize: Option<Spanned<u64>>,
    pub timeout_ms: Option<Spanned<u64>>,
    pub max_timeout_ms: Option<Spanned<u64>>,
    pub max_retries: Option<Spanned<u64>>,
    pub max_transfers: Option<Spanned<u64>>,
    pub max_transfers_per_client: Option<Spanned<u64>>,
    pub upload_dirs: Option<Vec<Spanned<PathBuf>>>,
    pub max_upload_mib: Option<Spanned<u64>>,
    pub multicast_groups: Option<Spanned<String>>,
    pub multicast_port: Option<Spanned<u64>>,
    pub multicast_ttl: Option<Spanned<u64>>,
    pub multicast_interface: Option<Ipv4Addr>,
    pub multicast_gather_ms: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHttp {
    pub listen: Option<SocketAddr>,
    pub public_url: Option<Spanned<String>>,
    pub max_connections: Option<Spanned<u64>>,
    pub max_connections_per_client: Option<Spanned<u64>>,
    pub max_header_bytes: Option<Spanned<u64>>,
    pub header_timeout_ms: Option<Spanned<u64>>,
    pub idle_timeout_ms: Option<Spanned<u64>>,
    pub send_timeout_ms: Option<Spanned<u64>>,
    pub body: Option<BodyMode>,
    pub tls_listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_names: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDhcp {
    pub mode: Option<DhcpMode>,
    pub interfaces: Option<Vec<String>>,
    pub ranges: Option<Vec<Spanned<String>>>,
    pub lease_seconds: Option<Spanned<u64>>,
    pub router: Option<Ipv4Addr>,
    pub dns: Option<Vec<Ipv4Addr>>,
    pub domain: Option<String>,
    pub relay_pool_share: Option<Spanned<f64>>,
    pub max_requests_per_second_per_source: Option<Spanned<u64>>,
    pub max_requests_per_second_per_client: Option<Spanned<u64>>,
    pub relays: Option<Vec<Ipv4Addr>>,
    pub sync_leases: Option<bool>,
    pub gather_ms: Option<Spanned<u64>>,
    pub answer_router_solicitations: Option<bool>,
    pub bios: Option<String>,
    pub uefi_x64: Option<String>,
    pub uefi_ia32: Option<String>,
    pub uefi_arm64: Option<String>,
    pub http_x64: Option<String>,
    pub http_arm64: Option<String>,
    pub secure_boot_x64: Option<String>,
    pub script_url: Option<String>,
    pub loader_dirs: Option<Vec<PathBuf>>,
    #[serde(default)]
    pub quirks: Vec<Quirk>,
}

/// Which DHCP service to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DhcpMode {
    Off,
    /// ProxyDHCP beside an existing server: boot answers only, no addresses.
    Proxy,
    /// Addresses and boot answers.
    Full,
}

impl std::str::FromStr for DhcpMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "proxy" => Ok(Self::Proxy),
            "full" => Ok(Self::Full),
            other => Err(format!(
                "unknown DHCP mode {other:?}: use off, proxy or full"
            )),
        }
    }
}

/// A firmware quirk: requests matching every given prefix get the
/// architecture and/or boot file named here.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Quirk {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac_prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vendor_class: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<crate::proto::dhcp::Arch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_file: Option<String>,
    /// Give `boot_file` to iPXE clients too, which otherwise always get the
    /// script URL: for machines whose firmware is iPXE (QEMU's NIC ROMs)
    /// that should chainload an iPXE with an embedded script (method 4 of
    /// the write-up). No loop: that iPXE announces its own script and gets
    /// no boot file.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub also_ipxe: bool,
    /// Boot the machines it matches through the Secure Boot chain
    /// ([`BootFiles::secure_boot_x64`]) when they are UEFI x64 PXE
    /// clients, whatever their image says: for firmware that has Secure
    /// Boot on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secure_boot: bool,
}

/// DHCP settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DhcpConfig {
    pub mode: DhcpMode,
    pub interfaces: Vec<String>,
    /// Address ranges; a prefix length given as `/N` names a relayed
    /// subnet, otherwise the subnet is the interface's.
    pub ranges: Vec<(Ipv4Addr, Ipv4Addr, Option<u8>)>,
    pub lease_time: Duration,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub relay_pool_share: f64,
    /// Requests per second one sending address may make (unconfigured
    /// clients all send from 0.0.0.0, so they are not limited by this).
    pub max_requests_per_second_per_source: u32,
    /// Requests per second one client may make: keyed on its MAC (chaddr),
    /// and on the relay's giaddr when relayed, so one noisy machine never
    /// slows the others.
    pub max_requests_per_second_per_client: u32,
    /// Relay agents whose relayed packets are accepted besides those sent
    /// from the giaddr they carry; any other relayed packet is dropped
    /// (it would make the server unicast to whatever giaddr it names).
    pub relays: Vec<Ipv4Addr>,
    /// `fdatasync` the lease journal before ACKs (power-loss safe) or only
    /// write it (restart safe).
    pub sync_leases: bool,
    /// While requests keep arriving, how long the DHCP loop lets them
    /// gather before it reads and answers the next batch (zero: answer each
    /// wake-up at once). An idle server still answers the first request of
    /// a burst immediately.
    pub gather: Duration,
    /// Answer IPv6 Router Solicitations on the DHCP interfaces with an
    /// advertisement that configures nothing, so that iPXE stops waiting
    /// for IPv6 (see [`crate::proto::ndp`]); `None`: only in full mode,
    /// where bootfleet owns the boot LAN.
    pub answer_router_solicitations: Option<bool>,
    pub boot: BootFiles,
    pub quirks: Vec<Quirk>,
}

/// First-stage loaders by architecture, and iPXE's script URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    pub bios: String,
    pub uefi_x64: String,
    pub uefi_ia32: String,
    pub uefi_arm64: String,
    pub http_x64: String,
    pub http_arm64: String,
    /// The Secure Boot chain's first stage for UEFI x64 PXE clients: a
    /// signed shim, which fetches `grubx64.efi` (a signed GRUB network
    /// image) from the same directory ([`Self::secure_boot_grub`]).
    pub secure_boot_x64: String,
    /// Default: `http://<interface address>:<HTTP port>/boot.ipxe`.
    pub script_url: Option<String>,
    /// Where loaders missing from the boot directory are looked for
    /// (default: Debian's `ipxe` package, `/usr/lib/ipxe`).
    pub loader_dirs: Vec<PathBuf>,
}

/// Debian's signed shim (package `shim-signed`), served as
/// [`BootFiles::secure_boot_x64`] when the boot directory has none.
pub const SYSTEM_SHIM_X64: &str = "/usr/lib/shim/shimx64.efi.signed";
/// Debian's signed GRUB network image (package `grub-efi-amd64-signed`),
/// served as [`BootFiles::secure_boot_grub`] when the boot directory has
/// none. Its prefix is `/grub` on the TFTP server it came from, and it
/// reads `grub/grub.cfg` there (one config for every machine: bootfleet
/// answers it with a config that loads each machine's own by its MAC).
pub const SYSTEM_GRUB_NET_X64: &str = "/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed";

impl BootFiles {
    /// The signed GRUB that shim fetches: `grubx64.efi` in the directory of
    /// [`Self::secure_boot_x64`] (shim's rule, not ours to choose).
    pub fn secure_boot_grub(&self) -> String {
        match self.secure_boot_x64.rsplit_once('/') {
            Some((dir, _)) => format!("{dir}/grubx64.efi"),
            None => "grubx64.efi".to_string(),
        }
    }

    /// The Secure Boot chain's files with the system copies served when
    /// the boot directory lacks them.
    pub fn secure_boot_system_files(&self) -> [(String, PathBuf); 2] {
        [
            (
                self.secure_boot_x64.trim_start_matches('/').to_string(),
                PathBuf::from(SYSTEM_SHIM_X64),
            ),
            (
                self.secure_boot_grub().trim_start_matches('/').to_string(),
                PathBuf::from(SYSTEM_GRUB_NET_X64),
            ),
        ]
    }
}

impl DhcpConfig {
    /// Whether IPv6 Router Solicitations are answered (by default only in
    /// full mode: beside another DHCP server the network has an owner).
    pub fn answers_router_solicitations(&self) -> bool {
        self.mode != DhcpMode::Off
            && self
                .answer_router_solicitations
                .unwrap_or(self.mode == DhcpMode::Full)
    }

    /// Every first-stage loader a boot answer can name, as paths relative
    /// to the boot directory (URLs lose their scheme and host), so that
    /// their fetches can be told apart as the loader phase of a boot.
    pub fn loader_files(&self) -> Vec<String> {
        let boot = &self.boot;
        [
            &boot.bios,
            &boot.uefi_x64,
            &boot.uefi_ia32,
            &boot.uefi_arm64,
            &boot.http_x64,
            &boot.http_arm64,
            &boot.secure_boot_x64,
            &boot.secure_boot_grub(),
        ]
        .into_iter()
        .chain(self.quirks.iter().filter_map(|q| q.boot_file.as_ref()))
        .map(|file| {
            let path = match file.split_once("://") {
                Some((_, rest)) => rest.split_once('/').map_or("", |(_, path)| path),
                None => file.as_str(),
            };
            path.trim_start_matches('/').to_string()
        })
        .filter(|path| !path.is_empty())
        .collect()
    }
}

/// Parses `FIRST-LAST` or `FIRST-LAST/PREFIX`.
pub fn parse_range(text: &str) -> Result<(Ipv4Addr, Ipv4Addr, Option<u8>), String> {
    let (text, prefix) = match text.split_once('/') {
        Some((range, prefix)) => {
            let prefix: u8 = prefix
                .trim()
                .parse()
                .ok()
                .filter(|p| (8..=30).contains(p))
                .ok_or_else(|| format!("/{prefix} is not a prefix length between 8 and 30"))?;
            (range, Some(prefix))
        }
        None => (text, None),
    };
    let (first, last) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?} is not FIRST-LAST (e.g. 10.0.0.100-10.0.0.200)"))?;
    let first: Ipv4Addr = first
        .trim()
        .parse()
        .map_err(|e| format!("{first:?}: {e}"))?;
    let last: Ipv4Addr = last.trim().parse().map_err(|e| format!("{last:?}: {e}"))?;
    if u32::from(first) > u32::from(last) {
        return Err(format!("{text:?}: the first address is after the last"));
    }
    Ok((first, last, prefix))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileInventory {
    pub file: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
}

/// How the HTTP engine moves file bytes to the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BodyMode {
    /// Chosen per response: copied from the mapping while few connections
    /// are open, by `sendfile` beyond (see [`BodyMode::uses_sendfile`]).
    Auto,
    /// `sendfile(2)` from the file: no copy through user space.
    Sendfile,
    /// `send` of slices of the mmapped file.
    Mmap,
}

impl BodyMode {
    /// Most open HTTP connections at which `auto` still copies a body from
    /// the mapping.
    pub const AUTO_COPIES_UP_TO_CONNECTIONS: usize = 16;

    /// Whether a file body that starts while `open_connections` are open
    /// goes by `sendfile` (otherwise by `send` from the mapping).
    ///
    /// `auto` copies for a few clients: one `send` of mapped bytes moves a
    /// body faster, and at less CPU per GB, than `sendfile` splicing it
    /// page by page (measured on loopback at 1, 4 and 16 connections, for
    /// 10 MB files and 1 MiB ranges alike). With many clients it uses
    /// `sendfile`: a copy held in every socket's send buffer then costs
    /// more (at 64 connections, 10 MB files took 0.20 CPU-s/GB copied
    /// against 0.14–0.17 by `sendfile`) and pins kernel memory per client.
    pub fn uses_sendfile(self, open_connections: usize) -> bool {
        match self {
            BodyMode::Sendfile => true,
            BodyMode::Mmap => false,
            BodyMode::Auto => open_connections > Self::AUTO_COPIES_UP_TO_CONNECTIONS,
        }
    }
}

/// HTTP settings.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub public_url: Option<String>,
    pub max_connections: usize,
    /// Open connections one client address may hold, so that one host
    /// holding idle sockets cannot get everyone else a 503.
    pub max_connections_per_client: usize,
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub send_timeout: Duration,
    pub body: BodyMode,
    /// HTTPS beside plain HTTP, on this address (off by default).
    pub tls: Option<HttpsConfig>,
}

/// The boot data plane over TLS (`[http] tls_listen`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsConfig {
    pub listen: SocketAddr,
    /// The operator's PEM certificate chain and key; `None`: bootfleet's
    /// own, signed by the CA it keeps in the state directory.
    pub cert_and_key: Option<(PathBuf, PathBuf)>,
    /// Names (host names or IP addresses) in bootfleet's own certificate;
    /// empty: the listen address, or every IPv4 address of this host.
    pub names: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCache {
    pub max_mib: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLog {
    pub level: Option<String>,
}

/// The validated runtime configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The boot directory; every served path resolves inside it.
    pub root: PathBuf,
    /// Whether `root` is the built-in default (created on start if missing).
    pub root_is_default: bool,
    pub engine: EngineChoice,
    /// Data-plane threads; 0 means one per core.
    pub workers: usize,
    pub tftp: TftpConfig,
    pub http: HttpConfig,
    pub dhcp: DhcpConfig,
    /// The inventory file (relative paths are taken inside `root`).
    pub inventory_file: PathBuf,
    /// Where state that must survive a restart is kept.
    pub state_dir: PathBuf,
    pub cache_max_bytes: u64,
    pub log_level: String,
    pub panel: PanelConfig,
    /// A PostgreSQL database for the inventory (`[database] url`); `None`:
    /// the SQLite file `panel.database`.
    pub database_url: Option<String>,
    pub power: PowerConfig,
}

/// TFTP settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TftpConfig {
    pub listen: SocketAddr,
    pub max_blksize: u16,
    pub max_windowsize: u16,
    pub timeout: Duration,
    pub max_timeout: Duration,
    pub max_retries: u32,
    pub max_transfers: usize,
    pub max_transfers_per_client: usize,
    /// Directories, relative to the root, in which write requests may
    /// create or replace files. Empty: every write request is refused.
    pub upload_dirs: Vec<PathBuf>,
    pub max_upload_bytes: u64,
    /// RFC 2090 multicast: the groups sessions are given, or `None` (the
    /// `multicast` option is then ignored and clients get unicast).
    pub multicast: Option<MulticastConfig>,
}

/// Where multicast TFTP sessions send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MulticastConfig {
    /// First and last group address; one session per address at a time.
    pub groups: (Ipv4Addr, Ipv4Addr),
    pub port: u16,
    pub ttl: u32,
    /// The address of the interface group datagrams leave by
    /// (IP_MULTICAST_IF); by default the TFTP listener's address, or the
    /// routing table's choice when that is 0.0.0.0.
    pub interface: Option<Ipv4Addr>,
    /// How long a new session waits for more members before its first block.
    pub gather: Duration,
}

/// A configuration that cannot be used, and where the problem is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Syntax errors and unknown keys; toml's message names the key, line and column.
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{origin}: invalid value for `{key}`: {message}")]
    Invalid {
        origin: String,
        key: &'static str,
        message: String,
    },
}

impl Default for Config {
    fn default() -> Self {
        Self {
            root: PathBuf::from("boot"),
            root_is_default: true,
            engine: EngineChoice::Auto,
            workers: 0,
            tftp: TftpConfig {
                listen: "0.0.0.0:69".parse().expect("literal address"),
                max_blksize: 1468,
                max_windowsize: 64,
                timeout: Duration::from_millis(1000),
                max_timeout: Duration::from_millis(5000),
                max_retries: 5,
                max_transfers: 10_000,
                max_transfers_per_client: 64,
                upload_dirs: Vec::new(),
                max_upload_bytes: 64 << 20,
                multicast: None,
            },
            http: HttpConfig {
                listen: "0.0.0.0:80".parse().expect("literal address"),
                public_url: None,
                max_connections: 10_000,
                max_connections_per_client: 2048,
                max_header_bytes: 16 << 10,
                header_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(60),
                send_timeout: Duration::from_secs(30),
                body: BodyMode::Auto,
                tls: None,
            },
            dhcp: DhcpConfig {
                mode: DhcpMode::Off,
                interfaces: Vec::new(),
                ranges: Vec::new(),
                lease_time: Duration::from_secs(3600),
                router: None,
                dns: Vec::new(),
                domain: None,
                relay_pool_share: 0.75,
                max_requests_per_second_per_source: 20_000,
                max_requests_per_second_per_client: 20,
                relays: Vec::new(),
                sync_leases: true,
                gather: Duration::from_millis(5),
                answer_router_solicitations: None,
                boot: BootFiles {
                    bios: "undionly.kpxe".into(),
                    uefi_x64: "ipxe.efi".into(),
                    uefi_ia32: "ipxe-i386.efi".into(),
                    uefi_arm64: "arm64/snponly.efi".into(),
                    http_x64: "ipxe.efi".into(),
                    http_arm64: "arm64/snponly.efi".into(),
                    secure_boot_x64: "secureboot/shimx64.efi".into(),
                    script_url: None,
                    loader_dirs: vec![PathBuf::from("/usr/lib/ipxe")],
                },
                quirks: Vec::new(),
            },
            inventory_file: PathBuf::from(crate::inventory::FILE_NAME),
            state_dir: PathBuf::from("state"),
            cache_max_bytes: 1024 << 20,
            log_level: "info".into(),
            panel: PanelConfig {
                listen: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
                database: PathBuf::from("bootfleet.db"),
                tls_cert: None,
                tls_key: None,
                event_retention: Duration::from_secs(7 * 24 * 3600),
                stuck_after: Duration::from_secs(120),
                max_upload_bytes: 16 << 30,
                max_discovered: 10_000,
                metrics_listen: None,
                server_name: None,
                data_plane_url: None,
            },
            database_url: None,
            power: PowerConfig {
                key_file: PathBuf::from("bmc.key"),
                ca_file: None,
                concurrency: 64,
                timeout: Duration::from_secs(20),
                checkin_url: None,
                checkin_deadline: Duration::from_secs(600),
            },
        }
    }
}

impl Config {
    /// Reads and validates a config file on top of the built-in defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates TOML text; `path` is only used in messages and to
    /// resolve a relative `root` against the file's directory.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        let validator = Validator { text, path };
        validator.apply(file)
    }
}

/// Turns spans into line numbers and range-checks values.
struct Validator<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Validator<'_> {
    fn line_of<T>(&self, value: &Spanned<T>) -> usize {
        let offset = value.span().start.min(self.text.len());
        self.text[..offset].matches('\n').count() + 1
    }

    fn ranged(
        &self,
        value: &Option<Spanned<u64>>,
        key: &'static str,
        range: std::ops::RangeInclusive<u64>,
        default: u64,
    ) -> Result<u64, ConfigError> {
        let Some(spanned) = value else {
            return Ok(default);
        };
        let number = *spanned.get_ref();
        if range.contains(&number) {
            Ok(number)
        } else {
            Err(ConfigError::Invalid {
                origin: format!("{} line {}", self.path.display(), self.line_of(spanned)),
                key,
                message: format!("{number} is outside {}..={}", range.start(), range.end()),
            })
        }
    }

    fn apply_dhcp(&self, d: &FileDhcp, config: &mut Config) -> Result<(), ConfigError> {
        let c = &mut config.dhcp;
        if let Some(mode) = d.mode {
            c.mode = mode;
        }
        if let Some(interfaces) = &d.interfaces {
            c.interfaces = interfaces.clone();
        }
        for range in d.ranges.iter().flatten() {
            let parsed = parse_range(range.get_ref()).map_err(|message| ConfigError::Invalid {
                origin: format!("{} line {}", self.path.display(), self.line_of(range)),
                key: "dhcp.ranges",
                message,
            })?;
            c.ranges.push(parsed);
        }
        c.lease_time = Duration::from_secs(self.ranged(
            &d.lease_seconds,
            "dhcp.lease_seconds",
            60..=365 * 86400,
            3600,
        )?);
        c.router = d.router.or(c.router);
        if let Some(dns) = &d.dns {
            c.dns = dns.clone();
        }
        if d.domain.is_some() {
            c.domain = d.domain.clone();
        }
        if let Some(share) = &d.relay_pool_share {
            let value = *share.get_ref();
            if !(value > 0.0 && value <= 1.0) {
                return Err(ConfigError::Invalid {
                    origin: format!("{} line {}", self.path.display(), self.line_of(share)),
                    key: "dhcp.relay_pool_share",
                    message: format!("{value} is not in (0, 1]"),
                });
            }
            c.relay_pool_share = value;
        }
        c.max_requests_per_second_per_source = self.ranged(
            &d.max_requests_per_second_per_source,
            "dhcp.max_requests_per_second_per_source",
            1..=10_000_000,
            u64::from(c.max_requests_per_second_per_source),
        )? as u32;
        c.max_requests_per_second_per_client = self.ranged(
            &d.max_requests_per_second_per_client,
            "dhcp.max_requests_per_second_per_client",
            1..=1_000_000,
            u64::from(c.max_requests_per_second_per_client),
        )? as u32;
        if let Some(relays) = &d.relays {
            c.relays = relays.clone();
        }
        if let Some(sync) = d.sync_leases {
            c.sync_leases = sync;
        }
        c.gather = Duration::from_millis(self.ranged(
            &d.gather_ms,
            "dhcp.gather_ms",
            0..=50,
            c.gather.as_millis() as u64,
        )?);
        if d.answer_router_solicitations.is_some() {
            c.answer_router_solicitations = d.answer_router_solicitations;
        }
        let b = &mut c.boot;
        for (value, slot) in [
            (&d.bios, &mut b.bios),
            (&d.uefi_x64, &mut b.uefi_x64),
            (&d.uefi_ia32, &mut b.uefi_ia32),
            (&d.uefi_arm64, &mut b.uefi_arm64),
            (&d.http_x64, &mut b.http_x64),
            (&d.http_arm64, &mut b.http_arm64),
            (&d.secure_boot_x64, &mut b.secure_boot_x64),
        ] {
            if let Some(value) = value {
                *slot = value.clone();
            }
        }
        if d.script_url.is_some() {
            b.script_url = d.script_url.clone();
        }
        if let Some(dirs) = &d.loader_dirs {
            b.loader_dirs = dirs.clone();
        }
        c.quirks = d.quirks.clone();
        Ok(())
    }

    fn apply(&self, file: FileConfig) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        if let Some(root) = &file.root {
            let root = root.get_ref();
            config.root = if root.is_relative() {
                self.path.parent().unwrap_or(Path::new(".")).join(root)
            } else {
                root.clone()
            };
            config.root_is_default = false;
        }
        if let Some(engine) = file.engine {
            config.engine = engine;
        }
        config.workers = self.ranged(&file.workers, "workers", 0..=1024, 0)? as usize;
        self.apply_tftp(&file.tftp, &mut config)?;
        self.apply_http(&file.http, &mut config)?;
        self.apply_dhcp(&file.dhcp, &mut config)?;
        if let Some(file) = &file.inventory.file {
            config.inventory_file = file.clone();
        }
        if let Some(dir) = &file.inventory.state_dir {
            config.state_dir = if dir.is_relative() {
                self.path.parent().unwrap_or(Path::new(".")).join(dir)
            } else {
                dir.clone()
            };
        }
        config.cache_max_bytes =
            self.ranged(&file.cache.max_mib, "cache.max_mib", 1..=1 << 30, 1024)? << 20;
        self.apply_panel(&file.panel, &mut config)?;
        self.apply_database(&file.database, &mut config)?;
        self.apply_power(&file.power, &mut config)?;
        if let Some(level) = file.log.level {
            config.log_level = level;
        }
        Ok(config)
    }

    fn apply_tftp(&self, t: &FileTftp, config: &mut Config) -> Result<(), ConfigError> {
        let defaults = Config::default();
        let d = &defaults.tftp;
        config.tftp = TftpConfig {
            listen: t.listen.unwrap_or(d.listen),
            max_blksize: self.ranged(
                &t.max_blksize,
                "tftp.max_blksize",
                8..=65464,
                d.max_blksize.into(),
            )? as u16,
            max_windowsize: self.ranged(
                &t.max_windowsize,
                "tftp.max_windowsize",
                1..=65535,
                d.max_windowsize.into(),
            )? as u16,
            timeout: Duration::from_millis(self.ranged(
                &t.timeout_ms,
                "tftp.timeout_ms",
                10..=255_000,
                d.timeout.as_millis() as u64,
            )?),
            max_timeout: Duration::from_millis(self.ranged(
                &t.max_timeout_ms,
                "tftp.max_timeout_ms",
                10..=600_000,
                d.max_timeout.as_millis() as u64,
            )?),
            max_retries: self.ranged(
                &t.max_retries,
                "tftp.max_retries",
                0..=100,
                d.max_retries.into(),
            )? as u32,
            max_transfers: self.ranged(
                &t.max_transfers,
                "tftp.max_transfers",
                1..=1_000_000,
                d.max_transfers as u64,
            )? as usize,
            max_transfers_per_client: self.ranged(
                &t.max_transfers_per_client,
                "tftp.max_transfers_per_client",
                1..=1_000_000,
                d.max_transfers_per_client as u64,
            )? as usize,
            upload_dirs: Vec::new(),
            max_upload_bytes: d.max_upload_bytes,
            multicast: None,
        };
        let mut upload_dirs = Vec::new();
        for dir in t.upload_dirs.iter().flatten() {
            let path = dir.get_ref();
            let escapes = path.is_absolute()
                || path
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir));
            if escapes {
                return Err(ConfigError::Invalid {
                    origin: format!("{} line {}", self.path.display(), self.line_of(dir)),
                    key: "tftp.upload_dirs",
                    message: format!(
                        "{} must be a directory relative to root, without `..`",
                        path.display()
                    ),
                });
            }
            upload_dirs.push(path.clone());
        }
        config.tftp.upload_dirs = upload_dirs;
        config.tftp.max_upload_bytes =
            self.ranged(&t.max_upload_mib, "tftp.max_upload_mib", 1..=4096, 64)? << 20;
        config.tftp.multicast = self.multicast(t)?;
        Ok(())
    }

    /// `tftp.multicast_*`: RFC 2090 multicast, on when a group range is set.
    fn multicast(&self, t: &FileTftp) -> Result<Option<MulticastConfig>, ConfigError> {
        let Some(groups) = &t.multicast_groups else {
            return Ok(None);
        };
        let invalid = |message: String| ConfigError::Invalid {
            origin: format!("{} line {}", self.path.display(), self.line_of(groups)),
            key: "tftp.multicast_groups",
            message,
        };
        let (first, last) = groups
            .get_ref()
            .split_once('-')
            .and_then(|(a, b)| {
                Some((
                    a.trim().parse::<Ipv4Addr>().ok()?,
                    b.trim().parse::<Ipv4Addr>().ok()?,
                ))
            })
            .ok_or_else(|| {
                invalid(format!(
                    "{:?} is not FIRST-LAST, e.g. 239.255.66.1-239.255.66.254",
                    groups.get_ref()
                ))
            })?;
        if !first.is_multicast() || !last.is_multicast() || first > last {
            return Err(invalid(format!(
                "{first}-{last} must be multicast addresses (224.0.0.0/4), first not above last"
            )));
        }
        Ok(Some(MulticastConfig {
            groups: (first, last),
            port: self.ranged(&t.multicast_port, "tftp.multicast_port", 1..=65535, 1758)? as u16,
            ttl: self.ranged(&t.multicast_ttl, "tftp.multicast_ttl", 1..=255, 1)? as u32,
            interface: t.multicast_interface,
            gather: Duration::from_millis(self.ranged(
                &t.multicast_gather_ms,
                "tftp.multicast_gather_ms",
                0..=60_000,
                500,
            )?),
        }))
    }

    fn apply_http(&self, h: &FileHttp, config: &mut Config) -> Result<(), ConfigError> {
        let defaults = Config::default();
        let dh = &defaults.http;
        let millis = |value: &Option<Spanned<u64>>, key: &'static str, default: Duration| {
            self.ranged(value, key, 100..=3_600_000, default.as_millis() as u64)
                .map(Duration::from_millis)
        };
        config.http = HttpConfig {
            listen: h.listen.unwrap_or(dh.listen),
            public_url: None,
            max_connections: self.ranged(
                &h.max_connections,
                "http.max_connections",
                1..=1_000_000,
                dh.max_connections as u64,
            )? as usize,
            max_connections_per_client: self.ranged(
                &h.max_connections_per_client,
                "http.max_connections_per_client",
                1..=1_000_000,
                dh.max_connections_per_client as u64,
            )? as usize,
            max_header_bytes: self.ranged(
                &h.max_header_bytes,
                "http.max_header_bytes",
                1024..=1 << 20,
                dh.max_header_bytes as u64,
            )? as usize,
            header_timeout: millis(
                &h.header_timeout_ms,
                "http.header_timeout_ms",
                dh.header_timeout,
            )?,
            idle_timeout: millis(&h.idle_timeout_ms, "http.idle_timeout_ms", dh.idle_timeout)?,
            send_timeout: millis(&h.send_timeout_ms, "http.send_timeout_ms", dh.send_timeout)?,
            body: h.body.unwrap_or(dh.body),
            tls: None,
        };
        if let Some(listen) = h.tls_listen {
            if listen.port() == config.http.listen.port() {
                return Err(ConfigError::Invalid {
                    origin: self.path.display().to_string(),
                    key: "http.tls_listen",
                    message: format!(
                        "HTTPS needs a port of its own (HTTP listens on {}); 443 is usual",
                        config.http.listen
                    ),
                });
            }
            let cert_and_key = match (&h.tls_cert, &h.tls_key) {
                (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
                (None, None) => None,
                _ => {
                    return Err(ConfigError::Invalid {
                        origin: self.path.display().to_string(),
                        key: "http.tls_cert",
                        message: "set both http.tls_cert and http.tls_key, or neither (bootfleet then makes its own)".into(),
                    })
                }
            };
            config.http.tls = Some(HttpsConfig {
                listen,
                cert_and_key,
                names: h.tls_names.clone().unwrap_or_default(),
            });
        } else if h.tls_cert.is_some() || h.tls_key.is_some() || h.tls_names.is_some() {
            return Err(ConfigError::Invalid {
                origin: self.path.display().to_string(),
                key: "http.tls_listen",
                message: "http.tls_cert, tls_key and tls_names need http.tls_listen (where HTTPS listens)".into(),
            });
        }
        if let Some(url) = &h.public_url {
            let text = url.get_ref().trim_end_matches('/');
            if !(text.starts_with("http://") || text.starts_with("https://"))
                || text.contains(char::is_whitespace)
            {
                return Err(ConfigError::Invalid {
                    origin: format!("{} line {}", self.path.display(), self.line_of(url)),
                    key: "http.public_url",
                    message: format!("{text:?} is not an http:// or https:// URL"),
                });
            }
            config.http.public_url = Some(text.to_string());
        }
        Ok(())
    }

    fn apply_database(&self, d: &FileDatabase, config: &mut Config) -> Result<(), ConfigError> {
        if let Some(url) = &d.url {
            let text = url.get_ref();
            if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
                return Err(ConfigError::Invalid {
                    origin: format!("{} line {}", self.path.display(), self.line_of(url)),
                    key: "database.url",
                    message: "a postgres:// or postgresql:// URL (leave it out to keep the inventory in the SQLite file panel.database)".into(),
                });
            }
            config.database_url = Some(text.clone());
        }
        Ok(())
    }

    fn apply_power(&self, p: &FilePower, config: &mut Config) -> Result<(), ConfigError> {
        let power = &mut config.power;
        if let Some(key_file) = &p.key_file {
            power.key_file = key_file.clone();
        }
        power.ca_file = p.ca_file.clone();
        power.concurrency =
            self.ranged(&p.concurrency, "power.concurrency", 1..=4096, 64)? as usize;
        power.timeout = Duration::from_secs(self.ranged(
            &p.timeout_seconds,
            "power.timeout_seconds",
            1..=600,
            20,
        )?);
        power.checkin_deadline = Duration::from_secs(self.ranged(
            &p.checkin_deadline_seconds,
            "power.checkin_deadline_seconds",
            10..=86_400,
            600,
        )?);
        if let Some(url) = &p.checkin_url {
            let text = url.get_ref().trim_end_matches('/');
            let valid = (text.starts_with("http://") || text.starts_with("https://"))
                && !text.contains(char::is_whitespace)
                && !text.contains(char::is_control)
                && crate::inventory::fields::check_line("power.checkin_url", text, 512).is_ok()
                && crate::inventory::fields::ipxe_terminator(text).is_none();
            if !valid {
                return Err(ConfigError::Invalid {
                    origin: format!("{} line {}", self.path.display(), self.line_of(url)),
                    key: "power.checkin_url",
                    message: "an http:// or https:// URL of the panel as booted machines reach it, e.g. http://10.0.0.1:9090".into(),
                });
            }
            power.checkin_url = Some(text.to_string());
        }
        Ok(())
    }

    fn apply_panel(&self, p: &FilePanel, config: &mut Config) -> Result<(), ConfigError> {
        if let Some(listen) = &p.listen {
            config.panel.listen =
                parse_panel_listen(listen.get_ref()).map_err(|message| ConfigError::Invalid {
                    origin: format!("{} line {}", self.path.display(), self.line_of(listen)),
                    key: "panel.listen",
                    message,
                })?;
        }
        if let Some(database) = &p.database {
            config.panel.database = database.clone();
        }
        if p.tls_cert.is_some() != p.tls_key.is_some() {
            return Err(ConfigError::Invalid {
                origin: self.path.display().to_string(),
                key: "panel.tls_cert",
                message: "set both panel.tls_cert and panel.tls_key, or neither".into(),
            });
        }
        config.panel.tls_cert = p.tls_cert.clone();
        config.panel.tls_key = p.tls_key.clone();
        config.panel.event_retention = Duration::from_secs(
            3600 * self.ranged(
                &p.event_retention_hours,
                "panel.event_retention_hours",
                1..=87_600,
                168,
            )?,
        );
        config.panel.stuck_after = Duration::from_secs(self.ranged(
            &p.stuck_after_seconds,
            "panel.stuck_after_seconds",
            5..=86_400,
            120,
        )?);
        config.panel.max_upload_bytes = self.ranged(
            &p.max_upload_mib,
            "panel.max_upload_mib",
            1..=1 << 20,
            16 << 10,
        )? << 20;
        config.panel.max_discovered = self.ranged(
            &p.max_discovered,
            "panel.max_discovered",
            1..=10_000_000,
            10_000,
        )? as usize;
        config.panel.metrics_listen = p.metrics_listen;
        if let Some(name) = &p.server_name {
            if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
                return Err(ConfigError::Invalid {
                    origin: self.path.display().to_string(),
                    key: "panel.server_name",
                    message: "1 to 64 characters, none of them control characters".into(),
                });
            }
            config.panel.server_name = Some(name.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys the file format accepts in `section` ("" for the top
    /// level), from serde's own "expected one of" list.
    fn accepted_keys(section: &str) -> Vec<String> {
        let text = match section {
            "" => "not_a_key = 1\n".to_string(),
            "dhcp.quirks" => "[[dhcp.quirks]]\nnot_a_key = 1\n".to_string(),
            _ => format!("[{section}]\nnot_a_key = 1\n"),
        };
        let error = toml::from_str::<FileConfig>(&text).unwrap_err().to_string();
        let list = error
            .split("expected one of ")
            .nth(1)
            .unwrap_or_else(|| error.split("expected ").nth(1).unwrap_or(""));
        list.split(',')
            .filter_map(|k| k.trim().split('`').nth(1).map(str::to_string))
            .collect()
    }

    #[test]
    fn configuration_reference_documents_every_key() {
        let doc = include_str!("../../docs/configuration.md");
        let block = doc
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("docs/configuration.md has the reference block");
        let mut documented: std::collections::HashMap<String, Vec<String>> = Default::default();
        let mut section = String::new();
        for line in block.lines() {
            let line = line.trim();
            if let Some(name) = line.strip_prefix("[[").and_then(|l| l.split("]]").next()) {
                section = name.to_string();
            } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
                section = name.to_string();
            } else if let Some((key, _)) = line.split_once(" =") {
                documented
                    .entry(section.clone())
                    .or_default()
                    .push(key.trim().to_string());
            }
        }
        let sections = [
            "",
            "tftp",
            "http",
            "dhcp",
            "dhcp.quirks",
            "inventory",
            "panel",
            "database",
            "power",
            "cache",
            "log",
        ];
        let mut missing = Vec::new();
        for section in sections {
            let keys = accepted_keys(section);
            assert!(!keys.is_empty(), "no keys found for [{section}]");
            for key in keys {
                // Sections are documented as sections.
                let nested = if section.is_empty() {
                    key.clone()
                } else {
                    format!("{section}.{key}")
                };
                if sections.contains(&nested.as_str()) {
                    continue;
                }
                if !documented.get(section).is_some_and(|d| d.contains(&key)) {
                    missing.push(format!("[{section}] {key}"));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "undocumented in docs/configuration.md: {missing:?}"
        );
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/bootfleet/bootfleet.toml"))
    }

    #[test]
    fn empty_file_is_the_default_and_relative_root_follows_the_file() {
        let c = parse("").unwrap();
        assert_eq!(c, Config::default());
        let c = parse("root = \"boot\"\n").unwrap();
        assert_eq!(c.root, PathBuf::from("/etc/bootfleet/boot"));
        assert!(!c.root_is_default);
    }

    #[test]
    fn the_database_url_must_be_postgres() {
        let c = parse("[database]\nurl = \"postgres://boot@db/inventory\"\n").unwrap();
        assert_eq!(
            c.database_url.as_deref(),
            Some("postgres://boot@db/inventory")
        );
        let error = parse("[database]\nurl = \"mysql://db\"\n").unwrap_err();
        assert!(error.to_string().contains("database.url"), "{error}");
    }

    #[test]
    fn the_panel_section_is_checked() {
        let c = parse("").unwrap();
        assert_eq!(c.panel.listen, Some("127.0.0.1:9090".parse().unwrap()));
        let c = parse("[panel]\nlisten = \"off\"\nstuck_after_seconds = 30\n").unwrap();
        assert_eq!(c.panel.listen, None);
        assert_eq!(c.panel.stuck_after, Duration::from_secs(30));
        for (bad, key) in [
            ("[panel]\nlisten = \"everywhere\"\n", "panel.listen"),
            ("[panel]\ntls_cert = \"c.pem\"\n", "panel.tls_cert"),
            (
                "[panel]\nstuck_after_seconds = 1\n",
                "panel.stuck_after_seconds",
            ),
            ("[panel]\nlisten_on = \"x\"\n", "listen_on"),
        ] {
            let error = parse(bad).unwrap_err().to_string();
            assert!(error.contains(key), "{bad}: {error}");
        }
    }

    #[test]
    fn multicast_groups_are_checked() {
        assert_eq!(parse("").unwrap().tftp.multicast, None);
        let c =
            parse("[tftp]\nmulticast_groups = \"239.255.66.1-239.255.66.9\"\nmulticast_ttl = 2\nmulticast_interface = \"10.0.0.1\"\n")
                .unwrap();
        assert_eq!(
            c.tftp.multicast,
            Some(MulticastConfig {
                groups: (
                    "239.255.66.1".parse().unwrap(),
                    "239.255.66.9".parse().unwrap()
                ),
                port: 1758,
                ttl: 2,
                interface: Some("10.0.0.1".parse().unwrap()),
                gather: Duration::from_millis(500),
            })
        );
        for bad in [
            "10.0.0.1-10.0.0.9",
            "239.255.66.9-239.255.66.1",
            "239.255.66.1",
        ] {
            let error = parse(&format!("[tftp]\nmulticast_groups = \"{bad}\"\n")).unwrap_err();
            assert!(
                error.to_string().contains("tftp.multicast_groups"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn loader_files_are_paths_inside_the_boot_directory() {
        let c = parse(
            "[dhcp]\nhttp_x64 = \"http://10.0.0.1:8080/efi/ipxe.efi\"\n\
             [[dhcp.quirks]]\nmac_prefix = \"b8:27:eb\"\nboot_file = \"/rpi/bootcode.bin\"\n",
        )
        .unwrap();
        let files = c.dhcp.loader_files();
        for expected in ["undionly.kpxe", "efi/ipxe.efi", "rpi/bootcode.bin"] {
            assert!(files.iter().any(|f| f == expected), "{expected}: {files:?}");
        }
        assert!(files
            .iter()
            .all(|f| !f.contains("://") && !f.starts_with('/')));
    }

    #[test]
    fn auto_body_copies_for_a_few_connections_and_uses_sendfile_beyond() {
        let limit = BodyMode::AUTO_COPIES_UP_TO_CONNECTIONS;
        assert!(!BodyMode::Auto.uses_sendfile(1));
        assert!(!BodyMode::Auto.uses_sendfile(limit));
        assert!(BodyMode::Auto.uses_sendfile(limit + 1));
        for open in [1, limit, limit + 1, 10_000] {
            assert!(BodyMode::Sendfile.uses_sendfile(open));
            assert!(!BodyMode::Mmap.uses_sendfile(open));
        }
    }

    #[test]
    fn https_needs_its_own_port_and_both_or_neither_pem_file() {
        let c = parse("[http]\nlisten = \"0.0.0.0:80\"\ntls_listen = \"0.0.0.0:443\"\ntls_names = [\"10.0.0.1\"]\n").unwrap();
        let tls = c.http.tls.unwrap();
        assert_eq!(
            (tls.listen.port(), tls.cert_and_key, tls.names),
            (443, None, vec!["10.0.0.1".to_string()])
        );
        for (text, needle) in [
            (
                "[http]\nlisten = \"0.0.0.0:443\"\ntls_listen = \"0.0.0.0:443\"\n",
                "a port of its own",
            ),
            (
                "[http]\ntls_listen = \"0.0.0.0:443\"\ntls_cert = \"a.crt\"\n",
                "both http.tls_cert and http.tls_key",
            ),
            (
                "[http]\ntls_cert = \"a.crt\"\ntls_key = \"a.key\"\n",
                "need http.tls_listen",
            ),
        ] {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(needle), "{text}: {error}");
        }
    }

    #[test]
    fn full_file() {
        let c = parse(
            r#"
root = "/srv/boot"
engine = "epoll"
workers = 2
[tftp]
listen = "127.0.0.1:6969"
max_blksize = 8192
max_windowsize = 8
timeout_ms = 500
max_retries = 3
max_transfers = 100
max_transfers_per_client = 4
[http]
listen = "127.0.0.1:8080"
public_url = "http://boot.example:8080/"
idle_timeout_ms = 5000
body = "mmap"
[inventory]
file = "/etc/bootfleet/inventory.toml"
state_dir = "/var/lib/bootfleet"
[cache]
max_mib = 64
[log]
level = "debug"
"#,
        )
        .unwrap();
        assert_eq!(c.engine, EngineChoice::Epoll);
        assert_eq!(c.tftp.listen, "127.0.0.1:6969".parse().unwrap());
        assert_eq!(c.tftp.max_blksize, 8192);
        assert_eq!(c.tftp.timeout, Duration::from_millis(500));
        assert_eq!(c.tftp.max_transfers_per_client, 4);
        assert_eq!(c.cache_max_bytes, 64 << 20);
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.http.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            c.http.public_url.as_deref(),
            Some("http://boot.example:8080")
        );
        assert_eq!(c.http.idle_timeout, Duration::from_secs(5));
        assert_eq!(c.http.body, BodyMode::Mmap);
        assert_eq!(parse("").unwrap().http.body, BodyMode::Auto);
        assert_eq!(
            c.inventory_file,
            PathBuf::from("/etc/bootfleet/inventory.toml")
        );
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/bootfleet"));
        let err = parse("[http]\npublic_url = \"10.0.0.1\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("http.public_url") && err.contains("line 2"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_is_refused_with_name_and_line() {
        let err = parse("root = \"/x\"\n[tftp]\nblocksize = 1468\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("blocksize"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        let err = parse("colour = 1\n").unwrap_err().to_string();
        assert!(err.contains("colour") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn invalid_values_are_refused_with_key_and_line() {
        let err = parse("\n[tftp]\nmax_blksize = 4\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tftp.max_blksize") && err.contains("line 3"),
            "{err}"
        );
        let err = parse("engine = \"fast\"\n").unwrap_err().to_string();
        assert!(err.contains("engine") && err.contains("line 1"), "{err}");
        let err = parse("[tftp]\nlisten = \"nowhere\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen") && err.contains("line 2"), "{err}");
        let err = parse("[tftp]\nupload_dirs = [\"ok\", \"../etc\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tftp.upload_dirs") && err.contains("line 2"),
            "{err}"
        );
        let c = parse("[tftp]\nupload_dirs = [\"incoming\"]\nmax_upload_mib = 8\n").unwrap();
        assert_eq!(c.tftp.upload_dirs, vec![PathBuf::from("incoming")]);
        assert_eq!(c.tftp.max_upload_bytes, 8 << 20);
        let err = parse("workers = -1\n").unwrap_err().to_string();
        assert!(err.contains("workers"), "{err}");
        let err = parse("[dhcp]\n\ngather_ms = 51\n").unwrap_err().to_string();
        assert!(
            err.contains("dhcp.gather_ms") && err.contains("line 3"),
            "{err}"
        );
        assert_eq!(
            parse("[dhcp]\ngather_ms = 0\n").unwrap().dhcp.gather,
            Duration::ZERO
        );
        assert_eq!(parse("").unwrap().dhcp.gather, Duration::from_millis(5));
    }
}
