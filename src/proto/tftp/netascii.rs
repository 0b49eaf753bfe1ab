//! The netascii transform (RFC 1350 §1, RFC 764): on the wire a line ends in
//! CR LF and a bare CR is sent as CR NUL.
//!
//! A read transfer converts block by block as blocks go out
//! ([`NetasciiBlocks`]): the file is never copied, and no request costs more
//! than the blocks it is sent. (Converting the whole file when the request
//! arrived let one 30-byte RRQ for a 200 MB initrd take ~570 MB and stall a
//! worker for seconds.) The converted length is only known at the last
//! block, so a netascii read acknowledges no `tsize` (RFC 2349 lets a server
//! leave an option out of its OACK).

use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::Arc;

/// The bytes a netascii transfer converts: a shared, read-only file.
pub type Source = Arc<dyn Deref<Target = [u8]> + Send + Sync>;

/// Where a block begins in the source: its index, the source offset, and
/// the second byte of a CR LF or CR NUL pair that the block before had no
/// room for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BlockStart {
    index: u64,
    offset: usize,
    carry: Option<u8>,
}

/// A file converted to netascii one block at a time, as a transfer sends
/// its windows. It remembers where the last `keep` blocks began, so a
/// window sent again (at most one window back) converts again from there.
#[derive(Clone)]
pub struct NetasciiBlocks {
    source: Source,
    starts: VecDeque<BlockStart>,
    keep: usize,
}

impl std::fmt::Debug for NetasciiBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetasciiBlocks")
            .field("source_len", &self.source.len())
            .field("starts", &self.starts)
            .finish()
    }
}

impl NetasciiBlocks {
    /// Converts `source`; `windowsize` bounds how far back a block may be
    /// asked for again.
    pub fn new(source: Source, windowsize: u16) -> Self {
        let mut starts = VecDeque::new();
        starts.push_back(BlockStart {
            index: 1,
            offset: 0,
            carry: None,
        });
        Self {
            source,
            starts,
            keep: 2 * usize::from(windowsize.max(1)) + 2,
        }
    }

    /// Appends block `index` (1-based) of the converted file to `out` and
    /// says whether it is the last one (shorter than `blksize`). `None`: a
    /// block from before the last windows, which a transfer never asks for.
    pub fn block(&mut self, index: u64, blksize: usize, out: &mut Vec<u8>) -> Option<bool> {
        let first = self.starts.front()?.index;
        if index < first {
            return None;
        }
        // Walk forward to the block (a transfer asks for the next one, or
        // one in the last window, so this converts nothing in between).
        loop {
            let known = *self.starts.back()?;
            if known.index >= index {
                break;
            }
            let mut scratch = Vec::with_capacity(blksize);
            let (next, _) = self.convert(known, blksize, &mut scratch);
            self.remember(next);
        }
        let start = *self.starts.iter().find(|s| s.index == index)?;
        let (next, produced) = self.convert(start, blksize, out);
        if next.index > self.starts.back().map_or(0, |s| s.index) {
            self.remember(next);
        }
        Some(produced < blksize)
    }

    fn remember(&mut self, start: BlockStart) {
        self.starts.push_back(start);
        while self.starts.len() > self.keep {
            self.starts.pop_front();
        }
    }

    /// Converts one block from `start` into `out`; returns where the next
    /// block begins and how many bytes this one holds.
    fn convert(&self, start: BlockStart, blksize: usize, out: &mut Vec<u8>) -> (BlockStart, usize) {
        let source: &[u8] = &self.source;
        let mut offset = start.offset;
        let mut produced = 0;
        let mut carry = None;
        if let Some(second) = start.carry {
            out.push(second);
            produced += 1;
        }
        while produced < blksize && offset < source.len() {
            let room = blksize - produced;
            // Plain bytes up to the next CR or LF go in one copy.
            let rest = &source[offset..];
            let plain = rest
                .iter()
                .take(room)
                .position(|&b| b == b'\n' || b == b'\r')
                .unwrap_or(room.min(rest.len()));
            out.extend_from_slice(&rest[..plain]);
            produced += plain;
            offset += plain;
            if produced == blksize || offset == source.len() {
                break;
            }
            let second = if source[offset] == b'\n' { b'\n' } else { 0 };
            out.push(b'\r');
            produced += 1;
            offset += 1;
            if produced < blksize {
                out.push(second);
                produced += 1;
            } else {
                carry = Some(second);
            }
        }
        let next = BlockStart {
            index: start.index + 1,
            offset,
            carry,
        };
        (next, produced)
    }
}

