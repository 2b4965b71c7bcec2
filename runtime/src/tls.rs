//! rustls configurations built from PEM files. Every error names the file and
//! the flag's role, so a bad mount fails at start-up with one clear line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// A certificate, key or CA bundle that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("read {role} {path}: {source}")]
    Read {
        /// What the file is for ("server certificate", ...).
        role: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file holds no PEM item of the wanted kind.
    #[error("{role} {path}: no {want} found in PEM")]
    Empty {
        /// What the file is for.
        role: &'static str,
        /// The file.
        path: PathBuf,
        /// "CERTIFICATE" or "PRIVATE KEY".
        want: &'static str,
    },
    /// rustls refused the material (key does not match, bad CA, ...).
    #[error("{what}: {source}")]
    Rustls {
        /// What was being built.
        what: String,
        /// rustls' reason.
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built from the CA bundle.
    #[error("client CA {path}: {reason}")]
    ClientCa {
        /// The CA file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn read(role: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        role,
        path: path.to_owned(),
        source,
    })
}

/// Reads every certificate in a PEM file.
pub fn load_certs(
    role: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(role, path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Empty {
            role,
            path: path.to_owned(),
            want: "CERTIFICATE",
        });
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(role: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(role, path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .ok()
        .flatten()
        .ok_or_else(|| TlsError::Empty {
            role,
            path: path.to_owned(),
            want: "PRIVATE KEY",
        })
}

fn roots(role: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for c in load_certs(role, path)? {
        store.add(c).map_err(|source| TlsError::Rustls {
            what: format!("{role} {}", path.display()),
            source,
        })?;
    }
    Ok(store)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server identity and, optionally, the CA that client certificates must
/// chain to (which makes client certificates mandatory).
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    /// Certificate chain PEM.
    pub cert: PathBuf,
    /// Private key PEM.
    pub key: PathBuf,
    /// Client CA PEM; `None` means no client certificate is asked for.
    pub client_ca: Option<PathBuf>,
}

/// Builds a server configuration offering `alpn` protocols.
pub fn server_config(
    files: &ServerTlsFiles,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs("certificate", &files.cert)?;
    let key = load_key("key", &files.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            what: "TLS versions".into(),
            source,
        })?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots("client CA", ca)?),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::ClientCa {
                path: ca.clone(),
                reason: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Rustls {
            what: format!(
                "certificate {} with key {}",
                files.cert.display(),
                files.key.display()
            ),
            source,
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Builds a client configuration trusting `ca`, presenting `identity`
/// (certificate, key) when given, offering `alpn`.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            what: "TLS versions".into(),
            source,
        })?
        .with_root_certificates(roots("CA certificate", ca)?);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                load_certs("client certificate", cert)?,
                load_key("client key", key)?,
            )
            .map_err(|source| TlsError::Rustls {
                what: format!(
                    "client certificate {} with key {}",
                    cert.display(),
                    key.display()
                ),
                source,
            })?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// How often a [`Reloading`] configuration looks at its files, at most.
pub const RELOAD_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

type Build<C> = Box<dyn Fn() -> Result<Arc<C>, TlsError> + Send + Sync>;

/// A configuration built from files and rebuilt when one of them changes on
/// disk (a rotated certificate, key or CA bundle, including a Kubernetes
/// Secret's symlink swap). Each new connection takes the configuration of
/// the moment; open connections keep theirs. A change that does not build
/// (a certificate written before its key) is logged and the previous
/// configuration stays until the files build again.
pub struct Reloading<C> {
    what: &'static str,
    files: Vec<PathBuf>,
    build: Build<C>,
    state: std::sync::Mutex<ReloadState<C>>,
}

struct ReloadState<C> {
    current: Arc<C>,
    /// What the files looked like when `current` was built (or last failed).
    seen: Vec<Option<(std::time::SystemTime, u64)>>,
    looked: std::time::Instant,
}

