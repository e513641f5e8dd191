//! The node's Prometheus metrics (`GET /metrics`, text exposition format).
//!
//! Counters that must be counted as things happen (RPCs served and their
//! latency) live here as prometheus-client families; everything else is read
//! at scrape time from where it is already kept (the node's status, the
//! cached cluster state, the watchdog, the logging channels, the wire
//! counters, the admin endpoint's counters), so there is one source of
//! truth per number. The exposition format is prometheus-client's, never
//! hand-written.
//!
//! What it must never do: block a request path (observing is a few atomic
//! operations), or create labels from unbounded input (RPC kinds are a fixed
//! set; log channels are bounded by `log.max_channels`).

use crate::admin::AdminStats;
use crate::node::Inner;
use orrery_wire::WireStatsSnapshot;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabel {
    channel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabel {
    channel: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabel {
    sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DiskLabel {
    watched: String,
    path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchedLabel {
    watched: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

type LatencyFamily = Family<KindLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs .. ~13 s.
    Histogram::new(exponential_buckets(0.000_05, 4.0, 10))
}

/// RPCs this node served, by request kind, and those it refused, by
/// reason ([`crate::authz::Refusal::kind`]). Clones share the counters.
#[derive(Clone)]
pub(crate) struct RpcMetrics {
    requests: Family<KindLabel, Counter>,
    errors: Family<KindLabel, Counter>,
    latency: LatencyFamily,
    refused: Family<ReasonLabel, Counter>,
    /// All kinds together, for the dashboard's charts (`GET /history`).
    pub(crate) tally: std::sync::Arc<crate::history::RpcTally>,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        let refused = Family::default();
        // Every reason shows from the start (0), so a rate is defined.
        for reason in crate::authz::Refusal::KINDS {
            let _ = refused.get_or_create(&ReasonLabel {
                reason: reason.into(),
            });
        }
        RpcMetrics {
            requests: Family::default(),
            errors: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            refused,
            tally: Default::default(),
        }
    }
}

impl RpcMetrics {
    pub(crate) fn observe(&self, kind: &'static str, took: Duration, error: bool) {
        let l = KindLabel { kind: kind.into() };
        self.requests.get_or_create(&l).inc();
        if error {
            self.errors.get_or_create(&l).inc();
        }
        self.latency.get_or_create(&l).observe(took.as_secs_f64());
        self.tally.observe(took, error);
    }

    /// A request refused by authorisation, under its reason's stable label.
    pub(crate) fn refused(&self, reason: &'static str) {
        self.refused
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }

    /// Requests refused so far, by reason (every reason, 0 included).
    pub(crate) fn refusals(&self) -> std::collections::BTreeMap<String, u64> {
        crate::authz::Refusal::KINDS
            .into_iter()
            .map(|reason| {
                let l = ReasonLabel {
                    reason: reason.into(),
                };
                (reason.to_string(), self.refused.get_or_create(&l).get())
            })
            .collect()
    }
}

fn gauge(reg: &mut Registry, name: &str, help: &str, v: i64) {
    let g: Gauge = Gauge::default();
    g.set(v);
    reg.register(name, help, g);
}

fn gauge_f(reg: &mut Registry, name: &str, help: &str, v: f64) {
    let g: Gauge<f64, AtomicU64> = Gauge::default();
    g.set(v);
    reg.register(name, help, g);
}

fn counter(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let c: Counter = Counter::default();
    c.inc_by(v);
    reg.register(name, help, c);
}

/// Connection admission on both ports, and what peers send that is kept
/// under a byte bound (`orrery_core::state::limits`).
fn bound_metrics(reg: &mut Registry, inner: &Inner, wire: &WireStatsSnapshot, admin: &AdminStats) {
    let a = admin.conns.snapshot();
    for (port, s, cap) in [("wire", wire, "rpc"), ("admin", &a, "admin")] {
        gauge(
            reg,
            &format!("{port}_connections_open"),
            &format!("Accepted connections open now ({cap}.max_connections)"),
            s.connections_open as i64,
        );
        gauge(
            reg,
            &format!("{port}_connections_pending"),
            "Connections not yet established (handshake in progress, or no request byte yet)",
            s.connections_pending as i64,
        );
        counter(
            reg,
            &format!("{port}_connections_refused"),
            &format!("Connections closed at accept: {cap}.max_connections reached"),
            s.connections_refused,
        );
        counter(
            reg,
            &format!("{port}_connections_evicted"),
            "Pending connections closed to make room for a newer one",
            s.connections_evicted,
        );
        counter(
            reg,
            &format!("{port}_connections_timed_out"),
            "Connections closed because the handshake or request head did not arrive in time",
            s.connections_timed_out,
        );
    }
    counter(
        reg,
        "admin_connections_accepted",
        "Admin connections accepted",
        a.connections_accepted,
    );
    counter(
        reg,
        "admin_connections_idle_closed",
        "Admin connections closed after admin.idle_timeout_ms without progress",
        a.connections_idle_closed,
    );
    counter(
        reg,
        "admin_state_requests",
        "Requests for the replicated state (/cluster, /timeline)",
        admin.state_requests.load(Ordering::Relaxed),
    );
    counter(
        reg,
        "admin_requests_refused_host",
        "Admin requests refused because their Host header is not one of this node's names",
        admin.host_refused.load(Ordering::Relaxed),
    );
    counter(
        reg,
        "admin_state_reads",
        "Linearizable reads run for them (shared by concurrent requests)",
        admin.state_reads.load(Ordering::Relaxed),
    );
    log_bound_metrics(reg, inner);
}

/// Forwarded log lines the collector clipped or dropped.
fn log_bound_metrics(reg: &mut Registry, inner: &Inner) {
    if let Some(cl) = inner.cluster_log.get() {
        let (clipped, dropped) = cl.bounded();
        counter(
            reg,
            "log_forward_lines_clipped",
            "Forwarded log lines stored clipped to the line byte bound",
            clipped,
        );
        counter(
            reg,
            "log_forward_lines_dropped",
            "Forwarded log lines dropped over the batch bound",
            dropped,
        );
    }
}

/// The services' own counters ([`crate::service::Service::counters`]),
/// one family per name; a name registered twice (by two services) is
/// merged, its first help text kept.
/// Disk space, store sizes, descriptors and the voter's Raft core, from
/// the resource watcher's last sample (`crate::resources`). Labels come
/// from a fixed set (three filesystems at most).
fn resource_metrics(reg: &mut Registry, inner: &Inner, st: &crate::NodeStatus) {
    let Some(s) = inner.resource_sample() else {
        return;
    };
    let free: Family<DiskLabel, Gauge> = Family::default();
    let total: Family<DiskLabel, Gauge> = Family::default();
    for d in &s.disks {
        let l = DiskLabel {
            watched: d.watched.name().into(),
            path: d.path.display().to_string(),
        };
        free.get_or_create(&l).set(d.free_bytes as i64);
        total.get_or_create(&l).set(d.total_bytes as i64);
    }
    reg.register(
        "disk_free_bytes",
        "Free space an unprivileged user may use, per watched filesystem",
        free,
    );
    reg.register("disk_total_bytes", "Size of each watched filesystem", total);
    let sizes = [
        (
            "raft_store_bytes",
            "Bytes of the Raft store (log since the last snapshot, and the snapshot)",
            &s.raft_store,
        ),
        (
            "store_bytes",
            "Bytes of the SQLite application store (with its write-ahead log)",
            &s.store,
        ),
    ];
    for (name, help, v) in sizes {
        if let Some((_, b)) = v {
            gauge(reg, name, help, *b as i64);
        }
    }
    if let Some(g) = s.store_growth_bytes_per_s {
        gauge_f(
            reg,
            "store_growth_bytes_per_second",
            "Growth of the application store since the previous sample",
            g,
        );
    }
    if let Some(n) = s.open_fds {
        gauge(
            reg,
            "open_fds",
            "Open file descriptors of this process",
            n as i64,
        );
    }
    if let Some(n) = s.fd_limit {
        gauge(
            reg,
            "fd_limit",
            "Soft limit on open file descriptors",
            n.min(i64::MAX as u64) as i64,
        );
    }
    let level: Family<WatchedLabel, Gauge> = Family::default();
    for f in &st.resources {
        let v = match f.level {
            crate::resources::Level::Warning => 1,
            crate::resources::Level::Critical => 2,
        };
        level
            .get_or_create(&WatchedLabel {
                watched: f.watched.name().into(),
            })
            .set(v);
    }
    reg.register(
        "resource_level",
        "1 warning, 2 critical, per resource past a threshold (absent: within)",
        level,
    );
    if let Some(c) = inner.control_plane() {
        gauge(
            reg,
            "voter_down",
            "1 while this voter's Raft core is stopped",
            i64::from(st.voter_down.is_some()),
        );
        counter(
            reg,
            "raft_core_restarts",
            "Restarts of this voter's Raft core in place",
            c.restarts(),
        );
        counter(
            reg,
            "raft_write_timeouts",
            "This voter's control-plane writes that did not commit within raft.write_timeout_ms",
            c.write_timeouts(),
        );
    }
}

fn service_metrics(reg: &mut Registry, inner: &Inner) {
    type Labels = Vec<(String, String)>;
    let mut families: std::collections::BTreeMap<
        &'static str,
        (&'static str, Family<Labels, Counter>),
    > = Default::default();
    for c in inner.service_counters() {
        let (_, family) = families
            .entry(c.name)
            .or_insert_with(|| (c.help, Family::default()));
        let labels: Labels = c
            .labels
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        family.get_or_create(&labels).inc_by(c.value);
    }
    for (name, (help, family)) in families {
        reg.register(name, help, family);
    }
}

/// The node's metrics in the Prometheus text format.
pub(crate) fn render(inner: &Inner, admin: &AdminStats) -> String {
    let mut reg = Registry::with_prefix("orrery");
    let st = inner.status_now();
    gauge(
        &mut reg,
        "node_stage",
        "Last start-up stage this node completed (-5 not started .. 0 running)",
        i64::from(st.stage),
    );
    gauge(
        &mut reg,
        "node_epoch",
        "Epoch of this node process (0: not joined)",
        st.epoch as i64,
    );
    gauge(
        &mut reg,
        "node_serving",
        "1 while the node serves: running, not fenced, lease fresh",
        i64::from(st.serving),
    );
    gauge(
        &mut reg,
        "node_is_leader",
        "1 while this node leads the control plane",
        i64::from(st.is_leader),
    );
    gauge(
        &mut reg,
        "node_fenced",
        "1 while this node is fenced",
        i64::from(st.fenced.is_some()),
    );
    gauge(
        &mut reg,
        "control_no_quorum",
        "1 while this node sees no working control-plane quorum",
        i64::from(st.no_quorum.is_some()),
    );
    gauge(
        &mut reg,
        "control_alarms",
        "Control-plane alarms in force (no quorum, failing replication, slow proposals)",
        st.control_alarms.len() as i64,
    );
    gauge(
        &mut reg,
        "membership_view_version",
        "Version of the membership view this node enforces",
        st.membership_version as i64,
    );
    let healthy = st.health.as_ref().is_some_and(|h| h.state.is_healthy());
    gauge(
        &mut reg,
        "node_healthy",
        "1 while this node passes its self-checks",
        i64::from(healthy),
    );
    match inner.lease.age_ms(inner.mono_ms()) {
        Some(age) => gauge_f(
            &mut reg,
            "lease_age_seconds",
            "Time since the last acknowledged heartbeat was sent",
            age as f64 / 1000.0,
        ),
        None => gauge_f(
            &mut reg,
            "lease_age_seconds",
            "Time since the last acknowledged heartbeat was sent (-1: none yet)",
            -1.0,
        ),
    }
    gauge(
        &mut reg,
        "lease_fresh",
        "1 while this node's lease is fresh",
        i64::from(
            inner
                .lease
                .fresh(inner.mono_ms(), inner.cfg.membership.self_fence_after_ms),
        ),
    );
    if let Some(state) = inner.local_state() {
        gauge(
            &mut reg,
            "cluster_stage",
            "Last stage every participant completed, as this node's replica or cache has it",
            i64::from(state.stage.number()),
        );
        let members: Family<StatusLabel, Gauge> = Family::default();
        for status in ["active", "excluded", "removed", "left"] {
            let _ = members.get_or_create(&StatusLabel {
                status: status.into(),
            });
        }
        for m in state.members.values() {
            let status = match m.status {
                orrery_core::MemberStatus::Active => "active",
                orrery_core::MemberStatus::Excluded { .. } => "excluded",
                orrery_core::MemberStatus::Removed { .. } => "removed",
                orrery_core::MemberStatus::Left { .. } => "left",
            };
            members
                .get_or_create(&StatusLabel {
                    status: status.into(),
                })
                .inc();
        }
        reg.register(
            "cluster_members",
            "Members by status, as this node last saw the cluster",
            members,
        );
    }
    let (_, hosted) = (inner.shards.map(), inner.shards.status());
    gauge(
        &mut reg,
        "shards_assigned",
        "Shards the map assigns to this node",
        hosted.assigned as i64,
    );
    gauge(
        &mut reg,
        "shards_loaded",
        "Shards loaded and serving on this node",
        hosted.loaded as i64,
    );
    gauge(
        &mut reg,
        "shards_loading",
        "Shards moving to this node",
        hosted.loading as i64,
    );
    let j = &st.jobs;
    for (name, help, v) in [
        ("jobs_started", "Per-period job runs started (one per lease token held)", j.started),
        ("jobs_committed", "Job runs whose output the store and the control plane accepted", j.committed),
        ("jobs_refused_stale", "Job runs refused as a stale holder (StaleToken, AlreadyCommitted, rejected commit, lease lost)", j.refused_stale),
        ("jobs_failed", "Job runs that failed (job error, deadline, store or control plane error)", j.failed),
        ("jobs_skipped", "Job leases learnt after their period was over", j.skipped),
    ] {
        counter(&mut reg, name, help, v);
    }
    let w = st.wire;
    counter(
        &mut reg,
        "wire_connections_accepted",
        "TCP connections accepted",
        w.connections_accepted,
    );
    counter(
        &mut reg,
        "wire_handshakes_ok",
        "Handshakes completed",
        w.handshakes_ok,
    );
    counter(
        &mut reg,
        "wire_handshakes_refused",
        "Handshakes refused (wrong secret or other)",
        w.handshakes_refused_wrong_secret + w.handshakes_refused_other,
    );
    for (name, help, v) in [
        ("wire_handshakes_refused_tls", "TLS handshakes refused or failed (no certificate, another cluster's CA, a revoked certificate, not TLS)", w.handshakes_refused_tls),
        ("wire_handshakes_refused_identity", "Handshakes whose announced node id is not the one the certificate names", w.handshakes_refused_identity),
        ("wire_connections_closed_revoked", "Open connections closed because the peer's certificate was revoked", w.connections_closed_revoked),
    ] {
        counter(&mut reg, name, help, v);
    }
    counter(
        &mut reg,
        "wire_frames_malformed",
        "Frames that did not decode",
        w.frames_malformed + w.frames_oversized,
    );
    counter(
        &mut reg,
        "wire_requests_overloaded",
        "Requests shed at the in-flight bound",
        w.requests_overloaded,
    );
    counter(
        &mut reg,
        "wire_calls_timed_out",
        "Client calls that hit their deadline",
        w.calls_timed_out,
    );
    bound_metrics(&mut reg, inner, &w, admin);
    service_metrics(&mut reg, inner);
    resource_metrics(&mut reg, inner, &st);
    counter(
        &mut reg,
        "accusations_ignored",
        "Accusations the coordinator dropped (accuser not eligible, or over the pending bound)",
        st.ignored_accusations,
    );
    reg.register(
        "rpc_refused",
        "Requests refused by authorisation (who may send what under which epoch), by reason",
        inner.rpc.refused.clone(),
    );
    reg.register(
        "rpc_requests",
        "Requests served, by kind",
        inner.rpc.requests.clone(),
    );
    reg.register(
        "rpc_errors",
        "Requests answered with an error, by kind",
        inner.rpc.errors.clone(),
    );
    reg.register(
        "rpc_latency_seconds",
        "Time to serve a request, by kind",
        inner.rpc.latency.clone(),
    );
    let r = inner.watchdog.report();
    reg.register(
        "event_loop_lag_seconds",
        "Event-loop lag of every watchdog tick since start",
        inner.watchdog.lag_histogram(),
    );
    for (name, help, v) in [
        (
            "event_loop_lag_p50_seconds",
            "Median event-loop lag over the watchdog's window",
            r.lag_p50_ms,
        ),
        (
            "event_loop_lag_p99_seconds",
            "99th percentile event-loop lag over the watchdog's window",
            r.lag_p99_ms,
        ),
        (
            "event_loop_lag_max_seconds",
            "Largest event-loop lag since start",
            r.lag_max_ms,
        ),
    ] {
        gauge_f(&mut reg, name, help, v / 1000.0);
    }
    counter(
        &mut reg,
        "event_loop_late_ticks",
        "Watchdog ticks later than watchdog.lag_alarm_ms",
        r.late_ticks,
    );
    gauge(
        &mut reg,
        "handlers_in_flight",
        "Handlers running now",
        r.in_flight_total as i64,
    );
    gauge_f(
        &mut reg,
        "handler_oldest_seconds",
        "How long the oldest handler in flight has run",
        r.in_flight
            .first()
            .map(|h| h.for_ms as f64 / 1000.0)
            .unwrap_or(0.0),
    );
    counter(&mut reg, "alarms", "Alarms this node raised", r.alarms);
    if let Some(log) = inner.log.get() {
        let s = log.stats();
        let written: Family<ChannelLabel, Counter> = Family::default();
        let dropped: Family<DropLabel, Counter> = Family::default();
        for c in &s.channels {
            written
                .get_or_create(&ChannelLabel {
                    channel: c.channel.clone(),
                })
                .inc_by(c.written);
            dropped
                .get_or_create(&DropLabel {
                    channel: c.channel.clone(),
                    reason: "queue_full".into(),
                })
                .inc_by(c.dropped_queue_full);
            dropped
                .get_or_create(&DropLabel {
                    channel: c.channel.clone(),
                    reason: "rate_limited".into(),
                })
                .inc_by(c.dropped_rate_limited);
        }
        reg.register(
            "log_lines_written",
            "Log lines written, by channel",
            written,
        );
        reg.register(
            "log_lines_dropped",
            "Log lines dropped (never waited for), by channel and reason",
            dropped,
        );
        let queued: Family<SinkLabel, Gauge> = Family::default();
        let stalled: Family<SinkLabel, Gauge> = Family::default();
        for k in &s.sinks {
            queued
                .get_or_create(&SinkLabel {
                    sink: k.name.clone(),
                })
                .set(k.queued as i64);
            stalled
                .get_or_create(&SinkLabel {
                    sink: k.name.clone(),
                })
                .set(i64::from(k.stalled));
        }
        reg.register(
            "log_sink_queued",
            "Records waiting in a sink's queue",
            queued,
        );
        reg.register(
            "log_sink_stalled",
            "1 while a sink is stalled (fault hook)",
            stalled,
        );
    }
    crate::backup::metrics(&mut reg, &st, crate::clock::now_ms());
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
        out = format!("# metrics encoding failed: {e}\n");
    }
    out
}
