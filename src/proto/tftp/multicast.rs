//! RFC 2090 multicast TFTP, sans-I/O: one session sends a file's blocks to
//! a multicast group once, for every client that asked for the file with
//! the `multicast` option.
//!
//! * A client joins with its read request; the session answers it with an
//!   OACK (unicast) naming the group (`multicast` = `addr,port,mc`). The
//!   first client is the master (`mc` = 1); the others listen (`mc` = 0).
//! * The master paces the session: its ACK of block *n* (the highest block
//!   it holds in sequence) makes the session send the next window to the
//!   group. Other members stay silent and pick up what flows.
//! * When the master has the last block, or leaves (ERROR), or stops
//!   answering for the retry budget, it is dropped and the longest-waiting
//!   member is made master with a new OACK; it ACKs what it holds, so it
//!   is sent exactly what it lacks (a late joiner gets the remainder first,
//!   then its missing start).
//! * A member made master that stays silent although every block went to
//!   the group after it joined (iPXE, once it holds the whole file, closes
//!   its connection without a word) is counted complete after one repeated
//!   OACK, not dropped after the whole retry budget: it was sent all of
//!   it, and its machine boots on.
//! * The session ends when no member is left.
//!
//! Like [`super::transfer`], it is driven by the engine: requests, ACKs,
//! ERRORs and timeouts in; unicast control datagrams and group windows out.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::packet::{self, ErrorCode};

/// How a session sends.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The group's address and port, as announced in the OACK.
    pub group: SocketAddr,
    pub blksize: u16,
    /// Blocks sent per master ACK (RFC 7440's window, honoured as for
    /// unicast; 1 is RFC 2090's lock-step).
    pub windowsize: u16,
    /// Wait for the master's ACK before sending again.
    pub retry: Duration,
    /// Retransmissions to a silent master before it is dropped.
    pub max_retries: u32,
    /// How long after the first request the first block waits, so that
    /// machines powered on together join before the stream starts instead
    /// of each needing the start repaired afterwards.
    pub gather: Duration,
}

/// What the engine sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// A control datagram (OACK or ERROR) to one member.
    To(SocketAddr, Vec<u8>),
    /// DATA blocks `first .. first + count` (1-based) to the group.
    Group { first: u64, count: u32 },
}

/// Counters of a session, for logs and boot events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub members_joined: u64,
    pub members_completed: u64,
    /// Of the completed, those counted so for staying silent as master
    /// after the whole file went to the group since they joined (a client
    /// that finished and closed looks the same as one that died).
    pub members_presumed: u64,
    pub members_dropped: u64,
    pub master_changes: u64,
    /// DATA blocks sent to the group (the bytes on the wire, in blocks).
    pub blocks_sent: u64,
    /// Blocks sent again because a master lacked them.
    pub blocks_repaired: u64,
}

#[derive(Debug)]
struct Member {
    addr: SocketAddr,
    /// Options acknowledged besides `multicast`, for its OACKs.
    options: Vec<(&'static str, String)>,
    joined: Instant,
    /// The first entry of the session's `sent` log after it joined.
    sent_from: usize,
    /// How long after joining it was made master, if it was.
    master_after: Option<Duration>,
}

/// How one member's part in the session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberOutcome {
    pub addr: SocketAddr,
    /// It acknowledged the last block, or stayed silent as master after
    /// every block had gone to the group since it joined; otherwise it
    /// left or was dropped.
    pub completed: bool,
    /// When it joined.
    pub joined: Instant,
    /// How long after joining it was made master (the client whose ACKs
    /// pace the group: zero for the one that started the session), or
    /// `None` when it only listened.
    pub master_after: Option<Duration>,
}

#[derive(Debug)]
enum MasterState {
    /// OACK with `mc` = 1 sent; waiting for its first ACK.
    Appointed,
    /// It holds blocks `1..=held`; the window after it is in flight.
    Pacing { held: u64 },
}

#[derive(Debug)]
struct Master {
    addr: SocketAddr,
    state: MasterState,
    retry_at: Instant,
    retries: u32,
}

