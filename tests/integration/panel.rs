//! The control panel's API over real HTTP, against a real database file:
//! authentication (sessions, CSRF, tokens and scopes, rate limits),
//! discovery and adoption, assignments reaching the data plane, pools,
//! uploads, hostile input, the inventory file import, restarts, TLS.
//! Users and tokens are made with the real `bootfleet` command line.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{curl, have_tool, self_signed_certificate, FullServer};

pub const PASSWORD: &str = "correct horse battery staple";

/// Runs the real binary with `args`, feeding `stdin`; returns stdout.
pub fn bootfleet_cli(args: &[&str], stdin: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bootfleet"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the bootfleet binary runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "bootfleet {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A user made with `bootfleet users add` in the server's state directory.
pub fn add_user(state: &Path, name: &str, scope: &str) {
    let dir = state.to_str().unwrap();
    bootfleet_cli(
        &["users", "add", name, "--scope", scope, "--state-dir", dir],
        &format!("{PASSWORD}\n"),
    );
}

/// A token made with `bootfleet tokens add`.
pub fn add_token(state: &Path, name: &str, scope: &str) -> String {
    let dir = state.to_str().unwrap();
    bootfleet_cli(
        &["tokens", "add", name, "--scope", scope, "--state-dir", dir],
        "",
    )
    .trim()
    .to_string()
}

/// A small API client: a session (cookie and CSRF token) or a bearer token.
pub struct Api {
    pub base: String,
    agent: ureq::Agent,
    cookie: Option<String>,
    pub csrf: Option<String>,
    token: Option<String>,
}

/// A response: status, headers we look at, JSON body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub set_cookie: Option<String>,
    pub retry_after: Option<String>,
    pub total_count: Option<String>,
    pub body: Value,
}

impl Api {
    pub fn new(panel: std::net::SocketAddr) -> Self {
        Self {
            base: format!("http://{panel}"),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(20)))
                .build()
                .into(),
            cookie: None,
            csrf: None,
            token: None,
        }
    }

    pub fn with_token(panel: std::net::SocketAddr, token: &str) -> Self {
        let mut api = Self::new(panel);
        api.token = Some(token.to_string());
        api
    }

    pub fn login(&mut self, user: &str, password: &str) -> Reply {
        let reply = self.call(
            "POST",
            "/api/v1/login",
            Some(json!({ "user": user, "password": password })),
        );
        if reply.status == 200 {
            let cookie = reply.set_cookie.clone().expect("login sets a cookie");
            self.cookie = Some(cookie.split(';').next().unwrap().to_string());
            self.csrf = reply.body["csrf"].as_str().map(str::to_string);
        }
        reply
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Reply {
        self.raw(method, path, body.map(|b| b.to_string().into_bytes()), true)
    }

    /// A request with an arbitrary body; `csrf` false leaves the token out.
    pub fn raw(&self, method: &str, path: &str, body: Option<Vec<u8>>, csrf: bool) -> Reply {
        let url = format!("{}{path}", self.base);
        let mut request = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(cookie) = &self.cookie {
            request = request.header("Cookie", cookie);
        }
        if let (true, Some(token)) = (csrf, &self.csrf) {
            request = request.header("X-CSRF-Token", token);
        }
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        request = request.header("Content-Type", "application/json");
        let response = self
            .agent
            .run(request.body(body.unwrap_or_default()).unwrap())
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (status, set_cookie, retry_after, total_count) = (
            response.status().as_u16(),
            header("set-cookie"),
            header("retry-after"),
            header("x-total-count"),
        );
        let text = response.into_body().read_to_string().unwrap_or_default();
        Reply {
            status,
            set_cookie,
            retry_after,
            total_count,
            body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
        }
    }

    /// A call that must succeed; returns its JSON.
    pub fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let reply = self.call(method, path, body);
        assert!(
            (200..300).contains(&reply.status),
            "{method} {path}: {reply:?}"
        );
        reply.body
    }
}

/// A boot directory with two images' files.
pub fn boot_dir() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for (path, content) in [
        ("debian12/vmlinuz", "debian kernel"),
        ("debian12/initrd.img", "debian initrd"),
        ("rocky9/vmlinuz", "rocky kernel"),
        ("rocky9/initrd.img", "rocky initrd"),
    ] {
        let full = root.path().join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, content).unwrap();
    }
    root
}

pub fn state_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("bootfleet-panel-")
        .tempdir()
        .unwrap()
}

pub fn register(api: &Api, name: &str) -> Value {
    let reply = api.call(
        "POST",
        "/api/v1/images",
        Some(json!({
            "name": name,
            "kernel": format!("{name}/vmlinuz"),
            "initrds": [format!("{name}/initrd.img")],
            "cmdline": format!("console=ttyS0 image={name}"),
        })),
    );
    assert_eq!(reply.status, 201, "{reply:?}");
    reply.body
}

/// The machine's script from the data plane, as iPXE asks for it.
pub fn script(server: &FullServer, mac: &str, query: &str) -> String {
    let fetched = curl(&server.url(&format!("/boot/{mac}.ipxe{query}")), &[]);
    assert_eq!(fetched.status, 200);
    String::from_utf8(fetched.body).unwrap()
}

/// Polls `probe` until it returns `Some` (the event writer batches for
/// up to 100 ms).
pub fn eventually<T>(what: &str, probe: impl FnMut() -> Option<T>) -> T {
    eventually_within(Duration::from_secs(10), what, probe)
}

