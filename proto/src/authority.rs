//! The `:authority` rewriter for kube-apiserver's gRPC connections on the
//! Unix socket, with no I/O: client bytes in, rewritten bytes out.
//!
//! kube-apiserver dials the gRPC frontend with the socket path as the gRPC
//! target, so grpc-go sends the percent-encoded path (`%2Fetc%2Fkubernetes%2F...`)
//! as the HTTP/2 `:authority`, which the `h2` crate refuses (see the server's
//! `frontend::authority`, which wraps each connection's reads in this
//! [`Rewriter`]). Each request header block is re-encoded with an `:authority`
//! that is not a valid authority replaced by `localhost`; every other frame
//! passes untouched. The wrapper reads straight into the HTTP/2 server's buffer
//! and only asks [`Rewriter::after_direct_read`] where the next header block
//! starts, so the bytes of `DATA` frames are never copied here.
//!
//! The client's HPACK dynamic table is tracked by our decoder; the server sees
//! only our encoder's blocks, so both tables stay consistent.
//!
//! Bounds, whatever the client sends: a header-block frame over
//! [`MAX_HEADER_BLOCK`] is refused before it is buffered, and so is a block
//! whose decoded header list is over [`MAX_HEADER_LIST`] (HPACK lets one byte
//! name a 4 KiB table entry, so a 256 KiB block could otherwise decode to
//! 1 GiB).

mod hpack_raw;

use std::collections::VecDeque;
use std::io;

use bytes::{Bytes, BytesMut};

