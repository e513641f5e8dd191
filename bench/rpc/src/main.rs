//! `orrery-bench-rpc`: request/response throughput and latency of orrery-wire
//! (`serve` + `connect`/`Channel::call`), plain and over mutual TLS 1.3, side by side
//! with a tonic gRPC unary echo, plain and over mutual TLS 1.3, over 127.0.0.1, at
//! several concurrency levels and payload sizes; and the cost of setting up one
//! connection (TCP connect + TLS + handshake) for each.
//!
//! Setup (printed in the output header too): the servers run on one Tokio runtime
//! (`--server-threads` workers, threads named `bench-srv`), the load generator and
//! the RPC clients on another (`--client-threads` workers, `bench-cli`). Each system
//! uses exactly one TCP connection per cell, multiplexing `concurrency` closed-loop
//! callers. Each cell warms up, then measures for a fixed time, then stops by itself.
//! The TLS systems use the same certificates (one orrery cluster CA, ECDSA P-256), TLS
//! 1.3, mutual authentication and rustls' `ring` provider on both sides.

#![allow(clippy::disallowed_methods)] // A benchmark measures wall time.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use orrery_core::Role;
use orrery_trust::{names, ClusterCa, NodeCredentials, Revocations, TrustConfig, TrustError};
use orrery_wire::{
    BoxFuture, CancellationToken, Channel, Handler, Message, PeerInfo, WireConfig, WireStats,
};
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

mod pb {
    tonic::include_proto!("orrery.bench");
}

use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};
use pb::{EchoReply, EchoRequest};

const USAGE: &str = "\
orrery-bench-rpc: orrery-wire RPC vs tonic gRPC unary echo over 127.0.0.1, plain and mutual TLS 1.3

USAGE: orrery-bench-rpc [FLAGS]

  --secs S             measured seconds per cell               (default 3)
  --warmup S           warm-up seconds per cell, not measured  (default 1)
  --concurrency LIST   in-flight calls per cell, comma list    (default 1,16,64,256)
  --payload LIST       payload bytes, comma list               (default 64,1024)
  --systems LIST       orrery,orrery-bytes,orrery-tls,tonic,tonic-tls (default all five)
  --handshakes N       fresh connections timed per system, 0 = skip (default 200)
  --server-threads N   worker threads of the server runtime    (default 1)
  --client-threads N   worker threads of the client runtime    (default 1)
  --rounds N           repeat each cell N times, systems interleaved, results merged (default 1)
  --timeout-ms MS      per-call and per-connect timeout        (default 5000)
  -h, --help           this text
";

/// The benchmark's cluster: its id (the CA's and both `WireConfig`s'), HMAC secret,
/// and the two nodes (the server and the client).
const CLUSTER_ID: &str = "bench-rpc";
const SECRET: &[u8] = b"bench-rpc-secret";
const SERVER_NODE: u64 = 1;
const CLIENT_NODE: u64 = 2;

/// Targets printed beside the figures (issue 10): TLS may cost orrery at most this share
/// of its throughput at this concurrency ...
const TLS_COST_TARGET_PCT: f64 = 15.0;
const TLS_COST_TARGET_CONC: usize = 16;
/// ... and orrery must do at least this many times tonic's calls/s, at equal or better p99.
const SPEEDUP_TARGET: f64 = 2.0;

/// Unmeasured connections before the timed ones of `--handshakes`.
const HANDSHAKE_WARMUP: usize = 10;

// ---------------------------------------------------------------------------------
// Arguments

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum System {
    /// orrery-wire with the payload as `Vec<u8>` (what orrery-node's messages use).
    Orrery,
    /// orrery-wire with the payload as `bytes::Bytes` (serde `serialize_bytes`).
    OrreryBytes,
    /// `Orrery` inside mutual TLS 1.3 (`WireConfig::trust`).
    OrreryTls,
    /// tonic 0.14 gRPC unary (HTTP/2, prost).
    Tonic,
    /// `Tonic` inside mutual TLS 1.3 (tonic's rustls TLS, `https://`).
    TonicTls,
}

impl System {
    const ALL: [System; 5] = [
        System::Orrery,
        System::OrreryBytes,
        System::OrreryTls,
        System::Tonic,
        System::TonicTls,
    ];

    fn name(self) -> &'static str {
        match self {
            System::Orrery => "orrery",
            System::OrreryBytes => "orrery-bytes",
            System::OrreryTls => "orrery-tls",
            System::Tonic => "tonic",
            System::TonicTls => "tonic-tls",
        }
    }

    fn parse(s: &str) -> Result<Self, String> {
        System::ALL
            .into_iter()
            .find(|sys| sys.name() == s)
            .ok_or_else(|| format!("unknown system {s:?}"))
    }

    fn tls(self) -> bool {
        matches!(self, System::OrreryTls | System::TonicTls)
    }
}

struct Args {
    secs: f64,
    warmup: f64,
    concurrency: Vec<usize>,
    payloads: Vec<usize>,
    systems: Vec<System>,
    handshakes: usize,
    server_threads: usize,
    client_threads: usize,
    timeout: Duration,
    rounds: usize,
}

