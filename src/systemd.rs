//! Running under systemd: sockets passed by socket activation
//! (`systemd/bootfleet.socket`), readiness and status (`Type=notify`), the
//! watchdog (`WatchdogSec=`), and log lines with journald priorities.
//! Everything here does nothing when systemd did not ask for it (no
//! `LISTEN_FDS`, `NOTIFY_SOCKET`, `WATCHDOG_USEC` or `JOURNAL_STREAM`), so
//! the same binary runs by hand, in a container or under systemd.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{FromRawFd, RawFd};
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{error, info, warn};

use bootfleet::app::Monitor;

/// The sockets systemd passed (sd_listen_fds(3)).
#[derive(Default)]
pub struct PassedSockets {
    pub tftp: Option<UdpSocket>,
    pub http: Option<TcpListener>,
    pub panel: Option<TcpListener>,
}

/// Takes the sockets systemd passed. The datagram socket is TFTP. A stream
/// socket named `panel` (`FileDescriptorName=`), or bound to the panel's
/// configured address, is the panel's; the other stream socket is HTTP.
pub fn passed_sockets(panel_listen: Option<SocketAddr>) -> PassedSockets {
    let mut passed = PassedSockets::default();
    let Ok(fds) = sd_notify::listen_fds_with_names() else {
        return passed;
    };
    for (fd, name) in fds {
        match socket_type(fd) {
            Some(libc::SOCK_DGRAM) if passed.tftp.is_none() => {
                // SAFETY: systemd passed this open socket to this process.
                passed.tftp = Some(unsafe { UdpSocket::from_raw_fd(fd) });
            }
            Some(libc::SOCK_STREAM) => {
                // SAFETY: as above.
                let listener = unsafe { TcpListener::from_raw_fd(fd) };
                let is_panel = name == "panel"
                    || (name != "http"
                        && panel_listen.is_some_and(|want| {
                            listener
                                .local_addr()
                                .is_ok_and(|have| same_address(want, have))
                        }));
                let slot = if is_panel {
                    &mut passed.panel
                } else {
                    &mut passed.http
                };
                if slot.is_none() {
                    *slot = Some(listener);
                } else {
                    warn!(
                        fd,
                        name, "an extra stream socket was passed by systemd; ignored"
                    );
                }
            }
            _ => warn!(
                fd,
                name, "a socket systemd passed is not one bootfleet uses; ignored"
            ),
        }
    }
    for (what, socket) in [
        ("TFTP", passed.tftp.as_ref().map(|s| s.local_addr())),
        ("HTTP", passed.http.as_ref().map(|s| s.local_addr())),
        ("panel", passed.panel.as_ref().map(|s| s.local_addr())),
    ] {
        if let Some(Ok(address)) = socket {
            info!(%address, "{what} socket passed by systemd (socket activation)");
        }
    }
    passed
}

/// `want` (from the config; its IP may be unspecified) names `have`.
fn same_address(want: SocketAddr, have: SocketAddr) -> bool {
    want.port() == have.port() && (want.ip().is_unspecified() || want.ip() == have.ip())
}

fn socket_type(fd: RawFd) -> Option<libc::c_int> {
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a plain getsockopt into a local integer.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut kind as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(kind)
}

/// How often `STATUS=` is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Tells systemd the server is ready (every listener bound, every engine
/// started), then keeps its status line fresh and, with `WatchdogSec=`,
/// pings the watchdog while every data-plane worker shows signs of life.
/// A worker silent for half the watchdog interval stops the pings, so
/// systemd restarts the service (`Restart=on-failure`).
pub fn ready(monitor: Monitor) {
    let status = monitor.status_line();
    if let Err(error) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&status)]) {
        warn!(%error, "cannot tell systemd that bootfleet is ready (NOTIFY_SOCKET)");
    }
    let watchdog = sd_notify::watchdog_enabled();
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Some(interval) = watchdog {
        info!(
            interval_ms = interval.as_millis() as u64,
            "systemd watchdog enabled; pinged while every data-plane worker is alive"
        );
    }
    let spawned = std::thread::Builder::new()
        .name("bootfleet-systemd".into())
        .spawn(move || keep_systemd_informed(&monitor, watchdog));
    if let Err(error) = spawned {
        warn!(%error, "cannot start the systemd status and watchdog thread");
    }
}

fn keep_systemd_informed(running: &Monitor, watchdog: Option<Duration>) {
    // Ping at half the interval (as sd_watchdog_enabled(3) advises);
    // a worker counts as silent after half the interval too.
    let tick = watchdog.map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
    let allowed = watchdog.map_or(Duration::MAX, |w| (w / 2).max(Duration::from_secs(2)));
    let mut since_status = Duration::ZERO;
    let mut complained = false;
    while !running.stopping() {
        std::thread::sleep(tick);
        since_status += tick;
        if since_status >= STATUS_EVERY {
            since_status = Duration::ZERO;
            let _ = sd_notify::notify(&[NotifyState::Status(&running.status_line())]);
        }
        if watchdog.is_none() {
            continue;
        }
        let silent = running.silent_workers(allowed);
        if silent.is_empty() {
            complained = false;
            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
        } else if !complained {
            complained = true;
            let names: Vec<String> = silent
                .iter()
                .map(|(name, quiet)| format!("{name} ({} ms)", quiet.as_millis()))
                .collect();
            error!(workers = %names.join(", "),
                "data-plane workers stopped responding; no watchdog ping, so systemd restarts bootfleet");
        }
    }
}

/// Tells systemd the server is stopping.
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// Whether standard error is the journal's stream (`JOURNAL_STREAM` names
/// its device and inode), so log lines should go to journald with their
/// priorities instead of as plain text.
pub fn logging_to_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((device, inode)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a whole `stat` into the buffer when it succeeds.
    if unsafe { libc::fstat(2, stat.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstat succeeded.
    let stat = unsafe { stat.assume_init() };
    device.parse() == Ok(stat.st_dev) && inode.parse() == Ok(stat.st_ino)
}
