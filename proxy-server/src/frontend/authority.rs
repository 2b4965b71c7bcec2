//! Accepting kube-apiserver's `:authority` on the Unix socket.
//!
//! kube-apiserver dials the gRPC frontend with the socket path as the gRPC
//! target, so grpc-go sends the percent-encoded path (`%2Fetc%2Fkubernetes%2F...`)
//! as the HTTP/2 `:authority`. The `h2` crate under tonic rejects such a request
//! with `RST_STREAM(PROTOCOL_ERROR)` (hyperium/h2 issue 442; the fix, PR 487, is
//! unmerged). Every Unix-socket gRPC connection therefore passes through
//! [`rewrite_authority`], which parses the client's HTTP/2 frames, re-encodes
//! each request header block with an `:authority` that is not a valid authority
//! replaced by `localhost`, and forwards every other frame untouched.
//!
//! The client's HPACK dynamic table is tracked by our decoder; the server sees
//! only our encoder's blocks, so both tables stay consistent.

use std::io;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Largest frame payload we emit (the HTTP/2 default, which h2 advertises).
const MAX_FRAME: usize = 16_384;
/// Largest read buffer a busy connection grows to.
const MAX_READ: usize = 256 * 1024;
/// Largest header block we accept from a client.
const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// Replacement authority.
const LOCALHOST: &[u8] = b"localhost";

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

struct PendingBlock {
    stream_id: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

/// Copies an HTTP/2 client byte stream from `client` to `server`, rewriting
/// invalid `:authority` values. Returns when the client closes.
pub async fn rewrite_authority<R, W>(mut client: R, mut server: W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Start small (most connections carry little) and grow with the traffic.
    let mut want = 8 * 1024;
    let mut buf = BytesMut::with_capacity(want);
    while buf.len() < PREFACE.len() {
        if client.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
    if &buf[..PREFACE.len()] != PREFACE {
        // Not HTTP/2: let the server answer it as it would.
        server.write_all(&buf).await?;
        tokio::io::copy(&mut client, &mut server).await?;
        return Ok(());
    }
    server.write_all(PREFACE).await?;
    buf.advance(PREFACE.len());

    let mut decoder = loona_hpack::Decoder::new();
    let mut encoder = loona_hpack::Encoder::new();
    let mut pending: Option<PendingBlock> = None;
    let mut out = Vec::new();
    loop {
        // Forward every complete frame in the buffer.
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                buf.reserve(9 + len - buf.len());
                break;
            }
            let kind = buf[3];
            let flags = buf[4];
            let stream_id = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            match (kind, pending.as_mut()) {
                (HEADERS, None) => {
                    let frame = buf.split_to(9 + len);
                    let mut payload = &frame[9..];
                    let mut pad = 0usize;
                    if flags & PADDED != 0 {
                        let (&p, rest) = payload
                            .split_first()
                            .ok_or_else(|| bad("empty padded HEADERS"))?;
                        pad = p as usize;
                        payload = rest;
                    }
                    let mut priority = None;
                    if flags & PRIORITY != 0 {
                        if payload.len() < 5 {
                            return Err(bad("short HEADERS priority"));
                        }
                        let mut p = [0u8; 5];
                        p.copy_from_slice(&payload[..5]);
                        priority = Some(p);
                        payload = &payload[5..];
                    }
                    if pad > payload.len() {
                        return Err(bad("HEADERS padding longer than payload"));
                    }
                    let block = payload[..payload.len() - pad].to_vec();
                    let p = PendingBlock {
                        stream_id,
                        flags,
                        priority,
                        block,
                    };
                    if flags & END_HEADERS != 0 {
                        emit(&mut decoder, &mut encoder, p, &mut out)?;
                    } else {
                        pending = Some(p);
                    }
                }
                (CONTINUATION, Some(p)) if p.stream_id == stream_id => {
                    let frame = buf.split_to(9 + len);
                    p.block.extend_from_slice(&frame[9..]);
                    if p.block.len() > MAX_HEADER_BLOCK {
                        return Err(bad("header block too large"));
                    }
                    if flags & END_HEADERS != 0 {
                        let p = pending.take().expect("pending block");
                        emit(&mut decoder, &mut encoder, p, &mut out)?;
                    }
                }
                (_, Some(_)) => return Err(bad("frame interleaved in a header block")),
                (_, None) => {
                    let frame = buf.split_to(9 + len);
                    out.extend_from_slice(&frame);
                }
            }
        }
        if !out.is_empty() {
            server.write_all(&out).await?;
            out.clear();
        }
        if buf.capacity() - buf.len() < want / 2 {
            buf.reserve(want);
        }
        let room = buf.capacity() - buf.len();
        let n = client.read_buf(&mut buf).await?;
        if n == 0 {
            server.shutdown().await.ok();
            return Ok(());
        }
        if n == room && want < MAX_READ {
            want *= 2;
        }
    }
}

