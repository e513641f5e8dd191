//! The openraft network, carried over the application's [`RaftTransport`] as opaque bytes.
//!
//! Wire format: `postcard(Envelope)`; the envelope carries a version byte so incompatible
//! peers fail loudly instead of misparsing.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::errors::{
    NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, EntryPayload, RPCTypes, RaftNetworkV2};
use serde::{Deserialize, Serialize};

use crate::config::MESSAGE_OVERHEAD;
use crate::types::{Entry, LogId, Snapshot, SnapshotMeta, Tc, Vote};
use crate::{NodeId, RaftTransport, TransportError};

/// Version 2: snapshots travel in chunks (`SnapshotChunk`) instead of one message.
pub(crate) const WIRE_VERSION: u8 = 2;

#[derive(Serialize, Deserialize)]
pub(crate) struct Envelope<T> {
    pub(crate) version: u8,
    pub(crate) body: T,
}

#[derive(Serialize, Deserialize)]
pub(crate) enum RpcRequest {
    AppendEntries(AppendEntriesRequest<Tc>),
    Vote(VoteRequest<Tc>),
    PreVote(VoteRequest<Tc>),
    SnapshotChunk(SnapshotChunk),
    /// From a repaired voter to the leader: its log was reset on purpose; replicate to it
    /// from the beginning instead of treating the reversion as a bug.
    AllowRevert {
        node: NodeId,
    },
    /// The leader hands leadership over (`ControlPlane::transfer_leader`): the named
    /// voter campaigns at once, the others stop waiting on the old leader's lease.
    TransferLeader(TransferLeaderRequest<Tc>),
}

/// One piece of a snapshot. The receiver appends chunks in order and installs the snapshot
/// when it holds `total` bytes whose CRC-32 is `crc`; an out-of-order chunk is answered with
/// the offset it expects, so a sender resumes (or restarts from 0) instead of failing.
#[derive(Serialize, Deserialize)]
pub(crate) struct SnapshotChunk {
    pub(crate) vote: Vote,
    pub(crate) meta: SnapshotMeta,
    pub(crate) total: u64,
    pub(crate) crc: u32,
    pub(crate) offset: u64,
    pub(crate) data: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
pub(crate) enum RpcResponse {
    AppendEntries(AppendEntriesResponse<Tc>),
    Vote(VoteResponse<Tc>),
    Snapshot(SnapshotResponse<Tc>),
    /// A chunk was taken (or refused as out of order); send the chunk at `next_offset`.
    ChunkAccepted {
        next_offset: u64,
    },
    /// The leader (whose vote this is) will replicate to the repaired voter from scratch.
    RevertAllowed {
        vote: Vote,
    },
    TransferLeader(TransferLeaderResponse<Tc>),
}

pub(crate) fn encode<T: Serialize>(body: T) -> Result<Vec<u8>, String> {
    postcard::to_stdvec(&Envelope {
        version: WIRE_VERSION,
        body,
    })
    .map_err(|e| e.to_string())
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let env: Envelope<T> = postcard::from_bytes(bytes).map_err(|e| e.to_string())?;
    if env.version != WIRE_VERSION {
        return Err(format!(
            "wire version {} (expected {WIRE_VERSION})",
            env.version
        ));
    }
    Ok(env.body)
}

/// The last replication failure towards each voter, kept until a later call to it succeeds,
/// so a leader that cannot replicate can say why ([`crate::ControlPlane::replication_trouble`]).
#[derive(Default)]
pub(crate) struct ReplicationTrouble {
    failing: std::sync::Mutex<std::collections::BTreeMap<NodeId, (tokio::time::Instant, String)>>,
}

impl ReplicationTrouble {
    pub(crate) fn record(&self, target: NodeId, why: String) {
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        let since = failing
            .get(&target)
            .map(|(t, _)| *t)
            .unwrap_or_else(tokio::time::Instant::now);
        failing.insert(target, (since, why));
    }

    fn note<T>(&self, target: NodeId, res: &Result<T, CallError>) {
        match res {
            Ok(_) => {
                let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
                failing.remove(&target);
            }
            Err(CallError::Network(m) | CallError::Unreachable(m)) => {
                self.record(target, m.clone())
            }
            Err(CallError::Timeout(t)) => self.record(target, format!("timed out after {t:?}")),
        }
    }

