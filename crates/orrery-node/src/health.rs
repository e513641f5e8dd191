//! A node's self-diagnosis: is *this* node fit to take part in the cluster?
//!
//! The post-mortem behind this module (`../shared/seeds/003_*`): a node with
//! bad memory read every healthy peer's health response as invalid and voted
//! them out, because the machinery it diagnosed itself with was the broken
//! part. So the node checks itself against several independent references,
//! each of which a single fault is unlikely to corrupt in the same way:
//!
//! - [`CheckKind::ConstantTables`]: a 64 KiB deterministic table built at
//!   start, re-hashed slice by slice (the whole table about once a second)
//!   against the slice digests taken at start and a hard-coded root digest.
//! - [`CheckKind::KnownAnswer`]: SHA-256 and integer arithmetic against
//!   hard-coded answers.
//! - [`CheckKind::HealthVerification`]: the node verifies its own proof, a
//!   hard-coded known-good proof, and rejects a forged one, using the same
//!   [`HealthHandle::verify_peer_response`] it applies to peers. A node that
//!   would misread peers misreads these too, and so catches itself.
//! - [`CheckKind::EventLoopLag`]: how late the monitor's timer fires and how
//!   long a ready task waits to be polled, on the runtime it was started on.
//! - [`CheckKind::ClockSanity`]: the monotonic clock never goes back, and it
//!   does not diverge from the injected wall clock.
//!
//! The result is a [`HealthState`]: `Healthy`, `Impaired` (a non-fatal check
//! failed; healthy again after `recover_after_ms` of clean checks) or
//! `FailStop` (a check listed in `fatal_checks` failed; sticky: the node
//! must stop acting on the cluster and wait for a human).
//!
//! What this module owns: running the checks, the state above, and the
//! health proof a node gives a probing peer. What it must never do: block
//! the runtime (each tick costs one 8 KiB hash and a few comparisons; the
//! only blocking is the injected `event_loop_lag_ms` fault), panic, or
//! decide cluster membership — it only reports. Whether to vote, to refuse
//! to judge peers, or to leave is for the caller, which should consult
//! [`HealthHandle::is_healthy`] before acting on any peer verification.

use orrery_wire::CancellationToken;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::{Instant, MissedTickBehavior};

/// `[health]` in the node's TOML.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// How often the checks run, in ms. Default 100. Must be 1..=60000.
    pub check_interval_ms: u64,
    /// Event-loop lag above which a sample counts as lagging, in ms.
    /// Default 250. Must be at least 1.
    pub lag_threshold_ms: u64,
    /// Consecutive lagging samples before the node is impaired. Default 3.
    /// Must be at least 1.
    pub lag_window: u32,
    /// Checks whose failure makes the node fail-stop. Default
    /// `["constant_tables", "known_answer", "health_verification"]`.
    pub fatal_checks: Vec<CheckKind>,
    /// An impaired (not fail-stopped) node is healthy again after this long
    /// with every check passing, in ms. Default 2000.
    pub recover_after_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            check_interval_ms: 100,
            lag_threshold_ms: 250,
            lag_window: 3,
            fatal_checks: vec![
                CheckKind::ConstantTables,
                CheckKind::KnownAnswer,
                CheckKind::HealthVerification,
            ],
            recover_after_ms: 2000,
        }
    }
}

impl HealthConfig {
    /// Refuses values the monitor cannot run with, naming the key.
    /// [`start`] clamps such values instead of failing.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_INTERVAL_MS).contains(&self.check_interval_ms) {
            return Err(format!(
                "health.check_interval_ms must be 1..={MAX_INTERVAL_MS}, got {}",
                self.check_interval_ms
            ));
        }
        if self.lag_threshold_ms == 0 {
            return Err("health.lag_threshold_ms must be at least 1".into());
        }
        if self.lag_window == 0 {
            return Err("health.lag_window must be at least 1".into());
        }
        Ok(())
    }

    fn normalized(mut self) -> Self {
        self.check_interval_ms = self.check_interval_ms.clamp(1, MAX_INTERVAL_MS);
        self.lag_threshold_ms = self.lag_threshold_ms.max(1);
        self.lag_window = self.lag_window.max(1);
        self
    }

    fn is_fatal(&self, kind: CheckKind) -> bool {
        self.fatal_checks.contains(&kind)
    }
}

/// One independent self-check.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    ConstantTables,
    KnownAnswer,
    HealthVerification,
    EventLoopLag,
    ClockSanity,
}

