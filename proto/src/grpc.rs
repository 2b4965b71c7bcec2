//! gRPC streaming of [`Packet`]s directly on HTTP/2 bodies, without tonic's
//! codec buffers.
//!
//! tonic's codec copies every received DATA frame into a per-stream decode
//! buffer and every sent message into an encode buffer, and each decoded
//! message splits that buffer, so the next read allocates a new one. On the
//! tunnel's bulk path that was a copy and an allocation per packet in each
//! direction of each hop. Here:
//!
//! - [`Incoming`] decodes messages from the body's frames in place. A `Data`
//!   payload that lies within one HTTP/2 frame is a slice of that frame, not
//!   a copy; only a payload split over frames (peers that send 16 KiB frames)
//!   is gathered into one buffer.
//! - [`Outgoing`] sends a large `Data` payload as its own body chunk after a
//!   small head (gRPC prefix and protobuf fields), so the payload read from a
//!   socket reaches the HTTP/2 layer without a copy. Small packets that are
//!   ready together share one chunk.
//! - [`GrpcService`] routes one streaming method to a [`Handler`], and
//!   [`call`] opens one as a client, both on tonic's transport (its server,
//!   router and `Channel`), which still does HTTP/2, TLS and keepalives.
//!
//! The encoding is byte-for-byte what prost writes (the payload is the last
//! field of `Data`), so peers see ordinary gRPC messages; compressed messages
//! are refused (we never offer `grpc-accept-encoding`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::Stream;
use http::header::{CONTENT_TYPE, TE};
use http::HeaderValue;
use http_body::{Body, Frame};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, int32, WireType};
use prost::Message as _;
use tonic::body::Body as TonicBody;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use crate::wire::{packet::Payload, Packet, PacketType};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const GRPC_ENCODING: &str = "grpc-encoding";
const GRPC_ACCEPT_ENCODING: &str = "grpc-accept-encoding";
/// gRPC message prefix: compressed flag and big-endian length.
const PREFIX: usize = 5;
/// A `Data` payload at least this long travels as its own body chunk.
pub const ZERO_COPY_MIN: usize = 4 * 1024;
/// A decoded payload shorter than this is copied out of the frame it came in.
/// A payload slice keeps alive the whole HTTP/2 read buffer its frame was cut
/// from; copying small ones means that a queue of small packets waiting for a
/// slow reader holds their bytes, not a read buffer each.
pub const COPY_OUT_BELOW: usize = 16 * 1024;
/// Largest HTTP/2 frame our receivers accept (`SETTINGS_MAX_FRAME_SIZE`).
/// Above the 16 KiB default so that a whole `Data` packet of a full socket
/// read fits one frame and is decoded in place; peers that keep sending 16 KiB
/// frames (grpc-go does) still work, with one copy per large packet.
pub const MAX_FRAME: u32 = 256 * 1024;
/// Largest decoded header list our HTTP/2 listeners accept
/// (`SETTINGS_MAX_HEADER_LIST_SIZE`: name, value and 32 octets per field),
/// instead of h2's 16 MiB. Konnectivity requests carry well under 1 KiB of
/// headers; an agent's token a few KiB.
pub const MAX_HEADER_LIST: usize = 64 * 1024;
/// Ready small packets are joined into one body chunk up to this size.
const JOIN_UP_TO: usize = 16 * 1024;

/// Received body bytes not yet decoded: the frames' own buffers, in order.
#[derive(Default)]
struct Chunks {
    queue: VecDeque<Bytes>,
    len: usize,
}

impl Chunks {
    fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.queue.push_back(b);
        }
    }

    /// The first `N` bytes, without consuming them.
    fn peek<const N: usize>(&self) -> Option<[u8; N]> {
        if self.len < N {
            return None;
        }
        let mut out = [0u8; N];
        let mut at = 0;
        for b in &self.queue {
            let n = (N - at).min(b.len());
            out[at..at + n].copy_from_slice(&b[..n]);
            at += n;
            if at == N {
                break;
            }
        }
        Some(out)
    }
}

