//! Shutdown as an explicit object passed down (the mini-redis pattern).
//!
//! The node owns one [`ShutdownTrigger`]; every long-running task gets a [`Shutdown`]
//! clone and selects on [`Shutdown::wait`]. A watch channel rather than a broadcast: a task
//! that subscribes late still sees that shutdown already began.

use tokio::sync::watch;

/// Starts the shutdown of everything holding a [`Shutdown`].
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// A task's view of shutdown: cheap to clone, waits until triggered.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }

    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown has been triggered (at once if it already was).
    pub async fn wait(&mut self) {
        // An error means the trigger was dropped: treat that as shutdown too.
        let _ = self.0.wait_for(|triggered| *triggered).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn late_subscribers_see_an_earlier_trigger() {
        let (trigger, mut early) = channel();
        assert!(!early.is_triggered());
        trigger.trigger();
        let mut late = trigger.subscribe();
        late.wait().await;
        early.wait().await;
        assert!(late.is_triggered() && early.is_triggered());
    }
}
