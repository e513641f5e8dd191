//! Connection caps (issue 11, part 5) against real `orrery node` processes:
//! a hostile client floods one node's cluster port and admin port with idle
//! sockets while the node runs with a soft fd limit of 1,024. The node's
//! fd count stays under its caps, it keeps answering `orrery status`
//! quickly, nobody is suspected, and the refusals show in `/metrics`.

use crate::cluster::TestCluster;
use orrery_core::{EventKind, Stage};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);
/// Idle sockets per port in each wave.
const SOCKETS: usize = 2_000;
/// The node's soft (and hard) fd limit during the test.
const NODE_FDS: u64 = 1_024;
/// How long the flood is held and measured: past the 5 s handshake and
/// header timeouts of the first wave's sockets, and into the second wave.
const HOLD: Duration = Duration::from_millis(7_500);
/// Connects per second and port: a hostile client on the same 2 cores that
/// fills every cap in a fraction of a second without leaving the machine
/// no CPU at all (the caps are under test, not the scheduler).
const CONNECTS_PER_S: usize = 2_000;
/// The second wave starts this long after the first, as the first wave's
/// pending sockets time out.
const SECOND_WAVE: Duration = Duration::from_millis(5_500);

fn ready(s: &orrery_core::ClusterState) -> bool {
    s.stage == Stage::READY && s.laggards(Stage::READY).is_empty()
}

/// (soft, hard) `Max open files` of a process, from /proc.
fn fd_limits(pid: &str) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (v[0], v[1])
}

fn set_fd_limit(pid: &str, soft: u64, hard: u64) {
    let st = Command::new("prlimit")
        .args(["--pid", pid, &format!("--nofile={soft}:{hard}")])
        .status()
        .expect("run prlimit");
    assert!(st.success(), "prlimit --pid {pid} --nofile={soft}:{hard}");
    assert_eq!(fd_limits(pid).0, soft);
}

/// The test process holds two waves of sockets per port at a time.
fn ensure_own_fd_limit(need: u64) {
    let me = std::process::id().to_string();
    let (soft, hard) = fd_limits(&me);
    if soft < need {
        assert!(
            hard >= need,
            "this test needs {need} fds, the hard limit is {hard}"
        );
        set_fd_limit(&me, need, hard);
    }
}

/// The pid of node `id`'s process: the one run with its config file.
fn node_pid(c: &TestCluster, id: u64) -> String {
    let config = c.config_path(id);
    let config = config.to_str().expect("utf8 path");
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if cmd.split(|b| *b == 0).any(|a| a == config.as_bytes()) {
            return name;
        }
    }
    panic!("no process runs {config}");
}

fn fd_count(pid: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Opens `n` idle sockets to `addr`, at most [`CONNECTS_PER_S`]; returns
/// them and how many connects failed (not retried).
fn flood(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let mut held = Vec::with_capacity(n);
    let mut failed = 0;
    let began = Instant::now();
    for i in 0..n {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(1_500)) {
            Ok(s) => held.push(s),
            Err(_) => failed += 1,
        }
        // Pace the connects (load shaping, not a wait for a condition).
        let due = Duration::from_secs_f64((i + 1) as f64 / CONNECTS_PER_S as f64);
        if let Some(ahead) = due.checked_sub(began.elapsed()) {
            std::thread::sleep(ahead);
        }
    }
    (held, failed)
}

