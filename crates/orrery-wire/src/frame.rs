//! Framing and payload encoding.
//!
//! Every message on an orrery connection is one frame: a 4-byte big-endian length
//! followed by that many bytes of postcard-encoded payload
//! ([`tokio_util::codec::LengthDelimitedCodec`]). Before the handshake completes the
//! maximum frame is [`HANDSHAKE_MAX_FRAME_BYTES`]; afterwards it is
//! `WireConfig::max_frame_bytes`. A length prefix above the maximum is rejected from
//! the 4 header bytes alone, before anything is allocated for the payload.
//!
//! After the handshake every frame is an [`Envelope`].

use bytes::{Bytes, BytesMut};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec, LengthDelimitedCodecError};

/// Largest frame accepted before the handshake has completed (4 KiB).
pub const HANDSHAKE_MAX_FRAME_BYTES: usize = 4 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announced more than the allowed maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Announced (or attempted) payload length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// Payload bytes did not decode as the expected message type.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// Underlying transport error.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Length-delimited codec (4-byte big-endian prefix) that reports oversized frames
/// as [`FrameError::TooLarge`] with the announced length.
#[derive(Debug)]
pub struct WireCodec {
    inner: LengthDelimitedCodec,
    max: usize,
}

impl WireCodec {
    /// A codec accepting payloads up to `max` bytes.
    pub fn new(max: usize) -> Self {
        let inner = LengthDelimitedCodec::builder()
            .length_field_length(4)
            .big_endian()
            .max_frame_length(max)
            .new_codec();
        WireCodec { inner, max }
    }

    /// Change the maximum payload size (used when the handshake completes).
    pub fn set_max_frame_bytes(&mut self, max: usize) {
        self.max = max;
        self.inner.set_max_frame_length(max);
    }

    /// The maximum payload size in force.
    pub fn max_frame_bytes(&self) -> usize {
        self.max
    }
}

impl Decoder for WireCodec {
    type Item = BytesMut;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        match self.inner.decode(src) {
            Ok(frame) => Ok(frame),
            Err(e) => {
                let too_big = e
                    .get_ref()
                    .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>());
                if too_big {
                    // LengthDelimitedCodec checks the limit before consuming the
                    // header, so the 4 length bytes are still at the front.
                    let len = src
                        .get(..4)
                        .map(|h| u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize)
                        .unwrap_or(usize::MAX);
                    Err(FrameError::TooLarge { len, max: self.max })
                } else {
                    Err(FrameError::Io(e))
                }
            }
        }
    }
}

impl Encoder<Bytes> for WireCodec {
    type Error = FrameError;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), FrameError> {
        if item.len() > self.max {
            return Err(FrameError::TooLarge {
                len: item.len(),
                max: self.max,
            });
        }
        self.inner.encode(item, dst).map_err(FrameError::Io)
    }
}

/// An error reported by the remote side for one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RemoteError {
    /// The server's per-connection in-flight bound was reached; the request was not run.
    #[error("remote is overloaded")]
    Overloaded,
    /// The server-side deadline (`timeout_ms`) expired; the handler was cancelled.
    #[error("remote handler timed out")]
    Timeout,
    /// The handler failed (e.g. panicked); the string is for humans.
    #[error("remote handler failed: {0}")]
    Handler(String),
    /// The encoded response exceeded the frame limit.
    #[error("response of {len} bytes exceeds the frame limit of {max} bytes")]
    ResponseTooLarge {
        /// Encoded response size.
        len: u64,
        /// Frame limit.
        max: u64,
    },
    /// The server is shutting down.
    #[error("remote is shutting down")]
    ShuttingDown,
}

/// The post-handshake frame payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Envelope<Req, Resp> {
    /// Client -> server: run `body`; `timeout_ms` is the client's deadline (0 = none).
    Request {
        /// Request id, unique per connection while in flight.
        id: u64,
        /// Server-side deadline in milliseconds; 0 means none.
        timeout_ms: u32,
        /// The request.
        body: Req,
    },
    /// Server -> client: the handler's answer to request `id`.
    Response {
        /// Request id being answered.
        id: u64,
        /// The response.
        body: Resp,
    },
    /// Server -> client: request `id` was not answered by the handler.
    Failure {
        /// Request id being answered.
        id: u64,
        /// Why.
        error: RemoteError,
    },
    /// Client -> server: the caller of request `id` gave up; drop its
    /// handler (cancellation propagates to whatever it was waiting on).
    Cancel {
        /// Request id to cancel.
        id: u64,
    },
}

/// Encode a message with postcard.
pub fn encode<T: Serialize>(msg: &T) -> Result<Bytes, FrameError> {
    postcard::to_stdvec(msg)
        .map(Bytes::from)
        .map_err(|e| FrameError::Malformed(format!("encode: {e}")))
}

/// Decode a whole frame payload with postcard; trailing bytes are an error.
/// Never panics, whatever the input.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    match postcard::take_from_bytes::<T>(bytes) {
        Ok((msg, [])) => Ok(msg),
        Ok((_, rest)) => Err(FrameError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        ))),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
    }
}

/// The single writer of a connection: drains the bounded outgoing queue into the
/// sink, batching whatever is already queued before each flush.
///
/// Before it flushes it yields once to the scheduler, so that tasks already
/// runnable (request handlers about to answer, callers about to send) queue
/// their frames first and share this write: one syscall, one TCP segment and,
/// under TLS, one record for many frames. On loopback the kernel's per-write
/// cost dominates a small call (three quarters of the CPU in a profile of the
/// 64-byte benchmark), so this is where small-frame throughput is won. The
/// cost is one trip through the run queue per flush, microseconds when the
/// runtime is idle.
pub(crate) async fn writer_loop<S>(
    mut sink: futures::stream::SplitSink<tokio_util::codec::Framed<S, WireCodec>, Bytes>,
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> Result<(), FrameError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures::SinkExt;
    while let Some(frame) = rx.recv().await {
        sink.feed(frame).await?;
        feed_queued(&mut sink, &mut rx).await?;
        tokio::task::yield_now().await;
        feed_queued(&mut sink, &mut rx).await?;
        sink.flush().await?;
    }
    Ok(())
}

/// Feed every frame already in the queue, without waiting for more. Bounded
/// by the queue's capacity plus what arrives meanwhile; `feed` flushes by
/// itself once the sink's buffer passes its high-water mark.
async fn feed_queued<S>(
    sink: &mut futures::stream::SplitSink<tokio_util::codec::Framed<S, WireCodec>, Bytes>,
    rx: &mut tokio::sync::mpsc::Receiver<Bytes>,
) -> Result<(), FrameError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures::SinkExt;
    while let Ok(frame) = rx.try_recv() {
        sink.feed(frame).await?;
    }
    Ok(())
}
