// fp8_gemm (CUDA cores, "simt"): block-scaled FP8 GEMM with exact per-block semantics
// (V3 §3.3.2; OFF kernel.py fp8_gemm; DeepGEMM 1×128 / 128×128 scaling).
//
// Must equal: the reference's exact mode (reference/src/fp8/), bit for bit:
//   for each 128-wide K block kb (the last one may be partial):
//     dot = Σ_{k∈kb} a[m,k]·b[n,k], computed exactly (every E4M3 product is a multiple of 2^-18
//           below 2^18, so 128 of them sum exactly in f64 in any order), rounded once to f32;
//     acc = acc + (dot · a_s[m,kb]) · b_s[n/128,kb]   (three IEEE f32 operations, never fused)
//   c = acc (f32) or bf16_rn(acc).
// Tolerance class: exact against the reference's exact mode.
// Launch: 16×16 threads per block, one output element per thread; grid = (ceil(N/16), ceil(M/16)).
//   Each K block is staged in shared memory (decoded exactly to f32) and dotted in f64.
// Napkin math: 2·M·N·K flops in f64 on CUDA cores: a correctness kernel, not a fast one.

#include "common.cuh"

#define TILE 16
#define BK 128

// ---- kernels

extern "C" __global__ void __launch_bounds__(TILE * TILE)
fp8_gemm_simt(const unsigned char* __restrict__ a, const float* __restrict__ a_s, const unsigned char* __restrict__ b,
              const float* __restrict__ b_s, float* __restrict__ c_f32, __nv_bfloat16* __restrict__ c_bf16, int M, int N,
              int K, int out_bf16) {
    __shared__ float a_tile[TILE][BK + 1];
    __shared__ float b_tile[TILE][BK + 1];
    const int tid = threadIdx.y * TILE + threadIdx.x;
    const int m = blockIdx.y * TILE + threadIdx.y;
    const int n = blockIdx.x * TILE + threadIdx.x;
    const int k_blocks = (K + BK - 1) / BK;
    float acc = 0.0f;
    for (int kb = 0; kb < k_blocks; ++kb) {
        // stage the K block of the 16 rows of a and the 16 rows of b (zero past the edges)
        for (int i = tid; i < TILE * BK; i += TILE * TILE) {
            const int r = i / BK, k = kb * BK + i % BK;
            const int gm = blockIdx.y * TILE + r, gn = blockIdx.x * TILE + r;
            a_tile[r][i % BK] = (gm < M && k < K) ? e4m3_to_f32(a[(long long)gm * K + k]) : 0.0f;
            b_tile[r][i % BK] = (gn < N && k < K) ? e4m3_to_f32(b[(long long)gn * K + k]) : 0.0f;
        }
        __syncthreads();
        // exact block dot in f64, rounded once to f32
        double dot = 0.0;
        for (int k = 0; k < BK; ++k) dot = fma((double)a_tile[threadIdx.y][k], (double)b_tile[threadIdx.x][k], dot);
        __syncthreads();
        if (m < M && n < N) {
            const float scaled = __fmul_rn(__fmul_rn(__double2float_rn(dot), a_s[(long long)m * k_blocks + kb]),
                                           b_s[(long long)(n / BK) * k_blocks + kb]);
            acc = __fadd_rn(acc, scaled);
        }
    }
    if (m < M && n < N) {
        if (out_bf16) c_bf16[(long long)m * N + n] = __float2bfloat16_rn(acc);
        else c_f32[(long long)m * N + n] = acc;
    }
}
