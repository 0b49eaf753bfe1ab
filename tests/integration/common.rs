//! Shared helpers: an in-process server on loopback port 0, test files, and
//! the rule that a missing tool is said out loud (and fails in CI).

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use bootfleet::cache::FileCache;
use bootfleet::config::{Config, TftpConfig};
use bootfleet::engine::{self, Backend, ServerHandle, Shutdown};
use bootfleet::server::tftp::TftpService;

pub const BACKENDS: [Backend; 2] = [Backend::IoUring, Backend::Epoll];

/// File sizes every real client fetches: empty, exactly one 512-byte block,
/// 70 KB, 10 MB and 100 MB.
pub const SIZES: [(&str, usize); 5] = [
    ("empty.bin", 0),
    ("one-block.bin", 512),
    ("70k.bin", 70_000),
    ("10m.bin", 10_000_000),
    ("100m.bin", 100_000_000),
];

/// Deterministic, incompressible-looking bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A boot directory with the [`SIZES`] files, made once per test run.
pub fn boot_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("bootfleet-test-")
            .tempdir()
            .unwrap();
        for (i, (name, size)) in SIZES.iter().enumerate() {
            std::fs::write(dir.path().join(name), pattern(*size, i as u64 + 1)).unwrap();
        }
        std::fs::write(dir.path().join("1m.bin"), pattern(1_000_000, 99)).unwrap();
        std::fs::write(
            dir.path().join("text.txt"),
            b"line one\nline two\r\nbare\rcr\n",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("pxelinux.cfg")).unwrap();
        std::fs::write(dir.path().join("pxelinux.cfg/default"), b"DEFAULT local\n").unwrap();
        dir
    })
    .path()
}

pub fn tftp_config(tweak: impl FnOnce(&mut TftpConfig)) -> TftpConfig {
    let mut config = Config::default().tftp;
    config.max_blksize = 65464;
    tweak(&mut config);
    config
}

/// A server running in this process on 127.0.0.1:<ephemeral>.
pub struct TestServer {
    pub addr: SocketAddr,
    pub service: Arc<TftpService>,
    shutdown: Shutdown,
    handle: Option<ServerHandle>,
}

impl TestServer {
    pub fn start(backend: Backend, root: &Path, config: TftpConfig) -> Self {
        Self::start_with(backend, root, config, |_| {})
    }

    /// A server listening on `bind` (e.g. "[::1]:0").
    pub fn start_on(backend: Backend, bind: &str, root: &Path, config: TftpConfig) -> Self {
        Self::start_full(backend, bind, root, config, |_| {})
    }

    pub fn start_with(
        backend: Backend,
        root: &Path,
        config: TftpConfig,
        customise: impl FnOnce(&mut TftpService),
    ) -> Self {
        Self::start_full(backend, "127.0.0.1:0", root, config, customise)
    }

    fn start_full(
        backend: Backend,
        bind: &str,
        root: &Path,
        config: TftpConfig,
        customise: impl FnOnce(&mut TftpService),
    ) -> Self {
        let listener = UdpSocket::bind(bind).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut service = TftpService::new(root, &config, FileCache::new(1 << 30)).unwrap();
        customise(&mut service);
        let service = Arc::new(service);
        let shutdown = Shutdown::new();
        let handle =
            engine::spawn_tftp(backend, listener, Arc::clone(&service), 2, shutdown.clone())
                .unwrap_or_else(|e| panic!("cannot start the {backend} engine: {e}"));
        Self {
            addr,
            service,
            shutdown,
            handle: Some(handle),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(handle) = self.handle.take() {
            handle.join();
        }
    }
}

/// Starts `bootfleet serve ARGS` under `ulimit -n LIMIT`, its output
/// discarded: a server short of file descriptors, as in a storm against a
/// low `LimitNOFILE`.
pub fn serve_with_fd_limit(limit: u32, args: &str) -> std::process::Child {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n {limit} && exec {:?} serve {args}",
            env!("CARGO_BIN_EXE_bootfleet")
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Whether `tool` is installed. Missing tools are reported loudly, and in CI
/// (`CI` set) a missing tool fails the test: CI installs every tool.
pub fn have_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        let message = format!(
            "REQUIRED TOOL MISSING: `{tool}` is not installed, so this test cannot run. \
             Install the test dependencies with `.ci/run` (see README)."
        );
        if std::env::var_os("CI").is_some() {
            panic!("{message}");
        }
        note_skipped(&message);
    }
    found
}

