//! The fused exact kernel's block dots on AMX (Intel Advanced Matrix Extensions, `TDPBSSD`:
//! int8 × int8 → int32 tiles), bit-identical to the f64 micro-kernel and to the reference.
//!
//! Why an integer dot is the exact dot: an E4M3 value times 2^9 is an integer `±m·2^s` with
//! `m` its 4-bit significand (8 + mantissa, or the mantissa of a subnormal) and
//! `s = max(E − 1, 0) ∈ 0..=14` (`E` the biased exponent; 448 becomes 14·2^14, the smallest
//! subnormal 2^-9 becomes 1). Such an integer does not fit an int8, so it is
//! split into four limbs by `s`: limb `s / 4` holds `±m·2^(s mod 4)` (at most 15·8 = 120) and
//! the other three hold 0, so `a·2^9 = Σ_i A_i·2^(4i)`. Then
//!
//! `Σ_k a_k·b_k = 2^-18 · Σ_g 2^(4g) · S_g`,  `S_g = Σ_{i+j=g} Σ_k A_i[k]·B_j[k]`, g ∈ 0..=6,
//!
//! 16 limb products in 7 groups. Each `S_g` is exact in int32 (at most 4 pairs × B × 120² for a
//! block of B ≤ 1024: < 2^26) and the recombination is exact in f64 (integer multiples of 2^-18
//! below 1024·448² < 2^28: < 46 bits), so the f64 block dot equals the f64 micro-kernel's and the reference's
//! exact sum; promotion and write-back are [`super::fused`]'s, shared.
//!
//! Loop order (as the f64 kernel's tasks): per K-block, the task's `MC` rows and `NC` columns
//! are decoded into limb tiles of 16 rows × 64 K (A as rows, B in the VNNI layout `TDPBSSD`
//! reads: row `k/4`, bytes `4·n + k mod 4`), K padded with zero codes to 64. Per 16 × 16 output
//! tile, three passes over the block's 64-deep chunks keep three int32 accumulators in `tmm0..2`
//! and the operand limbs in `tmm4..7` (pairs (0,0),(0,1),(1,0),(1,1); then (0,2),(0,3),(1,2),
//! (1,3),(2,0),(2,1),(3,0),(3,1); then (2,2),(2,3),(3,2),(3,3)), storing each group once it is
//! complete: 7 stores, 32 tile products per 128-deep block.
//!
//! Taken where the CPU has AMX-INT8 and AVX-512BW and Linux grants the tile state
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); `DSV3_EXACT_KERNEL=f64` or
//! [`super::with_exact_kernel`] chooses the f64 kernel instead.

use std::arch::asm;
use std::sync::OnceLock;

use super::fused::{promote, write_tile, Job};

/// Rows and columns of one task: each operand's codes are decoded once per task that needs
/// them, so larger tasks decode less (A `N/NC` times, B `M/MC` times); the task's f32
/// accumulators (1 MB) and magnitudes (2 MB) stay in a 4 MB L2.
pub(super) const MC: usize = 512;
pub(super) const NC: usize = 256;

/// Rows (and columns) of an output tile; rows of an operand tile.
const T: usize = 16;
/// K per tile product.
const CHUNK: usize = 64;
/// Limbs per operand.
const LIMBS: usize = 4;
/// Bytes of one operand tile (16 rows × 64 bytes).
const TILE: usize = T * CHUNK;
/// Groups `g = i + j` of limb pairs.
const GROUPS: usize = 7;

/// Whether the AMX kernel can run here (checked once per process; asks Linux for the tile state).
pub(super) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(detect)
}

fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    if !(is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("fma"))
    {
        return false;
    }
    // SAFETY: CPUID exists on every x86_64 CPU; leaf 7 is read only when the CPU reports it.
    // (`__cpuid_count` is an unsafe fn at the MSRV, a safe one in later toolchains.)
    #[allow(unused_unsafe)]
    let leaf7 = unsafe {
        if __cpuid_count(0, 0).eax < 7 {
            return false;
        }
        __cpuid_count(7, 0)
    };
    // EDX bit 24: AMX-TILE, bit 25: AMX-INT8
    if leaf7.edx & (1 << 24) == 0 || leaf7.edx & (1 << 25) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only asks for permission to use the tile state;
    // it fails (non-zero) where the kernel does not support or grant it.
    let granted = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    granted == 0
}

