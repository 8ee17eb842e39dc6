// Device helpers shared by the kernels (registered with NVRTC as the header "common.cuh" by
// gpu/src/runtime.rs; with nvcc, compile with -I gpu/kernels).
#pragma once
#include <cuda_fp8.h>
#include <cuda_bf16.h>

__device__ __forceinline__ float load_f32(const float* p) { return *p; }
__device__ __forceinline__ float load_f32(const __nv_bfloat16* p) { return __bfloat162float(*p); }

// Exact value of an E4M3 code.
__device__ __forceinline__ float e4m3_to_f32(unsigned char code) {
    __nv_fp8_e4m3 q;
    q.__x = code;
    return float(q);
}

// Smallest power of two >= s for a positive normal float: exponent + (mantissa != 0) on the bits
// (DeepSeek's ue8m0 scale rounding; never 2^ceil(log2 s), which can land below s).
__device__ __forceinline__ float ceil_pow2(float s) {
    unsigned int bits = __float_as_uint(s);
    unsigned int e = (bits >> 23) & 0xFFu;
    unsigned int m = bits & 0x7FFFFFu;
    return __uint_as_float((e + (m != 0u ? 1u : 0u)) << 23);
}

// The tile scale of OFF act_quant: max(amax, 1e-4) / 448 (IEEE division), ue8m0 rounded up.
__device__ __forceinline__ float tile_scale(float amax, int ue8m0) {
    float s = __fdiv_rn(fmaxf(amax, 1e-4f), 448.0f);
    return ue8m0 ? ceil_pow2(s) : s;
}

// e4m3_satfinite_rn(x / s) with IEEE division.
__device__ __forceinline__ unsigned char quantize_e4m3(float x, float s) {
    return (unsigned char)__nv_cvt_float_to_fp8(__fdiv_rn(x, s), __NV_SATFINITE, __NV_E4M3);
}
