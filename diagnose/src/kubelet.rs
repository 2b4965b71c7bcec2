//! Hops 5 and 6: TLS to the kubelet through the tunnel, as kube-apiserver
//! does it (verified against `--kubelet-certificate-authority` when given,
//! not verified otherwise), and a real `GET /healthz`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::report::{Check, Hop, Status};

/// One certificate of the kubelet's chain, as read.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// Subject DN.
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// Validity start.
    pub not_before: SystemTime,
    /// Validity end.
    pub not_after: SystemTime,
    /// DNS and IP subject alternative names.
    pub sans: Vec<String>,
}

impl CertInfo {
    /// Reads a DER certificate; `None` if it does not parse.
    pub fn parse(der: &[u8]) -> Option<CertInfo> {
        let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
        let time = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
            } else {
                SystemTime::UNIX_EPOCH
            }
        };
        let mut sans = Vec::new();
        if let Ok(Some(ext)) = c.subject_alternative_name() {
            use x509_parser::extensions::GeneralName;
            for n in &ext.value.general_names {
                match n {
                    GeneralName::DNSName(d) => sans.push(d.to_string()),
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => sans.push(
                            std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).ok()?).to_string(),
                        ),
                        16 => sans.push(
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).ok()?).to_string(),
                        ),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        Some(CertInfo {
            subject: c.subject().to_string(),
            issuer: c.issuer().to_string(),
            not_before: time(c.validity().not_before),
            not_after: time(c.validity().not_after),
            sans,
        })
    }

    /// One line for the report.
    pub fn line(&self) -> String {
        let fmt = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        format!(
            "subject {:?}, issuer {:?}, valid {} to {}, SANs [{}]",
            self.subject,
            self.issuer,
            fmt(self.not_before),
            fmt(self.not_after),
            self.sans.join(", ")
        )
    }

    /// Problems seen without a CA: expiry and the name, against `now` and
    /// `host`.
    pub fn problems(&self, host: &str, now: SystemTime) -> Vec<String> {
        let mut out = Vec::new();
        if now > self.not_after {
            out.push(format!(
                "expired {} ago",
                humantime::format_duration(trim(
                    now.duration_since(self.not_after).unwrap_or_default()
                ))
            ));
        }
        if now < self.not_before {
            out.push(format!(
                "not valid for another {} (is this machine's or the node's clock wrong?)",
                humantime::format_duration(trim(
                    self.not_before.duration_since(now).unwrap_or_default()
                ))
            ));
        }
        if !self.sans.iter().any(|s| s.eq_ignore_ascii_case(host)) {
            out.push(format!(
                "not valid for {host} (SANs: {})",
                self.sans.join(", ")
            ));
        }
        out
    }
}

