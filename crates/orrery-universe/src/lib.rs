//! orrery-universe: the example application, a persistent game universe of
//! the kind the post-mortems describe — regions, constellations, solar
//! systems joined by jump links, alliances with capital systems, sovereignty
//! campaigns, regional markets and characters.
//!
//! This crate owns the universe's data model ([`Universe`]), its seeded
//! generator ([`generate`]) and its validation ([`Universe::validate`]):
//! every row is checked before anything is loaded, and a broken row (a
//! dangling jump link, an unknown alliance) is reported with the row and
//! refused whole. It uses only orrery's public API, so it also shows users
//! how to write a service.
//!
//! What it must never do: load a universe it has not validated, or produce
//! a different universe from the same seed and sizes (generation is a pure
//! function of its inputs).

mod generate;
pub mod import;
mod model;
pub mod service;

pub use generate::{generate, Sizes};
pub use import::{import, ImportError, UniverseMeta};
pub use model::{
    Alliance, AllianceId, Campaign, CampaignId, Character, Constellation, MarketOrder, Region,
    RegionId, System, SystemId, Universe, UniverseError, MAX_SYSTEMS,
};
pub use service::{
    StatsJob, Universe as UniverseService, UniverseConfig, UniverseConsole, UniverseStages,
};