fn parse_list<T: std::str::FromStr>(flag: &str, v: &str) -> Result<Vec<T>, String> {
    v.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim()
                .parse::<T>()
                .map_err(|_| format!("{flag}: bad value {s:?}"))
        })
        .collect()
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        secs: 3.0,
        warmup: 1.0,
        concurrency: vec![1, 16, 64, 256],
        payloads: vec![64, 1024],
        systems: System::ALL.to_vec(),
        handshakes: 200,
        server_threads: 1,
        client_threads: 1,
        timeout: Duration::from_millis(5000),
        rounds: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (flag.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let num = |v: String| {
            v.parse::<f64>()
                .map_err(|_| format!("{name}: bad number {v:?}"))
        };
        let int = |v: String| {
            v.parse::<usize>()
                .map_err(|_| format!("{name}: bad integer {v:?}"))
        };
        match name.as_str() {
            "--secs" => a.secs = num(value()?)?,
            "--warmup" => a.warmup = num(value()?)?,
            "--concurrency" => a.concurrency = parse_list(&name, &value()?)?,
            "--payload" => a.payloads = parse_list(&name, &value()?)?,
            "--systems" => {
                a.systems = value()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| System::parse(s.trim()))
                    .collect::<Result<_, _>>()?
            }
            "--handshakes" => a.handshakes = int(value()?)?,
            "--server-threads" => a.server_threads = int(value()?)?,
            "--client-threads" => a.client_threads = int(value()?)?,
            "--rounds" => a.rounds = int(value()?)?,
            "--timeout-ms" => a.timeout = Duration::from_millis(int(value()?)? as u64),
            other => return Err(format!("unknown flag {other:?}")),
        }
    }
    if !(a.secs > 0.0 && a.secs <= 600.0 && (0.0..=600.0).contains(&a.warmup)) {
        return Err("--secs must be in (0, 600] and --warmup in [0, 600]".into());
    }
    if a.concurrency.is_empty() || a.concurrency.iter().any(|&c| c == 0 || c > 4096) {
        return Err("--concurrency values must be in 1..=4096".into());
    }
    if a.payloads.is_empty() || a.payloads.iter().any(|&p| p > 1 << 20) {
        return Err("--payload values must be at most 1 MiB".into());
    }
    if a.rounds == 0 || a.rounds > 100 {
        return Err("--rounds must be in 1..=100".into());
    }
    if a.handshakes > 100_000 {
        return Err("--handshakes must be at most 100000".into());
    }
    if a.systems.is_empty() || a.server_threads == 0 || a.client_threads == 0 {
        return Err("need at least one system and one thread per runtime".into());
    }
    Ok(a)
}

// ---------------------------------------------------------------------------------
// Certificates

/// The credentials of the TLS systems, issued once per run by one cluster CA: the
/// server is node 1, the client node 2, both voters. orrery-tls and tonic-tls use the
/// very same certificates and keys (ECDSA P-256).
struct Keys {
    server: NodeCredentials,
    client: NodeCredentials,
    server_trust: TrustConfig,
    client_trust: TrustConfig,
    /// The DNS name in the server's certificate, which the tonic client checks.
    server_name: String,
}

impl Keys {
    fn issue() -> Result<Self, TrustError> {
        let mut ca = ClusterCa::init(CLUSTER_ID)?;
        let server = ca.issue_next(SERVER_NODE, Role::Voter)?;
        let client = ca.issue_next(CLIENT_NODE, Role::Voter)?;
        Ok(Keys {
            server_trust: TrustConfig::new(&server, Revocations::default())?,
            client_trust: TrustConfig::new(&client, Revocations::default())?,
            server_name: names::node_dns_name(ca.cluster_id(), SERVER_NODE),
            server,
            client,
        })
    }
}

fn tonic_identity(creds: &NodeCredentials) -> Identity {
    Identity::from_pem(creds.cert_pem(), creds.key_pem())
}

// ---------------------------------------------------------------------------------
// orrery-wire echo