fn trim(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// Records the chain the kubelet presents, then verifies it with `inner`
/// (kube-apiserver's check) or accepts it (kube-apiserver without a CA).
#[derive(Debug)]
struct Recorder {
    seen: Arc<Mutex<Vec<CertificateDer<'static>>>>,
    inner: Option<Arc<dyn ServerCertVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.push(end_entity.clone().into_owned());
            seen.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        }
        match &self.inner {
            Some(v) => v.verify_server_cert(end_entity, intermediates, server_name, ocsp, now),
            None => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What kube-apiserver uses to talk to kubelets.
pub struct KubeletTls {
    /// `--kubelet-certificate-authority`, loaded.
    pub roots: Option<rustls::RootCertStore>,
    /// `--kubelet-client-certificate` / `--kubelet-client-key`, loaded.
    pub client: Option<(
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
}

/// The handshake's outcome.
pub struct Handshake<S> {
    /// The chain presented, parsed (empty if none arrived).
    pub chain: Vec<CertInfo>,
    /// The TLS stream, or why the handshake failed.
    pub result: Result<tokio_rustls::client::TlsStream<S>, HandshakeError>,
}

/// Why TLS to the kubelet failed.
#[derive(Debug)]
pub enum HandshakeError {
    /// The certificate is not acceptable (expired, wrong name, unknown CA).
    Certificate(String),
    /// Anything else (the tunnel closed, not TLS, timeout).
    Other(String),
}

/// Words for a certificate error, with what it usually means.
fn certificate_words(e: &CertificateError) -> String {
    match e {
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "the kubelet's serving certificate has expired".into()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "the kubelet's serving certificate is not valid yet (clock skew between this machine and the node?)".into()
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            "the kubelet's serving certificate is not valid for the address kube-apiserver dials".into()
        }
        CertificateError::UnknownIssuer => {
            "the kubelet's serving certificate is not signed by --kubelet-certificate-authority".into()
        }
        other => format!("the kubelet's certificate was refused: {other:?}"),
    }
}

/// kube-apiserver's client configuration towards kubelets, with a verifier
/// that records the chain presented into `seen`.
fn client_config(
    tls: &KubeletTls,
    seen: Arc<Mutex<Vec<CertificateDer<'static>>>>,
) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = match &tls.roots {
        Some(roots) => Some(
            rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots.clone()),
                provider.clone(),
            )
            .build()
            .map_err(|e| format!("--kubelet-certificate-authority is unusable: {e}"))?
                as Arc<dyn ServerCertVerifier>,
        ),
        None => None,
    };
    let verifier = Arc::new(Recorder {
        seen,
        inner,
        provider: provider.clone(),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match &tls.client {
        Some((certs, key)) => builder
            .with_client_auth_cert(certs.clone(), key.clone_key())
            .map_err(|e| format!("--kubelet-client-certificate/key: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The name the kubelet's certificate must carry: its address, or its host name.
fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(ServerName::IpAddress(ip.into())),
        Err(_) => ServerName::try_from(host.to_string()).map_err(|e| format!("{host:?}: {e}")),
    }
}

/// TLS to `host` over `io`, within `limit`.
pub async fn handshake<S>(io: S, host: &str, tls: &KubeletTls, limit: Duration) -> Handshake<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (config, name) =
        match client_config(tls, seen.clone()).and_then(|c| Ok((c, server_name(host)?))) {
            Ok(v) => v,
            Err(why) => {
                return Handshake {
                    chain: Vec::new(),
                    result: Err(HandshakeError::Other(why)),
                }
            }
        };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let result = match tokio::time::timeout(limit, connector.connect(name, io)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => {
            let cert = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<rustls::Error>())
                .and_then(|r| match r {
                    rustls::Error::InvalidCertificate(c) => Some(c.clone()),
                    _ => None,
                });
            Err(match cert {
                Some(c) => HandshakeError::Certificate(format!("{} ({e})", certificate_words(&c))),
                None => HandshakeError::Other(e.to_string()),
            })
        }
        Err(_) => Err(HandshakeError::Other(format!(
            "no TLS answer within {limit:?} (is something other than a kubelet listening there?)"
        ))),
    };
    let chain = seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(|c| CertInfo::parse(c))
        .collect();
    Handshake { chain, result }
}

/// Hop 5's verdict from the chain seen and the handshake's outcome
/// (`verified`: a CA was given, so rustls checked the chain).
pub fn tls_check(
    chain: &[CertInfo],
    outcome: Result<(), &HandshakeError>,
    verified: bool,
    host: &str,
    now: SystemTime,
) -> Check {
    let mut c = match outcome {
        Ok(()) if verified => Check::new(
            Hop::KubeletTls,
            Status::Ok,
            "certificate verified against --kubelet-certificate-authority",
        ),
        Ok(()) => {
            let problems = chain
                .first()
                .map(|c| c.problems(host, now))
                .unwrap_or_default();
            if problems.is_empty() {
                Check::new(Hop::KubeletTls, Status::Warn, "handshake done; certificate not verified (no --kubelet-certificate-authority, as kube-apiserver then does not verify either)")
            } else {
                let mut c = Check::new(Hop::KubeletTls, Status::Warn, "handshake done; the certificate would fail verification, which kube-apiserver skips without --kubelet-certificate-authority");
                for p in problems {
                    c = c.evidence(format!("certificate {p}"));
                }
                c
            }
        }
        Err(HandshakeError::Certificate(why)) => Check::new(Hop::KubeletTls, Status::Failed, why.clone())
            .next("renew the kubelet's serving certificate for the address kube-apiserver dials (see hop 4), signed by --kubelet-certificate-authority"),
        Err(HandshakeError::Other(why)) => Check::new(Hop::KubeletTls, Status::Failed, why.clone())
            .next("is the kubelet serving TLS on that port?"),
    };
    for info in chain {
        c = c.evidence(info.line());
    }
    c
}

/// Hop 6's verdict from the kubelet's answer (`with_client`: we presented
/// kube-apiserver's client certificate).
pub fn request_check(answer: Result<Answer, String>, with_client: bool, now: SystemTime) -> Check {
    let a = match answer {
        Ok(a) => a,
        Err(why) => {
            return Check::new(
                Hop::KubeletRequest,
                Status::Failed,
                format!("GET /healthz: {why}"),
            )
        }
    };
    let ms = a.latency.as_millis();
    let mut c = match a.status {
        200..=299 => Check::new(
            Hop::KubeletRequest,
            Status::Ok,
            format!("GET /healthz: {} {:?} in {ms} ms", a.status, a.body),
        ),
        401 | 403 if !with_client => Check::new(
            Hop::KubeletRequest,
            Status::Warn,
            format!("GET /healthz: {} in {ms} ms: the kubelet answers, but wants kube-apiserver's client certificate", a.status),
        )
        .next("pass --kubelet-client-certificate and --kubelet-client-key (kube-apiserver's) to check its authorization too"),
        s @ (401 | 403) => Check::new(Hop::KubeletRequest, Status::Failed, format!("GET /healthz: {s} {:?}", a.body))
            .next("the kubelet refuses kube-apiserver's client certificate: check the kubelet's --client-ca-file and authorization"),
        s => Check::new(Hop::KubeletRequest, Status::Failed, format!("GET /healthz: {s} {:?}", a.body))
            .next("the kubelet answers but is not healthy: check its logs"),
    };
    if let Some(date) = a.date {
        let skew = now
            .duration_since(date)
            .or_else(|_| date.duration_since(now))
            .unwrap_or_default();
        if skew > MAX_SKEW {
            c = c.evidence(format!(
                "clock skew: the node's clock differs from this machine's by {} s",
                skew.as_secs()
            ));
            if c.status == Status::Ok {
                c.status = Status::Warn;
                c = c.next("certificates and tokens are judged by the clocks: run NTP on both");
            }
        } else {
            c = c.evidence(format!("clocks agree within {} s", skew.as_secs()));
        }
    }
    c
}

/// Clock difference reported as skew.
const MAX_SKEW: Duration = Duration::from_secs(30);

/// A kubelet's answer to `GET /healthz`.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The body, trimmed (at most 512 bytes kept).
    pub body: String,
    /// The `Date` header, if any.
    pub date: Option<SystemTime>,
    /// Time to the response head.
    pub latency: Duration,
}