/// [`eventually`] with a limit of `limit`.
pub fn eventually_within<T>(
    limit: Duration,
    what: &str,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn every_endpoint_needs_authentication_and_is_documented() {
    let root = boot_dir();
    let server = FullServer::start_with_panel(root.path(), state_dir(), |_| {});
    let api = Api::new(server.panel.unwrap());
    for (method, path) in bootfleet::panel::API_ROUTES {
        let concrete = path
            .replace("{mac}", "52:54:00:00:00:01")
            .replace("{name}", "x")
            .replace("{path}", "x/y")
            .replace("{id}", "1");
        let reply = api.call(&method.to_uppercase(), &concrete, Some(json!({})));
        match *path {
            "/api/v1/openapi.json" => {
                assert_eq!(reply.status, 200);
                let documented = reply.body["paths"].as_object().unwrap();
                assert!(documented.len() >= 20, "{documented:?}");
            }
            // Login and the check-in (whose token is the proof) answer a
            // wrong body as a client error, never 404/405.
            "/api/v1/login" | "/api/v1/checkin" => assert!(
                (400..500).contains(&reply.status) && reply.status != 404,
                "{reply:?}"
            ),
            _ => {
                assert_eq!(reply.status, 401, "{method} {concrete}: {reply:?}");
                assert!(
                    reply.body["error"].as_str().unwrap().contains("log in"),
                    "{reply:?}"
                );
            }
        }
    }
    // Pages are served without login (they hold no data) and lock down scripts.
    let page = curl(&format!("{}/", api.base), &[]);
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-security-policy")
        .unwrap()
        .contains("default-src 'self'"));
    assert_eq!(
        api.call("GET", "/api/v1/nothing-here", None).status,
        404,
        "unknown endpoints are JSON 404s"
    );
}

#[test]
fn sessions_need_csrf_tokens_and_failed_logins_are_limited() {
    let root = boot_dir();
    let state = state_dir();
    add_user(state.path(), "alice", "admin");
    let server = FullServer::start_with_panel(root.path(), state, |_| {});
    let panel = server.panel.unwrap();

    let mut api = Api::new(panel);
    let reply = api.login("alice", PASSWORD);
    assert_eq!(reply.status, 200);
    let cookie = reply.set_cookie.unwrap();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(flag), "{cookie}");
    }
    assert!(
        !cookie.contains("Secure"),
        "no Secure flag over plain HTTP: {cookie}"
    );
    assert_eq!(api.ok("GET", "/api/v1/session", None)["user"], "alice");

    // A change without the CSRF token is refused, and nothing changes.
    let body = br#"{"hostname": "node01"}"#.to_vec();
    let refused = api.raw(
        "PUT",
        "/api/v1/machines/52:54:00:00:00:01",
        Some(body.clone()),
        false,
    );
    assert_eq!(refused.status, 403, "{refused:?}");
    assert!(refused.body["error"]
        .as_str()
        .unwrap()
        .contains("X-CSRF-Token"));
    assert_eq!(
        api.call("GET", "/api/v1/machines/52:54:00:00:00:01", None)
            .status,
        404
    );
    let accepted = api.raw(
        "PUT",
        "/api/v1/machines/52:54:00:00:00:01",
        Some(body),
        true,
    );
    assert_eq!(accepted.status, 200, "{accepted:?}");

    // Logging out ends the session on the server, not just in the browser.
    api.ok("POST", "/api/v1/logout", None);
    assert_eq!(api.call("GET", "/api/v1/machines", None).status, 401);

    // Five wrong passwords, then even the right one waits.
    let mut attacker = Api::new(panel);
    for _ in 0..5 {
        assert_eq!(attacker.login("alice", "wrong password!").status, 401);
    }
    let limited = attacker.login("alice", PASSWORD);
    assert_eq!(limited.status, 429, "{limited:?}");
    assert!(limited.retry_after.is_some());
    assert_eq!(
        attacker.login("nobody", "whatever").status,
        429,
        "the address is limited too"
    );

    let audit = Api::with_token(panel, &add_token(server.state.path(), "audit", "read")).ok(
        "GET",
        "/api/v1/audit",
        None,
    );
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    for action in ["login", "machine.put", "logout", "login.failed"] {
        assert!(actions.contains(&action), "{action} in {actions:?}");
    }
}

#[test]
fn tokens_act_within_their_scope() {
    let root = boot_dir();
    let server = FullServer::start_with_panel(root.path(), state_dir(), |_| {});
    let panel = server.panel.unwrap();
    let state = server.state.path();
    let admin = Api::with_token(panel, &add_token(state, "admin", "admin"));
    let assign = Api::with_token(panel, &add_token(state, "ops", "assign"));
    let read = Api::with_token(panel, &add_token(state, "viewer", "read"));
    register(&admin, "debian12");

    let put = |api: &Api| {
        api.call(
            "PUT",
            "/api/v1/machines/52-54-00-00-00-02",
            Some(json!({ "image": "debian12" })),
        )
        .status
    };
    assert_eq!(put(&read), 403);
    assert_eq!(put(&assign), 200);
    assert_eq!(read.call("GET", "/api/v1/machines", None).status, 200);
    assert_eq!(
        assign
            .call("DELETE", "/api/v1/machines/52:54:00:00:00:02", None)
            .status,
        403
    );
    assert_eq!(
        assign
            .call(
                "POST",
                "/api/v1/images",
                Some(json!({"name": "x", "kernel": "k"}))
            )
            .status,
        403
    );
    assert_eq!(read.call("GET", "/api/v1/tokens", None).status, 403);
    let tokens = admin.ok("GET", "/api/v1/tokens", None);
    assert!(
        !tokens.to_string().contains("bft_"),
        "token secrets are never listed: {tokens}"
    );
    let bogus = Api::with_token(panel, "bft_0000");
    assert_eq!(bogus.call("GET", "/api/v1/machines", None).status, 401);

    // Revoked tokens stop working at once.
    let created = admin.ok(
        "POST",
        "/api/v1/tokens",
        Some(json!({"name": "temp", "scope": "read"})),
    );
    let temp = Api::with_token(panel, created["token"].as_str().unwrap());
    assert_eq!(temp.call("GET", "/api/v1/machines", None).status, 200);
    admin.ok("DELETE", &format!("/api/v1/tokens/{}", created["id"]), None);
    assert_eq!(temp.call("GET", "/api/v1/machines", None).status, 401);
}

