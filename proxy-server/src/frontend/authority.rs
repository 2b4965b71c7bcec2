//! Accepting kube-apiserver's `:authority` on the Unix socket.
//!
//! kube-apiserver dials the gRPC frontend with the socket path as the gRPC
//! target, so grpc-go sends the percent-encoded path (`%2Fetc%2Fkubernetes%2F...`)
//! as the HTTP/2 `:authority`. The `h2` crate under tonic rejects such a request
//! with `RST_STREAM(PROTOCOL_ERROR)` (hyperium/h2 issue 442; the fix, PR 487, is
//! unmerged). Every Unix-socket gRPC connection is therefore wrapped in
//! [`AuthorityFix`], whose reads run through the socket-free
//! [`konnectivity_proto::authority::Rewriter`]: header blocks are re-encoded with
//! a valid `:authority`, every other frame is handed over untouched. It sits
//! inside the connection's own reads: no extra task or pipe. Reads go straight
//! into the HTTP/2 server's buffer and are only scanned for frame boundaries;
//! a header block (and whatever follows it in the same read) is taken back
//! out to be rewritten, so the bytes of `DATA` frames are never copied here.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use konnectivity_proto::authority::Rewriter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

/// Read size while a frame is being reassembled.
const BUFFERED_READ: usize = 2 * 1024;

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
            if let Some(out) = this.rw.next_output(buf.remaining()) {
                buf.put_slice(&out);
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
                // A header block is taken back (with what follows it).
                let keep = this.rw.after_direct_read(&buf.filled()[start..])?;
                if keep == read {
                    return Poll::Ready(Ok(()));
                }
                buf.set_filled(start + keep);
                if keep > 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if !this.rw.has_input() {
                // Nothing half-read: wait for the socket before taking a
                // buffer, so an idle connection holds none.
                ready!(this.inner.poll_read_ready(cx))?;
            }
            let input = this.rw.input();
            input.reserve(BUFFERED_READ);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                input
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

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const HEADERS: u8 = 0x1;
    const CONTINUATION: u8 = 0x9;
    const END_HEADERS: u8 = 0x4;

    fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&stream_id.to_be_bytes());
        out.extend_from_slice(payload);
    }
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
