//! The MAC router: turns a machine's MAC address into the script (or
//! pxelinux/GRUB config) it boots, and turns the files machines fetch into
//! boot events. It is the meeting point of four parts, each with its own
//! state and lock:
//!
//! * `current` — the inventory snapshot in use, swapped atomically;
//! * [`super::policy`] — the pure decision (MAC + menu choice + snapshot →
//!   what it boots), after an operator's own per-MAC script
//!   ([`super::script::StaticScripts`]), which always wins;
//! * [`super::seen`] — the machines that asked, with their facts; a MAC the
//!   inventory does not list is recorded as *discovered*;
//! * [`super::ledger`] — one-shot assignments used up, written to disk off
//!   the data-plane threads;
//!
//! and [`super::clients`]: loaders, kernels and initrds carry no MAC
//! address, so the router remembers which client address is which machine
//! (from the address DHCP gave it, or the last script it asked for); that
//! is how a kernel fetch becomes a boot event of the right machine and how
//! a one-shot assignment learns it has been used.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};

use super::checkin::{host_of, Checkin};
use super::clients::{Binding, ClientBindings};
use super::current::{CurrentInventory, Loaded, SnapshotGuard};
use super::events::{BootEvent, EventLog, Phase};
use super::hooks::{FileGenerator, FinishedRead, TransferObserver};
use super::ledger::OneShots;
use super::policy::{self, Choice};
use super::render::{ImageView, InitrdView, ScriptContext};
use super::script::{FilesNamedByScripts, StaticScripts};
use super::seen::{SeenMachine, SeenMachines};
use super::MAX_SEEN;
use crate::inventory::{
    self, FileRole, Image, InventoryError, Machine, Snapshot, Transport, UnknownPolicy,
};
use crate::proto::{Mac, PxelinuxConfig};

/// How long the unknown-machine menu waits before booting locally.
pub const MENU_TIMEOUT_MS: u32 = 30_000;

/// What decided a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Static(PathBuf),
    Assigned(String),
    /// An image chosen from the unknown-machine menu.
    MenuChoice(String),
    Unknown(UnknownPolicy),
    Local(&'static str),
    /// Assigned an image whose files this server does not hold yet (being
    /// copied from another server): told to ask again.
    NotHereYet(String),
}

impl Decision {
    /// [`Display`](std::fmt::Display)'s text, built without the formatting
    /// machinery for the decision of every assigned machine's script.
    pub fn describe(&self) -> String {
        match self {
            Decision::Assigned(image) => ["image ", image].concat(),
            other => other.to_string(),
        }
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::Static(path) => write!(f, "static script {}", path.display()),
            Decision::Assigned(image) => write!(f, "image {image}"),
            Decision::MenuChoice(image) => write!(f, "image {image} chosen from the menu"),
            Decision::Unknown(policy) => write!(f, "unknown machine: {policy:?}"),
            Decision::Local(why) => write!(f, "local boot: {why}"),
            Decision::NotHereYet(image) => {
                write!(f, "image {image}, not on this server yet: asked to wait")
            }
        }
    }
}

/// A rendered script and why.
#[derive(Debug, Clone)]
pub struct Script {
    pub body: Vec<u8>,
    pub decision: Decision,
}

/// The router; one per server, shared by HTTP and TFTP.
pub struct Router {
    inventory: CurrentInventory,
    static_scripts: StaticScripts,
    files_named_by_scripts: FilesNamedByScripts,
    one_shots: OneShots,
    seen: SeenMachines,
    /// Which machine each client address is, and how the router knows.
    clients: ClientBindings,
    /// First-stage loaders the DHCP answers name: their fetches are the
    /// loader phase of a boot.
    loader_files: HashSet<String>,
    pub events: EventLog,
    /// Check-in tokens and URL for the kernel command lines, once the
    /// server knows its key and where machines reach its panel.
    checkin: arc_swap::ArcSwapOption<Checkin>,
    /// Images whose files this server does not hold yet, with why (see
    /// [`Self::set_images_not_here`]).
    images_not_here: arc_swap::ArcSwap<BTreeMap<String, String>>,
}

impl Router {
    /// One-shot assignments used up through this server since the last
    /// call, for the other servers of the database.
    pub fn take_newly_used_one_shots(&self) -> Vec<(Mac, u64)> {
        self.one_shots.take_newly_used()
    }

    /// Gives back what [`Self::take_newly_used_one_shots`] gave when it
    /// could not be stored; it comes again with the next call.
    pub fn keep_newly_used_one_shots(&self, used: Vec<(Mac, u64)>) {
        self.one_shots.keep_newly_used(used);
    }

    /// One-shot assignments used up (MAC, `rearm` generation) as the
    /// database has them, through any server: used up here too.
    pub fn merge_used_one_shots(&self, used: &[(Mac, u64)]) {
        self.one_shots.merge_used_elsewhere(used);
    }

    /// The images [`Self::set_images_not_here`] holds back now.
    pub fn images_not_here(&self) -> BTreeMap<String, String> {
        (**self.images_not_here.load()).clone()
    }

    /// Images whose boot files this server does not hold (yet): with
    /// several servers on one database, an image registered on another
    /// server is offered here only once its files were copied and checked.
    /// A machine assigned one meanwhile gets a script that waits and asks
    /// again, instead of a kernel URL that would fail.
    pub fn set_images_not_here(&self, images: BTreeMap<String, String>) {
        if **self.images_not_here.load() != images {
            self.images_not_here.store(std::sync::Arc::new(images));
        }
    }

    /// Waits until the one-shot assignments used so far are on disk (they
    /// are written off the data plane; see [`super::ledger`]).
    pub fn sync_state(&self) {
        self.one_shots.sync();
    }

    /// A router for the canonical boot `root`, reading `inventory_path`
    /// (a missing file is an empty inventory) and keeping one-shot state in
    /// `state_dir`.
    pub fn new(
        root: &Path,
        inventory_path: &Path,
        state_dir: &Path,
    ) -> Result<Self, InventoryError> {
        let router = Self {
            inventory: CurrentInventory::new(root, inventory_path),
            static_scripts: StaticScripts::new(root),
            files_named_by_scripts: FilesNamedByScripts::default(),
            one_shots: OneShots::open(state_dir),
            seen: SeenMachines::default(),
            clients: ClientBindings::default(),
            loader_files: HashSet::new(),
            events: EventLog::new(100_000),
            checkin: arc_swap::ArcSwapOption::empty(),
            images_not_here: arc_swap::ArcSwap::default(),
        };
        router.reload()?;
        Ok(router)
    }

