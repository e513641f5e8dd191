//! orrery-wire (being written)
