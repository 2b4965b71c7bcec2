//! Flag validation: defaults, conflicts and the errors that name the flag.

use super::*;

#[test]
fn upstream_style_flags_parse_with_upstream_defaults() {
    let a = Args::try_parse_from(["proxy-server"]).unwrap();
    assert!(
        a.delete_existing_uds_file,
        "upstream deletes a stale socket by default"
    );
    assert_eq!(
        (a.server_port, a.agent_port, a.health_port, a.admin_port),
        (8090, 8091, 8092, 8095)
    );
    let a = Args::try_parse_from([
        "proxy-server",
        "--delete-existing-uds-file=false",
        "--keepalive-time=1h0m0s",
        "--graceful-shutdown-timeout=10s",
        "--v=4",
        "--logtostderr=true",
        "--mode=grpc",
        "--mode=http-connect",
    ])
    .unwrap();
    assert!(!a.delete_existing_uds_file);
    assert_eq!(a.keepalive_time, Duration::from_secs(3600));
    assert_eq!(a.grace_period, Duration::from_secs(10));
    assert_eq!(
        a.mode, "http-connect",
        "a repeated flag takes the last value"
    );
}

fn config(extra: &[&str]) -> anyhow::Result<Config> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("server-config-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ca = konnectivity_runtime::pki::Ca::new(&dir, "test")?;
    let leaf = ca.issue(&dir, "server", &["localhost"])?;
    let mut argv = vec![
        "proxy-server".to_string(),
        format!("--cluster-cert={}", leaf.cert.display()),
        format!("--cluster-key={}", leaf.key.display()),
        "--uds-name=/tmp/unused.sock".to_string(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    let c = Config::from_args(Args::try_parse_from(argv)?);
    std::fs::remove_dir_all(&dir).ok();
    c
}

#[test]
fn service_account_flags_come_all_three_or_none() {
    let c = config(&[]).unwrap();
    assert!(!c.kube.needed(), "no flags: no Kubernetes client");
    for missing in 0..3 {
        let mut flags = vec![
            "--agent-namespace=kube-system",
            "--agent-service-account=konnectivity-agent",
            "--authentication-audience=system:konnectivity-server",
        ];
        flags.remove(missing);
        let e = config(&flags).unwrap_err().to_string();
        assert!(e.contains("cannot be empty"), "{e}");
    }
    let c = config(&[
        "--agent-namespace=kube-system",
        "--agent-service-account=konnectivity-agent",
        "--authentication-audience=system:konnectivity-server",
    ])
    .unwrap();
    assert_eq!(
        c.kube.token_review.as_ref().map(|e| e.namespace.as_str()),
        Some("kube-system")
    );
    let e = config(&[
        "--agent-namespace=kube-system",
        "--agent-service-account=konnectivity-agent",
        "--authentication-audience=a",
        "--agent-tokens-file=/dev/null",
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("exclude each other"), "{e}");
    let e = config(&["--kubeconfig=/nonexistent/kubeconfig"]).unwrap_err();
    assert!(
        format!("{e:#}").contains("/nonexistent/kubeconfig"),
        "{e:#}"
    );
}

#[test]
fn lease_flags_have_upstream_defaults_and_checked_labels() {
    let c = config(&["--enable-lease-controller"]).unwrap();
    let (ns, labels) = c.kube.leases.clone().expect("leases on");
    assert_eq!(ns, "kube-system");
    assert_eq!(
        labels.get("k8s-app").map(String::as_str),
        Some("konnectivity-server")
    );
    assert!(c.kube.needed());
    assert!(config(&["--enable-lease-controller=false"])
        .unwrap()
        .kube
        .leases
        .is_none());
    let e = config(&["--enable-lease-controller", "--lease-label=novalue"]).unwrap_err();
    assert!(e.to_string().contains("--lease-label"), "{e}");
}

#[test]
fn uds_mode_is_octal_permissions_defaulting_to_owner_only() {
    let mode = |c: Config| match c.frontend {
        FrontendListen::Unix { mode, .. } => mode,
        FrontendListen::Tcp { .. } => panic!("not a Unix frontend"),
    };
    assert_eq!(mode(config(&[]).unwrap()), 0o600);
    assert_eq!(mode(config(&["--uds-mode=0660"]).unwrap()), 0o660);
    assert_eq!(mode(config(&["--uds-mode=666"]).unwrap()), 0o666);
    for bad in [
        "--uds-mode=0800",
        "--uds-mode=rw",
        "--uds-mode=01777",
        "--uds-mode=",
    ] {
        let e = config(&[bad]).unwrap_err().to_string();
        assert!(e.contains("--uds-mode"), "{bad}: {e}");
    }
}
