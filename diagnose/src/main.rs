//! `kubectl konnectivity diagnose NODE`: why `kubectl logs` / `exec` to a
//! node fails. It walks kube-apiserver's path to the node's kubelet hop by
//! hop (egress configuration, proxy-server frontend, the server and its
//! agents, the dial through the tunnel, TLS to the kubelet, `GET /healthz`),
//! stops at the first broken hop and says what failed, the evidence and what
//! to check next. The exit code names the hop (10 + its number; 0 when
//! healthy), and the whole run ends within `--timeout`.
//!
//! Run it where kube-apiserver runs (it opens the same socket and reads the
//! same files), with kube-apiserver's flag values.

mod egress;
mod kubelet;
mod report;
mod server;
mod walk;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use konnectivity_client::Mode;

/// Konnectivity tools for kubectl.
#[derive(Debug, Parser)]
#[command(name = "kubectl-konnectivity", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Walk kube-apiserver's path to a node's kubelet and name the broken hop.
    Diagnose(Args),
}

#[derive(Debug, clap::Args)]
struct Args {
    /// A node name (read with --kubeconfig) or the kubelet's host:port.
    target: String,
    /// kubeconfig for reading the node (also $KUBECONFIG).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// kube-apiserver's --kubelet-preferred-address-types.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "Hostname,InternalDNS,InternalIP,ExternalDNS,ExternalIP"
    )]
    kubelet_preferred_address_types: Vec<String>,
    /// kube-apiserver's --egress-selector-config-file.
    #[arg(long)]
    egress_selector_config_file: Option<PathBuf>,
    /// Without a configuration file: the frontend mode (grpc or http-connect).
    #[arg(long, default_value = "grpc")]
    mode: String,
    /// Without a configuration file: the server's Unix socket.
    #[arg(long)]
    uds_name: Option<PathBuf>,
    /// Without a configuration file: the server's mutual-TLS address (host:port).
    #[arg(long)]
    server_address: Option<String>,
    /// With --server-address: CA for the server's certificate.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// With --server-address: client certificate.
    #[arg(long)]
    client_cert: Option<PathBuf>,
    /// With --server-address: client key.
    #[arg(long)]
    client_key: Option<PathBuf>,
    /// proxy-server's admin endpoint (--admin-bind-address:--admin-port).
    #[arg(long, default_value = "127.0.0.1:8095")]
    admin_address: String,
    /// kube-apiserver's --kubelet-certificate-authority.
    #[arg(long)]
    kubelet_certificate_authority: Option<PathBuf>,
    /// kube-apiserver's --kubelet-client-certificate.
    #[arg(long, requires = "kubelet_client_key")]
    kubelet_client_certificate: Option<PathBuf>,
    /// kube-apiserver's --kubelet-client-key.
    #[arg(long, requires = "kubelet_client_certificate")]
    kubelet_client_key: Option<PathBuf>,
    /// Limit for the whole run.
    #[arg(long, default_value = "5s", value_parser = konnectivity_runtime::duration::parse)]
    timeout: Duration,
    /// Output: text or json.
    #[arg(short = 'o', long = "output", default_value = "text")]
    output: String,
}

/// The kubelet endpoint: given, or read from the node.
async fn resolve(args: &Args, limit: Duration) -> Result<(String, String, String), String> {
    if let Some((host, port)) = args.target.rsplit_once(':') {
        if port.parse::<u16>().is_ok() {
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            return Ok((args.target.clone(), host, "given".into()));
        }
    }
    let work = async {
        let client = konnectivity_kube::client(args.kubeconfig.as_deref())
            .await
            .map_err(|e| e.to_string())?;
        let node = konnectivity_kube::node::get(&client, &args.target)
            .await
            .map_err(|e| format!("node {}: {e}", args.target))?;
        let ep =
            konnectivity_kube::node::kubelet_endpoint(&node, &args.kubelet_preferred_address_types)
                .map_err(|e| format!("node {}: {e}", args.target))?;
        Ok((
            ep.authority(),
            ep.host.clone(),
            format!(
                "node {}: {} address, addresses {}",
                args.target,
                ep.address_type,
                ep.all.join(", ")
            ),
        ))
    };
    tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
        Err(format!(
            "reading node {} took longer than {limit:?}",
            args.target
        ))
    })
}

fn frontend_flags(args: &Args) -> Result<Option<(Mode, egress::Where)>, String> {
    let mode = match args.mode.as_str() {
        "grpc" => Mode::Grpc,
        "http-connect" => Mode::HttpConnect,
        m => return Err(format!("--mode {m:?}: want grpc or http-connect")),
    };
    Ok(match (&args.uds_name, &args.server_address) {
        (Some(_), Some(_)) => return Err("give --uds-name or --server-address, not both".into()),
        (Some(p), None) => Some((mode, egress::Where::Unix(p.clone()))),
        (None, Some(addr)) => {
            let (Some(cert), Some(key)) = (&args.client_cert, &args.client_key) else {
                return Err("--server-address needs --client-cert and --client-key".into());
            };
            let host = addr
                .rsplit_once(':')
                .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string())
                .ok_or("--server-address wants host:port")?;
            Some((
                mode,
                egress::Where::Tls {
                    addr: addr.clone(),
                    host,
                    ca: args.ca_cert.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                },
            ))
        }
        (None, None) => None,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // The run's limit counts from here: reading the node is part of it.
    let started = std::time::Instant::now();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Command::Diagnose(args) = Cli::parse().command;
    if args.output != "text" && args.output != "json" {
        eprintln!("error: -o {:?}: want text or json", args.output);
        std::process::exit(2);
    }
    let flags = match frontend_flags(&args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let kubelet_tls = match walk::kubelet_tls(
        args.kubelet_certificate_authority.as_deref(),
        args.kubelet_client_certificate
            .as_deref()
            .zip(args.kubelet_client_key.as_deref()),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let (target, host, source) = match resolve(&args, args.timeout / 2).await {
        Ok(t) => t,
        Err(e) => {
            let e = format!("cannot find the kubelet's address: {e}");
            if args.output == "json" {
                let doc = serde_json::json!({"target": args.target, "error": e, "exit_code": 3});
                println!("{doc:#}");
            }
            eprintln!("error: {e}");
            std::process::exit(3);
        }
    };
    let plan = walk::Plan {
        target,
        host,
        target_source: source,
        egress_file: args.egress_selector_config_file.clone(),
        frontend_flags: flags,
        admin: args.admin_address.clone(),
        kubelet_tls,
        timeout: args.timeout,
    };
    let report = walk::run(plan, started).await;
    if args.output == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.json()).unwrap_or_default()
        );
    } else {
        print!("{}", report.text());
    }
    std::process::exit(report.exit_code());
}
