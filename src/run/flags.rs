//! torchrun flags (being written).
