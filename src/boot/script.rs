//! iPXE scripts that do not depend on the inventory.
//!
//! * [`chain_script`] — `/boot.ipxe`, what every machine's iPXE fetches
//!   first: it chains to `/boot/${net0/mac}.ipxe`, carrying the machine's
//!   facts (UUID, manufacturer, product, serial, asset tag, build
//!   architecture, platform) as URI-escaped query parameters, so that the
//!   router can record an unknown machine with them.
//! * [`find_static_script`] — the operators' existing layout, one script per
//!   machine in the boot directory, named after its MAC address
//!   (`52:54:00:12:34:56.ipxe` or `.gpxe`, as in the classic "boot by MAC
//!   address" write-up); such a file takes precedence over the inventory.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use nix::sys::inotify::{InitFlags, Inotify, WatchDescriptor};

use crate::proto::Mac;

/// The facts the chain script passes on: (query parameter, iPXE setting).
pub const FACTS: [(&str, &str); 7] = [
    ("uuid", "uuid"),
    ("manufacturer", "manufacturer"),
    ("product", "product"),
    ("serial", "serial"),
    ("asset", "asset"),
    ("buildarch", "buildarch"),
    ("platform", "platform"),
];

/// `/boot.ipxe` for a server reachable at `base_url` (e.g.
/// `http://192.168.1.1:8080`, no trailing slash).
///
/// Each fact is added by its own `isset … && set …` line rather than
/// written into the URL at once: older iPXE builds (Debian's 2019 one among
/// them) cut a whole command line short at a typed expansion of an unset
/// setting (`${uuid:uristring}` on a machine without an SMBIOS UUID), and
/// format `${uuid:uristring}` as raw bytes. The UUID is therefore expanded
/// as `${uuid}` (its own text form: hex digits and dashes) and every string
/// fact as `:uristring` (also in its `isset` test, where a space would
/// make two arguments); a fact that is not set is left out.
pub fn chain_script(base_url: &str) -> String {
    let mut script = String::from(
        "#!ipxe\n# bootfleet: fetch this machine's own script, chosen by its MAC address\nset bootfleet-facts from=ipxe\n",
    );
    for (name, setting) in FACTS {
        let expansion = if setting == "uuid" {
            format!("${{{setting}}}")
        } else {
            format!("${{{setting}:uristring}}")
        };
        script.push_str(&format!(
            "isset {expansion} && set bootfleet-facts ${{bootfleet-facts}}&{name}={expansion} ||\n"
        ));
    }
    script.push_str(&format!(
        "chain --autofree {}/boot/${{net0/mac}}.ipxe?${{bootfleet-facts}}\n",
        base_url.trim_end_matches('/')
    ));
    script
}

/// The script `bootfleet ipxe build` embeds into iPXE for the write-up's
/// methods 2 (iPXE in the NIC's option ROM) and 4 (an `undionly.kpxe`
/// chainloaded from PXE): get an address, then fetch this machine's own
/// script, `BASE/boot/${netX/mac}.ipxe`, from each base URL in turn (the
/// first is the server, the others its fallbacks; `${next-server}` in a
/// base is whichever server answered DHCP). It announces itself with the
/// user class [`crate::proto::dhcp::OWN_SCRIPT_USER_CLASS`], so bootfleet
/// answers it no boot file (an iPXE ROM chainloading it would otherwise be
/// told to load it again). A diskless machine has nothing better to do
/// than to try again, so it does, every 10 s, until one server answers;
/// a script that returns (a machine told to boot locally) ends it.
///
/// `netX` is the interface `dhcp` configured, which need not be `net0` on
/// a machine with several NICs.
pub fn embedded_script(bases: &[String]) -> Result<String, EmbeddedScriptError> {
    if bases.is_empty() {
        return Err(EmbeddedScriptError::NoServer);
    }
    let mut script = format!(
        "#!ipxe\n# bootfleet: embedded by `bootfleet ipxe build`; fetches this machine's own script\n\
         set user-class {}\n:start\ndhcp || goto no_address\n",
        crate::proto::dhcp::OWN_SCRIPT_USER_CLASS
    );
    for base in bases {
        let valid_scheme = base.starts_with("http://") || base.starts_with("https://");
        if !valid_scheme || base.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(EmbeddedScriptError::BadBase(base.clone()));
        }
        script.push_str(&format!(
            "chain --autofree {}/boot/${{netX/mac}}.ipxe && goto done ||\n",
            base.trim_end_matches('/')
        ));
    }
    script.push_str(
        "echo bootfleet: no boot server answered for ${netX/mac}; trying again in 10 s\n\
         sleep 10\ngoto start\n\
         :no_address\necho bootfleet: no DHCP answer; trying again in 10 s\nsleep 10\ngoto start\n\
         :done\n",
    );
    Ok(script)
}

