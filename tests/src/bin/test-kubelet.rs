//! A stand-in kubelet for the network-namespace test: an HTTPS server that
//! answers every request with a fixed body. Usage:
//! `test-kubelet <listen addr> <cert.pem> <key.pem>`.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, cert, key] = args.as_slice() else {
        anyhow::bail!("usage: test-kubelet <addr> <cert> <key>");
    };
    let files = konnectivity_runtime::tls::ServerTlsFiles {
        cert: cert.into(),
        key: key.into(),
        client_ca: None,
    };
    let cfg = konnectivity_runtime::tls::server_config(&files, &[b"http/1.1"])?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&cfg));
    let l = TcpListener::bind(addr).await?;
    eprintln!("test-kubelet listening on {}", l.local_addr()?);
    loop {
        let (tcp, _) = l.accept().await?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(mut s) = acceptor.accept(tcp).await else {
                return;
            };
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let body = "kubelet in the node namespace";
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}
