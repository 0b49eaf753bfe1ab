//! Fuzzes everything that reads TFTP bytes from the network: the packet
//! parser, option negotiation, and a read transfer fed arbitrary datagrams.
#![no_main]

use std::time::{Duration, Instant};

use bootfleet::proto::tftp::{negotiate, NegotiationLimits, Packet, ReadTransfer, TransferConfig, Transmit};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let parsed = Packet::parse(data);
    let options = match &parsed {
        Ok(Packet::Rrq(request)) | Ok(Packet::Wrq(request)) => request.options.clone(),
        _ => Vec::new(),
    };
    let negotiated = negotiate(&options, data.len() as u64 * 97, NegotiationLimits::default());
    let mut transfer = ReadTransfer::new(&negotiated, data.len() as u64 * 97, TransferConfig::default(), now);
    // Feed the input again, split into datagrams at every 0xFF byte, as if
    // the client sent them on the transfer's port.
    for (i, datagram) in data.split(|&b| b == 0xFF).enumerate() {
        while let Some(transmit) = transfer.poll_transmit() {
            if let Transmit::Window { first, count } = transmit {
                for block in first..first + u64::from(count) {
                    let range = transfer.block_range(block);
                    assert!(range.start <= range.end && range.end as u64 <= data.len() as u64 * 97);
                }
            }
        }
        let at = now + Duration::from_millis(i as u64 * 300);
        transfer.handle_datagram(datagram, at);
        transfer.handle_timeout(at);
    }
});
