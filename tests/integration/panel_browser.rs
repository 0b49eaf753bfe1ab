//! The web panel in headless Chromium, driven through chromedriver
//! (WebDriver, from Rust with fantoccini): an operator logs in, adopts a
//! discovered machine, puts it in a pool, assigns the pool an image, and the
//! data plane's next script for that machine boots the new kernel.
//!
//! With `BOOTFLEET_SCREENSHOTS=docs` the pages it visits are saved as
//! `docs/panel-*.png` (how the README's screenshots are made).

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::common::{curl, have_tool, FullServer};
use crate::panel::{add_token, add_user, boot_dir, register, script, state_dir, Api, PASSWORD};

/// chromedriver on a free loopback port, killed on drop.
pub struct Driver {
    child: Child,
    pub url: String,
}

impl Driver {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            url: format!("http://{addr}"),
        }
    }

    /// A headless Chromium session.
    pub async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--window-size=1400,900"] }),
        );
        ClientBuilder::rustls()
            .unwrap()
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a Chromium session through chromedriver")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether Chromium and chromedriver are installed (loudly, as for every tool).
pub fn have_browser() -> bool {
    have_tool("chromium") && have_tool("chromedriver")
}

/// Where screenshots go: `docs/` when asked for, otherwise nowhere.
fn screenshot_dir() -> Option<PathBuf> {
    (std::env::var("BOOTFLEET_SCREENSHOTS").ok().as_deref() == Some("docs"))
        .then(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs"))
}

pub async fn shot(client: &Client, name: &str) {
    let png = client.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    if let Some(dir) = screenshot_dir() {
        std::fs::write(dir.join(format!("panel-{name}.png")), png).unwrap();
    }
}

/// Waits until the status line says `needle` (or fails with what it says).
pub async fn flash(client: &Client, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = text_of(client, "#flash").await;
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected {needle:?} in the status line, it says {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn open(client: &Client, base: &str, page: &str, ready: &str) {
    client.goto(&format!("{base}/{page}")).await.unwrap();
    client
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(ready))
        .await
        .unwrap_or_else(|e| panic!("{page}: {ready} did not appear: {e}"));
}

/// Runs `act` on the element `css`, finding it again when the page
/// re-renders between finding and acting (a stale element).
async fn on_element<T, F, Fut>(client: &Client, css: &str, act: F) -> T
where
    F: Fn(fantoccini::elements::Element) -> Fut,
    Fut: std::future::Future<Output = Result<T, fantoccini::error::CmdError>>,
{
    let mut tries = 0;
    loop {
        let element = client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"));
        match act(element).await {
            Ok(value) => return value,
            Err(error) if tries < 20 => {
                tries += 1;
                eprintln!("{css}: {error}; finding it again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("{css}: {error}"),
        }
    }
}

/// The visible text of the element `css`.
pub async fn text_of(client: &Client, css: &str) -> String {
    on_element(client, css, |e| async move { e.text().await }).await
}

/// Types `text` into the element `css`.
pub async fn type_into(client: &Client, css: &str, text: &str) {
    on_element(client, css, |e| async move { e.send_keys(text).await }).await
}

pub async fn click(client: &Client, css: &str) {
    on_element(client, css, |e| async move { e.click().await }).await
}

/// Logs `user` (password [`PASSWORD`]) in on the panel at `base`; returns
/// once the machines page shows.
pub async fn log_in(client: &Client, base: &str, user: &str) {
    open(client, base, "", "#login-user").await;
    type_into(client, "#login-user", user).await;
    type_into(client, "#login-password", PASSWORD).await;
    click(client, "#login-submit").await;
    client
        .wait()
        .for_element(Locator::Css("#machines"))
        .await
        .unwrap();
}

/// A small fleet for the screenshots: machines in several states.
fn populate(server: &FullServer, api: &Api) {
    for (i, state) in ["booted", "booted", "kernel", "script", "assigned"]
        .iter()
        .enumerate()
    {
        let mac = format!("52:54:00:10:00:{:02x}", i + 1);
        api.ok(
            "PUT",
            &format!("/api/v1/machines/{mac}"),
            Some(
                json!({ "image": "debian12", "hostname": format!("node{:02}", i + 1),
                "labels": ["rack=r2", "role=compute"] }),
            ),
        );
        // Each machine fetches from its own address: the router tells
        // machines apart by client address.
        let ip = format!("127.0.1.{}", i + 1);
        let as_machine = |path: &str| curl(&server.url(path), &["--interface", &ip]);
        let query = format!("?serial=SN10{i}&manufacturer=Supermicro&product=X11&platform=efi");
        if *state != "assigned" {
            as_machine(&format!("/boot/{mac}.ipxe{query}"));
        }
        if *state == "booted" || *state == "kernel" {
            as_machine("/debian12/vmlinuz");
        }
        if *state == "booted" {
            as_machine("/debian12/initrd.img");
        }
    }
}

#[test]
fn an_operator_adopts_pools_and_assigns_in_the_browser() {
    if !have_browser() {
        return;
    }
    let root = boot_dir();
    let state = state_dir();
    add_user(state.path(), "alice", "admin");
    // Machines that stop mid-boot show as stuck after a second.
    let server = FullServer::start_with_panel(root.path(), state, |c| {
        c.panel.stuck_after = Duration::from_secs(1);
    });
    let panel = server.panel.unwrap();
    let base = format!("http://{panel}");
    let api = Api::with_token(panel, &add_token(server.state.path(), "setup", "admin"));
    register(&api, "debian12");
    register(&api, "rocky9");
    populate(&server, &api);

    // A machine nobody listed powers on: iPXE asks for its script with its facts.
    let mac = "52:54:00:ab:cd:01";
    let before = script(
        &server,
        "52%3A54%3A00%3Aab%3Acd%3A01",
        "?serial=NEW-001&manufacturer=Dell&product=R650&platform=efi&buildarch=x86_64",
    );
    assert!(!before.contains("vmlinuz"), "{before}");

    let driver = Driver::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = driver.browser().await;

        log_in(&client, &base, "alice").await;
        let who = text_of(&client, "#who").await;
        assert_eq!(who, "alice (admin)");
        let session_cookie = client.get_named_cookie("bf_session").await.unwrap();
        assert_eq!(session_cookie.http_only(), Some(true));
        // HttpOnly: page scripts cannot read the session.
        let visible = client
            .execute("return document.cookie", vec![])
            .await
            .unwrap();
        assert!(!visible.as_str().unwrap_or_default().contains("bf_session"));
        shot(&client, "machines").await;

        // Adopt the discovered machine, its facts on screen.
        open(
            &client,
            &base,
            "#/discovered",
            &format!("tr[data-mac='{mac}']"),
        )
        .await;
        let text = text_of(&client, &format!("tr[data-mac='{mac}']")).await;
        assert!(text.contains("Dell") && text.contains("NEW-001"), "{text}");
        // What unknown machines get: wait for an assignment, asking every 5 s.
        client
            .find(Locator::Css("#unknown-policy"))
            .await
            .unwrap()
            .select_by_value("wait")
            .await
            .unwrap();
        let poll = client.find(Locator::Css("#unknown-poll")).await.unwrap();
        poll.clear().await.unwrap();
        poll.send_keys("5").await.unwrap();
        click(&client, "#unknown-form button[type=submit]").await;
        flash(&client, "unknown machines now get wait for an assignment").await;
        let waiting = script(&server, "52:54:00:ab:cd:99", "");
        assert!(
            waiting.contains("sleep 5") && waiting.contains("chain"),
            "{waiting}"
        );
        shot(&client, "discovered").await;
        click(
            &client,
            &format!("tr[data-mac='{mac}'] input[type=checkbox]"),
        )
        .await;
        client
            .find(Locator::Css("#adopt-image"))
            .await
            .unwrap()
            .select_by_value("debian12")
            .await
            .unwrap();
        click(&client, "#adopt-button").await;
        flash(&client, "adopted 1 machine").await;

        // Put it in a new pool from the machines table.
        open(
            &client,
            &base,
            "#/machines?q=ab:cd",
            &format!("tr[data-mac='{mac}']"),
        )
        .await;
        click(
            &client,
            &format!("tr[data-mac='{mac}'] input[type=checkbox]"),
        )
        .await;
        type_into(&client, "#assign-pool", "rack1").await;
        click(&client, "#pool-add-button").await;
        flash(&client, "added to pool rack1").await;

        // Assign the pool an image.
        open(&client, &base, "#/pools", "select[data-pool='rack1']").await;
        client
            .find(Locator::Css("select[data-pool='rack1']"))
            .await
            .unwrap()
            .select_by_value("rocky9")
            .await
            .unwrap();
        click(&client, "button[data-pool-assign='rack1']").await;
        flash(&client, "1 machine(s) of rack1 now boot rocky9").await;

        // A pool by label, given an image while empty, catches a machine
        // adopted later with that label, and the list says why it boots it.
        for (css, text) in [("#pool-name", "rack7"), ("#pool-selector", "rack=r7")] {
            type_into(&client, css, text).await;
        }
        click(&client, "#create-pool button[type='submit']").await;
        flash(&client, "pool rack7 saved").await;
        client
            .wait()
            .for_element(Locator::Css("select[data-pool='rack7']"))
            .await
            .unwrap()
            .select_by_value("rocky9")
            .await
            .unwrap();
        click(&client, "button[data-pool-assign='rack7']").await;
        flash(&client, "0 machine(s) of rack7 now boot rocky9").await;
        shot(&client, "pools").await;
        let late = "52:54:00:ab:cd:77";
        api.ok(
            "PUT",
            &format!("/api/v1/machines/{late}"),
            Some(json!({ "labels": ["rack=r7"] })),
        );
        assert!(script(&server, late, "").contains("rocky9/vmlinuz"));
        open(
            &client,
            &base,
            "#/machines?q=ab:cd:77",
            &format!("tr[data-mac='{late}']"),
        )
        .await;
        let row = text_of(&client, &format!("tr[data-mac='{late}']")).await;
        assert!(row.contains("rocky9 (pool rack7)"), "{row}");

        // The data plane's next answer for that machine boots the new kernel.
        let after = script(&server, mac, "");
        assert!(after.contains("rocky9/vmlinuz"), "{after}");

        // Its timeline shows the script fetch live.
        open(&client, &base, &format!("#/machine/{mac}"), "#timeline").await;
        let kernel = curl(&server.url("/rocky9/vmlinuz"), &[]);
        assert_eq!(kernel.status, 200);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let timeline = text_of(&client, "#timeline").await;
            if timeline.contains("image rocky9") && timeline.contains("rocky9/vmlinuz") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the kernel fetch never reached the live timeline: {timeline}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        shot(&client, "machine").await;

        // Edit the machine: name, labels, a command-line addition.
        for (css, text) in [
            ("#machine-hostname", "web01"),
            ("#machine-labels", "rack=r9 role=web"),
            ("#machine-cmdline", "console=ttyS1"),
        ] {
            let field = client.find(Locator::Css(css)).await.unwrap();
            field.clear().await.unwrap();
            field.send_keys(text).await.unwrap();
        }
        click(&client, "#machine-save").await;
        flash(&client, "saved").await;
        let edited = script(&server, mac, "");
        assert!(
            edited.contains("rocky9/vmlinuz") && edited.contains("console=ttyS1"),
            "{edited}"
        );
        let listed = api.ok("GET", "/api/v1/machines?label=rack=r9", None);
        assert_eq!(listed[0]["hostname"], "web01", "{listed}");

        open(&client, &base, "#/fleet", "#stuck").await;
        let fleet = text_of(&client, "#fleet").await;
        assert!(
            fleet.contains("booted") && fleet.contains("52:54:00:10:00:03"),
            "{fleet}"
        );
        shot(&client, "fleet").await;
        // Upload a file through the Images page, then register it as an image.
        let upload = tempfile::tempdir().unwrap();
        let local = upload.path().join("vmlinuz");
        std::fs::write(&local, vec![42u8; 3 << 20]).unwrap();
        open(&client, &base, "#/images", "#images").await;
        type_into(&client, "#upload-file", local.to_str().unwrap()).await;
        type_into(&client, "#upload-dir", "alma9").await;
        click(&client, "#upload-button").await;
        flash(&client, "uploaded alma9/vmlinuz").await;
        assert_eq!(
            std::fs::read(root.path().join("alma9/vmlinuz")).unwrap(),
            std::fs::read(&local).unwrap()
        );
        client
            .wait()
            .for_element(Locator::Css("#image-name"))
            .await
            .unwrap();
        type_into(&client, "#image-name", "alma9").await;
        type_into(&client, "#image-kernel", "alma9/vmlinuz").await;
        type_into(&client, "#image-cmdline", "console=ttyS0").await;
        // For machines with Secure Boot on; the uploaded "kernel" is no
        // EFI image, and the page says they will refuse it once the image
        // check has read its header.
        click(&client, "#image-secure-boot").await;
        click(&client, "#register-image button[type=submit]").await;
        flash(&client, "registered alma9").await;
        client
            .wait()
            .for_element(Locator::Css("tr[data-image='alma9']"))
            .await
            .unwrap();
        let row = text_of(&client, "tr[data-image='alma9']").await;
        assert!(row.contains("3.0 MiB"), "size shown: {row}");
        assert!(row.contains("Secure Boot"), "marked Secure Boot: {row}");
        let deadline = Instant::now() + Duration::from_secs(15);
        let warning = loop {
            // Away and back: the Images page reads the images afresh.
            open(&client, &base, "#/audit", "#audit").await;
            open(&client, &base, "#/images", "tr[data-image='alma9']").await;
            let row = text_of(&client, "tr[data-image='alma9']").await;
            if row.contains("not an EFI image") || Instant::now() > deadline {
                break row;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        assert!(
            warning.contains("Secure Boot: the kernel alma9/vmlinuz is not an EFI image"),
            "the Images page warns: {warning}"
        );
        shot(&client, "images").await;
        open(&client, &base, "#/audit", "#audit").await;
        let audit = text_of(&client, "#audit").await;
        assert!(
            audit.contains("pool.assign") && audit.contains("alice"),
            "{audit}"
        );
        shot(&client, "audit").await;

        // An API token made in the panel works at once, and stops when revoked.
        open(&client, &base, "#/tokens", "#token-form").await;
        type_into(&client, "#token-name", "ci").await;
        client
            .find(Locator::Css("#token-scope"))
            .await
            .unwrap()
            .select_by_value("read")
            .await
            .unwrap();
        click(&client, "#token-form button[type=submit]").await;
        flash(&client, "token ci created").await;
        let secret = text_of(&client, "#token-secret").await;
        assert!(secret.starts_with("bft_"), "{secret}");
        let ci = Api::with_token(panel, &secret);
        assert_eq!(ci.call("GET", "/api/v1/machines", None).status, 200);
        assert_eq!(
            ci.call("DELETE", &format!("/api/v1/machines/{mac}"), None)
                .status,
            403,
            "a read token cannot forget machines"
        );
        click(&client, "tr[data-token='ci'] button").await;
        let question = client.get_alert_text().await.unwrap();
        assert!(question.contains("Revoke token ci?"), "{question}");
        client.accept_alert().await.unwrap();
        flash(&client, "revoked ci").await;
        assert_eq!(ci.call("GET", "/api/v1/machines", None).status, 401);

        // Logging out leaves the API closed to this browser.
        click(&client, "#logout").await;
        client
            .wait()
            .for_element(Locator::Css("#login:not([hidden])"))
            .await
            .unwrap();
        let status = client
            .execute(
                "return fetch('/api/v1/machines').then(r => r.status)",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(status, json!(401));
        client.close().await.unwrap();
    });
}

/// Replaces the text of the input `css` with `text`.
async fn retype(client: &Client, css: &str, text: &str) {
    on_element(client, css, |e| async move { e.clear().await }).await;
    type_into(client, css, text).await;
}

/// A server with its panel, the administrator `alice`, an admin token's
/// client and the image `debian12`; and the panel's URL.
fn panel_with_alice() -> (tempfile::TempDir, FullServer, Api, String) {
    let root = boot_dir();
    let state = state_dir();
    add_user(state.path(), "alice", "admin");
    let server = FullServer::start_with_panel(root.path(), state, |_| {});
    let panel = server.panel.unwrap();
    let api = Api::with_token(panel, &add_token(server.state.path(), "setup", "admin"));
    register(&api, "debian12");
    (root, server, api, format!("http://{panel}"))
}

#[test]
fn an_operator_edits_an_image_and_rolls_it_back_in_the_browser() {
    if !have_browser() {
        return;
    }
    let (_root, server, api, base) = panel_with_alice();
    let mac = "52:54:00:ab:ee:01";
    api.ok(
        "PUT",
        &format!("/api/v1/machines/{mac}"),
        Some(json!({ "image": "debian12" })),
    );
    assert!(script(&server, mac, "").contains("image=debian12"));

    let driver = Driver::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = driver.browser().await;
        log_in(&client, &base, "alice").await;
        open(&client, &base, "#/images", "tr[data-image='debian12']").await;
        click(&client, "tr[data-image='debian12'] button.edit").await;
        client
            .wait()
            .for_element(Locator::Css("#edit-cmdline"))
            .await
            .unwrap();
        // The form holds the image as it is; the edit saves revision 2.
        let cmdline = client
            .find(Locator::Css("#edit-cmdline"))
            .await
            .unwrap()
            .prop("value")
            .await
            .unwrap();
        assert_eq!(cmdline.as_deref(), Some("console=ttyS0 image=debian12"));
        retype(
            &client,
            "#edit-cmdline",
            "console=ttyS1 edited-in-the-panel",
        )
        .await;
        click(&client, "#edit-image button[type=submit]").await;
        flash(&client, "debian12: revision 2 saved").await;
        let next = script(&server, mac, "");
        assert!(next.contains("console=ttyS1 edited-in-the-panel"), "{next}");
        let row = text_of(&client, "tr[data-image='debian12']").await;
        assert!(
            row.starts_with("debian12\n2") || row.starts_with("debian12 2"),
            "revision 2 listed: {row}"
        );
        assert!(row.contains("console=ttyS1 edited-in-the-panel"), "{row}");
        client
            .wait()
            .for_element(Locator::Css(
                "#image-revisions tr[data-revision='1'] button.rollback",
            ))
            .await
            .unwrap();
        let history = text_of(&client, "#image-revisions").await;
        assert!(
            history.contains(
                "cmdline \"console=ttyS0 image=debian12\" -> \"console=ttyS1 edited-in-the-panel\""
            ) && history.contains("alice"),
            "{history}"
        );
        shot(&client, "image-edit").await;

        // A rollback asks first: dismissed, nothing changes.
        click(
            &client,
            "#image-revisions tr[data-revision='1'] button.rollback",
        )
        .await;
        let question = client.get_alert_text().await.unwrap();
        assert!(
            question.contains("Roll debian12 back to revision 1"),
            "{question}"
        );
        client.dismiss_alert().await.unwrap();
        assert!(script(&server, mac, "").contains("edited-in-the-panel"));
        click(
            &client,
            "#image-revisions tr[data-revision='1'] button.rollback",
        )
        .await;
        client.accept_alert().await.unwrap();
        flash(&client, "debian12: revision 3 restores revision 1").await;
        let back = script(&server, mac, "");
        assert!(back.contains("console=ttyS0 image=debian12"), "{back}");

        // Bulk assignment has no default: nothing chosen does nothing, and
        // a choice is confirmed with its count before anything changes.
        register(&api, "rocky9");
        open(
            &client,
            &base,
            "#/machines",
            &format!("tr[data-mac='{mac}']"),
        )
        .await;
        click(
            &client,
            &format!("tr[data-mac='{mac}'] input[type=checkbox]"),
        )
        .await;
        click(&client, "#assign-button").await;
        flash(&client, "choose an image").await;
        client
            .find(Locator::Css("#assign-image"))
            .await
            .unwrap()
            .select_by_value("rocky9")
            .await
            .unwrap();
        click(&client, "#assign-button").await;
        let question = client.get_alert_text().await.unwrap();
        assert_eq!(
            question,
            "Assign rocky9 to 1 machine(s)? They boot it from their next script."
        );
        client.dismiss_alert().await.unwrap();
        assert!(script(&server, mac, "").contains("image=debian12"));
        click(&client, "#assign-button").await;
        client.accept_alert().await.unwrap();
        flash(&client, "1 machine(s) now boot rocky9").await;
        assert!(script(&server, mac, "").contains("image=rocky9"));
        client.close().await.unwrap();
    });
}

/// Whether the page at the current size is wider than the window.
async fn page_overflows(client: &Client) -> (bool, String) {
    let widths = client
        .execute(
            "return [document.documentElement.scrollWidth, window.innerWidth]",
            vec![],
        )
        .await
        .unwrap();
    let (page, window) = (widths[0].as_u64().unwrap(), widths[1].as_u64().unwrap());
    (
        page > window,
        format!("page {page} px in a {window} px window"),
    )
}

#[test]
fn the_panel_fits_a_phone_and_a_long_fact_does_not_widen_it() {
    if !have_browser() {
        return;
    }
    let (_root, server, _api, base) = panel_with_alice();
    // A machine whose firmware sends a very long manufacturer.
    let long = "VeryLongVendorName".repeat(12);
    script(
        &server,
        "52:54:00:ab:ff:01",
        &format!("?manufacturer={long}&serial=S-1"),
    );

    let driver = Driver::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = driver.browser().await;
        log_in(&client, &base, "alice").await;
        let row = "#discovered tr[data-mac='52:54:00:ab:ff:01']";
        open(&client, &base, "#/discovered", row).await;
        // At desktop width the long value is cut, whole on hover.
        let cell = client
            .find(Locator::Css(&format!("{row} td.fact")))
            .await
            .unwrap();
        let title = cell.attr("title").await.unwrap().unwrap_or_default();
        assert!(
            title.starts_with("VeryLongVendorName") && title.len() > 100,
            "{title}"
        );
        let width = client
            .execute(
                "return document.querySelector(arguments[0]).getBoundingClientRect().width",
                vec![json!(format!("{row} td.fact"))],
            )
            .await
            .unwrap();
        assert!(
            width.as_f64().unwrap() < 300.0,
            "the cell is {width} px wide"
        );
        let (wide, said) = page_overflows(&client).await;
        assert!(!wide, "desktop: {said}");
        // Missing facts are dashes styled as placeholders, not data.
        assert!(client
            .find(Locator::Css(&format!("{row} td .placeholder")))
            .await
            .is_ok());

        // A phone, 390 px wide: no page is wider than the window.
        client.set_window_size(390, 844).await.unwrap();
        for (page, ready) in [
            ("#/discovered", row),
            ("#/machines", "#machines"),
            ("#/images", "tr[data-image='debian12']"),
            ("#/pools", "#create-pool"),
            ("#/fleet", "#view h1"),
        ] {
            open(&client, &base, page, ready).await;
            let (wide, said) = page_overflows(&client).await;
            assert!(!wide, "{page} at 390 px: {said}");
            if page == "#/discovered" {
                shot(&client, "discovered-phone").await;
            }
        }
        client.close().await.unwrap();
    });
}