#[derive(Serialize, Deserialize)]
struct EchoVec {
    payload: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct EchoBytes {
    payload: bytes::Bytes,
}

struct OrreryEcho;

impl Handler<EchoVec, EchoVec> for OrreryEcho {
    fn handle<'a>(&'a self, _peer: &'a PeerInfo, req: EchoVec) -> BoxFuture<'a, EchoVec> {
        Box::pin(async move { req })
    }
}

impl Handler<EchoBytes, EchoBytes> for OrreryEcho {
    fn handle<'a>(&'a self, _peer: &'a PeerInfo, req: EchoBytes) -> BoxFuture<'a, EchoBytes> {
        Box::pin(async move { req })
    }
}

fn wire_config(node_id: u64, concurrency: usize, trust: Option<&TrustConfig>) -> Arc<WireConfig> {
    let mut cfg = WireConfig::new(CLUSTER_ID, SECRET, node_id, 1);
    // Defaults (256) already fit the default concurrency levels; only raise it when a
    // cell asks for more in flight than the default bound.
    cfg.max_inflight_per_connection = cfg.max_inflight_per_connection.max(concurrency);
    cfg.trust = trust.cloned();
    Arc::new(cfg)
}

// ---------------------------------------------------------------------------------
// tonic echo

struct TonicEcho;

#[tonic::async_trait]
impl Echo for TonicEcho {
    async fn echo(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        Ok(tonic::Response::new(EchoReply {
            payload: request.into_inner().payload,
        }))
    }
}

// ---------------------------------------------------------------------------------
// Servers (on the server runtime)

struct RunningServer {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RunningServer {
    fn stop(self, rt: &Runtime) {
        self.shutdown.cancel();
        let task = self.task;
        rt.block_on(async move {
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                eprintln!("warning: server did not stop within 5 s");
            }
        });
    }
}

fn start_server(
    rt: &Runtime,
    system: System,
    concurrency: usize,
    keys: &Keys,
) -> Result<RunningServer, String> {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| format!("bind: {e}"))?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let trust = system.tls().then_some(&keys.server_trust);
    let task = match system {
        System::Orrery | System::OrreryTls => rt.spawn(orrery_wire::serve::<EchoVec, EchoVec, _>(
            listener,
            wire_config(SERVER_NODE, concurrency, trust),
            Arc::new(OrreryEcho),
            Arc::new(WireStats::new()),
            stop,
        )),
        System::OrreryBytes => rt.spawn(orrery_wire::serve::<EchoBytes, EchoBytes, _>(
            listener,
            wire_config(SERVER_NODE, concurrency, trust),
            Arc::new(OrreryEcho),
            Arc::new(WireStats::new()),
            stop,
        )),
        System::Tonic | System::TonicTls => {
            let mut builder = tonic::transport::Server::builder()
                .max_concurrent_streams(Some(concurrency.max(1024) as u32));
            if system.tls() {
                let tls = ServerTlsConfig::new()
                    .identity(tonic_identity(&keys.server))
                    .client_ca_root(Certificate::from_pem(keys.server.ca_cert_pem()));
                builder = builder
                    .tls_config(tls)
                    .map_err(|e| format!("tonic TLS config: {e}"))?;
            }
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            rt.spawn(async move {
                let res = builder
                    .add_service(EchoServer::new(TonicEcho))
                    .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                    .await;
                if let Err(e) = res {
                    eprintln!("tonic server failed: {e}");
                }
            })
        }
    };
    Ok(RunningServer {
        addr,
        shutdown,
        task,
    })
}

// ---------------------------------------------------------------------------------
// Clients (on the client runtime)

/// An orrery-wire connection about to be made.
struct WireDial {
    addr: String,
    cfg: Arc<WireConfig>,
    stats: Arc<WireStats>,
}

impl WireDial {
    async fn connect<M: Message>(&self) -> Result<Channel<M, M>, String> {
        orrery_wire::connect(
            SERVER_NODE,
            &self.addr,
            self.cfg.clone(),
            self.stats.clone(),
        )
        .await
        .map_err(|e| format!("orrery connect: {e}"))
    }
}

/// A connection about to be made: everything but the connect itself (configurations,
/// parsed certificates) is built up front, so timing [`Dialer::connect`] times only
/// the connection set-up.
enum Dialer {
    Vec(WireDial),
    Bytes(WireDial),
    Tonic(Box<Endpoint>),
}

impl Dialer {
    fn new(
        system: System,
        addr: SocketAddr,
        concurrency: usize,
        keys: &Keys,
    ) -> Result<Self, String> {
        let trust = system.tls().then_some(&keys.client_trust);
        let wire = || WireDial {
            addr: addr.to_string(),
            cfg: wire_config(CLIENT_NODE, concurrency, trust),
            stats: Arc::new(WireStats::new()),
        };
        match system {
            System::Orrery | System::OrreryTls => Ok(Dialer::Vec(wire())),
            System::OrreryBytes => Ok(Dialer::Bytes(wire())),
            System::Tonic | System::TonicTls => {
                let scheme = if system.tls() { "https" } else { "http" };
                let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
                    .map_err(|e| format!("tonic endpoint: {e}"))?
                    .tcp_nodelay(true)
                    .connect_timeout(Duration::from_secs(5));
                if system.tls() {
                    // A fresh rustls client config per Endpoint: no session to resume.
                    let tls = ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(keys.client.ca_cert_pem()))
                        .identity(tonic_identity(&keys.client))
                        .domain_name(keys.server_name.clone());
                    endpoint = endpoint
                        .tls_config(tls)
                        .map_err(|e| format!("tonic TLS config: {e}"))?;
                }
                Ok(Dialer::Tonic(Box::new(endpoint)))
            }
        }
    }

    /// Connects, bounded by `timeout` (tonic bounds only its TCP connect itself).
    async fn connect(&self, timeout: Duration) -> Result<Client, String> {
        let connect = async {
            match self {
                Dialer::Vec(wire) => wire.connect().await.map(Client::Vec),
                Dialer::Bytes(wire) => wire.connect().await.map(Client::Bytes),
                Dialer::Tonic(endpoint) => endpoint
                    .connect()
                    .await
                    .map(|ch| Client::Tonic(EchoClient::new(ch)))
                    .map_err(|e| format!("tonic connect: {e}")),
            }
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| format!("connect timed out after {timeout:?}"))?
    }
}

