//! placeholder
pub mod discovery;
pub mod process;
