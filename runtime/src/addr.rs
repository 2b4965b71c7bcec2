//! Listener addresses from the upstream `--*-bind-address` / `--*-port` pairs.

/// `host:port` for a bind address flag and a port flag; an empty host means
/// every address, and IPv6 hosts get brackets.
pub fn listen_addr(host: &str, port: u16) -> String {
    let host = if host.is_empty() { "0.0.0.0" } else { host };
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::listen_addr;

    #[test]
    fn empty_means_all_and_ipv6_gets_brackets() {
        assert_eq!(listen_addr("", 8091), "0.0.0.0:8091");
        assert_eq!(listen_addr("127.0.0.1", 0), "127.0.0.1:0");
        assert_eq!(listen_addr("::1", 8092), "[::1]:8092");
    }
}
