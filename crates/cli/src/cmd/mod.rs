//! One module per command group.

pub mod artifacts;
pub mod bench;
pub mod config;
pub mod dataset;
pub mod eval;
pub mod merge;
pub mod model;
pub mod protocols;
pub mod run;
pub mod schema;
pub mod skills;
pub mod train;
pub mod validate;
