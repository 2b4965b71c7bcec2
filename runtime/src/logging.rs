//! `tracing` set-up. klog's `--v=N` maps onto levels (0-1 info, 2-4 debug,
//! 5+ trace); `RUST_LOG` overrides it when set.
//!
//! Lines go to stderr from a thread of their own, through a bounded buffer
//! ([`BUFFERED_LINES`]): a log pipe whose reader stalls (a slow collector, a
//! full disk, a parent that stopped reading) must not stall the process. When
//! the buffer is full, new lines are dropped and counted
//! ([`dropped_lines`], `log_lines_dropped_total` on `/metrics`). Before that
//! change a burst of warnings (one per connection closed at a limit) into an
//! unread pipe froze the server's workers in `write(2)` and every agent
//! stream timed out.

use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Log lines waiting for stderr at most; past it, lines are dropped.
pub const BUFFERED_LINES: usize = 16_384;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Log lines dropped so far because stderr did not keep up.
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Keeps the log writer thread; dropping it writes out what is buffered
/// (for at most a second). Hold it in `main` until the end.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard(#[allow(dead_code)] Option<WorkerGuard>);

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            _ => Err(format!("unknown log format {s:?} (want text or json)")),
        }
    }
}

/// Logging flags both binaries take: ours (`--log-format`) and klog's, which
/// upstream manifests pass (`--v=4`, `--logtostderr=true`).
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    pub log_format: Format,
    /// klog verbosity (0-1 info, 2-4 debug, 5+ trace).
    #[arg(long = "v", default_value_t = 0)]
    pub verbosity: u8,
    /// Accepted for klog compatibility; logs always go to stderr.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub logtostderr: Option<String>,
    /// Accepted for klog compatibility; logs always go to stderr.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub alsologtostderr: Option<String>,
}

impl LogArgs {
    /// Installs the global subscriber for these flags.
    pub fn init(&self) -> LogGuard {
        init(self.log_format, self.verbosity)
    }
}

/// Installs the global subscriber, writing to stderr through the bounded
/// buffer. Safe to call twice (the second call does nothing), which tests
/// rely on.
pub fn init(format: Format, verbosity: u8) -> LogGuard {
    let level = match verbosity {
        0 | 1 => "info",
        2..=4 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!("{level},h2=info,hyper=info,tower=info,rustls=info"))
    });
    // A log line that cannot be written (stderr is a pipe whose reader went
    // away) is dropped. The default would report it with `eprintln!`, which
    // panics on that same broken stderr and takes the task down with it.
    // Colour only on a terminal: a log file or a collector's pipe gets plain
    // text (`NO_COLOR` turns it off on a terminal too).
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    if DROPPED.get().is_some() {
        return LogGuard(None);
    }
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .log_internal_errors(false)
        .with_ansi(colour)
        .with_writer(writer);
    let installed = match format {
        Format::Text => builder.try_init(),
        Format::Json => builder.json().try_init(),
    };
    if installed.is_err() {
        // Another subscriber is in place (a test's); this writer is unused.
        return LogGuard(None);
    }
    let _ = DROPPED.set(dropped);
    LogGuard(Some(guard))
}
