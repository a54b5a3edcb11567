//! How nvcc is told to round: the kernels are compiled with `--fmad=false`, so `a * b + c` in a
//! kernel rounds twice on a card exactly as in the emulator (`-ffp-contract=off`) and the CPU
//! paths, and only an explicit `fmaf` rounds once (`std::fmaf` in the emulator). Without it the
//! bit-for-bit tests (device optimiser against the host one, graph against eager) would hold on
//! the emulator and could fail on a GPU. Checked on the PTX of a probe compiled with the crate's
//! own flags (`senet::cuda::kernels::NVCC_FLAGS`); skipped where the build had no nvcc.

use std::path::Path;
use std::process::Command;

use senet::cuda::kernels::{NVCC_FLAGS, NVCC_PATH};

const PROBE: &str = r#"
extern "C" __global__ void probe(const float* a, const float* b, const float* c, float* o) {
    o[0] = a[0] * b[0] + c[0];
    o[1] = fmaf(a[1], b[1], c[1]);
    o[2] = a[2] * b[2] - c[2];
}
"#;

/// The probe's PTX with `flags`.
fn ptx(flags: &[&str], dir: &Path, name: &str) -> String {
    let src = dir.join(format!("{name}.cu"));
    let out = dir.join(format!("{name}.ptx"));
    std::fs::write(&src, PROBE).unwrap();
    let o = Command::new(NVCC_PATH)
        .args(["--ptx", "-arch=compute_90"])
        .args(flags)
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .output()
        .expect("running nvcc");
    assert!(
        o.status.success(),
        "nvcc failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read_to_string(out).unwrap()
}

/// Counts of (fused multiply-adds, separately rounded f32 multiplies, f32 adds or subtracts that
/// ptxas may still contract, i.e. without a rounding modifier).
fn census(ptx: &str) -> (usize, usize, usize) {
    let ops: Vec<&str> = ptx
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let count = |p: &dyn Fn(&str) -> bool| ops.iter().filter(|o| p(o)).count();
    (
        count(&|o| o.starts_with("fma.rn.f32")),
        count(&|o| o.starts_with("mul.rn.f32")),
        count(&|o| matches!(o, "mul.f32" | "add.f32" | "sub.f32")),
    )
}

#[test]
fn kernels_are_compiled_without_contraction() {
    if NVCC_PATH.is_empty() {
        assert!(
            std::env::var("SENET_REQUIRE_NVCC").as_deref() != Ok("1"),
            "SENET_REQUIRE_NVCC=1 but the build found no nvcc"
        );
        println!("skipped: built without nvcc");
        return;
    }
    let dir = std::env::temp_dir().join(format!("senet-codegen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // With the crate's flags: one FMA (the explicit fmaf), two multiplies rounded on their own,
    // nothing left for ptxas to fuse.
    let ours = census(&ptx(NVCC_FLAGS, &dir, "crate"));
    assert_eq!(
        ours,
        (1, 2, 0),
        "(fma, mul.rn, contractable) with {NVCC_FLAGS:?}"
    );
    // nvcc's defaults fuse `a * b + c`: the census above tells them apart.
    let defaults: Vec<&str> = NVCC_FLAGS
        .iter()
        .copied()
        .filter(|f| !f.starts_with("--fmad"))
        .collect();
    let theirs = census(&ptx(&defaults, &dir, "defaults"));
    assert_ne!(theirs, ours, "nvcc's default flags contract differently");
    std::fs::remove_dir_all(&dir).ok();
}
