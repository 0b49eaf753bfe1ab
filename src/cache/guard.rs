//! Keeps a file rewritten in place from crashing the server.
//!
//! When a mapped file is truncated (as `cp new old` does: it opens the target
//! with `O_TRUNC`), reading a page past the new end raises SIGBUS, which
//! would kill every transfer of every client. This guard installs a SIGBUS
//! handler that recognises faults inside the cache's own mappings, maps a
//! zero page over the faulting page so the read completes, and counts the
//! fault; the cache then re-checks the file and ends the transfers of the
//! changed version with an error (see `MappedFile::changed`). A fault
//! anywhere else is not ours: the handler restores the default action and the
//! process dies as it would have.
//!
//! Written by hand because no crate offers it: the handler must only touch
//! atomics and make async-signal-safe system calls (`mmap`, `sigaction`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Once;

/// Mappings the handler may repair. Files beyond this many at once are
/// still served, just not guarded.
const SLOTS: usize = 4096;

struct Range {
    start: AtomicUsize,
    len: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Range = Range {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
};

static RANGES: [Range; SLOTS] = [EMPTY; SLOTS];
static FAULTS: AtomicU64 = AtomicU64::new(0);
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Once = Once::new();

/// How many faults inside guarded mappings were repaired so far.
pub fn faults() -> u64 {
    FAULTS.load(Ordering::Acquire)
}

/// A guarded mapping; unguarded again when dropped.
pub struct Registration {
    slot: Option<usize>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            RANGES[slot].len.store(0, Ordering::Release);
            RANGES[slot].start.store(0, Ordering::Release);
        }
    }
}

/// Guards `len` bytes at `start` (a mapping of the cache).
pub fn register(start: *const u8, len: usize) -> Registration {
    install();
    for (slot, range) in RANGES.iter().enumerate() {
        if range
            .start
            .compare_exchange(0, start as usize, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            range.len.store(len, Ordering::Release);
            return Registration { slot: Some(slot) };
        }
    }
    Registration { slot: None }
}

fn install() {
    INSTALL.call_once(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE.store(page as usize, Ordering::Relaxed);
        }
        // SAFETY: a zeroed sigaction with a valid SA_SIGINFO handler.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
                tracing::warn!("cannot install the SIGBUS guard; files rewritten in place may crash the server");
            }
        }
    });
}

extern "C" fn on_sigbus(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let address = unsafe { (*info).si_addr() } as usize;
    let page_size = PAGE.load(Ordering::Relaxed);
    for range in RANGES.iter() {
        let start = range.start.load(Ordering::Acquire);
        let len = range.len.load(Ordering::Acquire);
        if len > 0 && address >= start && address < start + len {
            let page = address & !(page_size - 1);
            // SAFETY: replaces one page of our own read-only file mapping with
            // zeros; mmap is async-signal-safe.
            let mapped = unsafe {
                libc::mmap(
                    page as *mut libc::c_void,
                    page_size,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if mapped != libc::MAP_FAILED {
                FAULTS.fetch_add(1, Ordering::AcqRel);
                return;
            }
        }
    }
    // Not a fault in the cache: let it kill the process as it would have.
    // SAFETY: restoring the default disposition; the faulting instruction
    // runs again on return and the default action applies.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}
