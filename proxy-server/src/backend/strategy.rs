//! `--proxy-strategies`: how a dial picks an agent. Strategies are tried in
//! order; the first that yields an agent wins.

/// One agent selection strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Any agent.
    Default,
    /// An agent whose `ipv4`/`ipv6`/`host` identifiers match the dial's host.
    DestHost,
    /// An agent advertising `default-route=true`.
    DefaultRoute,
}

impl Strategy {
    /// The flag's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Default => "default",
            Strategy::DestHost => "destHost",
            Strategy::DefaultRoute => "defaultRoute",
        }
    }

    /// Parses a comma-separated list such as `destHost,default`.
    pub fn parse_list(s: &str) -> Result<Vec<Strategy>, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let st = match part {
                "default" => Strategy::Default,
                "destHost" => Strategy::DestHost,
                "defaultRoute" => Strategy::DefaultRoute,
                other => {
                    return Err(format!(
                        "unknown strategy {other:?} (want default, destHost or defaultRoute)"
                    ))
                }
            };
            if out.contains(&st) {
                return Err(format!("strategy {part:?} listed twice"));
            }
            out.push(st);
        }
        if out.is_empty() {
            return Err("no strategy given".into());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ordered_lists_and_rejects_unknown_names() {
        assert_eq!(
            Strategy::parse_list("destHost, default"),
            Ok(vec![Strategy::DestHost, Strategy::Default])
        );
        assert!(Strategy::parse_list("nearest").is_err());
        assert!(Strategy::parse_list("").is_err());
        assert!(Strategy::parse_list("default,default").is_err());
    }
}
