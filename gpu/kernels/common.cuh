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

// Store an f32 result as the output dtype (bf16: round to nearest even).
__device__ __forceinline__ void store_f32(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f32(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Sum over the 32 lanes of a warp by a butterfly of IEEE additions (never contracted): every lane
// ends with the same bits, because IEEE addition is commutative. All 32 lanes must take part.
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xFFFFFFFFu, v, offset));
    return v;
}

// IEEE specials (NVRTC has no <math.h> macros).
__device__ __forceinline__ float inf_f32() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ double inf_f64() { return __longlong_as_double(0x7ff0000000000000LL); }
__device__ __forceinline__ double nan_f64() { return __longlong_as_double(0x7ff8000000000000LL); }
