//! orrery-node (being written)
