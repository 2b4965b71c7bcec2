//! Reading the node's kubelet endpoint and the kubelet's answers.

use super::*;

#[test]
fn http_dates_parse() {
    let t = parse_http_date("Tue, 01 Dec 2026 10:00:00 GMT").unwrap();
    assert_eq!(
        humantime::format_rfc3339_seconds(t).to_string(),
        "2026-12-01T10:00:00Z"
    );
    assert!(parse_http_date("yesterday").is_none());
}

fn answer(status: u16, date: Option<SystemTime>) -> Result<Answer, String> {
    Ok(Answer {
        status,
        body: "ok".into(),
        date,
        latency: Duration::from_millis(3),
    })
}

#[test]
fn request_verdicts() {
    let now = SystemTime::now();
    assert_eq!(
        request_check(answer(200, Some(now)), true, now).status,
        Status::Ok
    );
    assert_eq!(
        request_check(answer(401, None), false, now).status,
        Status::Warn
    );
    assert_eq!(
        request_check(answer(403, None), true, now).status,
        Status::Failed
    );
    assert_eq!(
        request_check(answer(500, None), true, now).status,
        Status::Failed
    );
    let skewed = request_check(answer(200, Some(now - Duration::from_secs(600))), true, now);
    assert_eq!(skewed.status, Status::Warn);
    assert!(
        skewed.evidence[0].contains("600 s"),
        "{:?}",
        skewed.evidence
    );
    let gone = request_check(Err("no answer within 1s".into()), true, now);
    assert_eq!(
        (gone.hop, gone.status),
        (Hop::KubeletRequest, Status::Failed)
    );
}

#[test]
fn tls_verdicts() {
    let now = SystemTime::now();
    let day = Duration::from_secs(86400);
    let expired = CertInfo {
        subject: "CN=node".into(),
        issuer: "CN=ca".into(),
        not_before: now - day * 2,
        not_after: now - day,
        sans: vec!["10.0.0.5".into()],
    };
    let chain = [expired];
    assert_eq!(
        tls_check(&chain, Ok(()), true, "10.0.0.5", now).status,
        Status::Ok
    );
    let unverified = tls_check(&chain, Ok(()), false, "10.0.0.5", now);
    assert_eq!(unverified.status, Status::Warn);
    assert!(
        unverified.evidence[0].contains("expired"),
        "{:?}",
        unverified.evidence
    );
    let refused =
        HandshakeError::Certificate("the kubelet's serving certificate has expired".into());
    let c = tls_check(&chain, Err(&refused), true, "10.0.0.5", now);
    assert_eq!(c.status, Status::Failed);
    assert!(c.evidence[0].contains("CN=node"), "{:?}", c.evidence);
    let other = HandshakeError::Other("not TLS".into());
    assert_eq!(
        tls_check(&[], Err(&other), true, "h", now).status,
        Status::Failed
    );
    assert!(certificate_words(&CertificateError::NotValidYet).contains("clock"));
    assert!(certificate_words(&CertificateError::UnknownIssuer)
        .contains("kubelet-certificate-authority"));
}

#[test]
fn problems_without_a_ca() {
    let now = SystemTime::now();
    let day = Duration::from_secs(86400);
    let c = CertInfo {
        subject: "CN=node".into(),
        issuer: "CN=ca".into(),
        not_before: now - day * 2,
        not_after: now - day,
        sans: vec!["10.0.0.5".into()],
    };
    let p = c.problems("10.0.0.5", now);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].starts_with("expired 1day"), "{p:?}");
    let p = c.problems("10.0.0.6", now - day * 3);
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(p[1].contains("not valid for 10.0.0.6"), "{p:?}");
}

/// Hop 5 against a real TLS server on the other end of a pipe, serving
/// `leaf`, verified against `ca` as kube-apiserver does.
async fn handshake_against(
    leaf: &konnectivity_runtime::pki::Leaf,
    ca: &std::path::Path,
    host: &str,
) -> Check {
    let server = konnectivity_runtime::tls::server_config(
        &konnectivity_runtime::tls::ServerTlsFiles {
            cert: leaf.cert.clone(),
            key: leaf.key.clone(),
            client_ca: None,
        },
        &[b"http/1.1"],
    )
    .unwrap();
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let _ = tokio_rustls::TlsAcceptor::from(server).accept(theirs).await;
    });
    let mut roots = rustls::RootCertStore::empty();
    for c in konnectivity_runtime::tls::load_certs("CA", ca).unwrap() {
        roots.add(c).unwrap();
    }
    let tls = KubeletTls {
        roots: Some(roots),
        client: None,
    };
    let hs = handshake(ours, host, &tls, Duration::from_secs(5)).await;
    tls_check(
        &hs.chain,
        hs.result.as_ref().map(drop),
        true,
        host,
        SystemTime::now(),
    )
}

#[tokio::test]
async fn rustls_refusals_name_the_certificate_problem() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = konnectivity_runtime::pki::Ca::new(dir.path(), "cluster").unwrap();
    let other = konnectivity_runtime::pki::Ca::new(dir.path(), "other").unwrap();
    let good = ca.issue(dir.path(), "good", &["10.0.0.5"]).unwrap();
    let c = handshake_against(&good, &ca.cert, "10.0.0.5").await;
    assert_eq!(c.status, Status::Ok, "{c:?}");
    let cases = [
        (
            ca.issue_between(
                dir.path(),
                "expired",
                &["10.0.0.5"],
                (2020, 1, 1),
                (2021, 1, 1),
            )
            .unwrap(),
            &ca.cert,
            "has expired",
        ),
        (
            ca.issue_between(
                dir.path(),
                "future",
                &["10.0.0.5"],
                (2090, 1, 1),
                (2091, 1, 1),
            )
            .unwrap(),
            &ca.cert,
            "not valid yet",
        ),
        (
            ca.issue(dir.path(), "elsewhere", &["10.0.0.6"]).unwrap(),
            &ca.cert,
            "not valid for the address",
        ),
        (
            good.clone(),
            &other.cert,
            "not signed by --kubelet-certificate-authority",
        ),
    ];
    for (leaf, trust, words) in cases {
        let c = handshake_against(&leaf, trust, "10.0.0.5").await;
        assert_eq!(c.status, Status::Failed, "{c:?}");
        assert!(c.summary.contains(words), "{words}: {c:?}");
        // The chain presented is shown even though it was refused.
        assert!(c.evidence.iter().any(|e| e.contains("valid")), "{c:?}");
    }
}
