//! Throw-away certificate authorities for `demo` and the tests: a CA and leaf
//! certificates written as PEM files into a directory. Never for production.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate authority that can issue leaves.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate file.
    pub cert: PathBuf,
}

/// A leaf certificate and its key on disk.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// Certificate PEM file.
    pub cert: PathBuf,
    /// Key PEM file.
    pub key: PathBuf,
}

impl Ca {
    /// Creates a CA named `name`, writing `<dir>/<name>-ca.crt`.
    pub fn new(dir: &Path, name: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let cert = dir.join(format!("{name}-ca.crt"));
        std::fs::write(&cert, issuer.pem())?;
        Ok(Self { issuer, cert })
    }

    /// Issues a leaf for `names` (DNS names or IP addresses) usable both as a
    /// server and as a client certificate; writes `<dir>/<file>.crt/.key`.
    pub fn issue(&self, dir: &Path, file: &str, names: &[&str]) -> anyhow::Result<Leaf> {
        self.issue_for(dir, file, file, None, names)
    }

    /// Like [`Ca::issue`], with subject common name `cn` and organization
    /// `org` (Kubernetes reads them as user name and group).
    pub fn issue_for(
        &self,
        dir: &Path,
        file: &str,
        cn: &str,
        org: Option<&str>,
        names: &[&str],
    ) -> anyhow::Result<Leaf> {
        self.issue_with(dir, file, cn, org, names, |_| {})
    }

    /// Like [`Ca::issue`], valid only between two dates (`(year, month,
    /// day)`, UTC): certificates that expired or are not valid yet.
    pub fn issue_between(
        &self,
        dir: &Path,
        file: &str,
        names: &[&str],
        not_before: (i32, u8, u8),
        not_after: (i32, u8, u8),
    ) -> anyhow::Result<Leaf> {
        self.issue_with(dir, file, file, None, names, |p| {
            p.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
            p.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        })
    }

    fn issue_with(
        &self,
        dir: &Path,
        file: &str,
        cn: &str,
        org: Option<&str>,
        names: &[&str],
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> anyhow::Result<Leaf> {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        adjust(&mut params);
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(o) = org {
            params.distinguished_name.push(DnType::OrganizationName, o);
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let leaf = Leaf {
            cert: dir.join(format!("{file}.crt")),
            key: dir.join(format!("{file}.key")),
        };
        std::fs::write(&leaf.cert, cert.pem())?;
        std::fs::write(&leaf.key, key.serialize_pem())?;
        Ok(leaf)
    }
}