impl Buf for Chunks {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.queue.front().map(|b| &b[..]).unwrap_or(&[])
    }

    fn advance(&mut self, mut n: usize) {
        assert!(n <= self.len, "advance past the end of the received bytes");
        self.len -= n;
        while n > 0 {
            let front = self.queue.front_mut().expect("len counts queued bytes");
            if n < front.len() {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.queue.pop_front();
        }
    }

    /// A slice of the frame when the bytes lie within one and are at least
    /// [`COPY_OUT_BELOW`] long; a copy otherwise. prost reads `bytes` fields
    /// (only `Data.data` here) with this, which is what makes payloads
    /// zero-copy.
    fn copy_to_bytes(&mut self, n: usize) -> Bytes {
        assert!(n <= self.len, "copy past the end of the received bytes");
        if let Some(front) = self.queue.front_mut() {
            if n >= COPY_OUT_BELOW && front.len() >= n {
                let out = front.split_to(n);
                if front.is_empty() {
                    self.queue.pop_front();
                }
                self.len -= n;
                return out;
            }
        }
        let mut out = BytesMut::with_capacity(n);
        out.put(self.take(n));
        out.freeze()
    }
}

/// The packets of a received gRPC body (a request on the server, a response
/// on the client), decoded as they arrive.
pub struct Incoming<B> {
    body: B,
    chunks: Chunks,
    max_message: usize,
    /// A response must end with `grpc-status` trailers.
    needs_status: bool,
    done: bool,
}

impl<B> Incoming<B> {
    /// Decodes a request body, refusing messages longer than `max_message`.
    pub fn request(body: B, max_message: usize) -> Self {
        Self::new(body, max_message, false)
    }

    /// Decodes a response body: as [`Self::request`], and an end without a
    /// `grpc-status` (a reset stream, a truncating proxy) is an error, as in
    /// tonic and grpc-go.
    pub fn response(body: B, max_message: usize) -> Self {
        Self::new(body, max_message, true)
    }

    fn new(body: B, max_message: usize, needs_status: bool) -> Self {
        Incoming {
            body,
            chunks: Chunks::default(),
            max_message,
            needs_status,
            done: false,
        }
    }

    fn try_decode(&mut self) -> Result<Option<Packet>, Status> {
        let Some(prefix) = self.chunks.peek::<PREFIX>() else {
            return Ok(None);
        };
        if prefix[0] != 0 {
            return Err(Status::internal(
                "compressed gRPC message, but no compression was offered",
            ));
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > self.max_message {
            return Err(Status::resource_exhausted(format!(
                "gRPC message of {len} bytes is over the limit of {}",
                self.max_message
            )));
        }
        if self.chunks.len < PREFIX + len {
            return Ok(None);
        }
        self.chunks.advance(PREFIX);
        let mut message = (&mut self.chunks).take(len);
        let decoded = Packet::decode(&mut message);
        // A malformed message may stop short; the stream ends with it anyway,
        // but keep the framing consistent.
        let rest = message.remaining();
        message.advance(rest);
        decoded
            .map(Some)
            .map_err(|e| Status::internal(format!("malformed packet message: {e}")))
    }

    /// The error, if any, of a body that ended with `status` in its trailers.
    fn ended(&self, status: Option<Status>) -> Option<Status> {
        match status {
            Some(s) if s.code() != Code::Ok => Some(s),
            _ if self.chunks.len > 0 => Some(Status::internal(format!(
                "stream ended inside a gRPC message ({} bytes left over)",
                self.chunks.len
            ))),
            None if self.needs_status => Some(Status::unknown(
                "stream ended without a grpc-status (reset, or cut by a proxy)",
            )),
            _ => None,
        }
    }
}

impl<B> Stream for Incoming<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Item = Result<Packet, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.try_decode() {
                Ok(Some(p)) => return Poll::Ready(Some(Ok(p))),
                Ok(None) => {}
                Err(status) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(status)));
                }
            }
            let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
            let frame = match frame {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(Status::from_error(e.into()))));
                }
                None => {
                    this.done = true;
                    return Poll::Ready(this.ended(None).map(Err));
                }
            };
            match frame.into_data() {
                Ok(data) => this.chunks.push(data),
                Err(frame) => {
                    this.done = true;
                    let status = frame.trailers_ref().and_then(Status::from_header_map);
                    return Poll::Ready(this.ended(status).map(Err));
                }
            }
        }
    }
}