/// Converts local text (LF line ends) into netascii.
pub fn encode(input: &[u8]) -> Vec<u8> {
    let extra = input.iter().filter(|&&b| b == b'\n' || b == b'\r').count();
    let mut out = Vec::with_capacity(input.len() + extra);
    for &b in input {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            other => out.push(other),
        }
    }
    out
}

/// Converts netascii back to local text (used by clients and tests).
pub fn decode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut bytes = input.iter().peekable();
    while let Some(&b) = bytes.next() {
        if b == b'\r' {
            match bytes.peek() {
                Some(b'\n') => {
                    out.push(b'\n');
                    bytes.next();
                }
                Some(0) => {
                    out.push(b'\r');
                    bytes.next();
                }
                _ => out.push(b'\r'),
            }
        } else {
            out.push(b);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn line_ends_and_bare_cr() {
        assert_eq!(encode(b"a\nb\rc"), b"a\r\nb\r\0c");
        assert_eq!(decode(b"a\r\nb\r\0c"), b"a\nb\rc");
        assert_eq!(encode(b""), b"");
    }

    /// The blocks, concatenated, are the whole-file conversion, and the
    /// first short block is the last.
    fn blocks_of(input: &[u8], blksize: usize, windowsize: u16) -> Vec<u8> {
        let mut blocks = NetasciiBlocks::new(Arc::new(input.to_vec()), windowsize);
        let mut out = Vec::new();
        for index in 1.. {
            let mut block = Vec::new();
            let last = blocks.block(index, blksize, &mut block).unwrap();
            assert!(block.len() <= blksize);
            // Sent again (a lost window): the same bytes.
            if index > u64::from(windowsize) {
                let again = index - u64::from(windowsize);
                let mut first = Vec::new();
                blocks.block(again, blksize, &mut first).unwrap();
                assert_eq!(first, out[(again as usize - 1) * blksize..][..first.len()]);
            }
            out.extend_from_slice(&block);
            if last {
                assert_eq!(last, block.len() < blksize);
                return out;
            }
        }
        unreachable!()
    }

    #[test]
    fn pairs_split_across_blocks_and_exact_multiples() {
        assert_eq!(blocks_of(b"ab\ncd", 3, 1), b"ab\r\ncd");
        assert_eq!(blocks_of(b"abc", 3, 1), b"abc");
        assert_eq!(blocks_of(b"", 8, 1), b"");
        assert_eq!(blocks_of(b"\r\r\n", 1, 4), b"\r\0\r\0\r\n");
        let mut blocks = NetasciiBlocks::new(Arc::new(vec![b'a'; 100]), 1);
        let mut out = Vec::new();
        assert_eq!(blocks.block(9, 10, &mut out), Some(false));
        assert_eq!(blocks.block(1, 10, &mut out), None, "forgotten");
    }

    proptest! {
        #[test]
        fn blocks_are_the_whole_conversion(
            input in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'\r'), any::<u8>()], 0..600),
            blksize in 1usize..40,
            windowsize in 1u16..6,
        ) {
            prop_assert_eq!(blocks_of(&input, blksize, windowsize), encode(&input));
        }

        #[test]
        fn round_trips(input in proptest::collection::vec(any::<u8>(), 0..400)) {
            prop_assert_eq!(decode(&encode(&input)), input);
        }
    }
}
