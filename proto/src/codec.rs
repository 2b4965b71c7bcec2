//! The gRPC codec for `Packet`: prost encoding with small starting buffers.
//!
//! tonic's default codec starts every stream with an 8 KiB decode buffer and an
//! 8 KiB encode buffer. A tunnel stream usually carries a few small packets
//! (kube-apiserver opens one stream per `kubectl logs`), and with 10,000 open
//! tunnels those buffers were a large share of the server's memory. Buffers
//! still grow to the largest message they see.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial encode/decode buffer per stream.
pub const INITIAL_BUFFER: usize = 1024;
/// Encoded bytes after which a stream's encoder yields to let the body flush.
pub const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD)
}

/// A prost codec with [`INITIAL_BUFFER`]-sized starting buffers.
#[derive(Debug, Clone, Copy)]
pub struct PacketCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for PacketCodec<T, U> {
    fn default() -> Self {
        PacketCodec(PhantomData)
    }
}

impl<T, U> Codec for PacketCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
