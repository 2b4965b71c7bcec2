//! What the process itself uses, on `/metrics` at scrape time: resident
//! memory and open descriptors under the names every Prometheus client
//! library uses (`process_resident_memory_bytes`, `process_open_fds`; the
//! reference's Go binaries export them too), and the tokio runtime's live
//! tasks (`tokio_alive_tasks`). A leak of memory, sockets or tasks shows as
//! one of these growing; the soak program samples them. Also the log lines
//! dropped because stderr did not keep up (`log_lines_dropped_total`, see
//! [`crate::logging`]).

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntGauge, Opts};

/// The collector; register it once per registry.
pub struct ProcessCollector {
    rss: IntGauge,
    fds: IntGauge,
    dropped_lines: IntCounter,
    tasks: Option<(IntGauge, tokio::runtime::Handle)>,
}

impl ProcessCollector {
    /// A collector for this process; the task count needs a tokio runtime
    /// (it is left out when created outside one).
    pub fn new() -> Self {
        let gauge =
            |name: &str, help: &str| IntGauge::with_opts(Opts::new(name, help)).expect("valid");
        Self {
            rss: gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
            ),
            fds: gauge("process_open_fds", "Number of open file descriptors"),
            dropped_lines: IntCounter::with_opts(Opts::new(
                "log_lines_dropped_total",
                "Log lines dropped because stderr did not keep up",
            ))
            .expect("valid"),
            tasks: tokio::runtime::Handle::try_current().ok().map(|h| {
                (
                    gauge("tokio_alive_tasks", "Tasks alive in the tokio runtime"),
                    h,
                )
            }),
        }
    }
}

impl Default for ProcessCollector {
    fn default() -> Self {
        Self::new()
    }
}

/// Resident memory of this process in bytes (Linux; 0 elsewhere).
fn resident_bytes() -> i64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<i64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Open descriptors of this process (Linux; 0 elsewhere).
fn open_fds() -> i64 {
    // The directory listing itself holds one descriptor while it runs.
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as i64 - 1)
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.rss.desc();
        d.extend(self.fds.desc());
        d.extend(self.dropped_lines.desc());
        if let Some((t, _)) = &self.tasks {
            d.extend(t.desc());
        }
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.rss.set(resident_bytes());
        self.fds.set(open_fds());
        let mut out = self.rss.collect();
        out.extend(self.fds.collect());
        let dropped = crate::logging::dropped_lines();
        self.dropped_lines
            .inc_by(dropped.saturating_sub(self.dropped_lines.get()));
        out.extend(self.dropped_lines.collect());
        if let Some((t, handle)) = &self.tasks {
            t.set(handle.metrics().num_alive_tasks() as i64);
            out.extend(t.collect());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_figures_follow_what_the_process_holds() {
        let registry = prometheus::Registry::new();
        registry
            .register(Box::new(ProcessCollector::new()))
            .unwrap();
        let value = |name: &str| {
            registry
                .gather()
                .iter()
                .find(|f| f.name() == name)
                .map(|f| f.get_metric()[0].get_gauge().get_value())
                .unwrap()
        };
        assert!(value("process_resident_memory_bytes") > 1e6);
        let fds = value("process_open_fds");
        let files: Vec<_> = (0..20)
            .map(|_| std::fs::File::open("/proc/self/status").unwrap())
            .collect();
        // Other tests of this binary may open or close a few meanwhile.
        assert!(
            value("process_open_fds") >= fds + 15.0,
            "descriptors not counted"
        );
        drop(files);
        let tasks = value("tokio_alive_tasks");
        let stop = tokio_util::sync::CancellationToken::new();
        let held: Vec<_> = (0..10)
            .map(|_| tokio::spawn(stop.clone().cancelled_owned()))
            .collect();
        assert_eq!(value("tokio_alive_tasks"), tasks + 10.0);
        stop.cancel();
        for h in held {
            h.await.unwrap();
        }
        assert_eq!(value("tokio_alive_tasks"), tasks);
    }
}
