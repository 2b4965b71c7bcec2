//! Network namespaces a test makes for itself: a control-plane namespace and
//! a node namespace joined by one veth pair, with a kubelet address that only
//! the node has. Nothing is added to the machine's own namespace, so its
//! routes (and the package registries behind them) are untouched. Removed on
//! drop.
//!
//! Needs root. Where namespaces cannot be made the test is skipped with the
//! reason, unless `KNP_REQUIRE_NETNS=1` (set by CI), where that is a failure.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The server's address, in the control-plane namespace.
pub const SERVER_IP: &str = "10.200.0.1";
/// The node's address on the veth, in the node namespace.
pub const NODE_IP: &str = "10.200.0.2";
/// The kubelet's address: on the node's loopback only, no route to it from
/// the control plane.
pub const KUBELET_IP: &str = "10.201.0.10";

/// Runs `ip` with `args`.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A control-plane and a node namespace, joined by a veth pair.
pub struct Pair {
    /// Control-plane namespace name.
    pub cp: String,
    /// Node namespace name.
    pub node: String,
    node_dev: String,
}

static SERIAL: AtomicU32 = AtomicU32::new(0);

impl Pair {
    /// Makes the namespaces (names unique per process and call).
    pub fn create() -> Result<Self, String> {
        let id = (std::process::id() % 10_000) * 10 + SERIAL.fetch_add(1, Ordering::Relaxed) % 10;
        // Built first so that an early return drops it and removes what was made.
        let ns = Pair {
            cp: format!("knp-cp-{id}"),
            node: format!("knp-node-{id}"),
            node_dev: format!("knd{id}"),
        };
        let va = format!("kcp{id}");
        let vb = ns.node_dev.clone();
        ip(&["netns", "add", &ns.cp])?;
        ip(&["netns", "add", &ns.node])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &ns.cp])?;
        ip(&["link", "set", &vb, "netns", &ns.node])?;
        let cp_addr = format!("{SERVER_IP}/24");
        let node_addr = format!("{NODE_IP}/24");
        ip(&["-n", &ns.cp, "addr", "add", &cp_addr, "dev", &va])?;
        ip(&["-n", &ns.node, "addr", "add", &node_addr, "dev", &vb])?;
        for (n, dev) in [(&ns.cp, &va), (&ns.node, &vb)] {
            ip(&["-n", n, "link", "set", dev, "up"])?;
            ip(&["-n", n, "link", "set", "lo", "up"])?;
        }
        let kubelet = format!("{KUBELET_IP}/32");
        ip(&["-n", &ns.node, "addr", "add", &kubelet, "dev", "lo"])?;
        Ok(ns)
    }

    /// Makes the namespaces, or says why not: `None` (skip, printed) where
    /// they cannot be made, a panic where `KNP_REQUIRE_NETNS=1`.
    pub fn create_or_skip(test: &str) -> Option<Self> {
        match Self::create() {
            Ok(p) => Some(p),
            Err(e) if std::env::var("KNP_REQUIRE_NETNS").as_deref() == Ok("1") => {
                panic!("{test}: network namespaces are required here (KNP_REQUIRE_NETNS=1) but cannot be made: {e}")
            }
            Err(e) => {
                eprintln!("SKIPPED: {test}: cannot create network namespaces here ({e}); KNP_REQUIRE_NETNS=1 makes this a failure");
                None
            }
        }
    }

    /// `ip netns exec <cp>`, to prefix a command.
    pub fn in_cp(&self) -> [&str; 4] {
        ["ip", "netns", "exec", self.cp.as_str()]
    }

    /// `ip netns exec <node>`, to prefix a command.
    pub fn in_node(&self) -> [&str; 4] {
        ["ip", "netns", "exec", self.node.as_str()]
    }

    /// Takes the node's end of the link down (a partition: packets are lost,
    /// nobody is told) or brings it back up.
    pub fn set_link(&self, up: bool) -> Result<(), String> {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.node, "link", "set", &self.node_dev, state])
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.cp]);
        let _ = ip(&["netns", "del", &self.node]);
    }
}