/// Floods `addr`: a wave of [`SOCKETS`] idle sockets at once, a second one
/// [`SECOND_WAVE`] later; every socket stays open until `stop`. Returns the
/// sockets (the caller closes them) and how many connects failed.
fn flooder(addr: SocketAddr, stop: &AtomicBool) -> (Vec<TcpStream>, usize) {
    let began = Instant::now();
    let (mut held, mut failed) = flood(addr, SOCKETS);
    // Pace the second wave (load shaping, not a wait for a condition).
    while !stop.load(Ordering::Relaxed) && began.elapsed() < SECOND_WAVE {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !stop.load(Ordering::Relaxed) {
        let (more, f) = flood(addr, SOCKETS);
        held.extend(more);
        failed += f;
    }
    (held, failed)
}

/// GET `path` on `addr` over a fresh connection: (time, body).
fn get(addr: &str, path: &str) -> (Duration, Result<String, String>) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(2))
        .build();
    let t0 = Instant::now();
    let r = agent
        .get(&format!("http://{addr}{path}"))
        .call()
        .map_err(|e| e.to_string())
        .and_then(|r| r.into_string().map_err(|e| e.to_string()));
    (t0.elapsed(), r)
}

/// One sample from `/metrics` (0 if absent).
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// What the measuring loop saw while the flood was held.
#[derive(Debug, Default)]
struct Observed {
    /// Most fds node 1 held at any sample.
    max_fds: usize,
    /// `orrery status` runs, in ms.
    status_ms: Vec<u64>,
    /// Fresh-connection `GET /status` on the flooded node, in ms.
    get_ms: Vec<u64>,
    /// Per port: sockets opened, connects that failed.
    wire: (usize, usize),
    admin: (usize, usize),
}

