//! Certificates for a test: one CA for the cluster, leaves for the server,
//! agents and frontends, and a second, unrelated CA for refusal tests.

use konnectivity_runtime::pki::{Ca, Leaf};
use tempfile::TempDir;

/// Test PKI in a temp dir (removed on drop).
pub struct Pki {
    /// The directory (also used for Unix sockets).
    pub dir: TempDir,
    /// Trusted CA certificate.
    pub ca: std::path::PathBuf,
    /// Server identity (localhost, 127.0.0.1).
    pub server: Leaf,
    /// Agent client identity.
    pub agent: Leaf,
    /// Frontend client identity.
    pub frontend: Leaf,
    /// An identity from an unrelated CA.
    pub rogue: Leaf,
    /// The unrelated CA certificate.
    pub rogue_ca: std::path::PathBuf,
    ca_issuer: Ca,
}

impl Pki {
    /// Generates everything.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        let ca = Ca::new(p, "cluster").expect("ca");
        let server = ca
            .issue(p, "server", &["localhost", "127.0.0.1", "10.200.0.1"])
            .expect("server cert");
        let agent = ca.issue(p, "agent", &["agent"]).expect("agent cert");
        let frontend = ca
            .issue(p, "frontend", &["kube-apiserver"])
            .expect("frontend cert");
        let rogue_ca = Ca::new(p, "rogue").expect("rogue ca");
        let rogue = rogue_ca.issue(p, "rogue", &["agent"]).expect("rogue cert");
        Pki {
            ca: ca.cert.clone(),
            ca_issuer: ca,
            rogue_ca: rogue_ca.cert.clone(),
            dir,
            server,
            agent,
            frontend,
            rogue,
        }
    }

    /// Issues another leaf from the trusted CA.
    pub fn issue(&self, name: &str, names: &[&str]) -> Leaf {
        self.ca_issuer
            .issue(self.dir.path(), name, names)
            .expect("leaf")
    }

    /// A path inside the temp dir.
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}