/// Appends `p` as one gRPC message to `out`. A `Data` payload of at least
/// [`ZERO_COPY_MIN`] bytes is not copied: everything before it goes to `out`
/// and the payload is returned, to be sent right after.
pub fn encode(mut p: Packet, out: &mut BytesMut) -> Option<Bytes> {
    let big = match &mut p.payload {
        Some(Payload::Data(d)) if d.data.len() >= ZERO_COPY_MIN => std::mem::take(&mut d.data),
        _ => {
            let len = p.encoded_len();
            out.reserve(PREFIX + len);
            out.put_u8(0);
            out.put_u32(len as u32);
            p.encode(out).expect("reserved enough room");
            return None;
        }
    };
    let Some(Payload::Data(d)) = &p.payload else {
        unreachable!("matched above")
    };
    // Packet { type = 1; data = 4 { connectID = 1; error = 2; data = 3 } },
    // written in field order as prost does, with the payload's bytes left out.
    let data_field = 1 + encoded_len_varint(big.len() as u64) + big.len();
    let inner = d.encoded_len() + data_field;
    // proto3 leaves the default (`DIAL_REQ`, 0) out.
    let has_type = p.r#type != PacketType::default() as i32;
    let type_field = if has_type {
        int32::encoded_len(1, &p.r#type)
    } else {
        0
    };
    let total = type_field + 1 + encoded_len_varint(inner as u64) + inner;
    out.reserve(PREFIX + total - big.len());
    out.put_u8(0);
    out.put_u32(total as u32);
    if has_type {
        int32::encode(1, &p.r#type, out);
    }
    encode_key(4, WireType::LengthDelimited, out);
    encode_varint(inner as u64, out);
    d.encode_raw(out);
    encode_key(3, WireType::LengthDelimited, out);
    encode_varint(big.len() as u64, out);
    Some(big)
}

/// A gRPC body sending the packets of a stream.
pub struct Outgoing<S> {
    packets: S,
    /// A payload to send after the chunk just sent.
    payload: Option<Bytes>,
    /// Set once `packets` ended: `Some(status)` if with an error.
    ended: Option<Option<Status>>,
    /// End with `grpc-status` trailers (a server's response).
    trailers: bool,
    finished: bool,
}

impl<S> Outgoing<S> {
    /// A client's request body: ends with the stream.
    pub fn request(packets: S) -> Self {
        Self::new(packets, false)
    }

    /// A server's response body: ends with `grpc-status` trailers.
    pub fn response(packets: S) -> Self {
        Self::new(packets, true)
    }

    fn new(packets: S, trailers: bool) -> Self {
        Outgoing {
            packets,
            payload: None,
            ended: None,
            trailers,
            finished: false,
        }
    }
}

impl<S> Body for Outgoing<S>
where
    S: Stream<Item = Result<Packet, Status>> + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if let Some(p) = this.payload.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        if this.finished {
            return Poll::Ready(None);
        }
        let mut out = BytesMut::new();
        while this.ended.is_none() && out.len() < JOIN_UP_TO {
            let next = match Pin::new(&mut this.packets).poll_next(cx) {
                Poll::Ready(next) => next,
                Poll::Pending if out.is_empty() => return Poll::Pending,
                Poll::Pending => break,
            };
            match next {
                Some(Ok(p)) => {
                    if let Some(payload) = encode(p, &mut out) {
                        this.payload = Some(payload);
                        break;
                    }
                }
                Some(Err(status)) => this.ended = Some(Some(status)),
                None => this.ended = Some(None),
            }
        }
        if !out.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
        }
        this.finished = true;
        let status = this.ended.take().flatten();
        if !this.trailers {
            return Poll::Ready(status.map(Err));
        }
        let status = status.unwrap_or_else(|| Status::ok(""));
        let mut trailers = http::HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            trailers.insert("grpc-status", HeaderValue::from(Code::Internal as i32));
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}

/// The replies of a streaming call.
pub type Replies = Pin<Box<dyn Stream<Item = Result<Packet, Status>> + Send>>;

/// One bidirectional-streaming method of `Packet`s, served by [`GrpcService`].
pub trait Handler: Send + Sync + 'static {
    /// The gRPC service name tonic's router matches (`AgentService`).
    const SERVICE: &'static str;
    /// The full method path (`/AgentService/Connect`).
    const METHOD: &'static str;

    /// Answers one call: response metadata and the replies, or a status.
    fn call(
        self: Arc<Self>,
        req: tonic::Request<Incoming<TonicBody>>,
    ) -> impl Future<Output = Result<tonic::Response<Replies>, Status>> + Send;
}