impl CheckKind {
    /// Every check, in the order they run.
    pub const ALL: [CheckKind; 5] = [
        CheckKind::ConstantTables,
        CheckKind::KnownAnswer,
        CheckKind::HealthVerification,
        CheckKind::EventLoopLag,
        CheckKind::ClockSanity,
    ];

    /// The snake_case name used in config, reports and reasons.
    pub fn name(self) -> &'static str {
        match self {
            CheckKind::ConstantTables => "constant_tables",
            CheckKind::KnownAnswer => "known_answer",
            CheckKind::HealthVerification => "health_verification",
            CheckKind::EventLoopLag => "event_loop_lag",
            CheckKind::ClockSanity => "clock_sanity",
        }
    }
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Fault hooks for tests (`[faults]` in the node's TOML); all off by
/// default. Changeable at run time with [`HealthHandle::set_faults`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthFaults {
    /// The post-mortem's fault: the verifier's memory is bad, so every
    /// peer's health proof is read as invalid — and so is the node's own
    /// known-good self-test, which is how it catches itself. Default false.
    pub corrupt_health_verification: bool,
    /// Flips one bit of the in-memory constant table (after start; turning
    /// the fault off flips it back). Default false.
    pub corrupt_constant_tables: bool,
    /// A CPU hog: blocks the monitored runtime's thread this long (ms,
    /// `std::thread::sleep`) every check interval. Default 0 (off); capped
    /// at 60000.
    pub event_loop_lag_ms: u64,
    /// The crash window of per-period jobs: the process exits right after
    /// a job's output reached the store and before the control plane
    /// heard of it (real-process tests only). Default false.
    pub job_exit_after_store_commit: bool,
}

/// What the node knows about its own health.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum HealthState {
    Healthy,
    /// A non-fatal check failed recently; `reasons` name the checks.
    Impaired {
        reasons: Vec<String>,
    },
    /// A fatal check failed. Sticky for the life of the process.
    FailStop {
        reasons: Vec<String>,
    },
}

impl HealthState {
    /// The wire code in a [`HealthProof`]: 0 healthy, 1 impaired, 2 fail-stop.
    pub fn code(&self) -> u8 {
        match self {
            HealthState::Healthy => 0,
            HealthState::Impaired { .. } => 1,
            HealthState::FailStop { .. } => 2,
        }
    }

    pub fn is_healthy(&self) -> bool {
        matches!(self, HealthState::Healthy)
    }

    pub fn is_fail_stop(&self) -> bool {
        matches!(self, HealthState::FailStop { .. })
    }

    /// Why the node is not healthy (empty when healthy). Each reason starts
    /// with the check's name, e.g. `event_loop_lag: event-loop lag ...`.
    pub fn reasons(&self) -> &[String] {
        match self {
            HealthState::Healthy => &[],
            HealthState::Impaired { reasons } | HealthState::FailStop { reasons } => reasons,
        }
    }
}

/// The latest outcome of one check.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckResult {
    /// The last run passed.
    pub ok: bool,
    /// A failure of this check makes the node fail-stop.
    pub fatal: bool,
    /// What the last run found.
    pub detail: String,
    /// Failed runs since start.
    pub failures: u64,
}

/// A snapshot of the node's self-diagnosis.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HealthReport {
    pub state: HealthState,
    /// Wall ms since which the node has been healthy; `None` unless healthy.
    pub healthy_since_ms: Option<u64>,
    /// The last event-loop lag sample, in ms.
    pub lag_ms: u64,
    /// Every check by [`CheckKind::name`].
    pub checks: BTreeMap<String, CheckResult>,
}

/// A node's answer to a peer's health probe. Valid iff `digest` is
/// `sha256("orrery-health-proof-v1" || nonce (LE) || node_state || table
/// root)`, where the table root is the verifier's own constant-table digest.
/// It shows that both nodes' tables and hashing agree; it does not
/// authenticate the peer (the wire handshake does), and a valid proof may
/// still say the peer is impaired or fail-stopped (`node_state`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HealthProof {
    pub nonce: u64,
    /// [`HealthState::code`] of the prover.
    pub node_state: u8,
    pub digest: [u8; 32],
}

/// The rest of the node's view of the monitor. Cheap to clone.
#[derive(Clone)]
pub struct HealthHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for HealthHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthHandle")
            .field("state", &self.shared.report.borrow().state)
            .finish()
    }
}

impl HealthHandle {
    /// The latest report (state, last lag sample, every check).
    pub fn report(&self) -> HealthReport {
        self.shared.report.borrow().clone()
    }