/// Why no embedded script could be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmbeddedScriptError {
    #[error("no server URL for the embedded script: name one (http://ADDRESS[:PORT])")]
    NoServer,
    #[error(
        "{0:?} is not a server URL for the embedded script: it must start with http:// or \
         https:// and hold no spaces or control characters"
    )]
    BadBase(String),
}

/// A per-machine script an operator placed in the boot directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticScript {
    pub path: PathBuf,
    pub body: Vec<u8>,
}

/// The operator's own script for `mac` in `dir`, if there is one: the names
/// iPXE's `${net0/mac}` produces (`52:54:00:12:34:56`), then upper case, then
/// hyphens, each as `.ipxe` before `.gpxe`. Only files that start with
/// `#!ipxe` or `#!gpxe` count (iPXE would not run anything else as a
/// script); others are skipped with a warning so the inventory decides.
pub fn find_static_script(dir: &Path, mac: Mac) -> Option<StaticScript> {
    let colon = mac.to_string();
    let spellings = [colon.clone(), colon.to_uppercase(), mac.hyphenated()];
    for spelling in &spellings {
        for extension in ["ipxe", "gpxe"] {
            let path = dir.join(format!("{spelling}.{extension}"));
            let Ok(mut file) = std::fs::File::open(&path) else {
                continue;
            };
            if !file.metadata().is_ok_and(|m| m.is_file()) {
                continue;
            }
            let mut body = Vec::new();
            // Scripts are small; a megabyte is far beyond any real one.
            if file.by_ref().take(1 << 20).read_to_end(&mut body).is_err() {
                continue;
            }
            if body.starts_with(b"#!ipxe") || body.starts_with(b"#!gpxe") {
                return Some(StaticScript { path, body });
            }
            tracing::warn!(file = %path.display(), "per-MAC script skipped: it does not start with #!ipxe or #!gpxe");
        }
    }
    None
}

/// The kernels and initrds named by the operator's per-MAC scripts served
/// so far ([`files_fetched_by`]), so that their fetches are boot events
/// like any image's. A flag spares every other file served the lock while
/// no script named any.
#[derive(Default)]
pub struct FilesNamedByScripts {
    files: std::sync::Mutex<std::collections::HashMap<String, crate::inventory::FileRole>>,
    any: std::sync::atomic::AtomicBool,
}

impl FilesNamedByScripts {
    /// Notes the files `script` fetches.
    pub fn note(&self, script: &[u8]) {
        let named = files_fetched_by(script);
        if named.is_empty() {
            return;
        }
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(named);
        self.any.store(true, std::sync::atomic::Ordering::Release);
    }

    /// What `path` (relative to the boot directory) is to the scripts that
    /// named it.
    pub fn role(&self, path: &str) -> Option<crate::inventory::FileRole> {
        if !self.any.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files.get(path).copied()
    }
}

