//! `orrery-bench-rpc`: request/response throughput and latency of orrery-wire
//! (`serve` + `connect`/`Channel::call`) side by side with a tonic gRPC unary echo,
//! over 127.0.0.1, at several concurrency levels and payload sizes.
//!
//! Setup (printed in the output header too): the servers run on one Tokio runtime
//! (`--server-threads` workers, threads named `bench-srv`), the load generator and
//! the RPC clients on another (`--client-threads` workers, `bench-cli`). Each system
//! uses exactly one TCP connection per cell, multiplexing `concurrency` closed-loop
//! callers. Each cell warms up, then measures for a fixed time, then stops by itself.

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use orrery_wire::{BoxFuture, CancellationToken, Handler, PeerInfo, WireConfig, WireStats};
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;

mod pb {
    tonic::include_proto!("orrery.bench");
}

use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};
use pb::{EchoReply, EchoRequest};

const USAGE: &str = "\
orrery-bench-rpc: orrery-wire RPC vs tonic gRPC unary echo over 127.0.0.1

USAGE: orrery-bench-rpc [FLAGS]

  --secs S             measured seconds per cell               (default 3)
  --warmup S           warm-up seconds per cell, not measured  (default 1)
  --concurrency LIST   in-flight calls per cell, comma list    (default 1,16,64,256)
  --payload LIST       payload bytes, comma list               (default 64,1024)
  --systems LIST       orrery,orrery-bytes,tonic               (default all three)
  --server-threads N   worker threads of the server runtime    (default 1)
  --client-threads N   worker threads of the client runtime    (default 1)
  --rounds N           repeat each cell N times, systems interleaved, results merged (default 1)
  --timeout-ms MS      per-call timeout                        (default 5000)
  -h, --help           this text
";

// ---------------------------------------------------------------------------------
// Arguments

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum System {
    /// orrery-wire with the payload as `Vec<u8>` (what orrery-node's messages use).
    Orrery,
    /// orrery-wire with the payload as `bytes::Bytes` (serde `serialize_bytes`).
    OrreryBytes,
    /// tonic 0.14 gRPC unary (HTTP/2, prost).
    Tonic,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Orrery => "orrery",
            System::OrreryBytes => "orrery-bytes",
            System::Tonic => "tonic",
        }
    }
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "orrery" => Ok(System::Orrery),
            "orrery-bytes" => Ok(System::OrreryBytes),
            "tonic" => Ok(System::Tonic),
            other => Err(format!("unknown system {other:?}")),
        }
    }
}

