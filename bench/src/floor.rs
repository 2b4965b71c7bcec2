//! The floor column (`tls-floor`): what TLS itself allows on this machine
//! with the tunnel's hops and none of its protocol. Two small relays in two
//! processes, placed where the server and the agent are: `floor-in` takes a
//! client on a Unix socket, `floor-out` dials the destination over TCP, and
//! between them runs one mutual-TLS connection per client connection (the
//! same certificates and cipher suites as the agent's link). The client's
//! first line names the destination (`host:port\n`); after it, bytes are
//! copied both ways in 128 KiB reads (our relay's largest read) until either
//! side closes. Each throughput row then reads as a fraction of this floor.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use konnectivity_runtime::tls::{self, ServerTlsFiles};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// Read size of the copies.
const COPY_BUF: usize = 128 * 1024;
/// Longest destination line.
const MAX_LINE: usize = 512;

/// The certificate files both relays use.
#[derive(Debug, Clone)]
pub struct Files {
    /// CA of both sides.
    pub ca: PathBuf,
    /// `floor-out`'s server identity, or `floor-in`'s client identity.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

/// Reads the destination line one byte at a time, so nothing after it is
/// taken from the stream.
async fn read_line<S: AsyncRead + Unpin>(s: &mut S) -> anyhow::Result<String> {
    let mut line = Vec::new();
    loop {
        let b = s.read_u8().await.context("destination line")?;
        if b == b'\n' {
            return Ok(String::from_utf8(line)?);
        }
        anyhow::ensure!(line.len() < MAX_LINE, "destination line too long");
        line.push(b);
    }
}

async fn copy_both<A, B>(mut a: A, mut b: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, COPY_BUF, COPY_BUF).await;
}

/// `floor-out`: accepts mutual-TLS connections on 127.0.0.1 (prints the
/// address on stdout), dials each one's destination and relays.
pub async fn run_out(files: Files) -> anyhow::Result<()> {
    let config = tls::server_config(
        &ServerTlsFiles {
            cert: files.cert,
            key: files.key,
            client_ca: Some(files.ca),
        },
        &[],
    )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let l = TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", l.local_addr()?);
    loop {
        let (tcp, _) = l.accept().await?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let Ok(dst) = read_line(&mut tls).await else {
                return;
            };
            let Ok(out) = TcpStream::connect(dst.as_str()).await else {
                return;
            };
            let _ = out.set_nodelay(true);
            copy_both(tls, out).await;
        });
    }
}

/// `floor-in`: accepts clients on the Unix socket `uds`, opens a mutual-TLS
/// connection to `floor-out` at `peer` for each, passes the destination line
/// on and relays.
pub async fn run_in(files: Files, uds: &Path, peer: SocketAddr) -> anyhow::Result<()> {
    let config = tls::client_config(&files.ca, Some((&files.cert, &files.key)), &[])?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let _ = std::fs::remove_file(uds);
    let l = UnixListener::bind(uds)?;
    let name = rustls::pki_types::ServerName::IpAddress(peer.ip().into());
    loop {
        let (mut client, _) = l.accept().await?;
        let (connector, name) = (connector.clone(), name.clone());
        tokio::spawn(async move {
            let Ok(dst) = read_line(&mut client).await else {
                return;
            };
            let Ok(tcp) = TcpStream::connect(peer).await else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            let Ok(mut tls) = connector.connect(name, tcp).await else {
                return;
            };
            let line = format!("{dst}\n");
            if tls.write_all(line.as_bytes()).await.is_err() || tls.flush().await.is_err() {
                return;
            }
            copy_both(client, tls).await;
        });
    }
}

/// A client connection through the floor to `dst`.
pub async fn connect(uds: &Path, dst: SocketAddr) -> anyhow::Result<UnixStream> {
    let mut s = UnixStream::connect(uds).await?;
    s.write_all(format!("{dst}\n").as_bytes()).await?;
    Ok(s)
}