/// The kernels and initrds an operator's own iPXE script fetches, as paths
/// relative to the boot directory: `kernel`, `chain`, `imgexec` and
/// `boot` name kernels; `initrd`, `module` and `imgfetch` initrds. A URL's
/// scheme and host are dropped (`http://${next-server}/vmlinuz` is
/// `vmlinuz`); options (`--name x`) and arguments after the file are
/// skipped; a path that still holds a variable cannot be known and is left
/// out. So the fetches of a machine booted by the classic per-MAC
/// `.ipxe`/`.gpxe` layout become boot events like any image's.
pub fn files_fetched_by(script: &[u8]) -> Vec<(String, crate::inventory::FileRole)> {
    use crate::inventory::FileRole;
    let text = String::from_utf8_lossy(script);
    let mut files = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let role = match words.next() {
            Some("kernel" | "chain" | "imgexec" | "boot") => FileRole::Kernel,
            Some("initrd" | "module" | "imgfetch") => FileRole::Initrd,
            _ => continue,
        };
        // iPXE's image options: `--name`/`-n` and `--timeout`/`-t` take a
        // value (unless written `--name=x`); the others are flags.
        let mut target = None;
        while let Some(word) = words.next() {
            if matches!(word, "--name" | "-n" | "--timeout" | "-t") {
                words.next();
            } else if !word.starts_with('-') {
                target = Some(word);
                break;
            }
        }
        let Some(target) = target else {
            continue;
        };
        let path = match target.split_once("://") {
            Some((_, rest)) => rest.split_once('/').map_or("", |(_, path)| path),
            None => target,
        };
        let path = path
            .split(['?', '#'])
            .next()
            .unwrap_or("")
            .trim_start_matches('/');
        if !path.is_empty() && !path.contains("${") {
            files.push((path.to_string(), role));
        }
    }
    files
}

/// [`find_static_script`] for a directory that is asked about thousands of
/// times a second: it keeps the MAC addresses that the directory's
/// `.ipxe`/`.gpxe` files are named after and lists the directory again only
/// when its names change, so a machine without a script of its own costs a
/// set lookup instead of six failed `open`s.
///
/// Changes are learnt from inotify, read by a thread of the watch's own
/// that counts them: a request compares that count with the one its
/// listing was made at, an atomic load instead of a system call (reading
/// the watch without blocking on every request cost a twentieth of a
/// script answer under a storm). A script the operator has just written is
/// found as soon as that thread has woken, microseconds after the write.
/// A directory swapped under its path (a symlink repointed, the directory
/// renamed and another put in its place) is noticed by
/// [`StaticScripts::check_watched_directory`], which the inventory watcher
/// calls every quarter second. Where inotify cannot be had (no instances
/// left), the directory's modification time is checked on every request
/// instead; a listing made within a second of that time is not trusted (a
/// file created in the same timestamp tick would not change it again), so
/// the next request lists again.
pub struct StaticScripts {
    dir: PathBuf,
    listing: std::sync::Mutex<Listing>,
}

#[derive(Default)]
struct Listing {
    /// How changes are learnt; `None` until the first request.
    freshness: Option<Freshness>,
    /// The listing must be made again before it is used.
    stale: bool,
    /// The MACs the directory's `.ipxe`/`.gpxe` names spell, in any
    /// spelling [`Mac::parse`] reads: a superset of what
    /// [`find_static_script`] opens, so a hit is then confirmed on disk.
    macs: std::collections::HashSet<Mac>,
}

enum Freshness {
    /// An inotify watch on the directory.
    Watched(DirectoryWatch),
    /// The directory's modification time when last listed, and whether
    /// that listing can be trusted (see [`StaticScripts`]).
    Polled {
        mtime: Option<std::time::SystemTime>,
        trusted: bool,
    },
}

impl Freshness {
    fn polled() -> Self {
        Freshness::Polled {
            mtime: None,
            trusted: false,
        }
    }
}

/// Name changes in the directory, and the directory itself going away.
fn watched_events() -> nix::sys::inotify::AddWatchFlags {
    use nix::sys::inotify::AddWatchFlags as F;
    F::IN_CREATE
        | F::IN_DELETE
        | F::IN_MOVED_FROM
        | F::IN_MOVED_TO
        | F::IN_DELETE_SELF
        | F::IN_MOVE_SELF
        | F::IN_ONLYDIR
}

