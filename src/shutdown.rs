//! The stop signal every long-running part of the server watches: the
//! data-plane workers, the multicast sessions, the DHCP service and the
//! panel. It lives in its own module, below every layer, so that a service
//! can wait for it without importing the engine that runs it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Asks a running server to stop; cheap to clone.
#[derive(Clone, Default)]
pub struct Shutdown {
    inner: Arc<ShutdownInner>,
}

#[derive(Default)]
struct ShutdownInner {
    requested: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests shutdown; data-plane workers notice it within their idle poll
    /// (`server::tftp::IDLE_POLL`, 100 ms).
    pub fn trigger(&self) {
        self.inner.requested.store(true, Ordering::SeqCst);
        self.inner.notify.notify_waiters();
    }

    pub fn is_triggered(&self) -> bool {
        self.inner.requested.load(Ordering::SeqCst)
    }

    /// Resolves once shutdown was requested.
    pub async fn wait(&self) {
        loop {
            let notified = self.inner.notify.notified();
            if self.is_triggered() {
                return;
            }
            notified.await;
        }
    }
}
