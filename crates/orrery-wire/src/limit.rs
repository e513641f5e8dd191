//! Admission of accepted connections: a cap on open connections and a cap on
//! connections still *pending* (on the cluster port: handshake in progress;
//! on the admin port: no byte of a request received yet).
//!
//! [`ConnLimiter::admit`] is called right after `accept`, before anything is
//! read, with whether the peer has already sent bytes ([`has_data`]). When
//! the pending cap is reached, or the open cap is reached while some
//! connection is still pending, a pending connection is **evicted** (its
//! [`ConnSlot::evicted`] fires and its task closes it): the oldest *silent*
//! one (no byte received yet) first, then the oldest one that has spoken.
//! An evicted silent connection whose bytes turn out to have arrived
//! meanwhile is *rescued* (kept, now as one that spoke). A flood of idle
//! sockets therefore never locks out a peer that speaks at once, as every
//! real client does. When the open cap is reached and nothing is pending,
//! the new connection is refused: the caller closes it at once. Evictions
//! still closing count against a small fixed slack ([`EVICTION_SLACK`]);
//! beyond it the accept loop yields until they have closed
//! ([`admit_yielding`]), so open sockets stay below
//! `max_open + EVICTION_SLACK`.
//!
//! Every decision is counted in the endpoint's [`WireStats`]
//! (`connections_open`, `connections_pending`, `connections_refused`,
//! `connections_evicted`). This module owns admission and the wait for a
//! connection's first bytes ([`first_bytes`]): it never consumes (only
//! peeks), writes or closes a socket itself, and never blocks a thread.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::CancellationToken;

use crate::stats::WireStats;

/// Connections evicted but not yet closed by their task that may still be
/// counted on top of `max_open`.
pub const EVICTION_SLACK: usize = 32;

/// Accept queue an endpoint asks the kernel for (capped by
/// `net.core.somaxconn`). When the queue is full the kernel drops new SYNs,
/// a legitimate client's included, which then waits a 1 s retransmit: the
/// queue must absorb a flood while the accept loop closes the excess.
pub const LISTEN_BACKLOG: i32 = 1024;

/// Widens `listener`'s accept queue to [`LISTEN_BACKLOG`] (a second
/// `listen(2)` on a listening socket only changes its backlog).
pub fn widen_backlog(listener: &tokio::net::TcpListener) -> std::io::Result<()> {
    socket2::SockRef::from(listener).listen(LISTEN_BACKLOG)
}

/// Whether the peer of a socket has sent bytes not yet read (a
/// non-blocking peek; errors count as no).
pub fn has_data(stream: &tokio::net::TcpStream) -> bool {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(socket2::SockRef::from(stream).peek(&mut buf), Ok(n) if n > 0)
}

/// How a new connection's silent phase ended.
pub enum First {
    /// Bytes are waiting to be read.
    Spoke,
    /// The peer closed first.
    Closed,
    /// The limiter evicted it.
    Evicted,
    /// Nothing came before the deadline.
    TimedOut,
}

/// Waits (until `deadline`) for a new connection's first bytes; bytes that
/// arrive win over an eviction (which they undo).
pub async fn first_bytes(
    stream: &tokio::net::TcpStream,
    slot: &ConnSlot,
    deadline: tokio::time::Instant,
) -> First {
    let mut byte = [0u8; 1];
    tokio::select! {
        biased;
        r = tokio::time::timeout_at(deadline, stream.peek(&mut byte)) => match r {
            Err(_) => First::TimedOut,
            Ok(Ok(n)) if n > 0 => First::Spoke,
            Ok(_) => First::Closed,
        },
        _ = slot.evicted(|| has_data(stream)) => First::Evicted,
    }
}

/// The two caps of one accepting endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections open at once, pending ones included (at least 1).
    pub max_open: usize,
    /// Connections pending at once (at least 1, at most `max_open`).
    pub max_pending: usize,
}