/// The Images page lists what `bootfleet ipxe build` left in the boot
/// directory's `ipxe/` (by its `SHA256SUMS`, as the command writes it) and
/// hands out exactly those files, to read-scope callers too.
#[test]
fn the_panel_lists_and_hands_out_the_ipxe_builds() {
    let root = boot_dir();
    let server = FullServer::start_with_panel(root.path(), state_dir(), |_| {});
    let panel = server.panel.unwrap();
    let read = Api::with_token(panel, &add_token(server.state.path(), "viewer", "read"));
    assert_eq!(
        read.ok("GET", "/api/v1/ipxe", None),
        json!({ "files": [], "script": null })
    );
    let dir = root.path().join("ipxe");
    std::fs::create_dir_all(&dir).unwrap();
    let rom = b"\x55\xaa rom bytes".to_vec();
    std::fs::write(dir.join("1af41000.rom"), &rom).unwrap();
    std::fs::write(dir.join("bootfleet.ipxe"), "#!ipxe\ndhcp\n").unwrap();
    std::fs::write(dir.join("not-listed.efi"), "x").unwrap();
    std::fs::write(
        dir.join("SHA256SUMS"),
        format!(
            "{}  1af41000.rom\n{}  bootfleet.ipxe\n",
            sha256_hex(&rom),
            sha256_hex(b"#!ipxe\ndhcp\n")
        ),
    )
    .unwrap();
    let listed = read.ok("GET", "/api/v1/ipxe", None);
    assert_eq!(listed["script"], "#!ipxe\ndhcp\n");
    assert_eq!(
        listed["files"][0],
        json!({
            "name": "1af41000.rom",
            "sha256": sha256_hex(&rom),
            "size": rom.len(),
            "boot_path": "ipxe/1af41000.rom",
        })
    );
    assert_eq!(listed["files"].as_array().unwrap().len(), 2);
    let download = curl(
        &format!("{}/api/v1/ipxe/1af41000.rom", read.base),
        &[
            "-H",
            &format!("Authorization: Bearer {}", read.token.as_ref().unwrap()),
        ],
    );
    assert_eq!(download.status, 200);
    assert_eq!(download.body, rom);
    for refused in [
        "not-listed.efi",
        "..%2Finventory.toml",
        "SHA256SUMS%2F..%2F..%2Fx",
    ] {
        assert_eq!(
            read.call("GET", &format!("/api/v1/ipxe/{refused}"), None)
                .status,
            404,
            "{refused}"
        );
    }
}

/// Security review finding 1: an `assign` token could put a line break (or
/// an iPXE `||`) into `cmdline_append`, which every boot format wrote raw
/// into the kernel line: any command, e.g. `chain http://elsewhere/`.
#[test]
fn no_token_can_add_a_command_to_a_boot_script() {
    let root = boot_dir();
    let server = FullServer::start_with_panel(root.path(), state_dir(), |_| {});
    let panel = server.panel.unwrap();
    let state = server.state.path();
    let admin = Api::with_token(panel, &add_token(state, "admin", "admin"));
    let assign = Api::with_token(panel, &add_token(state, "ops", "assign"));
    register(&admin, "debian12");
    let mac = "52:54:00:00:00:07";
    assign.ok(
        "PUT",
        &format!("/api/v1/machines/{mac}"),
        Some(json!({ "image": "debian12", "cmdline_append": "node=7" })),
    );
    let hostile = [
        "quiet\nchain http://elsewhere/x.ipxe",
        "quiet\r\nchain http://elsewhere/x.ipxe",
        "quiet\u{0}",
        "quiet\u{85}chain",
        "quiet\u{2028}chain",
        "quiet || chain http://elsewhere/x.ipxe",
        "quiet && chain http://elsewhere/x.ipxe",
        "quiet ; chain http://elsewhere/x.ipxe",
        "quiet #chain",
    ];
    for value in hostile {
        let mut bodies = vec![
            json!({ "cmdline_append": value }),
            json!({ "hostname": value }),
        ];
        // Labels reach no boot config, but they are one line each.
        if value.chars().any(|c| c.is_control() || c == '\u{2028}') {
            bodies.push(json!({ "labels": [format!("k={value}")] }));
        }
        for body in bodies {
            let reply = assign.call(
                "PUT",
                &format!("/api/v1/machines/{mac}"),
                Some(body.clone()),
            );
            assert_eq!(reply.status, 422, "{body}: {reply:?}");
        }
        for (field, image) in [
            (
                "cmdline",
                json!({"name": "x1", "kernel": "debian12/vmlinuz", "cmdline": value}),
            ),
            (
                "description",
                json!({"name": "x2", "kernel": "debian12/vmlinuz", "description": value}),
            ),
            (
                "kernel",
                json!({"name": "x3", "kernel": format!("http://m/{value}")}),
            ),
            ("name", json!({"name": value, "kernel": "debian12/vmlinuz"})),
        ] {
            let reply = admin.call("POST", "/api/v1/images", Some(image));
            assert_eq!(reply.status, 422, "image {field} {value:?}: {reply:?}");
        }
    }
    let script = script(&server, mac, "");
    assert!(script.contains(" node=7\n"), "{script}");
    assert!(!script.contains("elsewhere"), "{script}");
    let audit = admin.ok("GET", "/api/v1/audit", None).to_string();
    assert!(
        !audit.contains("elsewhere"),
        "refused changes are not audited as made: {audit}"
    );
}

