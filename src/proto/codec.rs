//! The protobuf codec every generated client and service uses: prost, with small starting buffers.
//! tonic's default codec starts each stream with an 8 KiB encode and an 8 KiB decode buffer; on a
//! control plane holding one stream per device those are most of a held stream's memory, while
//! what travels on them — acks, heartbeats, specs of a few hundred bytes — needs a fraction of it.
//! The buffers still grow to whatever a message needs (a full 1 MiB spec), they only start small.

use std::marker::PhantomData;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Bytes each stream's encode and decode buffers start with.
const INITIAL_BUFFER: usize = 512;
/// Encoded bytes gathered before they are handed to the transport (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD)
}

/// A prost codec whose stream buffers start small.
#[derive(Debug)]
pub struct CompactCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for CompactCodec<T, U> {
    fn default() -> Self {
        CompactCodec {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for CompactCodec<T, U>
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