/// `ldtilecfg`'s 64-byte operand: palette 1, all eight tiles 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn all_full() -> Self {
        let mut cfg = [0u8; 64];
        cfg[0] = 1;
        for t in 0..8 {
            cfg[16 + 2 * t..18 + 2 * t].copy_from_slice(&(CHUNK as u16).to_le_bytes());
            cfg[48 + t] = T as u8;
        }
        TileConfig(cfg)
    }
}

/// The limb planes of 64 codes: `planes[l][i]` is code `i`'s limb `l` (see the module header).
#[inline(always)]
fn decode(codes: &[u8; CHUNK], planes: &mut [[i8; CHUNK]; LIMBS]) {
    let mut value = [0i8; CHUNK];
    let mut limb = [0u8; CHUNK];
    for i in 0..CHUNK {
        let c = codes[i];
        let e = (c >> 3) & 15;
        let m = (c & 7) | if e != 0 { 8 } else { 0 };
        let s = e.saturating_sub(1);
        let m = if s & 1 != 0 { m + m } else { m };
        let m = if s & 2 != 0 { m << 2 } else { m };
        value[i] = if c & 0x80 != 0 { m.wrapping_neg() } else { m } as i8;
        limb[i] = s >> 2;
    }
    for (l, plane) in planes.iter_mut().enumerate() {
        for i in 0..CHUNK {
            plane[i] = if usize::from(limb[i]) == l {
                value[i]
            } else {
                0
            };
        }
    }
}

/// Codes `from..to` of a row (at most 64), zero-padded to 64 at the end of the block.
#[inline(always)]
fn chunk_codes(row: &[u8], from: usize, to: usize) -> [u8; CHUNK] {
    if to - from == CHUNK {
        return row[from..to].try_into().expect("64 codes");
    }
    let mut codes = [0u8; CHUNK];
    for (c, &r) in codes.iter_mut().zip(&row[from..to]) {
        *c = r;
    }
    codes
}

