//! Length-prefixed frame codec with resynchronisation.
//!
//! A frame on the wire is `MAGIC | len: u32 LE | payload`, the payload a protobuf `Frame`.
//! The decoder never trusts the peer: a length above [`MAX_FRAME_LEN`] is rejected before
//! anything is allocated, bytes that do not start with the magic are skipped up to the
//! next magic, and a payload that does not decode is reported and dropped. Each of these
//! is yielded as an `Err` item, so the caller can answer it and keep the connection;
//! the decoder itself never fails except on I/O.

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

use crate::pb::Frame;
use crate::{HEADER_LEN, MAGIC, MAX_FRAME_LEN};

/// A frame the decoder could not accept. The connection stays usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// Bytes that were not a frame header were skipped.
    #[error("skipped {skipped} bytes that did not start with the frame magic")]
    BadMagic { skipped: usize },
    /// The header announced a payload longer than the limit; its header was dropped.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversized { len: usize, max: usize },
    /// The payload was not a valid protobuf `Frame`.
    #[error("malformed frame payload: {0}")]
    Malformed(String),
    /// The frame decoded but carried no body.
    #[error("frame on stream {stream_id} has no body")]
    Empty { stream_id: u64 },
}

/// Errors that end a connection.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("I/O error on the agent channel")]
    Io(#[from] std::io::Error),
    /// Raised by the encoder: the local side tried to send a frame over the limit.
    #[error("refusing to send a frame of {len} bytes (limit {max})")]
    FrameTooLarge { len: usize, max: usize },
}

/// tokio-util codec for agent frames. Decodes into `Result<Frame, FrameError>` items.
///
/// After an oversized header only the header is dropped: the decoder then scans for the
/// next magic. It does not skip the announced length, which could be 4 GiB of a healthy
/// stream swallowed on the word of one corrupt header.
#[derive(Debug, Default, Clone)]
pub struct FrameCodec {
    _private: (),
}

