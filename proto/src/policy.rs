//! Who may go where: the `--allowed-destinations` list of address ranges and
//! ports a dial may reach, checked on the resolved address (so a name cannot
//! lead around it).
//!
//! The list is comma-separated; each entry is an address range and an
//! optional port or port range:
//!
//! ```text
//! 10.0.0.0/8:10250          # kubelets in 10/8
//! 192.168.1.7               # one address, any port
//! [fd00::/8]:10250-10255    # IPv6 in brackets when a port follows
//! *:10250                   # any address, one port
//! ```
//!
//! An empty list allows everything (the reference has no such check). An
//! IPv4-mapped IPv6 address is matched as the IPv4 address it carries.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// A parsed `--allowed-destinations` list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Destinations {
    rules: Vec<Rule>,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    /// `None`: any address.
    net: Option<(IpAddr, u8)>,
    ports: (u16, u16),
}

/// An entry that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("allowed destination {entry:?}: {why}")]
pub struct PolicyError {
    entry: String,
    why: &'static str,
}

impl Destinations {
    /// Allows every destination.
    pub fn allow_all() -> Self {
        Self::default()
    }

    /// Parses a comma-separated list (see the module docs); empty allows all.
    pub fn parse(s: &str) -> Result<Self, PolicyError> {
        let entries: Vec<&str> = s
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        let rules = entries
            .iter()
            .map(|entry| {
                parse_rule(entry).map_err(|why| PolicyError {
                    entry: entry.to_string(),
                    why,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Destinations {
            rules,
            text: entries.join(","),
        })
    }

    /// True when nothing is restricted.
    pub fn allows_all(&self) -> bool {
        self.rules.is_empty()
    }

    /// May a dial reach `addr`?
    pub fn allows(&self, addr: SocketAddr) -> bool {
        if self.rules.is_empty() {
            return true;
        }
        let ip = canonical(addr.ip());
        let port = addr.port();
        self.rules.iter().any(|r| {
            (r.ports.0..=r.ports.1).contains(&port)
                && r.net.is_none_or(|(net, len)| contains(net, len, ip))
        })
    }
}

impl Destinations {
    /// May a dial to `target` (`host:port`, as a frontend asked for it) go
    /// out, judged without resolving it: an IP literal against every entry,
    /// a name only against `*` entries (the server cannot know what a node's
    /// resolver will answer).
    pub fn allows_target(&self, target: &str) -> bool {
        if self.rules.is_empty() {
            return true;
        }
        if let Ok(addr) = target.parse::<SocketAddr>() {
            return self.allows(addr);
        }
        let Some(port) = target
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
        else {
            return false;
        };
        self.rules
            .iter()
            .any(|r| r.net.is_none() && (r.ports.0..=r.ports.1).contains(&port))
    }
}

impl fmt::Display for Destinations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rules.is_empty() {
            f.write_str("any")
        } else {
            f.write_str(&self.text)
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn contains(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = u32::MAX.checked_shl(32 - len as u32).unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = u128::MAX.checked_shl(128 - len as u32).unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

fn parse_rule(entry: &str) -> Result<Rule, &'static str> {
    // Split the address part from an optional port part.
    let (addr, ports) = if let Some(rest) = entry.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or("missing ]")?;
        let ports = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("want [range]:port")?),
        };
        (inside, ports)
    } else if entry.matches(':').count() > 1 {
        // Bare IPv6, no port.
        (entry, None)
    } else {
        match entry.split_once(':') {
            Some((a, p)) => (a, Some(p)),
            None => (entry, None),
        }
    };
    let ports = match ports {
        None => (0, u16::MAX),
        Some(p) => {
            let (lo, hi) = p.split_once('-').unwrap_or((p, p));
            let lo: u16 = lo.parse().map_err(|_| "port is not a number 0-65535")?;
            let hi: u16 = hi.parse().map_err(|_| "port is not a number 0-65535")?;
            if lo > hi {
                return Err("port range runs backwards");
            }
            (lo, hi)
        }
    };
    let net = if addr == "*" {
        None
    } else {
        let (ip, len) = match addr.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (addr, None),
        };
        let ip: IpAddr = ip.parse().map_err(|_| "not an IP address or CIDR")?;
        let ip = canonical(ip);
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or("prefix length out of range")?,
        };
        Some((ip, len))
    };
    Ok(Rule { net, ports })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn empty_allows_all() {
        let d = Destinations::parse(" , ").unwrap();
        assert!(d.allows_all());
        assert!(d.allows(a("8.8.8.8:53")));
        assert_eq!(d.to_string(), "any");
    }

    #[test]
    fn ranges_and_ports() {
        let d =
            Destinations::parse("10.0.0.0/8:10250, 192.168.1.7, [fd00::/8]:10250-10255, *:4443")
                .unwrap();
        assert!(d.allows(a("10.1.2.3:10250")));
        assert!(!d.allows(a("10.1.2.3:22")));
        assert!(!d.allows(a("11.0.0.1:10250")));
        assert!(d.allows(a("192.168.1.7:1")));
        assert!(!d.allows(a("192.168.1.8:1")));
        assert!(d.allows(a("[fd12::1]:10255")));
        assert!(!d.allows(a("[fd12::1]:10256")));
        assert!(!d.allows(a("[fe80::1]:10250")));
        assert!(d.allows(a("1.2.3.4:4443")));
        assert!(d.allows(a("[::1]:4443")));
        // An IPv4-mapped address is the IPv4 address.
        assert!(d.allows(a("[::ffff:10.9.9.9]:10250")));
        assert!(!d.allows(a("[::ffff:11.9.9.9]:10250")));
        assert_eq!(
            d.to_string(),
            "10.0.0.0/8:10250,192.168.1.7,[fd00::/8]:10250-10255,*:4443"
        );
        let d = Destinations::parse("0.0.0.0/0:80,::/0").unwrap();
        assert!(d.allows(a("1.1.1.1:80")) && !d.allows(a("1.1.1.1:81")));
        assert!(d.allows(a("[2001:db8::1]:9")));
    }

    #[test]
    fn targets_as_given_names_only_match_any_address_entries() {
        let d = Destinations::parse("10.0.0.0/8:10250,*:443").unwrap();
        assert!(d.allows_target("10.0.0.5:10250"));
        assert!(!d.allows_target("10.0.0.5:22"));
        assert!(!d.allows_target("node-1:10250"));
        assert!(d.allows_target("webhook.ns.svc:443"));
        assert!(!d.allows_target("no-port"));
        assert!(Destinations::allow_all().allows_target("anything"));
    }

    #[test]
    fn bad_entries_say_which_and_why() {
        for (s, why) in [
            ("10.0.0.0/33", "prefix length"),
            ("10.0.0.0/8:99999", "port"),
            ("10.0.0.0/8:20-10", "backwards"),
            ("node-1:10250", "not an IP"),
            ("[fd00::/8:10250", "missing ]"),
            ("[fd00::/8]10250", "[range]:port"),
        ] {
            let e = Destinations::parse(&format!("10.0.0.1,{s}")).unwrap_err();
            assert!(e.to_string().contains(why), "{s}: {e}");
            assert!(e.to_string().contains(s), "{s}: {e}");
        }
    }
}
