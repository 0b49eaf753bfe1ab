//! The blocking pool: the file-system work a request may need (resolving
//! and opening a file never served before, listing the per-MAC script
//! directory, creating an upload) runs on these threads, never on an
//! io_uring worker, whose every millisecond blocked is a millisecond all of
//! its connections and transfers wait.
//!
//! A worker that meets such a request hands it over with
//! [`BlockingPool::run`]; the job posts its result to the worker's
//! [`Mailbox`], whose eventfd the worker keeps a `read` armed on in its
//! ring, so the result is one more completion in the worker's loop. The
//! common requests (a file served before, an assigned machine's script)
//! never come here: they are answered from memory.
//!
//! Hand-written rather than a crate's: the pool is a queue and a few
//! threads, and the wake-up must be an eventfd an io_uring can wait on,
//! which general-purpose pools (rayon, tokio's blocking pool) do not give.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use tracing::error;

type Job = Box<dyn FnOnce() + Send>;

/// Threads that run jobs which may block, in the order given.
pub struct BlockingPool {
    jobs: Sender<Job>,
}

impl BlockingPool {
    /// A pool of `threads` threads named `name-N`; they end when the pool
    /// is dropped and the jobs given are done.
    pub fn new(name: &str, threads: usize) -> io::Result<Arc<Self>> {
        let (sender, receiver) = channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        for index in 0..threads.max(1) {
            let receiver = Arc::clone(&receiver);
            std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || run_jobs(&receiver))?;
        }
        Ok(Arc::new(Self { jobs: sender }))
    }

    /// Runs `job` on one of the pool's threads.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        if self.jobs.send(Box::new(job)).is_err() {
            // Every thread has ended, which only a panicking job does.
            error!("the blocking pool has no thread left; a request was dropped");
        }
    }
}

fn run_jobs(receiver: &Mutex<Receiver<Job>>) {
    loop {
        let job = {
            let receiver = receiver.lock().unwrap_or_else(|p| p.into_inner());
            match receiver.recv() {
                Ok(job) => job,
                Err(_) => return, // the pool is gone
            }
        };
        job();
    }
}

/// Results for one worker, and the eventfd that wakes it when one comes.
pub struct Mailbox<T> {
    ready: Mutex<Vec<T>>,
    wake: OwnedFd,
}

impl<T> Mailbox<T> {
    pub fn new() -> io::Result<Arc<Self>> {
        // Blocking, so that an io_uring `read` on it waits (by poll) for a
        // post rather than failing with EAGAIN.
        // SAFETY: eventfd has no memory arguments; the descriptor it
        // returns is ours alone.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Arc::new(Self {
            ready: Mutex::new(Vec::new()),
            // SAFETY: a new descriptor that nothing else owns.
            wake: unsafe { OwnedFd::from_raw_fd(fd) },
        }))
    }

    /// Leaves `item` for the worker and wakes it.
    pub fn post(&self, item: T) {
        self.ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(item);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. It cannot
        // block: the counter would have to reach 2^64 - 2 first.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Everything posted since the last call.
    pub fn take(&self) -> Vec<T> {
        std::mem::take(&mut *self.ready.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The eventfd to arm a `read` of 8 bytes on.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// The io_uring `read` that completes at the next post, writing the
    /// eventfd's count into `count`, which must stay put until then.
    pub fn wake_read(&self, count: &mut u64) -> io_uring::squeue::Entry {
        let count: *mut u64 = count;
        io_uring::opcode::Read::new(io_uring::types::Fd(self.wake_fd()), count.cast(), 8).build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_off_the_caller_and_their_results_wake_the_mailbox() {
        let pool = BlockingPool::new("test-blocking", 2).unwrap();
        let mailbox = Mailbox::<(usize, String)>::new().unwrap();
        for job in 0..10 {
            let mailbox = Arc::clone(&mailbox);
            pool.run(move || {
                let thread = std::thread::current().name().unwrap_or("").to_string();
                mailbox.post((job, thread));
            });
        }
        let mut results = Vec::new();
        while results.len() < 10 {
            let mut count = 0u64;
            // SAFETY: reads 8 bytes into a live u64 from the eventfd.
            let read = unsafe { libc::read(mailbox.wake_fd(), (&mut count as *mut u64).cast(), 8) };
            assert_eq!(read, 8, "the eventfd wakes a reader");
            assert!(count >= 1);
            results.extend(mailbox.take());
        }
        results.sort();
        assert_eq!(
            results.iter().map(|(job, _)| *job).collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
        assert!(results
            .iter()
            .all(|(_, thread)| thread.starts_with("test-blocking-")));
    }
}
