//! The protobuf codec of every generated client and server (wired in by `build.rs`).
//!
//! It is tonic's prost codec except for one thing: a message that does not decode is the
//! sender's mistake, so it becomes `INVALID_ARGUMENT` (reason `invalid_argument`) with the
//! decoder's complaint, not tonic's default `INTERNAL` (which clients rightly treat as a
//! server bug and retry). The status is built here, before any handler runs; it carries the
//! same reason metadata as every status of the node's error table.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::ProstEncoder;

use crate::status::{status, Reason};

/// A [`Codec`] for prost messages whose decode failures are `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct ProtoCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        ProtoCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProtoDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProtoDecoder { _pd: PhantomData }
    }
}

/// Decodes `U`; a malformed message is `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct ProtoDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default> Decoder for ProtoDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| malformed(&e))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// The status of a message that does not decode.
pub fn malformed(e: &prost::DecodeError) -> Status {
    status(
        Code::InvalidArgument,
        format!("malformed protobuf message: {e}"),
        &Reason::InvalidArgument,
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::reason_of;

    #[test]
    fn a_decode_error_is_an_invalid_argument_with_its_reason() {
        // A field header announcing a length-delimited field longer than the buffer.
        let err = crate::pb::SubmitTasksRequest::decode(&[0x0a, 0x7f, 0x01][..]).unwrap_err();
        let s = malformed(&err);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().starts_with("malformed protobuf message: "), "{}", s.message());
        assert_eq!(reason_of(&s), Some(Reason::InvalidArgument));
    }
}
