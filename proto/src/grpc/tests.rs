//! Framing in memory: packets cut at every size, limits, the codec-free encoder.

use super::*;
use crate::packet;
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};

fn packets() -> Vec<Packet> {
    let big: Bytes = (0..200_000u32).map(|i| (i * 7) as u8).collect();
    vec![
        packet::dial_request("127.0.0.1:10250", 42),
        packet::dial_ok(42, 7),
        packet::dial_failed(43, "refused"),
        packet::window(7, 1 << 20),
        packet::data(7, Bytes::from_static(b"small")),
        packet::data(7, big.slice(..ZERO_COPY_MIN)),
        packet::data(7, big.clone()),
        packet::data(-3, Bytes::new()),
        packet::close_request(7),
        packet::data(1 << 40, big.slice(..ZERO_COPY_MIN - 1)),
        packet::close_response(7, "gone"),
    ]
}

fn encode_all(ps: &[Packet]) -> (Vec<u8>, Vec<Bytes>) {
    let mut wire = Vec::new();
    let mut payloads = Vec::new();
    for p in ps {
        let mut out = BytesMut::new();
        let payload = encode(p.clone(), &mut out);
        wire.extend_from_slice(&out);
        if let Some(b) = payload {
            wire.extend_from_slice(&b);
            payloads.push(b);
        }
    }
    (wire, payloads)
}

#[test]
fn encoding_is_what_prost_writes() {
    for p in packets() {
        let mut expected = vec![0u8; PREFIX];
        p.encode(&mut expected).unwrap();
        let len = (expected.len() - PREFIX) as u32;
        expected[1..PREFIX].copy_from_slice(&len.to_be_bytes());
        let (wire, _) = encode_all(std::slice::from_ref(&p));
        assert_eq!(wire, expected, "{p:?}");
    }
}

fn body(
    chunks: Vec<Bytes>,
    trailers: Option<http::HeaderMap>,
) -> impl Body<Data = Bytes, Error = Infallible> + Unpin {
    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> =
        chunks.into_iter().map(|c| Ok(Frame::data(c))).collect();
    if let Some(t) = trailers {
        frames.push(Ok(Frame::trailers(t)));
    }
    StreamBody::new(futures::stream::iter(frames))
}

async fn decode_all<B>(b: B) -> Vec<Result<Packet, Status>>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    Incoming::request(b, 1 << 20).collect().await
}

#[tokio::test]
async fn decodes_across_any_frame_boundaries() {
    let ps = packets();
    let (wire, _) = encode_all(&ps);
    let wire = Bytes::from(wire);
    for step in [1, 2, 5, 7, 100, 4096, 16_384, 70_000, wire.len()] {
        let chunks: Vec<Bytes> = (0..wire.len())
            .step_by(step)
            .map(|i| wire.slice(i..(i + step).min(wire.len())))
            .collect();
        let got: Vec<Packet> = decode_all(body(chunks, None))
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(got, ps, "frames of {step} bytes");
    }
}

#[tokio::test]
async fn payloads_are_slices_of_their_frames() {
    let p = packet::data(9, Bytes::from(vec![5u8; 100_000]));
    // As sent: a head chunk, then the payload chunk.
    let mut head = BytesMut::new();
    let payload = encode(p.clone(), &mut head).expect("large payloads are not copied");
    let frame = Bytes::from(payload.to_vec());
    let got = decode_all(body(vec![head.freeze(), frame.clone()], None)).await;
    let Some(Payload::Data(d)) = &got[0].as_ref().unwrap().payload else {
        panic!("not data: {got:?}")
    };
    assert_eq!(d.data.as_ptr(), frame.as_ptr(), "payload was copied");
    assert_eq!(got[0].as_ref().unwrap(), &p);
}

