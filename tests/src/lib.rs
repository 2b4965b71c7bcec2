//! End-to-end harness: starts the real `proxy-server` and `proxy-agent`
//! (in-process through their library entry points, or as processes for kill
//! and log tests), destinations, and frontend clients, all on loopback with
//! port 0, Unix sockets in temp dirs, or network namespaces the test creates.

pub mod balancer;
pub mod client;
pub mod cluster;
pub mod dest;
pub mod inproc;
pub mod netns;
pub mod pki;
pub mod process;

use std::time::Duration;

/// Polls `f` until it returns `Some`, or panics with `what` after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    poll_until(limit, what, f)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Polls `f` until it returns `Some`, or fails with `what` after `limit`.
pub async fn poll_until<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls a condition until it holds, or panics with `what` after `limit`.
pub async fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    eventually(limit, what, || {
        let ok = cond();
        async move { ok.then_some(()) }
    })
    .await
}

/// Installs a test log subscriber once (RUST_LOG controls it).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// SHA-256 of `data`, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// `n` deterministic pseudo-random bytes (so corruption shows in checksums).
pub fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    Pattern::new(seed).fill(&mut v);
    v
}

/// The byte stream behind [`pattern`], produced in pieces: a xorshift
/// generator whose words are sent little-endian, so pieces of any size give
/// the same stream as one piece (eight bytes a step: the tests compare
/// hundreds of MiB in debug builds).
pub struct Pattern {
    x: u64,
    /// The current word and how many of its bytes were handed out.
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Pattern {
            x: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        let x = &mut self.x;
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        x.to_le_bytes()
    }

    /// Fills `buf` with the next bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let head = buf.len().min(8 - self.used);
        buf[..head].copy_from_slice(&self.word[self.used..self.used + head]);
        self.used += head;
        let mut words = buf[head..].chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&self.next_word());
        }
        let rest = words.into_remainder();
        if !rest.is_empty() {
            self.word = self.next_word();
            self.used = rest.len();
            rest.copy_from_slice(&self.word[..self.used]);
        }
    }

    /// Whether `got` is the next `got.len()` bytes of the stream (consumed).
    pub fn matches(&mut self, got: &[u8]) -> bool {
        let mut want = [0u8; 4096];
        got.chunks(want.len()).all(|c| {
            self.fill(&mut want[..c.len()]);
            want[..c.len()] == *c
        })
    }
}

#[cfg(test)]
mod pattern_tests {
    use super::*;

    #[test]
    fn pieces_of_any_size_give_the_same_stream() {
        let whole = pattern(1000, 42);
        for step in [1, 3, 7, 8, 9, 64, 999] {
            let mut p = Pattern::new(42);
            let mut got = vec![0u8; 1000];
            for c in got.chunks_mut(step) {
                p.fill(c);
            }
            assert_eq!(got, whole, "step {step}");
            let mut q = Pattern::new(42);
            assert!(whole.chunks(step).all(|c| q.matches(c)), "step {step}");
        }
        assert_ne!(pattern(1000, 43), whole);
        let mut corrupt = whole.clone();
        corrupt[500] ^= 1;
        assert!(!Pattern::new(42).matches(&corrupt));
    }
}
