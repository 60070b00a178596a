//! Builds `redirector-ebpf` for bpfel with the pinned nightly (aya-build) so that
//! `include_bytes_aligned!` in `bpf.rs` can embed the object.
use anyhow::Context as _;

/// The nightly that builds the eBPF crate. Its LLVM major must match bpf-linker's
/// (xtask setup builds bpf-linker against this toolchain's own libLLVM).
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir).join("../redirector-ebpf");
    let root = root.to_str().context("non-UTF-8 path to redirector-ebpf")?;
    println!("cargo:rerun-if-changed=../redirector-common/src");
    let variant = std::env::var_os("CARGO_FEATURE_TEST_DATAPATH_VARIANT").is_some();
    let pkg = aya_build::Package {
        name: "redirector-ebpf",
        root_dir: root,
        features: if variant { &["variant"] } else { &[] },
        ..Default::default()
    };
    aya_build::build_ebpf([pkg], aya_build::Toolchain::Custom(EBPF_TOOLCHAIN)).context(
        "building the eBPF programs failed; run `cargo xtask setup` to install the pinned \
         nightly with rust-src and bpf-linker",
    )
}
