//! The workspace's one integration-test binary: cross-crate scenarios and
//! tidy checks, one module per area.

mod orchestrator;
mod tidy;