/// Decodes a header block, fixes `:authority`, re-encodes it and writes it as
/// HEADERS (+ CONTINUATION) frames.
fn emit(
    decoder: &mut loona_hpack::Decoder<'_>,
    encoder: &mut loona_hpack::Encoder<'_>,
    p: PendingBlock,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let mut headers = decoder
        .decode(&p.block)
        .map_err(|e| bad(format!("HPACK: {e:?}")))?;
    for (name, value) in headers.iter_mut() {
        if name.as_slice() == b":authority"
            && http::uri::Authority::try_from(value.as_slice()).is_err()
        {
            *value = LOCALHOST.to_vec();
        }
    }
    let block = encoder.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));

    let mut first = Vec::with_capacity(block.len() + 5);
    if let Some(pr) = p.priority {
        first.extend_from_slice(&pr);
    }
    let room = MAX_FRAME - first.len();
    let (head, mut rest) = block.split_at(block.len().min(room));
    first.extend_from_slice(head);
    let mut flags = p.flags & (END_STREAM | PRIORITY);
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    frame(out, HEADERS, flags, p.stream_id, &first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
        rest = tail;
        let flags = if rest.is_empty() { END_HEADERS } else { 0 };
        frame(out, CONTINUATION, flags, p.stream_id, chunk);
    }
    Ok(())
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream_id.to_be_bytes());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers_frame(enc: &mut loona_hpack::Encoder<'_>, authority: &[u8], stream: u32) -> Vec<u8> {
        let block = enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/ProxyService/Proxy"),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
        ]);
        // Split across HEADERS + CONTINUATION to exercise reassembly.
        let (a, b) = block.split_at(block.len() / 2);
        let mut out = Vec::new();
        frame(&mut out, HEADERS, 0, stream, a);
        frame(&mut out, CONTINUATION, END_HEADERS, stream, b);
        out
    }

    #[tokio::test]
    async fn percent_encoded_socket_path_becomes_localhost_and_data_passes() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        let path = b"%2Fetc%2Fkubernetes%2Fkonnectivity-server%2Fkonnectivity-server.socket";
        input.extend(headers_frame(&mut enc, path, 1));
        frame(&mut input, 0x0, 0, 1, b"\x00\x00\x00\x00\x03abc");
        // A second request reuses the client's dynamic table entries.
        input.extend(headers_frame(&mut enc, path, 3));
        input.extend(headers_frame(&mut enc, b"proxy.example:8090", 5));

        let (mut client, client_side) = tokio::io::duplex(1 << 16);
        let (server_side, mut server) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(rewrite_authority(client_side, server_side));
        client.write_all(&input).await.unwrap();
        drop(client);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        task.await.unwrap().unwrap();

        assert_eq!(&got[..PREFACE.len()], PREFACE);
        let mut rest = &got[PREFACE.len()..];
        let mut dec = loona_hpack::Decoder::new();
        let mut authorities = Vec::new();
        let mut data = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let (kind, flags) = (rest[3], rest[4]);
            let payload = &rest[9..9 + len];
            match kind {
                HEADERS => {
                    assert_ne!(flags & END_HEADERS, 0);
                    for (n, v) in dec.decode(payload).unwrap() {
                        if n == b":authority" {
                            authorities.push(String::from_utf8(v).unwrap());
                        }
                    }
                }
                0x0 => data.extend_from_slice(payload),
                k => panic!("unexpected frame type {k}"),
            }
            rest = &rest[9 + len..];
        }
        assert_eq!(
            authorities,
            vec!["localhost", "localhost", "proxy.example:8090"]
        );
        assert_eq!(data, b"\x00\x00\x00\x00\x03abc");
    }

    #[tokio::test]
    async fn non_http2_bytes_are_passed_through() {
        let (mut client, client_side) = tokio::io::duplex(1 << 16);
        let (server_side, mut server) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(rewrite_authority(client_side, server_side));
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        drop(client);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        task.await.unwrap().unwrap();
        assert_eq!(got, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    }
}
