//! How many protocol mistakes a peer may make before it is cut off.
//!
//! A correct peer sends a packet for a connection we do not know now and then:
//! a connection closes on one side while the other side's packets are in
//! flight, a dial is answered after the frontend gave up. Those ids are in the
//! recently-closed sets and cost nothing. What is left (packets for ids never
//! seen, malformed packets, packets the peer's role may not send) is a bug or
//! an attack; each is cheap to ignore, but a stream of them is work we do for
//! nothing, under the link's lock. A [`Budget`] is a token bucket over those
//! mistakes: a burst of [`BURST`] is forgiven, refilled at [`PER_SECOND`];
//! the peer that spends it is cut off (its stream ends, it may reconnect).
//!
//! The clock is an argument, so the logic is tested without waiting.

use std::time::Instant;

/// Mistakes forgiven at once.
pub const BURST: u32 = 1000;
/// Mistakes forgiven per second after the burst.
pub const PER_SECOND: u32 = 100;

/// What kind of mistake a peer made (the `reason` label of the cut-off metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mistake {
    /// A packet for a connection or dial id this side never had.
    UnknownConnection,
    /// A packet that does not decode into a valid message.
    Malformed,
    /// A packet the peer's role may not send (a frontend sending `DIAL_RSP`).
    NotAllowed,
    /// A message over the size limit (the stream ends at once, whatever the
    /// budget).
    Oversized,
}

impl Mistake {
    /// Metric label and log text.
    pub fn as_str(self) -> &'static str {
        match self {
            Mistake::UnknownConnection => "unknown_connection",
            Mistake::Malformed => "malformed",
            Mistake::NotAllowed => "not_allowed",
            Mistake::Oversized => "oversized",
        }
    }
}

impl std::fmt::Display for Mistake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token bucket of forgiven mistakes.
#[derive(Debug)]
pub struct Budget {
    burst: u32,
    per_second: u32,
    tokens: u32,
    since: Instant,
    /// Mistakes charged in all.
    total: u64,
}

impl Budget {
    /// The default budget ([`BURST`], [`PER_SECOND`]), full at `now`.
    pub fn new(now: Instant) -> Self {
        Self::with_rate(BURST, PER_SECOND, now)
    }

    /// A budget of `burst` mistakes refilled at `per_second`, full at `now`.
    pub fn with_rate(burst: u32, per_second: u32, now: Instant) -> Self {
        Self {
            burst,
            per_second,
            tokens: burst,
            since: now,
            total: 0,
        }
    }

    /// Charges one mistake at `now`: `false` once the budget is spent, and
    /// every time after that until it has refilled.
    pub fn charge(&mut self, now: Instant) -> bool {
        self.total += 1;
        let elapsed = now.saturating_duration_since(self.since);
        let refill = elapsed.as_millis().saturating_mul(self.per_second as u128) / 1000;
        if refill > 0 {
            let refill = u32::try_from(refill).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(refill).min(self.burst);
            self.since = now;
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }

    /// Mistakes charged so far (forgiven or not).
    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_is_forgiven_and_the_next_mistake_is_not() {
        let t0 = Instant::now();
        let mut b = Budget::with_rate(10, 5, t0);
        for _ in 0..10 {
            assert!(b.charge(t0));
        }
        assert!(!b.charge(t0));
        assert!(!b.charge(t0 + Duration::from_millis(100)));
        assert_eq!(b.total(), 12);
    }

    #[test]
    fn the_budget_refills_at_its_rate_up_to_the_burst() {
        let t0 = Instant::now();
        let mut b = Budget::with_rate(10, 5, t0);
        for _ in 0..10 {
            assert!(b.charge(t0));
        }
        // One second gives five more, not more.
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..5 {
            assert!(b.charge(t1));
        }
        assert!(!b.charge(t1));
        // A long quiet time refills to the burst only.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..10 {
            assert!(b.charge(t2));
        }
        assert!(!b.charge(t2));
    }

    #[test]
    fn a_steady_rate_below_the_refill_is_never_cut_off() {
        let t0 = Instant::now();
        let mut b = Budget::with_rate(10, 100, t0);
        // 50 a second for a minute: one every 20 ms.
        for i in 0..3000u64 {
            assert!(b.charge(t0 + Duration::from_millis(20 * i)), "mistake {i}");
        }
    }

    #[test]
    fn a_steady_rate_above_the_refill_is_cut_off_after_the_burst_drains() {
        let t0 = Instant::now();
        let mut b = Budget::with_rate(100, 10, t0);
        // 1000 a second: refill 10/s, so the burst of 100 lasts ~0.1 s.
        let cut = (0..10_000u64)
            .find(|i| !b.charge(t0 + Duration::from_millis(*i)))
            .expect("cut off");
        assert!((100..=110).contains(&cut), "cut off after {cut}");
    }
}
