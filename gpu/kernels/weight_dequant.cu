// weight_dequant: E4M3 codes × block scales (OFF kernel.py weight_dequant, fp8_cast_bf16.py).
//
// Must equal: reference/src/fp8/weight_dequant.rs::weight_dequant, bit for bit:
//   w[n,k] = f32(y[n,k]) * s[n/B, k/B] (one IEEE multiply, __fmul_rn: never contracted),
//   bf16 output: __float2bfloat16_rn of that product (RNE).
// Tolerance class: exact.
// Launch: one thread per element, 256 threads per block, grid-stride loop.
// Napkin math: reads 1 B (+ a cached scale) and writes 4 or 2 B per element: memory-bound.

#include "common.cuh"

// ---- device helpers

__device__ __forceinline__ float dequant_one(const unsigned char* y, const float* s, long long i, int k, int block_size,
                                             int scale_cols) {
    const long long r = i / k, c = i % k;
    return __fmul_rn(e4m3_to_f32(y[i]), s[(r / block_size) * scale_cols + c / block_size]);
}

// ---- kernels

extern "C" __global__ void weight_dequant_f32(const unsigned char* __restrict__ y, const float* __restrict__ s,
                                              float* __restrict__ w, long long count, int k, int block_size, int scale_cols) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += (long long)gridDim.x * blockDim.x)
        w[i] = dequant_one(y, s, i, k, block_size, scale_cols);
}

extern "C" __global__ void weight_dequant_bf16(const unsigned char* __restrict__ y, const float* __restrict__ s,
                                               __nv_bfloat16* __restrict__ w, long long count, int k, int block_size,
                                               int scale_cols) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += (long long)gridDim.x * blockDim.x)
        w[i] = __float2bfloat16_rn(dequant_one(y, s, i, k, block_size, scale_cols));
}
