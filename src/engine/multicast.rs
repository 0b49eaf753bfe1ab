//! The driver of RFC 2090 multicast TFTP sessions
//! ([`crate::proto::tftp::multicast`]): read requests with the `multicast`
//! option are handed here by the TFTP service (through
//! [`MulticastSessions`], which this hub implements); each file (by its cached
//! identity and the block and window size asked for) has one session with
//! its own socket, the session's transfer ID, from which it sends the
//! OACKs and the group's DATA and to which members send their ACKs.
//!
//! Sessions run as tasks of one tokio thread: a session sends one stream
//! whatever the number of members, so a few sessions are little work next
//! to the unicast engines. Group addresses come from the configured pool,
//! one per running session; a request that finds the pool exhausted is
//! answered by unicast as if it had not asked for multicast.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::boot::hooks::TransferObserver;
use crate::config::MulticastConfig;
use crate::proto::tftp::multicast::{SessionConfig, Transmit};
use crate::proto::tftp::packet;
use crate::server::multicast::{GroupSession, Join, MulticastSessions};
use crate::shutdown::Shutdown;

/// Which session a request joins: the same bytes, sent the same way.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SessionKey {
    name: String,
    /// The cached file's identity: a replaced file is a new session.
    data: usize,
    blksize: u16,
    windowsize: u16,
}

struct Running {
    joins: mpsc::UnboundedSender<Join>,
    group: Ipv4Addr,
}

/// The sessions, and the groups they hold.
pub struct MulticastHub {
    config: MulticastConfig,
    /// Where sessions bind (the TFTP listener's address).
    local: Ipv4Addr,
    retry: Duration,
    max_retries: u32,
    sessions: Mutex<HashMap<SessionKey, Running>>,
    runtime: tokio::runtime::Handle,
    /// Told when each member's part ends, as for unicast reads (boot events).
    observers: Vec<Arc<dyn TransferObserver>>,
    /// The hub itself, for the session tasks it spawns.
    this: std::sync::Weak<MulticastHub>,
}

impl MulticastSessions for MulticastHub {
    /// Adds `join` to its file's session, starting one if needed. Returns
    /// the request when no group is free (the caller serves it by unicast).
    fn join(&self, join: Join) -> Result<(), Box<Join>> {
        let key = SessionKey {
            name: join.name.clone(),
            data: Arc::as_ptr(&join.data) as *const u8 as usize,
            blksize: join.blksize,
            windowsize: join.windowsize,
        };
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let join = match sessions.get(&key) {
            Some(running) => match running.joins.send(join) {
                Ok(()) => return Ok(()),
                // The session just ended: start a new one.
                Err(mpsc::error::SendError(join)) => join,
            },
            None => join,
        };
        let used: Vec<Ipv4Addr> = sessions.values().map(|r| r.group).collect();
        let (first, last) = self.config.groups;
        let Some(group) = (u32::from(first)..=u32::from(last))
            .map(Ipv4Addr::from)
            .find(|g| !used.contains(g))
        else {
            warn!(file = %join.name, "no multicast group free; served by unicast");
            return Err(Box::new(join));
        };
        let (joins, receiver) = mpsc::unbounded_channel();
        let socket = match self.session_socket() {
            Ok(socket) => socket,
            Err(error) => {
                warn!(%error, "cannot open a multicast session socket; served by unicast");
                return Err(Box::new(join));
            }
        };
        let config = SessionConfig {
            group: SocketAddr::from((group, self.config.port)),
            blksize: join.blksize,
            windowsize: join.windowsize,
            retry: self.retry,
            max_retries: self.max_retries,
            gather: self.config.gather,
        };
        info!(file = %join.name, %group, port = self.config.port, blksize = join.blksize, "multicast session started");
        let Some(hub) = self.this.upgrade() else {
            return Err(Box::new(join)); // shutting down
        };
        let _ = joins.send(join);
        sessions.insert(key.clone(), Running { joins, group });
        self.runtime
            .spawn(async move { hub.run_session(key, socket, config, receiver).await });
        Ok(())
    }
}