/// One file's multicast session.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    file_len: u64,
    last_block: u64,
    /// Members waiting to be master, longest-waiting first.
    listeners: VecDeque<Member>,
    master: Option<(Master, Member)>,
    /// Highest block ever sent to the group (a window that repeats it, or
    /// goes below it, is a repair).
    highest_sent: u64,
    queue: VecDeque<Transmit>,
    outcomes: VecDeque<MemberOutcome>,
    stats: SessionStats,
    /// No block goes out before this (the gathering window).
    start_at: Option<Instant>,
    /// Every range of blocks sent to the group, in order; a window that
    /// continues the last range extends it, so a session that runs
    /// straight through is one entry per master.
    sent: Vec<(u64, u64)>,
    /// A member joined since the last send: the next range starts a new
    /// entry (what went out before it joined did not reach it).
    sent_split: bool,
}

impl Session {
    /// A session for a file of `file_len` bytes.
    pub fn new(file_len: u64, config: SessionConfig) -> Self {
        let blksize = u64::from(config.blksize.max(8));
        Self {
            file_len,
            last_block: file_len / blksize + 1,
            config,
            listeners: VecDeque::new(),
            master: None,
            highest_sent: 0,
            queue: VecDeque::new(),
            outcomes: VecDeque::new(),
            stats: SessionStats::default(),
            start_at: None,
            sent: Vec::new(),
            sent_split: false,
        }
    }

    /// Whether every block went to the group after `member` joined.
    fn sent_all_since_join(&self, member: &Member) -> bool {
        let mut ranges = self.sent[member.sent_from.min(self.sent.len())..].to_vec();
        ranges.sort_unstable();
        let mut covered = 0;
        for (first, last) in ranges {
            if first > covered + 1 {
                return false;
            }
            covered = covered.max(last);
        }
        covered >= self.last_block
    }

    /// Number of DATA blocks of the file (the last one is short, maybe empty).
    pub fn block_count(&self) -> u64 {
        self.last_block
    }

    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// Byte range of the file carried by block `index` (1-based), as
    /// [`crate::proto::tftp::ReadTransfer::block_range`] says for unicast.
    pub fn block_range(&self, index: u64) -> std::ops::Range<usize> {
        let blksize = u64::from(self.config.blksize.max(8));
        let start = (index.saturating_sub(1) * blksize).min(self.file_len);
        let end = (start + blksize).min(self.file_len);
        start as usize..end as usize
    }

    /// Ends the session for every member with an ERROR saying `why` (the
    /// file changed on disk: no member may get a mix of two versions, and
    /// their retries get the new one). Nothing else is sent.
    pub fn abort(&mut self, why: &str) {
        let mut error = Vec::new();
        packet::encode_error(ErrorCode::NotDefined, why, &mut error);
        self.queue.clear();
        let master = self.master.take().map(|(_, member)| member);
        let members: Vec<Member> = master.into_iter().chain(self.listeners.drain(..)).collect();
        for member in &members {
            self.queue
                .push_back(Transmit::To(member.addr, error.clone()));
            self.member_left(member, false);
        }
    }

    /// Members in the session, the master included.
    pub fn members(&self) -> usize {
        self.listeners.len() + usize::from(self.master.is_some())
    }

    /// No member is left: the engine may forget the session.
    pub fn is_done(&self) -> bool {
        self.members() == 0
    }

    /// Whether `addr` is a member.
    pub fn is_member(&self, addr: SocketAddr) -> bool {
        self.master.as_ref().is_some_and(|(m, _)| m.addr == addr)
            || self.listeners.iter().any(|m| m.addr == addr)
    }

