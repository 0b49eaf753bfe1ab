//! A fixed set of threads that run BMC actions: at most that many BMCs are
//! talked to at once, and one that hangs holds one thread until its
//! timeout while the others go on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

type Task = Box<dyn FnOnce() + Send>;

/// The threads and their queue.
pub struct Dispatcher {
    queue: Mutex<Sender<Task>>,
    queued: Arc<AtomicUsize>,
    threads: usize,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Dispatcher({} threads, {} queued)",
            self.threads,
            self.queued()
        )
    }
}

impl Dispatcher {
    /// Starts `threads` threads (at least one). They end when the
    /// dispatcher is dropped and its queue has drained.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let (sender, receiver) = channel::<Task>();
        let receiver = Arc::new(Mutex::new(receiver));
        let queued = Arc::new(AtomicUsize::new(0));
        let threads = threads.max(1);
        for index in 0..threads {
            let receiver = Arc::clone(&receiver);
            let queued = Arc::clone(&queued);
            std::thread::Builder::new()
                .name(format!("bootfleet-bmc-{index}"))
                .spawn(move || work(&receiver, &queued))?;
        }
        Ok(Self {
            queue: Mutex::new(sender),
            queued,
            threads,
        })
    }

    /// Runs `task` on the next free thread.
    pub fn submit(&self, task: impl FnOnce() + Send + 'static) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        let sent = self
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Box::new(task));
        if sent.is_err() {
            // Every thread is gone (a panic in each): nothing will run it.
            self.queued.fetch_sub(1, Ordering::Relaxed);
            tracing::error!("no BMC thread is left to run a power action");
        }
    }

    /// Tasks submitted and not finished.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

fn work(receiver: &Mutex<Receiver<Task>>, queued: &AtomicUsize) {
    loop {
        let task = match receiver.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(task) => task,
            Err(_) => return,
        };
        // A task that panics must not take the thread (and the count) with it.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(task));
        queued.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_hanging_task_holds_one_thread_and_the_others_go_on() {
        let dispatcher = Dispatcher::new(4).unwrap();
        let (done, finished) = channel();
        dispatcher.submit(|| std::thread::sleep(Duration::from_secs(2)));
        let started = Instant::now();
        for i in 0..30 {
            let done = done.clone();
            dispatcher.submit(move || {
                std::thread::sleep(Duration::from_millis(10));
                done.send(i).unwrap();
            });
        }
        for _ in 0..30 {
            finished.recv_timeout(Duration::from_secs(1)).unwrap();
        }
        assert!(started.elapsed() < Duration::from_millis(1500));
        // A task counts as finished just after it sent its answer.
        let settle = Instant::now() + Duration::from_secs(1);
        while dispatcher.queued() > 1 && Instant::now() < settle {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(dispatcher.queued() <= 1, "the hanging task alone is left");
        dispatcher.submit(|| panic!("a task that panics"));
        let done2 = done.clone();
        dispatcher.submit(move || done2.send(99).unwrap());
        assert_eq!(finished.recv_timeout(Duration::from_secs(3)).unwrap(), 99);
    }
}