    pub fn is_healthy(&self) -> bool {
        self.shared.report.borrow().state.is_healthy()
    }

    /// Notified on every state transition (healthy / impaired / fail-stop,
    /// or a change in which checks fail). Between notifications the value
    /// is still kept current (lag, details), so `borrow()` is never stale.
    pub fn watch(&self) -> watch::Receiver<HealthReport> {
        self.shared.report.subscribe()
    }

    /// Verifies a peer's health proof against this node's own constant
    /// table. With `corrupt_health_verification` on, returns false for
    /// everything. A valid proof may report an unhealthy peer: check
    /// `node_state` too.
    pub fn verify_peer_response(&self, resp: &HealthProof) -> bool {
        self.shared.verify(resp)
    }

    /// This node's health proof for a probe carrying `nonce`.
    pub fn proof(&self, nonce: u64) -> HealthProof {
        let state = self.shared.report.borrow().state.code();
        self.shared.make_proof(nonce, state)
    }

    /// Replaces the fault hooks (tests). Table corruption and the CPU hog
    /// take effect at the next check interval.
    pub fn set_faults(&self, faults: HealthFaults) {
        let s = &self.shared;
        s.corrupt_verification
            .store(faults.corrupt_health_verification, Ordering::Relaxed);
        s.corrupt_tables
            .store(faults.corrupt_constant_tables, Ordering::Relaxed);
        s.lag_fault_ms
            .store(faults.event_loop_lag_ms.min(MAX_HOG_MS), Ordering::Relaxed);
    }

    /// The fault hooks in force.
    pub fn faults(&self) -> HealthFaults {
        let s = &self.shared;
        HealthFaults {
            corrupt_health_verification: s.corrupt_verification.load(Ordering::Relaxed),
            corrupt_constant_tables: s.corrupt_tables.load(Ordering::Relaxed),
            event_loop_lag_ms: s.lag_fault_ms.load(Ordering::Relaxed),
            // Read from the node's configuration by the job runner.
            job_exit_after_store_commit: false,
        }
    }
}

/// Runs the first round of checks synchronously (so the returned handle
/// already reflects them), then spawns the checking task on the *current*
/// tokio runtime — the one whose event-loop lag it measures — until
/// `shutdown` is cancelled. Must be called within a tokio runtime (like
/// `tokio::spawn`). Invalid config values are clamped (see
/// [`HealthConfig::validate`]).
pub fn start(
    cfg: HealthConfig,
    faults: HealthFaults,
    now_ms: fn() -> u64,
    shutdown: CancellationToken,
) -> HealthHandle {
    let cfg = cfg.normalized();
    let table = build_table();
    let expected: Vec<[u8; 32]> = table.chunks(SLICE_BYTES).map(sha256).collect();
    let root = root_of(&expected);
    let (tx, _) = watch::channel(HealthReport {
        state: HealthState::Healthy,
        healthy_since_ms: None,
        lag_ms: 0,
        checks: BTreeMap::new(),
    });
    let shared = Arc::new(Shared {
        report: tx,
        root: Mutex::new(root),
        corrupt_verification: AtomicBool::new(false),
        corrupt_tables: AtomicBool::new(false),
        lag_fault_ms: AtomicU64::new(0),
    });
    let handle = HealthHandle {
        shared: shared.clone(),
    };
    handle.set_faults(faults);

    let interval_ms = cfg.check_interval_ms;
    let mut monitor = Monitor {
        slices_per_tick: (SLICES as u64 * interval_ms)
            .div_ceil(1000)
            .clamp(1, SLICES as u64) as usize,
        cfg,
        shared,
        now_ms,
        observed: expected.clone(),
        expected,
        table,
        next_slice: 0,
        table_flipped: false,
        proof_nonce: 0,
        lag_over: 0,
        last_clock: None,
        failures: BTreeMap::new(),
        state: HealthState::Healthy,
        healthy_since_ms: None,
        last_failure: None,
        failing_kinds: Vec::new(),
        hog: None,
        shutdown,
    };
    // The first round checks the whole table against the hard-coded root.
    monitor.tick(Duration::ZERO, SLICES, true);
    tokio::spawn(monitor.run());
    handle
}

// ---------------------------------------------------------------------------
// References. Hard-coded answers were computed independently of this code.

const MAX_INTERVAL_MS: u64 = 60_000;
const MAX_HOG_MS: u64 = 60_000;
/// Largest wall-vs-monotonic divergence tolerated between two samples.
const CLOCK_TOLERANCE_MS: i128 = 1000;

