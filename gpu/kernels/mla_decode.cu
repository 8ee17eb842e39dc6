// mla_decode: absorbed MLA attention over a paged latent cache, FlashMLA's
// flash_mla_with_kvcache contract (V3 eq. (10) in the absorbed form, V2 App. C; OFF MLA
// attn_impl="absorb").
//
// Must equal: reference/src/mla.rs::attention on the keys gathered from the cache (src/ops/mla.rs
//   decode_batch) within the attention policy (SPEC.md "Attention tolerance"):
//   per query row (b, s, h), T = cache_seqlens[b], visible keys t < V_s with V_s = T, or with
//   causal V_s = clamp(T − S_q + s + 1, 0, T); key t is row t % 64 of cache block
//   block_table[b, t / 64]: k_t = [c_kv (512) | k_pe (64)], v_t = its first 512 values;
//   σ_t = f32(scale) · (q · k_t)  (f32: fmaf per lane over 18 dims, then a warp butterfly);
//   pass 1: m = max_t σ_t; pass 2 (the same σ_t, bit for bit): p_t = expf(σ_t − m),
//   l = Σ_t p_t, o = Σ_t p_t v_t (both in key order, fmaf), out = o / l, lse = m + logf(l)
//   (natural log). A row without visible keys (empty sequence, or causal with T < S_q): out 0,
//   lse +inf. Only visible keys are read (FlashMLA's NaN-poisoned tails stay unread).
// Tolerance class: the attention row bound (two-pass softmax: no rescaling); out in q's dtype.
// Launch: 256 threads = 8 warps per block, warp w ↔ head 8·g + w of one (b, s); a 1-D grid of
//   B·S_q·ceil(H/8) blocks. Keys are staged 16 at a time in shared memory (16·576 f32 =
//   36 KB), shared by the block's 8 heads; q (18 values) and o (16 values) live in registers.
// Napkin math: FlashMLA counts bytes = Q + KV + O (KV = T·576·2 B per sequence in bf16) and
//   FLOPs = 2·H·S_q·T·(576 + 512). This kernel reads each visible key twice per 8 heads (L2
//   serves the repeats) and computes on CUDA cores in f32: compute-bound, far from FlashMLA's
//   3000 GB/s; a readable reference kernel.

#include "common.cuh"

#define D_QK 576
#define D_V 512
#define PAGE 64
#define HEADS 8   // heads (warps) per block
#define KEYS 16   // keys staged per tile
#define Q_PER_LANE (D_QK / 32)
#define V_PER_LANE (D_V / 32)

// ---- device helpers

// Stage keys t0 .. t0 + count − 1 of sequence b into the tile (f32).
template <typename KT>
__device__ void stage_keys(float (*tile)[D_QK], const KT* __restrict__ k_cache, const int* __restrict__ table_row,
                           int t0, int count) {
    for (int i = threadIdx.x; i < count * D_QK; i += blockDim.x) {
        const int t = t0 + i / D_QK, c = i % D_QK;
        const long long block = table_row[t / PAGE];
        tile[i / D_QK][c] = load_f32(k_cache + (block * PAGE + t % PAGE) * D_QK + c);
    }
}

// σ = f32(scale) · (q · k) for the warp's head: every lane returns the same bits.
__device__ __forceinline__ float score(const float (&q)[Q_PER_LANE], const float* k, float scale, int lane) {
    float dot = 0.0f;
#pragma unroll
    for (int i = 0; i < Q_PER_LANE; ++i) dot = fmaf(q[i], k[lane + 32 * i], dot);
    return __fmul_rn(warp_sum(dot), scale);
}

