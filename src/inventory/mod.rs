//! The inventory: images, machines and their assignments, as an immutable
//! [`Snapshot`] that the data plane reads without ever waiting.
//!
//! Today the source is a TOML file in the boot directory
//! (`inventory.toml`); the control-panel issue replaces the source (an
//! embedded database), not the snapshot. A snapshot is built completely —
//! every machine key parsed as a MAC address, every image reference
//! resolved, every boot path checked, every template compiled — before it
//! replaces the previous one, so a mistake in the file leaves the last good
//! snapshot serving and is reported with its line.
//!
//! ```toml
//! [unknown]                 # machines the inventory does not list
//! policy = "menu"           # "menu" | "local" | "wait"
//! poll_seconds = 30         # for "wait": how often iPXE asks again
//!
//! [images.debian12]
//! kernel = "debian12/vmlinuz"           # relative to the boot directory
//! initrds = ["debian12/initrd.img"]
//! cmdline = "console=ttyS0 ip=dhcp"
//! transport = "http"                    # or "tftp", or "multicast" (tftm://)
//! secure_boot = false                   # true: UEFI x64 PXE machines boot it through
//!                                       # signed shim and GRUB (kernel over TFTP)
//!
//! [machines."52:54:00:12:34:56"]        # any MAC spelling
//! image = "debian12"
//! hostname = "node01"
//! cmdline_append = "hostname=node01"
//! one_shot = true                       # local boot after one install
//! rearm = 0                             # raise to install once more
//! bmc = "redfish://admin@10.0.9.56/redfish/v1/Systems/1"   # or ipmi://USER@HOST
//! bmc_password_file = "/etc/bootfleet/bmc/node01.pw"       # or USER:PASS in the URL
//! # bmc_kg_file = "/etc/bootfleet/bmc/rack3.kg"           # an IPMI BMC's K_g key, if it wants one
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use crate::proto::path::safe_relative_name;
use crate::proto::Mac;

pub mod bmc;
pub mod fields;

/// The inventory file's name inside the boot directory.
pub const FILE_NAME: &str = "inventory.toml";

/// What iPXE is told for a machine the inventory does not list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownPolicy {
    /// A menu of the images, with local boot as the default after a timeout.
    Menu,
    /// Exit iPXE so that the firmware boots the next device (the local disk).
    Local,
    /// Wait and ask again until an operator assigns an image.
    Wait,
}

impl UnknownPolicy {
    /// The name used in files, the database and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            UnknownPolicy::Menu => "menu",
            UnknownPolicy::Local => "local",
            UnknownPolicy::Wait => "wait",
        }
    }
}

/// How a rendered script fetches an image's kernel and initrds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    #[default]
    Http,
    Tftp,
    /// Multicast TFTP (RFC 2090, `tftm://` URLs): machines booting the
    /// image at the same time share one stream (needs
    /// `tftp.multicast_groups`).
    Multicast,
}

impl Transport {
    /// The name used in files, the database and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Tftp => "tftp",
            Transport::Multicast => "multicast",
        }
    }
}

/// A bootable image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub name: String,
    /// Relative to the boot directory, or an absolute `http(s)://`/`tftp://` URL.
    pub kernel: String,
    pub initrds: Vec<String>,
    pub cmdline: String,
    pub transport: Transport,
    pub description: String,
    /// The template that renders its iPXE script (built-in unless set).
    pub template: String,
    /// Boot it through the Secure Boot chain (signed shim, signed GRUB,
    /// the per-MAC GRUB config) on UEFI x64 PXE machines; its kernel must
    /// be signed by a key the machines' firmware or shim trusts.
    pub secure_boot: bool,
}

/// One machine the operator listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    pub mac: Mac,
    pub hostname: Option<String>,
    pub image: Option<String>,
    pub ip: Option<Ipv4Addr>,
    pub cmdline_append: String,
    /// iPXE lines added after the image's own, before `boot`.
    pub script_append: String,
    pub one_shot: bool,
    /// Arming generation of a one-shot assignment: raising it re-arms.
    pub rearm: u64,
    /// `false`: never netboot this machine (local boot always).
    pub netboot: bool,
    /// Free values for custom templates.
    pub vars: BTreeMap<String, String>,
}