    /// The inventory file this router reads.
    pub fn inventory_path(&self) -> &Path {
        self.inventory.inventory_path()
    }

    /// The snapshot in use.
    pub fn snapshot(&self) -> impl std::ops::Deref<Target = Snapshot> + '_ {
        SnapshotGuard(self.inventory.load_full())
    }

    /// Loads the inventory file again if it changed since the last load (or
    /// `force`); a file that fails to load leaves the current snapshot, and
    /// the same failed version is not tried again until it changes.
    /// Returns whether a new snapshot was installed.
    pub fn reload_if_changed(&self, force: bool) -> Result<bool, InventoryError> {
        self.inventory.reload_if_changed(force)
    }

    /// Installs a snapshot built elsewhere (the inventory database) and
    /// stops watching the inventory file: from now on only further calls
    /// change what is served. Readers switch atomically.
    pub fn install(&self, snapshot: Snapshot) -> Result<(), InventoryError> {
        self.inventory.install(snapshot)
    }

    /// [`Self::reload_if_changed`] with `force`.
    pub fn reload(&self) -> Result<bool, InventoryError> {
        self.reload_if_changed(true)
    }

    /// Checks the file for changes and logs (rather than returns) a
    /// failure, and checks that the per-MAC script directory watched is
    /// still the one under the boot directory's path: what the watcher
    /// thread and SIGHUP call.
    pub fn refresh(&self, force: bool) {
        if let Err(error) = self.reload_if_changed(force) {
            warn!(%error, "inventory not reloaded; still serving the last good one");
        }
        self.static_scripts.check_watched_directory();
    }

    /// Adds (or, with `None`, stops adding) the check-in URL and a fresh
    /// token to every kernel command line this router renders.
    pub fn set_checkin(&self, checkin: Option<Checkin>) {
        self.checkin.store(checkin.map(std::sync::Arc::new));
        self.inventory.forget_rendered();
    }

    /// Whether kernel command lines carry a check-in URL.
    pub fn checks_in(&self) -> bool {
        self.checkin.load().is_some()
    }

    /// Checks a check-in token `mac` sent; when it was issued.
    pub fn verify_checkin(
        &self,
        mac: Mac,
        token: &str,
        now_ms: u64,
    ) -> Result<u64, super::checkin::CheckinError> {
        match &*self.checkin.load() {
            Some(checkin) => checkin.verify(mac, token, now_ms),
            None => Err(super::checkin::CheckinError::Disabled),
        }
    }

    /// `body` with its check-in token marker replaced by a fresh token.
    fn stamp(&self, body: Vec<u8>, mac: Mac) -> Vec<u8> {
        match &*self.checkin.load() {
            Some(checkin) => checkin.stamp(body, mac, super::events::now_ms()),
            None => body,
        }
    }

    /// The check-in words of `mac`'s kernel command line.
    fn checkin_words(&self, mac: Mac, base_url: &str) -> Option<String> {
        self.checkin.load().as_ref()?.cmdline_words(mac, base_url)
    }

    /// The script for the machine `mac` (as requested, any spelling),
    /// asked for by `client` with the chain script's facts in `query`;
    /// scripts refer to this server as `base_url`.
    pub fn machine_script(
        &self,
        mac: Mac,
        query: &[(String, String)],
        base_url: &str,
        client: IpAddr,
    ) -> Script {
        let static_script = self.static_scripts.find(mac);
        self.script_for(mac, query, base_url, client, static_script)
    }

    /// [`Self::machine_script`] for a thread that must not block: `None`,
    /// with nothing done, when it would touch the file system (list the
    /// per-MAC script directory, read an operator's script); an engine
    /// worker then hands the request to a thread that may.
    pub fn machine_script_without_blocking(
        &self,
        mac: Mac,
        query: &[(String, String)],
        base_url: &str,
        client: IpAddr,
    ) -> Option<Script> {
        self.static_scripts
            .known_absent(mac)
            .then(|| self.script_for(mac, query, base_url, client, None))
    }

    /// The script for `mac`, whose operator's own script (if any) is
    /// `static_script`.
    fn script_for(
        &self,
        mac: Mac,
        query: &[(String, String)],
        base_url: &str,
        client: IpAddr,
        static_script: Option<super::script::StaticScript>,
    ) -> Script {
        let loaded = self.inventory.load();
        let snapshot = &loaded.snapshot;
        let facts: BTreeMap<String, String> = query
            .iter()
            .filter(|(name, _)| super::script::FACTS.iter().any(|(fact, _)| fact == name))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        // A machine with the operator's own script is known, not discovered.
        // An address that this server leased to another machine cannot
        // speak for this one: it still gets the script (scripts are public
        // boot files), but it neither claims the MAC nor writes to its
        // record.
        let speaks_for = self.may_speak_for(client, mac);
        if speaks_for {
            self.note_client(client, mac);
            let discovered = !snapshot.machines.contains_key(&mac) && static_script.is_none();
            self.seen.remember(mac, client, &facts, discovered);
        }
        if let Some(found) = static_script {
            self.files_named_by_scripts.note(&found.body);
            return Script {
                body: found.body,
                decision: Decision::Static(found.path),
            };
        }
        let menu_choice = query
            .iter()
            .find(|(name, _)| name == "image")
            .map(|(_, image)| image.as_str());
        let choice = policy::decide(snapshot, mac, menu_choice, |mac, rearm| {
            self.one_shots.used(mac, rearm)
        });
        let server = base_url.trim_end_matches('/');
        if let Choice::Assigned { image, .. } | Choice::MenuChoice { image, .. } = choice {
            if let Some(why) = self.images_not_here.load().get(&image.name) {
                let context = ScriptContext {
                    mac: mac.to_string(),
                    server: server.to_string(),
                    poll_seconds: snapshot.poll_seconds,
                    query: facts_query(query),
                    reason: format!("image {} is not on this server yet: {why}", image.name),
                    ..ScriptContext::default()
                };
                let decision = Decision::NotHereYet(image.name.clone());
                let mut script = render(&loaded, "builtin:not-here", &context, decision);
                script.body = self.stamp(script.body, mac);
                return script;
            }
        }
        if let Choice::Assigned { machine, image } = choice {
            if speaks_for {
                self.one_shots.script_asked(machine, client);
            }
            // Checked before any context is built: this is the path of
            // every assigned machine's boot, thousands of times a second in
            // a storm.
            if let Some(body) = cached_script(&loaded, mac, server, image) {
                return Script {
                    body: self.stamp(body, mac),
                    decision: Decision::Assigned(image.name.clone()),
                };
            }
        }
        let context = ScriptContext {
            mac: mac.to_string(),
            server: server.to_string(),
            facts,
            poll_seconds: snapshot.poll_seconds,
            menu_timeout_ms: MENU_TIMEOUT_MS,
            query: facts_query(query),
            ..ScriptContext::default()
        };
        let mut script = self.render_choice(&loaded, choice, context, base_url);
        script.body = self.stamp(script.body, mac);
        script
    }

    /// Renders what the policy chose into `context` (which holds the
    /// request's part) with the snapshot's templates; an assigned machine's
    /// script on the built-in template is kept for its next request.
    fn render_choice(
        &self,
        loaded: &Loaded,
        choice: Choice<'_>,
        mut context: ScriptContext,
        base_url: &str,
    ) -> Script {
        if let Some(machine) = choice.machine() {
            context.hostname = machine.hostname.clone();
            context.vars = machine.vars.clone();
        }
        match choice {
            Choice::Local { why, .. } => {
                context.reason = why.to_string();
                render(loaded, "builtin:local", &context, Decision::Local(why))
            }
            Choice::Assigned { machine, image } => {
                let checkin = self.checkin_words(machine.mac, base_url);
                fill_image(&mut context, image, Some(machine), base_url, checkin);
                let decision = Decision::Assigned(image.name.clone());
                let script = render(loaded, &image.template, &context, decision);
                let cacheable = image.template == inventory::DEFAULT_TEMPLATE;
                if cacheable && matches!(script.decision, Decision::Assigned(_)) {
                    let mut rendered = loaded.rendered.lock().unwrap_or_else(|p| p.into_inner());
                    if rendered.len() >= MAX_SEEN {
                        rendered.clear();
                    }
                    rendered.insert(machine.mac, (context.server.clone(), script.body.clone()));
                }
                script
            }
            Choice::MenuChoice { machine, image } => {
                let mac = machine.map(|m| m.mac);
                let checkin = mac.and_then(|mac| self.checkin_words(mac, base_url));
                fill_image(&mut context, image, machine, base_url, checkin);
                let decision = Decision::MenuChoice(image.name.clone());
                render(loaded, &image.template, &context, decision)
            }
            Choice::Unknown { policy, .. } => {
                let template = match policy {
                    UnknownPolicy::Menu => {
                        context.images = loaded
                            .snapshot
                            .images
                            .values()
                            .map(|i| image_view(i))
                            .collect();
                        "builtin:menu"
                    }
                    UnknownPolicy::Wait => "builtin:wait",
                    UnknownPolicy::Local => {
                        context.reason = "not assigned an image".into();
                        "builtin:local"
                    }
                };
                render(loaded, template, &context, Decision::Unknown(policy))
            }
        }
    }

    /// Machines that asked for a script, most recently seen first;
    /// `discovered_only` keeps those the inventory does not list.
    pub fn seen_machines(&self, discovered_only: bool) -> Vec<SeenMachine> {
        self.seen
            .list(&self.inventory.load().snapshot, discovered_only)
    }

    /// What the router remembers of one machine that asked for a script.
    pub fn seen_machine(&self, mac: Mac) -> Option<SeenMachine> {
        self.seen.get(mac)
    }

    /// Records that `client` says it is `mac` (it asked for that MAC's
    /// script, or named an address in a ProxyDHCP exchange), so that file
    /// fetches, which carry no MAC address, can be put on that machine's
    /// timeline. A claim never replaces an address this server leased to
    /// another machine ([`Self::note_lease`]).
    pub fn note_client(&self, client: IpAddr, mac: Mac) {
        self.clients.bind(client, mac, Binding::Claimed);
    }

    /// Records that this server's DHCP leased (or confirmed) `client` to
    /// `mac`: what the lease says wins over any claim.
    pub fn note_lease(&self, client: IpAddr, mac: Mac) {
        self.clients.bind(client, mac, Binding::Leased);
    }

    /// Records that this server's DHCP answered `client` from its address
    /// `server`: the address the machine's TFTP-served GRUB and pxelinux
    /// configs name for its check-in (a TFTP request does not say which
    /// of the server's addresses it came to).
    pub fn note_answered_from(&self, client: IpAddr, server: IpAddr) {
        self.clients.answered_from(client, server);
    }

    /// Whether `client` may act for `mac`: true unless this server leased
    /// the address to another machine.
    pub fn may_speak_for(&self, client: IpAddr, mac: Mac) -> bool {
        self.clients.may_speak_for(client, mac)
    }

    /// Names the first-stage loaders (paths relative to the boot
    /// directory) whose fetches are recorded as the loader phase.
    pub fn set_loader_files(&mut self, files: impl IntoIterator<Item = String>) {
        self.loader_files = files.into_iter().collect();
    }

    /// The machine that last asked for a script from `client`.
    pub fn machine_at(&self, client: IpAddr) -> Option<Mac> {
        self.clients.machine_at(client)
    }

    /// Tells the router that a file was served: loaders, kernels and
    /// initrds become boot events, and a kernel fetched by a one-shot
    /// machine uses its assignment up.
    pub fn file_served(&self, served: &FileServed<'_>) {
        let FileServed { path, client, .. } = *served;
        let loaded = self.inventory.load();
        let phase = if self.loader_files.contains(path) {
            Phase::Loader
        } else {
            let role = loaded.snapshot.boot_files.get(path).copied();
            match role.or_else(|| self.files_named_by_scripts.role(path)) {
                Some(FileRole::Kernel) => Phase::Kernel,
                Some(FileRole::Initrd) => Phase::Initrd,
                None => return,
            }
        };
        let mac = self.machine_at(client);
        let detail = match &served.how {
            Some(how) => format!("{path} ({how})"),
            None => path.to_string(),
        };
        self.events.record(
            BootEvent::new(mac, client, phase, served.transport, detail)
                .bytes(served.bytes)
                .took(served.duration)
                .status(served.status),
        );
        if phase != Phase::Kernel || !served.complete {
            return;
        }
        let Some(mac) = mac else { return };
        if let Some((machine, image)) = loaded.snapshot.assigned_image(mac) {
            let leased = self.clients.is_leased_to(client, mac);
            if image.kernel == path && self.one_shots.kernel_fetched(machine, client, leased) {
                info!(%mac, image = %image.name, "one-shot assignment used: local boot from now on");
            }
        }
    }

    /// A pxelinux or GRUB config for the name TFTP was asked for, if it is
    /// one the router answers: `pxelinux.cfg/01-<mac>` or the machine's full
    /// hex IP; `grub.cfg-01-<mac>` or `grub.cfg-<hex IP>` (in any directory).
    /// An operator's file of that name on disk takes precedence. `server`
    /// is this server's address as the client knows it, if known (for a
    /// check-in URL on the panel's port at that host).
    pub fn loader_config(&self, name: &str, server: Option<IpAddr>) -> Option<(Mac, Vec<u8>)> {
        let (kind, key) = if let Some(index) = name.rfind("pxelinux.cfg/") {
            (
                "pxelinux",
                std::borrow::Cow::Borrowed(&name[index + "pxelinux.cfg/".len()..]),
            )
        } else {
            let file = name.rsplit('/').next()?;
            // GRUB names a MAC with colons (`${net_default_mac}`, as the
            // dispatching `grub.cfg` writes it), pxelinux with dashes.
            (
                "grub",
                std::borrow::Cow::Owned(file.strip_prefix("grub.cfg-")?.replace(':', "-")),
            )
        };
        let loaded = self.inventory.load_full();
        let snapshot = &loaded.snapshot;
        let mac = match PxelinuxConfig::parse(&key)? {
            PxelinuxConfig::Mac(mac) => mac,
            PxelinuxConfig::IpPrefix(hex) if hex.len() == 8 => {
                let ip = Ipv4Addr::from(u32::from_str_radix(&hex, 16).ok()?);
                *snapshot.by_ip.get(&ip)?
            }
            _ => return None,
        };
        let machine = snapshot.machines.get(&mac)?;
        if self.inventory.root().join(name).exists() {
            return None;
        }
        let mut context = ScriptContext {
            mac: mac.to_string(),
            hostname: machine.hostname.clone(),
            vars: machine.vars.clone(),
            ..ScriptContext::default()
        };
        let choice = policy::decide(snapshot, mac, None, |mac, rearm| {
            self.one_shots.used(mac, rearm)
        });
        let template = match choice {
            Choice::Local { why, .. } => {
                context.reason = why.to_string();
                format!("builtin:{kind}-local")
            }
            Choice::Assigned { machine, image } => {
                let base_url = server.map(|ip| format!("http://{ip}")).unwrap_or_default();
                let checkin = self.checkin_words(mac, &base_url);
                fill_image(&mut context, image, Some(machine), &base_url, checkin);
                format!("builtin:{kind}")
            }
            Choice::MenuChoice { .. } | Choice::Unknown { .. } => return None,
        };
        match loaded.templates.render(&template, &context) {
            Ok(body) => Some((mac, self.stamp(body.into_bytes(), mac))),
            Err(error) => {
                warn!(%mac, template, %error, "loader config template failed to render");
                None
            }
        }
    }
}

