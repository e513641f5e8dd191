//! Checksummed Raft storage with real processes (issue 11): a flipped byte
//! in a stopped voter's `raft.redb` is refused at start, naming the file,
//! the table and the log index; `orrery repair` moves the damaged file aside
//! and the voter comes back from its peers with the same state (equal state
//! digests at the same applied index).

use crate::cluster::{TestCluster, BIN};
use orrery_core::{NodeId, Stage};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

fn ready(s: &orrery_core::ClusterState) -> bool {
    s.stage == Stage::READY && s.laggards(Stage::READY).is_empty()
}

/// Flips one bit in every occurrence of `marker` in `file` (stale copies may
/// linger in free pages; the live one must be hit). Returns the count.
fn flip_every(file: &Path, marker: &[u8]) -> usize {
    let mut bytes = std::fs::read(file).expect("read raft.redb");
    let mut hits = 0;
    let mut i = 0;
    while i + marker.len() <= bytes.len() {
        if &bytes[i..i + marker.len()] == marker {
            bytes[i + marker.len() - 1] ^= 0x01;
            hits += 1;
            i += marker.len();
        } else {
            i += 1;
        }
    }
    std::fs::write(file, bytes).expect("write raft.redb");
    hits
}

/// (applied index, digest) of node `id`, if it answers and is caught up.
fn digest(c: &TestCluster, id: NodeId) -> Option<(u64, String)> {
    let s = c.node_status(id)?;
    if s.raft_catching_up {
        return None;
    }
    s.raft_digest
}

#[test]
fn a_flipped_byte_in_a_stopped_voter_is_refused_and_orrery_repair_restores_it() {
    let mut c = TestCluster::new(4, 3, |_| {});
    c.start_all();
    c.wait_for("stage 0", T, ready);
    let leader = c
        .wait_node(1, "a leader", T, |s| s.leader.is_some())
        .leader
        .expect("leader");
    let victim = (1..=3).find(|i| *i != leader).expect("a follower voter");
    c.stop(victim);

    // Node 4's address is in the configuration command in every voter's log.
    let worker = c.manifest.nodes.iter().find(|n| n.id == 4).expect("node 4");
    let file = c
        .dir
        .path()
        .join(format!("node-{victim}"))
        .join("raft")
        .join("raft.redb");
    let hits = flip_every(&file, worker.addr.as_bytes());
    assert!(
        hits >= 1,
        "node 4's address not found in {}",
        file.display()
    );

    c.start(victim);
    let st = c.wait_exit(victim, T);
    assert!(!st.success(), "voter started on a damaged store");
    let log = c.log(victim);
    let line = log
        .lines()
        .find(|l| l.contains("is damaged"))
        .unwrap_or_else(|| panic!("no refusal naming the damage in the log:\n{log}"));
    assert!(line.contains(&file.display().to_string()), "{line}");
    assert!(line.contains("table raft_log, key "), "{line}");
    assert!(line.contains("checksum mismatch"), "{line}");
    assert!(line.contains("orrery repair"), "{line}");

    let out = Command::new(BIN)
        .args(["repair", "--data-dir"])
        .arg(c.dir.path())
        .args(["--node", &victim.to_string()])
        .output()
        .expect("run orrery repair");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "repair failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("damage found: raft_log"), "{stdout}");
    assert!(
        file.with_extension("redb.damaged").exists(),
        "damaged file kept"
    );

    c.start(victim);
    // Equal digests at the same applied index: the repaired voter holds
    // exactly the others' state. (The state changes as nodes report, so
    // poll until one read sees both at one index.)
    let deadline = Instant::now() + T;
    loop {
        let (a, b) = (digest(&c, leader), digest(&c, victim));
        if let (Some(a), Some(b)) = (&a, &b) {
            if a.0 == b.0 {
                assert_eq!(a.1, b.1, "same index {}, different state", a.0);
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "never caught up: leader {a:?}, repaired {b:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The victim left on SIGTERM (a recorded Leave); its Raft store catching
    // up does not mean it has rejoined yet, so wait for it as a participant.
    let s = c.wait_for("all members active", T, |s| {
        ready(s) && s.participants().contains(&victim)
    });
    assert_eq!(s.participants().len(), 4);
    c.stop_all();
}
