//! A stand-in pod for the cluster suite's port-forward cases: plain HTTP/1.1
//! where `GET /pattern/<n>` answers `n` bytes of the test pattern (seed `n`,
//! see `tests::pattern`) and anything else answers `pod-http`. Usage:
//! `pod-http <listen addr>`.

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr] = args.as_slice() else {
        anyhow::bail!("usage: pod-http <addr>");
    };
    let l = TcpListener::bind(addr).await?;
    eprintln!("pod-http listening on {}", l.local_addr()?);
    loop {
        let (tcp, _) = l.accept().await?;
        tokio::spawn(async move {
            let (r, mut w) = tcp.into_split();
            let mut r = BufReader::new(r);
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if h == "\r\n" || h == "\n" {
                        break;
                    }
                }
                let n: Option<usize> = path.strip_prefix("/pattern/").and_then(|n| n.parse().ok());
                let ok = match n {
                    Some(n) => send_pattern(&mut w, n).await,
                    None => {
                        let body = "pod-http";
                        w.write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .await
                    }
                };
                if ok.is_err() {
                    return;
                }
            }
        });
    }
}

async fn send_pattern(w: &mut tokio::net::tcp::OwnedWriteHalf, n: usize) -> std::io::Result<()> {
    w.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n").as_bytes())
        .await?;
    let mut p = tests::Pattern::new(n as u64);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len());
        p.fill(&mut buf[..k]);
        w.write_all(&buf[..k]).await?;
        left -= k;
    }
    Ok(())
}
