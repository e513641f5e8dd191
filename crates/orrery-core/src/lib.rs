//! orrery-core (being written)
