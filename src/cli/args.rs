//! The subcommands' arguments (clap): the inventory database for users,
//! tokens and `db`, the panel's API for everything else.

use std::path::PathBuf;

use clap::Subcommand;

/// Where the inventory database is (as `serve` would find it).
#[derive(clap::Args)]
pub(crate) struct DatabaseArgs {
    /// The server's TOML config file (for its state directory and database).
    #[arg(long, short)]
    pub(crate) config: Option<PathBuf>,
    /// The state directory (default: ./state, or the config's).
    #[arg(long, value_name = "DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// The database itself, overriding the two above: an SQLite file, or
    /// a postgres:// URL.
    #[arg(long, value_name = "FILE|URL")]
    pub(crate) database: Option<String>,
}

/// Panel users, written straight into the inventory database (they must
/// work before anyone can log in, and with the server stopped); the
/// audit log names the actor `cli`.
#[derive(Subcommand)]
pub(crate) enum UsersCommand {
    /// Create a user or set its password and scope; the password is read
    /// from standard input (one line).
    Add {
        name: String,
        /// read, assign or admin.
        #[arg(long, default_value = "admin")]
        scope: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// List users.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Set a user's password, keeping its scope; the password is read
    /// from standard input (one line). Its sessions end.
    Passwd {
        name: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Remove a user: its sessions end and the API tokens that act for it
    /// are revoked.
    Remove {
        name: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Subcommand)]
pub(crate) enum DbCommand {
    /// Copy the inventory database into FILE while the server runs
    /// (SQLite's online backup: one consistent state), check the copy and
    /// print what it holds.
    Backup {
        file: PathBuf,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Replace the inventory database with the backup FILE (checked, and
    /// brought to this version's schema first). Stop bootfleet before, start
    /// it after: `systemctl stop bootfleet`.
    Restore {
        file: PathBuf,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Copy a whole inventory into a new, empty database, and read it back
    /// to check it: from the SQLite file to PostgreSQL (or back). Each side
    /// is `sqlite:FILE` (or a plain path) or a postgres:// URL. Stop the
    /// servers that write the source first.
    Copy {
        #[arg(long, value_name = "FROM")]
        from: String,
        #[arg(long, value_name = "TO")]
        to: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum IpxeCommand {
    /// Build iPXE with a script built in that fetches each machine's own
    /// script from this server by MAC address, needing no boot file from
    /// DHCP: undionly.kpxe, snponly.efi and ipxe.efi for PXE firmware to
    /// chainload (method 4: point dhcp.bios / dhcp.uefi_x64 at them) and
    /// NIC option ROMs to flash (method 2). From an iPXE source tree you
    /// have (`git clone https://github.com/ipxe/ipxe`): nothing is
    /// downloaded. The tree gets the multicast TFTP fix if it lacks it.
    /// Needs gcc, make, binutils, perl, liblzma-dev and mtools; the first
    /// build takes minutes, later ones seconds.
    Build(IpxeBuildArgs),
    /// The iPXE builds the server has in its boot directory (scope: read).
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Download one of the server's iPXE builds (scope: read).
    Download {
        /// Its name, as `bootfleet ipxe list` shows it.
        name: String,
        /// Where to write it (default: its name, in this directory).
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// `bootfleet ipxe build`.
#[derive(clap::Args)]
pub(crate) struct IpxeBuildArgs {
    /// The iPXE source tree (its top directory or its src).
    #[arg(long, value_name = "DIR")]
    pub(crate) source: PathBuf,
    /// The server's TOML config (for its boot directory and HTTP port).
    #[arg(long, short)]
    pub(crate) config: Option<PathBuf>,
    /// A server the script fetches from, e.g. http://10.0.0.1:8080;
    /// repeat for fallbacks, tried in order. Default:
    /// http://${next-server} with the config's HTTP port: whichever
    /// bootfleet answered DHCP.
    #[arg(long = "server", value_name = "URL")]
    pub(crate) servers: Vec<String>,
    /// Where the binaries go (default: ipxe/ in the boot directory, where
    /// HTTP and TFTP serve them and the panel's Images page lists them).
    #[arg(long, value_name = "DIR")]
    pub(crate) out: Option<PathBuf>,
    /// What to build (repeatable): undionly.kpxe, ipxe.efi, snponly.efi,
    /// a NIC ROM by PCI vendor and device (8086100e.rom), or a path under
    /// src such as bin-arm64-efi/snponly.efi. Default: undionly.kpxe
    /// ipxe.efi snponly.efi 1af41000.rom (virtio-net).
    #[arg(long = "target", value_name = "NAME")]
    pub(crate) targets: Vec<String>,
    /// Parallel compile jobs (default: one per core).
    #[arg(long)]
    pub(crate) jobs: Option<usize>,
    /// Leave the tree's tftp.c as it is (the binaries then drop multicast
    /// TFTP data, as every unfixed iPXE does).
    #[arg(long)]
    pub(crate) no_multicast_fix: bool,
    /// A PEM CA certificate the binaries trust for HTTPS, and only it
    /// (repeatable): bootfleet's own is https-ca.crt in its state
    /// directory once [http] tls_listen is set. With it, the default
    /// server is https://${next-server} on the config's HTTPS port, and
    /// BIOS builds get HTTPS too.
    #[arg(long = "trust", value_name = "PEM")]
    pub(crate) trust: Vec<PathBuf>,
}

/// API tokens, written straight into the inventory database like users.
#[derive(Subcommand)]
pub(crate) enum TokensCommand {
    /// Create an API token and print it (shown only this once).
    Add {
        name: String,
        /// read, assign or admin.
        #[arg(long, default_value = "read")]
        scope: String,
        /// The user the token acts for (recorded in the audit log).
        #[arg(long, default_value = "cli")]
        user: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// List tokens: id, name, scope, user, last use, and whether revoked
    /// (never the secret: only its hash is kept).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Revoke a token by its id (`bootfleet tokens list`).
    Revoke {
        id: i64,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

/// How to reach the running server's API, and how to print its answers.
#[derive(clap::Args)]
pub(crate) struct ApiArgs {
    /// The panel's URL: http:// on its loopback address, or https:// when
    /// it serves TLS (`[panel] tls_cert`).
    #[arg(long, env = "BOOTFLEET_URL", default_value = "http://127.0.0.1:9090")]
    pub(crate) url: String,
    /// An API token (`bootfleet tokens add NAME --scope SCOPE`); each
    /// command's help says the scope it needs.
    #[arg(long, env = "BOOTFLEET_TOKEN", hide_env_values = true)]
    pub(crate) token: String,
    /// PEM certificates to trust for an https:// panel, and only them: the
    /// panel's own self-signed certificate or the CA that signed it.
    /// Default: the public web roots built into bootfleet.
    #[arg(long, env = "BOOTFLEET_CA", value_name = "PEM")]
    pub(crate) ca: Option<PathBuf>,
    /// Print the API's answer as JSON (one document) instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Subcommand)]
pub(crate) enum MachinesCommand {
    /// List machines with their state (scope: read).
    List {
        /// Only those whose MAC, hostname, IP, image, labels, notes or
        /// facts contain this text.
        #[arg(long)]
        search: Option<String>,
        /// Only those in this state (e.g. booted, failed, assigned).
        #[arg(long)]
        state: Option<String>,
        /// Only those that boot this image.
        #[arg(long)]
        image: Option<String>,
        /// Only those with this `key=value` label.
        #[arg(long)]
        label: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// One machine: what it boots and why, its lease, facts and last boot
    /// step (scope: read).
    Show {
        mac: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Machines that asked for a script but are not adopted yet (scope:
    /// read).
    Discovered {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Assign an image to machines, adopting discovered ones (scope:
    /// assign).
    Assign {
        /// The image, or "none" to unassign.
        image: String,
        /// MAC addresses (any spelling).
        #[arg(required = true)]
        macs: Vec<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Change a machine, adopting it if it was only discovered: only the
    /// options given change (scope: assign; `--bmc` needs admin).
    Set(MachineSetArgs),
    /// Install a used one-shot assignment once more: the machine boots
    /// its image at its next boot, then its disk again (scope: assign).
    Rearm {
        mac: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Forget a machine: its record, assignment and history (scope: admin).
    Forget {
        mac: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// `bootfleet machines set`.
#[derive(clap::Args)]
pub(crate) struct MachineSetArgs {
    pub(crate) mac: String,
    /// The image it boots, or `none` (then its pools' image, if any).
    #[arg(long)]
    pub(crate) image: Option<String>,
    /// Pin it to this revision of its image (`images revisions NAME`), or
    /// `none` to follow the image's current revision.
    #[arg(long, value_name = "REVISION|none")]
    pub(crate) pin: Option<String>,
    /// Its hostname, or `none`.
    #[arg(long)]
    pub(crate) hostname: Option<String>,
    /// The address DHCP reserves for it, or `none`.
    #[arg(long)]
    pub(crate) ip: Option<String>,
    /// Its labels, replacing all it has (repeatable `key=value`).
    #[arg(
        long = "label",
        value_name = "KEY=VALUE",
        conflicts_with = "clear_labels"
    )]
    pub(crate) labels: Vec<String>,
    /// Remove all its labels.
    #[arg(long)]
    pub(crate) clear_labels: bool,
    /// `true`: boot the image once, then the disk (`machines rearm` to
    /// boot it again); `false`: every boot.
    #[arg(long, value_name = "true|false")]
    pub(crate) one_shot: Option<bool>,
    /// `false`: never netboot it (its firmware moves on to the disk).
    #[arg(long, value_name = "true|false")]
    pub(crate) netboot: Option<bool>,
    /// Appended to its image's kernel command line.
    #[arg(long, value_name = "TEXT")]
    pub(crate) cmdline_append: Option<String>,
    /// Free text for operators.
    #[arg(long)]
    pub(crate) notes: Option<String>,
    /// Its BMC (scope: admin): `ipmi://USER[:PASS]@HOST[:PORT]` or
    /// `redfish://USER[:PASS]@HOST[:PORT]/redfish/v1/Systems/ID`
    /// (`redfish+http://` without TLS, `?verify=false` for a self-signed
    /// certificate), or `none` to remove it.
    #[arg(long, value_name = "URL")]
    pub(crate) bmc: Option<String>,
    /// Read the BMC password from this file (first line) instead of the
    /// URL.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "bmc_password_stdin",
        requires = "bmc"
    )]
    pub(crate) bmc_password_file: Option<PathBuf>,
    /// Read the BMC password from standard input (one line).
    #[arg(long, requires = "bmc")]
    pub(crate) bmc_password_stdin: bool,
    /// An IPMI BMC's K_g key (the BMC-wide key of IPMI 2.0 sessions), from
    /// this file (first line): its characters, or `0x` and hex digits.
    #[arg(long, value_name = "FILE", requires = "bmc")]
    pub(crate) bmc_kg_file: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) api: ApiArgs,
}

/// `bootfleet power`.
#[derive(clap::Args)]
pub(crate) struct PowerArgs {
    /// on, off (hard), soft-off, cycle, reset or status.
    pub(crate) action: String,
    /// Machines (any MAC spelling).
    pub(crate) macs: Vec<String>,
    /// Every machine of this pool too.
    #[arg(long)]
    pub(crate) pool: Option<String>,
    /// Boot once from this device first (on, cycle, reset): none, pxe,
    /// uefi-pxe or uefi-http.
    #[arg(long, default_value = "pxe")]
    pub(crate) boot: String,
    /// `all` at once, `adaptive` (paced by the boot servers' load), or
    /// `SIZE/SECONDS` (fixed waves).
    #[arg(long, default_value = "adaptive")]
    pub(crate) waves: String,
    /// Seconds from power-on to check-in before a machine is failed
    /// (default: each machine's image's, else the server's).
    #[arg(long)]
    pub(crate) deadline: Option<u64>,
    /// Power-cycle once each machine that misses its deadline.
    #[arg(long)]
    pub(crate) retry_by_cycle: bool,
    /// Start the job and return (default: follow it to the end).
    #[arg(long)]
    pub(crate) no_wait: bool,
    #[command(flatten)]
    pub(crate) api: ApiArgs,
}

/// `bootfleet jobs`: power jobs.
#[derive(Subcommand)]
pub(crate) enum JobsCommand {
    /// Power jobs, newest first (scope: read).
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// One power job and each machine's stage (scope: read).
    Show {
        id: u64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stop sending waves; machines already powered go on (scope: assign).
    Pause {
        id: u64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Send the rest of a paused job's waves (scope: assign).
    Resume {
        id: u64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Send no more waves and stop watching (scope: assign).
    Cancel {
        id: u64,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand)]
pub(crate) enum ImagesCommand {
    /// List images (scope: read).
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// One image: its files with size and SHA-256, its kernel's signature,
    /// and which servers hold its files (scope: read).
    Show {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Register an image from files in the boot directory or URLs (scope:
    /// admin).
    Add(ImageAddArgs),
    /// Change an image: what is given changes and makes a new revision,
    /// which machines not pinned boot from their next script (scope:
    /// admin).
    Edit(ImageEditArgs),
    /// An image's revisions, newest first: what changed, who, when (scope:
    /// read).
    Revisions {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Roll an image back: a new revision with an earlier one's content
    /// (scope: admin).
    Rollback {
        name: String,
        revision: u64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Remove an image no machine uses (scope: admin).
    Remove {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// `bootfleet images edit`.
#[derive(clap::Args)]
pub(crate) struct ImageEditArgs {
    pub(crate) name: String,
    /// The kernel: a path in the boot directory, or a URL.
    #[arg(long)]
    pub(crate) kernel: Option<String>,
    /// Its initrds, replacing all it has (repeatable, in boot order).
    #[arg(long = "initrd", conflicts_with = "no_initrds")]
    pub(crate) initrds: Vec<String>,
    /// Boot it with no initrd.
    #[arg(long)]
    pub(crate) no_initrds: bool,
    #[arg(long)]
    pub(crate) cmdline: Option<String>,
    /// http, tftp or multicast.
    #[arg(long)]
    pub(crate) transport: Option<String>,
    #[arg(long)]
    pub(crate) architecture: Option<String>,
    #[arg(long)]
    pub(crate) description: Option<String>,
    /// Seconds from the kernel fetch to the OS's check-in (0: the
    /// server's default).
    #[arg(long)]
    pub(crate) checkin_deadline: Option<u64>,
    /// Boot it through the Secure Boot chain on UEFI x64 PXE machines.
    #[arg(long, value_name = "true|false")]
    pub(crate) secure_boot: Option<bool>,
    #[command(flatten)]
    pub(crate) api: ApiArgs,
}

/// `bootfleet images add`.
#[derive(clap::Args)]
pub(crate) struct ImageAddArgs {
    pub(crate) name: String,
    /// The kernel: a path in the boot directory, or a URL.
    #[arg(long)]
    pub(crate) kernel: String,
    /// Repeatable, in boot order.
    #[arg(long = "initrd")]
    pub(crate) initrds: Vec<String>,
    #[arg(long, default_value = "")]
    pub(crate) cmdline: String,
    /// http, tftp or multicast.
    #[arg(long, default_value = "http")]
    pub(crate) transport: String,
    /// e.g. x86_64, arm64 (informational).
    #[arg(long, default_value = "")]
    pub(crate) architecture: String,
    #[arg(long, default_value = "")]
    pub(crate) description: String,
    /// Seconds from the kernel fetch to the OS's check-in before a power
    /// job fails the machine (0: the server's default).
    #[arg(long, default_value_t = 0)]
    pub(crate) checkin_deadline: u64,
    /// Boot it through the Secure Boot chain (signed shim and GRUB) on
    /// UEFI x64 PXE machines.
    #[arg(long)]
    pub(crate) secure_boot: bool,
    #[command(flatten)]
    pub(crate) api: ApiArgs,
}

#[derive(Subcommand)]
pub(crate) enum PoolsCommand {
    /// List pools with their members, selector and image (scope: read).
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// One pool and the machines it holds now (scope: read).
    Show {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Create a pool or replace it: listed members, a label selector, and
    /// the image its machines boot when they have none of their own
    /// (scope: admin).
    Set {
        name: String,
        /// A member (repeatable; any MAC spelling).
        #[arg(long = "member", value_name = "MAC")]
        members: Vec<String>,
        /// A `key=value` label every selected machine has (repeatable:
        /// all must match).
        #[arg(long = "select", value_name = "KEY=VALUE")]
        selector: Vec<String>,
        /// The pool's image (default: none).
        #[arg(long)]
        image: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Assign an image (or `none`) to every machine of the pool, each as
    /// its own assignment (scope: assign).
    Assign {
        name: String,
        image: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Remove a pool; its machines keep their own assignments (scope:
    /// admin).
    Remove {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// `bootfleet events`.
#[derive(clap::Args)]
pub(crate) struct EventsArgs {
    /// Only this machine's.
    #[arg(long)]
    pub(crate) mac: Option<String>,
    /// At most this many, newest last.
    #[arg(long, default_value_t = 100)]
    pub(crate) limit: usize,
    /// Then keep printing new events as they happen, until interrupted.
    #[arg(long, short)]
    pub(crate) follow: bool,
    #[command(flatten)]
    pub(crate) api: ApiArgs,
}

#[derive(Subcommand)]
pub(crate) enum FilesCommand {
    /// Files in the boot directory with their sizes (scope: read).
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Upload a local file into the boot directory, replacing any file of
    /// that name (scope: admin).
    Upload {
        /// The local file.
        file: PathBuf,
        /// Its path in the boot directory (default: the file's name).
        #[arg(long = "as", value_name = "PATH")]
        target: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand)]
pub(crate) enum SettingsCommand {
    /// What unknown machines get: `menu`, `local` or `wait` (with its
    /// poll interval). Without `--policy`, print it (scope: read); with
    /// it, set it (scope: admin).
    Unknown {
        /// menu, local or wait.
        #[arg(long)]
        policy: Option<String>,
        /// How often a waiting machine asks again.
        #[arg(long, default_value_t = 10, requires = "policy")]
        poll_seconds: u32,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// `bootfleet audit`.
#[derive(clap::Args)]
pub(crate) struct AuditArgs {
    /// At most this many entries, newest first.
    #[arg(long, default_value_t = 50)]
    pub(crate) limit: usize,
    #[command(flatten)]
    pub(crate) api: ApiArgs,
}
