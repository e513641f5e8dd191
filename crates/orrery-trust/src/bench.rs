//! Handshake cost, for the binary's `bench` (issue 10's "handshake p50/p99"). Not a test:
//! a number printed from a test proves nothing and slows CI.

use crate::ca::ClusterCa;
use crate::config::{HandshakeError, TrustConfig};
use crate::error::TrustError;
use crate::revocation::Revocations;
use orrery_core::Role;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Result of [`bench_handshakes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeCost {
    /// Handshakes measured.
    pub n: usize,
    /// Median full mutual handshake (both sides, in memory).
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
}

/// Why the benchmark could not run.
#[derive(Debug, Error)]
pub enum BenchError {
    /// Making the CA or the configurations failed.
    #[error(transparent)]
    Setup(#[from] TrustError),
    /// A handshake failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
}

/// Runs `n` (at least 1) full mutual TLS 1.3 handshakes between two nodes of a fresh CA
/// over an in-memory pipe, one after the other, on the caller's runtime, and returns the
/// median and 99th percentile: the CPU cost of a handshake, no network in it.
// Measuring is the one thing this needs the clock for; nothing decides on it.
#[allow(clippy::disallowed_methods)]
pub async fn bench_handshakes(n: usize) -> Result<HandshakeCost, BenchError> {
    let n = n.max(1);
    let mut ca = ClusterCa::init("bench")?;
    let a = TrustConfig::new(&ca.issue_next(1, Role::Voter)?, Revocations::default())?;
    let b = TrustConfig::new(&ca.issue_next(2, Role::Voter)?, Revocations::default())?;
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let start = Instant::now();
        let (client, server) = tokio::join!(a.connect(c, 2), b.accept(s));
        client?;
        server?;
        times.push(start.elapsed());
    }
    times.sort_unstable();
    let at = |q: usize| times[((times.len() - 1) * q) / 100];
    Ok(HandshakeCost {
        n,
        p50: at(50),
        p99: at(99),
    })
}