/// One open connection; clones share it.
#[derive(Clone)]
enum Client {
    Vec(Channel<EchoVec, EchoVec>),
    Bytes(Channel<EchoBytes, EchoBytes>),
    Tonic(EchoClient<tonic::transport::Channel>),
}

/// The payload, in the form each system's request carries it.
struct Body {
    vec: Vec<u8>,
    bytes: bytes::Bytes,
}

impl Body {
    fn new(len: usize) -> Self {
        let vec = vec![0xA5u8; len];
        Body {
            bytes: bytes::Bytes::from(vec.clone()),
            vec,
        }
    }
}

impl Client {
    /// One echo call; checks that the payload came back whole.
    async fn call(&self, body: &Body, timeout: Duration) -> Result<(), String> {
        let got = match self {
            Client::Vec(ch) => {
                let req = EchoVec {
                    payload: body.vec.clone(),
                };
                ch.call(req, timeout)
                    .await
                    .map_err(|e| e.to_string())?
                    .payload
                    .len()
            }
            Client::Bytes(ch) => {
                // A refcount bump, no copy: the Bytes variant is zero-copy on send.
                let req = EchoBytes {
                    payload: body.bytes.clone(),
                };
                ch.call(req, timeout)
                    .await
                    .map_err(|e| e.to_string())?
                    .payload
                    .len()
            }
            Client::Tonic(client) => {
                let mut req = tonic::Request::new(EchoRequest {
                    payload: body.vec.clone(),
                });
                req.set_timeout(timeout);
                let resp = client.clone().echo(req).await.map_err(|e| e.to_string())?;
                resp.into_inner().payload.len()
            }
        };
        if got == body.vec.len() {
            Ok(())
        } else {
            Err(format!(
                "echo returned {got} bytes, sent {}",
                body.vec.len()
            ))
        }
    }
}

// ---------------------------------------------------------------------------------
// Load generation (on the client runtime)

