//! The cluster's network: the control plane in the root namespace on a bridge
//! of the test's own, one network namespace per node, the kubelet addresses
//! inside the node namespaces only, and an `unreachable` route for them in the
//! root namespace, so the control plane reaches kubelets only through the
//! tunnel.
//!
//! Everything lives in one documentation range, 198.51.100.0/24: the bridge in
//! the lower /25, kubelet, pod and Service addresses in the upper /25 (which
//! gets the unreachable route). Before adding anything the range is checked
//! against the machine's own addresses, routes and name servers; the default
//! route is checked again afterwards.

use std::net::Ipv4Addr;
use std::process::Command;

/// The control plane's address on the bridge (kube-apiserver, our server's
/// agent port).
pub const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// kube-apiserver's Service range (never routed anywhere).
pub const SERVICE_CIDR: &str = "198.51.100.224/28";
const RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 51, 100, 0), 24);
const BRIDGE_PREFIX: u8 = 25;
const UNREACHABLE: &str = "198.51.100.128/25";
/// The routing-protocol tag on our unreachable route, so that only ours is
/// ever deleted.
const ROUTE_PROTO: &str = "213";

/// One node's place in the network.
#[derive(Debug, Clone)]
pub struct NodeNet {
    /// Kubernetes node name (`node-1`, ...).
    pub name: String,
    /// Network namespace name.
    pub netns: String,
    /// The node's address on the bridge (what the agent dials out from).
    pub host_ip: Ipv4Addr,
    /// The kubelet's address (the node's InternalIP), on the namespace's `lo`.
    pub kubelet_ip: Ipv4Addr,
    /// The node's pod range.
    pub pod_cidr: String,
}

impl NodeNet {
    /// `ip netns exec <ns>`: the prefix that runs a command on this node.
    pub fn exec_prefix(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.netns.clone(),
        ]
    }
}

/// The bridge, the node namespaces and the unreachable route; removed on drop.
pub struct Net {
    /// The nodes.
    pub nodes: Vec<NodeNet>,
    bridge: String,
    route: bool,
}

/// Runs `ip` with `args`; the error names the command and its stderr.
pub fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("run ip: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn in_range(a: Ipv4Addr) -> bool {
    let mask = u32::MAX << (32 - RANGE.1);
    u32::from(a) & mask == u32::from(RANGE.0)
}

/// Parses `a.b.c.d[/n]` at the start of `s`.
fn prefix_of(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, n) = match s.split_once('/') {
        Some((a, n)) => (a, n.parse().ok()?),
        None => (s, 32),
    };
    Some((a.parse().ok()?, n))
}

fn overlaps((a, n): (Ipv4Addr, u8)) -> bool {
    let n = n.min(RANGE.1);
    let mask = if n == 0 { 0 } else { u32::MAX << (32 - n) };
    u32::from(a) & mask == u32::from(RANGE.0) & mask && n > 0
}

/// Refuses to touch a machine that already uses any part of our range: an
/// address, a route (in any table) or a name server there.
fn check_range_free() -> Result<(), String> {
    let routes = ip(&["-4", "route", "show", "table", "all"])?;
    for line in routes.lines() {
        let mut words = line.split_whitespace();
        let mut first = words.next().unwrap_or("");
        // A typed route (`unreachable`, `local`, `throw`, ...) names its
        // prefix second.
        if first != "default" && prefix_of(first).is_none() {
            first = words.next().unwrap_or("");
        }
        if first == "default" {
            if let Some(gw) = line.split_whitespace().skip_while(|w| *w != "via").nth(1) {
                if gw.parse().map(in_range).unwrap_or(false) {
                    return Err(format!("the default gateway is in our range: {line}"));
                }
            }
            continue;
        }
        if let Some(p) = prefix_of(first) {
            if overlaps(p) {
                return Err(format!(
                    "a route already covers part of {UNREACHABLE}'s /24: {line}"
                ));
            }
        }
    }
    let addrs = ip(&["-4", "-o", "addr", "show"])?;
    for line in addrs.lines() {
        if let Some(a) = line.split_whitespace().skip_while(|w| *w != "inet").nth(1) {
            if prefix_of(a).map(overlaps).unwrap_or(false) {
                return Err(format!(
                    "an address of this machine is in our range: {line}"
                ));
            }
        }
    }
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    for line in resolv.lines() {
        if let Some(ns) = line.strip_prefix("nameserver") {
            if ns.trim().parse().map(in_range).unwrap_or(false) {
                return Err(format!("a name server is in our range: {line}"));
            }
        }
    }
    Ok(())
}