/// The script of an assigned machine on the built-in template, as last
/// rendered for this server address, when it is still current.
fn cached_script(loaded: &Loaded, mac: Mac, server: &str, image: &Image) -> Option<Vec<u8>> {
    if image.template != inventory::DEFAULT_TEMPLATE {
        return None;
    }
    let rendered = loaded.rendered.lock().unwrap_or_else(|p| p.into_inner());
    let (_, body) = rendered.get(&mac).filter(|(at, _)| at == server)?;
    Some(body.clone())
}

/// `template` rendered with `context`, or (a template can fail at render
/// time, a filter on a missing value) a script that says so on the console
/// and lets the firmware fall through to the next boot device.
fn render(loaded: &Loaded, template: &str, context: &ScriptContext, decision: Decision) -> Script {
    match loaded.templates.render(template, context) {
        Ok(body) => Script {
            body: body.into_bytes(),
            decision,
        },
        Err(error) => {
            warn!(mac = %context.mac, template, %error, "script template failed to render");
            Script {
                body: format!(
                    "#!ipxe\necho bootfleet: template {template} failed for {}; see the server log\nexit\n",
                    context.mac
                )
                .into_bytes(),
                decision: Decision::Local("template failed to render"),
            }
        }
    }
}

/// What GRUB reads for every machine (`grub.cfg`, in the directory of its
/// prefix): it loads the machine's own config, named by the MAC GRUB booted
/// from. Debian's signed GRUB network image reads only `$prefix/grub.cfg`.
fn grub_dispatch(dir: &str) -> Vec<u8> {
    // The directory goes into a GRUB command: only plain path characters
    // (anything else, which no GRUB asks for, reads from the top).
    let plain = dir
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
    let dir = if dir.is_empty() || !plain {
        String::new()
    } else {
        format!("/{dir}")
    };
    format!(
        "# bootfleet: each machine's own config, by the MAC it booted from\n\
         configfile {dir}/grub.cfg-01-${{net_default_mac}}\n"
    )
    .into_bytes()
}

