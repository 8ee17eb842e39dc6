// rmsnorm: y = w ⊙ x / sqrt(mean(x²) + eps) over the last dim (V3 §2; OFF RMSNorm; HF
// DeepseekV3RMSNorm; torch F.rms_norm).
//
// Must equal: reference/src/norm.rs::rms_norm (f64 inside, one rounding) within the rmsnorm
//   policy (src/ops/rmsnorm.rs): this kernel computes in f32 as torch does:
//   ss = Σ x² (fmaf per thread, then a warp butterfly and the 8 warp sums in order),
//   r = 1 / sqrt(ss / D + eps) (IEEE division, addition, sqrt and reciprocal, eps as f32),
//   y = (x · r) · w (two IEEE products), stored as x's dtype (bf16: RNE).
// Tolerance class: f32 rounding bound, relative (D/2 + 9)·2^-24/(1 − 2(D+3)·2^-24) (SPEC.md
//   "RMSNorm tolerance"); bf16 output: 2 bf16 ulp.
// Launch: one block of 256 threads per row; grid = rows (1-D).
// Napkin math: reads x twice (the second read mostly from L1/L2) and w once per row, writes y:
//   memory-bound, ~3 (bf16) or ~8 (f32) bytes per element from DRAM.

#include "common.cuh"

#define THREADS 256
#define WARPS (THREADS / 32)

// ---- device helpers

template <typename T>
__device__ void rmsnorm_row(const T* __restrict__ x, const float* __restrict__ w, T* __restrict__ y, int d, float eps) {
    __shared__ float warp_ss[WARPS];
    __shared__ float r_shared;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const T* xr = x + (long long)blockIdx.x * d;
    T* yr = y + (long long)blockIdx.x * d;

    // pass 1: sum of squares (per thread, then per warp, then the warps in order)
    float ss = 0.0f;
    for (int c = tid; c < d; c += THREADS) {
        const float v = load_f32(xr + c);
        ss = fmaf(v, v, ss);
    }
    ss = warp_sum(ss);
    if (lane == 0) warp_ss[warp] = ss;
    __syncthreads();

    // the reciprocal root mean square, once per row
    if (tid == 0) {
        float total = 0.0f;
        for (int i = 0; i < WARPS; ++i) total = __fadd_rn(total, warp_ss[i]);
        const float mean = __fdiv_rn(total, (float)d);
        r_shared = __frcp_rn(__fsqrt_rn(__fadd_rn(mean, eps)));
    }
    __syncthreads();
    const float r = r_shared;

    // pass 2: normalize and scale
    for (int c = tid; c < d; c += THREADS) store_f32(yr + c, __fmul_rn(__fmul_rn(load_f32(xr + c), r), w[c]));
}

// ---- kernels

extern "C" __global__ void __launch_bounds__(THREADS)
rmsnorm_f32(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int d, float eps) {
    rmsnorm_row<float>(x, w, y, d, eps);
}

extern "C" __global__ void __launch_bounds__(THREADS)
rmsnorm_bf16(const __nv_bfloat16* __restrict__ x, const float* __restrict__ w, __nv_bfloat16* __restrict__ y, int d,
             float eps) {
    rmsnorm_row<__nv_bfloat16>(x, w, y, d, eps);
}