fn default_route() -> String {
    ip(&["-4", "route", "show", "default"]).unwrap_or_default()
}

/// Deletes our unreachable route (only one carrying our tag).
fn remove_our_route() {
    let _ = ip(&[
        "route",
        "del",
        "unreachable",
        UNREACHABLE,
        "proto",
        ROUTE_PROTO,
    ]);
}

/// Removes what an earlier run of this harness left behind if that process is
/// gone (a killed test cannot run its drop).
fn remove_stale() {
    let links = ip(&["-o", "link", "show", "type", "bridge"]).unwrap_or_default();
    for line in links.lines() {
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("knpbr")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        remove_our_route();
        let _ = ip(&["link", "del", name]);
        for ns in ip(&["netns", "list"]).unwrap_or_default().lines() {
            let ns = ns.split_whitespace().next().unwrap_or("");
            if ns.starts_with(&format!("knp{pid}-")) {
                let _ = ip(&["netns", "del", ns]);
            }
        }
    }
}

impl Net {
    /// Creates the bridge and `nodes` node namespaces.
    pub fn create(nodes: usize) -> Result<Net, String> {
        // Pod ranges are /28s from .160 up to the Service range at .224.
        assert!((1..=4).contains(&nodes), "1 to 4 nodes");
        remove_stale();
        check_range_free()?;
        let before = default_route();
        let pid = std::process::id();
        // Built first so that an early return drops it and removes what was made.
        let mut net = Net {
            nodes: Vec::new(),
            bridge: format!("knpbr{pid}"),
            route: false,
        };
        let br = net.bridge.clone();
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{CONTROL_PLANE_IP}/{BRIDGE_PREFIX}"),
            "dev",
            &br,
        ])?;
        ip(&["link", "set", &br, "up"])?;
        ip(&[
            "route",
            "add",
            "unreachable",
            UNREACHABLE,
            "proto",
            ROUTE_PROTO,
        ])?;
        net.route = true;
        for i in 1..=nodes {
            let n = NodeNet {
                name: format!("node-{i}"),
                netns: format!("knp{pid}-node-{i}"),
                host_ip: Ipv4Addr::new(198, 51, 100, 10 + i as u8),
                kubelet_ip: Ipv4Addr::new(198, 51, 100, 128 + i as u8),
                pod_cidr: format!("198.51.100.{}/28", 160 + 16 * (i - 1)),
            };
            ip(&["netns", "add", &n.netns])?;
            net.nodes.push(n.clone());
            let (outer, inner) = (format!("kv{pid}n{i}"), format!("ki{pid}n{i}"));
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ])?;
            ip(&["link", "set", &outer, "master", &br, "up"])?;
            ip(&["link", "set", &inner, "netns", &n.netns])?;
            let ns = n.netns.as_str();
            ip(&["-n", ns, "link", "set", &inner, "name", "eth0"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/{BRIDGE_PREFIX}", n.host_ip),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/32", n.kubelet_ip),
                "dev",
                "lo",
            ])?;
        }
        // Nodes reach each other's kubelets (as on a real node network, for
        // metrics-server); the control plane does not.
        for n in &net.nodes {
            for other in net.nodes.iter().filter(|o| o.name != n.name) {
                ip(&[
                    "-n",
                    &n.netns,
                    "route",
                    "add",
                    &format!("{}/32", other.kubelet_ip),
                    "via",
                    &other.host_ip.to_string(),
                ])?;
            }
        }
        let after = default_route();
        if after != before {
            return Err(format!(
                "the default route changed while building the test network: {before:?} -> {after:?}"
            ));
        }
        Ok(net)
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> &NodeNet {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // The route first: a stale bridge is found and removed by the next
        // run, a stale route alone would make it refuse to start.
        if self.route {
            remove_our_route();
        }
        for n in &self.nodes {
            let _ = ip(&["netns", "del", &n.netns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks() {
        assert!(overlaps(prefix_of("198.51.100.0/24").unwrap()));
        assert!(overlaps(prefix_of("198.51.100.77").unwrap()));
        assert!(overlaps(prefix_of("198.51.0.0/16").unwrap()));
        assert!(!overlaps(prefix_of("0.0.0.0/0").unwrap()));
        assert!(!overlaps(prefix_of("192.0.2.0/24").unwrap()));
        assert!(!overlaps(prefix_of("203.0.113.9").unwrap()));
        assert!(in_range("198.51.100.129".parse().unwrap()));
        assert!(!in_range("198.51.101.1".parse().unwrap()));
    }
}