/// What one closed-loop caller saw inside the measurement window.
struct Tally {
    hist: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

fn new_hist() -> Histogram<u64> {
    // 1 ns .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

fn record(hist: &mut Histogram<u64>, d: Duration) {
    let ns = d.as_nanos().min(u128::from(u64::MAX)) as u64;
    hist.saturating_record(ns.max(1));
}

/// One caller: issue a call, wait for the answer, repeat, until `end`. Only calls
/// that start at or after `measure_from` and finish by `end` are counted.
async fn caller(
    client: Client,
    body: Arc<Body>,
    timeout: Duration,
    measure_from: Instant,
    end: Instant,
) -> Tally {
    let mut tally = Tally {
        hist: new_hist(),
        errors: 0,
        first_error: None,
    };
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        let outcome = client.call(&body, timeout).await;
        let t1 = Instant::now();
        let counted = t0 >= measure_from && t1 <= end;
        match outcome {
            Ok(()) if counted => record(&mut tally.hist, t1 - t0),
            Ok(()) => {}
            Err(e) => {
                tally.errors += 1;
                tally.first_error.get_or_insert(e);
                // Do not spin on a broken connection.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    tally
}

/// Connect, run `concurrency` callers for warm-up + measurement, merge their tallies.
async fn drive(
    dialer: Dialer,
    payload: usize,
    concurrency: usize,
    warmup: Duration,
    measure: Duration,
    timeout: Duration,
) -> Result<(Tally, Window), String> {
    // Connection set-up (TCP, TLS, handshake) comes before the warm-up.
    let client = dialer.connect(timeout).await?;
    let body = Arc::new(Body::new(payload));
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + measure;
    let mut callers: tokio::task::JoinSet<Tally> = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        callers.spawn(caller(
            client.clone(),
            body.clone(),
            timeout,
            measure_from,
            end,
        ));
    }

    tokio::time::sleep_until(measure_from.into()).await;
    let cpu_before = thread_cpu();
    tokio::time::sleep_until(end.into()).await;
    let cpu_after = thread_cpu();
    let window = Window {
        secs: measure.as_secs_f64(),
        cpu_before,
        cpu_after,
    };

    // Every caller stops by itself after `end`; its last call is bounded by `timeout`.
    let mut total = Tally {
        hist: new_hist(),
        errors: 0,
        first_error: None,
    };
    let collect = async {
        while let Some(res) = callers.join_next().await {
            match res {
                Ok(t) => {
                    total.hist.add(&t.hist).expect("same histogram bounds");
                    total.errors += t.errors;
                    if total.first_error.is_none() {
                        total.first_error = t.first_error;
                    }
                }
                Err(e) => return Err(format!("caller task failed: {e}")),
            }
        }
        Ok(())
    };
    tokio::time::timeout(timeout + Duration::from_secs(2), collect)
        .await
        .map_err(|_| "callers did not stop in time".to_string())??;
    Ok((total, window))
}

// ---------------------------------------------------------------------------------
// Connection set-up cost (`--handshakes`)

/// What `n` fresh connections to one server cost, one after the other.
struct SetupCost {
    /// The system's connect call: TCP connect + TLS (if any) + its own handshake.
    connect: Histogram<u64>,
    /// Connect + the first echo answered: the connection proven usable both ways.
    ready: Histogram<u64>,
}

/// Opens `HANDSHAKE_WARMUP` unmeasured, then `n` measured fresh connections to `addr`,
/// one after the other; each makes one call and is closed.
async fn setups(
    system: System,
    addr: SocketAddr,
    keys: &Keys,
    body: &Body,
    n: usize,
    timeout: Duration,
) -> Result<SetupCost, String> {
    let mut cost = SetupCost {
        connect: new_hist(),
        ready: new_hist(),
    };
    for i in 0..HANDSHAKE_WARMUP + n {
        // Built afresh each time (outside the timing): nothing carries over between
        // connections, so no TLS session can be resumed.
        let dialer = Dialer::new(system, addr, 1, keys)?;
        let t0 = Instant::now();
        let client = dialer.connect(timeout).await?;
        let t1 = Instant::now();
        client.call(body, timeout).await?;
        let t2 = Instant::now();
        if i >= HANDSHAKE_WARMUP {
            record(&mut cost.connect, t1 - t0);
            record(&mut cost.ready, t2 - t0);
        }
    }
    Ok(cost)
}

/// Runs the connection set-up cell for every selected system except orrery-bytes
/// (its connect is orrery's), then, if a TLS system is among them, the TLS handshake
/// alone; prints the table.
fn print_setups(server_rt: &Runtime, client_rt: &Runtime, args: &Args, keys: &Keys) -> bool {
    let systems: Vec<System> = args
        .systems
        .iter()
        .copied()
        .filter(|&s| s != System::OrreryBytes)
        .collect();
    if systems.is_empty() {
        return true;
    }
    let payload = args.payloads[0];
    let body = Body::new(payload);
    println!();
    println!(
        "# connection set-up: {} fresh connections per system, one after another (after {HANDSHAKE_WARMUP} unmeasured), each to the same server, then closed",
        args.handshakes
    );
    println!("#   connect = the system's connect call returns: TCP connect + TLS 1.3 mutual handshake (-tls) + orrery's HMAC handshake / tonic's HTTP/2 preface");
    println!("#   ready   = connect + the first echo ({payload} B) answered; under TLS 1.3 a client's connect can return before the server has checked its certificate (tonic's does), the first answer proves it was accepted");
    let header = format!(
        "{:<13} {:>6} {:>15} {:>15} {:>13} {:>13}",
        "system", "conns", "connect p50 µs", "connect p99 µs", "ready p50 µs", "ready p99 µs"
    );
    println!("{header}");
    println!("{}", "-".repeat(header.chars().count()));
    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let mut ok = true;
    for &system in &systems {
        let outcome = start_server(server_rt, system, 1, keys).and_then(|server| {
            let cost = client_rt.block_on(setups(
                system,
                server.addr,
                keys,
                &body,
                args.handshakes,
                args.timeout,
            ));
            server.stop(server_rt);
            cost
        });
        match outcome {
            Ok(c) => println!(
                "{:<13} {:>6} {:>15.1} {:>15.1} {:>13.1} {:>13.1}",
                system.name(),
                args.handshakes,
                us(&c.connect, 0.50),
                us(&c.connect, 0.99),
                us(&c.ready, 0.50),
                us(&c.ready, 0.99),
            ),
            Err(e) => {
                println!("{:<13} {:>6} FAILED: {e}", system.name(), args.handshakes);
                ok = false;
            }
        }
    }
    if !systems.iter().any(|s| s.tls()) {
        return ok;
    }
    match client_rt.block_on(orrery_trust::bench_handshakes(args.handshakes)) {
        Ok(c) => println!(
            "{:<13} {:>6} {:>15.1} {:>15.1}    (orrery_trust::bench_handshakes: TLS 1.3 mutual handshake alone, both sides in memory on the client runtime, no TCP)",
            "tls-only",
            c.n,
            c.p50.as_secs_f64() * 1e6,
            c.p99.as_secs_f64() * 1e6,
        ),
        Err(e) => {
            println!("{:<13} {:>6} FAILED: {e}", "tls-only", args.handshakes);
            ok = false;
        }
    }
    ok
}

// ---------------------------------------------------------------------------------
// CPU accounting per runtime (Linux /proc; zeros elsewhere)

#[derive(Clone, Copy, Default)]
struct Cpu {
    /// Clock ticks (utime + stime) of the threads named `bench-srv*`.
    srv: u64,
    /// Clock ticks of the threads named `bench-cli*`.
    cli: u64,
    /// Busy clock ticks of the whole machine (all CPUs, /proc/stat).
    machine: u64,
    /// Clock ticks of this whole process.
    own: u64,
}

fn thread_cpu() -> Cpu {
    let mut cpu = Cpu::default();
    if let Ok(stat) = std::fs::read_to_string("/proc/stat") {
        if let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) {
            let f: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            // user nice system idle iowait irq softirq steal: busy excludes idle, iowait.
            cpu.machine = [0usize, 1, 2, 5, 6, 7]
                .iter()
                .map(|&i| f.get(i).copied().unwrap_or(0))
                .sum();
        }
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        if let Some((_, rest)) = stat.rsplit_once(')') {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| {
                f.get(i - 3)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            cpu.own = ticks(14) + ticks(15);
        }
    }
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return cpu;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        // Fields after the ")" that closes the command name: state is field 3,
        // utime field 14, stime field 15 (1-based, whole line).
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            f.get(i - 3)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let t = ticks(14) + ticks(15);
        if comm.starts_with("bench-srv") {
            cpu.srv += t;
        } else if comm.starts_with("bench-cli") {
            cpu.cli += t;
        }
    }
    cpu
}

/// Assumed USER_HZ (100 on every mainstream Linux).
const TICKS_PER_SEC: f64 = 100.0;

struct Window {
    secs: f64,
    cpu_before: Cpu,
    cpu_after: Cpu,
}

// ---------------------------------------------------------------------------------
// Results

struct Cell {
    system: System,
    payload: usize,
    concurrency: usize,
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    errors: u64,
    srv_cpu: f64,
    cli_cpu: f64,
    /// Cores' worth of CPU used by other processes during the windows.
    bg_cpu: f64,
}

impl Cell {
    /// CPU time (both runtimes) per completed call, in µs.
    fn cpu_us_per_call(&self) -> f64 {
        if self.rate <= 0.0 {
            return 0.0;
        }
        (self.srv_cpu + self.cli_cpu) * 1e6 / self.rate
    }
}

/// One cell, possibly over several rounds: the sum of what the rounds measured.
struct Acc {
    hist: Histogram<u64>,
    errors: u64,
    secs: f64,
    srv: u64,
    cli: u64,
    bg: u64,
}

impl Acc {
    fn new() -> Self {
        Acc {
            hist: new_hist(),
            errors: 0,
            secs: 0.0,
            srv: 0,
            cli: 0,
            bg: 0,
        }
    }

    fn cell(&self, system: System, payload: usize, concurrency: usize) -> Cell {
        let h = &self.hist;
        let us = |ns: u64| ns as f64 / 1000.0;
        let share = |ticks: u64| ticks as f64 / TICKS_PER_SEC / self.secs.max(1e-9);
        Cell {
            system,
            payload,
            concurrency,
            rate: h.len() as f64 / self.secs.max(1e-9),
            p50_us: us(h.value_at_quantile(0.50)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            errors: self.errors,
            srv_cpu: share(self.srv),
            cli_cpu: share(self.cli),
            bg_cpu: share(self.bg),
        }
    }
}

/// Run one round of one cell and add it to `acc`.
#[allow(clippy::too_many_arguments)]
fn run_once(
    server_rt: &Runtime,
    client_rt: &Runtime,
    args: &Args,
    keys: &Keys,
    system: System,
    payload: usize,
    concurrency: usize,
    acc: &mut Acc,
) -> Result<(), String> {
    let server = start_server(server_rt, system, concurrency, keys)
        .map_err(|e| format!("cannot start {} server: {e}", system.name()))?;
    let outcome = Dialer::new(system, server.addr, concurrency, keys).map(|dialer| {
        client_rt.block_on(drive(
            dialer,
            payload,
            concurrency,
            Duration::from_secs_f64(args.warmup),
            Duration::from_secs_f64(args.secs),
            args.timeout,
        ))
    });
    server.stop(server_rt);
    let (tally, w) = outcome??;
    if let Some(e) = &tally.first_error {
        eprintln!(
            "warning: {} payload={payload} c={concurrency}: {} errors, first: {e}",
            system.name(),
            tally.errors
        );
    }
    acc.hist.add(&tally.hist).expect("same histogram bounds");
    acc.errors += tally.errors;
    acc.secs += w.secs;
    let (a, b) = (w.cpu_after, w.cpu_before);
    acc.srv += a.srv.saturating_sub(b.srv);
    acc.cli += a.cli.saturating_sub(b.cli);
    acc.bg += a
        .machine
        .saturating_sub(b.machine)
        .saturating_sub(a.own.saturating_sub(b.own));
    Ok(())
}

fn runtime(name: &'static str, threads: usize) -> std::io::Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .max_blocking_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
}

fn human_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2}M", r / 1e6)
    } else if r >= 1e3 {
        format!("{:.1}k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

/// The cells of one run, looked up by system, payload and concurrency.
struct Results<'a> {
    cells: &'a [Cell],
    payloads: &'a [usize],
    concurrency: &'a [usize],
}

impl Results<'_> {
    fn find(&self, s: System, payload: usize, concurrency: usize) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|x| x.system == s && x.payload == payload && x.concurrency == concurrency)
    }

    /// Every (payload, concurrency) at which both systems have a cell.
    fn pairs(&self, a: System, b: System) -> Vec<(&Cell, &Cell)> {
        let mut out = Vec::new();
        for &payload in self.payloads {
            for &concurrency in self.concurrency {
                if let (Some(x), Some(y)) = (
                    self.find(a, payload, concurrency),
                    self.find(b, payload, concurrency),
                ) {
                    out.push((x, y));
                }
            }
        }
        out
    }

    /// Throughput `tls` loses against `plain` at each payload and concurrency; with
    /// `target`, the issue-10 bound is checked at `TLS_COST_TARGET_CONC`.
    fn print_tls_cost(&self, plain: System, tls: System, target: bool) {
        let pairs = self.pairs(plain, tls);
        if pairs.is_empty() {
            return;
        }
        let (p, t) = (plain.name(), tls.name());
        println!();
        let goal = if target {
            format!(
                "target: at most {TLS_COST_TARGET_PCT:.0} % at concurrency {TLS_COST_TARGET_CONC}"
            )
        } else {
            "for reference, no target".to_string()
        };
        println!("# TLS throughput cost, {t} vs {p}; {goal}");
        let mut checked = 0;
        for (x, y) in pairs {
            let cost = (1.0 - y.rate / x.rate.max(1e-9)) * 100.0;
            let mark = if target && x.concurrency == TLS_COST_TARGET_CONC {
                checked += 1;
                format!(
                    "  [target <= {TLS_COST_TARGET_PCT:.0} %: {}]",
                    verdict(cost <= TLS_COST_TARGET_PCT)
                )
            } else {
                String::new()
            };
            println!(
                "#   payload {:>5} conc {:>4}: {t} {} vs {p} {} calls/s = TLS costs {cost:.1} %; p99 {:.1} vs {:.1} µs{mark}",
                x.payload,
                x.concurrency,
                human_rate(y.rate),
                human_rate(x.rate),
                y.p99_us,
                x.p99_us,
            );
        }
        if target && checked == 0 {
            println!(
                "#   (no cell at concurrency {TLS_COST_TARGET_CONC}: the target was not measured)"
            );
        }
    }

    /// Throughput ratio `a`/`b` and p99s at each payload and concurrency, against the
    /// target "a >= 2x b at equal or better p99".
    fn print_versus(&self, a: System, b: System) {
        let pairs = self.pairs(a, b);
        if pairs.is_empty() {
            return;
        }
        let (an, bn) = (a.name(), b.name());
        let mut out = String::new();
        let mut ratios = Vec::new();
        let mut met = 0;
        for (x, y) in pairs {
            let r = x.rate / y.rate.max(1e-9);
            let ok = r >= SPEEDUP_TARGET && x.p99_us <= y.p99_us;
            met += usize::from(ok);
            ratios.push(r);
            let _ = write!(
                out,
                "\n#   payload {:>5} conc {:>4}: {an}/{bn} calls/s = {r:.2}x ({} vs {}), p99 {:.1} vs {:.1} µs  [target: {}]",
                x.payload,
                x.concurrency,
                human_rate(x.rate),
                human_rate(y.rate),
                x.p99_us,
                y.p99_us,
                verdict(ok),
            );
        }
        println!();
        println!("# {an} vs {bn} at equal payload and concurrency; target: >= {SPEEDUP_TARGET:.0}x calls/s at equal or better p99{out}");
        let geo = (ratios.iter().map(|r| r.ln()).sum::<f64>() / ratios.len() as f64).exp();
        let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let max = ratios.iter().copied().fold(0.0, f64::max);
        println!(
            "{an}/{bn} throughput ratio at equal concurrency: geomean {geo:.2}x (min {min:.2}x, max {max:.2}x); target >= {SPEEDUP_TARGET:.0}x at equal or better p99 met in {met}/{} cells",
            ratios.len()
        );
    }
}