/// One task of the fused exact kernel (rows `r0..r0 + MC`, columns `n0..n0 + NC`, clipped),
/// its block dots on AMX.
///
/// # Safety
/// Only where [`available`] is true; the task's tile of the output is its own.
#[target_feature(enable = "avx512f,avx512bw,fma")]
pub(super) unsafe fn tile(job: &Job, r0: usize, n0: usize) {
    let Job { ops, a, b, out, .. } = *job;
    let (m, k, n) = (ops.a.nrows(), ops.a.ncols(), ops.b.nrows());
    let bs = ops.block_size;
    let mr = MC.min(m - r0);
    let nc = NC.min(n - n0);
    let (groups_a, groups_b) = (mr.div_ceil(T), nc.div_ceil(T));
    let chunks_max = bs.div_ceil(CHUNK);
    // a tile (group g, chunk q, limb l) at ((g·chunks_max + q)·LIMBS + l)·TILE; rows past the
    // operand's end are never written and stay zero
    let mut apack = vec![0u8; groups_a * chunks_max * LIMBS * TILE];
    let mut bpack = vec![0u8; groups_b * chunks_max * LIMBS * TILE];
    let mut sa = vec![0f32; mr];
    let mut sb = vec![0f32; nc];
    // accumulators (and magnitudes) tile-major, 16 × 16 output tiles column group by column
    // group, in the order the blocks visit them: `((gb·groups_a + ga)·16 + i)·16 + j`
    let tiled = groups_a * groups_b * T * T;
    let mut c_tile = vec![0f32; tiled];
    let mut mag_tile = vec![0f64; if out.magnitude_kept() { tiled } else { 0 }];
    let mut sums = [Sums([0; GROUPS * T * T]), Sums([0; GROUPS * T * T])];
    let mut cur = 0;
    let mut planes = [[0i8; CHUNK]; LIMBS];
    let cfg = TileConfig::all_full();
    // SAFETY: the configuration is a valid palette-1 layout; the tile state was granted.
    unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
    for (kb, k0) in (0..k).step_by(bs).enumerate() {
        let kc = bs.min(k - k0);
        let chunks = kc.div_ceil(CHUNK);
        let next = (k0 + kc)..(k0 + kc + bs).min(k);
        for r in 0..mr {
            let row = &a[(r0 + r) * k..(r0 + r + 1) * k];
            prefetch(&row[next.clone()]);
            let (g, i) = (r / T, r % T);
            for q in 0..chunks {
                let from = k0 + q * CHUNK;
                decode(
                    &chunk_codes(row, from, (from + CHUNK).min(k0 + kc)),
                    &mut planes,
                );
                for (l, plane) in planes.iter().enumerate() {
                    let at = ((g * chunks_max + q) * LIMBS + l) * TILE + i * CHUNK;
                    apack[at..at + CHUNK].copy_from_slice(&plane.map(|v| v as u8));
                }
            }
        }
        for c in 0..nc {
            let row = &b[(n0 + c) * k..(n0 + c + 1) * k];
            prefetch(&row[next.clone()]);
            let (g, j) = (c / T, c % T);
            for q in 0..chunks {
                let from = k0 + q * CHUNK;
                decode(
                    &chunk_codes(row, from, (from + CHUNK).min(k0 + kc)),
                    &mut planes,
                );
                for (l, plane) in planes.iter().enumerate() {
                    let tile = ((g * chunks_max + q) * LIMBS + l) * TILE;
                    let tile: &mut [u8; TILE] =
                        (&mut bpack[tile..tile + TILE]).try_into().expect("a tile");
                    // VNNI: row kq holds, for each column j, its codes 4·kq .. 4·kq + 4
                    for (kq, quad) in plane.chunks_exact(4).enumerate() {
                        let at = kq * CHUNK + 4 * j;
                        for (d, &v) in tile[at..at + 4].iter_mut().zip(quad) {
                            *d = v as u8;
                        }
                    }
                }
            }
        }
        for (i, s) in sa.iter_mut().enumerate() {
            *s = ops.a_scale(r0 + i, kb);
        }
        for (j, s) in sb.iter_mut().enumerate() {
            *s = ops.b_scale(n0 + j, kb);
        }
        // software-pipelined: the tile products of output tile t + 1 run on the AMX unit while
        // the vector units promote tile t (two sums buffers)
        let mut pending: Option<(usize, usize)> = None;
        let mut promote_tile = |(ga, gb): (usize, usize), sums: &Sums| {
            let cols = T.min(nc - gb * T);
            let sbs = &sb[gb * T..gb * T + cols];
            for i in 0..T.min(mr - ga * T) {
                let r = ga * T + i;
                let dots = recombine(sums, i);
                let at = ((gb * groups_a + ga) * T + i) * T;
                let mag_run = (!mag_tile.is_empty()).then(|| &mut mag_tile[at..at + cols]);
                promote(
                    &mut c_tile[at..at + cols],
                    mag_run,
                    &dots[..cols],
                    sa[r],
                    sbs,
                );
            }
        };
        for gb in 0..groups_b {
            let bt = bpack[gb * chunks_max * LIMBS * TILE..].as_ptr();
            for ga in 0..groups_a {
                let at = apack[ga * chunks_max * LIMBS * TILE..].as_ptr();
                let (s0, s1) = sums.split_at_mut(1);
                let (now, before) = if cur == 0 {
                    (&mut s0[0], &s1[0])
                } else {
                    (&mut s1[0], &s0[0])
                };
                // SAFETY: `chunks` ≤ chunks_max tiles of both operands lie behind `at` and `bt`;
                // `now` holds the seven groups' 16 × 16 int32 tiles.
                unsafe { block_sums(at, bt, chunks, now) };
                if let Some(tile) = pending {
                    promote_tile(tile, before);
                }
                pending = Some((ga, gb));
                cur ^= 1;
            }
        }
        if let Some(tile) = pending {
            promote_tile(tile, &sums[cur ^ 1]);
        }
    }
    // SAFETY: the tile state is this thread's; releasing it ends its use.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
    // SAFETY: the task's rows and columns, clipped to the output; tasks are disjoint.
    unsafe {
        write_tile(
            out,
            (r0, n0, n),
            (mr, nc),
            &row_major(&c_tile, (mr, nc), groups_a),
            &row_major(&mag_tile, (mr, nc), groups_a),
        )
    };
}