    /// Voters whose replication is failing: (failing since, last error).
    pub(crate) fn snapshot(
        &self,
    ) -> std::collections::BTreeMap<NodeId, (tokio::time::Instant, String)> {
        self.failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Creates one [`NetClient`] per target.
pub(crate) struct NetFactory {
    pub(crate) self_id: NodeId,
    pub(crate) transport: Arc<dyn RaftTransport>,
    pub(crate) rpc_timeout: Duration,
    pub(crate) max_message_bytes: usize,
    pub(crate) snapshot_chunk_bytes: usize,
    pub(crate) trouble: Arc<ReplicationTrouble>,
}

impl RaftNetworkFactory<Tc> for NetFactory {
    type Network = NetClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> NetClient {
        NetClient {
            self_id: self.self_id,
            target,
            addr: node.addr.clone(),
            transport: self.transport.clone(),
            rpc_timeout: self.rpc_timeout,
            max_message_bytes: self.max_message_bytes,
            snapshot_chunk_bytes: self.snapshot_chunk_bytes,
            trouble: self.trouble.clone(),
        }
    }
}

pub(crate) struct NetClient {
    self_id: NodeId,
    target: NodeId,
    addr: String,
    transport: Arc<dyn RaftTransport>,
    rpc_timeout: Duration,
    max_message_bytes: usize,
    snapshot_chunk_bytes: usize,
    trouble: Arc<ReplicationTrouble>,
}

enum CallError {
    Unreachable(String),
    Network(String),
    Timeout(Duration),
}

impl NetClient {
    async fn call(&self, req: RpcRequest, timeout: Duration) -> Result<RpcResponse, CallError> {
        let payload = encode(req).map_err(CallError::Network)?;
        self.call_encoded(payload, timeout).await
    }

    async fn call_encoded(
        &self,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<RpcResponse, CallError> {
        let fut = self
            .transport
            .call(self.target, self.addr.clone(), payload, timeout);
        // Safety net in case the transport does not honour the timeout itself.
        let bytes = match tokio::time::timeout(timeout, fut).await {
            Err(_) | Ok(Err(TransportError::Timeout)) => return Err(CallError::Timeout(timeout)),
            Ok(Err(TransportError::Unreachable(m))) => return Err(CallError::Unreachable(m)),
            Ok(Err(TransportError::Remote(m))) => return Err(CallError::Network(m)),
            Ok(Ok(b)) => b,
        };
        decode(&bytes)
            .map_err(|e| CallError::Network(format!("bad response from node {}: {e}", self.target)))
    }

    fn rpc_err(&self, e: CallError, action: RPCTypes) -> RPCError<Tc> {
        match e {
            CallError::Unreachable(m) => RPCError::Unreachable(Unreachable::from_string(m)),
            CallError::Network(m) => RPCError::Network(NetworkError::from_string(m)),
            CallError::Timeout(timeout) => RPCError::Timeout(Timeout {
                action,
                id: self.self_id,
                target: self.target,
                timeout,
            }),
        }
    }

    fn unexpected(&self) -> NetworkError<Tc> {
        NetworkError::from_string(format!(
            "unexpected response kind from node {}",
            self.target
        ))
    }

    fn ttl(&self, option: &RPCOption) -> Duration {
        option.soft_ttl().min(self.rpc_timeout)
    }
}

impl RaftNetworkV2<Tc> for NetClient {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<Tc>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<Tc>, RPCError<Tc>> {
        let (payload, sent_last) = match self.bounded_append(rpc) {
            Ok(x) => x,
            Err(m) => {
                self.trouble.record(self.target, m.clone());
                return Err(RPCError::Network(NetworkError::from_string(m)));
            }
        };
        let res = self.call_encoded(payload, self.ttl(&option)).await;
        self.trouble.note(self.target, &res);
        match res {
            // Only a prefix was sent: tell openraft how far the follower now matches.
            Ok(RpcResponse::AppendEntries(AppendEntriesResponse::Success))
                if sent_last.is_some() =>
            {
                Ok(AppendEntriesResponse::PartialSuccess(sent_last))
            }
            Ok(RpcResponse::AppendEntries(r)) => Ok(r),
            Ok(_) => Err(RPCError::Network(self.unexpected())),
            Err(e) => Err(self.rpc_err(e, RPCTypes::AppendEntries)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<Tc>,
        option: RPCOption,
    ) -> Result<VoteResponse<Tc>, RPCError<Tc>> {
        match self.call(RpcRequest::Vote(rpc), self.ttl(&option)).await {
            Ok(RpcResponse::Vote(r)) => Ok(r),
            Ok(_) => Err(RPCError::Network(self.unexpected())),
            Err(e) => Err(self.rpc_err(e, RPCTypes::Vote)),
        }
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<Tc>,
        option: RPCOption,
    ) -> Result<VoteResponse<Tc>, RPCError<Tc>> {
        match self.call(RpcRequest::PreVote(rpc), self.ttl(&option)).await {
            Ok(RpcResponse::Vote(r)) => Ok(r),
            Ok(_) => Err(RPCError::Network(self.unexpected())),
            Err(e) => Err(self.rpc_err(e, RPCTypes::Vote)),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<Tc>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<Tc>, RPCError<Tc>> {
        let req = RpcRequest::TransferLeader(req);
        match self.call(req, self.ttl(&option)).await {
            Ok(RpcResponse::TransferLeader(r)) => Ok(r),
            Ok(_) => Err(RPCError::Network(self.unexpected())),
            Err(e) => Err(self.rpc_err(e, RPCTypes::TransferLeader)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<Tc>, StreamingError<Tc>> {
        let deadline = tokio::time::Instant::now() + option.soft_ttl();
        let send = self.send_chunks(vote, snapshot, deadline);
        let res = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            res = send => res,
        };
        if let Err(CallError::Network(m) | CallError::Unreachable(m)) = &res {
            self.trouble.record(self.target, format!("snapshot: {m}"));
        }
        res.map_err(|e| match self.rpc_err(e, RPCTypes::InstallSnapshot) {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            RPCError::Timeout(t) => StreamingError::Timeout(t),
            RPCError::Network(n) => StreamingError::Network(n),
            RPCError::RemoteError(r) => {
                StreamingError::Network(NetworkError::from_string(r.to_string()))
            }
        })
    }
}

/// An upper bound on the encoded size of one log entry (log id, tags, lengths, payload).
fn entry_size_bound(e: &Entry) -> usize {
    let payload = match &e.payload {
        EntryPayload::Blank => 0,
        EntryPayload::Normal(cmd) => cmd.0.len(),
        EntryPayload::Membership(_) => MESSAGE_OVERHEAD,
    };
    payload + 64
}

impl NetClient {
    /// Encodes an AppendEntries request that fits in `max_message_bytes`: if all entries do
    /// not fit, the longest prefix that does is sent and the last sent log id is returned
    /// (openraft then sends the rest). Fails only if a single entry is over the limit, which
    /// `max_proposal_bytes` prevents for every command written through `write`.
    fn bounded_append(
        &self,
        mut rpc: AppendEntriesRequest<Tc>,
    ) -> Result<(Vec<u8>, Option<LogId>), String> {
        let limit = self.max_message_bytes;
        let bound: usize = rpc.entries.iter().map(entry_size_bound).sum();
        if bound.saturating_add(MESSAGE_OVERHEAD) <= limit {
            return Ok((encode(RpcRequest::AppendEntries(rpc))?, None));
        }
        let mut cut = false;
        loop {
            let bytes = encode(RpcRequest::AppendEntries(rpc.clone()))?;
            if bytes.len() <= limit {
                let last = cut.then(|| rpc.entries.last().map(|e| e.log_id)).flatten();
                return Ok((bytes, last));
            }
            if rpc.entries.len() <= 1 {
                let index = rpc.entries.first().map(|e| e.log_id.index());
                return Err(format!(
                    "replication to node {} failing: entry {index:?} needs a message of {} bytes, over the limit of {limit}",
                    self.target,
                    bytes.len()
                ));
            }
            let keep = rpc.entries.len() / 2;
            rpc.entries.truncate(keep);
            cut = true;
        }
    }

    /// Sends `snapshot` in chunks of `snapshot_chunk_bytes`, resuming at whatever offset
    /// the receiver asks for, until it answers with the install result or `deadline` passes.
    async fn send_chunks(
        &self,
        vote: Vote,
        snapshot: Snapshot,
        deadline: tokio::time::Instant,
    ) -> Result<SnapshotResponse<Tc>, CallError> {
        let data = snapshot.snapshot;
        let total = data.len() as u64;
        let crc = crc32fast::hash(&data);
        let mut offset = 0u64;
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(CallError::Timeout(self.rpc_timeout));
            }
            let start = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .min(data.len());
            let end = start
                .saturating_add(self.snapshot_chunk_bytes)
                .min(data.len());
            let chunk = SnapshotChunk {
                vote,
                meta: snapshot.meta.clone(),
                total,
                crc,
                offset: start as u64,
                data: data[start..end].to_vec(),
            };
            let payload = encode(RpcRequest::SnapshotChunk(chunk)).map_err(CallError::Network)?;
            match self.call_encoded(payload, deadline - now).await? {
                RpcResponse::Snapshot(r) => return Ok(r),
                RpcResponse::ChunkAccepted { next_offset } if next_offset <= total => {
                    offset = next_offset;
                }
                _ => return Err(CallError::Network(self.unexpected().to_string())),
            }
        }
    }
}
