//! Fuzzes the parsers that will read URLs and headers from the network: MAC
//! addresses in any spelling, pxelinux file names, and Range/If-Range planning.
#![no_main]

use bootfleet::proto::{Mac, PxelinuxConfig};
use bootfleet::proto::http::range::{plan, BodyPlan, Validators};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(mac) = Mac::parse(text) {
        assert_eq!(Mac::parse(&mac.to_string()), Ok(mac));
    }
    let _ = PxelinuxConfig::parse(text);
    let (range, if_range) = text.split_once('\n').unwrap_or((text, ""));
    let len = data.len() as u64 * 13;
    let validators = Validators { etag: "\"x\"", last_modified: "Wed, 25 Nov 2026 03:00:00 GMT" };
    match plan(Some(range), Some(if_range).filter(|s| !s.is_empty()), len, validators) {
        BodyPlan::Single(r) => assert!(r.start() <= r.end() && *r.end() < len),
        BodyPlan::Multiple(rs) => assert!(rs.iter().all(|r| r.start() <= r.end() && *r.end() < len)),
        BodyPlan::Full | BodyPlan::Unsatisfiable => {}
    }
});