/// A tile-major `[groups_b][groups_a][16][16]` array as row-major `[mr, nc]` (empty stays empty).
fn row_major<V: Copy + Default>(tiled: &[V], (mr, nc): (usize, usize), groups_a: usize) -> Vec<V> {
    if tiled.is_empty() {
        return Vec::new();
    }
    let mut rows = vec![V::default(); mr * nc];
    for (r, row) in rows.chunks_exact_mut(nc).enumerate() {
        for (gb, run) in row.chunks_mut(T).enumerate() {
            let at = ((gb * groups_a + r / T) * T + r % T) * T;
            run.copy_from_slice(&tiled[at..at + run.len()]);
        }
    }
    rows
}

/// Ask for `codes` in the cache: the next K-block's codes of a row, 7 KB from its neighbour's,
/// which the hardware prefetchers do not foresee (without this the decode waits on DRAM).
#[inline(always)]
fn prefetch(codes: &[u8]) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    for line in codes.chunks(64) {
        // SAFETY: a prefetch of an address inside a live slice; it has no architectural effect.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
    }
}

/// The seven groups' int32 sums of one output tile: `S_g[i][j]` at `(g·16 + i)·16 + j`.
#[repr(C, align(64))]
struct Sums([i32; GROUPS * T * T]);

/// `2^(4g − 18)`: the weight of group `g` (E4M3 values were scaled by 2^9 each).
const WEIGHT: [f64; GROUPS] = {
    let mut w = [0f64; GROUPS];
    let mut g = 0;
    while g < GROUPS {
        // 2^(4g-18) built from bits: exponent field 1023 + 4g − 18
        w[g] = f64::from_bits(((1023 + 4 * g as u64) - 18) << 52);
        g += 1;
    }
    w
};

/// Row `i` of the tile's exact f64 block dots: `Σ_g 2^(4g−18)·S_g[i][j]` (exact: see the header).
#[inline(always)]
fn recombine(sums: &Sums, i: usize) -> [f64; T] {
    let mut dots = [0f64; T];
    for (g, w) in WEIGHT.iter().enumerate() {
        let row = &sums.0[(g * T + i) * T..(g * T + i + 1) * T];
        for (d, &s) in dots.iter_mut().zip(row) {
            *d += f64::from(s) * w;
        }
    }
    dots
}

