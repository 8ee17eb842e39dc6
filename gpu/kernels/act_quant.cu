// act_quant: 1×B activation tile quantization to E4M3 (V3 §3.3.2; OFF kernel.py act_quant).
//
// Must equal: reference/src/fp8/act_quant.rs::act_quant, bit for bit.
//   per tile: amax = max|x| (f32), s = max(amax, 1e-4) / 448 (IEEE division, __fdiv_rn),
//   ue8m0: s = smallest power of two >= s (on the bits), y = e4m3_satfinite_rn(x / s).
// Tolerance class: exact. (Kernels that divide with div.full.f32, as Triton does, are judged by
// the op's policy, which allows one-code flips at near-ties; this one needs none.)
// Launch: one warp per tile, 4 warps (128 threads) per block; grid = ceil(n_tiles / 4).
//   Lane j handles elements j, j+32, ... of its tile, so any block_size works.
// Napkin math: reads 4 (f32) or 2 (bf16) bytes and writes 1 byte per element, plus 4 bytes per
//   tile: memory-bound; at B = 128 and f32 input, ~5.03 bytes per element.

#include "common.cuh"

// ---- device helpers

template <typename T>
__device__ void act_quant_tile(const T* __restrict__ x, unsigned char* __restrict__ y, float* __restrict__ s,
                               long long n_tiles, int block_size, int ue8m0) {
    const int lane = threadIdx.x & 31;
    const long long tile = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (tile >= n_tiles) return;
    const T* xt = x + tile * block_size;
    unsigned char* yt = y + tile * block_size;

    // pass 1: amax over the tile (max is exact in any order)
    float amax = 0.0f;
    for (int k = lane; k < block_size; k += 32) amax = fmaxf(amax, fabsf(load_f32(xt + k)));
    for (int offset = 16; offset > 0; offset >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, offset));

    // pass 2: the scale
    const float scale = tile_scale(amax, ue8m0);
    if (lane == 0) s[tile] = scale;

    // pass 3: divide (IEEE) and convert with round-to-nearest-even, saturating
    for (int k = lane; k < block_size; k += 32) yt[k] = quantize_e4m3(load_f32(xt + k), scale);
}

// ---- kernels

extern "C" __global__ void act_quant_f32(const float* __restrict__ x, unsigned char* __restrict__ y,
                                         float* __restrict__ s, long long n_tiles, int block_size, int ue8m0) {
    act_quant_tile<float>(x, y, s, n_tiles, block_size, ue8m0);
}

extern "C" __global__ void act_quant_bf16(const __nv_bfloat16* __restrict__ x, unsigned char* __restrict__ y,
                                          float* __restrict__ s, long long n_tiles, int block_size, int ue8m0) {
    act_quant_tile<__nv_bfloat16>(x, y, s, n_tiles, block_size, ue8m0);
}
