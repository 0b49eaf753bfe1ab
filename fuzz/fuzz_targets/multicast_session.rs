//! Fuzzes the RFC 2090 multicast session core: members join, acknowledge
//! any block, fail and time out in whatever order the bytes say, with time
//! moving on. Nothing panics, the group is only ever sent blocks of the
//! file, and an ACK or ERROR from a stranger changes nothing.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bootfleet::proto::tftp::multicast::{Session, SessionConfig, Transmit};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&len_byte, ops)) = data.split_first() else { return };
    let file_len = u64::from(len_byte) * 37;
    let config = SessionConfig {
        group: SocketAddr::from((Ipv4Addr::new(239, 255, 0, 1), 1758)),
        blksize: 16,
        windowsize: 1 + u16::from(len_byte % 4),
        retry: Duration::from_millis(100),
        max_retries: 3,
        gather: Duration::from_millis(u64::from(len_byte % 3) * 50),
    };
    let mut session = Session::new(file_len, config);
    let blocks = session.block_count();
    let mut now = Instant::now();
    let member = |b: u8| SocketAddr::from((Ipv4Addr::new(10, 0, 0, b % 8 + 1), 2000 + u16::from(b % 3)));
    for chunk in ops.chunks(3) {
        let (op, who, arg) = match *chunk {
            [op, who, arg] => (op, who, arg),
            _ => break,
        };
        match op % 5 {
            0 => session.join(member(who), vec![("multicast", String::new())], now),
            1 => session.handle_ack(member(who), u16::from(arg) | (u16::from(who) << 8), now),
            2 => session.handle_error(member(who), now),
            3 => {
                now += Duration::from_millis(u64::from(arg) * 4);
                session.handle_timeout(now);
            }
            _ => {
                let stranger = SocketAddr::from((Ipv4Addr::new(192, 168, 1, arg), 9));
                let before = session.members();
                session.handle_ack(stranger, u16::from(who), now);
                session.handle_error(stranger, now);
                assert_eq!(session.members(), before, "a stranger changed the session");
            }
        }
        while let Some(transmit) = session.poll_transmit() {
            if let Transmit::Group { first, count } = transmit {
                assert!(first >= 1 && first + u64::from(count) - 1 <= blocks, "block outside the file");
            }
        }
        while session.poll_outcome().is_some() {}
    }
});
