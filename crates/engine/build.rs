//! Bakes libtorch's library folder into the run path (see torch_rpath.rs).
include!("torch_rpath.rs");
