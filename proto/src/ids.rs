//! Identifier allocation.
//!
//! `connectID` is chosen by the agent, is never 0, and needs only be unique on
//! one agent stream (the reference counts from 1 per stream). `random` (the dial
//! id) is chosen by whoever starts a dial; the Go client uses a random int63.

/// Hands out connection ids for one agent stream: 1, 2, 3, ... never 0, never
/// negative, wrapping back to 1 after `i64::MAX`.
#[derive(Debug, Default)]
pub struct ConnectIds {
    last: i64,
}

impl ConnectIds {
    /// A fresh allocator; the first id is 1.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next id. The caller skips ids still in use (after a wrap) with
    /// [`ConnectIds::next_free`].
    pub fn next_id(&mut self) -> i64 {
        self.last = if self.last == i64::MAX {
            1
        } else {
            self.last + 1
        };
        self.last
    }

    /// The next id for which `in_use` is false.
    pub fn next_free(&mut self, in_use: impl Fn(i64) -> bool) -> i64 {
        loop {
            let id = self.next_id();
            if !in_use(id) {
                return id;
            }
        }
    }
}

/// A random, positive dial id (an int63 like the Go client's).
pub fn random_dial_id() -> i64 {
    loop {
        let v = rand::random::<i64>() & i64::MAX;
        if v != 0 {
            return v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_start_at_one_and_wrap_past_max_skipping_zero() {
        let mut ids = ConnectIds::new();
        assert_eq!(ids.next_id(), 1);
        assert_eq!(ids.next_id(), 2);
        ids.last = i64::MAX - 1;
        assert_eq!(ids.next_id(), i64::MAX);
        assert_eq!(ids.next_id(), 1);
    }

    #[test]
    fn next_free_skips_ids_in_use() {
        let mut ids = ConnectIds::new();
        assert_eq!(ids.next_free(|id| id <= 3), 4);
    }

    #[test]
    fn dial_ids_are_positive() {
        for _ in 0..1000 {
            assert!(random_dial_id() > 0);
        }
    }
}