fn print_header(args: &Args) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cells_n = args.systems.len() * args.payloads.len() * args.concurrency.len() * args.rounds;
    let per_cell = args.warmup + args.secs;
    println!("# orrery bench rpc — request/response echo over 127.0.0.1, plain and mutual TLS 1.3");
    println!(
        "# machine: {cores} cores; server runtime: {} worker thread(s) (bench-srv), client runtime: {} worker thread(s) (bench-cli), separate OS threads",
        args.server_threads, args.client_threads
    );
    println!(
        "# per cell: fresh server + one TCP connection (TCP_NODELAY), `concurrency` closed-loop callers multiplexed on it; {:.1} s warm-up + {:.1} s measured, x{} round(s) interleaved and merged; {} runs, ~{:.0} s",
        args.warmup,
        args.secs,
        args.rounds,
        cells_n,
        cells_n as f64 * per_cell
    );
    println!("# orrery       = orrery-wire serve + connect/Channel::call, HMAC handshake, postcard frames; payload Vec<u8> (as orrery-node messages); default WireConfig");
    println!("# orrery-bytes = same, payload bytes::Bytes (serde serialize_bytes)");
    println!("# orrery-tls   = orrery inside mutual TLS 1.3 (WireConfig::trust: orrery-trust's rustls configs, no resumption), then the HMAC handshake");
    println!("# tonic        = tonic 0.14 gRPC unary over HTTP/2, prost `bytes` field (Vec<u8>), tonic/hyper defaults, max_concurrent_streams >= 1024");
    println!("# tonic-tls    = tonic over https: tonic's rustls TLS (ServerTlsConfig with client_ca_root, ClientTlsConfig with identity), mutual auth, TLS 1.3 negotiated");
    println!("# TLS: one cluster CA, the same ECDSA P-256 node certificates for orrery-tls and tonic-tls (server node {SERVER_NODE}, client node {CLIENT_NODE}); rustls ring provider on both");
    println!("# latency: per call, client side, issue -> response decoded (hdrhistogram, 3 sig. digits); calls/s = calls completed in the window / window");
    println!("# CPU: share of one core used by each runtime's threads during the window (from /proc, 10 ms ticks); CPU µs/call = (srv + cli) / calls/s;");
    println!("#   bg% = CPU used by OTHER processes on this machine meanwhile (cores x 100): anything but ~0 means the figures are disturbed");
    println!();
}

