//! Three `bootfleet serve` processes, each in a network namespace of its
//! own on one bridge the test makes (the boot LAN), sharing one
//! PostgreSQL (a cluster of the test's own, listening on the bridge), and
//! 1,000 simulated machines powered on at once by `bootfleet-loadtest
//! storm --dhcp-via broadcast`: real broadcasts that every server hears.
//!
//! First a clean storm: every machine boots, no address went to two
//! machines (in what the clients got and in the shared table), and the
//! boot events of all three servers are in the one database. Then a
//! storm of 1,000 more with one server killed (`kill -9`) a moment in and
//! the database stopped for 10 s: every machine still boots (a machine
//! whose boot broke starts over, as its BMC would power-cycle it, and the
//! others answer), still no address twice, and what happened while the
//! database was away is in it afterwards.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bootfleet::proto::Mac;
use bootfleet::store::postgres::PostgresStore;
use bootfleet::store::shared_leases::SharedLeases;
use bootfleet::store::{ImageRecord, InventoryStore, MachinePatch};

use super::common::{can_make_namespaces, fresh_postgres_database, pattern, run};
use super::postgres::OwnCluster;

/// Machines in the clean storm, and in each storm with a fault.
const CLEAN: u32 = 1_000;
const FAULTED: u32 = 400;
const BRIDGE_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 88, 15, 254);
const RANGE: &str = "10.88.0.10-10.88.15.200";

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args)).unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
}

/// The boot LAN: a bridge with the database's address, and one namespace
/// per server with a veth on it.
struct Lan {
    bridge: String,
    namespaces: Vec<String>,
    /// Neighbour-table limits as they were, restored on drop.
    neighbour_limits: Vec<(PathBuf, String)>,
}

/// A server talks to every machine of its LAN: past the kernel's default
/// 1,024 neighbour entries it drops packets to the rest (docs/scale-out.md
/// says so for real servers). The limits are the host's (namespaces share
/// them), so they are raised for the test and put back after.
fn raise_neighbour_limits() -> Vec<(PathBuf, String)> {
    let mut previous = Vec::new();
    for (key, wanted) in [
        ("gc_thresh1", 4096),
        ("gc_thresh2", 8192),
        ("gc_thresh3", 16384),
    ] {
        let path = PathBuf::from(format!("/proc/sys/net/ipv4/neigh/default/{key}"));
        let now = std::fs::read_to_string(&path).unwrap();
        if now.trim().parse::<u32>().unwrap_or(0) < wanted {
            std::fs::write(&path, wanted.to_string()).unwrap();
            previous.push((path, now));
        }
    }
    previous
}

impl Lan {
    fn new(servers: usize) -> Self {
        let id = std::process::id() % 100_000;
        let lan = Lan {
            bridge: format!("bfsb{id}"),
            namespaces: (0..servers).map(|n| format!("bfso{id}{n}")).collect(),
            neighbour_limits: raise_neighbour_limits(),
        };
        ip(&["link", "add", &lan.bridge, "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("{BRIDGE_ADDRESS}/20"),
            "dev",
            &lan.bridge,
        ]);
        ip(&["link", "set", &lan.bridge, "up"]);
        for (n, namespace) in lan.namespaces.iter().enumerate() {
            let (outer, inner) = (format!("bfso{id}{n}a"), format!("bfso{id}{n}b"));
            ip(&["netns", "add", namespace]);
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ]);
            ip(&["link", "set", &outer, "master", &lan.bridge, "up"]);
            ip(&["link", "set", &inner, "netns", namespace]);
            let inside = |args: &[&str]| {
                let mut all = vec!["netns", "exec", namespace, "ip"];
                all.extend_from_slice(args);
                ip(&all);
            };
            inside(&["link", "set", "lo", "up"]);
            inside(&["link", "set", &inner, "name", "lan0"]);
            inside(&[
                "addr",
                "add",
                &format!("{}/20", Lan::server_address(n)),
                "dev",
                "lan0",
            ]);
            inside(&["link", "set", "lan0", "up"]);
        }
        lan
    }

    fn server_address(n: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 88, 0, 1 + n as u8)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for namespace in &self.namespaces {
            let _ = Command::new("ip")
                .args(["netns", "del", namespace])
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
        for (path, value) in &self.neighbour_limits {
            let _ = std::fs::write(path, value);
        }
    }
}

