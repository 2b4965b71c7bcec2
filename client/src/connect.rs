//! HTTP CONNECT mode: `CONNECT host:port HTTP/1.1`, then the socket is the
//! tunnel.

use std::time::Duration;

use konnectivity_proto::connect::DIAL_REASON_HEADER;
use konnectivity_proto::DialReason;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{open, tls_cause, within, Error, Io, Mode, Stage, Transport};

/// Longest response head we read.
const MAX_HEAD: usize = 16 * 1024;
/// Longest error body we keep.
const MAX_BODY: usize = 4 * 1024;

/// An established CONNECT tunnel.
pub type ConnectStream = Box<dyn Io>;

/// Opens the transport and sends `CONNECT address`.
pub(crate) async fn dial(
    transport: &Transport,
    address: &str,
    limit: Duration,
) -> Result<ConnectStream, Error> {
    let mut s = open(transport, b"http/1.1", limit).await?;
    let target = transport.target();
    within(limit, Stage::Dial, async {
        connect_on(&mut s, address).await.map_err(|e| match e {
            Error::Protocol { detail, .. } => Error::Protocol {
                target: target.clone(),
                mode: Mode::HttpConnect,
                detail,
            },
            Error::Tls { detail, .. } => Error::Tls {
                target: target.clone(),
                detail,
            },
            e => e,
        })
    })
    .await?;
    Ok(s)
}

/// Sends `CONNECT address` on `s` and reads the response head byte by byte,
/// so no tunnel byte is consumed. On 200 the stream is the tunnel; otherwise
/// the error carries the status, the body text and the reason (typed from
/// our server's reason header, or read from the text).
pub async fn connect_on<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    address: &str,
) -> Result<(), Error> {
    let io = |e: std::io::Error| match tls_cause(&e) {
        Some(detail) => Error::Tls {
            target: "proxy-server".into(),
            detail,
        },
        None => Error::Protocol {
            target: "proxy-server".into(),
            mode: Mode::HttpConnect,
            detail: e.to_string(),
        },
    };
    let req = format!("CONNECT {address} HTTP/1.1\r\nHost: {address}\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(io)?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b).await.map_err(io)? {
            1 if head.len() < MAX_HEAD => head.push(b[0]),
            1 => return Err(protocol("response head too long")),
            _ => {
                return Err(protocol(&format!(
                    "connection closed before a response ({} bytes of head: {:?})",
                    head.len(),
                    String::from_utf8_lossy(&head)
                )))
            }
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => {
            return Err(protocol(&format!(
                "not an HTTP response: {:?}",
                String::from_utf8_lossy(&head)
            )))
        }
    }
    let status = resp.code.unwrap_or(0);
    if status == 200 {
        return Ok(());
    }
    let typed = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(DIAL_REASON_HEADER))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .and_then(DialReason::parse);
    let length = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    let mut body = vec![0u8; length.unwrap_or(MAX_BODY).min(MAX_BODY)];
    let mut got = 0;
    while got < body.len() {
        match s.read(&mut body[got..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    body.truncate(got);
    let message = String::from_utf8_lossy(&body).trim().to_string();
    Err(Error::Dial {
        address: address.to_string(),
        reason: typed.unwrap_or_else(|| DialReason::from_text(&message)),
        typed: typed.is_some(),
        message,
        status: Some(status),
    })
}

fn protocol(detail: &str) -> Error {
    Error::Protocol {
        target: "proxy-server".into(),
        mode: Mode::HttpConnect,
        detail: detail.to_string(),
    }
}