fn stamps(files: &[PathBuf]) -> Vec<Option<(std::time::SystemTime, u64)>> {
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

impl<C> Reloading<C> {
    /// Builds the configuration now (an error is a start-up error) and keeps
    /// `build` to rebuild it when one of `files` changes.
    pub fn new(
        what: &'static str,
        files: Vec<PathBuf>,
        build: impl Fn() -> Result<Arc<C>, TlsError> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, TlsError> {
        let seen = stamps(&files);
        let current = build()?;
        Ok(Arc::new(Self {
            what,
            files,
            build: Box::new(build),
            state: std::sync::Mutex::new(ReloadState {
                current,
                seen,
                looked: std::time::Instant::now(),
            }),
        }))
    }

    /// The configuration for a new connection, rebuilt first if a file
    /// changed since the last look (looked at most every [`RELOAD_CHECK`]).
    pub fn current(&self) -> Arc<C> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.looked.elapsed() < RELOAD_CHECK {
            return st.current.clone();
        }
        st.looked = std::time::Instant::now();
        let now = stamps(&self.files);
        if now == st.seen {
            return st.current.clone();
        }
        st.seen = now;
        match (self.build)() {
            Ok(c) => {
                tracing::info!(
                    what = self.what,
                    "TLS files changed on disk; reloaded for new connections"
                );
                st.current = c;
            }
            Err(e) => {
                tracing::warn!(what = self.what, error = %e, "TLS files changed on disk but do not load; new connections keep the previous ones");
            }
        }
        st.current.clone()
    }
}

impl Reloading<ServerConfig> {
    /// A reloading [`server_config`].
    pub fn server(
        what: &'static str,
        files: &ServerTlsFiles,
        alpn: &[&[u8]],
    ) -> Result<Arc<Self>, TlsError> {
        let mut paths = vec![files.cert.clone(), files.key.clone()];
        paths.extend(files.client_ca.clone());
        let files = files.clone();
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        Self::new(what, paths, move || {
            let alpn: Vec<&[u8]> = alpn.iter().map(Vec::as_slice).collect();
            server_config(&files, &alpn)
        })
    }
}

impl Reloading<ClientConfig> {
    /// A reloading [`client_config`].
    pub fn client(
        what: &'static str,
        ca: &Path,
        identity: Option<(&Path, &Path)>,
        alpn: &[&[u8]],
    ) -> Result<Arc<Self>, TlsError> {
        let ca = ca.to_path_buf();
        let identity = identity.map(|(c, k)| (c.to_path_buf(), k.to_path_buf()));
        let mut paths = vec![ca.clone()];
        if let Some((c, k)) = &identity {
            paths.extend([c.clone(), k.clone()]);
        }
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        Self::new(what, paths, move || {
            let alpn: Vec<&[u8]> = alpn.iter().map(Vec::as_slice).collect();
            let id = identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
            client_config(&ca, id, &alpn)
        })
    }
}

#[cfg(test)]
mod reload_tests {
    use super::*;

    #[test]
    fn a_changed_file_is_rebuilt_once_and_a_broken_one_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("material");
        std::fs::write(&file, "1").unwrap();
        let f = file.clone();
        let r = Reloading::new("test", vec![file.clone()], move || {
            let text = std::fs::read_to_string(&f).unwrap();
            text.trim()
                .parse::<u32>()
                .map(Arc::new)
                .map_err(|_| TlsError::Empty {
                    role: "test",
                    path: f.clone(),
                    want: "a number",
                })
        })
        .unwrap();
        assert_eq!(*r.current(), 1);
        // The lengths differ each time: two writes can share an mtime.
        let later = |r: &Reloading<u32>| {
            r.state.lock().unwrap().looked -= RELOAD_CHECK;
            *r.current()
        };
        std::fs::write(&file, "22").unwrap();
        assert_eq!(later(&r), 22);
        std::fs::write(&file, "not yet").unwrap();
        assert_eq!(later(&r), 22, "a broken file keeps the previous one");
        std::fs::write(&file, "333").unwrap();
        assert_eq!(later(&r), 333);
        assert_eq!(later(&r), 333);
    }
}