/// What [`ConnLimiter::admit`] decided.
#[derive(Debug)]
pub enum Admission {
    /// Serve it; drop the slot when the connection closes.
    Admitted(ConnSlot),
    /// Close it now: the open cap is reached and nothing can be evicted.
    Refused,
    /// A connection must be evicted but [`EVICTION_SLACK`] evictions are
    /// still closing: yield (let their tasks run) and ask again; see
    /// [`admit_yielding`].
    Wait,
}

/// [`ConnLimiter::admit`], yielding to the runtime while evictions are still
/// closing (at most 64 times, then the connection is refused).
pub async fn admit_yielding(limiter: &Arc<ConnLimiter>, heard: bool) -> Option<ConnSlot> {
    for _ in 0..64 {
        match limiter.admit(heard) {
            Admission::Admitted(slot) => return Some(slot),
            Admission::Refused => return None,
            Admission::Wait => tokio::task::yield_now().await,
        }
    }
    WireStats::bump(&limiter.stats.connections_refused);
    None
}

/// Eviction order of pending connections: silent ones first, then by age.
const SILENT: u8 = 0;
const HEARD: u8 = 1;

/// One open connection, as the limiter tracks it.
#[derive(Debug)]
struct Entry {
    /// Cancelled when it is evicted (replaced when it is rescued).
    evict: CancellationToken,
    /// Its key in `pending`, while pending.
    pending: Option<(u8, u64)>,
}

#[derive(Debug, Default)]
struct Slots {
    /// Evicted, not yet dropped (nor rescued).
    evicting: usize,
    /// Pending connections by (SILENT/HEARD, admission order): the first is
    /// the next to evict.
    pending: BTreeSet<(u8, u64)>,
    /// Every open connection by id.
    open: std::collections::BTreeMap<u64, Entry>,
    next_id: u64,
}

impl Slots {
    fn needs_room(&self, l: ConnLimits) -> bool {
        self.open.len() - self.evicting >= l.max_open || self.pending.len() >= l.max_pending
    }

    fn set_pending(&mut self, id: u64, key: Option<(u8, u64)>) {
        if let Some(e) = self.open.get_mut(&id) {
            if let Some(old) = e.pending.take() {
                self.pending.remove(&old);
            }
            if let Some(k) = key {
                self.pending.insert(k);
                e.pending = Some(k);
            }
        }
    }
}

/// Admission state of one endpoint; share it as `Arc<ConnLimiter>`.
#[derive(Debug)]
pub struct ConnLimiter {
    limits: ConnLimits,
    stats: Arc<WireStats>,
    slots: Mutex<Slots>,
}

impl ConnLimiter {
    /// A limiter counting into `stats`. Caps are raised to at least 1 and
    /// `max_pending` is lowered to `max_open`.
    pub fn new(limits: ConnLimits, stats: Arc<WireStats>) -> Arc<Self> {
        let max_open = limits.max_open.max(1);
        let limits = ConnLimits {
            max_open,
            max_pending: limits.max_pending.clamp(1, max_open),
        };
        Arc::new(ConnLimiter {
            limits,
            stats,
            slots: Mutex::new(Slots::default()),
        })
    }

    /// The caps in force.
    pub fn limits(&self) -> ConnLimits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides on a connection just accepted whose peer has (`heard`) or
    /// has not yet sent bytes; see the module docs.
    pub fn admit(self: &Arc<Self>, heard: bool) -> Admission {
        let mut s = self.lock();
        while s.needs_room(self.limits) {
            let Some(victim) = s.pending.first().copied() else {
                WireStats::bump(&self.stats.connections_refused);
                return Admission::Refused;
            };
            if s.evicting >= EVICTION_SLACK {
                return Admission::Wait;
            }
            s.set_pending(victim.1, None);
            if let Some(e) = s.open.get(&victim.1) {
                e.evict.cancel();
            }
            s.evicting += 1;
            WireStats::bump(&self.stats.connections_evicted);
        }
        s.next_id += 1;
        let id = s.next_id;
        let evict = CancellationToken::new();
        s.open.insert(
            id,
            Entry {
                evict: evict.clone(),
                pending: None,
            },
        );
        s.set_pending(id, Some((if heard { HEARD } else { SILENT }, id)));
        self.publish(&s);
        Admission::Admitted(ConnSlot {
            limiter: self.clone(),
            id,
        })
    }

