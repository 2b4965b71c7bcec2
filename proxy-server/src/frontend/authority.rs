//! Accepting kube-apiserver's `:authority` on the Unix socket.
//!
//! kube-apiserver dials the gRPC frontend with the socket path as the gRPC
//! target, so grpc-go sends the percent-encoded path (`%2Fetc%2Fkubernetes%2F...`)
//! as the HTTP/2 `:authority`. The `h2` crate under tonic rejects such a request
//! with `RST_STREAM(PROTOCOL_ERROR)` (hyperium/h2 issue 442; the fix, PR 487, is
//! unmerged). Every Unix-socket gRPC connection is therefore wrapped in
//! [`AuthorityFix`], whose reads parse the client's HTTP/2 frames, re-encode
//! each request header block with an `:authority` that is not a valid authority
//! replaced by `localhost`, and hand every other frame over untouched. It sits
//! inside the connection's own reads: no extra task or pipe. Reads go straight
//! into the HTTP/2 server's buffer and are only scanned for frame boundaries;
//! a header block (and whatever follows it in the same read) is taken back
//! out to be rewritten, so the bytes of `DATA` frames are never copied here.
//!
//! The client's HPACK dynamic table is tracked by our decoder; the server sees
//! only our encoder's blocks, so both tables stay consistent.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Largest frame payload we emit: the HTTP/2 default, which every peer
/// accepts (the server advertises more).
const MAX_FRAME: usize = 16_384;
/// Read size while a frame is being reassembled here.
const BUFFERED_READ: usize = 2 * 1024;
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the 24-byte client preface.
    Preface,
    /// Parsing frames.
    Frames,
    /// Not HTTP/2: bytes pass untouched (the server will answer them).
    Passthrough,
}

/// The byte-stream rewriter, with no I/O: bytes in, rewritten chunks out.
struct Rewriter {
    phase: Phase,
    input: BytesMut,
    output: VecDeque<Bytes>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    pending: Option<PendingBlock>,
    /// Bytes of a frame already passed on that are still to come; they pass
    /// without being looked at.
    skip: usize,
}

impl Rewriter {
    fn new() -> Self {
        Rewriter {
            phase: Phase::Preface,
            input: BytesMut::new(),
            output: VecDeque::new(),
            decoder: loona_hpack::Decoder::new(),
            encoder: loona_hpack::Encoder::new(),
            pending: None,
            skip: 0,
        }
    }

    /// True when nothing is buffered or half-parsed here: reads can go
    /// straight into the caller's buffer.
    fn direct(&self) -> bool {
        self.phase != Phase::Preface
            && self.input.is_empty()
            && self.output.is_empty()
            && self.pending.is_none()
    }

    /// Scans bytes just read into the caller's buffer (in [`Self::direct`]
    /// state) and returns how many of them may stay there: everything up to
    /// the first header-block frame, or a frame header cut short, which the
    /// caller moves into `input` to be handled here.
    fn scan(&mut self, new: &[u8]) -> usize {
        if self.phase == Phase::Passthrough {
            return new.len();
        }
        let mut pos = self.skip.min(new.len());
        self.skip -= pos;
        while pos < new.len() {
            let rest = &new[pos..];
            if rest.len() < 9 || matches!(rest[3], HEADERS | CONTINUATION) {
                return pos;
            }
            let total = 9 + u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            if total > rest.len() {
                self.skip = total - rest.len();
                return new.len();
            }
            pos += total;
        }
        pos
    }

    /// Moves whatever is complete in `input` to `output`; an emptied `input`
    /// gives its room back, so an idle connection holds no buffer here.
    fn process(&mut self) -> io::Result<()> {
        let r = self.parse();
        if self.input.is_empty() {
            self.input = BytesMut::new();
        }
        r
    }