/// What a served file is to the images that use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRole {
    Kernel,
    Initrd,
}

/// One immutable version of the inventory.
#[derive(Debug)]
pub struct Snapshot {
    /// Counts successful loads, starting at 1 (0: the empty default).
    pub generation: u64,
    pub unknown_policy: UnknownPolicy,
    pub poll_seconds: u32,
    pub images: BTreeMap<String, Arc<Image>>,
    pub machines: HashMap<Mac, Machine>,
    /// Machines by reserved IPv4 address (pxelinux's hex-IP names).
    pub by_ip: HashMap<Ipv4Addr, Mac>,
    /// Boot-directory paths of kernels and initrds, and what they are.
    pub boot_files: HashMap<String, FileRole>,
    /// Custom template sources by name (the file name in the boot directory).
    pub templates: BTreeMap<String, String>,
    /// BMCs the inventory file gives (`bmc = "redfish://…"`), with their
    /// passwords: imported (sealed) into an empty inventory database with
    /// the rest of the file; the data plane never reads them.
    pub bmcs: HashMap<Mac, bmc::BmcUrl>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            generation: 0,
            unknown_policy: UnknownPolicy::Menu,
            poll_seconds: 30,
            images: BTreeMap::new(),
            machines: HashMap::new(),
            by_ip: HashMap::new(),
            boot_files: HashMap::new(),
            templates: BTreeMap::new(),
            bmcs: HashMap::new(),
        }
    }
}

/// Why an inventory file was not taken.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot read inventory {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("inventory {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("inventory {path}, line {line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InventoryFile {
    #[serde(default)]
    unknown: UnknownFile,
    #[serde(default)]
    images: BTreeMap<Spanned<String>, ImageFile>,
    #[serde(default)]
    machines: BTreeMap<Spanned<String>, MachineFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnknownFile {
    #[serde(default = "default_policy")]
    policy: UnknownPolicy,
    #[serde(default = "default_poll")]
    poll_seconds: Spanned<u32>,
}

impl Default for UnknownFile {
    fn default() -> Self {
        Self {
            policy: default_policy(),
            poll_seconds: Spanned::new(0..0, default_poll().into_inner()),
        }
    }
}

fn default_policy() -> UnknownPolicy {
    UnknownPolicy::Menu
}