/// Security review finding 5: unauthenticated script requests for random
/// MACs added a discovered row each (145,000 in 20 s). Now one address
/// introduces new MACs only at a machine's pace, the database keeps at
/// most `panel.max_discovered` (least recently seen dropped), and the list
/// is paged.
#[test]
fn made_up_machines_cannot_grow_the_inventory() {
    let root = boot_dir();
    let server = FullServer::start_with_panel(root.path(), state_dir(), |c| {
        c.panel.max_discovered = 5;
    });
    let panel = server.panel.unwrap();
    let api = Api::with_token(panel, &add_token(server.state.path(), "ops", "read"));
    for n in 0..400u32 {
        let mac = format!(
            "02:00:00:{:02x}:{:02x}:{:02x}",
            n >> 16,
            (n >> 8) & 0xff,
            n & 0xff
        );
        let _ = script(&server, &mac, "");
    }
    let count = |query: &str| {
        api.ok("GET", &format!("/api/v1/machines{query}"), None)
            .as_array()
            .unwrap()
            .len()
    };
    // The event writer batches for 100 ms; give it a few rounds.
    std::thread::sleep(Duration::from_millis(600));
    let kept = eventually("the cap", || {
        let n = count("?state=discovered");
        (n <= 5).then_some(n)
    });
    assert!(kept > 0, "some machines are discovered");
    let list = api.call("GET", "/api/v1/machines?limit=1000000", None);
    assert_eq!(list.status, 200);
    let total: usize = list.total_count.as_deref().unwrap().parse().unwrap();
    assert!(total <= 5, "{list:?}");
}