impl MulticastHub {
    /// Starts the sessions' thread; `local` is the TFTP listener's address.
    pub fn start(
        config: MulticastConfig,
        local: Ipv4Addr,
        retry: Duration,
        max_retries: u32,
        observers: Vec<Arc<dyn TransferObserver>>,
        shutdown: Shutdown,
    ) -> std::io::Result<(Arc<MulticastHub>, std::thread::JoinHandle<()>)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let hub = Arc::new_cyclic(|this| MulticastHub {
            config,
            local,
            retry,
            max_retries,
            sessions: Mutex::new(HashMap::new()),
            runtime: runtime.handle().clone(),
            observers,
            this: this.clone(),
        });
        let thread = std::thread::Builder::new()
            .name("bootfleet-mtftp".into())
            .spawn(move || {
                runtime.block_on(async {
                    shutdown.beat_from_runtime("bootfleet-multicast");
                    shutdown.wait().await
                })
            })?;
        info!(groups = ?hub.config.groups, port = hub.config.port, "multicast TFTP (RFC 2090) enabled");
        Ok((hub, thread))
    }

    fn session_socket(&self) -> std::io::Result<UdpSocket> {
        let _guard = self.runtime.enter();
        let socket = std::net::UdpSocket::bind((self.local, 0))?;
        socket.set_nonblocking(true)?;
        socket.set_multicast_ttl_v4(self.config.ttl)?;
        let interface = self.config.interface.unwrap_or(self.local);
        if !interface.is_unspecified() {
            socket2::SockRef::from(&socket).set_multicast_if_v4(&interface)?;
        }
        UdpSocket::from_std(socket)
    }

    async fn run_session(
        self: Arc<Self>,
        key: SessionKey,
        socket: UdpSocket,
        config: SessionConfig,
        mut joins: mpsc::UnboundedReceiver<Join>,
    ) {
        let group = config.group;
        let blksize = usize::from(config.blksize);
        let Some(first) = joins.recv().await else {
            return;
        };
        let mut session = GroupSession::new(first, config, Instant::now());
        let mut buf = vec![0u8; 1500];
        // A window to the group leaves in one GSO send where the kernel
        // takes it, as unicast windows do.
        let mut data = crate::engine::gso::DataSender::default();
        let group_address = match group {
            SocketAddr::V4(address) => address,
            SocketAddr::V6(_) => unreachable!("multicast groups are IPv4"),
        };
        loop {
            while let Some(transmit) = session.poll_transmit() {
                let sent = match transmit {
                    Transmit::To(to, bytes) => socket.send_to(&bytes, to).await.map(|_| ()),
                    Transmit::Group { first, count } => {
                        let blocks: Vec<(u16, &[u8])> = (first..first + u64::from(count))
                            .map(|block| ((block & 0xFFFF) as u16, session.block(block)))
                            .collect();
                        data.send_all(
                            &socket,
                            Some(group_address),
                            &blocks,
                            blksize + packet::DATA_HEADER_LEN,
                        )
                        .await
                    }
                };
                if let Err(error) = sent {
                    debug!(file = %key.name, %error, "multicast send failed");
                }
            }
            session.report_members(&self.observers);
            if session.is_done() {
                break;
            }
            let deadline = session
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            tokio::select! {
                join = joins.recv() => match join {
                    Some(join) => {
                        debug!(file = %key.name, peer = %join.peer, "joined the multicast session");
                        session.join(join, Instant::now());
                    }
                    None => break,
                },
                received = socket.recv_from(&mut buf) => {
                    let Ok((len, from)) = received else { continue };
                    session.handle_datagram(from, &buf[..len], Instant::now());
                }
                _ = tokio::time::sleep_until(deadline.into()) => session.handle_timeout(Instant::now()),
            }
        }
        // Remove the session first, then take the joins that raced with its
        // end: they start a new one.
        let late: Vec<Join> = {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            sessions.remove(&key);
            joins.close();
            std::iter::from_fn(|| joins.try_recv().ok()).collect()
        };
        let (stats, file_blocks) = session.summary();
        info!(
            file = %key.name, %group, completed = stats.members_completed,
            presumed_complete = stats.members_presumed, dropped = stats.members_dropped,
            master_changes = stats.master_changes, blocks_sent = stats.blocks_sent,
            blocks_repaired = stats.blocks_repaired, file_blocks,
            "multicast session ended"
        );
        // Requests that raced with the end of the session start the next.
        for join in late {
            if let Err(join) = self.join(join) {
                debug!(file = %join.name, "late request not placed; its client will ask again");
            }
        }
    }
}