    /// A read request with `multicast` from `client`. `options` are the
    /// other options granted to it (blksize, tsize...). A repeated request
    /// from a member is answered again.
    pub fn join(&mut self, client: SocketAddr, options: Vec<(&'static str, String)>, now: Instant) {
        if let Some((master, member)) = &self.master {
            if master.addr == client {
                // Its OACK was lost: say it again.
                let oack = self.oack(member, true);
                self.queue.push_back(Transmit::To(client, oack));
                return;
            }
        }
        if let Some(member) = self.listeners.iter().find(|m| m.addr == client) {
            let oack = self.oack(member, false);
            self.queue.push_back(Transmit::To(client, oack));
            return;
        }
        self.stats.members_joined += 1;
        self.start_at.get_or_insert(now + self.config.gather);
        let member = Member {
            addr: client,
            options,
            joined: now,
            sent_from: self.sent.len(),
            master_after: None,
        };
        self.sent_split = true;
        if self.master.is_none() {
            self.appoint(member, now);
        } else {
            let oack = self.oack(&member, false);
            self.queue.push_back(Transmit::To(client, oack));
            self.listeners.push_back(member);
        }
    }

    fn oack(&self, member: &Member, master: bool) -> Vec<u8> {
        let mut options: Vec<(&str, String)> = vec![(
            "multicast",
            format!(
                "{},{},{}",
                self.config.group.ip(),
                self.config.group.port(),
                u8::from(master)
            ),
        )];
        options.extend(member.options.iter().map(|(n, v)| (*n, v.clone())));
        let mut out = Vec::with_capacity(64);
        packet::encode_oack(&options, &mut out);
        out
    }

    /// Makes `member` the master: it is sent an OACK with `mc` = 1.
    fn appoint(&mut self, mut member: Member, now: Instant) {
        member.master_after = Some(now.saturating_duration_since(member.joined));
        let oack = self.oack(&member, true);
        self.queue.push_back(Transmit::To(member.addr, oack));
        self.master = Some((
            Master {
                addr: member.addr,
                state: MasterState::Appointed,
                retry_at: now + self.config.retry,
                retries: 0,
            },
            member,
        ));
    }

    /// Counts `member`'s end and keeps its outcome for the boot events.
    fn member_left(&mut self, member: &Member, completed: bool) {
        if completed {
            self.stats.members_completed += 1;
        } else {
            self.stats.members_dropped += 1;
        }
        self.outcomes.push_back(MemberOutcome {
            addr: member.addr,
            completed,
            joined: member.joined,
            master_after: member.master_after,
        });
    }

    /// The master is gone (`completed` or dropped): the longest-waiting
    /// listener takes its place.
    fn next_master(&mut self, completed: bool, now: Instant) {
        if let Some((_, member)) = self.master.take() {
            self.member_left(&member, completed);
        }
        if let Some(member) = self.listeners.pop_front() {
            self.stats.master_changes += 1;
            self.appoint(member, now);
        }
    }

    /// An ACK of `block` from `from`.
    pub fn handle_ack(&mut self, from: SocketAddr, block: u16, now: Instant) {
        let Some((master, _)) = &mut self.master else {
            return;
        };
        if master.addr != from {
            // Listeners do not pace the session. A listener that ACKs the
            // last block has it all (atftp says so when it is done): it
            // leaves without having to be made master first.
            if block == (self.last_block & 0xFFFF) as u16 {
                if let Some(index) = self.listeners.iter().position(|m| m.addr == from) {
                    if let Some(member) = self.listeners.remove(index) {
                        self.member_left(&member, true);
                    }
                }
            }
            return;
        }
        let held = match master.state {
            // Its first ACK says what it holds, whatever that is; counted
            // from the start (a new master that holds 65,536 blocks or more
            // in sequence is read as holding fewer, and is sent some again).
            MasterState::Appointed => u64::from(block),
            MasterState::Pacing { held } => {
                let acked = unwrap_block(block, held);
                if acked <= held {
                    // Not an advance: a duplicate or a stale ACK never
                    // triggers a send (the timer recovers a lost window).
                    return;
                }
                acked
            }
        }
        .min(self.last_block);
        if held >= self.last_block {
            self.next_master(true, now);
            return;
        }
        master.state = MasterState::Pacing { held };
        master.retries = 0;
        if let Some(start_at) = self.start_at.filter(|&at| now < at) {
            // Still gathering: the first window goes out when it ends.
            master.retry_at = start_at;
            return;
        }
        master.retry_at = now + self.config.retry;
        self.send_window(held + 1);
    }

    fn send_window(&mut self, first: u64) {
        let count = (self.last_block - first + 1).min(u64::from(self.config.windowsize.max(1)));
        let repaired = (first + count - 1)
            .min(self.highest_sent)
            .saturating_sub(first - 1);
        self.stats.blocks_repaired += repaired;
        self.stats.blocks_sent += count;
        self.highest_sent = self.highest_sent.max(first + count - 1);
        let last = first + count - 1;
        match self.sent.last_mut() {
            Some(range) if !self.sent_split && first >= range.0 && first <= range.1 + 1 => {
                range.1 = range.1.max(last);
            }
            _ => self.sent.push((first, last)),
        }
        self.sent_split = false;
        self.queue.push_back(Transmit::Group {
            first,
            count: count as u32,
        });
    }

    /// An ERROR from `from`: a member leaves.
    pub fn handle_error(&mut self, from: SocketAddr, now: Instant) {
        if self.master.as_ref().is_some_and(|(m, _)| m.addr == from) {
            self.next_master(false, now);
        } else if let Some(index) = self.listeners.iter().position(|m| m.addr == from) {
            if let Some(member) = self.listeners.remove(index) {
                self.member_left(&member, false);
            }
        }
    }

    /// Time passed: a silent master is asked again, and dropped after the
    /// retry budget.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some((master, member)) = &self.master else {
            return;
        };
        if now < master.retry_at {
            return;
        }
        if matches!(master.state, MasterState::Appointed)
            && master.retries >= 1
            && self.sent_all_since_join(member)
        {
            // Silent, with the whole file sent since it joined: done.
            self.stats.members_presumed += 1;
            self.next_master(true, now);
            return;
        }
        if master.retries >= self.config.max_retries {
            let mut error = Vec::new();
            packet::encode_error(
                ErrorCode::NotDefined,
                "no answer; left the multicast session",
                &mut error,
            );
            self.queue.push_back(Transmit::To(master.addr, error));
            self.next_master(false, now);
            return;
        }
        // The OACK again to an appointed master, the window again to a
        // pacing one.
        let (oack, window) = match master.state {
            MasterState::Appointed => (Some((master.addr, self.oack(member, true))), None),
            MasterState::Pacing { held } => (None, Some(held + 1)),
        };
        let gathered = self.highest_sent == 0 && window.is_some();
        if let Some((master, _)) = &mut self.master {
            // The end of the gathering window is the first send, not a retry.
            if !gathered {
                master.retries += 1;
            }
            master.retry_at = now + self.config.retry;
        }
        if let Some((addr, oack)) = oack {
            self.queue.push_back(Transmit::To(addr, oack));
        }
        if let Some(first) = window {
            self.send_window(first);
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.queue.pop_front()
    }

