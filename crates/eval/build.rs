//! Bakes libtorch's library folder into the run path (see crates/engine/torch_rpath.rs).
include!("../engine/torch_rpath.rs");
