//! Putting a validated universe into the store, and reading back what the
//! service needs to know about it.
//!
//! Every shard's rows are written under the shard's name at epoch 0 (before
//! any owner claims it); the meta row that says "this universe is complete"
//! is written last, so an import cut short by a crash leaves no meta row:
//! the next import redoes it (puts are idempotent) and the service refuses
//! to start on a half-written universe instead of loading part of it.

use crate::model::{AllianceId, Universe, UniverseError};
use orrery_store::{Op, Store, StoreError};
use serde::{Deserialize, Serialize};

/// The store shard holding the universe's meta row.
pub const META_SHARD: &str = "universe";
/// Rows per store write (below the store's batch bound).
const BATCH: usize = 500;

/// What every node needs to know about the universe without loading it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UniverseMeta {
    pub seed: u64,
    pub systems: u64,
    pub alliances: u64,
    pub regions: u64,
    /// Region of each system, by system id.
    pub system_region: Vec<u32>,
    /// Systems with a campaign.
    pub campaign_systems: Vec<u32>,
    /// Capital of each alliance, by alliance id.
    pub capitals: Vec<u32>,
}

/// Why an import or a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Universe(#[from] UniverseError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("the universe in the store is not complete (no meta row): an import was cut short; run the import again")]
    Incomplete,
    #[error("the universe's meta row does not decode: {0}")]
    Corrupt(String),
}

pub fn system_shard(id: u32) -> String {
    format!("solar_system/{id}")
}
pub fn alliance_shard(id: AllianceId) -> String {
    format!("alliance/{id}")
}
pub fn region_shard(id: u32) -> String {
    format!("market_region/{id}")
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("universe rows serialize")
}

fn write_batched(store: &dyn Store, shard: &str, ops: Vec<Op>) -> Result<(), StoreError> {
    for chunk in ops.chunks(BATCH) {
        store.write(shard, 0, chunk)?;
    }
    Ok(())
}

/// Validates `u` and writes it into the store; the meta row goes last.
pub fn import(store: &dyn Store, u: &Universe) -> Result<UniverseMeta, ImportError> {
    u.validate()?;
    let mut by_system: Vec<Vec<Op>> = vec![Vec::new(); u.systems.len()];
    for s in &u.systems {
        by_system[s.id as usize].push(Op::put("system", "row", json(s)));
    }
    for c in &u.campaigns {
        by_system[c.system as usize].push(Op::put("campaign", c.id.to_string(), json(c)));
    }
    for (id, ops) in by_system.into_iter().enumerate() {
        write_batched(store, &system_shard(id as u32), ops)?;
    }
    for a in &u.alliances {
        write_batched(
            store,
            &alliance_shard(a.id),
            vec![Op::put("alliance", "row", json(a))],
        )?;
    }
    let mut by_region: Vec<Vec<Op>> = vec![Vec::new(); u.regions.len()];
    for o in &u.market_orders {
        by_region[o.region as usize].push(Op::put("order", o.id.to_string(), json(o)));
    }
    for (id, ops) in by_region.into_iter().enumerate() {
        write_batched(store, &region_shard(id as u32), ops)?;
    }
    let meta = UniverseMeta {
        seed: u.seed,
        systems: u.systems.len() as u64,
        alliances: u.alliances.len() as u64,
        regions: u.regions.len() as u64,
        system_region: u.systems.iter().map(|s| s.region).collect(),
        campaign_systems: u.campaigns.iter().map(|c| c.system).collect(),
        capitals: u.alliances.iter().map(|a| a.capital).collect(),
    };
    // The commit marker: written only once everything else is in.
    store.write(META_SHARD, 0, &[Op::put("meta", "universe", json(&meta))])?;
    Ok(meta)
}

/// The imported universe's meta row; refuses a half-written universe.
pub fn meta(store: &dyn Store) -> Result<UniverseMeta, ImportError> {
    let Some(bytes) = store.get(META_SHARD, "meta", "universe")? else {
        return Err(ImportError::Incomplete);
    };
    let m: UniverseMeta =
        serde_json::from_slice(&bytes).map_err(|e| ImportError::Corrupt(e.to_string()))?;
    if m.system_region.len() as u64 != m.systems || m.capitals.len() as u64 != m.alliances {
        return Err(ImportError::Corrupt(format!(
            "{} systems but {} regions listed, {} alliances but {} capitals",
            m.systems,
            m.system_region.len(),
            m.alliances,
            m.capitals.len()
        )));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{generate, Sizes};

    fn store(dir: &std::path::Path) -> Box<dyn Store> {
        orrery_store::open(&orrery_store::StoreConfig::sqlite(dir.join("u.db"))).unwrap()
    }

    #[test]
    fn an_import_round_trips_and_a_cut_short_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        assert!(matches!(meta(&*s), Err(ImportError::Incomplete)));
        let u = generate(5, Sizes::for_systems(300)).unwrap();
        let m = import(&*s, &u).unwrap();
        assert_eq!(meta(&*s).unwrap(), m);
        assert_eq!(m.campaign_systems.len(), u.campaigns.len());
        let row = s.get(&system_shard(7), "system", "row").unwrap().unwrap();
        let sys: crate::System = serde_json::from_slice(&row).unwrap();
        assert_eq!(sys, u.systems[7]);
        // A broken universe is refused before anything is written.
        let dir2 = tempfile::tempdir().unwrap();
        let s2 = store(dir2.path());
        let mut bad = u.clone();
        bad.systems[3].jumps.push(77_777);
        let e = import(&*s2, &bad).unwrap_err().to_string();
        assert!(e.contains("systems row 3"), "{e}");
        assert!(s2.get(&system_shard(0), "system", "row").unwrap().is_none());
    }
}
