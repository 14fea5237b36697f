//! Bakes libtorch's library folder into the run path (shared with the engine crate).
include!("../engine/torch_rpath.rs");
