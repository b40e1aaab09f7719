//! The local worker group (being written).