fn dir_identity(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

/// An inotify watch on the script directory, read by a thread that counts
/// what it sees, so that requests learn of changes without a system call.
struct DirectoryWatch {
    inotify: Arc<Inotify>,
    descriptor: WatchDescriptor,
    /// The identity (device, inode) of the directory the watch was set on.
    identity: (u64, u64),
    news: Arc<WatchNews>,
    /// `news.changes` when the listing was last made.
    listed_at: u64,
}

/// What the watch thread has seen.
#[derive(Default)]
struct WatchNews {
    /// Batches of name changes read so far.
    changes: AtomicU64,
    /// The watched directory was removed or renamed (or the watch taken
    /// off): the watch is over and its thread has ended.
    ended: AtomicBool,
}

impl Drop for DirectoryWatch {
    fn drop(&mut self) {
        // Taking the watch off queues IN_IGNORED, which wakes the thread
        // and ends it; the descriptor closes with the thread's reference.
        // A watch that ended by itself is gone already (EINVAL, ignored).
        let _ = self.inotify.rm_watch(self.descriptor);
    }
}

/// A watch on `dir`, or `None` where inotify (or a thread for it) is not
/// available or the directory is missing. The identity is taken before the
/// watch is set, so a directory swapped in between shows as a change at
/// the next check.
fn watch(dir: &Path) -> Option<Freshness> {
    let identity = dir_identity(dir)?;
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC)
        .map_err(|error| {
            tracing::debug!(%error, "no inotify for the per-MAC script directory; its time is checked per request")
        })
        .ok()?;
    let descriptor = inotify.add_watch(dir, watched_events()).ok()?;
    let inotify = Arc::new(inotify);
    let news = Arc::new(WatchNews::default());
    let (thread_inotify, thread_news) = (Arc::clone(&inotify), Arc::clone(&news));
    let spawned = std::thread::Builder::new()
        .name("bootfleet-scripts-watch".into())
        .stack_size(64 * 1024)
        .spawn(move || follow_watch(&thread_inotify, &thread_news));
    if let Err(error) = spawned {
        tracing::warn!(%error, "no thread for the per-MAC script directory's watch; its time is checked per request");
        return None;
    }
    Some(Freshness::Watched(DirectoryWatch {
        inotify,
        descriptor,
        identity,
        news,
        listed_at: 0,
    }))
}

/// The watch thread: blocks on the watch and counts each batch of events,
/// until the watch ends.
fn follow_watch(inotify: &Inotify, news: &WatchNews) {
    use nix::sys::inotify::AddWatchFlags as F;
    loop {
        match inotify.read_events() {
            Ok(events) => {
                let ended = events.iter().any(|e| {
                    e.mask
                        .intersects(F::IN_IGNORED | F::IN_DELETE_SELF | F::IN_MOVE_SELF)
                });
                if ended {
                    news.ended.store(true, Ordering::Release);
                    return;
                }
                news.changes.fetch_add(1, Ordering::Release);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(error) => {
                tracing::debug!(%error, "the per-MAC script directory's watch failed; it is set up again");
                news.ended.store(true, Ordering::Release);
                return;
            }
        }
    }
}

impl StaticScripts {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            listing: std::sync::Mutex::new(Listing::default()),
        }
    }

    /// The operator's script for `mac`, as [`find_static_script`] finds it.
    pub fn find(&self, mac: Mac) -> Option<StaticScript> {
        let any_candidate = {
            let mut listing = self.listing.lock().unwrap_or_else(|p| p.into_inner());
            let Listing {
                freshness, stale, ..
            } = &mut *listing;
            let freshness = freshness.get_or_insert_with(|| {
                *stale = true;
                watch(&self.dir).unwrap_or_else(Freshness::polled)
            });
            match freshness {
                Freshness::Watched(watch) => {
                    if watch.news.ended.load(Ordering::Acquire) {
                        // Set up again at once: the directory may already
                        // be back under its path.
                        *freshness = self::watch(&self.dir).unwrap_or_else(Freshness::polled);
                        *stale = true;
                    } else {
                        // Read before the listing is made: a change during
                        // it is then seen by the next request.
                        let changes = watch.news.changes.load(Ordering::Acquire);
                        if changes != watch.listed_at {
                            watch.listed_at = changes;
                            *stale = true;
                        }
                    }
                }
                Freshness::Polled { mtime, trusted } => {
                    let now_mtime = std::fs::metadata(&self.dir).and_then(|m| m.modified()).ok();
                    if !*trusted || *mtime != now_mtime {
                        let now = std::time::SystemTime::now();
                        *mtime = now_mtime;
                        *trusted = now_mtime.is_some_and(|m| {
                            now.duration_since(m)
                                .is_ok_and(|age| age > std::time::Duration::from_secs(1))
                        });
                        *stale = true;
                    }
                }
            }
            if listing.stale {
                listing.macs = list_script_macs(&self.dir);
                listing.stale = false;
            }
            listing.macs.contains(&mac)
        };
        if any_candidate {
            find_static_script(&self.dir, mac)
        } else {
            None
        }
    }

    /// Whether [`Self::find`] is sure to find no script for `mac` without
    /// a system call: the directory is watched, its listing is current and
    /// does not name `mac`. When this is false, `find` may list the
    /// directory or read a script, so a thread that must not block asks a
    /// thread that may.
    pub fn known_absent(&self, mac: Mac) -> bool {
        let listing = self.listing.lock().unwrap_or_else(|p| p.into_inner());
        let Some(Freshness::Watched(watch)) = &listing.freshness else {
            return false;
        };
        !listing.stale
            && !watch.news.ended.load(Ordering::Acquire)
            && watch.news.changes.load(Ordering::Acquire) == watch.listed_at
            && !listing.macs.contains(&mac)
    }

    /// Notices a directory swapped under the path (a symlink repointed, or
    /// another directory renamed into its place), which the watch on the
    /// old directory cannot see, and watches the new one. Where inotify was
    /// not available, tries it again.
    pub fn check_watched_directory(&self) {
        let mut listing = self.listing.lock().unwrap_or_else(|p| p.into_inner());
        let swapped = match &listing.freshness {
            Some(Freshness::Watched(watch)) => dir_identity(&self.dir) != Some(watch.identity),
            Some(Freshness::Polled { .. }) => true,
            None => false, // not asked yet
        };
        if swapped {
            if let Some(watched) = watch(&self.dir) {
                listing.freshness = Some(watched);
                listing.stale = true;
            }
        }
    }
}