#[test]
fn discovered_machines_are_adopted_and_assignments_reach_the_data_plane() {
    let root = boot_dir();
    let server = FullServer::start_with_panel(root.path(), state_dir(), |c| {
        c.panel.stuck_after = Duration::ZERO;
    });
    let panel = server.panel.unwrap();
    let api = Api::with_token(panel, &add_token(server.state.path(), "ops", "admin"));
    let image = register(&api, "debian12");
    assert_eq!(
        image["files"][0]["sha256"],
        sha256_hex(b"debian kernel"),
        "{image}"
    );
    assert_eq!(image["files"][1]["size"], 13);

    // An unknown machine asks for its script (as iPXE does, URL-encoded MAC
    // and facts) and is discovered with those facts.
    let mac = "52:54:00:aa:00:01";
    let first = script(
        &server,
        "52%3A54%3A00%3Aaa%3A00%3A01",
        "?serial=SN-1&manufacturer=QEMU&platform=pcbios",
    );
    assert!(!first.contains("debian12/vmlinuz"), "{first}");
    let discovered = eventually("discovery", || {
        let list = api.ok("GET", "/api/v1/discovered", None);
        (!list.as_array().unwrap().is_empty()).then_some(list)
    });
    assert_eq!(discovered[0]["mac"], mac);
    assert_eq!(discovered[0]["facts"]["serial"], "SN-1");
    assert_eq!(discovered[0]["state"], "discovered");

    // Adopt it with an image: the very next script answer boots it.
    let started = Instant::now();
    api.ok(
        "POST",
        "/api/v1/machines/assign",
        Some(json!({ "macs": [mac], "image": "debian12" })),
    );
    let next = script(&server, mac, "");
    let elapsed = started.elapsed();
    assert!(next.contains("debian12/vmlinuz"), "{next}");
    assert!(next.contains("image=debian12"), "{next}");
    eprintln!("assignment to data plane (API call + next script): {elapsed:?}");
    assert!(api
        .ok("GET", "/api/v1/discovered", None)
        .as_array()
        .unwrap()
        .is_empty());

    // The kernel fetch lands on its timeline and moves its state.
    let kernel = curl(&server.url("/debian12/vmlinuz"), &[]);
    assert_eq!(kernel.body, b"debian kernel");
    let machine = eventually("the kernel event", || {
        let m = api.ok("GET", &format!("/api/v1/machines/{mac}"), None);
        (m["state"] == "kernel").then_some(m)
    });
    let phases: Vec<&str> = machine["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["phase"].as_str().unwrap())
        .collect();
    assert!(
        phases.ends_with(&["script", "script", "kernel"]),
        "{phases:?}"
    );
    // With stuck_after at zero, a machine in the middle of booting is stuck.
    let fleet = api.ok("GET", "/api/v1/fleet", None);
    assert_eq!(fleet["states"]["kernel"], 1, "{fleet}");
    assert_eq!(fleet["stuck"][0]["mac"], mac, "{fleet}");

    // Filters.
    let by_state = api.ok("GET", "/api/v1/machines?state=kernel", None);
    assert_eq!(by_state.as_array().unwrap().len(), 1);
    let by_text = api.ok("GET", "/api/v1/machines?q=sn-1", None);
    assert_eq!(by_text.as_array().unwrap().len(), 1, "facts are searched");
    let none = api.ok("GET", "/api/v1/machines?image=rocky9", None);
    assert!(none.as_array().unwrap().is_empty());

    // Images in use cannot be removed; the reason names the machine.
    let refused = api.call("DELETE", "/api/v1/images/debian12", None);
    assert_eq!(refused.status, 409);
    assert!(refused.body["error"].as_str().unwrap().contains(mac));

    // Forgetting it makes it unknown to the data plane again.
    api.ok("DELETE", &format!("/api/v1/machines/{mac}"), None);
    assert!(!script(&server, mac, "").contains("debian12/vmlinuz"));
}

/// A pool's image is a standing rule: every machine its selector catches,
/// now or when adopted or relabelled later, boots it unless the machine
/// has an image of its own, and the API says which rule gave a machine
/// its image. (The API used to ignore a pool's `image`.)
#[test]
fn a_pool_with_an_image_boots_every_machine_it_catches_now_and_later() {
    let root = boot_dir();
    let server = FullServer::start_with_panel(root.path(), state_dir(), |_| {});
    let api = Api::with_token(
        server.panel.unwrap(),
        &add_token(server.state.path(), "ops", "admin"),
    );
    register(&api, "debian12");
    register(&api, "rocky9");
    let (early, own, late) = (
        "52:54:00:bc:00:01",
        "52:54:00:bc:00:02",
        "52:54:00:bc:00:03",
    );
    api.ok(
        "PUT",
        &format!("/api/v1/machines/{early}"),
        Some(json!({ "labels": ["rack=c"] })),
    );
    api.ok(
        "PUT",
        &format!("/api/v1/machines/{own}"),
        Some(json!({ "labels": ["rack=c"], "image": "debian12" })),
    );
    api.ok(
        "PUT",
        "/api/v1/pools/rack-c",
        Some(json!({ "selector": ["rack=c"], "image": "rocky9" })),
    );
    assert_eq!(
        api.ok("GET", "/api/v1/pools/rack-c", None)["image"],
        "rocky9"
    );
    assert!(script(&server, early, "").contains("rocky9/vmlinuz"));
    assert!(script(&server, own, "").contains("debian12/vmlinuz"));
    // A machine discovered later follows no pool until adopted; adopted
    // with the pool's label, it boots the pool's image at once.
    assert!(!script(&server, late, "").contains("rocky9/vmlinuz"));
    api.ok(
        "PUT",
        &format!("/api/v1/machines/{late}"),
        Some(json!({ "labels": ["rack=c"] })),
    );
    assert!(script(&server, late, "").contains("rocky9/vmlinuz"));
    let view = |mac: &str| api.ok("GET", &format!("/api/v1/machines/{mac}"), None);
    assert_eq!(view(late)["image"], "rocky9");
    assert_eq!(view(late)["image_from"], "pool rack-c");
    assert_eq!(view(own)["image_from"], "machine");
    // An unknown image is refused; an image a pool boots cannot be removed.
    let refused = api.call(
        "PUT",
        "/api/v1/pools/rack-c",
        Some(json!({ "selector": ["rack=c"], "image": "nope" })),
    );
    assert_eq!(refused.status, 404, "{refused:?}");
    let in_use = api.call("DELETE", "/api/v1/images/rocky9", None);
    assert_eq!(in_use.status, 409, "{in_use:?}");
    // Relabelled out of the pool, a machine has no image again.
    api.ok(
        "PUT",
        &format!("/api/v1/machines/{late}"),
        Some(json!({ "labels": ["rack=d"] })),
    );
    assert!(!script(&server, late, "").contains("rocky9/vmlinuz"));
    assert_eq!(view(late)["image_from"], serde_json::Value::Null);
}

#[test]
fn pools_assign_many_machines_by_list_and_label() {
    let root = boot_dir();
    let server = FullServer::start_with_panel(root.path(), state_dir(), |_| {});
    let api = Api::with_token(
        server.panel.unwrap(),
        &add_token(server.state.path(), "ops", "admin"),
    );
    register(&api, "debian12");
    register(&api, "rocky9");
    let macs: Vec<String> = (1..=6).map(|i| format!("52:54:00:bb:00:0{i}")).collect();
    for (i, mac) in macs.iter().enumerate() {
        let rack = if i < 3 { "rack=a" } else { "rack=b" };
        api.ok(
            "PUT",
            &format!("/api/v1/machines/{mac}"),
            Some(json!({ "labels": [rack, "role=compute"] })),
        );
    }
    api.ok(
        "PUT",
        "/api/v1/pools/rack-a",
        Some(json!({ "selector": ["rack=a"] })),
    );
    api.ok(
        "POST",
        "/api/v1/machines/assign",
        Some(json!({ "macs": [&macs[5]], "pool": "rack-a" })),
    );
    // The list pages: a window of the matches and their whole count.
    let page = api.call(
        "GET",
        "/api/v1/machines?label=role=compute&offset=2&limit=3",
        None,
    );
    assert_eq!(page.total_count.as_deref(), Some("6"), "{page:?}");
    let listed: Vec<&str> = page
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mac"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [&macs[2], &macs[3], &macs[4]]);
    let pool = api.ok("GET", "/api/v1/pools/rack-a", None);
    assert_eq!(pool["machines"].as_array().unwrap().len(), 4, "{pool}");
    let changed = api.ok(
        "POST",
        "/api/v1/pools/rack-a/assign",
        Some(json!({ "image": "rocky9" })),
    );
    assert_eq!(changed["changed"], 4);
    for (i, mac) in macs.iter().enumerate() {
        let body = script(&server, mac, "");
        let in_pool = i < 3 || i == 5;
        assert_eq!(body.contains("rocky9/vmlinuz"), in_pool, "{mac}: {body}");
    }
    let unknown = api.call(
        "POST",
        "/api/v1/pools/nope/assign",
        Some(json!({ "image": "rocky9" })),
    );
    assert_eq!(unknown.status, 404);
}

#[test]
fn hostile_input_gets_a_clear_error_and_changes_nothing() {
    let root = boot_dir();
    let server = FullServer::start_with_panel(root.path(), state_dir(), |c| {
        c.panel.max_upload_bytes = 1 << 20;
    });
    let api = Api::with_token(
        server.panel.unwrap(),
        &add_token(server.state.path(), "ops", "admin"),
    );
    let cases: &[(&str, &str, Value, u16, &str)] = &[
        (
            "PUT",
            "/api/v1/machines/52:54:00:12:34",
            json!({}),
            400,
            "not a MAC address",
        ),
        (
            "PUT",
            "/api/v1/machines/not-a-mac",
            json!({}),
            400,
            "not a MAC address",
        ),
        (
            "PUT",
            "/api/v1/machines/525400123456",
            json!({"image": "nope"}),
            422,
            "register it first",
        ),
        (
            "PUT",
            "/api/v1/machines/525400123456",
            json!({"hostname": "a b"}),
            422,
            "not a DNS name",
        ),
        (
            "PUT",
            "/api/v1/machines/525400123456",
            json!({"labels": ["x"]}),
            422,
            "key=value",
        ),
        (
            "PUT",
            "/api/v1/machines/525400123456",
            json!({"colour": "red"}),
            422,
            "unknown field",
        ),
        (
            "PUT",
            "/api/v1/machines/525400123456",
            json!({"ip": "10.0.0.300"}),
            422,
            "request body",
        ),
        (
            "POST",
            "/api/v1/images",
            json!({"name": "../etc", "kernel": "k"}),
            422,
            "image name",
        ),
        (
            "POST",
            "/api/v1/images",
            json!({"name": "x", "kernel": "../../etc/passwd"}),
            422,
            "boot file",
        ),
        (
            "POST",
            "/api/v1/images",
            json!({"name": "x", "kernel": "missing/vmlinuz"}),
            422,
            "upload it first",
        ),
        (
            "POST",
            "/api/v1/images",
            json!({"name": "x", "kernel": "debian12/vmlinuz", "transport": "ftp"}),
            422,
            "transport",
        ),
        ("PUT", "/api/v1/pools/a%20b", json!({}), 422, "pool name"),
        (
            "PUT",
            "/api/v1/settings/unknown",
            json!({"policy": "wait", "poll_seconds": 0}),
            422,
            "poll_seconds",
        ),
    ];
    for (method, path, body, status, needle) in cases {
        let reply = api.call(method, path, Some(body.clone()));
        assert_eq!(reply.status, *status, "{method} {path} {body}: {reply:?}");
        let message = reply.body["error"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{method} {path}: {message:?}");
    }
    let garbage = api.raw(
        "PUT",
        "/api/v1/machines/525400123456",
        Some(b"{nope".to_vec()),
        true,
    );
    assert_eq!(garbage.status, 422, "{garbage:?}");
    // Bad query strings, bodies and methods get JSON errors too.
    for (method, path, body, status) in [
        ("GET", "/api/v1/machines?limit=lots", None, 400),
        ("GET", "/api/v1/events?since_ms=-1", None, 400),
        ("POST", "/api/v1/login", Some(b"user=alice".to_vec()), 422),
        ("PATCH", "/api/v1/machines/525400123456", None, 405),
    ] {
        let reply = api.raw(method, path, body, true);
        assert_eq!(reply.status, status, "{method} {path}: {reply:?}");
        assert!(
            reply.body["error"].is_string(),
            "{method} {path}: {reply:?}"
        );
    }
    assert!(api
        .ok("GET", "/api/v1/machines", None)
        .as_array()
        .unwrap()
        .is_empty());
    assert!(api
        .ok("GET", "/api/v1/images", None)
        .as_array()
        .unwrap()
        .is_empty());

    // Uploads: stored whole, hostile paths refused, too big refused, and
    // no temporary file is left behind.
    let content = vec![7u8; 300_000];
    let stored = api.raw(
        "PUT",
        "/api/v1/files/new/disk.img",
        Some(content.clone()),
        true,
    );
    assert_eq!(stored.status, 201, "{stored:?}");
    assert_eq!(
        std::fs::read(root.path().join("new/disk.img")).unwrap(),
        content
    );
    for path in [
        "/api/v1/files/..%2Fescape",
        "/api/v1/files/a/%2E%2E/%2E%2E/escape",
    ] {
        let reply = api.raw("PUT", path, Some(b"x".to_vec()), true);
        assert!(
            reply.status == 422 || reply.status == 404,
            "{path}: {reply:?}"
        );
    }
    assert!(!root.path().parent().unwrap().join("escape").exists());
    let big = api.raw(
        "PUT",
        "/api/v1/files/new/big.img",
        Some(vec![0u8; 2 << 20]),
        true,
    );
    assert_eq!(big.status, 413, "{big:?}");
    let leftovers: Vec<_> = std::fs::read_dir(root.path().join("new"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, ["disk.img"]);
}

/// Security review finding 16: a corrupt inventory database stopped DHCP,
/// TFTP and HTTP along with the panel. Now the data plane serves the
/// inventory it has, and the panel answers every call with the reason.
#[test]
fn a_corrupt_database_takes_down_the_panel_not_the_boots() {
    let root = boot_dir();
    std::fs::write(
        root.path().join("inventory.toml"),
        "[images.debian12]\nkernel = \"debian12/vmlinuz\"\n\n[machines.\"52:54:00:cc:00:02\"]\nimage = \"debian12\"\n",
    )
    .unwrap();
    let state = state_dir();
    std::fs::write(state.path().join("bootfleet.db"), vec![0xa5u8; 64 << 10]).unwrap();
    let server = FullServer::start_with_panel(root.path(), state, |_| {});
    let body = script(&server, "52:54:00:cc:00:02", "");
    assert!(
        body.contains("debian12/vmlinuz"),
        "the data plane boots machines: {body}"
    );
    assert_eq!(
        curl(&server.url("/debian12/vmlinuz"), &[]).body,
        b"debian kernel"
    );
    let api = Api::with_token(server.panel.unwrap(), "bft_0000");
    let reply = api.call("GET", "/api/v1/machines", None);
    assert_eq!(reply.status, 500, "{reply:?}");
    assert!(
        reply.body["error"]
            .as_str()
            .unwrap_or("")
            .contains("cannot be used"),
        "the panel says why: {reply:?}"
    );
}

#[test]
fn the_inventory_file_is_imported_once_and_the_database_survives_restarts() {
    let root = boot_dir();
    std::fs::write(
        root.path().join("inventory.toml"),
        r#"
[unknown]
policy = "wait"
poll_seconds = 7

[images.debian12]
kernel = "debian12/vmlinuz"
initrds = ["debian12/initrd.img"]

[machines."52:54:00:cc:00:01"]
image = "debian12"
hostname = "node01"
"#,
    )
    .unwrap();
    let state = state_dir();
    let state_path = state.path().to_path_buf();
    let server = FullServer::start_with_panel(root.path(), state, |_| {});
    let api = Api::with_token(
        server.panel.unwrap(),
        &add_token(&state_path, "ops", "admin"),
    );
    let machine = api.ok("GET", "/api/v1/machines/52:54:00:cc:00:01", None);
    assert_eq!(machine["hostname"], "node01");
    assert_eq!(machine["image"], "debian12");
    let unknown = api.ok("GET", "/api/v1/settings/unknown", None);
    assert_eq!(unknown, json!({"policy": "wait", "poll_seconds": 7}));
    register(&api, "rocky9");
    api.ok(
        "PUT",
        "/api/v1/machines/52:54:00:cc:00:01",
        Some(json!({ "image": "rocky9" })),
    );
    let audit = api.ok("GET", "/api/v1/audit", None);
    assert!(
        audit.to_string().contains("import:inventory.toml"),
        "{audit}"
    );

    // Restart on the same database: the panel's change stands (the file is
    // not imported over it), and the data plane serves it at once.
    let FullServer { running, state, .. } = server;
    running.stop();
    let server = FullServer::start_with_panel(root.path(), state, |_| {});
    let body = script(&server, "52:54:00:cc:00:01", "");
    assert!(body.contains("rocky9/vmlinuz"), "{body}");
    let api = Api::with_token(
        server.panel.unwrap(),
        &add_token(&state_path, "ops2", "read"),
    );
    assert_eq!(
        api.ok("GET", "/api/v1/images", None)
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn the_panel_serves_tls_with_secure_cookies() {
    if !have_tool("openssl") {
        return;
    }
    let root = boot_dir();
    let state = state_dir();
    let (cert, key) = self_signed_certificate(
        state.path(),
        "/CN=localhost",
        &["-addext", "subjectAltName=DNS:localhost"],
    );
    add_user(state.path(), "alice", "admin");
    let server = FullServer::start_with_panel(root.path(), state, |c| {
        c.panel.tls_cert = Some(cert.clone());
        c.panel.tls_key = Some(key.clone());
    });
    let port = server.panel.unwrap().port();
    let url = format!("https://localhost:{port}/api/v1/login");
    let body = format!(r#"{{"user":"alice","password":"{PASSWORD}"}}"#);
    let login = curl(
        &url,
        &[
            "--cacert",
            cert.to_str().unwrap(),
            "--resolve",
            &format!("localhost:{port}:127.0.0.1"),
            "-H",
            "Content-Type: application/json",
            "--data",
            &body,
        ],
    );
    assert_eq!(login.status, 200, "{}", login.head);
    let cookie = login.header("set-cookie").unwrap();
    assert!(
        cookie.contains("Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    // Plain HTTP on the TLS port gets nothing.
    let plain = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "5",
            &format!("http://{}/", server.panel.unwrap()),
        ])
        .output()
        .unwrap();
    assert!(!plain.status.success() || plain.stdout.is_empty());
}

#[test]
fn the_command_line_manages_machines_and_images_through_the_api() {
    let root = boot_dir();
    let server = FullServer::start_with_panel(root.path(), state_dir(), |_| {});
    let token = add_token(server.state.path(), "cli", "admin");
    let url = format!("http://{}", server.panel.unwrap());
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--url", &url, "--token", &token]);
        bootfleet_cli(&all, "")
    };
    let added = run(&[
        "images",
        "add",
        "debian12",
        "--kernel",
        "debian12/vmlinuz",
        "--initrd",
        "debian12/initrd.img",
        "--cmdline",
        "quiet",
    ]);
    assert!(added.contains(&sha256_hex(b"debian kernel")), "{added}");
    assert!(run(&["images", "list"]).contains("debian12\tdebian12/vmlinuz\tquiet"));
    run(&[
        "machines",
        "assign",
        "debian12",
        "52-54-00-dd-00-01",
        "525400dd0002",
    ]);
    let listed = run(&["machines", "list"]);
    assert!(
        listed.contains("52:54:00:dd:00:02\t-\tdebian12\tassigned"),
        "{listed}"
    );
    assert!(script(&server, "52:54:00:dd:00:01", "").contains("debian12/vmlinuz"));
    run(&["machines", "forget", "52:54:00:dd:00:01"]);
    assert!(!run(&["machines", "list"]).contains("52:54:00:dd:00:01"));
    // A refused call exits non-zero with the API's message.
    let output = Command::new(env!("CARGO_BIN_EXE_bootfleet"))
        .args([
            "images", "remove", "debian12", "--url", &url, "--token", &token,
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("assigned to 52:54:00:dd:00:02"));
}

/// The inventory database on a full disk (a 512 KiB tmpfs in a private
/// mount namespace): the data plane goes on answering every machine, the
/// API goes on reading, and the failure is logged once, not per batch.
#[test]
fn a_full_database_disk_costs_the_events_not_the_boots() {
    if !crate::common::can_make_namespaces() || !have_tool("unshare") {
        return;
    }
    let root = boot_dir();
    let work = state_dir();
    let state = work.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (http, panel, tftp) = (free_port(), free_port(), free_port());
    let token_file = work.path().join("token");
    let log = work.path().join("server.log");
    let binary = env!("CARGO_BIN_EXE_bootfleet");
    let mut server = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size=512k bootfleet-test {state:?} \
             && {binary:?} tokens add t --scope read --state-dir {state:?} > {token_file:?} \
             && exec {binary:?} serve --root {root:?} --state-dir {state:?} \
                --tftp-listen 127.0.0.1:{tftp} --http-listen 127.0.0.1:{http} --panel-listen 127.0.0.1:{panel}",
            root = root.path()
        ))
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let panel_addr: std::net::SocketAddr = format!("127.0.0.1:{panel}").parse().unwrap();
    eventually("the server to start", || {
        std::net::TcpStream::connect(panel_addr).ok()
    });
    let api = Api::with_token(
        panel_addr,
        std::fs::read_to_string(&token_file).unwrap().trim(),
    );

    // 3,000 machines nobody listed, each with long iPXE facts: far more
    // than the disk holds.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let long = "x".repeat(200);
    for i in 0..3000u32 {
        let mac = format!("52:54:00:ee:{:02x}:{:02x}", i >> 8, i & 0xff);
        let url = format!(
            "http://127.0.0.1:{http}/boot/{mac}.ipxe?serial={long}&manufacturer={long}&product={long}"
        );
        let body = agent
            .get(&url)
            .call()
            .unwrap_or_else(|e| panic!("machine {i} got no script: {e}"))
            .into_body()
            .read_to_string()
            .unwrap();
        assert!(body.starts_with("#!ipxe"), "{body}");
    }
    let text = eventually("the failure to be logged", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("boot events not stored").then_some(text)
    });
    // Still serving, and still readable.
    let body = agent
        .get(&format!("http://127.0.0.1:{http}/boot.ipxe"))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    assert!(body.starts_with("#!ipxe"));
    assert_eq!(api.call("GET", "/api/v1/fleet", None).status, 200);
    assert!(
        server.try_wait().unwrap().is_none(),
        "the server is still running"
    );
    assert_eq!(
        text.matches("boot events not stored").count(),
        1,
        "one line, not one per batch:\n{text}"
    );
    let _ = Command::new("kill").arg(server.id().to_string()).status();
    let _ = server.wait();
}

/// Issue 24: an image booted through the Secure Boot chain says whether
/// its kernel carries a signature, and the Images page warns when Secure
/// Boot machines will refuse it.
#[test]
fn secure_boot_images_warn_when_their_kernel_is_not_signed() {
    let root = boot_dir();
    let (kernel, _) =
        crate::qemu_lan::newest_kernel().expect("a kernel in /boot (linux-image-amd64)");
    let signed = std::fs::read(kernel).unwrap();
    let mut unsigned = signed.clone();
    let pe = u32::from_le_bytes(unsigned[0x3c..0x40].try_into().unwrap()) as usize;
    unsigned[pe + 24 + 112 + 32..pe + 24 + 112 + 40].fill(0);
    for (dir, bytes) in [("signed", &signed), ("unsigned", &unsigned)] {
        std::fs::create_dir_all(root.path().join(dir)).unwrap();
        std::fs::write(root.path().join(dir).join("vmlinuz"), bytes).unwrap();
    }
    let server = FullServer::start_with_panel(root.path(), state_dir(), |_| {});
    let api = Api::with_token(
        server.panel.unwrap(),
        &add_token(server.state.path(), "ops", "admin"),
    );
    for (name, kernel, secure_boot) in [
        ("signed", "signed/vmlinuz", true),
        ("unsigned", "unsigned/vmlinuz", true),
        ("not-efi", "debian12/vmlinuz", true),
        ("plain", "unsigned/vmlinuz", false),
    ] {
        let reply = api.call(
            "POST",
            "/api/v1/images",
            Some(json!({"name": name, "kernel": kernel, "secure_boot": secure_boot})),
        );
        assert_eq!(reply.status, 201, "{reply:?}");
    }
    let images = eventually("every kernel's signature checked", || {
        let images = api.ok("GET", "/api/v1/images", None);
        images
            .as_array()
            .unwrap()
            .iter()
            .all(|i| !i["kernel_signature"].is_null())
            .then_some(images)
    });
    let view = |name: &str| {
        images
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(view("signed")["kernel_signature"], "signed");
    assert_eq!(view("signed")["secure_boot"], true);
    assert!(view("signed")["warning"].is_null(), "{}", view("signed"));
    assert_eq!(view("unsigned")["kernel_signature"], "unsigned");
    assert!(
        view("unsigned")["warning"]
            .as_str()
            .is_some_and(|w| w.contains("has no signature, so Secure Boot machines will refuse it")),
        "{}",
        view("unsigned")
    );
    assert_eq!(view("not-efi")["kernel_signature"], "not-efi");
    assert!(
        view("not-efi")["warning"]
            .as_str()
            .is_some_and(|w| w.contains("not an EFI image")),
        "{}",
        view("not-efi")
    );
    // Without Secure Boot nobody needs the signature: no warning.
    assert_eq!(view("plain")["kernel_signature"], "unsigned");
    assert!(view("plain")["warning"].is_null(), "{}", view("plain"));
}