fn default_poll() -> Spanned<u32> {
    Spanned::new(0..0, 30)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageFile {
    kernel: Spanned<String>,
    #[serde(default)]
    initrds: Vec<Spanned<String>>,
    #[serde(default)]
    cmdline: String,
    #[serde(default)]
    transport: Transport,
    #[serde(default)]
    description: String,
    template: Option<Spanned<String>>,
    #[serde(default)]
    secure_boot: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineFile {
    image: Option<Spanned<String>>,
    hostname: Option<String>,
    ip: Option<Ipv4Addr>,
    #[serde(default)]
    cmdline_append: String,
    #[serde(default)]
    script_append: String,
    #[serde(default)]
    one_shot: bool,
    #[serde(default)]
    rearm: u64,
    #[serde(default = "yes")]
    netboot: bool,
    #[serde(default)]
    vars: BTreeMap<String, String>,
    /// `ipmi://USER[:PASS]@HOST` or `redfish://USER[:PASS]@HOST/redfish/v1/Systems/ID`.
    bmc: Option<Spanned<String>>,
    /// The BMC password, read from this file (first line) when the URL
    /// carries none.
    bmc_password_file: Option<PathBuf>,
    /// An IPMI BMC's K_g key, read from this file (first line).
    bmc_kg_file: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

/// The built-in template name used when an image names none.
pub const DEFAULT_TEMPLATE: &str = "builtin:ipxe";

/// An inventory file's text, to say on which line a checked value is.
struct SourceText<'a> {
    text: &'a str,
    path: &'a Path,
}

impl SourceText<'_> {
    fn invalid(&self, span: std::ops::Range<usize>, message: String) -> InventoryError {
        InventoryError::Invalid {
            path: self.path.to_path_buf(),
            line: self.text[..span.start.min(self.text.len())]
                .matches('\n')
                .count()
                + 1,
            message,
        }
    }
}

/// Checks one `[images.NAME]` table and adds it, with its boot files and
/// its template (read from `root`), to `snapshot`.
fn add_image(
    snapshot: &mut Snapshot,
    source: &SourceText<'_>,
    root: &Path,
    name: Spanned<String>,
    image: ImageFile,
) -> Result<(), InventoryError> {
    let span = name.span();
    let name = name.into_inner();
    fields::check_name("image", &name).map_err(|e| source.invalid(span.clone(), e))?;
    fields::check_words(
        &format!("image {name}: cmdline"),
        &image.cmdline,
        fields::MAX_COMMAND_LINE,
    )
    .map_err(|e| source.invalid(span.clone(), e))?;
    fields::check_words(
        &format!("image {name}: description"),
        &image.description,
        fields::MAX_TEXT,
    )
    .map_err(|e| source.invalid(span.clone(), e))?;
    let mut check_path = |value: &Spanned<String>, role: FileRole| {
        let raw = value.get_ref();
        let path = fields::check_boot_path(&format!("image {name}: boot file"), raw)
            .map_err(|e| source.invalid(value.span(), e))?;
        if !is_url(&path) {
            snapshot.boot_files.insert(path.clone(), role);
        }
        Ok(path)
    };
    let kernel = check_path(&image.kernel, FileRole::Kernel)?;
    let initrds = image
        .initrds
        .iter()
        .map(|initrd| check_path(initrd, FileRole::Initrd))
        .collect::<Result<Vec<_>, _>>()?;
    let template = match &image.template {
        None => DEFAULT_TEMPLATE.to_string(),
        Some(template) => {
            let relative = safe_relative_name(template.get_ref().as_bytes()).map_err(|why| {
                source.invalid(template.span(), format!("image {name}: template: {why}"))
            })?;
            if !snapshot.templates.contains_key(&relative) {
                let template_text = std::fs::read_to_string(root.join(&relative)).map_err(|e| {
                    source.invalid(
                        template.span(),
                        format!("image {name}: cannot read template {relative}: {e}"),
                    )
                })?;
                fields::check_template(&relative, &template_text).map_err(|e| {
                    source.invalid(
                        template.span(),
                        format!("image {name}: template {relative}: {e}"),
                    )
                })?;
                snapshot.templates.insert(relative.clone(), template_text);
            }
            relative
        }
    };
    snapshot.images.insert(
        name.clone(),
        Arc::new(Image {
            name,
            kernel,
            initrds,
            cmdline: image.cmdline,
            transport: image.transport,
            description: image.description,
            template,
            secure_boot: image.secure_boot,
        }),
    );
    Ok(())
}

/// A machine's `bmc`, `bmc_password_file` and `bmc_kg_file`, parsed: the
/// password from the URL or the file, exactly one of them.
fn machine_bmc(
    mac: Mac,
    url: &str,
    password_file: Option<&Path>,
    kg_file: Option<&Path>,
) -> Result<bmc::BmcUrl, String> {
    let mut parsed = bmc::parse_bmc_url(url).map_err(|e| format!("machine {mac}: {e}"))?;
    let read = |what: &str, file: &Path| {
        bmc::read_secret_file(file)
            .map_err(|e| format!("machine {mac}: {what} {}: {e}", file.display()))
    };
    match (&parsed.password, password_file) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "machine {mac}: give the BMC password in the URL or in bmc_password_file, not both"
            ))
        }
        (None, Some(file)) => {
            let password = read("bmc_password_file", file)?;
            bmc::check_secret(&password).map_err(|e| format!("machine {mac}: BMC: {e}"))?;
            parsed.password = Some(password);
        }
        (None, None) => {
            return Err(format!(
                "machine {mac}: the BMC has no password (write it in the URL or give bmc_password_file)"
            ))
        }
        (Some(_), None) => {}
    }
    if let Some(file) = kg_file {
        let kg = read("bmc_kg_file", file)?;
        bmc::check_kg_for(&parsed.target, &kg).map_err(|e| format!("machine {mac}: BMC: {e}"))?;
        parsed.kg_key = Some(kg);
    }
    Ok(parsed)
}