/// One `bootfleet serve` in its namespace.
struct Server {
    child: Child,
    name: String,
    log: PathBuf,
}

impl Server {
    fn start(lan: &Lan, n: usize, root: &Path, work: &Path, database: &str) -> Self {
        let name = format!("boot-{}", (b'a' + n as u8) as char);
        let address = Lan::server_address(n);
        let config = work.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "root = {root:?}\n\
                 [tftp]\nlisten = \"{address}:69\"\n\
                 [http]\nlisten = \"{address}:80\"\n\
                 [dhcp]\nmode = \"full\"\ninterfaces = [\"lan0\"]\nranges = [\"{RANGE}\"]\nsync_leases = false\n\
                 [inventory]\nstate_dir = {state:?}\n\
                 [panel]\nlisten = \"{address}:9090\"\nserver_name = \"{name}\"\n\
                 [database]\nurl = \"{database}\"\n\
                 [log]\nlevel = \"info\"\n",
                state = work.join(format!("{name}-state")),
            ),
        )
        .unwrap();
        let log = work.join(format!("{name}.log"));
        let child = Command::new("ip")
            .args(["netns", "exec", &lan.namespaces[n]])
            .arg(env!("CARGO_BIN_EXE_bootfleet"))
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Server { child, name, log }
    }

    /// Waits until the server answers a machine's script with the
    /// image's kernel (its snapshot has the database's inventory).
    fn wait_ready(&mut self, lan: &Lan, n: usize) {
        let url = format!(
            "http://{}/boot/02:bf:00:00:00:00.ipxe",
            Lan::server_address(n)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}):\n{}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            let fetched = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &lan.namespaces[n],
                    "curl",
                    "-sf",
                    "--max-time",
                    "2",
                    &url,
                ])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&fetched.stdout).contains("img/vmlinuz") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never served the assigned image:\n{}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The boot directory: loader, kernel and initrd (small: the test is
/// about who answers, not about bandwidth).
fn boot_root(dir: &Path) {
    for (name, size, seed) in [
        ("undionly.kpxe", 70_000, 1),
        ("img/vmlinuz", 300_000, 2),
        ("img/initrd.gz", 600_000, 3),
    ] {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, pattern(size, seed)).unwrap();
    }
    std::fs::write(dir.join("inventory.toml"), "").unwrap();
}

fn loadtest_binary() -> PathBuf {
    let binary = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("bootfleet-loadtest");
    assert!(
        binary.exists(),
        "{} is missing: build the workspace (cargo build --release --workspace)",
        binary.display()
    );
    binary
}

