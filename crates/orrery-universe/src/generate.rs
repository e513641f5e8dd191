//! The seeded universe generator: the same seed and sizes always give the
//! same universe, which always validates.

use crate::model::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How big a universe to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub systems: usize,
    /// Sovereignty campaigns (at most one per system held by an alliance).
    pub campaigns: usize,
    pub alliances: usize,
    pub orders_per_region: usize,
    pub characters: usize,
}

impl Sizes {
    /// The post-mortem's shape for `systems` systems: about 300 campaigns
    /// at 5,000 systems, an alliance per 50 systems.
    pub fn for_systems(systems: usize) -> Sizes {
        Sizes {
            systems,
            campaigns: (systems * 3 / 50).max(1),
            alliances: (systems / 50).max(2),
            orders_per_region: 40,
            characters: systems / 2,
        }
    }
}

const GREEK: &[&str] = &[
    "Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta", "Eta", "Theta", "Iota", "Kappa",
];

/// Generates a universe: regions of about 100 systems, constellations of
/// about 10, a connected jump graph (chains within constellations, links
/// between neighbouring constellations, random extra links within a
/// region), alliances holding sovereignty over about 40% of the systems
/// (each over its capital), campaigns in held systems, regional market
/// orders and characters.
pub fn generate(seed: u64, sizes: Sizes) -> Result<Universe, UniverseError> {
    if sizes.systems == 0 || sizes.systems > MAX_SYSTEMS {
        return Err(UniverseError::TooLarge(format!(
            "{} systems (1..={MAX_SYSTEMS})",
            sizes.systems
        )));
    }
    if sizes.alliances < 2 || sizes.alliances > sizes.systems {
        return Err(UniverseError::TooLarge(format!(
            "{} alliances for {} systems (2..=systems)",
            sizes.alliances, sizes.systems
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = sizes.systems;
    let region_count = (n / 100).max(1);
    let constellation_count = (n / 10).max(region_count);
    let regions: Vec<Region> = (0..region_count as u32)
        .map(|id| Region {
            id,
            name: format!(
                "{} {}",
                GREEK[id as usize % GREEK.len()],
                id / GREEK.len() as u32 + 1
            ),
        })
        .collect();
    let constellations: Vec<Constellation> = (0..constellation_count as u32)
        .map(|id| Constellation {
            id,
            region: (id as usize * region_count / constellation_count) as u32,
            name: format!("C-{id:04}"),
        })
        .collect();
    let mut systems: Vec<System> = (0..n as u32)
        .map(|id| {
            let constellation = (id as usize * constellation_count / n) as u32;
            System {
                id,
                name: format!("{}-{:05}", (b'A' + (id % 26) as u8) as char, id),
                constellation,
                region: constellations[constellation as usize].region,
                security: (rng.gen_range(-10..=10) as f32) / 10.0,
                jumps: Vec::new(),
                sovereign: None,
            }
        })
        .collect();
    let link = |systems: &mut Vec<System>, a: usize, b: usize| {
        if a == b
            || systems[a].jumps.contains(&(b as u32))
            || systems[a].jumps.len() >= MAX_JUMPS
            || systems[b].jumps.len() >= MAX_JUMPS
        {
            return;
        }
        systems[a].jumps.push(b as u32);
        systems[b].jumps.push(a as u32);
    };
    // Systems are laid out in constellation order: consecutive ids chain a
    // constellation, and the chain continues into the next constellation,
    // so the whole graph is connected.
    for i in 1..n {
        link(&mut systems, i - 1, i);
    }
    // Extra links within a region.
    for i in 0..n {
        if rng.gen_bool(0.3) {
            let region = systems[i].region;
            let lo = n * region as usize / region_count;
            let hi = (n * (region as usize + 1) / region_count).max(lo + 1);
            let j = rng.gen_range(lo..hi);
            link(&mut systems, i, j);
        }
    }
    // Sovereignty: alliances hold about 40% of the systems.
    let mut ids: Vec<usize> = (0..n).collect();
    ids.shuffle(&mut rng);
    let held = (n * 2 / 5).max(sizes.alliances);
    let alliances: Vec<Alliance> = (0..sizes.alliances)
        .map(|a| Alliance {
            id: a as u32,
            name: format!("Alliance {a}"),
            capital: ids[a] as u32,
        })
        .collect();
    for (k, &s) in ids.iter().take(held).enumerate() {
        systems[s].sovereign = Some(if k < sizes.alliances {
            k as u32
        } else {
            rng.gen_range(0..sizes.alliances as u32)
        });
    }
    // Campaigns in held systems, at most one per system.
    let mut contested: Vec<usize> = ids.iter().take(held).copied().collect();
    contested.shuffle(&mut rng);
    let campaigns: Vec<Campaign> = contested
        .iter()
        .take(sizes.campaigns)
        .enumerate()
        .map(|(id, &s)| {
            let defender = systems[s].sovereign.expect("held");
            let mut attacker = rng.gen_range(0..sizes.alliances as u32);
            if attacker == defender {
                attacker = (attacker + 1) % sizes.alliances as u32;
            }
            Campaign {
                id: id as u32,
                system: s as u32,
                defender,
                attacker,
                score: rng.gen_range(0..=100),
            }
        })
        .collect();
    let mut market_orders = Vec::with_capacity(region_count * sizes.orders_per_region);
    for r in &regions {
        for _ in 0..sizes.orders_per_region {
            market_orders.push(MarketOrder {
                id: market_orders.len() as u64,
                region: r.id,
                item: rng.gen_range(1..=500),
                buy: rng.gen_bool(0.5),
                price: rng.gen_range(100..=10_000_000),
                quantity: rng.gen_range(1..=10_000),
            });
        }
    }
    let characters = (0..sizes.characters as u64)
        .map(|id| Character {
            id,
            name: format!("Pilot {id}"),
            system: rng.gen_range(0..n as u32),
            alliance: rng
                .gen_bool(0.6)
                .then(|| rng.gen_range(0..sizes.alliances as u32)),
        })
        .collect();
    let u = Universe {
        seed,
        regions,
        constellations,
        systems,
        alliances,
        campaigns,
        market_orders,
        characters,
    };
    // The generator's own output must keep every rule.
    u.validate()?;
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_post_mortem_universe_has_300_campaigns_and_validates() {
        let u = generate(7, Sizes::for_systems(5000)).unwrap();
        assert_eq!(u.systems.len(), 5000);
        assert_eq!(u.campaigns.len(), 300);
        assert_eq!(u.regions.len(), 50);
        assert!(u.market_orders.len() >= 50 * 40);
        assert!(u.systems.iter().all(|s| !s.jumps.is_empty()));
        u.validate().unwrap();
    }

    #[test]
    fn the_same_seed_gives_the_same_universe() {
        let a = generate(42, Sizes::for_systems(500)).unwrap();
        let b = generate(42, Sizes::for_systems(500)).unwrap();
        let c = generate(43, Sizes::for_systems(500)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn broken_rows_are_named_and_refused() {
        let u = generate(1, Sizes::for_systems(200)).unwrap();
        let mut dangling = u.clone();
        dangling.systems[5].jumps.push(99_999);
        let e = dangling.validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "systems row 5: jump link to unknown system 99999"
        );
        let mut unknown = u.clone();
        unknown.campaigns[0].attacker = 4242;
        let e = unknown.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("campaigns row 0: unknown alliance 4242"),
            "{e}"
        );
        let mut duplicate = u.clone();
        let mut again = duplicate.campaigns[0].clone();
        again.id = 9_999;
        duplicate.campaigns.push(again);
        let e = duplicate.validate().unwrap_err().to_string();
        assert!(e.contains("duplicate campaign"), "{e}");
        let mut one_way = u.clone();
        let j = one_way.systems[3].jumps[0] as usize;
        one_way.systems[j].jumps.retain(|x| *x != 3);
        assert!(one_way
            .validate()
            .unwrap_err()
            .to_string()
            .contains("one-way"));
    }

    #[test]
    fn a_broken_file_is_refused_with_the_row_and_a_good_one_loads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("universe.json");
        let mut u = generate(3, Sizes::for_systems(300)).unwrap();
        u.save(&p).unwrap();
        assert_eq!(Universe::load(&p).unwrap(), u);
        u.alliances[1].capital = 1_000_000;
        u.save(&p).unwrap();
        let e = Universe::load(&p).unwrap_err().to_string();
        assert_eq!(e, "alliances row 1: capital 1000000 is not a system");
        std::fs::write(&p, b"{\"seed\": 1, \"systems\": [").unwrap();
        assert!(matches!(
            Universe::load(&p),
            Err(UniverseError::Parse { .. })
        ));
    }

    #[test]
    fn sizes_are_bounded() {
        assert!(generate(1, Sizes::for_systems(0)).is_err());
        assert!(generate(1, Sizes::for_systems(MAX_SYSTEMS + 1)).is_err());
    }
}