/// Says loudly that the running test skips its checks, and adds it to the
/// file named by `BOOTFLEET_SKIPPED` (tests/run-all.sh reads it for its
/// summary: cargo hides a passing test's output).
pub fn note_skipped(message: &str) {
    eprintln!("\n*** SKIPPED: {message} ***\n");
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    if let Some(path) = std::env::var_os("BOOTFLEET_SKIPPED") {
        use std::io::Write;
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(file, "{test}: {message}");
        }
    }
}

/// `tftp 127.0.0.1 PORT -m binary -c get NAME TARGET` with tftp-hpa's
/// client; fails the test loudly when the client is missing.
pub fn tftp_hpa_get(port: u16, name: &str, target: &Path) -> std::process::Output {
    assert!(
        have_tool("tftp"),
        "tftp-hpa's client is missing: install tftp-hpa (tests/run-all.sh does)"
    );
    Command::new("tftp")
        .args([
            "127.0.0.1",
            &port.to_string(),
            "-m",
            "binary",
            "-c",
            "get",
            name,
        ])
        .arg(target)
        .output()
        .expect("tftp runs")
}

/// Whether this process may create network namespaces (root).
pub fn can_make_namespaces() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        let message = "network-namespace tests need root (CAP_NET_ADMIN)";
        if std::env::var_os("CI").is_some() {
            panic!("{message}");
        }
        note_skipped(message);
    }
    root && have_tool("ip") && have_tool("nft")
}

/// A scratch directory for client output.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("bootfleet-out-")
        .tempdir()
        .unwrap()
}

/// Runs a client command and returns its combined output on failure.
pub fn run(command: &mut Command) -> Result<(), String> {
    let output = command
        .output()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?} failed with {}:\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Asserts that `fetched` holds exactly the bytes of `name` in the boot dir.
pub fn assert_same_file(name: &str, fetched: &Path, context: &str) {
    let want = std::fs::read(boot_dir().join(name)).unwrap();
    let got = std::fs::read(fetched).unwrap_or_else(|e| panic!("{context}: no output file: {e}"));
    assert!(
        got == want,
        "{context}: {name} differs: got {} bytes, want {}",
        got.len(),
        want.len()
    );
}

pub fn out_path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// A whole server (router, TFTP and HTTP) as `bootfleet serve` runs it, on
/// loopback ports chosen by the kernel.
pub struct FullServer {
    pub http: SocketAddr,
    pub tftp: SocketAddr,
    /// The control panel, when started with one.
    pub panel: Option<SocketAddr>,
    pub running: bootfleet::app::Running,
    pub state: tempfile::TempDir,
}

impl FullServer {
    pub fn start(root: &Path, tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_on(Backend::IoUring, root, tweak)
    }

    /// On the given data-plane backend (TFTP and HTTP engines).
    pub fn start_on(backend: Backend, root: &Path, tweak: impl FnOnce(&mut Config)) -> Self {
        let state = tempfile::Builder::new()
            .prefix("bootfleet-state-")
            .tempdir()
            .unwrap();
        Self::start_in(backend, root, state, false, tweak)
    }

    /// With the control panel on a loopback port, its database in `state`
    /// (pass the same directory again to restart on the same database).
    pub fn start_with_panel(
        root: &Path,
        state: tempfile::TempDir,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        Self::start_with_panel_on(Backend::IoUring, root, state, tweak)
    }

    /// With the control panel, on the given data-plane backend.
    pub fn start_with_panel_on(
        backend: Backend,
        root: &Path,
        state: tempfile::TempDir,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        Self::start_in(backend, root, state, true, tweak)
    }