/// Powers on `machines` machines from number `first`; the loadtest's
/// child process (to be waited for with [`finish_storm`]).
fn start_storm(
    lan: &Lan,
    root: &Path,
    work: &Path,
    (first, machines): (u32, u32),
    label: &str,
) -> Child {
    Command::new(loadtest_binary())
        // The addresses are on the bridge and namespaces this test made.
        .env("BOOTFLEET_LOADTEST_NAMESPACE", "1")
        .args(["storm", "--server", &Lan::server_address(0).to_string()])
        .args([
            "--machines",
            &machines.to_string(),
            "--first",
            &first.to_string(),
        ])
        .arg("--root")
        .arg(root)
        .args(["--dhcp-via", "broadcast", "--attach", &lan.bridge])
        .args(["--retries", "10", "--time-limit", "150", "--threads", "2"])
        .args(["--label", label, "--json"])
        .arg(work.join(format!("{label}.json")))
        .stdout(std::fs::File::create(work.join(format!("{label}.out"))).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// The storm's report, after it ends; asserts every machine booted.
fn finish_storm(mut storm: Child, work: &Path, label: &str, machines: u32) -> serde_json::Value {
    let status = storm.wait().unwrap();
    let printed = std::fs::read_to_string(work.join(format!("{label}.out"))).unwrap_or_default();
    assert!(status.success(), "the {label} storm failed: {printed}");
    println!("{label} storm: {printed}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.join(format!("{label}.json"))).unwrap())
            .unwrap();
    assert_eq!(
        report["booted"], machines,
        "every machine of the {label} storm boots: {printed}"
    );
    report
}

/// Address → the machine that was given it; panics on an address given
/// to two machines.
fn addresses_given(reports: &[&serde_json::Value]) -> HashMap<Ipv4Addr, String> {
    let mut holder: HashMap<Ipv4Addr, String> = HashMap::new();
    for report in reports {
        for (mac, addresses) in report["leases"].as_object().expect("leases in the report") {
            for address in addresses.as_array().unwrap() {
                let address: Ipv4Addr = address.as_str().unwrap().parse().unwrap();
                if let Some(other) = holder.insert(address, mac.clone()) {
                    assert_eq!(&other, mac, "{address} was given to {other} and to {mac}");
                }
            }
        }
    }
    holder
}

/// Every address the clients got is, in the shared table, theirs.
fn table_agrees(url: &str, given: &HashMap<Ipv4Addr, String>) -> Result<(), String> {
    let rows: BTreeMap<Ipv4Addr, Mac> = SharedLeases::new(url, "checker")
        .all()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(lease, _)| (lease.ip, lease.mac))
        .collect();
    for (address, mac) in given {
        match rows.get(address) {
            Some(held) if held.to_string() == *mac => {}
            other => return Err(format!("{address}: clients say {mac}, the table {other:?}")),
        }
    }
    Ok(())
}

fn wait_until(what: &str, limit: Duration, mut probe: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + limit;
    loop {
        match probe() {
            Ok(()) => return,
            Err(why) if Instant::now() >= deadline => panic!("never happened: {what}: {why}"),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// Machine number `n` of the storms (`bootfleet-loadtest`'s MACs).
fn machine(n: u32) -> Mac {
    let b = n.to_be_bytes();
    Mac([0x02, 0xbf, b[0], b[1], b[2], b[3]])
}

/// Registers the image and assigns it to every machine of the storms.
fn assign_everything(store: &PostgresStore) {
    let image: ImageRecord = serde_json::from_value(serde_json::json!({
        "name": "node",
        "kernel": "img/vmlinuz",
        "initrds": ["img/initrd.gz"],
        "cmdline": "console=ttyS0",
    }))
    .unwrap();
    store.add_image(&image, "test").unwrap();
    let macs: Vec<Mac> = (0..CLEAN + 2 * FAULTED).map(machine).collect();
    let patch = MachinePatch {
        image: Some(Some("node".into())),
        ..MachinePatch::default()
    };
    store.put_machines(&macs, &patch, "test").unwrap();
}

#[test]
fn three_servers_on_one_database_boot_a_storm_and_survive_a_dead_server_and_database() {
    if fresh_postgres_database().is_none() || !can_make_namespaces() {
        return;
    }
    let mut work = tempfile::Builder::new()
        .prefix("bootfleet-scale-out-")
        .tempdir()
        .unwrap();
    // BOOTFLEET_KEEP_SCRATCH=1 keeps the servers' logs and the reports.
    work.disable_cleanup(std::env::var_os("BOOTFLEET_KEEP_SCRATCH").is_some());
    println!("scratch: {}", work.path().display());
    let root = work.path().join("boot");
    boot_root(&root);
    let lan = Lan::new(3);
    let cluster = OwnCluster::start_listening_also(Some(BRIDGE_ADDRESS));
    let store = PostgresStore::connect(&cluster.url).unwrap();
    assign_everything(&store);
    let on_bridge = cluster
        .url
        .replace("127.0.0.1", &BRIDGE_ADDRESS.to_string());
    let mut servers: Vec<Server> = (0..3)
        .map(|n| Server::start(&lan, n, &root, work.path(), &on_bridge))
        .collect();
    for (n, server) in servers.iter_mut().enumerate() {
        server.wait_ready(&lan, n);
    }

    // A clean storm.
    let clean = start_storm(&lan, &root, work.path(), (0, CLEAN), "clean");
    let clean = finish_storm(clean, work.path(), "clean", CLEAN);
    let given = addresses_given(&[&clean]);
    wait_until(
        "the shared table has what the clients got",
        Duration::from_secs(10),
        || table_agrees(&cluster.url, &given),
    );
    wait_until(
        "boot events from all three servers in the database",
        Duration::from_secs(10),
        || {
            let events = store.events(None, 0, 100_000).map_err(|e| e.to_string())?;
            let by = |server: &str| events.iter().filter(|e| e.server == server).count();
            let counts: Vec<usize> = servers.iter().map(|s| by(&s.name)).collect();
            counts
                .iter()
                .all(|&n| n > 0)
                .then_some(())
                .ok_or(format!("events per server: {counts:?}"))
        },
    );

    // One server killed (SIGKILL) a moment into a storm: the machines it
    // was booting start over and the others answer them.
    let storm = start_storm(&lan, &root, work.path(), (CLEAN, FAULTED), "killed");
    std::thread::sleep(Duration::from_millis(1500));
    drop(servers.remove(2));
    let killed = finish_storm(storm, work.path(), "killed", FAULTED);
    assert!(
        killed["retried"].as_u64().unwrap() > 0,
        "some machines were booting from the killed server and started over"
    );
    let given = addresses_given(&[&clean, &killed]);
    wait_until(
        "the shared table agrees after the kill",
        Duration::from_secs(10),
        || table_agrees(&cluster.url, &given),
    );

    // The database stopped for 10 s a moment into a storm: the two
    // servers left answer from their snapshots and their own address
    // blocks, and everything is in the database once it is back.
    let first = CLEAN + FAULTED;
    let storm = start_storm(&lan, &root, work.path(), (first, FAULTED), "database-away");
    std::thread::sleep(Duration::from_millis(500));
    cluster.pause();
    std::thread::sleep(Duration::from_secs(10));
    cluster.resume();
    let away = finish_storm(storm, work.path(), "database-away", FAULTED);
    let given = addresses_given(&[&clean, &killed, &away]);
    // A server's lease keeper has been seen to take 17–25 s after the
    // restart to connect again (not explained yet; docs/scale-out.md), so
    // the catch-up gets a minute, and the time it took is printed.
    let back = Instant::now();
    wait_until(
        "the shared table has what the clients got while the database was away",
        Duration::from_secs(60),
        || table_agrees(&cluster.url, &given),
    );
    println!(
        "the table caught up {:.1} s after the database came back",
        back.elapsed().as_secs_f64()
    );
    let store = PostgresStore::connect(&cluster.url).unwrap();
    wait_until(
        "every machine of that storm has its script event in the database",
        Duration::from_secs(20),
        || {
            let events = store
                .events(None, 0, 1_000_000)
                .map_err(|e| e.to_string())?;
            let scripted: std::collections::HashSet<&str> = events
                .iter()
                .filter(|e| e.phase == "script")
                .filter_map(|e| e.mac.as_deref())
                .collect();
            let missing = (first..first + FAULTED)
                .filter(|&n| !scripted.contains(machine(n).to_string().as_str()))
                .count();
            (missing == 0)
                .then_some(())
                .ok_or(format!("{missing} machines without a script event"))
        },
    );
}
