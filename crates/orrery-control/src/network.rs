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
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RPCTypes, RaftNetworkV2};
use serde::{Deserialize, Serialize};

use crate::types::{Snapshot, SnapshotMeta, Tc, Vote};
use crate::{NodeId, RaftTransport, TransportError};

pub(crate) const WIRE_VERSION: u8 = 1;

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
    FullSnapshot {
        vote: Vote,
        meta: SnapshotMeta,
        data: Vec<u8>,
    },
}

#[derive(Serialize, Deserialize)]
pub(crate) enum RpcResponse {
    AppendEntries(AppendEntriesResponse<Tc>),
    Vote(VoteResponse<Tc>),
    Snapshot(SnapshotResponse<Tc>),
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

/// Creates one [`NetClient`] per target.
pub(crate) struct NetFactory {
    pub(crate) self_id: NodeId,
    pub(crate) transport: Arc<dyn RaftTransport>,
    pub(crate) rpc_timeout: Duration,
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
        }
    }
}

pub(crate) struct NetClient {
    self_id: NodeId,
    target: NodeId,
    addr: String,
    transport: Arc<dyn RaftTransport>,
    rpc_timeout: Duration,
}

enum CallError {
    Unreachable(String),
    Network(String),
    Timeout(Duration),
}

impl NetClient {
    async fn call(&self, req: RpcRequest, timeout: Duration) -> Result<RpcResponse, CallError> {
        let payload = encode(req).map_err(CallError::Network)?;
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
        match self
            .call(RpcRequest::AppendEntries(rpc), self.ttl(&option))
            .await
        {
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

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<Tc>, StreamingError<Tc>> {
        let req = RpcRequest::FullSnapshot {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot,
        };
        let timeout = option.soft_ttl();
        let res = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            res = self.call(req, timeout) => res,
        };
        match res {
            Ok(RpcResponse::Snapshot(r)) => Ok(r),
            Ok(_) => Err(StreamingError::Network(self.unexpected())),
            Err(e) => Err(match self.rpc_err(e, RPCTypes::InstallSnapshot) {
                RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                RPCError::Timeout(t) => StreamingError::Timeout(t),
                RPCError::Network(n) => StreamingError::Network(n),
                RPCError::RemoteError(r) => {
                    StreamingError::Network(NetworkError::from_string(r.to_string()))
                }
            }),
        }
    }
}
