//! Every certificate and key of the test cluster, from two throw-away CAs
//! (the cluster CA and the aggregation layer's front-proxy CA).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use konnectivity_runtime::pki::{Ca, Leaf};

use super::net::{NodeNet, CONTROL_PLANE_IP};

/// The cluster's PKI, written into `dir`.
pub struct ClusterPki {
    /// The cluster CA (kube-apiserver clients, kubelets, the tunnel).
    pub ca: PathBuf,
    /// kube-apiserver's serving identity.
    pub apiserver: Leaf,
    /// `system:masters` client identity for kubectl, kwok and metrics-server.
    pub admin: Leaf,
    /// kube-apiserver's client identity towards kubelets.
    pub kubelet_client: Leaf,
    /// The service-account signing key (PKCS#8 PEM).
    pub service_account_key: PathBuf,
    /// Its public key (what verifies the tokens).
    pub service_account_pub: PathBuf,
    /// The front-proxy CA (aggregated APIs authenticate kube-apiserver by it).
    pub front_proxy_ca: PathBuf,
    /// kube-apiserver's client identity towards aggregated APIs.
    pub proxy_client: Leaf,
    /// The tunnel server's identity (agent port and mTLS frontend).
    pub tunnel_server: Leaf,
    /// The agents' client identity.
    pub tunnel_agent: Leaf,
    /// kube-apiserver's client identity towards the mTLS frontend.
    pub tunnel_frontend: Leaf,
    ca_issuer: Ca,
    dir: PathBuf,
}

/// The name of the front-proxy client certificate kube-apiserver presents.
pub const PROXY_CLIENT_CN: &str = "front-proxy-client";

impl ClusterPki {
    /// Generates everything into `dir`.
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        let ca = Ca::new(dir, "cluster")?;
        let cp = CONTROL_PLANE_IP.to_string();
        let apiserver = ca.issue(
            dir,
            "apiserver",
            &[
                &cp,
                "127.0.0.1",
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "198.51.100.225",
            ],
        )?;
        let admin = ca.issue_for(dir, "admin", "admin", Some("system:masters"), &[])?;
        let kubelet_client = ca.issue_for(
            dir,
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            Some("system:masters"),
            &[],
        )?;
        let sa = rcgen::KeyPair::generate()?;
        let service_account_key = dir.join("sa.key");
        std::fs::write(&service_account_key, sa.serialize_pem())?;
        let service_account_pub = dir.join("sa.pub");
        std::fs::write(&service_account_pub, sa.public_key_pem())?;
        let front = Ca::new(dir, "front-proxy")?;
        let proxy_client = front.issue(dir, PROXY_CLIENT_CN, &[])?;
        let tunnel_server =
            ca.issue(dir, "konnectivity-server", &[&cp, "127.0.0.1", "localhost"])?;
        let tunnel_agent = ca.issue(dir, "konnectivity-agent", &["konnectivity-agent"])?;
        let tunnel_frontend = ca.issue(dir, "konnectivity-client", &["kube-apiserver"])?;
        Ok(ClusterPki {
            ca: ca.cert.clone(),
            apiserver,
            admin,
            kubelet_client,
            service_account_key,
            service_account_pub,
            front_proxy_ca: front.cert.clone(),
            proxy_client,
            tunnel_server,
            tunnel_agent,
            tunnel_frontend,
            ca_issuer: ca,
            dir: dir.to_path_buf(),
        })
    }

    /// The serving certificate of `node`'s kubelet (for its InternalIP).
    pub fn kubelet_serving(&self, node: &NodeNet) -> anyhow::Result<Leaf> {
        self.serving(&format!("kubelet-{}", node.name), node.kubelet_ip)
    }

    /// A serving certificate from the cluster CA for `ip`.
    pub fn serving(&self, file: &str, ip: Ipv4Addr) -> anyhow::Result<Leaf> {
        self.ca_issuer.issue(&self.dir, file, &[&ip.to_string()])
    }

    /// A serving certificate from the cluster CA for `ip`, valid only
    /// between two dates (`(year, month, day)`): an expired one, say.
    pub fn serving_between(
        &self,
        file: &str,
        ip: Ipv4Addr,
        not_before: (i32, u8, u8),
        not_after: (i32, u8, u8),
    ) -> anyhow::Result<Leaf> {
        self.ca_issuer
            .issue_between(&self.dir, file, &[&ip.to_string()], not_before, not_after)
    }

    /// A client certificate for the Kubernetes user `user`.
    pub fn user(&self, file: &str, user: &str) -> anyhow::Result<Leaf> {
        self.ca_issuer.issue_for(&self.dir, file, user, None, &[])
    }

    /// A service-account token signed as kube-apiserver signs them (ES256
    /// with the service-account key; `kid` from the public key), carrying
    /// `claims`: lets a test make tokens kube-apiserver will not issue, such
    /// as expired ones.
    pub fn sign_token(&self, claims: &serde_json::Value) -> anyhow::Result<String> {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        use base64::Engine;
        use rcgen::{PublicKeyData, SigningKey};
        use sha2::Digest;
        let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&self.service_account_key)?)?;
        let kid = B64.encode(sha2::Sha256::digest(key.subject_public_key_info()));
        let header = serde_json::json!({"alg": "ES256", "kid": kid});
        let signed = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let der = key.sign(signed.as_bytes())?;
        Ok(format!("{signed}.{}", B64.encode(der_to_raw_p256(&der)?)))
    }
}

/// An ECDSA signature from DER (`SEQUENCE { r INTEGER, s INTEGER }`) to JOSE's
/// fixed 64 bytes (`r || s`).
fn der_to_raw_p256(der: &[u8]) -> anyhow::Result<Vec<u8>> {
    let bad = || anyhow::anyhow!("not a DER ECDSA signature");
    let body = match der {
        [0x30, len, rest @ ..] if *len as usize == rest.len() => rest,
        _ => return Err(bad()),
    };
    let mut out = Vec::with_capacity(64);
    let mut rest = body;
    for _ in 0..2 {
        let [0x02, len, tail @ ..] = rest else {
            return Err(bad());
        };
        let len = *len as usize;
        anyhow::ensure!(tail.len() >= len, "short DER integer");
        let int = &tail[..len];
        let int = &int[int.iter().take_while(|b| **b == 0).count()..];
        anyhow::ensure!(int.len() <= 32, "DER integer longer than 32 bytes");
        out.extend(std::iter::repeat_n(0, 32 - int.len()));
        out.extend_from_slice(int);
        rest = &tail[len..];
    }
    Ok(out)
}
