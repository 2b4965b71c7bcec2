//! Giving freed heap back to the kernel after a burst of connections.
//!
//! glibc keeps what a burst freed in its arenas: after 10,000 tunnels close,
//! a process stays at its peak RSS (measured: 700 MiB server RSS stayed at
//! 580 MiB after the connections were gone). A DaemonSet's memory limit then
//! has to cover every past peak. `malloc_trim(0)` returns free pages inside
//! the heap too (`madvise`). It walks and locks every arena, so it runs only
//! after a burst has drained, on a blocking thread, at most once a tick.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the connection count is looked at (an atomic read). At 10 s a
/// burst shorter than the tick was never seen and nothing was trimmed.
pub const TRIM_TICK: Duration = Duration::from_secs(1);
/// A drop of at least this many connections, to at most half of the high
/// mark since the last trim, triggers a trim.
pub const TRIM_MIN_DROP: i64 = 1000;

/// Decides when a drop in open connections is worth a trim.
#[derive(Debug, Default)]
pub struct TrimPolicy {
    high: i64,
}

impl TrimPolicy {
    /// Records the current count; true when it is time to trim.
    pub fn observe(&mut self, open: i64) -> bool {
        self.high = self.high.max(open);
        if self.high - open >= TRIM_MIN_DROP && open <= self.high / 2 {
            self.high = open;
            true
        } else {
            false
        }
    }
}

/// Watches `open` (the process's open connections) every [`TRIM_TICK`] and
/// trims the allocator after a burst has drained, until `stop`.
pub async fn trim_after_bursts<F>(open: F, stop: CancellationToken)
where
    F: Fn() -> i64 + Send + 'static,
{
    let mut policy = TrimPolicy::default();
    let mut tick = tokio::time::interval(TRIM_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = open();
        if policy.observe(now) {
            let released = tokio::task::spawn_blocking(trim).await.unwrap_or(false);
            tracing::debug!(
                open = now,
                released,
                "returned freed heap to the kernel after a burst"
            );
        }
    }
}

/// `malloc_trim(0)`; true when glibc gave memory back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() -> bool {
    // SAFETY: malloc_trim takes a plain integer, touches only the allocator's
    // own state under its own locks, and has no caller-side preconditions.
    unsafe { libc::malloc_trim(0) != 0 }
}

/// Other allocators (musl) have no equivalent and do not hold pages the same way.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_after_a_large_drain_only() {
        let mut p = TrimPolicy::default();
        assert!(!p.observe(100));
        assert!(!p.observe(900), "small populations never trigger");
        assert!(!p.observe(10));
        assert!(!p.observe(5_000));
        assert!(!p.observe(3_000), "more than half still open");
        assert!(p.observe(2_400), "dropped 2,600 to under half of 5,000");
        assert!(!p.observe(2_000), "the high mark restarted at 2,400");
        assert!(!p.observe(12_000));
        assert!(p.observe(0));
        assert!(!p.observe(0));
    }

    /// Resident memory of this process, KiB.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// What a burst leaves behind: many small blocks (below glibc's mmap
    /// threshold, so on the heap) freed while a later block stays, so
    /// `free` alone cannot shrink the heap. The trim gives the pages back.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn trimming_returns_a_freed_burst_to_the_kernel() {
        const BLOCKS: usize = 100_000;
        let mut blocks: Vec<Box<[u8]>> = (0..BLOCKS)
            .map(|i| vec![i as u8; 1024].into_boxed_slice())
            .collect();
        let keep = blocks.pop();
        drop(blocks);
        let before = rss_kib();
        assert!(trim(), "glibc gave nothing back");
        let after = rss_kib();
        drop(keep);
        // About 100 MiB were freed; other tests of this binary run meanwhile.
        let released = before.saturating_sub(after);
        assert!(
            released > 50 * 1024,
            "resident memory went from {before} KiB to {after} KiB"
        );
    }
}