/// Runs every (payload, concurrency) cell for every system and prints its row.
fn run_cells(
    server_rt: &Runtime,
    client_rt: &Runtime,
    args: &Args,
    keys: &Keys,
) -> (Vec<Cell>, bool) {
    let header = format!(
        "{:<13} {:>7} {:>6} {:>10} {:>9} {:>9} {:>9} {:>9} {:>5} {:>5} {:>5} {:>7} {:>5}",
        "system",
        "payload",
        "conc",
        "calls/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs",
        "errs",
        "srv%",
        "cli%",
        "µs/call",
        "bg%"
    );
    println!("{header}");
    println!("{}", "-".repeat(header.chars().count()));

    let mut cells: Vec<Cell> = Vec::new();
    let mut ok = true;
    for &payload in &args.payloads {
        for &concurrency in &args.concurrency {
            // Rounds interleave the systems, so drifting background load hits them alike.
            let mut accs: Vec<(System, Acc, Option<String>)> = args
                .systems
                .iter()
                .map(|&s| (s, Acc::new(), None))
                .collect();
            for _round in 0..args.rounds {
                for (system, acc, err) in accs.iter_mut() {
                    if err.is_some() {
                        continue;
                    }
                    if let Err(e) = run_once(
                        server_rt,
                        client_rt,
                        args,
                        keys,
                        *system,
                        payload,
                        concurrency,
                        acc,
                    ) {
                        *err = Some(e);
                    }
                }
            }
            for (system, acc, err) in accs {
                if let Some(e) = err {
                    println!(
                        "{:<13} {:>7} {:>6} FAILED: {e}",
                        system.name(),
                        payload,
                        concurrency
                    );
                    ok = false;
                    continue;
                }
                let c = acc.cell(system, payload, concurrency);
                println!(
                    "{:<13} {:>7} {:>6} {:>10} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>5} {:>5.0} {:>5.0} {:>7.1} {:>5.0}",
                    c.system.name(),
                    c.payload,
                    c.concurrency,
                    human_rate(c.rate),
                    c.p50_us,
                    c.p99_us,
                    c.p999_us,
                    c.max_us,
                    c.errors,
                    c.srv_cpu * 100.0,
                    c.cli_cpu * 100.0,
                    c.cpu_us_per_call(),
                    c.bg_cpu * 100.0,
                );
                cells.push(c);
            }
        }
    }
    (cells, ok)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // tonic's rustls configs use the process-wide provider; make it ring, the one
    // orrery-trust names explicitly, so both sides run the same cryptography.
    if orrery_trust::rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        eprintln!("error: a rustls crypto provider was already installed");
        return ExitCode::FAILURE;
    }
    let keys = match Keys::issue() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: cannot issue the benchmark's certificates: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (server_rt, client_rt) = match (
        runtime("bench-srv", args.server_threads),
        runtime("bench-cli", args.client_threads),
    ) {
        (Ok(s), Ok(c)) => (s, c),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: cannot build runtimes: {e}");
            return ExitCode::FAILURE;
        }
    };

    print_header(&args);
    let (cells, mut ok) = run_cells(&server_rt, &client_rt, &args, &keys);
    if args.handshakes > 0 {
        ok &= print_setups(&server_rt, &client_rt, &args, &keys);
    }

    let results = Results {
        cells: &cells,
        payloads: &args.payloads,
        concurrency: &args.concurrency,
    };
    results.print_tls_cost(System::Orrery, System::OrreryTls, true);
    results.print_tls_cost(System::Tonic, System::TonicTls, false);
    results.print_versus(System::Orrery, System::Tonic);
    results.print_versus(System::OrreryTls, System::TonicTls);
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