/// The MACs spelt by the `.ipxe`/`.gpxe` names in `dir`.
fn list_script_macs(dir: &Path) -> std::collections::HashSet<Mac> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter_map(|name| {
                    let stem = name
                        .strip_suffix(".ipxe")
                        .or_else(|| name.strip_suffix(".gpxe"))?;
                    Mac::parse(stem).ok()
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_script_announces_itself_and_tries_each_server_in_turn() {
        let script = embedded_script(&[
            "http://${next-server}:8080/".to_string(),
            "http://10.0.0.2".to_string(),
        ])
        .unwrap();
        assert!(script.starts_with("#!ipxe\n"));
        assert!(script.contains("\nset user-class bootfleet-embedded\n"));
        let chains: Vec<&str> = script.lines().filter(|l| l.starts_with("chain ")).collect();
        assert_eq!(
            chains,
            [
                "chain --autofree http://${next-server}:8080/boot/${netX/mac}.ipxe && goto done ||",
                "chain --autofree http://10.0.0.2/boot/${netX/mac}.ipxe && goto done ||",
            ]
        );
        // Every goto lands on a label the script has.
        for target in script.lines().filter_map(|l| l.split("goto ").nth(1)) {
            let label = target.split_whitespace().next().unwrap();
            assert!(script.contains(&format!("\n:{label}\n")), "{label}");
        }
        assert_eq!(embedded_script(&[]), Err(EmbeddedScriptError::NoServer));
        for bad in [
            "10.0.0.1",
            "http://a b",
            "http://a\nchain http://evil",
            "tftp://x",
        ] {
            assert!(
                matches!(
                    embedded_script(&[bad.to_string()]),
                    Err(EmbeddedScriptError::BadBase(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn an_operators_script_names_its_kernel_and_initrds() {
        use crate::inventory::FileRole;
        let script = b"#!ipxe\n\
            kernel http://${next-server}/debian/vmlinuz console=ttyS0 initrd=initrd.img\n\
            initrd --name initrd.img /debian/initrd.img\n\
            module tftp://10.0.0.1/extra.cpio?x=1\n\
            initrd http://${next-server}/${hostname}/overlay.img\n\
            echo kernel is not a command here\n\
            boot\n";
        assert_eq!(
            files_fetched_by(script),
            [
                ("debian/vmlinuz".to_string(), FileRole::Kernel),
                ("debian/initrd.img".to_string(), FileRole::Initrd),
                ("extra.cpio".to_string(), FileRole::Initrd),
            ]
        );
    }

    const MAC: Mac = Mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

    #[test]
    fn chain_script_carries_every_fact_that_is_set() {
        let script = chain_script("http://10.0.0.1:8080/");
        assert!(script.starts_with("#!ipxe\n"));
        assert!(script.ends_with(
            "chain --autofree http://10.0.0.1:8080/boot/${net0/mac}.ipxe?${bootfleet-facts}\n"
        ));
        for (name, setting) in FACTS {
            let expansion = if setting == "uuid" {
                "${uuid}".to_string()
            } else {
                format!("${{{setting}:uristring}}")
            };
            let line = format!(
                "isset {expansion} && set bootfleet-facts ${{bootfleet-facts}}&{name}={expansion} ||"
            );
            assert!(script.lines().any(|l| l == line), "{line}\n{script}");
        }
    }

    #[test]
    fn static_scripts_in_the_classic_layout() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(find_static_script(dir.path(), MAC), None);

        std::fs::write(
            dir.path().join("52:54:00:12:34:56.gpxe"),
            b"#!gpxe\nkernel k\nboot\n",
        )
        .unwrap();
        let found = find_static_script(dir.path(), MAC).unwrap();
        assert!(found.path.ends_with("52:54:00:12:34:56.gpxe"));
        assert_eq!(found.body, b"#!gpxe\nkernel k\nboot\n");

        // .ipxe wins over .gpxe.
        std::fs::write(dir.path().join("52:54:00:12:34:56.ipxe"), b"#!ipxe\nexit\n").unwrap();
        assert!(find_static_script(dir.path(), MAC)
            .unwrap()
            .path
            .ends_with("52:54:00:12:34:56.ipxe"));

        // Upper case and hyphens are found too.
        let other = Mac([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]);
        std::fs::write(dir.path().join("AA:BB:CC:DD:EE:FF.ipxe"), b"#!ipxe\n").unwrap();
        assert!(find_static_script(dir.path(), other).is_some());
        let third = Mac([1, 2, 3, 4, 5, 6]);
        std::fs::write(dir.path().join("01-02-03-04-05-06.gpxe"), b"#!gpxe\n").unwrap();
        assert!(find_static_script(dir.path(), third).is_some());

        // Not a script: skipped; a directory with the name: skipped.
        let fourth = Mac([9, 9, 9, 9, 9, 9]);
        std::fs::write(dir.path().join("09:09:09:09:09:09.ipxe"), b"kernel k\n").unwrap();
        std::fs::create_dir(dir.path().join("09:09:09:09:09:09.gpxe")).unwrap();
        assert_eq!(find_static_script(dir.path(), fourth), None);
    }

    /// The cache as it runs without inotify.
    fn polled(dir: &Path) -> StaticScripts {
        let cached = StaticScripts::new(dir);
        cached.listing.lock().unwrap().freshness = Some(Freshness::polled());
        cached
    }

    #[test]
    fn the_listing_cache_sees_new_and_removed_scripts() {
        for watched in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let cached = if watched {
                StaticScripts::new(dir.path())
            } else {
                polled(dir.path())
            };
            new_and_removed_scripts_are_seen(dir.path(), &cached);
            let listing = cached.listing.lock().unwrap();
            assert_eq!(
                matches!(listing.freshness, Some(Freshness::Watched { .. })),
                watched,
                "this machine has inotify; the cache must use it"
            );
        }
    }

    /// Waits (at most two seconds) for `find` to answer `expected` for
    /// `mac`: the watch thread learns of a change microseconds after it.
    #[track_caller]
    fn assert_finds(cached: &StaticScripts, mac: Mac, expected: Option<&[u8]>) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            let found = cached.find(mac).map(|script| script.body);
            if found.as_deref() == expected || std::time::Instant::now() > deadline {
                assert_eq!(found.as_deref(), expected);
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn new_and_removed_scripts_are_seen(dir: &Path, cached: &StaticScripts) {
        assert_finds(cached, MAC, None);
        std::fs::write(dir.join("52-54-00-12-34-56.IPXE"), b"#!ipxe\n").unwrap();
        assert_eq!(
            cached.find(MAC),
            None,
            "upper-case extension is not a script name iPXE asks for"
        );
        std::fs::write(dir.join("52:54:00:12:34:56.ipxe"), b"#!ipxe\nexit\n").unwrap();
        assert_finds(cached, MAC, Some(b"#!ipxe\nexit\n"));
        std::fs::remove_file(dir.join("52:54:00:12:34:56.ipxe")).unwrap();
        assert_finds(cached, MAC, None);
        // Renamed in and out, as editors and deploy tools write files.
        std::fs::write(dir.join("tmp"), b"#!ipxe\nsanboot\n").unwrap();
        std::fs::rename(dir.join("tmp"), dir.join("52-54-00-12-34-56.ipxe")).unwrap();
        assert_finds(cached, MAC, Some(b"#!ipxe\nsanboot\n"));
        std::fs::rename(dir.join("52-54-00-12-34-56.ipxe"), dir.join("tmp")).unwrap();
        assert_finds(cached, MAC, None);
        // Another machine's script among many lookups of this one.
        for _ in 0..100 {
            assert_finds(cached, MAC, None);
        }
        std::fs::write(dir.join("aa:bb:cc:dd:ee:ff.gpxe"), b"#!gpxe\n").unwrap();
        let other = Mac([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]);
        assert_finds(cached, other, Some(b"#!gpxe\n"));
    }

    #[test]
    fn a_directory_swapped_under_the_path_is_followed() {
        let top = tempfile::tempdir().unwrap();
        let (a, b, boot) = (
            top.path().join("a"),
            top.path().join("b"),
            top.path().join("boot"),
        );
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        std::fs::write(b.join("52:54:00:12:34:56.ipxe"), b"#!ipxe\nfrom b\n").unwrap();
        std::os::unix::fs::symlink(&a, &boot).unwrap();
        let cached = StaticScripts::new(&boot);
        assert_finds(&cached, MAC, None);

        // A symlink repointed (atomically, as deploy tools do): the watch
        // is on the old directory, and the periodic check moves it.
        std::os::unix::fs::symlink(&b, top.path().join("next")).unwrap();
        std::fs::rename(top.path().join("next"), &boot).unwrap();
        cached.check_watched_directory();
        assert_finds(&cached, MAC, Some(b"#!ipxe\nfrom b\n"));
        // Checking again when nothing moved changes nothing.
        cached.check_watched_directory();
        assert!(cached.find(MAC).is_some());

        // The watched directory itself renamed away and another put in its
        // place: seen without the check.
        std::fs::remove_file(&boot).unwrap();
        std::fs::create_dir(&boot).unwrap();
        let cached = StaticScripts::new(&boot);
        assert_finds(&cached, MAC, None);
        std::fs::rename(&boot, top.path().join("old")).unwrap();
        std::fs::rename(&b, &boot).unwrap();
        assert_finds(&cached, MAC, Some(b"#!ipxe\nfrom b\n"));
        // Removed altogether: nothing is found, and nothing fails.
        std::fs::remove_file(boot.join("52:54:00:12:34:56.ipxe")).unwrap();
        std::fs::remove_dir(&boot).unwrap();
        assert_finds(&cached, MAC, None);
        std::fs::create_dir(&boot).unwrap();
        std::fs::write(boot.join("52:54:00:12:34:56.gpxe"), b"#!gpxe\n").unwrap();
        cached.check_watched_directory();
        assert!(
            cached.find(MAC).is_some(),
            "the directory made again is watched"
        );
    }

    #[test]
    fn a_dropped_cache_ends_its_watch_thread_and_closes_the_watch() {
        let dir = tempfile::tempdir().unwrap();
        let cached = StaticScripts::new(dir.path());
        assert_finds(&cached, MAC, None);
        let (news, inotify) = match &cached.listing.lock().unwrap().freshness {
            Some(Freshness::Watched(watch)) => {
                (Arc::clone(&watch.news), Arc::downgrade(&watch.inotify))
            }
            _ => panic!("this machine has inotify; the cache must use it"),
        };
        drop(cached);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while inotify.upgrade().is_some() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(
            inotify.upgrade().is_none(),
            "the watch thread still holds the inotify descriptor"
        );
        assert!(news.ended.load(Ordering::Acquire));
    }
}