const TABLE_BYTES: usize = 64 * 1024;
const SLICES: usize = 8;
const SLICE_BYTES: usize = TABLE_BYTES / SLICES;
const TABLE_SEED: u64 = 0x6f72_7265_7279_2d31; // "orrery-1"
/// The byte and bit the `corrupt_constant_tables` fault flips.
const FLIP_BYTE: usize = 40_000;
const FLIP_MASK: u8 = 1 << 3;
/// sha256 of the 8 slice digests of the pristine table.
const TABLE_ROOT: [u8; 32] =
    hex32("8bc0be1f14600a7e07e36ed8b762888b2ff65d4aaea1cd8daee8c55e5799b813");
const SHA256_ABC: [u8; 32] =
    hex32("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
const PROOF_DOMAIN: &[u8] = b"orrery-health-proof-v1";
/// A valid healthy proof over the pristine table.
const KNOWN_PROOF: HealthProof = HealthProof {
    nonce: 0x0123_4567_89ab_cdef,
    node_state: 0,
    digest: hex32("ee2184d611fec363de4717529aa29578894fb4be5144bdf8ec39c8b20d37bb8c"),
};

const fn hex32(s: &str) -> [u8; 32] {
    const fn nib(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("bad hex digit"),
        }
    }
    let b = s.as_bytes();
    assert!(b.len() == 64, "need 64 hex digits");
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = (nib(b[2 * i]) << 4) | nib(b[2 * i + 1]);
        i += 1;
    }
    out
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn build_table() -> Vec<u8> {
    let mut s = TABLE_SEED;
    let mut t = Vec::with_capacity(TABLE_BYTES);
    while t.len() < TABLE_BYTES {
        t.extend_from_slice(&splitmix64(&mut s).to_le_bytes());
    }
    t
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn root_of(slices: &[[u8; 32]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for s in slices {
        h.update(s);
    }
    h.finalize().into()
}

fn proof_digest(nonce: u64, state: u8, root: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(PROOF_DOMAIN);
    h.update(nonce.to_le_bytes());
    h.update([state]);
    h.update(root);
    h.finalize().into()
}

/// Compares without early exit (timing tells nothing about the digest).
fn digest_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Integer and hash known answers; `Err` names the first wrong one.
fn known_answers() -> Result<(), String> {
    if sha256(black_box(b"abc")) != SHA256_ABC {
        return Err("sha256(\"abc\") differs from the known digest".into());
    }
    let mut s = black_box(0u64);
    if splitmix64(&mut s) != 0xe220_a839_7b1d_cdaf {
        return Err("splitmix64(0) differs from the known answer".into());
    }
    let n = black_box(1000u64);
    let squares: u64 = (0..n).map(|i| i * i).sum();
    if squares != 332_833_500 {
        return Err(format!(
            "sum of squares 0..1000 = {squares}, expected 332833500"
        ));
    }
    if (squares / n, squares % n) != (332_833, 500) {
        return Err("integer division known answer is wrong".into());
    }
    let m = black_box(0x9E37_79B9_7F4A_7C15u64).wrapping_mul(black_box(0xBF58_476D_1CE4_E5B9));
    if m != 0xd674_11c4_6c86_742d {
        return Err(format!(
            "wrapping multiply gave {m:#x}, expected 0xd67411c46c86742d"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Shared state and the checking task.

struct Shared {
    report: watch::Sender<HealthReport>,
    /// Root digest of the constant table as last observed in memory; what
    /// proofs are made and verified against.
    root: Mutex<[u8; 32]>,
    corrupt_verification: AtomicBool,
    corrupt_tables: AtomicBool,
    lag_fault_ms: AtomicU64,
}

impl Shared {
    fn root(&self) -> [u8; 32] {
        *self.root.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_root(&self, root: [u8; 32]) {
        *self.root.lock().unwrap_or_else(|e| e.into_inner()) = root;
    }

    fn make_proof(&self, nonce: u64, node_state: u8) -> HealthProof {
        HealthProof {
            nonce,
            node_state,
            digest: proof_digest(nonce, node_state, &self.root()),
        }
    }

    fn verify(&self, resp: &HealthProof) -> bool {
        if resp.node_state > 2 {
            return false;
        }
        let mut expect = proof_digest(resp.nonce, resp.node_state, &self.root());
        if self.corrupt_verification.load(Ordering::Relaxed) {
            // The fault: one bad bit in the verifier's copy.
            expect[0] ^= 0x01;
        }
        digest_eq(&expect, &resp.digest)
    }
}

struct Monitor {
    cfg: HealthConfig,
    shared: Arc<Shared>,
    now_ms: fn() -> u64,
    table: Vec<u8>,
    /// Slice digests taken at start.
    expected: Vec<[u8; 32]>,
    /// Slice digests as last re-hashed.
    observed: Vec<[u8; 32]>,
    next_slice: usize,
    slices_per_tick: usize,
    table_flipped: bool,
    proof_nonce: u64,
    lag_over: u32,
    last_clock: Option<(Instant, u64)>,
    failures: BTreeMap<CheckKind, u64>,
    state: HealthState,
    healthy_since_ms: Option<u64>,
    last_failure: Option<Instant>,
    failing_kinds: Vec<CheckKind>,
    hog: Option<Arc<Notify>>,
    shutdown: CancellationToken,
}

type Outcome = Result<String, String>;

impl Monitor {
    async fn run(mut self) {
        let period = Duration::from_millis(self.cfg.check_interval_ms);
        let mut interval = tokio::time::interval_at(Instant::now() + period, period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let scheduled = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                t = interval.tick() => t,
            };
            // Lag 1: how late the timer fired.
            let late = Instant::now().saturating_duration_since(scheduled);
            self.poke_hog();
            // Lag 2: how long a ready task waits to be polled again.
            let t0 = Instant::now();
            tokio::task::yield_now().await;
            let queued = t0.elapsed();
            self.tick(late.max(queued), self.slices_per_tick, false);
        }
    }

    /// The CPU-hog fault: a separate task on this runtime that blocks its
    /// thread once per interval.
    fn poke_hog(&mut self) {
        if self.shared.lag_fault_ms.load(Ordering::Relaxed) == 0 {
            return;
        }
        let notify = self.hog.get_or_insert_with(|| {
            let notify = Arc::new(Notify::new());
            let (n, shared, stop) = (notify.clone(), self.shared.clone(), self.shutdown.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = n.notified() => {}
                    }
                    let ms = shared.lag_fault_ms.load(Ordering::Relaxed).min(MAX_HOG_MS);
                    if ms > 0 {
                        std::thread::sleep(Duration::from_millis(ms));
                    }
                }
            });
            notify
        });
        notify.notify_one();
    }

    fn tick(&mut self, lag: Duration, slices: usize, first: bool) {
        self.apply_table_fault();
        let lag_ms = u64::try_from(lag.as_millis()).unwrap_or(u64::MAX);
        let outcomes = [
            (CheckKind::ConstantTables, self.check_tables(slices, first)),
            (
                CheckKind::KnownAnswer,
                known_answers().map(|()| "all known answers match".into()),
            ),
            (CheckKind::HealthVerification, self.check_verification()),
            (CheckKind::EventLoopLag, self.check_lag(lag_ms)),
            (CheckKind::ClockSanity, self.check_clock()),
        ];
        self.update(lag_ms, &outcomes);
    }

    fn apply_table_fault(&mut self) {
        let want = self.shared.corrupt_tables.load(Ordering::Relaxed);
        if want != self.table_flipped {
            if let Some(b) = self.table.get_mut(FLIP_BYTE) {
                *b ^= FLIP_MASK;
            }
            self.table_flipped = want;
        }
    }

    fn check_tables(&mut self, slices: usize, first: bool) -> Outcome {
        let mut root_changed = false;
        for _ in 0..slices {
            let i = self.next_slice % SLICES;
            self.next_slice = (i + 1) % SLICES;
            let lo = i * SLICE_BYTES;
            let Some(bytes) = self.table.get(lo..lo + SLICE_BYTES) else {
                continue;
            };
            let d = sha256(bytes);
            if let Some(o) = self.observed.get_mut(i) {
                if *o != d {
                    *o = d;
                    root_changed = true;
                }
            }
        }
        let root = root_of(&self.observed);
        if root_changed {
            self.shared.set_root(root);
        }
        let bad: Vec<String> = (0..SLICES)
            .filter(|&i| self.observed.get(i) != self.expected.get(i))
            .map(|i| i.to_string())
            .collect();
        if !bad.is_empty() {
            return Err(format!(
                "constant table slice(s) {} ({} bytes each) no longer match their checksum",
                bad.join(","),
                SLICE_BYTES
            ));
        }
        if root != TABLE_ROOT {
            return Err(if first {
                "constant table built at start does not match the known digest".into()
            } else {
                "constant table digest differs from the known digest".into()
            });
        }
        Ok(format!(
            "{} of {SLICES} slices re-verified",
            slices.min(SLICES)
        ))
    }

    fn check_verification(&mut self) -> Outcome {
        let s = &self.shared;
        self.proof_nonce = self.proof_nonce.wrapping_add(1);
        let mut seed = self.proof_nonce;
        let own = s.make_proof(splitmix64(&mut seed), self.state.code());
        let mut forged = KNOWN_PROOF;
        forged.digest[31] ^= 0x80;
        let mut wrong = Vec::new();
        if !s.verify(&own) {
            wrong.push("own proof rejected");
        }
        if !s.verify(&KNOWN_PROOF) {
            wrong.push("known-good proof rejected");
        }
        if s.verify(&forged) {
            wrong.push("forged proof accepted");
        }
        if wrong.is_empty() {
            Ok("own and known-good proofs verify, forged proof rejected".into())
        } else {
            Err(format!(
                "self-test failed: {}; this node cannot judge peers' health",
                wrong.join(", ")
            ))
        }
    }

    fn check_lag(&mut self, lag_ms: u64) -> Outcome {
        let thr = self.cfg.lag_threshold_ms;
        if lag_ms > thr {
            self.lag_over = self.lag_over.saturating_add(1);
        } else {
            self.lag_over = 0;
        }
        if self.lag_over >= self.cfg.lag_window {
            Err(format!(
                "event-loop lag {lag_ms} ms > {thr} ms for {} samples",
                self.lag_over
            ))
        } else {
            Ok(format!("lag {lag_ms} ms (threshold {thr} ms)"))
        }
    }

    fn check_clock(&mut self) -> Outcome {
        let mono = Instant::now();
        let wall = (self.now_ms)();
        let prev = self.last_clock.replace((mono, wall));
        let Some((m0, w0)) = prev else {
            return Ok("first sample".into());
        };
        if mono < m0 {
            let back = m0.saturating_duration_since(mono).as_millis();
            return Err(format!("monotonic clock went backwards by {back} ms"));
        }
        let dm = mono.saturating_duration_since(m0).as_millis() as i128;
        let dw = i128::from(wall) - i128::from(w0);
        if (dw - dm).abs() > CLOCK_TOLERANCE_MS {
            return Err(format!(
                "wall clock moved {dw} ms while the monotonic clock moved {dm} ms"
            ));
        }
        Ok(format!(
            "wall and monotonic agree within {} ms",
            (dw - dm).abs()
        ))
    }

    fn update(&mut self, lag_ms: u64, outcomes: &[(CheckKind, Outcome)]) {
        let now = Instant::now();
        let wall = (self.now_ms)();
        let mut checks = BTreeMap::new();
        let mut failing = Vec::new();
        let mut reasons = Vec::new();
        let mut fatal = false;
        for (kind, outcome) in outcomes {
            let failures = self.failures.entry(*kind).or_insert(0);
            let is_fatal = self.cfg.is_fatal(*kind);
            let (ok, detail) = match outcome {
                Ok(d) => (true, d.clone()),
                Err(e) => {
                    *failures = failures.saturating_add(1);
                    failing.push(*kind);
                    reasons.push(format!("{kind}: {e}"));
                    fatal |= is_fatal;
                    (false, e.clone())
                }
            };
            let result = CheckResult {
                ok,
                fatal: is_fatal,
                detail,
                failures: *failures,
            };
            checks.insert(kind.name().to_string(), result);
        }

        let before = self.state.code();
        let kinds_before = std::mem::take(&mut self.failing_kinds);
        match &self.state {
            HealthState::FailStop { .. } => {}
            _ if fatal => {
                tracing::error!(
                    ?reasons,
                    "health: fail-stop; this node must not act on the cluster"
                );
                self.state = HealthState::FailStop { reasons };
                self.healthy_since_ms = None;
            }
            _ if !failing.is_empty() => {
                if !matches!(self.state, HealthState::Impaired { .. }) || kinds_before != failing {
                    tracing::warn!(?reasons, "health: impaired");
                }
                self.state = HealthState::Impaired { reasons };
                self.healthy_since_ms = None;
                self.last_failure = Some(now);
            }
            HealthState::Impaired { .. } => {
                let clean_for = self
                    .last_failure
                    .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
                if clean_for >= Duration::from_millis(self.cfg.recover_after_ms) {
                    tracing::info!("health: recovered");
                    self.state = HealthState::Healthy;
                    self.healthy_since_ms = Some(wall);
                }
            }
            HealthState::Healthy => {
                if self.healthy_since_ms.is_none() {
                    self.healthy_since_ms = Some(wall);
                }
            }
        }
        // A transition: the state changes, or the set of failing checks of
        // an impaired node does (fail-stop reasons are frozen).
        let transition = before != self.state.code()
            || (matches!(self.state, HealthState::Impaired { .. }) && kinds_before != failing);
        self.failing_kinds = failing;
        let report = HealthReport {
            state: self.state.clone(),
            healthy_since_ms: self.healthy_since_ms,
            lag_ms,
            checks,
        };
        self.shared.report.send_if_modified(|r| {
            *r = report;
            transition
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wall() -> u64 {
        crate::clock::now_ms()
    }

    fn quick() -> HealthConfig {
        HealthConfig {
            check_interval_ms: 50,
            recover_after_ms: 500,
            ..HealthConfig::default()
        }
    }

    async fn wait_state(
        h: &HealthHandle,
        what: &str,
        pred: impl Fn(&HealthState) -> bool,
    ) -> HealthReport {
        let mut rx = h.watch();
        let got = tokio::time::timeout(Duration::from_secs(15), rx.wait_for(|r| pred(&r.state)))
            .await
            .map(|r| r.map(|r| r.clone()));
        match got {
            Ok(Ok(r)) => r,
            _ => panic!("timed out waiting for {what}; last report {:?}", h.report()),
        }
    }

    fn names(state: &HealthState, check: CheckKind) -> bool {
        state.reasons().iter().any(|r| r.starts_with(check.name()))
    }

    #[test]
    fn references_are_consistent() {
        let t = build_table();
        let slices: Vec<[u8; 32]> = t.chunks(SLICE_BYTES).map(sha256).collect();
        let root = root_of(&slices);
        assert_eq!(root, TABLE_ROOT);
        assert_eq!(
            proof_digest(KNOWN_PROOF.nonce, KNOWN_PROOF.node_state, &root),
            KNOWN_PROOF.digest
        );
        assert_eq!(known_answers(), Ok(()));
    }

    #[test]
    fn config_toml_defaults_and_unknown_keys() {
        let c: HealthConfig = toml::from_str("lag_window = 5").unwrap();
        assert_eq!(c.lag_window, 5);
        assert_eq!(c.check_interval_ms, 100);
        assert_eq!(c.fatal_checks.len(), 3);
        let c: HealthConfig = toml::from_str("fatal_checks = [\"event_loop_lag\"]").unwrap();
        assert_eq!(c.fatal_checks, vec![CheckKind::EventLoopLag]);
        assert!(toml::from_str::<HealthConfig>("lag_windw = 5").is_err());
        let f: HealthFaults = toml::from_str("event_loop_lag_ms = 400").unwrap();
        assert_eq!(f.event_loop_lag_ms, 400);
        assert!(!f.corrupt_health_verification);
        assert!(HealthConfig::default().validate().is_ok());
        let bad = HealthConfig {
            check_interval_ms: 0,
            ..HealthConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("check_interval_ms"));
        let s = HealthState::Impaired {
            reasons: vec!["event_loop_lag: x".into()],
        };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(
            json,
            r#"{"state":"impaired","reasons":["event_loop_lag: x"]}"#
        );
        assert_eq!(serde_json::from_str::<HealthState>(&json).unwrap(), s);
        let p: HealthProof =
            serde_json::from_str(&serde_json::to_string(&KNOWN_PROOF).unwrap()).unwrap();
        assert_eq!(p, KNOWN_PROOF);
    }

    #[tokio::test]
    async fn clean_monitor_is_healthy_and_verifies_proofs() {
        let stop = CancellationToken::new();
        let a = start(quick(), HealthFaults::default(), wall, stop.clone());
        let b = start(quick(), HealthFaults::default(), wall, stop.clone());
        let r = a.report();
        assert!(r.state.is_healthy(), "{r:?}");
        assert!(r.healthy_since_ms.is_some());
        assert_eq!(r.checks.len(), CheckKind::ALL.len());
        assert!(r.checks.values().all(|c| c.ok), "{r:?}");

        let p = a.proof(7);
        assert_eq!(p.node_state, 0);
        assert!(a.verify_peer_response(&p));
        assert!(b.verify_peer_response(&p));
        assert!(a.verify_peer_response(&b.proof(8)));
        let mut forged = p;
        forged.nonce = 8;
        assert!(!b.verify_peer_response(&forged));
        let mut forged = p;
        forged.node_state = 1;
        assert!(!b.verify_peer_response(&forged));

        // A few more ticks later it is still healthy (no false alarms).
        let mut rx = a.watch();
        let _ = tokio::time::timeout(Duration::from_millis(300), rx.changed()).await;
        assert!(a.is_healthy(), "{:?}", a.report());
        stop.cancel();
    }

    #[tokio::test]
    async fn corrupt_verification_rejects_peers_and_fail_stops() {
        let stop = CancellationToken::new();
        let good = start(quick(), HealthFaults::default(), wall, stop.clone());
        let faults = HealthFaults {
            corrupt_health_verification: true,
            ..HealthFaults::default()
        };
        let bad = start(quick(), faults, wall, stop.clone());
        assert!(!bad.verify_peer_response(&good.proof(42)));
        assert!(good.verify_peer_response(&good.proof(42)));
        let r = wait_state(&bad, "fail-stop", HealthState::is_fail_stop).await;
        assert!(names(&r.state, CheckKind::HealthVerification), "{r:?}");
        assert_eq!(bad.proof(1).node_state, 2);
        // The healthy peer verifies the broken node's proof (its hashing is
        // fine) and sees that it reports itself fail-stopped.
        assert!(good.verify_peer_response(&bad.proof(1)));
        assert!(good.is_healthy());
        // Sticky even with the fault removed.
        bad.set_faults(HealthFaults::default());
        let mut rx = bad.watch();
        let _ = tokio::time::timeout(Duration::from_millis(300), rx.changed()).await;
        assert!(bad.report().state.is_fail_stop());
        stop.cancel();
    }

    #[tokio::test]
    async fn corrupt_constant_tables_fail_stops() {
        let stop = CancellationToken::new();
        let faults = HealthFaults {
            corrupt_constant_tables: true,
            ..HealthFaults::default()
        };
        let h = start(quick(), faults, wall, stop.clone());
        let r = wait_state(&h, "fail-stop", HealthState::is_fail_stop).await;
        assert!(names(&r.state, CheckKind::ConstantTables), "{r:?}");
        assert!(!r.checks["constant_tables"].ok);
        stop.cancel();
    }

    #[tokio::test]
    async fn event_loop_lag_impairs_then_recovers() {
        // #[tokio::test] is a current_thread runtime: the hog blocks the
        // very thread the monitor runs on.
        let stop = CancellationToken::new();
        let cfg = HealthConfig {
            check_interval_ms: 100,
            recover_after_ms: 500,
            ..HealthConfig::default()
        };
        let faults = HealthFaults {
            event_loop_lag_ms: 400,
            ..HealthFaults::default()
        };
        let h = start(cfg, faults, wall, stop.clone());
        let r = wait_state(&h, "impaired", |s| {
            matches!(s, HealthState::Impaired { .. })
        })
        .await;
        assert!(names(&r.state, CheckKind::EventLoopLag), "{r:?}");
        assert!(r.state.reasons()[0].contains("event-loop lag"), "{r:?}");
        assert!(r.healthy_since_ms.is_none());
        assert!(r.lag_ms > 250, "{r:?}");
        assert_eq!(h.proof(1).node_state, 1);

        h.set_faults(HealthFaults::default());
        let r = wait_state(&h, "healthy", HealthState::is_healthy).await;
        assert!(r.healthy_since_ms.is_some());
        assert!(r.lag_ms <= 250, "{r:?}");
        stop.cancel();
    }

    #[tokio::test]
    async fn without_fatal_checks_corruption_only_impairs() {
        let stop = CancellationToken::new();
        let cfg = HealthConfig {
            fatal_checks: vec![],
            ..quick()
        };
        let faults = HealthFaults {
            corrupt_health_verification: true,
            ..HealthFaults::default()
        };
        let h = start(cfg, faults, wall, stop.clone());
        let r = wait_state(&h, "impaired", |s| {
            matches!(s, HealthState::Impaired { .. })
        })
        .await;
        assert!(names(&r.state, CheckKind::HealthVerification), "{r:?}");
        assert!(!r.checks["health_verification"].fatal);
        let mut rx = h.watch();
        let _ = tokio::time::timeout(Duration::from_millis(300), rx.changed()).await;
        assert!(matches!(h.report().state, HealthState::Impaired { .. }));
        stop.cancel();
    }
}
