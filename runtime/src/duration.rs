//! Durations in flags: `30s`, `1h`, `500ms`, and Go's `time.Duration` form
//! (`1h0m0s`, `5m30s`) that existing manifests use.

use std::time::Duration;

/// Parses a duration flag value.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?}: {e} (examples: 30s, 5m, 1h0m0s)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_go_and_human_forms() {
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("1h0m0s"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("5m30s"), Ok(Duration::from_secs(330)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert!(parse("soon").is_err());
    }
}
