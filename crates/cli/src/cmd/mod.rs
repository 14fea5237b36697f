//! One module per command group.

pub mod schema;
pub mod skills;
pub mod validate;