impl FrameCodec {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Finds the first offset at which `MAGIC` starts, or where a partial magic starts at the
/// end of `buf` (so it can complete with more input).
fn magic_position(buf: &[u8]) -> usize {
    let mut i = 0;
    while i < buf.len() {
        let tail = &buf[i..];
        let n = tail.len().min(MAGIC.len());
        if tail[..n] == MAGIC[..n] {
            return i;
        }
        i += 1;
    }
    buf.len()
}

impl Decoder for FrameCodec {
    type Item = Result<Frame, FrameError>;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, CodecError> {
        if src.is_empty() {
            return Ok(None);
        }
        let start = magic_position(src);
        if start > 0 {
            src.advance(start);
            return Ok(Some(Err(FrameError::BadMagic { skipped: start })));
        }
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_le_bytes([src[4], src[5], src[6], src[7]]) as usize;
        if len > MAX_FRAME_LEN {
            src.advance(HEADER_LEN);
            return Ok(Some(Err(FrameError::Oversized {
                len,
                max: MAX_FRAME_LEN,
            })));
        }
        if src.len() < HEADER_LEN + len {
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let payload = src.split_to(len).freeze();
        let frame = match Frame::decode(payload) {
            Ok(frame) => frame,
            Err(e) => return Ok(Some(Err(FrameError::Malformed(e.to_string())))),
        };
        if frame.body.is_none() {
            return Ok(Some(Err(FrameError::Empty {
                stream_id: frame.stream_id,
            })));
        }
        Ok(Some(Ok(frame)))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_into(&frame, dst)
    }
}

/// Appends one encoded frame to `dst`.
pub fn encode_into(frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
    let len = frame.encoded_len();
    if len > MAX_FRAME_LEN {
        return Err(CodecError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    dst.reserve(HEADER_LEN + len);
    dst.put_slice(&MAGIC);
    // The check above keeps `len` within u32.
    dst.put_u32_le(len as u32);
    frame
        .encode(dst)
        .map_err(|e| CodecError::Io(std::io::Error::other(e)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{frame::Body, Data, Hello, OutputFd};

    fn data_frame(stream_id: u64, payload: &[u8]) -> Frame {
        Frame {
            stream_id,
            body: Some(Body::Data(Data {
                fd: OutputFd::Stdout as i32,
                data: bytes::Bytes::copy_from_slice(payload),
            })),
        }
    }

    fn decode_all(codec: &mut FrameCodec, buf: &mut BytesMut) -> Vec<Result<Frame, FrameError>> {
        let mut out = Vec::new();
        while let Some(item) = codec.decode(buf).expect("decoder never fails without I/O") {
            out.push(item);
        }
        out
    }

    #[test]
    fn round_trips_frames_split_at_every_byte() {
        let frames = vec![
            data_frame(7, b"hello"),
            Frame {
                stream_id: 0,
                body: Some(Body::Hello(Hello {
                    nonce: 42,
                    protocol_version: 1,
                })),
            },
            data_frame(9, &[0u8; 3000]),
        ];
        let mut wire = BytesMut::new();
        for f in &frames {
            encode_into(f, &mut wire).expect("encode");
        }
        // Feed the bytes one at a time: the decoder must never yield a partial frame.
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            buf.put_u8(*b);
            got.extend(decode_all(&mut codec, &mut buf));
        }
        let got: Vec<Frame> = got.into_iter().map(|r| r.expect("valid frame")).collect();
        assert_eq!(got, frames);
    }

    #[test]
    fn oversized_length_is_rejected_without_allocating_and_stream_recovers() {
        let mut buf = BytesMut::new();
        buf.put_slice(&MAGIC);
        buf.put_u32_le(u32::MAX);
        // Only a little of the announced payload ever arrives; the decoder must not
        // reserve 4 GiB for it.
        buf.put_slice(&[0xAA; 16]);
        let mut codec = FrameCodec::new();
        let items = decode_all(&mut codec, &mut buf);
        assert_eq!(
            items,
            vec![
                Err(FrameError::Oversized {
                    len: u32::MAX as usize,
                    max: MAX_FRAME_LEN
                }),
                Err(FrameError::BadMagic { skipped: 16 }),
            ]
        );
        assert!(
            buf.capacity() < 1 << 20,
            "decoder reserved {}",
            buf.capacity()
        );
    }

    #[test]
    fn decoder_resynchronises_after_an_oversized_frame() {
        let mut buf = BytesMut::new();
        let len = MAX_FRAME_LEN + 10;
        buf.put_slice(&MAGIC);
        buf.put_u32_le(len as u32);
        buf.put_slice(&vec![0x55; len]);
        encode_into(&data_frame(3, b"after"), &mut buf).expect("encode");
        let mut codec = FrameCodec::new();
        let items = decode_all(&mut codec, &mut buf);
        assert_eq!(items.len(), 3, "{items:?}");
        assert!(matches!(items[0], Err(FrameError::Oversized { .. })));
        assert_eq!(items[1], Err(FrameError::BadMagic { skipped: len }));
        assert_eq!(items[2].as_ref().ok(), Some(&data_frame(3, b"after")));
    }

    #[test]
    fn garbage_before_a_frame_is_skipped() {
        let mut buf = BytesMut::from(&b"garbage NB and more"[..]);
        encode_into(&data_frame(1, b"x"), &mut buf).expect("encode");
        let mut codec = FrameCodec::new();
        let items = decode_all(&mut codec, &mut buf);
        assert!(matches!(items[0], Err(FrameError::BadMagic { .. })));
        assert_eq!(
            items.last().and_then(|r| r.as_ref().ok()),
            Some(&data_frame(1, b"x"))
        );
    }

    #[test]
    fn malformed_payload_is_reported_and_dropped() {
        let mut buf = BytesMut::new();
        buf.put_slice(&MAGIC);
        buf.put_u32_le(3);
        buf.put_slice(&[0xFF, 0xFF, 0xFF]); // an unterminated varint key
        encode_into(&data_frame(2, b"ok"), &mut buf).expect("encode");
        let mut codec = FrameCodec::new();
        let items = decode_all(&mut codec, &mut buf);
        assert!(matches!(items[0], Err(FrameError::Malformed(_))));
        assert_eq!(items[1].as_ref().ok(), Some(&data_frame(2, b"ok")));
    }

    #[test]
    fn frame_without_body_is_an_error() {
        let mut buf = BytesMut::new();
        encode_into(
            &Frame {
                stream_id: 5,
                body: None,
            },
            &mut buf,
        )
        .expect("encode");
        let mut codec = FrameCodec::new();
        assert_eq!(
            decode_all(&mut codec, &mut buf),
            vec![Err(FrameError::Empty { stream_id: 5 })]
        );
    }

    #[test]
    fn encoder_refuses_oversized_frames() {
        let mut buf = BytesMut::new();
        let err = encode_into(&data_frame(1, &vec![0; MAX_FRAME_LEN]), &mut buf);
        assert!(matches!(err, Err(CodecError::FrameTooLarge { .. })));
        assert!(buf.is_empty());
    }

    proptest::proptest! {
        // Whatever bytes arrive, the decoder terminates, never panics and never holds
        // more than it was given plus one header.
        #[test]
        fn arbitrary_input_never_panics(input in proptest::collection::vec(proptest::num::u8::ANY, 0..4096)) {
            let mut codec = FrameCodec::new();
            let mut buf = BytesMut::from(&input[..]);
            let _ = decode_all(&mut codec, &mut buf);
            proptest::prop_assert!(buf.len() <= input.len());
        }
    }
}

/// Bytes a sender must leave in front of bulk data for [`data_frame_prefix`].
pub const DATA_PREFIX_ROOM: usize = 48;

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The wire bytes that, followed by `len` bytes of data, form the complete frame
/// `Frame { stream_id, body: Data { fd, data } }`: magic, length and the protobuf fields
/// in front of the data.
///
/// This lets a sender of bulk data read straight into a buffer behind this prefix and put
/// the frame on the wire with no copy of the data in user space, which matters in a guest
/// whose every instruction is emulated. `len` must keep the frame within [`MAX_FRAME_LEN`].
pub fn data_frame_prefix(stream_id: u64, fd: i32, len: usize) -> Vec<u8> {
    // Data { fd = 1 (varint, omitted when 0), data = 2 (bytes) }
    // proto3 leaves out fields that hold their default value, so must we.
    let fd_field = if fd != 0 {
        1 + varint_len(fd as u64)
    } else {
        0
    };
    let data_field = if len != 0 {
        1 + varint_len(len as u64) + len
    } else {
        0
    };
    let data_msg_len = fd_field + data_field;
    // Frame { stream_id = 1 (varint, omitted when 0), data = 20 (message) }
    let stream_field = if stream_id != 0 {
        1 + varint_len(stream_id)
    } else {
        0
    };
    let payload_len = stream_field + 2 + varint_len(data_msg_len as u64) + data_msg_len;

    let mut out = Vec::with_capacity(DATA_PREFIX_ROOM);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
    if stream_id != 0 {
        out.push(0x08);
        put_varint(&mut out, stream_id);
    }
    out.extend_from_slice(&[0xA2, 0x01]); // field 20, wire type 2
    put_varint(&mut out, data_msg_len as u64);
    if fd != 0 {
        out.push(0x08);
        put_varint(&mut out, fd as u64);
    }
    if len != 0 {
        out.push(0x12); // field 2, wire type 2
        put_varint(&mut out, len as u64);
    }
    out
}

#[cfg(test)]
mod prefix_tests {
    use super::*;
    use crate::pb::{frame::Body, Data};

    #[test]
    fn prefix_plus_data_equals_the_prost_encoding() {
        for stream_id in [0u64, 1, 127, 128, 300, u64::MAX] {
            for fd in [0, 1, 2] {
                for len in [0usize, 1, 127, 128, 16_383, 16_384, 32_000, 200_000] {
                    let data = vec![0xABu8; len];
                    let frame = Frame {
                        stream_id,
                        body: Some(Body::Data(Data {
                            fd,
                            data: bytes::Bytes::from(data.clone()),
                        })),
                    };
                    let mut expected = BytesMut::new();
                    encode_into(&frame, &mut expected).expect("encode");
                    let mut got = data_frame_prefix(stream_id, fd, len);
                    assert!(got.len() <= DATA_PREFIX_ROOM);
                    got.extend_from_slice(&data);
                    assert_eq!(
                        got,
                        expected.to_vec(),
                        "stream {stream_id} fd {fd} len {len}"
                    );
                }
            }
        }
    }
}