/// What GRUB fetches when its `linux` command refused the kernel (the
/// Secure Boot chain found no signature it trusts): a config that says so
/// and hands the machine back to its firmware. Its name carries the MAC.
const GRUB_REFUSED: &str = "grub.cfg-refused-01-";

impl Router {
    /// The answer to [`GRUB_REFUSED`]`<mac>`, recorded as a refused kernel
    /// on the machine's timeline.
    fn grub_refused(&self, key: &str, client: SocketAddr) -> Option<Vec<u8>> {
        let mac = Mac::parse(key).ok()?;
        if !self.clients.may_speak_for(client.ip(), mac) {
            return None;
        }
        let kernel = self
            .inventory
            .load_full()
            .snapshot
            .assigned_image(mac)
            .map(|(_, image)| image.kernel.clone())
            .unwrap_or_default();
        self.events.record(
            BootEvent::new(
                Some(mac),
                client.ip(),
                Phase::Kernel,
                "tftp",
                format!("{kernel} refused by the Secure Boot chain (no signature the firmware or shim trusts)"),
            )
            .status(403),
        );
        Some(
            format!(
                "# bootfleet: {mac}: the Secure Boot chain refused the kernel\n\
                 echo \"bootfleet: the kernel has no signature this machine trusts; handing back to the firmware\"\n\
                 sleep 5\nexit\n"
            )
            .into_bytes(),
        )
    }
}

impl FileGenerator for Router {
    /// Only pxelinux and GRUB config names are generated, and only they
    /// look at the disk (an operator's file of that name wins).
    fn may_block(&self, name: &str) -> bool {
        name.contains("pxelinux.cfg/")
            || name
                .rsplit('/')
                .next()
                .is_some_and(|file| file.starts_with("grub.cfg-") || file == "grub.cfg")
    }

