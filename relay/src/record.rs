//! What the admin endpoint shows of a connection and of a shared stream.

use std::sync::Arc;

/// What the admin endpoint shows about one dial or connection; both sides
/// keep one per connection.
#[derive(Debug)]
pub struct ConnInfo {
    /// `host:port` asked for.
    pub destination: String,
    /// Who asked: on the server the frontend (`grpc`, `http-connect`), on the
    /// agent the server's id.
    pub origin: String,
    /// When the dial began.
    pub started: std::time::Instant,
    /// Bytes this side sent into the tunnel.
    pub to_tunnel: std::sync::atomic::AtomicU64,
    /// Bytes from the tunnel delivered to this side's socket.
    pub from_tunnel: std::sync::atomic::AtomicU64,
}

impl ConnInfo {
    /// A new record, started now.
    pub fn new(destination: &str, origin: &str) -> Arc<ConnInfo> {
        Arc::new(ConnInfo {
            destination: destination.to_string(),
            origin: origin.to_string(),
            started: std::time::Instant::now(),
            to_tunnel: Default::default(),
            from_tunnel: Default::default(),
        })
    }

    /// Counts bytes sent into the tunnel.
    pub fn sent(&self, n: u64) {
        self.to_tunnel
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts bytes delivered from the tunnel.
    pub fn delivered(&self, n: u64) {
        self.from_tunnel
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// When a shared stream opened and when its peer last sent a packet (the
/// admin endpoint's `age_seconds` and `last_packet_seconds_ago`); one store
/// per packet. On tokio's clock, so the heartbeat watchdogs built on it are
/// tested in paused time.
#[derive(Debug)]
pub struct Liveness {
    /// When the stream opened (wall clock, for display).
    pub connected_at: std::time::SystemTime,
    started: tokio::time::Instant,
    /// Milliseconds after `started` of the last packet.
    last_ms: std::sync::atomic::AtomicU64,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            connected_at: std::time::SystemTime::now(),
            started: tokio::time::Instant::now(),
            last_ms: Default::default(),
        }
    }
}

impl Liveness {
    /// Notes that a packet arrived now.
    pub fn seen(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long since the last packet (or since the stream opened, if none
    /// came yet).
    pub fn since_last(&self) -> std::time::Duration {
        let at = std::time::Duration::from_millis(
            self.last_ms.load(std::sync::atomic::Ordering::Relaxed),
        );
        self.started.elapsed().saturating_sub(at)
    }

    /// How long the stream has been up.
    pub fn age(&self) -> std::time::Duration {
        self.started.elapsed()
    }
}