/// Checks one `[machines."MAC"]` table against the images already added
/// and the addresses already reserved, and adds it to `snapshot`.
fn add_machine(
    snapshot: &mut Snapshot,
    source: &SourceText<'_>,
    key: Spanned<String>,
    machine: MachineFile,
) -> Result<(), InventoryError> {
    let mac = Mac::parse(key.get_ref())
        .map_err(|e| source.invalid(key.span(), format!("machine {:?}: {e}", key.get_ref())))?;
    if snapshot.machines.contains_key(&mac) {
        return Err(source.invalid(
            key.span(),
            format!("machine {mac} is listed twice (under different spellings)"),
        ));
    }
    if let Some(image) = &machine.image {
        if !snapshot.images.contains_key(image.get_ref()) {
            let known: Vec<&str> = snapshot.images.keys().map(String::as_str).collect();
            return Err(source.invalid(
                image.span(),
                format!(
                    "machine {mac}: no image named {:?} (images: {})",
                    image.get_ref(),
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
    }
    let field = |name: &str| format!("machine {mac}: {name}");
    let checked = machine
        .hostname
        .as_deref()
        .map_or(Ok(()), fields::check_hostname)
        .and_then(|()| {
            fields::check_words(
                &field("cmdline_append"),
                &machine.cmdline_append,
                fields::MAX_COMMAND_LINE,
            )
        })
        .and_then(|()| fields::check_script_lines(&field("script_append"), &machine.script_append))
        .and_then(|()| fields::check_vars(&machine.vars))
        .and_then(|()| machine.ip.map_or(Ok(()), fields::check_host_address));
    checked.map_err(|e| source.invalid(key.span(), e))?;
    if let Some(url) = &machine.bmc {
        let parsed = machine_bmc(
            mac,
            url.get_ref(),
            machine.bmc_password_file.as_deref(),
            machine.bmc_kg_file.as_deref(),
        )
        .map_err(|e| source.invalid(url.span(), e))?;
        snapshot.bmcs.insert(mac, parsed);
    }
    if let Some(ip) = machine.ip {
        if let Some(other) = snapshot.by_ip.insert(ip, mac) {
            return Err(source.invalid(
                key.span(),
                format!("machines {other} and {mac} both reserve {ip}"),
            ));
        }
    }
    snapshot.machines.insert(
        mac,
        Machine {
            mac,
            hostname: machine.hostname,
            image: machine.image.map(Spanned::into_inner),
            ip: machine.ip,
            cmdline_append: machine.cmdline_append,
            script_append: machine.script_append,
            one_shot: machine.one_shot,
            rearm: machine.rearm,
            netboot: machine.netboot,
            vars: machine.vars,
        },
    );
    Ok(())
}

impl Snapshot {
    /// Reads and checks `path` (templates resolve inside `root`).
    pub fn load(path: &Path, root: &Path, generation: u64) -> Result<Self, InventoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path, root, generation)
    }

    /// Builds a snapshot from the text of an inventory file.
    pub fn parse(
        text: &str,
        path: &Path,
        root: &Path,
        generation: u64,
    ) -> Result<Self, InventoryError> {
        let file: InventoryFile = toml::from_str(text).map_err(|e| InventoryError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " | "),
        })?;
        let source = SourceText { text, path };

        let mut snapshot = Snapshot {
            generation,
            unknown_policy: file.unknown.policy,
            poll_seconds: *file.unknown.poll_seconds.get_ref(),
            ..Snapshot::default()
        };
        if !(1..=3600).contains(&snapshot.poll_seconds) {
            return Err(source.invalid(
                file.unknown.poll_seconds.span(),
                "unknown.poll_seconds must be between 1 and 3600".into(),
            ));
        }

        for (name, image) in file.images {
            add_image(&mut snapshot, &source, root, name, image)?;
        }
        for (key, machine) in file.machines {
            add_machine(&mut snapshot, &source, key, machine)?;
        }
        Ok(snapshot)
    }

    /// Builds a snapshot from records another source (the inventory
    /// database) has already validated field by field; what spans records
    /// — unknown images, two machines on one address — is checked here.
    /// Images use the built-in template.
    pub fn from_records(
        generation: u64,
        unknown_policy: UnknownPolicy,
        poll_seconds: u32,
        images: impl IntoIterator<Item = Image>,
        machines: impl IntoIterator<Item = Machine>,
    ) -> Result<Self, String> {
        let mut snapshot = Snapshot {
            generation,
            unknown_policy,
            poll_seconds: poll_seconds.clamp(1, 3600),
            ..Snapshot::default()
        };
        for image in images {
            for (path, role) in std::iter::once((&image.kernel, FileRole::Kernel))
                .chain(image.initrds.iter().map(|i| (i, FileRole::Initrd)))
            {
                if !is_url(path) {
                    snapshot.boot_files.insert(path.clone(), role);
                }
            }
            snapshot.images.insert(image.name.clone(), Arc::new(image));
        }
        for machine in machines {
            if let Some(image) = &machine.image {
                if !snapshot.images.contains_key(image) {
                    return Err(format!("machine {}: no image named {image:?}", machine.mac));
                }
            }
            if let Some(ip) = machine.ip {
                if let Some(other) = snapshot.by_ip.insert(ip, machine.mac) {
                    return Err(format!(
                        "machines {other} and {} both reserve {ip}",
                        machine.mac
                    ));
                }
            }
            snapshot.machines.insert(machine.mac, machine);
        }
        Ok(snapshot)
    }

    /// The image assigned to `mac`, if any.
    pub fn assigned_image(&self, mac: Mac) -> Option<(&Machine, &Arc<Image>)> {
        let machine = self.machines.get(&mac)?;
        Some((machine, self.image_of(machine)?))
    }

    /// The image assigned to `machine` (one of this snapshot's), if any.
    pub fn image_of(&self, machine: &Machine) -> Option<&Arc<Image>> {
        self.images.get(machine.image.as_deref()?)
    }
}