    fn start_in(
        backend: Backend,
        root: &Path,
        state: tempfile::TempDir,
        with_panel: bool,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let mut config = Config {
            root: root.to_path_buf(),
            root_is_default: false,
            state_dir: state.path().to_path_buf(),
            workers: 2,
            ..Config::default()
        };
        config.http.listen = "127.0.0.1:0".parse().unwrap();
        config.tftp.listen = "127.0.0.1:0".parse().unwrap();
        tweak(&mut config);
        let tftp = UdpSocket::bind(config.tftp.listen).unwrap();
        let http = bootfleet::app::http_listener(config.http.listen).unwrap();
        let (tftp_addr, http_addr) = (tftp.local_addr().unwrap(), http.local_addr().unwrap());
        let panel = with_panel.then(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        let panel_addr = panel.as_ref().map(|p| p.local_addr().unwrap());
        let running = bootfleet::app::start(&config, backend, tftp, http, panel).unwrap();
        Self {
            http: http_addr,
            tftp: tftp_addr,
            panel: panel_addr,
            running,
            state,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }
}

/// What curl fetched: the status, the response head and the body.
pub struct Fetched {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Fetched {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    }
}

/// Runs curl on `url` with extra `args`; panics if curl itself fails.
pub fn curl(url: &str, args: &[&str]) -> Fetched {
    let out = scratch();
    let head = out.path().join("head");
    let body = out.path().join("body");
    let output = Command::new("curl")
        .args(["-s", "-S", "--max-time", "20", "-D"])
        .arg(&head)
        .arg("-o")
        .arg(&body)
        .args(args)
        .arg(url)
        .output()
        .expect("curl runs");
    assert!(
        output.status.success(),
        "curl {args:?} {url}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let head = std::fs::read_to_string(&head).unwrap();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    Fetched {
        status,
        head,
        body: std::fs::read(&body).unwrap_or_default(),
    }
}

/// Reads one HTTP response (head and Content-Length body) from `stream`.
pub fn read_response(stream: &mut impl std::io::Read) -> Option<Fetched> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).ok()?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let mut fetched = Fetched {
        status,
        head,
        body: Vec::new(),
    };
    let len: usize = fetched
        .header("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    fetched.body = vec![0; len];
    stream.read_exact(&mut fetched.body).ok()?;
    Some(fetched)
}

/// Waits up to 10 s until the server log at `log` holds every one of
/// `needles`; otherwise fails with the log and the server's `errors` file.
pub fn wait_for_log(log: &Path, needles: &[&str], errors: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if needles.iter().all(|n| text.contains(n)) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server log never said {needles:?}:\n{text}{}",
            std::fs::read_to_string(errors).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A new, empty database on the test PostgreSQL cluster (tests/postgres.sh,
/// named by `BOOTFLEET_TEST_POSTGRES`), as a URL; `None`, said loudly, when
/// no cluster was started (in CI a failure).
pub fn fresh_postgres_database() -> Option<String> {
    let Ok(admin) = std::env::var("BOOTFLEET_TEST_POSTGRES") else {
        let message = "BOOTFLEET_TEST_POSTGRES is not set, so this PostgreSQL test cannot run; \
                       tests/run-all.sh starts a cluster (tests/postgres.sh) and sets it";
        if std::env::var_os("CI").is_some() {
            panic!("{message}");
        }
        note_skipped(message);
        return None;
    };
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "bootfleet_it_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut client = postgres::Client::connect(&admin, postgres::NoTls)
        .unwrap_or_else(|e| panic!("the test cluster at {admin} does not answer: {e}"));
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    let (base, _) = admin
        .rsplit_once('/')
        .expect("a URL that names its database");
    Some(format!("{base}/{name}"))
}

/// A self-signed ECDSA P-256 certificate for `subject` (`/CN=…`) with
/// `extra` openssl arguments (e.g. `-addext subjectAltName=…`), as
/// `cert.pem` and `key.pem` in `dir`.
pub fn self_signed_certificate(dir: &Path, subject: &str, extra: &[&str]) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", subject])
        .args(extra)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "openssl made a certificate for {subject}");
    (cert, key)
}
