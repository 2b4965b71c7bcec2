//! Where kube-apiserver reaches a node's kubelet: the node's first address of
//! the first `--kubelet-preferred-address-types` type that it has, and the
//! port from `status.daemonEndpoints.kubeletEndpoint`.

use k8s_openapi::api::core::v1::Node;
use kube::Api;

/// kube-apiserver's default `--kubelet-preferred-address-types`.
pub const DEFAULT_PREFERRED: [&str; 5] = [
    "Hostname",
    "InternalDNS",
    "InternalIP",
    "ExternalDNS",
    "ExternalIP",
];

/// The kubelet port when the node does not publish one.
pub const DEFAULT_KUBELET_PORT: u16 = 10250;

/// A node's kubelet endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletEndpoint {
    /// The address chosen.
    pub host: String,
    /// The address type it came from.
    pub address_type: String,
    /// The kubelet port.
    pub port: u16,
    /// Every address the node has, as `Type=address`.
    pub all: Vec<String>,
}

impl KubeletEndpoint {
    /// `host:port`, bracketing IPv6.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Picks the endpoint as kube-apiserver does; `Err` when the node has no
/// address of any preferred type.
pub fn kubelet_endpoint(node: &Node, preferred: &[String]) -> Result<KubeletEndpoint, String> {
    let status = node.status.as_ref();
    let addresses = status
        .and_then(|s| s.addresses.as_ref())
        .cloned()
        .unwrap_or_default();
    let all: Vec<String> = addresses
        .iter()
        .map(|a| format!("{}={}", a.type_, a.address))
        .collect();
    let port = status
        .and_then(|s| s.daemon_endpoints.as_ref())
        .and_then(|d| d.kubelet_endpoint.as_ref())
        .map(|k| k.port)
        .filter(|p| (1..=65535).contains(p))
        .map(|p| p as u16)
        .unwrap_or(DEFAULT_KUBELET_PORT);
    for t in preferred {
        if let Some(a) = addresses.iter().find(|a| &a.type_ == t) {
            return Ok(KubeletEndpoint {
                host: a.address.clone(),
                address_type: t.clone(),
                port,
                all,
            });
        }
    }
    Err(format!(
        "node has no address of the preferred types {} (it has: {})",
        preferred.join(","),
        if all.is_empty() {
            "none".to_string()
        } else {
            all.join(", ")
        }
    ))
}

/// Reads the node named `name`.
pub async fn get(client: &kube::Client, name: &str) -> Result<Node, kube::Error> {
    Api::<Node>::all(client.clone()).get(name).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        DaemonEndpoint, NodeAddress, NodeDaemonEndpoints, NodeStatus,
    };

    fn node(addrs: &[(&str, &str)], port: Option<i32>) -> Node {
        Node {
            status: Some(NodeStatus {
                addresses: Some(
                    addrs
                        .iter()
                        .map(|(t, a)| NodeAddress {
                            type_: t.to_string(),
                            address: a.to_string(),
                        })
                        .collect(),
                ),
                daemon_endpoints: port.map(|p| NodeDaemonEndpoints {
                    kubelet_endpoint: Some(DaemonEndpoint { port: p }),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn honours_the_preferred_order() {
        let n = node(
            &[("Hostname", "node-1"), ("InternalIP", "10.0.0.5")],
            Some(10250),
        );
        let default: Vec<String> = DEFAULT_PREFERRED.iter().map(|s| s.to_string()).collect();
        let e = kubelet_endpoint(&n, &default).unwrap();
        assert_eq!((e.host.as_str(), e.port), ("node-1", 10250));
        let ip = kubelet_endpoint(&n, &["InternalIP".to_string()]).unwrap();
        assert_eq!(ip.authority(), "10.0.0.5:10250");
        assert_eq!(ip.address_type, "InternalIP");
        let other = node(&[("InternalIP", "fd00::5")], Some(11250));
        assert_eq!(
            kubelet_endpoint(&other, &default).unwrap().authority(),
            "[fd00::5]:11250"
        );
        let none = kubelet_endpoint(&n, &["ExternalIP".to_string()]).unwrap_err();
        assert!(none.contains("Hostname=node-1"), "{none}");
        assert_eq!(
            kubelet_endpoint(&node(&[("InternalIP", "10.0.0.5")], None), &default)
                .unwrap()
                .port,
            10250
        );
    }
}
