//! Two-phase shutdown: the first SIGTERM or SIGINT asks for a graceful stop
//! (drain, then wait for in-flight work up to a grace period); a second one
//! asks to stop at once.

use tokio_util::sync::CancellationToken;

/// Cloneable shutdown signals, also built by tests to stop a running component.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Cancelled on the first signal: stop accepting, announce, drain.
    pub graceful: CancellationToken,
    /// Cancelled on the second signal (or when the grace period is over).
    pub immediate: CancellationToken,
}

impl Shutdown {
    /// Signals that nothing has cancelled yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels both phases: stop now.
    pub fn now(&self) {
        self.graceful.cancel();
        self.immediate.cancel();
    }

    /// Spawns a task that turns SIGTERM/SIGINT into the two phases.
    pub fn on_signals(self) -> Self {
        let s = self.clone();
        tokio::spawn(async move {
            let mut count = 0;
            loop {
                wait_signal().await;
                count += 1;
                if count == 1 {
                    tracing::info!(
                        "shutdown signal received; draining (send again to exit at once)"
                    );
                    s.graceful.cancel();
                } else {
                    tracing::warn!("second shutdown signal; exiting now");
                    s.immediate.cancel();
                    return;
                }
            }
        });
        self
    }
}

async fn wait_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Cannot install handlers (should not happen on Linux): never fire.
            std::future::pending::<()>().await
        }
    }
}