pub use crate::grpc::MAX_HEADER_LIST;

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
/// Largest header block we accept from a client.
pub const MAX_HEADER_BLOCK: usize = 256 * 1024;
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
pub struct Rewriter {
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

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    /// A rewriter waiting for the client preface.
    pub fn new() -> Self {
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
    pub fn direct(&self) -> bool {
        self.phase != Phase::Preface
            && self.input.is_empty()
            && self.output.is_empty()
            && self.pending.is_none()
    }

    /// Takes bytes just read straight into the caller's buffer (in
    /// [`Self::direct`] state) and returns how many of them may stay there:
    /// everything up to the first header-block frame. The rest is taken in
    /// and processed; its rewritten form comes out of [`Self::next_output`].
    pub fn after_direct_read(&mut self, new: &[u8]) -> io::Result<usize> {
        let keep = self.scan(new);
        if keep < new.len() {
            self.input.extend_from_slice(&new[keep..]);
            self.process()?;
        }
        Ok(keep)
    }

    /// True when part of a frame is buffered here, waiting for more bytes.
    pub fn has_input(&self) -> bool {
        !self.input.is_empty()
    }

    /// The buffer to read into while not [`Self::direct`]; call
    /// [`Self::process`] after each read.
    pub fn input(&mut self) -> &mut BytesMut {
        &mut self.input
    }

    /// Up to `max` bytes of rewritten output, in order.
    pub fn next_output(&mut self, max: usize) -> Option<Bytes> {
        let front = self.output.front_mut()?;
        let out = front.split_to(front.len().min(max));
        if front.is_empty() {
            self.output.pop_front();
        }
        Some(out)
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
    pub fn process(&mut self) -> io::Result<()> {
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

/// Decodes a header block, fixes `:authority`, re-encodes it and writes it as
/// HEADERS (+ CONTINUATION) frames.
fn emit(
    decoder: &mut loona_hpack::Decoder<'_>,
    encoder: &mut loona_hpack::Encoder<'_>,
    p: PendingBlock,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let raw = hpack_raw::dehuffman(&p.block)?;
    let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut list_size = 0usize;
    decoder
        .decode_with_cb(&raw, |name, value| {
            // Counted even once over the limit (nothing more is kept), so the
            // decoder's table stays in step for the rest of the block.
            list_size = list_size.saturating_add(name.len() + value.len() + 32);
            if list_size <= MAX_HEADER_LIST {
                headers.push((name.into_owned(), value.into_owned()));
            }
        })
        .map_err(|e| bad(format!("HPACK: {e:?}")))?;
    if list_size > MAX_HEADER_LIST {
        return Err(bad(format!(
            "header list of {list_size} bytes is over the limit of {MAX_HEADER_LIST}"
        )));
    }
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

/// Runs `reads` (each one socket read) through a fresh [`Rewriter`] the way
/// the server's connection wrapper does: straight through while it can,
/// buffered while a header block is being put together. Returns everything
/// the HTTP/2 server would read. For tests and fuzzing.
pub fn rewrite_reads<'a>(reads: impl IntoIterator<Item = &'a [u8]>) -> io::Result<Vec<u8>> {
    let mut rw = Rewriter::new();
    let mut out = Vec::new();
    for read in reads {
        if rw.direct() {
            let keep = rw.after_direct_read(read)?;
            out.extend_from_slice(&read[..keep]);
        } else {
            rw.input().extend_from_slice(read);
            rw.process()?;
        }
        while let Some(b) = rw.next_output(usize::MAX) {
            out.extend_from_slice(&b);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(enc: &mut loona_hpack::Encoder<'_>, authority: &[u8], stream: u32) -> Vec<u8> {
        let block = enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/ProxyService/Proxy"),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
        ]);
        let mut out = Vec::new();
        frame(&mut out, HEADERS, END_HEADERS, stream, &block);
        out
    }

    fn authorities(mut rest: &[u8]) -> Vec<Vec<u8>> {
        let mut dec = loona_hpack::Decoder::new();
        let mut found = Vec::new();
        while rest.len() >= 9 {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            if rest[3] == HEADERS {
                for (n, v) in dec.decode(&rest[9..9 + len]).unwrap() {
                    if n == b":authority" {
                        found.push(v);
                    }
                }
            }
            rest = &rest[9 + len..];
        }
        found
    }

    #[test]
    fn every_split_gives_the_same_rewrite() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(request(&mut enc, b"%2Ftmp%2Fk.sock", 1));
        frame(&mut input, 0x0, 0, 1, &[7u8; 300]);
        input.extend(request(&mut enc, b"localhost:8090", 3));
        let whole = rewrite_reads([&input[..]]).unwrap();
        assert_eq!(
            authorities(&whole[PREFACE.len()..]),
            [&b"localhost"[..], b"localhost:8090"]
        );
        for piece in [1, 2, 9, 10, 31, 100] {
            let split = rewrite_reads(input.chunks(piece)).unwrap();
            assert_eq!(split, whole, "reads of {piece} bytes");
        }
    }

    #[test]
    fn a_block_that_decodes_past_the_header_list_limit_is_refused() {
        // One 4,000-byte value in the dynamic table, then 60,000 one-byte
        // references to it: a 60 KiB block that would decode to 240 MB.
        // Literal with indexing, name "x", value of 4,000 bytes (length
        // 127 + 3,873 as an HPACK integer).
        let mut block = vec![
            0x40,
            0x01,
            b'x',
            0x7f,
            0x80 | (3873 % 128) as u8,
            (3873 / 128) as u8,
        ];
        block.extend(std::iter::repeat_n(b'v', 4000));
        block.extend(std::iter::repeat_n(0xbe, 60_000)); // index 62: the entry
        let mut input = PREFACE.to_vec();
        let mut first = true;
        for chunk in block.chunks(16_384) {
            let (kind, flags) = if first {
                (HEADERS, 0)
            } else {
                (CONTINUATION, 0)
            };
            first = false;
            frame(&mut input, kind, flags, 1, chunk);
        }
        frame(&mut input, CONTINUATION, END_HEADERS, 1, &[]);
        let e = rewrite_reads([&input[..]]).expect_err("HPACK bomb accepted");
        assert!(e.to_string().contains("header list of"), "{e}");

        // The same value referenced a few times is fine.
        let mut ok = PREFACE.to_vec();
        let small = &block[..block.len() - 60_000 + 3];
        frame(&mut ok, HEADERS, END_HEADERS, 1, small);
        assert!(rewrite_reads([&ok[..]]).is_ok());
    }
}