/// Whether a boot path is a URL rather than a file in the boot directory.
pub fn is_url(path: &str) -> bool {
    ["http://", "https://", "tftp://", "tftm://"]
        .iter()
        .any(|scheme| path.starts_with(scheme))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[unknown]
policy = "wait"
poll_seconds = 5

[images.debian12]
kernel = "debian12/vmlinuz"
initrds = ["debian12/initrd.img", "/extra/firmware.cpio"]
cmdline = "console=ttyS0"

[images.alpine]
kernel = "http://mirror.example/alpine/vmlinuz"
transport = "tftp"

[machines."52-54-00-12-34-56"]
image = "debian12"
hostname = "node01"
ip = "10.0.0.11"
one_shot = true

[machines.525400123457]
netboot = false
"#;

    fn parse(text: &str) -> Result<Snapshot, InventoryError> {
        Snapshot::parse(
            text,
            Path::new("inventory.toml"),
            Path::new("/nonexistent"),
            1,
        )
    }

    #[test]
    fn machines_give_their_bmc_with_a_password_in_the_url_or_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node02.pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let kg = dir.path().join("rack.kg");
        std::fs::write(&kg, "0x6b67\n").unwrap();
        let text = format!(
            "[machines.\"52:54:00:00:00:01\"]\nbmc = \"ipmi://admin:in-url@10.0.9.1\"\n\
             bmc_kg_file = {:?}\n\
             [machines.\"52:54:00:00:00:02\"]\nbmc = \"redfish://root@10.0.9.2/redfish/v1/Systems/1\"\n\
             bmc_password_file = {:?}\n",
            kg.display().to_string(),
            file.display().to_string()
        );
        let snapshot = parse(&text).unwrap();
        let one = &snapshot.bmcs[&Mac::parse("52:54:00:00:00:01").unwrap()];
        assert_eq!(one.password.as_deref(), Some("in-url"));
        assert_eq!(one.kg_key.as_deref(), Some("0x6b67"));
        let two = &snapshot.bmcs[&Mac::parse("52:54:00:00:00:02").unwrap()];
        assert_eq!(two.password.as_deref(), Some("from-file"));
        assert_eq!(
            two.target.to_string(),
            "redfish://root@10.0.9.2:443/redfish/v1/Systems/1"
        );
        assert!(
            !format!("{one:?}").contains("in-url") && !format!("{one:?}").contains("6b67"),
            "Debug never shows a password or key"
        );
        for (bad, why) in [
            ("bmc = \"ipmi://admin@10.0.9.1\"", "has no password"),
            (
                "bmc = \"ipmi://admin:x@10.0.9.1\"\nbmc_password_file = \"/x\"",
                "not both",
            ),
            (
                "bmc = \"ipmi://admin@10.0.9.1\"\nbmc_password_file = \"/nonexistent/pw\"",
                "bmc_password_file",
            ),
            ("bmc = \"http://admin:x@10.0.9.1\"", "scheme"),
            (
                "bmc = \"redfish://a:x@h/redfish/v1/Systems/1\"\nbmc_kg_file = \"/etc/hostname\"",
                "IPMI BMCs only",
            ),
            (
                "bmc = \"ipmi://a:x@h\"\nbmc_kg_file = \"/nonexistent/kg\"",
                "bmc_kg_file",
            ),
        ] {
            let error = parse(&format!("[machines.\"52:54:00:00:00:03\"]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(why) && error.contains("line"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn a_good_file_becomes_a_snapshot() {
        let snapshot = parse(GOOD).unwrap();
        assert_eq!(snapshot.unknown_policy, UnknownPolicy::Wait);
        assert_eq!(snapshot.poll_seconds, 5);
        let mac = Mac::parse("52:54:00:12:34:56").unwrap();
        let (machine, image) = snapshot.assigned_image(mac).unwrap();
        assert_eq!(machine.hostname.as_deref(), Some("node01"));
        assert!(machine.one_shot);
        assert_eq!(
            image.initrds,
            ["debian12/initrd.img", "extra/firmware.cpio"]
        );
        assert_eq!(snapshot.by_ip[&"10.0.0.11".parse().unwrap()], mac);
        assert_eq!(snapshot.boot_files["debian12/vmlinuz"], FileRole::Kernel);
        assert_eq!(snapshot.boot_files["extra/firmware.cpio"], FileRole::Initrd);
        assert_eq!(snapshot.images["alpine"].transport, Transport::Tftp);
        let other = Mac::parse("52:54:00:12:34:57").unwrap();
        assert!(!snapshot.machines[&other].netboot);
        assert!(snapshot.assigned_image(other).is_none());
    }

    #[test]
    fn mistakes_are_reported_with_their_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("[machines.\"52:54:00:12:34\"]\n", 1, "machine"),
            (
                "[images.a]\nkernel = \"k\"\n[machines.aabbccddeeff]\nimage = \"b\"\n",
                4,
                "no image named \"b\"",
            ),
            ("[images.a]\nkernel = \"../etc/passwd\"\n", 2, "`..`"),
            ("[unknown]\npoll_seconds = 0\n", 2, "poll_seconds"),
            (
                "\n[machines.AABBCCDDEEFF]\n[machines.\"aa-bb-cc-dd-ee-ff\"]\n",
                3,
                "listed twice",
            ),
            (
                "[images.a]\nkernel = \"k\"\ntemplate = \"missing.j2\"\n",
                3,
                "cannot read template",
            ),
        ];
        for (text, line, needle) in cases {
            match parse(text) {
                Err(InventoryError::Invalid {
                    line: got, message, ..
                }) => {
                    assert_eq!(got, *line, "{text:?}: {message}");
                    assert!(message.contains(needle), "{text:?}: {message}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn syntax_errors_and_unknown_keys_name_the_line() {
        for text in [
            "[images.a\nkernel=1",
            "[images.a]\nkernel = \"k\"\nkernal = \"k\"\n",
        ] {
            let message = parse(text).unwrap_err().to_string();
            assert!(message.contains("line"), "{message}");
        }
    }
}