/// Sends `GET /healthz` on `s` and reads the answer, within `limit`.
pub async fn healthz<S>(s: &mut S, host: &str, limit: Duration) -> Result<Answer, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let started = Instant::now();
    let req = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nUser-Agent: kubectl-konnectivity\r\nConnection: close\r\n\r\n");
    let work = async {
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut latency = None;
        loop {
            let n = match s.read(&mut chunk).await {
                Ok(n) => n,
                // A kubelet may close without close_notify; what came is enough.
                Err(_) if !buf.is_empty() => 0,
                Err(e) => return Err(format!("read: {e}")),
            };
            if n == 0 {
                break;
            }
            latency.get_or_insert_with(|| started.elapsed());
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > 64 * 1024 {
                break;
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let head = match resp.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => n,
            _ => {
                return Err(format!(
                    "not an HTTP response: {:?}",
                    String::from_utf8_lossy(&buf[..buf.len().min(200)])
                ))
            }
        };
        let date = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("date"))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .and_then(parse_http_date);
        let mut body = String::from_utf8_lossy(&buf[head..]).trim().to_string();
        body.truncate(512);
        Ok(Answer {
            status: resp.code.unwrap_or(0),
            body,
            date,
            latency: latency.unwrap_or_else(|| started.elapsed()),
        })
    };
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")))
}

/// An IMF-fixdate (`Tue, 01 Dec 2026 10:00:00 GMT`).
fn parse_http_date(s: &str) -> Option<SystemTime> {
    let mut it = s.split_whitespace().skip(1);
    let (d, mon, y, hms) = (it.next()?, it.next()?, it.next()?, it.next()?);
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == mon)?
        + 1;
    let stamp = format!("{y}-{month:02}-{:0>2}T{hms}Z", d);
    humantime::parse_rfc3339(&stamp).ok()
}

#[cfg(test)]
mod tests;