impl Observed {
    fn worst(v: &[u64]) -> Duration {
        Duration::from_millis(v.iter().copied().max().unwrap_or(0))
    }
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Floods both ports of the node at `pid` from two threads for [`HOLD`],
/// measuring its fds and `orrery status` meanwhile. Returns what it saw and
/// the flood's sockets, still open.
fn hold_the_flood(
    c: &TestCluster,
    pid: &str,
    wire: SocketAddr,
    admin: SocketAddr,
) -> (Observed, Vec<TcpStream>) {
    let admin_addr = admin.to_string();
    let stop = AtomicBool::new(false);
    let mut seen = Observed::default();
    let mut sockets = vec![];
    std::thread::scope(|scope| {
        let w = scope.spawn(|| flooder(wire, &stop));
        let a = scope.spawn(|| flooder(admin, &stop));
        // Stops the flooders however this closure ends (a failed assert
        // included), so the scope can join them.
        let _stop = StopOnDrop(&stop);
        let start = Instant::now();
        while start.elapsed() < HOLD {
            seen.max_fds = seen.max_fds.max(fd_count(pid));
            let t0 = Instant::now();
            let out = c.status_command();
            seen.status_ms.push(t0.elapsed().as_millis() as u64);
            assert!(out.contains("cluster:"), "{out}");
            let (took, r) = get(&admin_addr, "/status");
            r.unwrap_or_else(|e| panic!("GET /status on the flooded node failed: {e}"));
            seen.get_ms.push(took.as_millis() as u64);
            seen.max_fds = seen.max_fds.max(fd_count(pid));
            // Sampling interval (the measurement's pace, not a wait).
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Relaxed);
        for (port, t) in [(&mut seen.wire, w), (&mut seen.admin, a)] {
            let (held, failed) = t.join().expect("flooder");
            *port = (held.len() + failed, failed);
            sockets.extend(held);
        }
    });
    (seen, sockets)
}

/// Connections shed on `port` ("wire" or "admin") per `/metrics`.
fn shed(metrics: &str, port: &str) -> usize {
    ["evicted", "refused", "timed_out"]
        .iter()
        .map(|k| metric(metrics, &format!("orrery_{port}_connections_{k}_total")))
        .sum::<u64>() as usize
}

#[test]
fn idle_socket_floods_are_capped_and_the_node_stays_responsive() {
    ensure_own_fd_limit(4 * SOCKETS as u64 + 1_024);
    let mut c = TestCluster::new(3, 3, |_| {});
    c.start_all();
    c.wait_for("stage 0", T, ready);
    let pid = node_pid(&c, 1);
    set_fd_limit(&pid, NODE_FDS, NODE_FDS);
    let cfg = orrery_node::config::NodeConfig::load(&c.config_path(1)).expect("config");
    let wire: SocketAddr = cfg.listen_addr().parse().expect("cluster addr");
    let admin: SocketAddr = cfg.admin_listen_addr().parse().expect("admin addr");
    // The node's own fds (files, peers), the most seen over a second.
    let base = (0..20)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            fd_count(&pid)
        })
        .max()
        .unwrap();
    // Idle sockets never finish a handshake or send a request: on each
    // port only the pending caps apply, plus the eviction slack.
    let slack = orrery_wire::limit::EVICTION_SLACK;
    let bound = base + cfg.rpc.max_handshakes + cfg.admin.max_connections + 2 * slack + 16;
    assert!(bound < NODE_FDS as usize);

    let (seen, sockets) = hold_the_flood(&c, &pid, wire, admin);
    let (worst_status, worst_get) = (
        Observed::worst(&seen.status_ms),
        Observed::worst(&seen.get_ms),
    );
    eprintln!(
        "flood: node 1 base {base} fds, at most {} during the flood (bound {bound}); \
         `orrery status` worst {worst_status:?} over {} runs, GET /status worst {worst_get:?}; \
         sockets opened (failed): wire {:?}, admin {:?}; status ms {:?}",
        seen.max_fds,
        seen.status_ms.len(),
        seen.wire,
        seen.admin,
        seen.status_ms
    );
    assert!(seen.status_ms.len() >= 20, "{seen:?}");
    assert!(
        seen.max_fds <= bound,
        "node 1 held {} fds (base {base}, bound {bound})",
        seen.max_fds
    );
    // `orrery status` is a whole CLI process (spawn, read every node) in a
    // debug build, sharing 2 cores with the flood and the cluster: its 95th
    // percentile must meet the 100 ms target; a single scheduling hiccup
    // may not fail the run, but a node that stopped answering would (500 ms).
    let mut sorted = seen.status_ms.clone();
    sorted.sort_unstable();
    let p95 = sorted[(sorted.len() * 95 / 100).min(sorted.len() - 1)];
    assert!(p95 < 100, "`orrery status` p95 {p95} ms: {sorted:?}");
    assert!(
        worst_status < Duration::from_millis(500),
        "`orrery status` took {worst_status:?}"
    );
    assert!(
        worst_get < Duration::from_millis(100),
        "GET /status took {worst_get:?}"
    );

    // The console answers too (`orrery exec -- status`), sockets still open.
    let (ok, out, err) = c.exec(&[], &["status"]);
    assert!(
        ok,
        "orrery exec -- status failed during the flood: {out}{err}"
    );

    // Every flood socket beyond the caps was refused, evicted or timed out,
    // and counted.
    let (_, text) = get(&admin.to_string(), "/metrics");
    let text = text.expect("GET /metrics");
    let (shed_wire, shed_admin) = (shed(&text, "wire"), shed(&text, "admin"));
    eprintln!("shed: wire {shed_wire}, admin {shed_admin}");
    assert!(
        seen.wire.0 >= 2 * SOCKETS && seen.admin.0 >= 2 * SOCKETS,
        "{seen:?}"
    );
    assert!(shed_wire + cfg.rpc.max_handshakes >= seen.wire.0, "{text}");
    assert!(
        shed_admin + cfg.admin.max_connections >= seen.admin.0,
        "{text}"
    );

    // Nobody was suspected or removed, and the node never ran out of fds.
    let s = c.state().expect("state");
    assert!(
        !s.events
            .iter()
            .any(|e| matches!(e.kind, EventKind::NodeSuspected | EventKind::NodeRemoved)),
        "{}",
        crate::cluster::show(Some(s))
    );
    let log = c.log(1);
    assert!(!log.contains("Too many open files"), "{log}");

    // Once the sockets are closed the node is back to its baseline.
    drop(sockets);
    let deadline = Instant::now() + T;
    while fd_count(&pid) > base + 8 {
        assert!(
            Instant::now() < deadline,
            "node 1 still holds {} fds (base {base})",
            fd_count(&pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    c.stop_all();
}

/// Reads until the peer closes (or `bound` passes): (bytes read, how long).
fn until_closed(s: &mut TcpStream, bound: Duration) -> (usize, Duration) {
    use std::io::Read;
    let t0 = Instant::now();
    s.set_read_timeout(Some(bound)).expect("read timeout");
    let mut buf = [0u8; 4096];
    let mut total = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (total, t0.elapsed()),
            Ok(n) => total += n,
            Err(e) => {
                let closed = !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
                assert!(closed, "still open after {bound:?}");
                return (total, t0.elapsed());
            }
        }
    }
}

