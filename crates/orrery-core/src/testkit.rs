//! Fixtures shared by this crate's unit tests: a configured cluster state
//! and the one way tests apply commands to it (the next log index).

use crate::config::{ClusterConfig, NodeSpec, Role};
use crate::state::{ClusterState, Command, Response};
use crate::{NodeId, Stage};

/// Nodes `1..=n`; the first three (or all, if fewer) are voters.
pub fn config(n: u64) -> ClusterConfig {
    let mut c = ClusterConfig {
        stage_deadline_ms: 1000,
        ..Default::default()
    };
    for id in 1..=n {
        let role = if id <= 3 { Role::Voter } else { Role::Worker };
        let spec = NodeSpec {
            addr: String::new(),
            admin_addr: String::new(),
            role,
        };
        c.nodes.insert(id, spec);
    }
    c
}

/// Applies `cmd` at the next log index.
pub fn apply(s: &mut ClusterState, cmd: Command) -> Response {
    let i = s.applied_index + 1;
    s.apply(i, cmd)
}

/// Applies every command in order.
pub fn run(s: &mut ClusterState, cmds: Vec<Command>) {
    for c in cmds {
        apply(s, c);
    }
}

/// A state configured with `config`, every node in `joined` joined.
pub fn configured(config: ClusterConfig, joined: impl IntoIterator<Item = NodeId>) -> ClusterState {
    let mut s = ClusterState::default();
    assert_eq!(
        apply(&mut s, Command::Configure { config, at: 0 }),
        Response::Ok
    );
    for node in joined {
        apply(&mut s, Command::Join { node, at: 0 });
    }
    s
}

/// A state configured with `config`, every configured node joined, and the
/// cluster walked to stage 0 (ready) at time 0.
pub fn ready(config: ClusterConfig) -> ClusterState {
    let nodes: Vec<NodeId> = config.nodes.keys().copied().collect();
    let mut s = configured(config, nodes.iter().copied());
    for stage in Stage::ALL.iter().skip(1) {
        let (boot, from) = (s.boot, s.stage);
        assert_eq!(
            apply(&mut s, Command::Advance { boot, from, at: 0 }),
            Response::Ok
        );
        for &node in &nodes {
            let epoch = s.members[&node].epoch;
            let r = apply(
                &mut s,
                Command::Report {
                    node,
                    epoch,
                    stage: *stage,
                    waiting: None,
                    progress: None,
                    unreachable: vec![],
                    at: 0,
                },
            );
            assert_eq!(r, Response::Ok);
        }
    }
    let (boot, from) = (s.boot, s.stage);
    assert_eq!(
        apply(&mut s, Command::Advance { boot, from, at: 0 }),
        Response::Ok
    );
    assert_eq!(s.stage, Stage::READY);
    s
}
