//! Copying one connection's bytes: from its socket into the tunnel under
//! its credit, and from the tunnel to its socket.

use std::future::Future;
use std::io;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{Credit, FIRST_READ, READ_CHUNK};

/// The read side of a relayed socket. Sockets with readiness (TCP and Unix
/// stream halves) wait for data *before* a buffer is allocated, so an idle
/// connection holds no read buffer at all; other readers (TLS) hold one while
/// they wait.
pub trait ChunkReader: Send {
    /// Reads at most `max` bytes into a new buffer; an empty result is EOF.
    fn read_chunk(&mut self, max: usize) -> impl Future<Output = io::Result<Bytes>> + Send;
}

macro_rules! ready_then_read {
    ($($t:ty),*) => {$(
        impl ChunkReader for $t {
            async fn read_chunk(&mut self, max: usize) -> io::Result<Bytes> {
                loop {
                    self.readable().await?;
                    let mut buf = BytesMut::with_capacity(max);
                    match self.try_read_buf(&mut buf) {
                        Ok(_) => return Ok(buf.freeze()),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    )*};
}
ready_then_read!(
    tokio::net::tcp::OwnedReadHalf,
    tokio::net::unix::OwnedReadHalf
);

/// Any [`AsyncRead`] as a [`ChunkReader`] that waits with its buffer allocated.
#[derive(Debug)]
pub struct Buffered<R>(pub R);

impl<R: AsyncRead + Unpin + Send> ChunkReader for Buffered<R> {
    async fn read_chunk(&mut self, max: usize) -> io::Result<Bytes> {
        let mut buf = BytesMut::with_capacity(max);
        self.0.read_buf(&mut buf).await?;
        Ok(buf.freeze())
    }
}

/// Reads `reader` until EOF, handing each chunk to `send` while respecting
/// `credit`. Stops early, without error, when `send` returns false (the tunnel
/// side is gone). Returns the bytes read.
///
/// Read sizes adapt: they double (up to [`READ_CHUNK`]) while reads come back
/// full and halve (down to [`FIRST_READ`]) when they come back mostly empty.
pub async fn socket_to_tunnel<R, F, Fut>(
    mut reader: R,
    credit: &Credit,
    mut send: F,
) -> io::Result<u64>
where
    R: ChunkReader,
    F: FnMut(Bytes) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut total = 0u64;
    let mut want = FIRST_READ;
    loop {
        let allowed = credit.wait(want).await;
        let mut chunk = reader.read_chunk(allowed).await?;
        let n = chunk.len();
        if n == 0 {
            return Ok(total);
        }
        if n < allowed / 4 {
            // Do not pin a mostly empty read buffer while the chunk waits in
            // queues: a small copy instead.
            chunk = Bytes::copy_from_slice(&chunk);
        }
        if n == allowed && want < READ_CHUNK {
            want *= 2;
        } else if n < want / 4 && want > FIRST_READ {
            want /= 2;
        }
        total += n as u64;
        credit.consume(n);
        if !send(chunk).await {
            return Ok(total);
        }
    }
}

/// The receiving side of one tunnelled connection, as a relay sees it.
pub trait Inbound {
    /// The next chunk, or `None` once the connection is closed.
    fn recv(&mut self) -> impl Future<Output = Option<Bytes>> + Send;
    /// `n` bytes were written out: count them, grant credit back.
    fn delivered(&mut self, n: usize) -> impl Future<Output = ()> + Send;
}

/// Writes every chunk from `inbound` to `writer` until the connection closes,
/// reporting each written chunk, then shuts the writer down. Returns the bytes
/// written.
pub async fn tunnel_to_socket<I, W>(inbound: &mut I, mut writer: W) -> io::Result<u64>
where
    I: Inbound,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    while let Some(chunk) = inbound.recv().await {
        writer.write_all(&chunk).await?;
        total += chunk.len() as u64;
        inbound.delivered(chunk.len()).await;
    }
    writer.shutdown().await.ok();
    Ok(total)
}