    fn generate(&self, name: &str, client: SocketAddr) -> Option<Vec<u8>> {
        let (dir, file) = name.rsplit_once('/').unwrap_or(("", name));
        if file == "grub.cfg" {
            if self.inventory.root().join(name).exists() {
                return None;
            }
            let body = grub_dispatch(dir);
            let mac = self.clients.machine_at(client.ip());
            self.events.record(
                BootEvent::new(
                    mac,
                    client.ip(),
                    Phase::LoaderConfig,
                    "tftp",
                    name.to_string(),
                )
                .bytes(body.len() as u64),
            );
            return Some(body);
        }
        if let Some(key) = file.strip_prefix(GRUB_REFUSED) {
            return self.grub_refused(key, client);
        }
        let (mac, body) = self.loader_config(name, self.clients.server_for(client.ip()))?;
        self.events.record(
            BootEvent::new(
                Some(mac),
                client.ip(),
                Phase::LoaderConfig,
                "tftp",
                name.to_string(),
            )
            .bytes(body.len() as u64),
        );
        Some(body)
    }
}

impl TransferObserver for Router {
    fn read_finished(&self, read: &FinishedRead<'_>) {
        self.file_served(&FileServed {
            path: read.name,
            client: read.peer.ip(),
            transport: "tftp",
            how: Some(match read.multicast {
                Some(part) => format!(
                    "multicast {}, {}, blksize {}, windowsize {}",
                    part.group,
                    match part.master_after {
                        Some(after) if after.is_zero() => "master from its join".to_string(),
                        Some(after) => format!("master after {:.1} s", after.as_secs_f64()),
                        None => "listener only".to_string(),
                    },
                    read.blksize,
                    read.windowsize
                ),
                None => format!("blksize {}, windowsize {}", read.blksize, read.windowsize),
            }),
            bytes: read.bytes,
            duration: read.elapsed,
            status: read.status,
            complete: read.complete,
        });
    }
}

/// A file the HTTP or TFTP server sent, as the router is told of it.
#[derive(Debug)]
pub struct FileServed<'a> {
    /// Relative to the boot directory.
    pub path: &'a str,
    pub client: IpAddr,
    /// `http` or `tftp`.
    pub transport: &'static str,
    /// How it was sent, for the boot event (TFTP: block and window size).
    pub how: Option<String>,
    pub bytes: u64,
    pub duration: Duration,
    /// HTTP status; for TFTP 200 (complete) or 500.
    pub status: u16,
    /// Every byte of a whole-file response was sent.
    pub complete: bool,
}

fn image_view(image: &Image) -> ImageView {
    ImageView {
        name: image.name.clone(),
        kernel: image.kernel.clone(),
        initrds: image.initrds.clone(),
        cmdline: image.cmdline.clone(),
        description: image.description.clone(),
    }
}

/// Fills the image part of a script context: URLs by the image's transport.
fn fill_image(
    context: &mut ScriptContext,
    image: &Image,
    machine: Option<&Machine>,
    base_url: &str,
    checkin: Option<String>,
) {
    let url = |path: &str| -> String {
        if inventory::is_url(path) {
            return path.to_string();
        }
        match image.transport {
            Transport::Http => format!("{}/{}", base_url.trim_end_matches('/'), path),
            Transport::Tftp => format!("tftp://{}/{}", host_of(base_url), path),
            Transport::Multicast => format!("tftm://{}/{}", host_of(base_url), path),
        }
    };
    context.image = image_view(image);
    context.kernel_url = url(&image.kernel);
    context.initrds = image
        .initrds
        .iter()
        .map(|path| InitrdView {
            name: path.rsplit('/').next().unwrap_or(path).to_string(),
            url: url(path),
        })
        .collect();
    let mut cmdline = image.cmdline.trim().to_string();
    if let Some(machine) = machine {
        let extra = machine.cmdline_append.trim();
        if !extra.is_empty() {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(extra);
        }
        context.script_append = machine.script_append.trim_end().to_string();
    }
    if let Some(words) = checkin {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(&words);
    }
    context.cmdline = cmdline;
}