/// A tonic service (`Server::add_service`) for one [`Handler`].
pub struct GrpcService<H> {
    handler: Arc<H>,
    max_message: usize,
}

impl<H> GrpcService<H> {
    /// Serves `handler`, refusing messages longer than `max_message`.
    pub fn new(handler: H, max_message: usize) -> Self {
        GrpcService {
            handler: Arc::new(handler),
            max_message,
        }
    }
}

impl<H> Clone for GrpcService<H> {
    fn clone(&self) -> Self {
        GrpcService {
            handler: self.handler.clone(),
            max_message: self.max_message,
        }
    }
}

impl<H: Handler> tonic::server::NamedService for GrpcService<H> {
    const NAME: &'static str = H::SERVICE;
}

impl<H: Handler> tower::Service<http::Request<TonicBody>> for GrpcService<H> {
    type Response = http::Response<TonicBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<TonicBody>) -> Self::Future {
        let handler = self.handler.clone();
        let max = self.max_message;
        Box::pin(async move {
            if req.uri().path() != H::METHOD {
                let path = req.uri().path().to_string();
                return Ok(Status::unimplemented(format!("unknown method {path}")).into_http());
            }
            if let Some(enc) = req.headers().get(GRPC_ENCODING) {
                if enc != "identity" {
                    let msg = format!("grpc-encoding {enc:?} is not supported");
                    let mut resp = Status::unimplemented(msg).into_http::<TonicBody>();
                    resp.headers_mut()
                        .insert(GRPC_ACCEPT_ENCODING, HeaderValue::from_static("identity"));
                    return Ok(resp);
                }
            }
            let req = tonic::Request::from_http(req.map(|body| Incoming::request(body, max)));
            match handler.call(req).await {
                Ok(resp) => {
                    let (metadata, replies, extensions) = resp.into_parts();
                    let mut http = http::Response::new(TonicBody::new(Outgoing::response(replies)));
                    *http.headers_mut() = metadata.into_headers();
                    http.headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                    *http.extensions_mut() = extensions;
                    Ok(http)
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// Opens a bidirectional-streaming call of `method` on `channel`, sending
/// `packets` with `metadata`; returns the response metadata and its packets,
/// or the status the server answered with.
pub async fn call<S>(
    channel: &mut tonic::transport::Channel,
    method: &'static str,
    metadata: MetadataMap,
    packets: S,
    max_message: usize,
) -> Result<tonic::Response<Incoming<TonicBody>>, Status>
where
    S: Stream<Item = Result<Packet, Status>> + Send + Unpin + 'static,
{
    let mut req = http::Request::new(TonicBody::new(Outgoing::request(packets)));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static(method);
    *req.headers_mut() = metadata.into_headers();
    let headers = req.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(TE, HeaderValue::from_static("trailers"));
    use tower::Service;
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let resp = channel
        .call(req)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let (parts, body) = resp.into_parts();
    if parts.status != http::StatusCode::OK {
        // The gRPC spec's HTTP-to-status map, as tonic and grpc-go use it.
        use http::StatusCode as H;
        let code = match parts.status {
            H::BAD_REQUEST => Code::Internal,
            H::UNAUTHORIZED => Code::Unauthenticated,
            H::FORBIDDEN => Code::PermissionDenied,
            H::NOT_FOUND => Code::Unimplemented,
            H::TOO_MANY_REQUESTS | H::BAD_GATEWAY | H::SERVICE_UNAVAILABLE | H::GATEWAY_TIMEOUT => {
                Code::Unavailable
            }
            _ => Code::Unknown,
        };
        return Err(Status::new(
            code,
            format!("server answered HTTP {} to a gRPC call", parts.status),
        ));
    }
    let grpc = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if !grpc {
        return Err(Status::unknown(format!(
            "server answered with content-type {:?}, not gRPC",
            parts.headers.get(CONTENT_TYPE)
        )));
    }
    if let Some(status) = Status::from_header_map(&parts.headers) {
        // A trailers-only response: the call ended before it began.
        let status = if status.code() == Code::Ok {
            Status::unknown("server ended the call at once")
        } else {
            status
        };
        return Err(status);
    }
    Ok(tonic::Response::from_parts(
        MetadataMap::from_headers(parts.headers),
        Incoming::response(body, max_message),
        parts.extensions,
    ))
}

#[cfg(test)]
mod tests;
