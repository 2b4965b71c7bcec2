//! gRPC framing and the `Packet` decoder, as a peer's stream body: arbitrary
//! bytes cut into HTTP/2 DATA frames at arbitrary points. Every packet that
//! decodes must give its typed view without panicking and come back the same
//! through our encoder; the stream ends in an error or cleanly, never a panic.
#![no_main]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use futures_core::Stream;
use http_body::{Body, Frame};
use konnectivity_proto::grpc::{self, Incoming};
use konnectivity_proto::{Message, Packet};
use libfuzzer_sys::fuzz_target;

/// A body whose frames are all there already.
struct Frames(VecDeque<Bytes>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

/// Every item of a stream that never waits (errors as their text).
fn collect(mut s: Incoming<Frames>) -> Vec<Result<Packet, String>> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    while let Poll::Ready(Some(item)) = Pin::new(&mut s).poll_next(&mut cx) {
        out.push(item.map_err(|e| e.to_string()));
    }
    out
}

fn frames(data: &[u8], cut: usize) -> Frames {
    Frames(
        data.chunks(cut.max(1))
            .map(Bytes::copy_from_slice)
            .collect(),
    )
}

const MAX_MESSAGE: usize = 1 << 20;

fuzz_target!(|input: &[u8]| {
    let Some((&cut, data)) = input.split_first() else {
        return;
    };
    let items = collect(Incoming::request(frames(data, cut as usize), MAX_MESSAGE));
    // Framing does not depend on where the frames were cut.
    let whole = collect(Incoming::request(frames(data, data.len()), MAX_MESSAGE));
    assert_eq!(items.len(), whole.len(), "item count depends on frame cuts");
    for (a, b) in items.iter().zip(&whole) {
        match (a, b) {
            (Ok(a), Ok(b)) => assert_eq!(a, b),
            (Err(_), Err(_)) => {}
            _ => panic!("result depends on frame cuts: {a:?} vs {b:?}"),
        }
    }
    for p in items.into_iter().flatten() {
        let _ = Message::from_packet(p.clone()).map(|m| (m.kind(), m.into_packet()));
        let mut head = BytesMut::new();
        let tail = grpc::encode(p.clone(), &mut head);
        let mut wire = head.to_vec();
        if let Some(t) = tail {
            wire.extend_from_slice(&t);
        }
        let again = collect(Incoming::request(frames(&wire, wire.len()), MAX_MESSAGE));
        match &again[..] {
            [Ok(q)] => assert_eq!(q, &p, "encode/decode round trip"),
            other => panic!("re-encoded packet did not decode alone: {other:?}"),
        }
    }
});
