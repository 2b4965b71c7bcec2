//! Destination servers on 127.0.0.1:0 standing in for kubelets and pods.

use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

async fn listen() -> TcpListener {
    listen_on("127.0.0.1").await
}

async fn listen_on(ip: &str) -> TcpListener {
    TcpListener::bind((ip, 0)).await.expect("bind destination")
}

fn serve<F, Fut>(l: TcpListener, handler: F)
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let handler = std::sync::Arc::new(handler);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let h = handler.clone();
            tokio::spawn(async move { h(s).await });
        }
    });
}

/// An HTTP/1.1 server answering every request with `body` and closing.
pub async fn http(body: &'static str) -> SocketAddr {
    let l = listen().await;
    let addr = l.local_addr().expect("addr");
    serve(l, move |mut s| async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = s.write_all(resp.as_bytes()).await;
        let _ = s.shutdown().await;
    });
    addr
}

/// An HTTPS server on `l` (certificate and key from PEM files) answering
/// every request with 200 and `body`, as a stand-in kubelet.
pub fn https_on(
    l: TcpListener,
    cert: &std::path::Path,
    key: &std::path::Path,
    body: &'static str,
) -> anyhow::Result<()> {
    let files = konnectivity_runtime::tls::ServerTlsFiles {
        cert: cert.to_owned(),
        key: key.to_owned(),
        client_ca: None,
    };
    let cfg = konnectivity_runtime::tls::server_config(&files, &[b"http/1.1"])?;
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
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
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(())
}

/// A stand-in kubelet on 127.0.0.1:0: HTTPS with the PKI's server
/// certificate (valid for 127.0.0.1), answering `ok`.
pub async fn https(pki: &crate::pki::Pki) -> SocketAddr {
    let l = listen().await;
    let addr = l.local_addr().expect("addr");
    https_on(l, &pki.server.cert, &pki.server.key, "ok").expect("test TLS server");
    addr
}

/// Echoes every byte back until EOF.
pub async fn echo() -> SocketAddr {
    let l = listen().await;
    let addr = l.local_addr().expect("addr");
    serve(l, |s| async move {
        let (mut r, mut w) = s.into_split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    });
    addr
}

/// Bulk server. Request lines:
/// - `GET <n> <seed>\n`: sends `pattern(n, seed)` then closes.
/// - `PUT <n>\n` followed by n bytes: answers the SHA-256 hex of them and `\n`.
/// - `NAME\n`: answers `name` and closes.
pub async fn bulk(name: &'static str) -> SocketAddr {
    bulk_on("127.0.0.1", name).await
}

/// [`bulk`] on another loopback address (127.0.0.2, ...), for routing tests.
pub async fn bulk_on(ip: &str, name: &'static str) -> SocketAddr {
    let l = listen_on(ip).await;
    let addr = l.local_addr().expect("addr");
    serve(l, move |s| async move {
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        let mut line = String::new();
        if r.read_line(&mut line).await.is_err() {
            return;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["GET", n, seed] => {
                let n: usize = n.parse().unwrap_or(0);
                let seed: u64 = seed.parse().unwrap_or(0);
                let mut p = crate::Pattern::new(seed);
                let mut buf = vec![0u8; 64 * 1024];
                let mut left = n;
                while left > 0 {
                    let k = left.min(buf.len());
                    p.fill(&mut buf[..k]);
                    if w.write_all(&buf[..k]).await.is_err() {
                        return;
                    }
                    left -= k;
                }
            }
            ["PUT", n] => {
                let n: usize = n.parse().unwrap_or(0);
                let mut data = vec![0u8; n];
                if r.read_exact(&mut data).await.is_ok() {
                    let _ = w
                        .write_all(format!("{}\n", crate::sha256_hex(&data)).as_bytes())
                        .await;
                }
            }
            ["NAME"] => {
                let _ = w.write_all(name.as_bytes()).await;
            }
            _ => {}
        }
        let _ = w.shutdown().await;
    });
    addr
}

/// A port on 127.0.0.1 with nothing listening.
pub async fn closed_port() -> SocketAddr {
    let l = listen().await;
    let a = l.local_addr().expect("addr");
    drop(l);
    a
}

/// Accepts connections and never reads from them (a destination that stalls).
pub async fn blackhole() -> SocketAddr {
    let l = listen().await;
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    addr
}

/// An address whose TCP handshake never completes: a listener with a zero
/// backlog that is already full and never accepts. Dials to it hang until the
/// dialer gives up (on loopback, without sending anything elsewhere).
pub fn hanging() -> (SocketAddr, Vec<std::net::TcpStream>, socket2::Socket) {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    s.listen(0).expect("listen");
    let addr = s.local_addr().expect("addr").as_socket().expect("inet");
    let mut fill = Vec::new();
    for _ in 0..4 {
        match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(300)) {
            Ok(c) => fill.push(c),
            Err(_) => break,
        }
    }
    (addr, fill, s)
}