#[tokio::test]
async fn small_payloads_are_copied_out() {
    let (wire, _) = encode_all(&[packet::data(9, Bytes::from_static(b"tiny"))]);
    let frame = Bytes::from(wire);
    let got = decode_all(body(vec![frame.clone()], None)).await;
    let Some(Payload::Data(d)) = &got[0].as_ref().unwrap().payload else {
        panic!("not data")
    };
    let range = frame.as_ptr() as usize..frame.as_ptr() as usize + frame.len();
    assert!(!range.contains(&(d.data.as_ptr() as usize)));
}

#[tokio::test]
async fn bad_streams_end_with_a_status() {
    let (wire, _) = encode_all(&[packet::close_request(1)]);
    // Compressed flag.
    let mut compressed = wire.clone();
    compressed[0] = 1;
    let got = decode_all(body(vec![compressed.into()], None)).await;
    assert_eq!(got[0].as_ref().unwrap_err().code(), Code::Internal);
    // Over the size limit: refused from the prefix, before the bytes arrive.
    let huge = Bytes::from_static(&[0, 0x10, 0, 0, 0]);
    let got: Vec<_> = Incoming::request(body(vec![huge], None), 1024)
        .collect()
        .await;
    assert_eq!(got[0].as_ref().unwrap_err().code(), Code::ResourceExhausted);
    // Not protobuf.
    let junk = Bytes::from_static(&[0, 0, 0, 0, 2, 0xff, 0xff]);
    let got = decode_all(body(vec![junk], None)).await;
    assert_eq!(got[0].as_ref().unwrap_err().code(), Code::Internal);
    // Truncated.
    let cut = Bytes::copy_from_slice(&wire[..wire.len() - 1]);
    let got = decode_all(body(vec![cut], None)).await;
    assert_eq!(got.len(), 1);
    assert!(got[0].as_ref().unwrap_err().message().contains("inside"));
    // An error status in the trailers.
    let mut t = http::HeaderMap::new();
    Status::unauthenticated("no").add_header(&mut t).unwrap();
    let got = decode_all(body(vec![wire.clone().into()], Some(t))).await;
    assert!(got[0].is_ok());
    assert_eq!(got[1].as_ref().unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(got.len(), 2);
}

#[tokio::test]
async fn a_response_must_end_with_a_status() {
    let (wire, _) = encode_all(&[packet::close_request(1)]);
    let ok = {
        let mut t = http::HeaderMap::new();
        Status::ok("").add_header(&mut t).unwrap();
        t
    };
    let run = |trailers| {
        let b = body(vec![wire.clone().into()], trailers);
        Incoming::response(b, 1 << 20).collect::<Vec<_>>()
    };
    let got = run(Some(ok)).await;
    assert_eq!(got.len(), 1);
    assert!(got[0].is_ok());
    let got = run(None).await;
    assert!(got[0].is_ok());
    assert_eq!(got[1].as_ref().unwrap_err().code(), Code::Unknown);
    // A request needs none.
    let got = decode_all(body(vec![wire.clone().into()], None)).await;
    assert_eq!(got.len(), 1);
}

#[tokio::test]
async fn outgoing_round_trips_and_ends_with_trailers() {
    let ps = packets();
    let items: Vec<Result<Packet, Status>> = ps.iter().cloned().map(Ok).collect();
    let collected = Outgoing::response(futures::stream::iter(items))
        .collect()
        .await
        .unwrap();
    let status = collected.trailers().and_then(Status::from_header_map);
    assert_eq!(status.map(|s| s.code()), Some(Code::Ok));
    let wire = collected.to_bytes();
    let got: Vec<Packet> = decode_all(body(vec![wire], None))
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(got, ps);

    // An error ends a response with its status and a request with an error.
    let items = vec![Ok(packet::close_request(1)), Err(Status::aborted("stop"))];
    let collected = Outgoing::response(futures::stream::iter(items.clone()))
        .collect()
        .await
        .unwrap();
    let status = collected.trailers().and_then(Status::from_header_map);
    assert_eq!(status.map(|s| s.code()), Some(Code::Aborted));
    let err = Outgoing::request(futures::stream::iter(items))
        .collect()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
}