    fn parse(&mut self) -> io::Result<()> {
        if self.phase == Phase::Preface {
            let n = self.input.len().min(PREFACE.len());
            if self.input[..n] != PREFACE[..n] {
                self.phase = Phase::Passthrough;
            } else if n == PREFACE.len() {
                self.output.push_back(self.input.split_to(n).freeze());
                self.phase = Phase::Frames;
            } else {
                return Ok(());
            }
        }
        if self.phase == Phase::Passthrough {
            if !self.input.is_empty() {
                self.output.push_back(self.input.split().freeze());
            }
            return Ok(());
        }
        while self.input.len() >= 9 {
            let b = &self.input;
            let len = u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize;
            let (kind, flags) = (b[3], b[4]);
            if (kind == HEADERS || kind == CONTINUATION) && len > MAX_HEADER_BLOCK {
                return Err(bad("header block frame too large"));
            }
            if b.len() < 9 + len {
                if self.pending.is_none() && kind != HEADERS && kind != CONTINUATION {
                    // Pass on what there is; the rest of this frame can go
                    // straight through.
                    self.skip = 9 + len - b.len();
                    self.output.push_back(self.input.split().freeze());
                }
                break;
            }
            let stream_id = u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff;
            let frame = self.input.split_to(9 + len);
            match (kind, self.pending.as_mut()) {
                (HEADERS, None) => {
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
                    let p = PendingBlock {
                        stream_id,
                        flags,
                        priority,
                        block: payload[..payload.len() - pad].to_vec(),
                    };
                    if flags & END_HEADERS != 0 {
                        self.emit(p)?;
                    } else {
                        self.pending = Some(p);
                    }
                }
                (CONTINUATION, Some(p)) if p.stream_id == stream_id => {
                    p.block.extend_from_slice(&frame[9..]);
                    if p.block.len() > MAX_HEADER_BLOCK {
                        return Err(bad("header block too large"));
                    }
                    if flags & END_HEADERS != 0 {
                        let p = self.pending.take().expect("pending block");
                        self.emit(p)?;
                    }
                }
                (_, Some(_)) => return Err(bad("frame interleaved in a header block")),
                (_, None) => self.output.push_back(frame.freeze()),
            }
        }
        Ok(())
    }

    fn emit(&mut self, p: PendingBlock) -> io::Result<()> {
        let mut out = Vec::new();
        emit(&mut self.decoder, &mut self.encoder, p, &mut out)?;
        self.output.push_back(Bytes::from(out));
        Ok(())
    }
}

/// A client connection whose reads come out with `:authority` fixed; writes
/// pass straight through. No extra task, and no copy of `DATA` frames.
pub struct AuthorityFix<S> {
    inner: S,
    rw: Rewriter,
    eof: bool,
}

impl<S> AuthorityFix<S> {
    /// Wraps an accepted client connection.
    pub fn new(inner: S) -> Self {
        AuthorityFix {
            inner,
            rw: Rewriter::new(),
            eof: false,
        }
    }
}

/// A socket that reports readability without a read buffer.
pub trait ReadReady {
    /// Ready when a read would not block.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl ReadReady for UnixStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        UnixStream::poll_read_ready(self, cx)
    }
}

