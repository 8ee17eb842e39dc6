//! Which instruction-set level the vectorised kernels run at on this CPU, detected once.
//!
//! Every `#[target_feature]` kernel wrapper in the crate (`src/ops/gemm/fast/*.rs`,
//! `src/model/fast_linear.rs`) is called only at a level whose detected features include every
//! feature it enables:
//!
//! - [`Isa::Avx512`]: `avx512f, avx512bw, avx512dq, avx512vl, avx2, fma, bmi1, bmi2, lzcnt, popcnt`
//!   (x86-64-v4; every AVX-512 CPU since Skylake-SP has them all);
//! - [`Isa::Avx2`]: `avx2, fma, bmi1, bmi2, lzcnt, popcnt` (x86-64-v3);
//! - [`Isa::Portable`]: nothing beyond the target's baseline.

use std::sync::OnceLock;

/// An instruction-set level (module docs list the features of each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

/// This CPU's level (detected on the first call).
pub(crate) fn isa() -> Isa {
    static LEVEL: OnceLock<Isa> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let v3 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("bmi1")
            && is_x86_feature_detected!("bmi2")
            && is_x86_feature_detected!("lzcnt")
            && is_x86_feature_detected!("popcnt");
        let v4 = v3
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl");
        if v4 {
            return Isa::Avx512;
        }
        if v3 {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}
