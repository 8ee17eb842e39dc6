// rope: rotary position embedding of q_pe / k_pe on pairs, with the YaRN inverse frequencies
// (V3 eqs. (3), (8), §4.3; OFF precompute_freqs_cis + apply_rotary_emb; HF
// DeepseekV3RotaryEmbedding).
//
// Must equal: reference/src/rope.rs::rope within the rope policy (src/ops/rope.rs):
//   f'_i comes from the host (reference/src/rope.rs::RopeConfig::inv_freqs, f32, bit-identical to
//   the reference's: a table of D/2 values per model, like OFF's precomputed freqs_cis);
//   φ = f32(p) · f'_i (one IEEE f32 product: the reference's angle, bit for bit);
//   (sin φ, cos φ) = sincosf(φ) (≤ 2 ulp, full range);
//   y[i0] = a·cos − b·sin, y[i1] = a·sin + b·cos (IEEE products and sums, never fused),
//   pair (i0, i1) = (2i, 2i+1) (interleaved, DeepSeek) or (i, i + D/2); stored as x's dtype.
// Tolerance class: per element (|a|+|b|)·(|φ|·2^-21 + 8·2^-24) in f32 (this kernel: ≤ 5·2^-24,
//   the angle being exact); bf16 output: the policy's bf16 bound.
// Launch: one thread per (row s, head h, pair i), 256 threads per block, grid-stride loop.
// Napkin math: reads and writes each element once (+ positions and the frequency table, cached):
//   memory-bound, 4 (bf16) or 8 (f32) bytes per element.

#include "common.cuh"

// ---- device helpers

template <typename T>
__device__ void rope_pairs(const T* __restrict__ x, const long long* __restrict__ positions,
                           const float* __restrict__ inv_freq, T* __restrict__ y, int s_len, int heads, int d,
                           int interleaved) {
    const int half = d / 2;
    const long long pairs = (long long)s_len * heads * half;
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < pairs; p += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(p % half);
        const long long row = p / half;  // s · heads + h
        const int s = (int)(row / heads);
        // the angle: f32(position) times the pair's frequency, one rounding
        const float phi = __fmul_rn(__ll2float_rn(positions[s]), inv_freq[i]);
        float sn, cs;
        sincosf(phi, &sn, &cs);
        // the two features of pair i
        const int i0 = interleaved ? 2 * i : i;
        const int i1 = interleaved ? 2 * i + 1 : i + half;
        const long long base = row * d;
        const float a = load_f32(x + base + i0), b = load_f32(x + base + i1);
        store_f32(y + base + i0, __fsub_rn(__fmul_rn(a, cs), __fmul_rn(b, sn)));
        store_f32(y + base + i1, __fadd_rn(__fmul_rn(a, sn), __fmul_rn(b, cs)));
    }
}

// ---- kernels

extern "C" __global__ void rope_f32(const float* __restrict__ x, const long long* __restrict__ positions,
                                    const float* __restrict__ inv_freq, float* __restrict__ y, int s_len, int heads, int d,
                                    int interleaved) {
    rope_pairs<float>(x, positions, inv_freq, y, s_len, heads, d, interleaved);
}

extern "C" __global__ void rope_bf16(const __nv_bfloat16* __restrict__ x, const long long* __restrict__ positions,
                                     const float* __restrict__ inv_freq, __nv_bfloat16* __restrict__ y, int s_len,
                                     int heads, int d, int interleaved) {
    rope_pairs<__nv_bfloat16>(x, positions, inv_freq, y, s_len, heads, d, interleaved);
}