fn send(addr: SocketAddr, bytes: &str) -> TcpStream {
    use std::io::Write;
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(bytes.as_bytes()).expect("write");
    s
}

#[test]
fn admin_connections_are_bounded_in_time_and_number() {
    let mut c = TestCluster::new(1, 1, |_| {});
    c.edit_config(1, |cfg| {
        cfg.admin.max_connections = 4;
        cfg.admin.header_timeout_ms = 500;
        cfg.admin.command_timeout_ms = 500;
        cfg.admin.idle_timeout_ms = 1_000;
    });
    c.start_all();
    c.wait_for("stage 0", T, ready);
    let admin: SocketAddr = c.admin_addr(1).parse().expect("admin addr");
    let bound = Duration::from_secs(5);

    // Silent, and a request head that never ends: closed at the header
    // timeout.
    let (_, silent) = until_closed(&mut TcpStream::connect(admin).expect("connect"), bound);
    let mut partial = send(admin, &format!("GET /status HTTP/1.1\r\nHost: {admin}\r\n"));
    let (_, head) = until_closed(&mut partial, bound);
    // A body that stalls: closed at the idle bound, with no answer.
    let token = c.token();
    let stalled = format!(
        "POST /console HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"args\""
    );
    let (answered, body) = until_closed(&mut send(admin, &stalled), bound);
    eprintln!(
        "closed: silent after {silent:?}, endless head after {head:?}, stalled body after {body:?}"
    );
    for (what, took) in [("silent", silent), ("endless head", head)] {
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_secs(2),
            "{what}: {took:?}"
        );
    }
    assert!(
        body >= Duration::from_millis(900) && body < Duration::from_secs(3),
        "{body:?}"
    );
    assert_eq!(answered, 0, "a stalled request gets no answer");

    // Four keep-alive connections that were answered fill the cap: a fifth
    // is closed at once, without a word.
    let mut held: Vec<TcpStream> = (0..4)
        .map(|_| {
            use std::io::Read;
            let mut s = send(
                admin,
                &format!("GET /status HTTP/1.1\r\nHost: {admin}\r\n\r\n"),
            );
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).expect("answer");
            assert!(
                buf[..n].starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&buf[..n])
            );
            s
        })
        .collect();
    let (n, refused) = until_closed(
        &mut send(
            admin,
            &format!("GET /status HTTP/1.1\r\nHost: {admin}\r\n\r\n"),
        ),
        bound,
    );
    assert_eq!(n, 0);
    assert!(refused < Duration::from_millis(200), "{refused:?}");
    // Idle keep-alive connections end at the header timeout; then there is
    // room again.
    for s in &mut held {
        until_closed(s, bound);
    }
    let (_, text) = get(&admin.to_string(), "/metrics");
    let text = text.expect("GET /metrics after the idle connections closed");
    let count = |k: &str| metric(&text, &format!("orrery_admin_connections_{k}_total"));
    eprintln!(
        "timed out {}, idle closed {}, refused {}",
        count("timed_out"),
        count("idle_closed"),
        count("refused")
    );
    assert!(count("timed_out") >= 2 + 4, "{text}");
    assert!(count("idle_closed") >= 1, "{text}");
    assert!(count("refused") >= 1, "{text}");
    c.stop_all();
}