struct Args {
    secs: f64,
    warmup: f64,
    concurrency: Vec<usize>,
    payloads: Vec<usize>,
    systems: Vec<System>,
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
        systems: vec![System::Orrery, System::OrreryBytes, System::Tonic],
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
                    .map(System::parse)
                    .collect::<Result<_, _>>()?
            }
            "--server-threads" => a.server_threads = int(value()?)?,
            "--client-threads" => a.client_threads = int(value()?)?,
            "--rounds" => a.rounds = int(value()?)?,
            "--timeout-ms" => a.timeout = Duration::from_millis(int(value()?)? as u64),
            other => return Err(format!("unknown flag {other:?}")),
        }
    }
    if !(a.secs > 0.0 && a.secs <= 600.0) || !(a.warmup >= 0.0 && a.warmup <= 600.0) {
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
    if a.systems.is_empty() || a.server_threads == 0 || a.client_threads == 0 {
        return Err("need at least one system and one thread per runtime".into());
    }
    Ok(a)
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

fn wire_config(node_id: u64, concurrency: usize) -> Arc<WireConfig> {
    let mut cfg = WireConfig::new("bench-rpc", b"bench-rpc-secret".to_vec(), node_id, 1);
    // Defaults (256) already fit the default concurrency levels; only raise it when a
    // cell asks for more in flight than the default bound.
    cfg.max_inflight_per_connection = cfg.max_inflight_per_connection.max(concurrency);
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
) -> std::io::Result<RunningServer> {
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let task = match system {
        System::Orrery => rt.spawn(orrery_wire::serve::<EchoVec, EchoVec, _>(
            listener,
            wire_config(1, concurrency),
            Arc::new(OrreryEcho),
            Arc::new(WireStats::new()),
            stop,
        )),
        System::OrreryBytes => rt.spawn(orrery_wire::serve::<EchoBytes, EchoBytes, _>(
            listener,
            wire_config(1, concurrency),
            Arc::new(OrreryEcho),
            Arc::new(WireStats::new()),
            stop,
        )),
        System::Tonic => {
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            rt.spawn(async move {
                let res = tonic::transport::Server::builder()
                    .max_concurrent_streams(Some(concurrency.max(1024) as u32))
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

/// One caller: issue a call, wait for the answer, repeat, until `end`. Only calls
/// that start at or after `measure_from` and finish by `end` are counted.
async fn caller<F, Fut>(mut call: F, measure_from: Instant, end: Instant) -> Tally
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
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
        let outcome = call().await;
        let t1 = Instant::now();
        let counted = t0 >= measure_from && t1 <= end;
        match outcome {
            Ok(()) if counted => {
                let ns = (t1 - t0).as_nanos().min(u128::from(u64::MAX)) as u64;
                tally.hist.saturating_record(ns.max(1));
            }
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

fn check_len(got: usize, want: usize) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("echo returned {got} bytes, sent {want}"))
    }
}

/// Connect, run `concurrency` callers for warm-up + measurement, merge their tallies.
async fn drive(
    system: System,
    addr: SocketAddr,
    payload: usize,
    concurrency: usize,
    warmup: Duration,
    measure: Duration,
    timeout: Duration,
) -> Result<(Tally, Window), String> {
    let body = vec![0xA5u8; payload];
    let mut callers: tokio::task::JoinSet<Tally> = tokio::task::JoinSet::new();
    // Connection set-up (handshake) is outside the measured window.
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + measure;
    match system {
        System::Orrery => {
            let ch = orrery_wire::connect::<EchoVec, EchoVec>(
                &addr.to_string(),
                wire_config(2, concurrency),
                Arc::new(WireStats::new()),
            )
            .await
            .map_err(|e| format!("orrery connect: {e}"))?;
            for _ in 0..concurrency {
                let ch = ch.clone();
                let body = body.clone();
                callers.spawn(caller(
                    move || {
                        let ch = ch.clone();
                        let req = EchoVec {
                            payload: body.clone(),
                        };
                        async move {
                            let resp = ch.call(req, timeout).await.map_err(|e| e.to_string())?;
                            check_len(resp.payload.len(), payload)
                        }
                    },
                    measure_from,
                    end,
                ));
            }
        }
        System::OrreryBytes => {
            let ch = orrery_wire::connect::<EchoBytes, EchoBytes>(
                &addr.to_string(),
                wire_config(2, concurrency),
                Arc::new(WireStats::new()),
            )
            .await
            .map_err(|e| format!("orrery connect: {e}"))?;
            let body = bytes::Bytes::from(body);
            for _ in 0..concurrency {
                let ch = ch.clone();
                let body = body.clone();
                callers.spawn(caller(
                    move || {
                        let ch = ch.clone();
                        // A refcount bump, no copy: the Bytes variant is zero-copy on send.
                        let req = EchoBytes {
                            payload: body.clone(),
                        };
                        async move {
                            let resp = ch.call(req, timeout).await.map_err(|e| e.to_string())?;
                            check_len(resp.payload.len(), payload)
                        }
                    },
                    measure_from,
                    end,
                ));
            }
        }
        System::Tonic => {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| format!("tonic endpoint: {e}"))?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .map_err(|e| format!("tonic connect: {e}"))?;
            let client = EchoClient::new(channel);
            for _ in 0..concurrency {
                let client = client.clone();
                let body = body.clone();
                callers.spawn(caller(
                    move || {
                        let mut client = client.clone();
                        let mut req = tonic::Request::new(EchoRequest {
                            payload: body.clone(),
                        });
                        req.set_timeout(timeout);
                        async move {
                            let resp = client.echo(req).await.map_err(|e| e.to_string())?;
                            check_len(resp.into_inner().payload.len(), payload)
                        }
                    },
                    measure_from,
                    end,
                ));
            }
        }
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
fn run_once(
    server_rt: &Runtime,
    client_rt: &Runtime,
    args: &Args,
    system: System,
    payload: usize,
    concurrency: usize,
    acc: &mut Acc,
) -> Result<(), String> {
    let server = start_server(server_rt, system, concurrency)
        .map_err(|e| format!("cannot start {} server: {e}", system.name()))?;
    let outcome = client_rt.block_on(drive(
        system,
        server.addr,
        payload,
        concurrency,
        Duration::from_secs_f64(args.warmup),
        Duration::from_secs_f64(args.secs),
        args.timeout,
    ));
    server.stop(server_rt);
    let (tally, w) = outcome?;
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

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cells_n = args.systems.len() * args.payloads.len() * args.concurrency.len() * args.rounds;
    let per_cell = args.warmup + args.secs;
    println!("# orrery bench rpc — request/response echo over 127.0.0.1");
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
    println!("# tonic        = tonic {} gRPC unary over HTTP/2, prost `bytes` field (Vec<u8>), tonic/hyper defaults, max_concurrent_streams >= 1024", "0.14");
    println!("# latency: per call, client side, issue -> response decoded (hdrhistogram, 3 sig. digits); calls/s = calls completed in the window / window");
    println!("# CPU: share of one core used by each runtime's threads during the window (from /proc, 10 ms ticks); CPU µs/call = (srv + cli) / calls/s;");
    println!("#   bg% = CPU used by OTHER processes on this machine meanwhile (cores x 100): anything but ~0 means the figures are disturbed");
    println!();
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
    let mut failed = false;
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
                        &server_rt,
                        &client_rt,
                        &args,
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
                    failed = true;
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

    // Comparison orrery vs tonic at equal payload and concurrency.
    let find = |s: System, p: usize, c: usize| {
        cells
            .iter()
            .find(|x| x.system == s && x.payload == p && x.concurrency == c)
    };
    let mut out = String::new();
    let mut ratios = Vec::new();
    let mut met = 0;
    for &payload in &args.payloads {
        for &concurrency in &args.concurrency {
            if let (Some(o), Some(t)) = (
                find(System::Orrery, payload, concurrency),
                find(System::Tonic, payload, concurrency),
            ) {
                let r = o.rate / t.rate.max(1e-9);
                let ok = r >= 2.0 && o.p99_us <= t.p99_us;
                met += usize::from(ok);
                ratios.push(r);
                let _ = write!(
                    out,
                    "\n#   payload {payload:>5} conc {concurrency:>4}: orrery/tonic calls/s = {r:.2}x, p99 {:.1} vs {:.1} µs{}",
                    o.p99_us,
                    t.p99_us,
                    if ok { "  [target met]" } else { "" }
                );
            }
        }
    }
    if !ratios.is_empty() {
        println!();
        print!("# orrery vs tonic at equal payload and concurrency:{out}\n");
        let geo = (ratios.iter().map(|r| r.ln()).sum::<f64>() / ratios.len() as f64).exp();
        let min = ratios.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = ratios.iter().cloned().fold(0.0, f64::max);
        println!(
            "orrery/tonic throughput ratio at equal concurrency: geomean {geo:.2}x (min {min:.2}x, max {max:.2}x); target >= 2x at equal or better p99 met in {met}/{} cells",
            ratios.len()
        );
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
