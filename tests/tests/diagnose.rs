//! `kubectl konnectivity diagnose` against a real server and agent on
//! loopback, without a cluster: a frontend that speaks the other mode is
//! named as hop 2, a healthy path to a TLS destination passes the dial and
//! TLS hops, and `-o json` carries the same verdict as the exit code. (The
//! real-cluster suite breaks every hop against kube-apiserver and kwok.)

use std::path::Path;

use serde_json::Value;
use tests::dest;
use tests::inproc::pair;
use tests::pki::Pki;
use tests::process::binary;

async fn diagnose(args: &[String]) -> (i32, Value, String) {
    let out = tokio::process::Command::new(binary("kubectl-konnectivity"))
        .arg("diagnose")
        .args(args)
        .args(["-o", "json"])
        .output()
        .await
        .expect("run kubectl-konnectivity");
    let code = out.status.code().unwrap_or(-1);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    (
        code,
        json,
        format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

fn flags(uds: &Path, mode: &str, admin: std::net::SocketAddr, target: &str) -> Vec<String> {
    vec![
        target.to_string(),
        format!("--uds-name={}", uds.display()),
        format!("--mode={mode}"),
        format!("--admin-address={admin}"),
    ]
}

#[tokio::test]
async fn a_frontend_speaking_the_other_mode_is_hop_2() {
    let pki = Pki::new();
    let target = dest::http("x").await.to_string();
    for (server_mode, client_mode) in [("grpc", "http-connect"), ("http-connect", "grpc")] {
        let (server, agent) = pair(&pki, server_mode, &[], &[]).await;
        let (code, json, text) =
            diagnose(&flags(&server.uds(), client_mode, server.health, &target)).await;
        assert_eq!(
            code, 12,
            "{server_mode} server, {client_mode} client: {text}"
        );
        assert_eq!(json["failed_hop"], "frontend", "{text}");
        let hop2 = json["hops"]
            .as_array()
            .and_then(|h| h.iter().find(|c| c["name"] == "frontend"))
            .cloned()
            .unwrap_or_default();
        assert!(
            hop2.to_string().contains("proxyProtocol") || hop2.to_string().contains("mode"),
            "hop 2 should point at the mode: {hop2}"
        );
        agent.stop().await;
        server.stop().await;
    }
}

#[tokio::test]
async fn a_tls_destination_passes_the_dial_and_tls_hops_and_json_matches_the_exit_code() {
    let pki = Pki::new();
    // The test kubelet: TLS with the test CA's server certificate.
    let kubelet = dest::https(&pki).await;
    let (server, agent) = pair(&pki, "grpc", &[], &[]).await;
    let mut args = flags(&server.uds(), "grpc", server.health, &kubelet.to_string());
    args.push(format!(
        "--kubelet-certificate-authority={}",
        pki.ca.display()
    ));
    let (code, json, text) = diagnose(&args).await;
    assert_eq!(code, 0, "{text}");
    assert_eq!(json["exit_code"], 0);
    assert_eq!(json["healthy"], true, "{text}");
    let statuses: Vec<(String, String)> = json["hops"]
        .as_array()
        .expect("hops")
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap().to_string(),
                h["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (hop, want) in [
        ("dial", "ok"),
        ("kubelet-tls", "ok"),
        ("kubelet-request", "ok"),
    ] {
        assert!(
            statuses.contains(&(hop.to_string(), want.to_string())),
            "{hop} not {want}: {statuses:?}"
        );
    }
    // Without the CA the handshake is still made but not verified: a warning,
    // as kube-apiserver without --kubelet-certificate-authority.
    args.pop();
    let (code, json, text) = diagnose(&args).await;
    assert_eq!(code, 0, "{text}");
    let tls = json["hops"]
        .as_array()
        .and_then(|h| h.iter().find(|c| c["name"] == "kubelet-tls"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(tls["status"], "warn", "{tls}");
    agent.stop().await;
    server.stop().await;
}