    /// The next member whose part ended (for boot events).
    pub fn poll_outcome(&mut self) -> Option<MemberOutcome> {
        self.outcomes.pop_front()
    }

    /// When [`Session::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.master.as_ref().map(|(m, _)| m.retry_at)
    }
}

/// The 64-bit block that the 16-bit `block` on the wire means, near `near`
/// (block numbers roll over from 65535 to 0 on long files).
fn unwrap_block(block: u16, near: u64) -> u64 {
    let base = near & !0xFFFF;
    let candidates = [base.wrapping_sub(0x10000), base, base + 0x10000];
    candidates
        .into_iter()
        .map(|high| high | u64::from(block))
        .filter(|&b| b <= near + 0x8000)
        .min_by_key(|&b| b.abs_diff(near))
        .unwrap_or(u64::from(block))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::tftp::packet::Packet;

    const BLKSIZE: u16 = 512;

    fn config(windowsize: u16) -> SessionConfig {
        SessionConfig {
            group: "239.255.0.1:1758".parse().unwrap(),
            blksize: BLKSIZE,
            windowsize,
            retry: Duration::from_secs(1),
            max_retries: 3,
            gather: Duration::ZERO,
        }
    }

    fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 10 + i as u8], 2000 + i as u16))
    }

    /// A simulated client: which blocks it holds, and whether it answers.
    #[derive(Debug)]
    struct Client {
        addr: SocketAddr,
        have: Vec<bool>,
        joined: bool,
        left: bool,
        /// Stops answering as master (a machine that hung).
        mute: bool,
        master: bool,
        done: bool,
    }

    impl Client {
        fn held(&self) -> u64 {
            self.have.iter().take_while(|&&h| h).count() as u64
        }
    }

    /// A deterministic lossy network: every `loss_every`-th delivery of a
    /// block to a client is lost (0: none).
    struct Net {
        deliveries: u64,
        loss_every: u64,
    }

    impl Net {
        fn losing_every(loss_every: u64) -> Net {
            Net {
                deliveries: 0,
                loss_every,
            }
        }

        fn delivered(&mut self) -> bool {
            self.deliveries += 1;
            self.loss_every == 0 || !self.deliveries.is_multiple_of(self.loss_every)
        }
    }

    /// Runs `session` with `clients` until no member is left or `limit`
    /// simulated seconds; `events` happen at given steps.
    fn run(
        session: &mut Session,
        clients: &mut [Client],
        net: &mut Net,
        join_at: &[(usize, u64)],
        leave_at: &[(usize, u64)],
    ) -> Instant {
        let mut now = Instant::now();
        let start = now;
        for step in 0..200_000u64 {
            for &(i, at) in join_at {
                if at == step && !clients[i].joined {
                    clients[i].joined = true;
                    session.join(clients[i].addr, vec![("blksize", BLKSIZE.to_string())], now);
                }
            }
            for &(i, at) in leave_at {
                if at == step && !clients[i].left {
                    clients[i].left = true;
                    session.handle_error(clients[i].addr, now);
                }
            }
            let mut acks = Vec::new();
            while let Some(transmit) = session.poll_transmit() {
                match transmit {
                    Transmit::To(to, datagram) => {
                        let client = clients.iter_mut().find(|c| c.addr == to).unwrap();
                        match Packet::parse(&datagram).unwrap() {
                            Packet::Oack { options } => {
                                let (_, value) =
                                    options.iter().find(|(n, _)| *n == "multicast").unwrap();
                                client.master = value.ends_with(",1");
                                if client.master && !client.mute && !client.left {
                                    acks.push((client.addr, client.held()));
                                }
                            }
                            Packet::Error { .. } => client.left = true,
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                    Transmit::Group { first, count } => {
                        for client in clients
                            .iter_mut()
                            .filter(|c| c.joined && !c.left && !c.done)
                        {
                            let mut got_any = false;
                            for block in first..first + u64::from(count) {
                                if net.delivered() {
                                    client.have[(block - 1) as usize] = true;
                                    got_any = true;
                                }
                            }
                            // A listener with every block waits to be made
                            // master; then it ACKs the end and is done.
                            let held = client.held();
                            if client.master && !client.mute && got_any {
                                acks.push((client.addr, held));
                            }
                        }
                    }
                }
            }
            for (from, held) in acks {
                let client = clients.iter_mut().find(|c| c.addr == from).unwrap();
                if held == client.have.len() as u64 {
                    client.done = true;
                }
                session.handle_ack(from, (held & 0xFFFF) as u16, now);
            }
            if session.is_done() && join_at.iter().all(|&(_, at)| at <= step) {
                return now;
            }
            if session.queue.is_empty() {
                now = session
                    .poll_timeout()
                    .unwrap_or(now + Duration::from_millis(1))
                    .max(now);
                session.handle_timeout(now);
            }
            assert!(
                now - start < Duration::from_secs(3600),
                "session did not end"
            );
        }
        panic!("session did not end in the step budget");
    }

    fn clients(n: usize, blocks: u64) -> Vec<Client> {
        (0..n)
            .map(|i| Client {
                addr: addr(i),
                have: vec![false; blocks as usize],
                joined: false,
                left: false,
                mute: false,
                master: false,
                done: false,
            })
            .collect()
    }

    const FILE: u64 = 200 * BLKSIZE as u64 + 100;

    #[test]
    fn clients_that_join_together_get_every_block_sent_once() {
        let mut session = Session::new(FILE, config(4));
        let blocks = session.block_count();
        let mut cs = clients(4, blocks);
        let joins: Vec<(usize, u64)> = (0..4).map(|i| (i, 0)).collect();
        run(
            &mut session,
            &mut cs,
            &mut Net::losing_every(0),
            &joins,
            &[],
        );
        assert!(
            cs.iter().all(|c| c.have.iter().all(|&h| h)),
            "every client has every block"
        );
        let stats = session.stats();
        assert_eq!(
            stats.blocks_sent, blocks,
            "each block on the wire once: {stats:?}"
        );
        assert_eq!(stats.members_completed, 4);
        assert_eq!(stats.master_changes, 3);
        // Each member's outcome says it paced the group in turn (to be
        // sent what it lacked and confirm it), the first from its join.
        let masters: Vec<Option<Duration>> = std::iter::from_fn(|| session.poll_outcome())
            .map(|outcome| outcome.master_after)
            .collect();
        assert_eq!(masters.len(), 4);
        assert_eq!(masters[0], Some(Duration::ZERO));
        assert!(masters.iter().all(Option::is_some), "{masters:?}");
    }

    #[test]
    fn loss_is_repaired_for_every_client() {
        let mut session = Session::new(FILE, config(8));
        let blocks = session.block_count();
        let mut cs = clients(6, blocks);
        let joins: Vec<(usize, u64)> = (0..6).map(|i| (i, 0)).collect();
        run(
            &mut session,
            &mut cs,
            &mut Net::losing_every(7),
            &joins,
            &[],
        );
        assert!(cs.iter().all(|c| c.have.iter().all(|&h| h)));
        let stats = session.stats();
        assert!(stats.blocks_repaired > 0, "{stats:?}");
        assert_eq!(stats.members_completed, 6);
    }

    #[test]
    fn a_late_joiner_gets_the_rest_then_its_missing_start() {
        let mut session = Session::new(FILE, config(4));
        let blocks = session.block_count();
        let mut cs = clients(2, blocks);
        run(
            &mut session,
            &mut cs,
            &mut Net::losing_every(0),
            &[(0, 0), (1, 20)],
            &[],
        );
        assert!(cs.iter().all(|c| c.have.iter().all(|&h| h)));
        let stats = session.stats();
        // The joiner missed what was sent before it joined; only that is
        // sent again.
        assert!(stats.blocks_sent < 2 * blocks, "{stats:?}");
        assert_eq!(
            stats.blocks_sent,
            blocks + stats.blocks_repaired,
            "{stats:?}"
        );
        assert!(
            stats.blocks_repaired > 0 && stats.blocks_repaired < blocks,
            "{stats:?}"
        );
    }

    #[test]
    fn silent_members_sent_the_whole_file_count_as_complete_at_once() {
        // iPXE as a listener: once it holds every block it closes its
        // connection and never answers being made master.
        let mut session = Session::new(FILE, config(4));
        let blocks = session.block_count();
        let mut cs = clients(4, blocks);
        for c in &mut cs[1..] {
            c.mute = true;
        }
        let joins: Vec<(usize, u64)> = (0..4).map(|i| (i, 0)).collect();
        let started = Instant::now();
        let ended = run(
            &mut session,
            &mut cs,
            &mut Net::losing_every(0),
            &joins,
            &[],
        );
        let stats = session.stats();
        assert_eq!(
            (stats.members_completed, stats.members_dropped),
            (4, 0),
            "{stats:?}"
        );
        assert_eq!(stats.blocks_sent, blocks, "{stats:?}");
        // One repeated OACK each (2 s with a 1 s retry), not the budget of 3.
        assert!(
            ended - started <= Duration::from_secs(3 * 2 + 1),
            "{:?}",
            ended - started
        );
        let mut outcomes = Vec::new();
        while let Some(outcome) = session.poll_outcome() {
            outcomes.push(outcome.completed);
        }
        assert_eq!(outcomes, vec![true; 4]);

        // A silent member that joined late and missed the start was not
        // sent all of it: dropped after the budget, as before.
        let mut session = Session::new(FILE, config(4));
        let mut cs = clients(2, blocks);
        cs[1].mute = true;
        run(
            &mut session,
            &mut cs,
            &mut Net::losing_every(0),
            &[(0, 0), (1, 20)],
            &[],
        );
        let stats = session.stats();
        assert_eq!(
            (stats.members_completed, stats.members_dropped),
            (1, 1),
            "{stats:?}"
        );
    }

    #[test]
    fn a_master_that_leaves_or_goes_silent_is_replaced() {
        // Client 0 leaves with an ERROR while master; client 1 hangs when it
        // becomes master and is dropped after the retry budget.
        let mut session = Session::new(FILE, config(4));
        let blocks = session.block_count();
        let mut cs = clients(4, blocks);
        cs[1].mute = true;
        let joins: Vec<(usize, u64)> = (0..4).map(|i| (i, 0)).collect();
        run(
            &mut session,
            &mut cs,
            &mut Net::losing_every(0),
            &joins,
            &[(0, 5)],
        );
        for c in &cs[2..] {
            assert!(c.have.iter().all(|&h| h), "{:?} complete", c.addr);
        }
        assert!(cs[1].left, "the silent master was told it was dropped");
        let stats = session.stats();
        assert_eq!(stats.members_dropped, 2, "{stats:?}");
        assert_eq!(stats.members_completed, 2, "{stats:?}");
        // Each member's end is reported once, for its boot event.
        let outcomes: Vec<(SocketAddr, bool)> = std::iter::from_fn(|| session.poll_outcome())
            .map(|o| (o.addr, o.completed))
            .collect();
        assert_eq!(outcomes.len(), 4, "{outcomes:?}");
        for (i, completed) in [(0, false), (1, false), (2, true), (3, true)] {
            assert!(
                outcomes.contains(&(addr(i), completed)),
                "{i}: {outcomes:?}"
            );
        }
    }

    #[test]
    fn the_first_block_waits_for_the_gathering_window() {
        let mut session = Session::new(
            FILE,
            SessionConfig {
                gather: Duration::from_millis(100),
                ..config(4)
            },
        );
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        session.join(addr(0), vec![], t0);
        assert!(matches!(session.poll_transmit(), Some(Transmit::To(to, _)) if to == addr(0)));
        session.handle_ack(addr(0), 0, t0 + ms(1));
        assert_eq!(
            session.poll_transmit(),
            None,
            "nothing sent while gathering"
        );
        // A machine powered on a little later joins before the stream starts.
        session.join(addr(1), vec![], t0 + ms(50));
        assert!(matches!(session.poll_transmit(), Some(Transmit::To(to, _)) if to == addr(1)));
        assert_eq!(session.poll_timeout(), Some(t0 + ms(100)));
        session.handle_timeout(t0 + ms(60));
        assert_eq!(session.poll_transmit(), None);
        session.handle_timeout(t0 + ms(100));
        assert_eq!(
            session.poll_transmit(),
            Some(Transmit::Group { first: 1, count: 4 })
        );
        // The gathering window's end was the first send, not a retry: a
        // master that then goes quiet still has its whole retry budget.
        let t1 = t0 + ms(100);
        for n in 1..=3 {
            session.handle_timeout(t1 + Duration::from_secs(n));
            assert_eq!(
                session.poll_transmit(),
                Some(Transmit::Group { first: 1, count: 4 })
            );
        }
        assert_eq!(session.stats().members_dropped, 0);
        // It answers, and paces from there as usual.
        session.handle_ack(addr(0), 4, t1 + ms(3500));
        assert_eq!(
            session.poll_transmit(),
            Some(Transmit::Group { first: 5, count: 4 })
        );
    }

    #[test]
    fn a_listener_that_acks_the_last_block_leaves_without_being_master() {
        let mut session = Session::new(FILE, config(4));
        let now = Instant::now();
        let last = (session.block_count() & 0xFFFF) as u16;
        session.join(addr(0), vec![], now);
        session.join(addr(1), vec![], now);
        while session.poll_transmit().is_some() {}
        // A listener's other ACKs change nothing.
        session.handle_ack(addr(1), 3, now);
        assert_eq!(session.members(), 2);
        session.handle_ack(addr(1), last, now);
        assert_eq!(session.members(), 1);
        assert_eq!(session.stats().members_completed, 1);
        let outcome = session.poll_outcome().unwrap();
        assert!(outcome.completed && outcome.addr == addr(1));
        // The master finishing ends the session: nobody is left to appoint.
        session.handle_ack(addr(0), 0, now);
        session.handle_ack(addr(0), last, now);
        assert!(session.is_done());
        assert_eq!(session.stats().master_changes, 0);
    }

    #[test]
    fn duplicate_acks_send_nothing_more() {
        let mut session = Session::new(FILE, config(4));
        let now = Instant::now();
        let a = addr(0);
        session.join(a, vec![], now);
        assert!(matches!(session.poll_transmit(), Some(Transmit::To(to, _)) if to == a));
        session.handle_ack(a, 0, now);
        assert_eq!(
            session.poll_transmit(),
            Some(Transmit::Group { first: 1, count: 4 })
        );
        session.handle_ack(a, 4, now);
        assert_eq!(
            session.poll_transmit(),
            Some(Transmit::Group { first: 5, count: 4 })
        );
        for _ in 0..5 {
            session.handle_ack(a, 4, now);
            session.handle_ack(a, 2, now);
        }
        assert_eq!(session.poll_transmit(), None, "no burst from repeated ACKs");
        // A listener's ACK does not pace the session either.
        session.join(addr(1), vec![], now);
        let _oack = session.poll_transmit();
        session.handle_ack(addr(1), 100, now);
        assert_eq!(session.poll_transmit(), None);
        // The window is sent again when the master stays silent.
        session.handle_timeout(now + Duration::from_secs(1));
        assert_eq!(
            session.poll_transmit(),
            Some(Transmit::Group { first: 5, count: 4 })
        );
    }

    #[test]
    fn oack_names_the_group_and_the_role() {
        let mut session = Session::new(FILE, config(1));
        let now = Instant::now();
        session.join(addr(0), vec![("tsize", FILE.to_string())], now);
        session.join(addr(1), vec![], now);
        let oacks: Vec<Vec<u8>> = std::iter::from_fn(|| session.poll_transmit())
            .map(|t| match t {
                Transmit::To(_, d) => d,
                other => panic!("{other:?}"),
            })
            .collect();
        let mut expected = Vec::new();
        packet::encode_oack(
            &[
                ("multicast", "239.255.0.1,1758,1"),
                ("tsize", &FILE.to_string()),
            ],
            &mut expected,
        );
        assert_eq!(oacks[0], expected);
        let mut expected = Vec::new();
        packet::encode_oack(&[("multicast", "239.255.0.1,1758,0")], &mut expected);
        assert_eq!(oacks[1], expected);
    }

    #[test]
    fn block_numbers_roll_over() {
        assert_eq!(unwrap_block(5, 0), 5);
        assert_eq!(unwrap_block(4464, 70_000), 70_000);
        assert_eq!(unwrap_block(3, 65_534), 65_539);
        assert_eq!(unwrap_block(65_535, 65_537), 65_535);
    }

    #[test]
    fn an_aborted_session_tells_every_member_and_sends_no_more_data() {
        let now = Instant::now();
        let mut session = Session::new(10_000, config(4));
        let (a, b) = (addr(1), addr(2));
        session.join(a, Vec::new(), now);
        session.join(b, Vec::new(), now);
        while session.poll_transmit().is_some() {}
        session.abort("file changed on disk during the transfer; retry");
        let mut told = Vec::new();
        while let Some(transmit) = session.poll_transmit() {
            match transmit {
                Transmit::To(to, bytes) => {
                    assert_eq!(&bytes[..2], &[0, 5], "an ERROR packet");
                    told.push(to);
                }
                Transmit::Group { .. } => panic!("data after the abort"),
            }
        }
        told.sort();
        assert_eq!(told, [a, b]);
        assert!(session.is_done());
        let outcomes: Vec<_> = std::iter::from_fn(|| session.poll_outcome()).collect();
        assert_eq!(outcomes.len(), 2);
        assert!(outcomes.iter().all(|o| !o.completed));
        session.handle_timeout(now + Duration::from_secs(60));
        assert!(session.poll_transmit().is_none());
    }

    #[test]
    fn block_ranges_cover_the_file_once() {
        let session = Session::new(1000, config(1));
        assert_eq!(session.block_range(1), 0..512);
        assert_eq!(session.block_range(2), 512..1000);
        assert_eq!(session.block_range(3), 1000..1000);
    }
}