/// The facts of a query again as `?name=value&…`, escaped, for the poll loop.
fn facts_query(query: &[(String, String)]) -> String {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    let pairs: Vec<String> = query
        .iter()
        .filter(|(name, _)| super::script::FACTS.iter().any(|(fact, _)| fact == name))
        .map(|(name, value)| format!("{name}={}", utf8_percent_encode(value, NON_ALPHANUMERIC)))
        .collect();
    if pairs.is_empty() {
        String::new()
    } else {
        format!("?{}", pairs.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = Mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

    struct Setup {
        root: tempfile::TempDir,
        state: tempfile::TempDir,
        router: Router,
    }

    fn setup(inventory: &str) -> Setup {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let root_path = root.path().canonicalize().unwrap();
        std::fs::write(root_path.join(inventory::FILE_NAME), inventory).unwrap();
        let router = Router::new(
            &root_path,
            &root_path.join(inventory::FILE_NAME),
            state.path(),
        )
        .unwrap();
        Setup {
            root,
            state,
            router,
        }
    }

    const INVENTORY: &str = r#"
[images.debian]
kernel = "debian/vmlinuz"
initrds = ["debian/initrd.img"]
cmdline = "console=ttyS0"

[images.tiny]
kernel = "tiny/k"
transport = "tftp"

[machines."52:54:00:12:34:56"]
image = "debian"
hostname = "node01"
cmdline_append = "node=1"
ip = "10.0.0.11"

[machines."52:54:00:00:00:02"]
image = "tiny"
one_shot = true

[machines."52:54:00:00:00:03"]
image = "debian"
netboot = false
"#;

    fn client() -> IpAddr {
        "10.0.0.11".parse().unwrap()
    }

    fn text(script: &Script) -> String {
        String::from_utf8(script.body.clone()).unwrap()
    }

    #[test]
    fn assigned_machine_gets_its_image_with_its_additions() {
        let s = setup(INVENTORY);
        let script = s
            .router
            .machine_script(MAC, &[], "http://10.0.0.1:8080", client());
        assert_eq!(script.decision, Decision::Assigned("debian".into()));
        let body = text(&script);
        assert!(body.contains(
            "kernel http://10.0.0.1:8080/debian/vmlinuz initrd=initrd.img console=ttyS0 node=1\n"
        ), "{body}");
        assert!(body.contains("initrd --name initrd.img http://10.0.0.1:8080/debian/initrd.img\n"));
        assert!(body.contains("(node01)"));
    }

    fn served(
        path: &str,
        client: IpAddr,
        bytes: u64,
        status: u16,
        complete: bool,
    ) -> FileServed<'_> {
        FileServed {
            path,
            client,
            transport: "tftp",
            how: None,
            bytes,
            duration: Duration::ZERO,
            status,
            complete,
        }
    }

    #[test]
    fn loader_fetches_land_on_the_machine_dhcp_addressed() {
        let mut s = setup(INVENTORY);
        s.router.set_loader_files(["undionly.kpxe".to_string()]);
        let mac = Mac::parse("52:54:00:00:00:02").unwrap();
        let peer: IpAddr = "10.0.0.51".parse().unwrap();
        // Before DHCP has told the router who is at that address, the
        // fetch is still an event, with no machine.
        s.router
            .file_served(&served("undionly.kpxe", peer, 70, 200, true));
        s.router.note_client(peer, mac);
        s.router
            .file_served(&served("undionly.kpxe", peer, 70, 200, true));
        s.router
            .file_served(&served("other.bin", peer, 70, 200, true));
        let events = s.router.events.recent(None, 10);
        let loaders: Vec<_> = events.iter().filter(|e| e.phase == Phase::Loader).collect();
        assert_eq!(loaders.len(), 2, "{events:?}");
        assert_eq!(s.router.events.recent(Some(mac), 10).len(), 1);
        assert!(events.iter().all(|e| e.detail != "other.bin"));
    }

    #[test]
    fn tftp_transport_uses_tftp_urls() {
        let s = setup(INVENTORY);
        let mac = Mac::parse("52:54:00:00:00:02").unwrap();
        let body = text(
            &s.router
                .machine_script(mac, &[], "http://[fd00::1]:8080", client()),
        );
        assert!(body.contains("kernel tftp://[fd00::1]/tiny/k\n"), "{body}");
    }

    #[test]
    fn multicast_transport_uses_tftm_urls() {
        let s = setup(&INVENTORY.replace("transport = \"tftp\"", "transport = \"multicast\""));
        let mac = Mac::parse("52:54:00:00:00:02").unwrap();
        let body = text(
            &s.router
                .machine_script(mac, &[], "http://10.0.0.1", client()),
        );
        assert!(body.contains("kernel tftm://10.0.0.1/tiny/k\n"), "{body}");
    }

    #[test]
    fn one_shot_is_used_by_the_kernel_fetch_and_survives_a_restart() {
        let s = setup(INVENTORY);
        let mac = Mac::parse("52:54:00:00:00:02").unwrap();
        let peer: IpAddr = "10.0.0.50".parse().unwrap();
        let first = s.router.machine_script(mac, &[], "http://h", peer);
        assert_eq!(first.decision, Decision::Assigned("tiny".into()));
        // A partial fetch does not count; a complete one does.
        s.router
            .file_served(&served("tiny/k", peer, 10, 206, false));
        assert_eq!(
            s.router.machine_script(mac, &[], "http://h", peer).decision,
            first.decision
        );
        s.router
            .file_served(&served("tiny/k", peer, 100, 200, true));
        let after = s.router.machine_script(mac, &[], "http://h", peer);
        assert!(
            matches!(after.decision, Decision::Local(_)),
            "{:?}",
            after.decision
        );
        assert!(text(&after).contains("exit\n"));
        let events = s.router.events.recent(Some(mac), 10);
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].phase, Phase::Kernel);

        // A new router over the same state directory remembers.
        s.router.sync_state();
        let root = s.root.path().canonicalize().unwrap();
        let again = Router::new(&root, &root.join(inventory::FILE_NAME), s.state.path()).unwrap();
        assert!(matches!(
            again.machine_script(mac, &[], "http://h", peer).decision,
            Decision::Local(_)
        ));
        // Raising rearm arms it again.
        std::fs::write(
            root.join(inventory::FILE_NAME),
            INVENTORY.replace("one_shot = true", "one_shot = true\nrearm = 1"),
        )
        .unwrap();
        again.reload().unwrap();
        assert_eq!(
            again.machine_script(mac, &[], "http://h", peer).decision,
            Decision::Assigned("tiny".into())
        );
    }

    /// Security review finding 7: any boot-LAN host could use up another
    /// machine's one-shot assignment and write into its timeline, because
    /// the address-to-MAC mapping trusted the MAC in the script's URL.
    #[test]
    fn a_host_cannot_act_for_another_machine() {
        let s = setup(INVENTORY);
        let victim = Mac::parse("52:54:00:00:00:02").unwrap();
        let attacker_mac = Mac::parse("02:00:00:00:00:99").unwrap();
        let attacker: IpAddr = "10.0.0.66".parse().unwrap();
        let victim_ip: IpAddr = "10.0.0.50".parse().unwrap();

        // With a lease: the address is the attacker's, whatever its URL says.
        s.router.note_lease(attacker, attacker_mac);
        let stolen = s.router.machine_script(victim, &[], "http://h", attacker);
        assert_eq!(
            stolen.decision,
            Decision::Assigned("tiny".into()),
            "scripts are public"
        );
        assert!(!s.router.may_speak_for(attacker, victim));
        assert_eq!(s.router.machine_at(attacker), Some(attacker_mac));
        s.router
            .file_served(&served("tiny/k", attacker, 100, 200, true));
        assert!(
            s.router.events.recent(Some(victim), 10).is_empty(),
            "no event on its timeline"
        );

        // Without a lease (ProxyDHCP): the address that first asked for the
        // script is the one whose kernel fetch uses the assignment up.
        let _ = s.router.machine_script(victim, &[], "http://h", victim_ip);
        let proxy_attacker: IpAddr = "10.0.0.67".parse().unwrap();
        let _ = s
            .router
            .machine_script(victim, &[], "http://h", proxy_attacker);
        s.router
            .file_served(&served("tiny/k", proxy_attacker, 100, 200, true));
        assert_eq!(
            s.router
                .machine_script(victim, &[], "http://h", victim_ip)
                .decision,
            Decision::Assigned("tiny".into()),
            "still armed after another address fetched the kernel"
        );
        s.router
            .file_served(&served("tiny/k", victim_ip, 100, 200, true));
        assert!(matches!(
            s.router
                .machine_script(victim, &[], "http://h", victim_ip)
                .decision,
            Decision::Local(_)
        ));
    }

    /// Security review finding 5: script requests for made-up MACs added
    /// one discovered machine each, without limit. One address introduces
    /// at most a burst of new unknown MACs, then one a second; another
    /// address, or a listed machine, is not held back.
    #[test]
    fn one_address_cannot_make_up_machines_without_limit() {
        let s = setup(INVENTORY);
        let flooder: IpAddr = "10.0.0.90".parse().unwrap();
        for n in 0..500u32 {
            let mac = Mac([2, 0, 0, (n >> 16) as u8, (n >> 8) as u8, n as u8]);
            let _ = s.router.machine_script(mac, &[], "http://h", flooder);
        }
        let remembered = s.router.seen_machines(true).len();
        assert_eq!(
            remembered,
            super::super::seen::NEW_MACS_BURST as usize,
            "the burst, not 500"
        );
        let other: IpAddr = "10.0.0.91".parse().unwrap();
        let _ = s
            .router
            .machine_script(Mac([2, 9, 9, 9, 9, 9]), &[], "http://h", other);
        assert!(s.router.seen_machine(Mac([2, 9, 9, 9, 9, 9])).is_some());
        let _ = s.router.machine_script(MAC, &[], "http://h", flooder);
        assert!(
            s.router.seen_machine(MAC).is_some(),
            "listed machines are not limited"
        );
    }

    #[test]
    fn a_decision_is_described_as_it_displays() {
        for decision in [
            Decision::Static(PathBuf::from("/srv/boot/52:54:00:12:34:56.ipxe")),
            Decision::Assigned("debian-12".into()),
            Decision::MenuChoice("debian-12".into()),
            Decision::Unknown(UnknownPolicy::Wait),
            Decision::Local("marked do-not-netboot in the inventory"),
        ] {
            assert_eq!(decision.describe(), decision.to_string());
        }
        assert_eq!(
            Decision::Assigned("debian-12".into()).describe(),
            "image debian-12"
        );
    }

    #[test]
    fn do_not_netboot_and_unknown_policies() {
        let s = setup(INVENTORY);
        let blocked = Mac::parse("52:54:00:00:00:03").unwrap();
        assert!(matches!(
            s.router
                .machine_script(blocked, &[], "http://h", client())
                .decision,
            Decision::Local(_)
        ));

        let stranger = Mac([2, 0, 0, 0, 0, 9]);
        let facts = vec![
            ("serial".to_string(), "SN 1".to_string()),
            ("junk".to_string(), "x".to_string()),
        ];
        let menu = s
            .router
            .machine_script(stranger, &facts, "http://h", client());
        assert_eq!(menu.decision, Decision::Unknown(UnknownPolicy::Menu));
        assert!(text(&menu).contains("item debian debian\n"));
        let seen = s.router.seen_machines(true);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].mac, stranger);
        assert_eq!(
            seen[0].facts.get("serial").map(String::as_str),
            Some("SN 1")
        );
        assert!(!seen[0].facts.contains_key("junk"));

        let chosen = vec![("image".to_string(), "tiny".to_string())];
        assert_eq!(
            s.router
                .machine_script(stranger, &chosen, "http://h", client())
                .decision,
            Decision::MenuChoice("tiny".into())
        );

        for (policy, needle) in [("wait", "sleep 7\nchain --replace --autofree http://h/boot/02:00:00:00:00:09.ipxe?serial=SN%201\n"), ("local", "exit\n")] {
            let root = s.root.path().canonicalize().unwrap();
            std::fs::write(
                root.join(inventory::FILE_NAME),
                format!("[unknown]\npolicy = \"{policy}\"\npoll_seconds = 7\n{INVENTORY}"),
            )
            .unwrap();
            s.router.reload().unwrap();
            let script = s.router.machine_script(stranger, &facts, "http://h", client());
            assert!(text(&script).contains(needle), "{policy}: {}", text(&script));
        }
    }

    #[test]
    fn static_scripts_take_precedence() {
        let s = setup(INVENTORY);
        let root = s.root.path().canonicalize().unwrap();
        std::fs::write(
            root.join("52:54:00:12:34:56.gpxe"),
            "#!gpxe\nkernel old\nboot\n",
        )
        .unwrap();
        let script = s.router.machine_script(MAC, &[], "http://h", client());
        assert!(matches!(script.decision, Decision::Static(_)));
        assert_eq!(text(&script), "#!gpxe\nkernel old\nboot\n");
    }

    #[test]
    fn a_broken_file_keeps_the_last_good_snapshot() {
        let s = setup(INVENTORY);
        let root = s.root.path().canonicalize().unwrap();
        std::fs::write(root.join(inventory::FILE_NAME), "[images.x\n").unwrap();
        assert!(s.router.reload_if_changed(false).is_err());
        s.router.refresh(false);
        assert_eq!(s.router.snapshot().generation, 1);
        assert_eq!(
            s.router
                .machine_script(MAC, &[], "http://h", client())
                .decision,
            Decision::Assigned("debian".into())
        );
        // Fixed: picked up.
        std::fs::write(
            root.join(inventory::FILE_NAME),
            INVENTORY.replace("node=1", "node=one"),
        )
        .unwrap();
        s.router.refresh(false);
        assert_eq!(s.router.snapshot().generation, 2);
        assert!(
            text(&s.router.machine_script(MAC, &[], "http://h", client())).contains("node=one")
        );
    }

    #[test]
    fn every_boot_config_carries_a_fresh_check_in_token_in_all_three_formats() {
        use super::super::checkin::{Checkin, CheckinUrl};
        let s = setup(INVENTORY);
        let key = crate::seal::SealKey::load_or_create(&s.state.path().join("k")).unwrap();
        let checkin = Checkin::new(key, CheckinUrl::Fixed("http://10.0.0.1:9090".into()));
        s.router.set_checkin(Some(checkin.clone()));
        let token_in = |body: &str| -> String {
            let start = body.find("bootfleet.token=").expect(body) + "bootfleet.token=".len();
            body[start..]
                .split(|c: char| c.is_whitespace() || c == ';')
                .next()
                .unwrap()
                .to_string()
        };
        let mut tokens = Vec::new();
        for _ in 0..2 {
            let script = s
                .router
                .machine_script(MAC, &[], "http://10.0.0.1:8080", client());
            let body = text(&script);
            assert!(body.contains(&format!(
                "console=ttyS0 node=1 bootfleet.checkin=http://10.0.0.1:9090/api/v1/checkin bootfleet.mac={MAC} bootfleet.token="
            )), "{body}");
            tokens.push(token_in(&body));
            std::thread::sleep(Duration::from_millis(2));
        }
        for name in [
            "pxelinux.cfg/01-52-54-00-12-34-56",
            "grub/grub.cfg-01-52-54-00-12-34-56",
        ] {
            let body = String::from_utf8(s.router.loader_config(name, None).unwrap().1).unwrap();
            assert!(
                body.contains("bootfleet.checkin=http://10.0.0.1:9090/api/v1/checkin"),
                "{body}"
            );
            tokens.push(token_in(&body));
            std::thread::sleep(Duration::from_millis(2));
        }
        let now = crate::boot::events::now_ms();
        for token in &tokens {
            checkin.verify(MAC, token, now).unwrap();
        }
        tokens.sort();
        tokens.dedup();
        assert_eq!(tokens.len(), 4, "a token per config served");
        // Without a check-in, none.
        s.router.set_checkin(None);
        let body = text(
            &s.router
                .machine_script(MAC, &[], "http://10.0.0.1:8080", client()),
        );
        assert!(!body.contains("bootfleet."), "{body}");
    }

    #[test]
    fn pxelinux_and_grub_configs_by_mac_and_ip() {
        let s = setup(INVENTORY);
        let by_mac = String::from_utf8(
            s.router
                .loader_config("pxelinux.cfg/01-52-54-00-12-34-56", None)
                .unwrap()
                .1,
        )
        .unwrap();
        assert!(by_mac.contains("KERNEL /debian/vmlinuz"), "{by_mac}");
        assert!(by_mac.contains("APPEND console=ttyS0 node=1"), "{by_mac}");
        let by_ip = s
            .router
            .loader_config("bios/pxelinux.cfg/0A00000B", None)
            .unwrap()
            .1;
        assert_eq!(String::from_utf8(by_ip).unwrap(), by_mac);
        let grub = String::from_utf8(
            s.router
                .loader_config("grub/grub.cfg-01-52-54-00-12-34-56", None)
                .unwrap()
                .1,
        )
        .unwrap();
        assert!(
            grub.contains("linux /debian/vmlinuz console=ttyS0 node=1"),
            "{grub}"
        );
        assert!(s
            .router
            .loader_config("pxelinux.cfg/default", None)
            .is_none());
        assert!(s.router.loader_config("pxelinux.cfg/0A00", None).is_none());
        assert!(s
            .router
            .loader_config("pxelinux.cfg/01-02-00-00-00-00-09", None)
            .is_none());
        let blocked = String::from_utf8(
            s.router
                .loader_config("pxelinux.cfg/01-52-54-00-00-00-03", None)
                .unwrap()
                .1,
        )
        .unwrap();
        assert!(blocked.contains("LOCALBOOT 0"), "{blocked}");
        // The operator's file wins.
        let root = s.root.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("pxelinux.cfg")).unwrap();
        std::fs::write(
            root.join("pxelinux.cfg/01-52-54-00-12-34-56"),
            "DEFAULT mine\n",
        )
        .unwrap();
        assert!(s
            .router
            .loader_config("pxelinux.cfg/01-52-54-00-12-34-56", None)
            .is_none());
    }

    #[test]
    fn grub_reads_one_config_that_loads_each_machines_own_and_says_when_its_kernel_is_refused() {
        let s = setup(INVENTORY);
        let peer = SocketAddr::new(client(), 1024);
        // Debian's signed GRUB reads only $prefix/grub.cfg.
        assert!(s.router.may_block("grub/grub.cfg"));
        let dispatch =
            String::from_utf8(s.router.generate("grub/grub.cfg", peer).unwrap()).unwrap();
        assert!(
            dispatch.contains("\nconfigfile /grub/grub.cfg-01-${net_default_mac}\n"),
            "{dispatch}"
        );
        // GRUB spells the MAC with colons.
        let by_colons = s
            .router
            .generate("grub/grub.cfg-01-52:54:00:12:34:56", peer)
            .unwrap();
        let by_dashes = s
            .router
            .loader_config("grub/grub.cfg-01-52-54-00-12-34-56", None)
            .unwrap()
            .1;
        let without_token = |body: Vec<u8>| {
            String::from_utf8(body)
                .unwrap()
                .lines()
                .map(|line| line.split(" bootfleet.").next().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(without_token(by_colons.clone()), without_token(by_dashes));
        let config = String::from_utf8(by_colons).unwrap();
        assert!(
            config.contains("configfile $prefix/grub.cfg-refused-01-52:54:00:12:34:56\n"),
            "{config}"
        );
        // A refused kernel is a failed kernel phase on the timeline.
        let refused = String::from_utf8(
            s.router
                .generate("grub/grub.cfg-refused-01-52:54:00:12:34:56", peer)
                .unwrap(),
        )
        .unwrap();
        assert!(refused.contains("\nexit\n"), "{refused}");
        let event = s.router.events.recent(Some(MAC), 1).pop().unwrap();
        assert_eq!((event.phase, event.status), (Phase::Kernel, 403));
        assert!(
            event
                .detail
                .starts_with("debian/vmlinuz refused by the Secure Boot chain"),
            "{}",
            event.detail
        );
        assert!(s
            .router
            .generate("grub/grub.cfg-refused-01-nonsense", peer)
            .is_none());
        // A panel on every address: the check-in URL names the address
        // this server's DHCP answered the machine from.
        let key = crate::seal::SealKey::load_or_create(&s.state.path().join("k")).unwrap();
        let checkin = super::super::checkin::Checkin::new(
            key,
            super::super::checkin::CheckinUrl::SameHost {
                scheme: "http",
                port: 9090,
            },
        );
        s.router.set_checkin(Some(checkin));
        let config = String::from_utf8(
            s.router
                .generate("grub/grub.cfg-01-52:54:00:12:34:56", peer)
                .unwrap(),
        )
        .unwrap();
        assert!(
            !config.contains("bootfleet.checkin"),
            "no address known, no check-in: {config}"
        );
        s.router
            .note_answered_from(client(), "10.0.0.1".parse().unwrap());
        let config = String::from_utf8(
            s.router
                .generate("grub/grub.cfg-01-52:54:00:12:34:56", peer)
                .unwrap(),
        )
        .unwrap();
        assert!(
            config.contains(&format!("bootfleet.checkin=http://10.0.0.1:9090/api/v1/checkin bootfleet.mac={MAC} bootfleet.token=")),
            "{config}"
        );
        // The operator's own grub.cfg wins.
        let root = s.root.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("grub")).unwrap();
        std::fs::write(root.join("grub/grub.cfg"), "set timeout=5\n").unwrap();
        assert!(s.router.generate("grub/grub.cfg", peer).is_none());
    }
}
