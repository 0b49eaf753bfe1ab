//! Fuzzes the TFTP write side and the netascii conversion: an upload fed
//! any datagrams (split at each 0xFF byte; the first may be a WRQ), committed when complete, never
//! holding more than its limit; and a netascii read of the input converted
//! block by block with any block and window size, windows sent again, which
//! must equal the whole-file conversion.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bootfleet::proto::tftp::netascii::{self, NetasciiBlocks};
use bootfleet::proto::tftp::{negotiate, CommitError, NegotiationLimits, Packet, TransferConfig, WriteTransfer};
use libfuzzer_sys::fuzz_target;

const MAX_UPLOAD: u64 = 4096;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    // The first datagram may be a WRQ whose options are negotiated.
    let first = data.split(|&b| b == 0xFF).next().unwrap_or_default();
    let options = match Packet::parse(first) {
        Ok(Packet::Wrq(request)) => request.options.clone(),
        _ => Vec::new(),
    };
    let negotiated = negotiate(&options, 0, NegotiationLimits::default());
    let mut upload = WriteTransfer::new(&negotiated, MAX_UPLOAD, TransferConfig::default(), now);
    for (i, datagram) in data.split(|&b| b == 0xFF).enumerate() {
        let at = now + Duration::from_millis(i as u64 * 250);
        upload.handle_datagram(datagram, at);
        assert!(upload.received() <= MAX_UPLOAD, "an upload beyond its limit");
        if let Some(bytes) = upload.take_upload() {
            assert!(bytes.len() as u64 <= MAX_UPLOAD);
            let result = if i % 2 == 0 { Ok(()) } else { Err(CommitError::DiskFull) };
            upload.commit(result, at);
        }
        upload.handle_timeout(at);
        while upload.poll_transmit().is_some() {}
    }

    // The first two bytes choose the block and window size.
    let (blksize, windowsize, text) = match data {
        [a, b, rest @ ..] => (usize::from(*a % 64) + 1, u16::from(*b % 8) + 1, rest),
        _ => (8, 1, data),
    };
    let mut blocks = NetasciiBlocks::new(Arc::new(text.to_vec()), windowsize);
    let mut out = Vec::new();
    let mut starts = Vec::new();
    for index in 1u64.. {
        starts.push(out.len());
        let mut block = Vec::new();
        let last = blocks.block(index, blksize, &mut block).expect("the next block is known");
        assert!(block.len() <= blksize);
        out.extend_from_slice(&block);
        // The window is lost: its first block again, the same bytes.
        let back = index.saturating_sub(u64::from(windowsize)).max(1);
        let mut again = Vec::new();
        blocks.block(back, blksize, &mut again).expect("a block of the last window is known");
        let from = starts[back as usize - 1];
        assert_eq!(again, out[from..from + again.len()]);
        if last {
            break;
        }
        assert!(out.len() <= 2 * text.len() + blksize, "more blocks than the text needs");
    }
    assert_eq!(out, netascii::encode(text));
});
