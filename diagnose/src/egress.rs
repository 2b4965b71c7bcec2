//! Hop 1: kube-apiserver's `--egress-selector-config-file`. Read with the
//! same fields and rules kube-apiserver applies to the `cluster` selection,
//! then checked against the file system (the socket or the TLS files exist).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The parts of `EgressSelectorConfiguration` that matter here.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct File {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    egress_selections: Vec<Selection>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Selection {
    name: String,
    connection: Connection,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Connection {
    proxy_protocol: String,
    transport: Option<TransportSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TransportSpec {
    uds: Option<Uds>,
    tcp: Option<Tcp>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Uds {
    uds_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Tcp {
    url: String,
    tls_config: Option<TlsSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TlsSpec {
    ca_bundle: Option<String>,
    client_key: Option<String>,
    client_cert: Option<String>,
}

/// How kube-apiserver reaches the nodes, from the `cluster` selection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Egress {
    /// `Direct`: no proxy; kube-apiserver dials the kubelet itself.
    Direct,
    /// Through a proxy-server.
    Proxy {
        /// `GRPC` or `HTTPConnect`.
        mode: konnectivity_client::Mode,
        /// Where.
        transport: Where,
    },
}

/// A proxy-server's address as the file gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Where {
    /// `transport.uds.udsName`.
    Unix(PathBuf),
    /// `transport.tcp` with mutual TLS.
    Tls {
        /// `host:port` from the URL.
        addr: String,
        /// The host, for the server's certificate name.
        host: String,
        /// `tlsConfig.caBundle`.
        ca: Option<PathBuf>,
        /// `tlsConfig.clientCert`.
        cert: PathBuf,
        /// `tlsConfig.clientKey`.
        key: PathBuf,
    },
}

/// Parses the file's text; `Err` says what kube-apiserver would reject.
pub fn parse(text: &str) -> Result<Egress, String> {
    let file: File = serde_saphyr::from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    match file.kind.as_deref() {
        Some("EgressSelectorConfiguration") => {}
        other => {
            return Err(format!(
                "kind is {other:?}, want \"EgressSelectorConfiguration\""
            ))
        }
    }
    match file.api_version.as_deref() {
        Some("apiserver.k8s.io/v1beta1" | "apiserver.k8s.io/v1" | "apiserver.k8s.io/v1alpha1") => {}
        other => {
            return Err(format!(
                "apiVersion is {other:?}, want apiserver.k8s.io/v1beta1 or v1"
            ))
        }
    }
    let mut seen = Vec::new();
    for s in &file.egress_selections {
        if !matches!(
            s.name.as_str(),
            "cluster" | "controlplane" | "etcd" | "master"
        ) {
            return Err(format!(
                "egress selection name {:?} is not one of cluster, controlplane, etcd",
                s.name
            ));
        }
        if seen.contains(&s.name) {
            return Err(format!("egress selection {:?} is listed twice", s.name));
        }
        seen.push(s.name.clone());
    }
    let Some(cluster) = file.egress_selections.iter().find(|s| s.name == "cluster") else {
        return Ok(Egress::Direct);
    };
    let c = &cluster.connection;
    let mode = match c.proxy_protocol.as_str() {
        "Direct" => {
            if c.transport.is_some() {
                return Err("proxyProtocol Direct must not have a transport".into());
            }
            return Ok(Egress::Direct);
        }
        "GRPC" => konnectivity_client::Mode::Grpc,
        "HTTPConnect" => konnectivity_client::Mode::HttpConnect,
        other => {
            return Err(format!(
                "proxyProtocol {other:?} is not one of Direct, HTTPConnect, GRPC"
            ))
        }
    };
    let t = c
        .transport
        .as_ref()
        .ok_or_else(|| format!("proxyProtocol {} needs a transport", c.proxy_protocol))?;
    let transport = match (&t.uds, &t.tcp) {
        (Some(_), Some(_)) => return Err("transport has both uds and tcp; give one".into()),
        (None, None) => return Err("transport has neither uds nor tcp".into()),
        (Some(u), None) => {
            if u.uds_name.is_empty() {
                return Err("transport.uds.udsName is empty".into());
            }
            Where::Unix(PathBuf::from(&u.uds_name))
        }
        (None, Some(tcp)) => {
            let rest = tcp.url.strip_prefix("https://").ok_or_else(|| {
                format!(
                    "transport.tcp.url {:?}: only https:// (mutual TLS) is supported",
                    tcp.url
                )
            })?;
            let addr = rest.trim_end_matches('/').to_string();
            let host = match addr.rsplit_once(':') {
                Some((h, p)) if p.parse::<u16>().is_ok() => {
                    h.trim_start_matches('[').trim_end_matches(']').to_string()
                }
                _ => return Err(format!("transport.tcp.url {:?} has no port", tcp.url)),
            };
            let tls = tcp
                .tls_config
                .as_ref()
                .ok_or("transport.tcp.tlsConfig is required with https://")?;
            let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) else {
                return Err(
                    "transport.tcp.tlsConfig needs clientCert and clientKey (the server requires a client certificate)"
                        .into(),
                );
            };
            Where::Tls {
                addr,
                host,
                ca: tls.ca_bundle.as_ref().map(PathBuf::from),
                cert: PathBuf::from(cert),
                key: PathBuf::from(key),
            }
        }
    };
    Ok(Egress::Proxy { mode, transport })
}

/// Files the configuration names that do not exist (or, for the socket, are
/// not a socket).
pub fn missing_files(w: &Where) -> Vec<String> {
    use std::os::unix::fs::FileTypeExt;
    let mut out = Vec::new();
    match w {
        Where::Unix(p) => match std::fs::metadata(p) {
            Ok(m) if m.file_type().is_socket() => {}
            Ok(_) => out.push(format!("{} exists but is not a socket", p.display())),
            Err(e) => out.push(format!("socket {}: {e}", p.display())),
        },
        Where::Tls { ca, cert, key, .. } => {
            for (role, p) in [
                ("caBundle", ca.as_deref()),
                ("clientCert", Some(cert)),
                ("clientKey", Some(key)),
            ] {
                if let Some(p) = p {
                    if let Err(e) = std::fs::metadata(p) {
                        out.push(format!("{role} {}: {e}", p.display()));
                    }
                }
            }
        }
    }
    out
}

/// Reads and parses the file.
pub fn load(path: &Path) -> Result<Egress, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use konnectivity_client::Mode;

    const GRPC: &str = "apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
- name: cluster
  connection:
    proxyProtocol: GRPC
    transport:
      uds:
        udsName: /etc/kubernetes/konnectivity-server/konnectivity-server.socket
";

    #[test]
    fn reads_the_documented_configurations() {
        assert_eq!(
            parse(GRPC),
            Ok(Egress::Proxy {
                mode: Mode::Grpc,
                transport: Where::Unix(
                    "/etc/kubernetes/konnectivity-server/konnectivity-server.socket".into()
                ),
            })
        );
        let mtls = "apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
- name: cluster
  connection:
    proxyProtocol: HTTPConnect
    transport:
      tcp:
        url: https://10.0.0.1:8131
        tlsConfig:
          caBundle: /ca.crt
          clientKey: /c.key
          clientCert: /c.crt
";
        assert_eq!(
            parse(mtls),
            Ok(Egress::Proxy {
                mode: Mode::HttpConnect,
                transport: Where::Tls {
                    addr: "10.0.0.1:8131".into(),
                    host: "10.0.0.1".into(),
                    ca: Some("/ca.crt".into()),
                    cert: "/c.crt".into(),
                    key: "/c.key".into(),
                },
            })
        );
        let direct = GRPC.replace("name: cluster", "name: etcd");
        assert_eq!(parse(&direct), Ok(Egress::Direct));
    }

    #[test]
    fn rejects_what_kube_apiserver_rejects() {
        for (bad, want) in [
            (GRPC.replace("GRPC", "SSH"), "proxyProtocol"),
            (
                GRPC.replace("EgressSelectorConfiguration", "Config"),
                "kind",
            ),
            (GRPC.replace("name: cluster", "name: nodes"), "not one of"),
            (GRPC.replace("udsName: /etc", "udsName: \"\"\n#"), "empty"),
            ("kind: [".to_string(), "YAML"),
        ] {
            let e = parse(&bad).expect_err(&bad);
            assert!(e.contains(want), "{e} (want {want})");
        }
    }

    #[test]
    fn a_missing_socket_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nope.sock");
        let m = missing_files(&Where::Unix(p.clone()));
        assert_eq!(m.len(), 1);
        assert!(m[0].contains("nope.sock"), "{m:?}");
        std::fs::write(&p, "").unwrap();
        assert!(missing_files(&Where::Unix(p))[0].contains("not a socket"));
    }
}
