// swiglu: y = silu(gate) ⊙ up = gate·σ(gate)·up, elementwise (V3 eq. (12) FFN; OFF MLP.forward;
// HF DeepseekV3MLP; torch F.silu(g) * u).
//
// Must equal: reference/src/mlp.rs::swiglu (f64 inside, one rounding) within the swiglu policy
//   (src/ops/swiglu.rs): this kernel computes in f32 as torch does:
//   e = expf(−g) (≤ 2 ulp), s = g / (1 + e) (IEEE addition and division), y = s · up (IEEE),
//   stored as gate's dtype (bf16: RNE). For g < −88.7 expf overflows to +inf and y = ±0.
// Tolerance class: f32 rounding bound γ_8 relative + 2^-100 absolute; bf16 output: 2 bf16 ulp.
// Launch: one thread per element, 256 threads per block, grid-stride loop (grid ≤ 65535·4).
// Napkin math: reads two and writes one element: memory-bound, 6 (bf16) or 12 (f32) bytes per
//   element.

#include "common.cuh"

// ---- device helpers

template <typename G, typename U>
__device__ void swiglu_elems(const G* __restrict__ gate, const U* __restrict__ up, G* __restrict__ y, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float g = load_f32(gate + i);
        const float silu = __fdiv_rn(g, __fadd_rn(1.0f, expf(-g)));
        store_f32(y + i, __fmul_rn(silu, load_f32(up + i)));
    }
}

// ---- kernels (output dtype = gate's; up may come in the other dtype)

extern "C" __global__ void swiglu_f32(const float* __restrict__ gate, const float* __restrict__ up, float* __restrict__ y,
                                      long long n) {
    swiglu_elems<float, float>(gate, up, y, n);
}

extern "C" __global__ void swiglu_bf16(const __nv_bfloat16* __restrict__ gate, const __nv_bfloat16* __restrict__ up,
                                       __nv_bfloat16* __restrict__ y, long long n) {
    swiglu_elems<__nv_bfloat16, __nv_bfloat16>(gate, up, y, n);
}

extern "C" __global__ void swiglu_f32_bf16up(const float* __restrict__ gate, const __nv_bfloat16* __restrict__ up,
                                             float* __restrict__ y, long long n) {
    swiglu_elems<float, __nv_bfloat16>(gate, up, y, n);
}

extern "C" __global__ void swiglu_bf16_f32up(const __nv_bfloat16* __restrict__ gate, const float* __restrict__ up,
                                             __nv_bfloat16* __restrict__ y, long long n) {
    swiglu_elems<__nv_bfloat16, float>(gate, up, y, n);
}