    fn publish(&self, s: &Slots) {
        let st = &self.stats;
        st.connections_open
            .store(s.open.len() as u64, Ordering::Relaxed);
        st.connections_pending
            .store(s.pending.len() as u64, Ordering::Relaxed);
    }

    /// (open, pending) right now.
    pub fn counts(&self) -> (usize, usize) {
        let s = self.lock();
        (s.open.len(), s.pending.len())
    }
}

/// One admitted connection's place; dropping it frees the place.
#[derive(Debug)]
pub struct ConnSlot {
    limiter: Arc<ConnLimiter>,
    id: u64,
}

impl ConnSlot {
    fn token(&self) -> Option<CancellationToken> {
        let s = self.limiter.lock();
        s.open.get(&self.id).map(|e| e.evict.clone())
    }

    /// The connection is past its pending phase: it can no longer be
    /// evicted (an eviction not yet acted on is undone). Idempotent.
    pub fn established(&self) {
        self.settle(None);
    }

    /// The peer has sent its first bytes: it is evicted only after every
    /// silent connection (an eviction not yet acted on is undone). No-op
    /// once established.
    pub fn heard(&self) {
        let s = self.limiter.lock();
        let Some(e) = s.open.get(&self.id) else {
            return;
        };
        let silent = e.pending.is_some_and(|k| k.0 == SILENT);
        let evicted = e.evict.is_cancelled();
        drop(s);
        if silent || evicted {
            self.settle(Some((HEARD, self.id)));
        }
    }

    /// Undoes an eviction not yet acted on, and sets the pending key.
    fn settle(&self, key: Option<(u8, u64)>) {
        let mut s = self.limiter.lock();
        let Some(e) = s.open.get_mut(&self.id) else {
            return;
        };
        if e.evict.is_cancelled() {
            e.evict = CancellationToken::new();
            s.evicting -= 1;
        }
        s.set_pending(self.id, key);
        self.limiter.publish(&s);
    }

    /// Resolves when the limiter evicts this connection; the connection's
    /// task must then close it. When `has_data` says bytes arrived after
    /// all, the eviction is undone (the connection stays, as one that
    /// spoke) and this keeps waiting.
    pub async fn evicted(&self, has_data: impl Fn() -> bool) {
        loop {
            let Some(token) = self.token() else { return };
            token.cancelled().await;
            if !has_data() {
                return;
            }
            self.heard();
        }
    }

