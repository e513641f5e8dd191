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
    let mut meta_ops: Vec<Op> = Vec::new();
    for r in &u.regions {
        meta_ops.push(Op::put("region", r.id.to_string(), json(r)));
    }
    for c in &u.constellations {
        meta_ops.push(Op::put("constellation", c.id.to_string(), json(c)));
    }
    for c in &u.characters {
        meta_ops.push(Op::put("character", c.id.to_string(), json(c)));
    }
    write_batched(store, META_SHARD, meta_ops)?;
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

fn rows<T: for<'de> Deserialize<'de>>(
    store: &dyn Store,
    shard: &str,
    table: &'static str,
) -> Result<Vec<T>, ImportError> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.scan(shard, table, after.as_deref(), 1_000)?;
        let last = page.last().map(|(k, _)| k.clone());
        for (key, v) in page {
            out.push(serde_json::from_slice(&v).map_err(|e| {
                ImportError::Universe(UniverseError::BrokenRow {
                    table,
                    row: format!("{shard}/{key}"),
                    what: format!("does not decode: {e}"),
                })
            })?);
        }
        match last {
            Some(k) => after = Some(k),
            None => return Ok(out),
        }
    }
}

/// Reads the whole universe back from the store and validates it: a broken
/// row (a dangling jump link, an unknown alliance, a duplicate campaign)
/// is reported with the row, and the universe refused.
pub fn read_back(store: &dyn Store) -> Result<Universe, ImportError> {
    let m = meta(store)?;
    let mut u = Universe {
        seed: m.seed,
        regions: rows(store, META_SHARD, "region")?,
        constellations: rows(store, META_SHARD, "constellation")?,
        characters: rows(store, META_SHARD, "character")?,
        ..Default::default()
    };
    for id in 0..m.systems as u32 {
        let shard = system_shard(id);
        let mut sys: Vec<crate::System> = rows(store, &shard, "system")?;
        match sys.pop() {
            Some(s) => u.systems.push(s),
            None => {
                return Err(ImportError::Universe(UniverseError::BrokenRow {
                    table: "systems",
                    row: id.to_string(),
                    what: "missing from the store".into(),
                }))
            }
        }
        u.campaigns
            .extend(rows::<crate::Campaign>(store, &shard, "campaign")?);
    }
    for id in 0..m.alliances as u32 {
        u.alliances.extend(rows::<crate::Alliance>(
            store,
            &alliance_shard(id),
            "alliance",
        )?);
    }
    for id in 0..m.regions as u32 {
        u.market_orders.extend(rows::<crate::MarketOrder>(
            store,
            &region_shard(id),
            "order",
        )?);
    }
    u.validate()?;
    Ok(u)
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

    #[test]
    fn a_broken_row_in_the_database_is_named_and_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let u = generate(9, Sizes::for_systems(300)).unwrap();
        import(&*s, &u).unwrap();
        let back = read_back(&*s).unwrap();
        assert_eq!(back.systems, u.systems);
        assert_eq!(back.campaigns.len(), u.campaigns.len());
        // A campaign naming an alliance that does not exist.
        let mut c = u.campaigns[0].clone();
        c.attacker = 4_242;
        let shard = system_shard(c.system);
        s.write(
            &shard,
            0,
            &[Op::put("campaign", c.id.to_string(), json(&c))],
        )
        .unwrap();
        let e = read_back(&*s).unwrap_err().to_string();
        assert!(
            e.contains(&format!("campaigns row {}: unknown alliance 4242", c.id)),
            "{e}"
        );
        // A dangling jump link.
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        import(&*s, &u).unwrap();
        let mut sys = u.systems[7].clone();
        sys.jumps.push(88_888);
        s.write(&system_shard(7), 0, &[Op::put("system", "row", json(&sys))])
            .unwrap();
        let e = read_back(&*s).unwrap_err().to_string();
        assert!(
            e.contains("systems row 7: jump link to unknown system 88888"),
            "{e}"
        );
        // Garbage in a row.
        s.write(
            &alliance_shard(1),
            0,
            &[Op::put("alliance", "row", b"{not json".to_vec())],
        )
        .unwrap();
        let e = read_back(&*s).unwrap_err().to_string();
        assert!(
            e.contains("systems row 7") || e.contains("alliance/1/row"),
            "{e}"
        );
    }
}