#[cfg(test)]
impl ReadReady for tokio::io::DuplexStream {
    fn poll_read_ready(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + ReadReady + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if let Some(front) = this.rw.output.front_mut() {
                let n = front.len().min(buf.remaining());
                buf.put_slice(&front[..n]);
                front.advance(n);
                if front.is_empty() {
                    this.rw.output.pop_front();
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.rw.direct() {
                let start = buf.filled().len();
                ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                let read = buf.filled().len() - start;
                if read == 0 {
                    this.eof = buf.remaining() > 0;
                    return Poll::Ready(Ok(()));
                }
                let keep = this.rw.scan(&buf.filled()[start..]);
                if keep == read {
                    return Poll::Ready(Ok(()));
                }
                // A header block: take it (and what follows) back.
                this.rw
                    .input
                    .extend_from_slice(&buf.filled()[start + keep..]);
                buf.set_filled(start + keep);
                this.rw.process()?;
                if keep > 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if this.rw.input.is_empty() {
                // Nothing half-read: wait for the socket before taking a
                // buffer, so an idle connection holds none.
                ready!(this.inner.poll_read_ready(cx))?;
            }
            this.rw.input.reserve(BUFFERED_READ);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut this.rw.input
            ))?;
            if n == 0 {
                this.eof = true;
                continue;
            }
            this.rw.process()?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<S>
{
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
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
    let raw = super::hpack_raw::dehuffman(&p.block)?;
    let mut headers = decoder
        .decode(&raw)
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Writes `input` from a client in pieces of `piece` bytes; returns what
    /// the server reads with reads of up to `read` bytes.
    async fn through_with(input: &[u8], piece: usize, read: usize) -> Vec<u8> {
        let (mut client, server_side) = tokio::io::duplex(1 << 16);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            for piece in input.chunks(piece) {
                client.write_all(piece).await.unwrap();
            }
        });
        let mut fixed = AuthorityFix::new(server_side);
        let mut got = Vec::new();
        let reader = async {
            let mut buf = vec![0u8; read];
            loop {
                let n = fixed.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
        };
        let ((), w) = tokio::join!(reader, writer);
        w.unwrap();
        got
    }

    async fn through(input: &[u8]) -> Vec<u8> {
        through_with(input, 7, 1000).await
    }

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

        let got = through(&input).await;
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

    /// Frames as the server reads them: (type, payload) after the preface.
    fn frames(mut rest: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            out.push((rest[3], rest[9..9 + len].to_vec()));
            rest = &rest[9 + len..];
        }
        out
    }

    #[tokio::test]
    async fn large_data_frames_pass_whole_between_header_blocks_at_any_split() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        let path = b"%2Fsocket";
        input.extend(headers_frame(&mut enc, path, 1));
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        frame(&mut input, 0x0, 0, 1, &big);
        frame(&mut input, 0x0, 0, 1, b"tail");
        input.extend(headers_frame(&mut enc, path, 3));
        frame(&mut input, 0x0, 0, 3, &big[..70_000]);
        frame(&mut input, 0x8, 0, 0, &[1; 8]); // PING
        input.extend(headers_frame(&mut enc, path, 5));

        for (piece, read) in [
            (7, 1000),
            (65_536, 16_384),
            (3_000, 300_000),
            (1, 9),
            (100_000, 5),
        ] {
            let got = through_with(&input, piece, read).await;
            assert_eq!(&got[..PREFACE.len()], PREFACE);
            let got = frames(&got[PREFACE.len()..]);
            let kinds: Vec<u8> = got.iter().map(|f| f.0).collect();
            assert_eq!(kinds, [1, 0, 0, 1, 0, 8, 1], "piece {piece} read {read}");
            assert_eq!(got[1].1, big);
            assert_eq!(got[2].1, b"tail");
            assert_eq!(got[4].1, &big[..70_000]);
            let mut dec = loona_hpack::Decoder::new();
            for i in [0, 3, 6] {
                let hs = dec.decode(&got[i].1).unwrap();
                assert!(hs.contains(&(b":authority".to_vec(), b"localhost".to_vec())));
            }
        }
    }

    #[tokio::test]
    async fn an_oversized_header_frame_is_refused_before_it_is_buffered() {
        let (mut client, server_side) = tokio::io::duplex(1 << 16);
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&[0x10, 0, 0, HEADERS, END_HEADERS, 0, 0, 0, 1]); // 1 MiB
        client.write_all(&input).await.unwrap();
        let mut fixed = AuthorityFix::new(server_side);
        let mut buf = vec![0u8; 1000];
        let mut result = Ok(0);
        for _ in 0..4 {
            // Without the limit the read would wait for the whole megabyte.
            let read =
                tokio::time::timeout(std::time::Duration::from_secs(5), fixed.read(&mut buf));
            result = read.await.expect("waited for the oversized frame");
            if result.is_err() {
                break;
            }
        }
        let e = result.expect_err("oversized HEADERS frame accepted");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn non_http2_bytes_are_passed_through() {
        let got = through(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(got, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    }
}