/// The seven group sums ([`Sums`]) of one 16 × 16 output tile over `chunks` 64-deep chunks of
/// a K-block. `a`: the row group's limb tiles, `(q·4 + l)·1024` bytes in; `b`: the column
/// group's, alike.
///
/// Tile loads cost about three tile products here, so the order minimises them: two B limbs
/// stay in tmm6..7 while the four A limbs stream through tmm5, each used twice, into five
/// accumulators (phase 1: B0 B1, groups 0..4 in tmm0..4; phase 2: B2 B3, groups 2..4 continued,
/// 5 in tmm0 and 6 in tmm1 once groups 0 and 1 are stored): 24 loads, 32 products and 7 stores
/// per 128-deep block. Consecutive products write different accumulators.
///
/// # Safety
/// AMX configured by the caller (all tiles 16 × 64 bytes); `chunks·4` tiles readable at each
/// operand.
#[inline(always)]
unsafe fn block_sums(a: *const u8, b: *const u8, chunks: usize, sums: &mut Sums) {
    let s = sums.0.as_mut_ptr().cast::<u8>();
    let tile = |t: usize| s.add(t * T * T * 4);
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "tilezero tmm4",
        options(nostack, nomem)
    );
    // phase 1: B0 B1 resident; groups 0..4 in tmm0..4
    for q in 0..chunks {
        let (aq, bq) = (a.add(q * LIMBS * TILE), b.add(q * LIMBS * TILE));
        asm!(
            "tileloadd tmm6, [{b} + {s}*1]",
            "tileloadd tmm7, [{b} + {s}*1 + 1024]",
            "tileloadd tmm5, [{a} + {s}*1]",
            "tdpbssd tmm0, tmm5, tmm6",
            "tdpbssd tmm1, tmm5, tmm7",
            "tileloadd tmm5, [{a} + {s}*1 + 1024]",
            "tdpbssd tmm2, tmm5, tmm7",
            "tdpbssd tmm1, tmm5, tmm6",
            "tileloadd tmm5, [{a} + {s}*1 + 2048]",
            "tdpbssd tmm3, tmm5, tmm7",
            "tdpbssd tmm2, tmm5, tmm6",
            "tileloadd tmm5, [{a} + {s}*1 + 3072]",
            "tdpbssd tmm4, tmm5, tmm7",
            "tdpbssd tmm3, tmm5, tmm6",
            a = in(reg) aq, b = in(reg) bq, s = in(reg) CHUNK,
            options(nostack, readonly)
        );
    }
    asm!(
        "tilestored [{t0} + {s}*1], tmm0",
        "tilestored [{t1} + {s}*1], tmm1",
        "tilezero tmm0",
        "tilezero tmm1",
        t0 = in(reg) tile(0), t1 = in(reg) tile(1), s = in(reg) T * 4,
        options(nostack)
    );
    // phase 2: B2 B3 resident; groups 2..4 continue in tmm2..4, 5 in tmm0, 6 in tmm1
    for q in 0..chunks {
        let (aq, bq) = (a.add(q * LIMBS * TILE), b.add(q * LIMBS * TILE));
        asm!(
            "tileloadd tmm6, [{b} + {s}*1 + 2048]",
            "tileloadd tmm7, [{b} + {s}*1 + 3072]",
            "tileloadd tmm5, [{a} + {s}*1]",
            "tdpbssd tmm2, tmm5, tmm6",
            "tdpbssd tmm3, tmm5, tmm7",
            "tileloadd tmm5, [{a} + {s}*1 + 1024]",
            "tdpbssd tmm4, tmm5, tmm7",
            "tdpbssd tmm3, tmm5, tmm6",
            "tileloadd tmm5, [{a} + {s}*1 + 2048]",
            "tdpbssd tmm0, tmm5, tmm7",
            "tdpbssd tmm4, tmm5, tmm6",
            "tileloadd tmm5, [{a} + {s}*1 + 3072]",
            "tdpbssd tmm1, tmm5, tmm7",
            "tdpbssd tmm0, tmm5, tmm6",
            a = in(reg) aq, b = in(reg) bq, s = in(reg) CHUNK,
            options(nostack, readonly)
        );
    }
    asm!(
        "tilestored [{t2} + {s}*1], tmm2",
        "tilestored [{t3} + {s}*1], tmm3",
        "tilestored [{t4} + {s}*1], tmm4",
        "tilestored [{t5} + {s}*1], tmm0",
        "tilestored [{t6} + {s}*1], tmm1",
        t2 = in(reg) tile(2), t3 = in(reg) tile(3), t4 = in(reg) tile(4), t5 = in(reg) tile(5), t6 = in(reg) tile(6),
        s = in(reg) T * 4,
        options(nostack)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsv3_reference::fp8::fp8_gemm::e4m3_values;

    /// Every finite code's limbs recombine to its value × 2^9, with exactly one limb non-zero
    /// (or none, for ±0) and every limb within int8.
    #[test]
    fn limbs_recombine_to_every_code() {
        let values = e4m3_values();
        for c0 in (0..256).step_by(CHUNK) {
            let codes: [u8; CHUNK] = std::array::from_fn(|i| (c0 + i) as u8);
            let mut planes = [[0i8; CHUNK]; LIMBS];
            decode(&codes, &mut planes);
            for (i, &c) in codes.iter().enumerate() {
                let v = values[usize::from(c)];
                if !v.is_finite() {
                    continue;
                }
                let sum: f64 = (0..LIMBS)
                    .map(|l| f64::from(planes[l][i]) * f64::from(1u32 << (4 * l)))
                    .sum();
                assert_eq!(sum, v * 512.0, "code {c:#04x}");
                let nonzero = (0..LIMBS).filter(|&l| planes[l][i] != 0).count();
                assert!(nonzero <= 1, "code {c:#04x}");
                assert!((0..LIMBS).all(|l| planes[l][i].unsigned_abs() <= 120));
            }
        }
    }

    #[test]
    fn group_weights_are_powers_of_two() {
        for (g, w) in WEIGHT.iter().enumerate() {
            assert_eq!(*w, 2f64.powi(4 * g as i32 - 18));
        }
    }
}
