//! orrery-control (being written)
