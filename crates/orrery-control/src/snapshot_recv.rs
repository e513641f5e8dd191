//! The receiving side of chunked snapshots.
//!
//! A snapshot can be larger than any one message, so the leader sends it in chunks
//! (`network::SnapshotChunk`). This module owns the one partially received snapshot: it
//! appends chunks in order, answers an out-of-order chunk with the offset it expects (so a
//! sender resumes, or restarts from 0 after the leader built a newer snapshot), and hands
//! out the whole snapshot only when its length and CRC-32 match what the leader announced.
//! It never installs anything itself and never holds more than `max_snapshot_bytes`.

use std::sync::Mutex;

use crate::network::SnapshotChunk;
use crate::types::{SnapshotMeta, Vote};
use crate::ControlError;

/// A complete, checksum-verified snapshot.
pub(crate) struct Whole {
    pub(crate) vote: Vote,
    pub(crate) meta: SnapshotMeta,
    pub(crate) data: Vec<u8>,
}

struct Partial {
    vote: Vote,
    meta: SnapshotMeta,
    total: u64,
    crc: u32,
    buf: Vec<u8>,
}

impl Partial {
    fn same_snapshot(&self, c: &SnapshotChunk) -> bool {
        self.meta.last_log_id == c.meta.last_log_id
            && self.total == c.total
            && self.crc == c.crc
            && self.vote == c.vote
    }
}

/// What a chunk did.
pub(crate) enum Taken {
    /// More is needed: the sender continues at this offset (0: start over).
    Need(u64),
    /// The snapshot is complete and verified.
    Whole(Whole),
}

/// The snapshot being received, if any.
#[derive(Default)]
pub(crate) struct SnapshotReceiver {
    partial: Mutex<Option<Partial>>,
}

impl SnapshotReceiver {
    /// Takes one chunk.
    pub(crate) fn take(&self, c: SnapshotChunk, max: u64) -> Result<Taken, ControlError> {
        if c.total > max {
            return Err(ControlError::MalformedRpc(format!(
                "snapshot of {} bytes exceeds max_snapshot_bytes ({max})",
                c.total
            )));
        }
        let mut slot = self.partial.lock().unwrap_or_else(|p| p.into_inner());
        if c.offset == 0 {
            *slot = Some(Partial {
                vote: c.vote,
                meta: c.meta.clone(),
                total: c.total,
                crc: c.crc,
                buf: Vec::new(),
            });
        }
        let Some(p) = slot.as_mut().filter(|p| p.same_snapshot(&c)) else {
            // A chunk of a snapshot this node is not receiving: start it over.
            return Ok(Taken::Need(0));
        };
        if p.buf.len() as u64 != c.offset {
            // Out of order (e.g. a retried chunk): resume where this node is.
            return Ok(Taken::Need(p.buf.len() as u64));
        }
        if p.buf.len() as u64 + c.data.len() as u64 > p.total {
            *slot = None;
            return Err(ControlError::MalformedRpc(
                "snapshot chunk runs past the announced length".into(),
            ));
        }
        p.buf.extend_from_slice(&c.data);
        if (p.buf.len() as u64) < p.total {
            return Ok(Taken::Need(p.buf.len() as u64));
        }
        let Some(p) = slot.take() else {
            return Ok(Taken::Need(0));
        };
        let computed = crc32fast::hash(&p.buf);
        if computed != p.crc {
            return Err(ControlError::MalformedRpc(format!(
                "snapshot checksum mismatch (announced {:08x}, received {computed:08x})",
                p.crc
            )));
        }
        Ok(Taken::Whole(Whole {
            vote: p.vote,
            meta: p.meta,
            data: p.buf,
        }))
    }
}