template <typename QT, typename KT>
__device__ void mla_decode_heads(const QT* __restrict__ q, const KT* __restrict__ k_cache,
                                 const int* __restrict__ block_table, const int* __restrict__ cache_seqlens,
                                 QT* __restrict__ out, float* __restrict__ lse, int s_q, int heads, int max_blocks,
                                 float scale, int causal) {
    __shared__ float tile[KEYS][D_QK];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int head_groups = (heads + HEADS - 1) / HEADS;
    const int g = (int)(blockIdx.x % head_groups);
    const int s = (int)((blockIdx.x / head_groups) % s_q);
    const long long b = (long long)blockIdx.x / head_groups / s_q;
    const int h = g * HEADS + warp;
    const bool active = h < heads;  // warp-uniform
    const int len = cache_seqlens[b];
    const int visible = causal ? min(max(len - s_q + s + 1, 0), len) : len;  // block-uniform
    const int* table_row = block_table + b * max_blocks;

    // the query row of this warp's head, in registers
    float qr[Q_PER_LANE];
    const QT* q_row = q + ((b * s_q + s) * heads + (active ? h : 0)) * D_QK;
#pragma unroll
    for (int i = 0; i < Q_PER_LANE; ++i) qr[i] = active ? load_f32(q_row + lane + 32 * i) : 0.0f;

    // pass 1: the largest score
    float m = -inf_f32();
    for (int t0 = 0; t0 < visible; t0 += KEYS) {
        const int count = min(KEYS, visible - t0);
        stage_keys<KT>(tile, k_cache, table_row, t0, count);
        __syncthreads();
        if (active)
            for (int t = 0; t < count; ++t) m = fmaxf(m, score(qr, tile[t], scale, lane));
        __syncthreads();  // the tile is overwritten next
    }

    // pass 2: exponentials against m, their sum and the weighted sum of the values
    float l = 0.0f, o[V_PER_LANE];
#pragma unroll
    for (int i = 0; i < V_PER_LANE; ++i) o[i] = 0.0f;
    for (int t0 = 0; t0 < visible; t0 += KEYS) {
        const int count = min(KEYS, visible - t0);
        stage_keys<KT>(tile, k_cache, table_row, t0, count);
        __syncthreads();
        if (active)
            for (int t = 0; t < count; ++t) {
                const float p = expf(__fsub_rn(score(qr, tile[t], scale, lane), m));
                l = __fadd_rn(l, p);
#pragma unroll
                for (int i = 0; i < V_PER_LANE; ++i) o[i] = fmaf(p, tile[t][lane + 32 * i], o[i]);
            }
        __syncthreads();
    }

    // normalise; a row without keys gets out = 0, lse = +inf
    if (!active) return;
    QT* out_row = out + ((b * s_q + s) * heads + h) * D_V;
#pragma unroll
    for (int i = 0; i < V_PER_LANE; ++i) store_f32(out_row + lane + 32 * i, visible > 0 ? __fdiv_rn(o[i], l) : 0.0f);
    if (lane == 0) lse[(b * heads + h) * s_q + s] = visible > 0 ? __fadd_rn(m, logf(l)) : inf_f32();
}

// ---- kernels: q dtype (= out dtype) × cache dtype

extern "C" __global__ void __launch_bounds__(HEADS * 32)
mla_decode_f32_f32(const float* __restrict__ q, const float* __restrict__ k_cache, const int* __restrict__ block_table,
                   const int* __restrict__ cache_seqlens, float* __restrict__ out, float* __restrict__ lse, int s_q,
                   int heads, int max_blocks, float scale, int causal) {
    mla_decode_heads<float, float>(q, k_cache, block_table, cache_seqlens, out, lse, s_q, heads, max_blocks, scale,
                                   causal);
}

extern "C" __global__ void __launch_bounds__(HEADS * 32)
mla_decode_bf16_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k_cache,
                     const int* __restrict__ block_table, const int* __restrict__ cache_seqlens,
                     __nv_bfloat16* __restrict__ out, float* __restrict__ lse, int s_q, int heads, int max_blocks,
                     float scale, int causal) {
    mla_decode_heads<__nv_bfloat16, __nv_bfloat16>(q, k_cache, block_table, cache_seqlens, out, lse, s_q, heads,
                                                   max_blocks, scale, causal);
}

extern "C" __global__ void __launch_bounds__(HEADS * 32)
mla_decode_f32_bf16(const float* __restrict__ q, const __nv_bfloat16* __restrict__ k_cache,
                    const int* __restrict__ block_table, const int* __restrict__ cache_seqlens, float* __restrict__ out,
                    float* __restrict__ lse, int s_q, int heads, int max_blocks, float scale, int causal) {
    mla_decode_heads<float, __nv_bfloat16>(q, k_cache, block_table, cache_seqlens, out, lse, s_q, heads, max_blocks,
                                           scale, causal);
}

extern "C" __global__ void __launch_bounds__(HEADS * 32)
mla_decode_bf16_f32(const __nv_bfloat16* __restrict__ q, const float* __restrict__ k_cache,
                    const int* __restrict__ block_table, const int* __restrict__ cache_seqlens,
                    __nv_bfloat16* __restrict__ out, float* __restrict__ lse, int s_q, int heads, int max_blocks,
                    float scale, int causal) {
    mla_decode_heads<__nv_bfloat16, float>(q, k_cache, block_table, cache_seqlens, out, lse, s_q, heads, max_blocks,
                                           scale, causal);
}
