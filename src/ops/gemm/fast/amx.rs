//! The fused exact kernel's block dots on AMX (Intel Advanced Matrix Extensions, `TDPBSSD`:
//! int8 × int8 → int32 tiles), bit-identical to the f64 micro-kernel and to the reference.
//!
//! Why an integer dot is the exact dot: an E4M3 value times 2^9 is an integer `±u` with
//! `u = m·2^max(E − 1, 0)` (`m` the 4-bit significand: 8 + mantissa, or a subnormal's mantissa;
//! `E` the biased exponent), below 2^18 (448 becomes 229 376 = 14·2^14, the smallest subnormal
//! 2^-9 becomes 1). Written in base 128 with the value's sign on every digit,
//! `±u = D_0 + 2^7·D_1 + 2^14·D_2`, each digit within ±127: an int8. Then
//!
//! `Σ_k a_k·b_k = 2^-18 · Σ_g 2^(7g) · S_g`,  `S_g = Σ_{i+j=g} Σ_k A_i[k]·B_j[k]`, g ∈ 0..=4,
//!
//! nine digit products in five groups. Each `S_g` is exact in int32 (at most 3 pairs × B × 127²
//! for a block of B ≤ 1024: < 2^26) and the recombination is exact in f64 (integer multiples of
//! 2^-18 of magnitude below 1024·448² < 2^28, every partial sum too: < 46 bits), so the f64
//! block dot equals the f64 micro-kernel's and the reference's exact sum; promotion and
//! write-back are [`super::fused`]'s, shared.
//!
//! Loop order (as the f64 kernel's tasks, larger): per K-block, the task's `MC` rows and `NC`
//! columns are decoded into digit tiles of 16 rows × 64 K (A as rows, B in the VNNI layout
//! `TDPBSSD` reads: row `k/4`, bytes `4·n + k mod 4`), K padded with zero codes to 64. Per
//! 16 × 16 output tile, [`block_sums`] runs the block's 64-deep chunks with the three B digits
//! resident and A's streaming — tile loads cost about three tile products on this machine, so
//! the order that loads least wins — and stores the five group sums, which
//! the vector units recombine and promote while the AMX unit works on the next output tile.
//!
//! Taken where the CPU has AMX-INT8 and the AVX-512 level (`src/isa.rs`) and Linux grants the
//! tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); `DSV3_EXACT_KERNEL=f64` or
//! [`super::with_exact_kernel`] chooses the f64 kernel instead.

use std::arch::asm;
use std::sync::OnceLock;

use super::fused::{promote, write_tile, Job};

/// Rows and columns of one task: each operand's codes are decoded once per task that needs
/// them, so larger tasks decode less (A `N/NC` times unless [`ADigits`] holds it, B `M/MC`
/// times), while the task's f32 accumulators (512 KB) and a check's magnitudes (1 MB) still fit
/// a 2 MB L2; of 128…512 × 256…512, 512 × 256 measured fastest.
pub(super) const MC: usize = 512;
pub(super) const NC: usize = 256;

/// Rows (and columns) of an output tile; rows of an operand tile.
const T: usize = 16;
/// K per tile product.
const CHUNK: usize = 64;
/// Output tiles in flight: a tile is promoted once the products of the next `DEPTH − 1` are
/// issued (2: 8 % faster than promoting at once; 3 and 4 measured no faster).
const DEPTH: usize = 2;
/// Digits (int8 tiles) per operand.
const DIGITS: usize = 3;
/// Bytes of one operand tile (16 rows × 64 bytes).
const TILE: usize = T * CHUNK;
/// Groups `g = i + j` of digit pairs.
const GROUPS: usize = 5;

/// Whether the AMX kernel can run here (checked once per process; asks Linux for the tile state).
pub(super) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(detect)
}

fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    // `tile` is compiled for (a subset of) the AVX-512 level
    if crate::isa::isa() != crate::isa::Isa::Avx512 {
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

/// The digit planes of 64 codes: `planes[l][i]` is code `i`'s digit `l` (see the module header).
#[inline(always)]
fn decode(codes: &[u8; CHUNK], planes: &mut [[i8; CHUNK]; DIGITS]) {
    for i in 0..CHUNK {
        let c = codes[i];
        let e = u32::from((c >> 3) & 15);
        let m = u32::from(c & 7) | if e != 0 { 8 } else { 0 };
        let u = m << e.saturating_sub(1);
        for (l, plane) in planes.iter_mut().enumerate() {
            let d = ((u >> (7 * l)) & 127) as i8;
            plane[i] = if c & 0x80 != 0 { -d } else { d };
        }
    }
}

/// Decode a row's codes `k0..k0 + kc` into row `i` of its group's digit tiles: chunk `q`,
/// digit `l` at `(q·DIGITS + l)·TILE` in `tiles`.
#[inline(always)]
fn pack_row(
    tiles: &mut [u8],
    row: &[u8],
    (k0, kc): (usize, usize),
    i: usize,
    planes: &mut [[i8; CHUNK]; DIGITS],
) {
    for q in 0..kc.div_ceil(CHUNK) {
        let from = k0 + q * CHUNK;
        decode(&chunk_codes(row, from, (from + CHUNK).min(k0 + kc)), planes);
        for (l, plane) in planes.iter().enumerate() {
            let at = (q * DIGITS + l) * TILE + i * CHUNK;
            tiles[at..at + CHUNK].copy_from_slice(&plane.map(|v| v as u8));
        }
    }
}

/// A's digit tiles for the whole GEMM (row group `g`, K-block `kb`, chunk `q`, digit `l` at
/// `(((g·blocks + kb)·chunks_max + q)·DIGITS + l)·TILE`), decoded once instead of once per
/// column task.
pub(super) struct ADigits {
    tiles: Vec<u8>,
    blocks: usize,
    chunks_max: usize,
}

impl ADigits {
    /// Decoded in parallel over row groups when they take no more memory than B's codes
    /// (`3·M ≤ N`: small M, where A is decoded `N / NC` times otherwise); else `None`.
    pub(super) fn of(a: &[u8], (m, k, n): (usize, usize, usize), bs: usize) -> Option<Self> {
        use rayon::prelude::*;
        if 3 * m > n || k == 0 {
            return None;
        }
        let (blocks, chunks_max) = (k.div_ceil(bs), bs.div_ceil(CHUNK));
        let group = blocks * chunks_max * DIGITS * TILE;
        let mut tiles = vec![0u8; m.div_ceil(T) * group];
        tiles
            .par_chunks_mut(group)
            .enumerate()
            .for_each(|(g, tiles)| {
                let mut planes = [[0i8; CHUNK]; DIGITS];
                for i in 0..T.min(m - g * T) {
                    let row = &a[(g * T + i) * k..(g * T + i + 1) * k];
                    for (kb, k0) in (0..k).step_by(bs).enumerate() {
                        let at = kb * chunks_max * DIGITS * TILE;
                        pack_row(&mut tiles[at..], row, (k0, bs.min(k - k0)), i, &mut planes);
                    }
                }
            });
        Some(ADigits {
            tiles,
            blocks,
            chunks_max,
        })
    }

    /// Row group `g`'s tiles of K-block `kb`.
    fn block(&self, g: usize, kb: usize) -> &[u8] {
        &self.tiles[(g * self.blocks + kb) * self.chunks_max * DIGITS * TILE..]
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
    let Job {
        ops,
        a,
        b,
        out,
        a_digits,
        ..
    } = *job;
    let (m, k, n) = (ops.a.nrows(), ops.a.ncols(), ops.b.nrows());
    let bs = ops.block_size;
    let mr = MC.min(m - r0);
    let nc = NC.min(n - n0);
    let (groups_a, groups_b) = (mr.div_ceil(T), nc.div_ceil(T));
    let chunks_max = bs.div_ceil(CHUNK);
    // the thread's buffers, reused from task to task (fresh pages cost a fault each)
    let mut scratch = SCRATCH.with(|s| s.take());
    let Scratch {
        apack,
        bpack,
        c_tile,
        mag_tile,
        row,
        mag_row,
    } = &mut scratch;
    // a tile (group g, chunk q, digit l) at ((g·chunks_max + q)·DIGITS + l)·TILE; rows past the
    // operand's end are never written and stay zero
    let apack = zeroed(apack, groups_a * chunks_max * DIGITS * TILE);
    let bpack = zeroed(bpack, groups_b * chunks_max * DIGITS * TILE);
    let mut sa = vec![0f32; mr];
    let mut sb = vec![0f32; nc];
    // accumulators (and magnitudes) tile-major, 16 × 16 output tiles column group by column
    // group, in the order the blocks visit them: `((gb·groups_a + ga)·16 + i)·16 + j`
    let tiled = groups_a * groups_b * T * T;
    let c_tile = zeroed(c_tile, tiled);
    let mag_tile = zeroed(mag_tile, if out.magnitude_kept() { tiled } else { 0 });
    let mut sums: [Sums; DEPTH] = std::array::from_fn(|_| Sums([0; GROUPS * T * T]));
    let mut planes = [[0i8; CHUNK]; DIGITS];
    let cfg = TileConfig::all_full();
    // SAFETY: the configuration is a valid palette-1 layout; the tile state was granted.
    unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
    for (kb, k0) in (0..k).step_by(bs).enumerate() {
        let kc = bs.min(k - k0);
        let chunks = kc.div_ceil(CHUNK);
        let next = (k0 + kc)..(k0 + kc + bs).min(k);
        // A's tiles of this block: decoded once for the whole GEMM, or here
        if a_digits.is_none() {
            for r in 0..mr {
                let row = &a[(r0 + r) * k..(r0 + r + 1) * k];
                prefetch(&row[next.clone()]);
                let (g, i) = (r / T, r % T);
                let tiles = &mut apack[g * chunks_max * DIGITS * TILE..];
                pack_row(tiles, row, (k0, kc), i, &mut planes);
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
                    let tile = ((g * chunks_max + q) * DIGITS + l) * TILE;
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
        // software-pipelined: the tile products of the next output tiles run on the AMX unit
        // while the vector units promote an earlier one
        let mut promote_tile = |(ga, gb): (usize, usize), sums: &Sums| {
            let cols = T.min(nc - gb * T);
            let sbs = &sb[gb * T..gb * T + cols];
            for i in 0..T.min(mr - ga * T) {
                let r = ga * T + i;
                let dots = recombine(sums, i);
                let at = ((gb * groups_a + ga) * T + i) * T;
                let mag_run = if mag_tile.is_empty() {
                    None
                } else {
                    Some(&mut mag_tile[at..at + cols])
                };
                promote(
                    &mut c_tile[at..at + cols],
                    mag_run,
                    &dots[..cols],
                    sa[r],
                    sbs,
                );
            }
        };
        // ring of DEPTH sums buffers: step s issues tile s into slot s mod DEPTH, then
        // promotes tile s − (DEPTH − 1), whose products finished while later tiles queued
        let mut ring: [Option<(usize, usize)>; DEPTH] = [None; DEPTH];
        let mut step = 0;
        for gb in 0..groups_b {
            let bt = bpack[gb * chunks_max * DIGITS * TILE..].as_ptr();
            for ga in 0..groups_a {
                let at = match a_digits {
                    Some(d) => d.block(r0 / T + ga, kb).as_ptr(),
                    None => apack[ga * chunks_max * DIGITS * TILE..].as_ptr(),
                };
                let slot = step % DEPTH;
                // SAFETY: `chunks` ≤ chunks_max tiles of both operands lie behind `at` and `bt`;
                // the slot holds the five groups' 16 × 16 int32 tiles.
                unsafe { block_sums(at, bt, chunks, &mut sums[slot]) };
                ring[slot] = Some((ga, gb));
                let oldest = (step + 1) % DEPTH;
                if let Some(tile) = ring[oldest].take() {
                    promote_tile(tile, &sums[oldest]);
                }
                step += 1;
            }
        }
        for i in 1..DEPTH {
            let slot = (step + i) % DEPTH;
            if let Some(tile) = ring[slot].take() {
                promote_tile(tile, &sums[slot]);
            }
        }
    }
    // SAFETY: the tile state is this thread's; releasing it ends its use.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
    let row = zeroed(row, nc);
    let mag_row = zeroed(mag_row, if mag_tile.is_empty() { 0 } else { nc });
    for r in 0..mr {
        gather_row(row, c_tile, r, groups_a);
        gather_row(mag_row, mag_tile, r, groups_a);
        // SAFETY: row r0 + r, the task's columns, clipped to the output; tasks are disjoint.
        unsafe { write_tile(out, (r0 + r, n0, n), (1, nc), row, mag_row) };
    }
    SCRATCH.with(|s| s.set(scratch));
}

/// A thread's buffers for [`tile`].
#[derive(Default)]
struct Scratch {
    apack: Vec<u8>,
    bpack: Vec<u8>,
    c_tile: Vec<f32>,
    mag_tile: Vec<f64>,
    row: Vec<f32>,
    mag_row: Vec<f64>,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
}

/// `v` as `len` zeros, reusing its allocation when that is large enough.
fn zeroed<V: Copy + Default>(v: &mut Vec<V>, len: usize) -> &mut [V] {
    v.clear();
    v.resize(len, V::default());
    v
}

/// Row `r` of a tile-major `[groups_b][groups_a][16][16]` array into `row` (nothing if empty).
fn gather_row<V: Copy>(row: &mut [V], tiled: &[V], r: usize, groups_a: usize) {
    for (gb, run) in row.chunks_mut(T).enumerate() {
        let at = ((gb * groups_a + r / T) * T + r % T) * T;
        run.copy_from_slice(&tiled[at..at + run.len()]);
    }
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

/// The five groups' int32 sums of one output tile: `S_g[i][j]` at `(g·16 + i)·16 + j`.
#[repr(C, align(64))]
struct Sums([i32; GROUPS * T * T]);

/// `2^(7g − 18)`: the weight of group `g` (E4M3 values were scaled by 2^9 each).
const WEIGHT: [f64; GROUPS] = {
    let mut w = [0f64; GROUPS];
    let mut g = 0;
    while g < GROUPS {
        // 2^(7g-18) built from bits: exponent field 1023 + 7g − 18
        w[g] = f64::from_bits(((1023 + 7 * g as u64) - 18) << 52);
        g += 1;
    }
    w
};

/// Row `i` of the tile's exact f64 block dots: `Σ_g 2^(7g−18)·S_g[i][j]` (exact: see the header).
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

/// The five group sums ([`Sums`]) of one 16 × 16 output tile over `chunks` 64-deep chunks of a
/// K-block. `a`: the row group's digit tiles, `(q·3 + l)·1024` bytes in; `b`: the column
/// group's, alike.
///
/// Tile loads cost about three tile products here, so the order minimises them: group 0
/// (A0·B0) first, on its own (tmm3, written last by the next phase); then per chunk the three B digits stay in tmm4..6 while the
/// three A digits stream through tmm7 into groups 1..4 (tmm0..3): 8 loads and 9 products per
/// chunk, 5 stores per block. Consecutive products write different accumulators.
///
/// # Safety
/// AMX configured by the caller (all tiles 16 × 64 bytes); `chunks·3` tiles readable at each
/// operand.
#[inline(always)]
unsafe fn block_sums(a: *const u8, b: *const u8, chunks: usize, sums: &mut Sums) {
    let s = sums.0.as_mut_ptr().cast::<u8>();
    let tile = |g: usize| s.add(g * T * T * 4);
    asm!(
        "tilezero tmm3",
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        options(nostack, nomem)
    );
    // group 0: A0·B0 (in tmm3, which the next phase writes last)
    for q in 0..chunks {
        let (aq, bq) = (a.add(q * DIGITS * TILE), b.add(q * DIGITS * TILE));
        asm!(
            "tileloadd tmm4, [{b} + {s}*1]",
            "tileloadd tmm7, [{a} + {s}*1]",
            "tdpbssd tmm3, tmm7, tmm4",
            a = in(reg) aq, b = in(reg) bq, s = in(reg) CHUNK,
            options(nostack, readonly)
        );
    }
    asm!(
        "tilestored [{g0} + {s}*1], tmm3",
        "tilezero tmm3",
        g0 = in(reg) tile(0), s = in(reg) T * 4,
        options(nostack)
    );
    // groups 1..4 in tmm0..3: B0 B1 B2 resident, A0 A1 A2 streamed
    for q in 0..chunks {
        let (aq, bq) = (a.add(q * DIGITS * TILE), b.add(q * DIGITS * TILE));
        asm!(
            "tileloadd tmm5, [{b} + {s}*1 + 1024]",
            "tileloadd tmm6, [{b} + {s}*1 + 2048]",
            "tileloadd tmm7, [{a} + {s}*1]",
            "tdpbssd tmm0, tmm7, tmm5",
            "tdpbssd tmm1, tmm7, tmm6",
            "tileloadd tmm4, [{b} + {s}*1]",
            "tileloadd tmm7, [{a} + {s}*1 + 1024]",
            "tdpbssd tmm0, tmm7, tmm4",
            "tdpbssd tmm2, tmm7, tmm6",
            "tdpbssd tmm1, tmm7, tmm5",
            "tileloadd tmm7, [{a} + {s}*1 + 2048]",
            "tdpbssd tmm3, tmm7, tmm6",
            "tdpbssd tmm1, tmm7, tmm4",
            "tdpbssd tmm2, tmm7, tmm5",
            a = in(reg) aq, b = in(reg) bq, s = in(reg) CHUNK,
            options(nostack, readonly)
        );
    }
    asm!(
        "tilestored [{g1} + {s}*1], tmm0",
        "tilestored [{g2} + {s}*1], tmm1",
        "tilestored [{g3} + {s}*1], tmm2",
        "tilestored [{g4} + {s}*1], tmm3",
        g1 = in(reg) tile(1), g2 = in(reg) tile(2), g3 = in(reg) tile(3), g4 = in(reg) tile(4),
        s = in(reg) T * 4,
        options(nostack)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsv3_reference::fp8::fp8_gemm::e4m3_values;

    /// Every finite code's digits recombine to its value × 2^9, each within int8, all with the
    /// value's sign.
    #[test]
    fn digits_recombine_to_every_code() {
        let values = e4m3_values();
        for c0 in (0..256).step_by(CHUNK) {
            let codes: [u8; CHUNK] = std::array::from_fn(|i| (c0 + i) as u8);
            let mut planes = [[0i8; CHUNK]; DIGITS];
            decode(&codes, &mut planes);
            for (i, &c) in codes.iter().enumerate() {
                let v = values[usize::from(c)];
                if !v.is_finite() {
                    continue;
                }
                let sum: f64 = (0..DIGITS)
                    .map(|l| f64::from(planes[l][i]) * f64::from(1u32 << (7 * l)))
                    .sum();
                assert_eq!(sum, v * 512.0, "code {c:#04x}");
                assert!((0..DIGITS).all(|l| planes[l][i] == 0 || (planes[l][i] < 0) == (v < 0.0)));
            }
        }
    }

    #[test]
    fn group_weights_are_powers_of_two() {
        for (g, w) in WEIGHT.iter().enumerate() {
            assert_eq!(*w, 2f64.powi(7 * g as i32 - 18));
        }
    }
}
