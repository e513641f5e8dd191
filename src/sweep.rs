//! `orrery sim`: seeded fault schedules in the deterministic simulator, run
//! on every core, each checked against the simulator's invariants (no two
//! processes with one valid identity, no removed node serving, no shard
//! served twice, healthy nodes back after the faults) and against
//! `orrery_core::invariants` after every apply (debug builds).
//!
//! It owns the sweep (which seeds, how many threads, the report) and decides
//! nothing itself: one seed is `sim::random_schedule` + `sim::run`, exactly
//! what the integration tests run, so a seed printed here replays there.

use anyhow::Result;
use orrery_core::sim::{random_schedule, run, SimConfig};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `orrery sim`'s arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct SweepArgs {
    /// How many seeds to run, from `--first`.
    #[arg(long, default_value_t = 1_000)]
    pub seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    pub first: u64,
    /// Replay one seed (and print the tail of its trace if it breaks an invariant).
    #[arg(long, conflicts_with_all = ["seeds", "first"])]
    pub seed: Option<u64>,
    /// Nodes per run (at least 5); default: 7 to 20, drawn from the seed.
    #[arg(long)]
    pub nodes: Option<u64>,
    /// Shards of one kind, placed and moved under the faults (0: none).
    #[arg(long, default_value_t = 200)]
    pub shards: u64,
    /// Worker threads; default: every core.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Stop starting new seeds after this many seconds (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub max_secs: u64,
    /// With `--seed`: how many of the trace's last lines to print when it
    /// breaks an invariant (0: the whole trace).
    #[arg(long, default_value_t = 30, requires = "seed")]
    pub trace_lines: usize,
}

/// One broken seed: what broke and how to replay it.
#[derive(Clone, Debug)]
pub struct Broken {
    pub seed: u64,
    pub nodes: u64,
    pub violation: String,
    pub faults: String,
    pub replay: String,
}

/// What a sweep did.
#[derive(Clone, Debug)]
pub struct Sweep {
    pub seeds: u64,
    pub broken: Vec<Broken>,
    pub took: Duration,
}

impl Sweep {
    /// `N seeds, K violations, S seeds/s`.
    pub fn summary(&self) -> String {
        let rate = self.seeds as f64 / self.took.as_secs_f64().max(1e-9);
        format!(
            "{} seeds, {} violations, {rate:.1} seeds/s",
            self.seeds,
            self.broken.len()
        )
    }
}

/// Nodes for `seed` when none are given: 7 to 20.
pub fn nodes_for(seed: u64) -> u64 {
    7 + (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % 14
}

/// The simulation `seed` runs: a random fault schedule with `shards` shards.
pub fn schedule(seed: u64, nodes: u64, shards: u64) -> SimConfig {
    let mut cfg = random_schedule(seed, nodes);
    cfg.shards = shards;
    cfg
}

/// Runs one seed; `Some` if it broke an invariant.
pub fn check_seed(seed: u64, nodes: u64, shards: u64) -> Option<Broken> {
    let cfg = schedule(seed, nodes, shards);
    let faults = format!("{:?}", cfg.faults);
    let out = run(cfg);
    let v = out.violation?;
    Some(Broken {
        seed,
        nodes,
        violation: v.to_string(),
        faults,
        replay: format!("orrery sim --seed {seed} --nodes {nodes} --shards {shards}"),
    })
}

/// Runs `count` seeds from `first` on `threads` threads, stopping early
/// (between seeds) once `max` has passed. Wall time bounds the sweep and
/// measures its rate; no simulated decision reads it.
#[allow(clippy::disallowed_methods)]
pub fn sweep(
    first: u64,
    count: u64,
    nodes: Option<u64>,
    shards: u64,
    threads: usize,
    max: Option<Duration>,
) -> Sweep {
    let t0 = Instant::now();
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let broken = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| loop {
                if max.is_some_and(|m| t0.elapsed() >= m) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return;
                }
                let seed = first + i;
                let n = nodes.unwrap_or_else(|| nodes_for(seed));
                if let Some(b) = check_seed(seed, n, shards) {
                    broken.lock().unwrap_or_else(|e| e.into_inner()).push(b);
                }
                done.fetch_add(1, Ordering::Relaxed);
            });
        }
    });
    let mut broken = broken.into_inner().unwrap_or_else(|e| e.into_inner());
    broken.sort_by_key(|b| b.seed);
    Sweep {
        seeds: done.into_inner(),
        broken,
        took: t0.elapsed(),
    }
}

/// `orrery sim`: prints every violation with its replay command and the
/// summary line; `Ok(false)` if any seed broke an invariant.
pub fn main(args: SweepArgs) -> Result<bool> {
    if let Some(n) = args.nodes {
        anyhow::ensure!(
            n >= 5,
            "--nodes must be at least 5 (random schedules need 5)"
        );
    }
    if let Some(seed) = args.seed {
        return Ok(replay(
            seed,
            args.nodes.unwrap_or_else(|| nodes_for(seed)),
            args.shards,
            args.trace_lines,
        ));
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let max = (args.max_secs > 0).then(|| Duration::from_secs(args.max_secs));
    let s = sweep(
        args.first,
        args.seeds,
        args.nodes,
        args.shards,
        threads,
        max,
    );
    for b in &s.broken {
        println!(
            "seed {} ({} nodes): {}\n    faults {}\n    replay: {}",
            b.seed, b.nodes, b.violation, b.faults, b.replay
        );
    }
    println!("{}", s.summary());
    Ok(s.broken.is_empty())
}

/// One seed, with the tail of its trace if it broke an invariant.
fn replay(seed: u64, nodes: u64, shards: u64, lines: usize) -> bool {
    let cfg = schedule(seed, nodes, shards);
    println!(
        "seed {seed}: {nodes} nodes, {shards} shards, faults {:?}",
        cfg.faults
    );
    let out = run(cfg);
    match &out.violation {
        None => {
            println!(
                "seed {seed}: no violation ({} events, ended at {} ms)",
                out.steps, out.ended_at
            );
            true
        }
        Some(v) => {
            let from = match lines {
                0 => 0,
                n => out.trace.len().saturating_sub(n),
            };
            println!(
                "seed {seed}: {v}\nlast {} lines of the trace (newest last):",
                out.trace.len() - from
            );
            for line in &out.trace[from..] {
                println!("  {line}");
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_counts_every_seed_and_replays_the_same_verdict() {
        let s = sweep(0, 4, Some(7), 20, 2, None);
        assert_eq!(s.seeds, 4);
        assert!(s.summary().starts_with("4 seeds, "), "{}", s.summary());
        for seed in 0..4 {
            let again = check_seed(seed, 7, 20).map(|b| b.violation);
            let first = s
                .broken
                .iter()
                .find(|b| b.seed == seed)
                .map(|b| b.violation.clone());
            assert_eq!(again, first, "seed {seed} gave another verdict on replay");
        }
    }

    #[test]
    fn a_time_box_stops_the_sweep_between_seeds() {
        let s = sweep(0, 1_000_000, Some(7), 0, 1, Some(Duration::ZERO));
        assert_eq!(s.seeds, 0);
    }
}