    /// Has it been evicted (and not rescued)?
    pub fn is_evicted(&self) -> bool {
        self.token().is_some_and(|t| t.is_cancelled())
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut s = self.limiter.lock();
        s.set_pending(self.id, None);
        if let Some(e) = s.open.remove(&self.id) {
            if e.evict.is_cancelled() {
                s.evicting -= 1;
            }
        }
        self.limiter.publish(&s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(max_open: usize, max_pending: usize) -> Arc<ConnLimiter> {
        ConnLimiter::new(
            ConnLimits {
                max_open,
                max_pending,
            },
            Arc::new(WireStats::new()),
        )
    }

    fn admitted(a: Admission) -> ConnSlot {
        match a {
            Admission::Admitted(s) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_oldest_pending_connection_makes_room() {
        let l = limiter(10, 2);
        let a = admitted(l.admit(false));
        let b = admitted(l.admit(false));
        let c = admitted(l.admit(false));
        assert!(a.is_evicted() && !b.is_evicted() && !c.is_evicted());
        assert_eq!(l.counts(), (3, 2));
        drop(a);
        assert_eq!(l.counts(), (2, 2));
        b.established();
        b.established();
        assert_eq!(l.counts(), (2, 1));
        let st = l.stats.snapshot();
        assert_eq!((st.connections_evicted, st.connections_refused), (1, 0));
        assert_eq!((st.connections_open, st.connections_pending), (2, 1));
    }

    #[test]
    fn silent_connections_are_evicted_before_those_that_spoke() {
        let l = limiter(10, 3);
        let spoke = admitted(l.admit(true));
        let late = admitted(l.admit(false));
        let silent = admitted(l.admit(false));
        late.heard();
        // Full: the newcomer evicts the silent one, then the older speakers.
        let _n1 = admitted(l.admit(false));
        assert!(silent.is_evicted() && !spoke.is_evicted() && !late.is_evicted());
        let _n2 = admitted(l.admit(true));
        assert!(_n1.is_evicted() && !spoke.is_evicted());
        let _n3 = admitted(l.admit(true));
        assert!(spoke.is_evicted() && !late.is_evicted());
    }

    #[tokio::test]
    async fn an_evicted_connection_whose_bytes_arrived_is_rescued() {
        let l = limiter(10, 2);
        let a = admitted(l.admit(false));
        let b = admitted(l.admit(false));
        let c = admitted(l.admit(false));
        assert!(a.is_evicted());
        // `a`'s request was there after all: it stays, as one that spoke.
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(50), a.evicted(|| true));
        assert!(waiting.await.is_err(), "rescued, so it keeps waiting");
        assert!(!a.is_evicted());
        assert_eq!(l.counts(), (3, 3));
        // The silent ones make room first.
        let _d = admitted(l.admit(false));
        assert!(b.is_evicted() && c.is_evicted() && !a.is_evicted());
        b.evicted(|| false).await;
        assert_eq!(l.stats.snapshot().connections_evicted, 3);
    }

    #[test]
    fn established_connections_are_never_evicted_and_the_excess_is_refused() {
        let l = limiter(3, 3);
        let held: Vec<ConnSlot> = (0..3).map(|_| admitted(l.admit(false))).collect();
        for s in &held {
            s.established();
        }
        for _ in 0..5 {
            assert!(matches!(l.admit(false), Admission::Refused));
        }
        assert!(held.iter().all(|s| !s.is_evicted()));
        assert_eq!(l.stats.snapshot().connections_refused, 5);
        drop(held);
        assert_eq!(l.counts(), (0, 0));
        let _again = admitted(l.admit(false));
    }

    #[test]
    fn a_full_endpoint_evicts_a_pending_connection_and_stays_within_the_slack() {
        let l = limiter(4, 4);
        let est: Vec<ConnSlot> = (0..3).map(|_| admitted(l.admit(false))).collect();
        for s in &est {
            s.established();
        }
        // One pending place left: every newcomer evicts the previous one,
        // but evicted slots still open count against the slack.
        let mut kept = vec![admitted(l.admit(false))];
        let mut waits = 0;
        for _ in 0..(EVICTION_SLACK + 10) {
            match l.admit(false) {
                Admission::Admitted(s) => kept.push(s),
                Admission::Wait => waits += 1,
                Admission::Refused => panic!("a pending connection could make room"),
            }
        }
        let (open, pending) = l.counts();
        assert_eq!(open, 4 + EVICTION_SLACK, "{open}");
        assert_eq!((pending, waits), (1, 10));
        assert_eq!(l.stats.snapshot().connections_refused, 0);
        // The evicted ones close: room again.
        kept.retain(|s| !s.is_evicted());
        assert_eq!(l.counts(), (4, 1));
        assert!(matches!(l.admit(false), Admission::Admitted(_)));
        drop(kept);
        assert_eq!(l.counts(), (3, 0));
    }
}
