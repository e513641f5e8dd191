//! The universe's rows and the rules every row must keep.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

pub type RegionId = u32;
pub type SystemId = u32;
pub type AllianceId = u32;
pub type CampaignId = u32;

/// Largest universe accepted (systems); other row counts are bounded
/// relative to it.
pub const MAX_SYSTEMS: usize = 200_000;
/// Largest universe file read, in bytes.
pub const MAX_FILE_BYTES: u64 = 512 * 1024 * 1024;
/// Most jump links one system may have.
pub const MAX_JUMPS: usize = 16;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Region {
    pub id: RegionId,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Constellation {
    pub id: u32,
    pub region: RegionId,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct System {
    pub id: SystemId,
    pub name: String,
    pub constellation: u32,
    pub region: RegionId,
    /// Security status, -1.0 ..= 1.0.
    pub security: f32,
    /// Systems one jump away (symmetric).
    pub jumps: Vec<SystemId>,
    /// The alliance holding sovereignty, if any.
    pub sovereign: Option<AllianceId>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alliance {
    pub id: AllianceId,
    pub name: String,
    /// The alliance's capital system (it holds sovereignty there).
    pub capital: SystemId,
}

/// A sovereignty campaign: an attacker contests a defender's system.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Campaign {
    pub id: CampaignId,
    pub system: SystemId,
    pub defender: AllianceId,
    pub attacker: AllianceId,
    /// Progress, 0 ..= 100 (attacker wins at 100, defender at 0).
    pub score: u8,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MarketOrder {
    pub id: u64,
    pub region: RegionId,
    pub item: u32,
    pub buy: bool,
    /// Price in cents.
    pub price: u64,
    pub quantity: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Character {
    pub id: u64,
    pub name: String,
    pub system: SystemId,
    pub alliance: Option<AllianceId>,
}

/// A whole universe, as generated or loaded.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Universe {
    pub seed: u64,
    pub regions: Vec<Region>,
    pub constellations: Vec<Constellation>,
    pub systems: Vec<System>,
    pub alliances: Vec<Alliance>,
    pub campaigns: Vec<Campaign>,
    pub market_orders: Vec<MarketOrder>,
    pub characters: Vec<Character>,
}

/// Why a universe was refused: the first broken row, named.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UniverseError {
    #[error("{table} row {row}: {what}")]
    BrokenRow {
        table: &'static str,
        row: String,
        what: String,
    },
    #[error("the universe is too large: {0}")]
    TooLarge(String),
    #[error("cannot read the universe file {path}: {message}")]
    Read { path: String, message: String },
    #[error("the universe file {path} is not valid JSON at {message}")]
    Parse { path: String, message: String },
}

fn broken(table: &'static str, row: impl ToString, what: impl Into<String>) -> UniverseError {
    UniverseError::BrokenRow {
        table,
        row: row.to_string(),
        what: what.into(),
    }
}

fn unique<T, K: Ord + Copy + std::fmt::Display>(
    table: &'static str,
    rows: &[T],
    key: impl Fn(&T) -> K,
) -> Result<BTreeSet<K>, UniverseError> {
    let mut seen = BTreeSet::new();
    for r in rows {
        let k = key(r);
        if !seen.insert(k) {
            return Err(broken(table, k, "duplicate id"));
        }
    }
    Ok(seen)
}

impl Universe {
    /// Checks every row against every other: ids unique, every reference
    /// resolves, jump links symmetric and bounded, values in range. The
    /// first broken row is returned, named by table and id.
    pub fn validate(&self) -> Result<(), UniverseError> {
        if self.systems.len() > MAX_SYSTEMS {
            return Err(UniverseError::TooLarge(format!(
                "{} systems (at most {MAX_SYSTEMS})",
                self.systems.len()
            )));
        }
        let bound = MAX_SYSTEMS * 20;
        for (table, n) in [
            ("regions", self.regions.len()),
            ("constellations", self.constellations.len()),
            ("alliances", self.alliances.len()),
            ("campaigns", self.campaigns.len()),
            ("market_orders", self.market_orders.len()),
            ("characters", self.characters.len()),
        ] {
            if n > bound {
                return Err(UniverseError::TooLarge(format!(
                    "{n} {table} (at most {bound})"
                )));
            }
        }
        let regions = unique("regions", &self.regions, |r| r.id)?;
        let constellations: BTreeMap<u32, RegionId> = {
            unique("constellations", &self.constellations, |c| c.id)?;
            self.constellations
                .iter()
                .map(|c| (c.id, c.region))
                .collect()
        };
        for c in &self.constellations {
            if !regions.contains(&c.region) {
                return Err(broken(
                    "constellations",
                    c.id,
                    format!("unknown region {}", c.region),
                ));
            }
        }
        let systems: BTreeMap<SystemId, &System> = {
            unique("systems", &self.systems, |s| s.id)?;
            self.systems.iter().map(|s| (s.id, s)).collect()
        };
        let alliances = unique("alliances", &self.alliances, |a| a.id)?;
        for s in &self.systems {
            match constellations.get(&s.constellation) {
                None => {
                    return Err(broken(
                        "systems",
                        s.id,
                        format!("unknown constellation {}", s.constellation),
                    ))
                }
                Some(r) if *r != s.region => {
                    return Err(broken(
                        "systems",
                        s.id,
                        format!(
                            "region {} differs from its constellation's region {r}",
                            s.region
                        ),
                    ))
                }
                Some(_) => {}
            }
            if !(-1.0..=1.0).contains(&s.security) {
                return Err(broken(
                    "systems",
                    s.id,
                    format!("security {} out of -1..1", s.security),
                ));
            }
            if s.jumps.len() > MAX_JUMPS {
                return Err(broken(
                    "systems",
                    s.id,
                    format!("{} jump links (at most {MAX_JUMPS})", s.jumps.len()),
                ));
            }
            for j in &s.jumps {
                let Some(other) = systems.get(j) else {
                    return Err(broken(
                        "systems",
                        s.id,
                        format!("jump link to unknown system {j}"),
                    ));
                };
                if *j == s.id {
                    return Err(broken("systems", s.id, "jump link to itself"));
                }
                if !other.jumps.contains(&s.id) {
                    return Err(broken(
                        "systems",
                        s.id,
                        format!("jump link to {j} is one-way"),
                    ));
                }
            }
            if let Some(a) = s.sovereign {
                if !alliances.contains(&a) {
                    return Err(broken(
                        "systems",
                        s.id,
                        format!("unknown sovereign alliance {a}"),
                    ));
                }
            }
        }
        for a in &self.alliances {
            match systems.get(&a.capital) {
                None => {
                    return Err(broken(
                        "alliances",
                        a.id,
                        format!("capital {} is not a system", a.capital),
                    ))
                }
                Some(s) if s.sovereign != Some(a.id) => {
                    return Err(broken(
                        "alliances",
                        a.id,
                        format!("capital {} is not held by the alliance", a.capital),
                    ))
                }
                Some(_) => {}
            }
        }
        unique("campaigns", &self.campaigns, |c| c.id)?;
        let mut contested = BTreeSet::new();
        for c in &self.campaigns {
            let Some(s) = systems.get(&c.system) else {
                return Err(broken(
                    "campaigns",
                    c.id,
                    format!("unknown system {}", c.system),
                ));
            };
            for (role, a) in [("defender", c.defender), ("attacker", c.attacker)] {
                if !alliances.contains(&a) {
                    return Err(broken(
                        "campaigns",
                        c.id,
                        format!("unknown alliance {a} ({role})"),
                    ));
                }
            }
            if s.sovereign != Some(c.defender) {
                return Err(broken(
                    "campaigns",
                    c.id,
                    format!("defender {} does not hold system {}", c.defender, c.system),
                ));
            }
            if c.attacker == c.defender {
                return Err(broken("campaigns", c.id, "an alliance attacks itself"));
            }
            if c.score > 100 {
                return Err(broken(
                    "campaigns",
                    c.id,
                    format!("score {} out of 0..100", c.score),
                ));
            }
            if !contested.insert(c.system) {
                return Err(broken(
                    "campaigns",
                    c.id,
                    format!(
                        "system {} already has a campaign (duplicate campaign)",
                        c.system
                    ),
                ));
            }
        }
        unique("market_orders", &self.market_orders, |o| o.id)?;
        for o in &self.market_orders {
            if !regions.contains(&o.region) {
                return Err(broken(
                    "market_orders",
                    o.id,
                    format!("unknown region {}", o.region),
                ));
            }
            if o.price == 0 || o.quantity == 0 {
                return Err(broken(
                    "market_orders",
                    o.id,
                    "price and quantity must be positive",
                ));
            }
        }
        unique("characters", &self.characters, |c| c.id)?;
        for c in &self.characters {
            if !systems.contains_key(&c.system) {
                return Err(broken(
                    "characters",
                    c.id,
                    format!("unknown system {}", c.system),
                ));
            }
            if let Some(a) = c.alliance {
                if !alliances.contains(&a) {
                    return Err(broken("characters", c.id, format!("unknown alliance {a}")));
                }
            }
        }
        Ok(())
    }

    /// Reads and validates a universe file (JSON); refused whole on any
    /// broken row.
    pub fn load(path: &Path) -> Result<Universe, UniverseError> {
        let read = |message: String| UniverseError::Read {
            path: path.display().to_string(),
            message,
        };
        let f = std::fs::File::open(path).map_err(|e| read(e.to_string()))?;
        let mut text = String::new();
        f.take(MAX_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| read(e.to_string()))?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(UniverseError::TooLarge(format!(
                "the file is larger than {MAX_FILE_BYTES} bytes"
            )));
        }
        let u: Universe = serde_json::from_str(&text).map_err(|e| UniverseError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        u.validate()?;
        Ok(u)
    }

    /// Writes the universe as JSON, atomically (a temporary file renamed
    /// into place, so a crash leaves the old file or the new one).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(self)?)?;
        std::fs::rename(&tmp, path)
    }

    /// The campaigns in each alliance's systems, by defender.
    pub fn campaigns_by_alliance(&self) -> BTreeMap<AllianceId, Vec<&Campaign>> {
        let mut m: BTreeMap<AllianceId, Vec<&Campaign>> = BTreeMap::new();
        for c in &self.campaigns {
            m.entry(c.defender).or_default().push(c);
        }
        m
    }
}
