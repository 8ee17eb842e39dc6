// weight_quant: B×B block quantization of a weight to E4M3 (V3 §3.3.2; checkpoint
// weight + weight_scale_inv; DeepGEMM per_block_cast_to_fp8 with OFF act_quant's scale rule).
//
// Must equal: reference/src/fp8/weight_quant.rs::weight_quant, bit for bit.
//   per block: amax = max|w| over the real elements (partial edge blocks allowed),
//   s = max(amax, 1e-4) / 448 (__fdiv_rn), ue8m0: s = smallest power of two >= s,
//   y = e4m3_satfinite_rn(w / s) (__fdiv_rn).
// Tolerance class: exact (IEEE division).
// Launch: one thread block of 256 threads per weight block; a 1-D grid of ceil(N/B)·ceil(K/B)
//   blocks, block i quantizing weight block (i / ceil(K/B), i % ceil(K/B)) and writing s[i].
//   Threads stride over the block's elements; amax is reduced with warp shuffles and shared memory.
// Napkin math: reads 4 (f32) or 2 (bf16) B and writes 1 B per element: memory-bound.

#include "common.cuh"

// ---- device helpers

template <typename T>
__device__ void weight_quant_block(const T* __restrict__ w, unsigned char* __restrict__ y, float* __restrict__ s,
                                   int n, int k, int block_size, int ue8m0) {
    __shared__ float warp_max[32];
    const int grid_cols = (k - 1) / block_size + 1;  // k ≥ 1 (no launch for an empty weight)
    const int row0 = (int)(blockIdx.x / grid_cols) * block_size, col0 = (int)(blockIdx.x % grid_cols) * block_size;
    const int rows = min(block_size, n - row0), cols = min(block_size, k - col0);
    const long long count = (long long)rows * cols;

    // pass 1: amax over the block
    float amax = 0.0f;
    for (long long i = threadIdx.x; i < count; i += blockDim.x) {
        const long long r = row0 + i / cols, c = col0 + i % cols;
        amax = fmaxf(amax, fabsf(load_f32(w + r * k + c)));
    }
    for (int offset = 16; offset > 0; offset >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, offset));
    if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = amax;
    __syncthreads();
    if (threadIdx.x < 32) {
        amax = threadIdx.x < (blockDim.x >> 5) ? warp_max[threadIdx.x] : 0.0f;
        for (int offset = 16; offset > 0; offset >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, offset));
        if (threadIdx.x == 0) warp_max[0] = amax;
    }
    __syncthreads();

    // pass 2: the block's scale
    const float scale = tile_scale(warp_max[0], ue8m0);
    if (threadIdx.x == 0) s[blockIdx.x] = scale;

    // pass 3: divide (IEEE) and convert with round-to-nearest-even, saturating
    for (long long i = threadIdx.x; i < count; i += blockDim.x) {
        const long long r = row0 + i / cols, c = col0 + i % cols;
        y[r * k + c] = quantize_e4m3(load_f32(w + r * k + c), scale);
    }
}

// ---- kernels

extern "C" __global__ void __launch_bounds__(256) weight_quant_f32(const float* __restrict__ w, unsigned char* __restrict__ y,
                                                                   float* __restrict__ s, int n, int k, int block_size, int ue8m0) {
    weight_quant_block<float>(w, y, s, n, k, block_size, ue8m0);
}

extern "C" __global__ void __launch_bounds__(256) weight_quant_bf16(const __nv_bfloat16* __restrict__ w, unsigned char* __restrict__ y,
                                                                    float* __restrict__ s, int n, int k, int block_size, int ue8m0) {
    weight_quant_block<__nv_bfloat16>(w, y, s, n, k, block_size, ue8m0);
}
