// Shared build-script body for every package that links libtorch (tch): it
// bakes `$LIBTORCH/lib` into the binaries' run path, so programs and test
// binaries find libtorch without LD_LIBRARY_PATH. Packages use it with
// `include!("<path to>/crates/engine/torch_rpath.rs");` as their whole build.rs.
// `LIBTORCH` comes from .cargo/config.toml (set up by `cargo xtask setup`).

/// Emits the run-path link argument for `$LIBTORCH/lib`.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Some(root) = std::env::var_os("LIBTORCH") {
        let lib = std::path::Path::new(&root).join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    } else {
        println!(
            "cargo:warning=LIBTORCH is not set: run `cargo xtask setup` (binaries will need LD_LIBRARY_PATH)"
        );
    }
}
