// fp8_gemm (CUDA cores, "simt"): block-scaled FP8 GEMM with exact per-block semantics
// (V3 §3.3.2; OFF kernel.py fp8_gemm; DeepGEMM 1×128 / 128×128 scaling).
//
// Must equal: the reference's exact mode (reference/src/fp8/fp8_gemm.rs::fp8_gemm), bit for bit:
//   for each B-wide K block kb (B = block_size; the last block may be partial):
//     dot = Σ_{k∈kb} a[m,k]·b[n,k], computed exactly (every E4M3 product is a multiple of 2^-18
//           below 2^18, so B ≤ 2^17 of them sum exactly in f64 in any order), rounded once to f32;
//     acc = acc + (dot · a_s[m,kb]) · b_s[n/B,kb]   (three IEEE f32 operations, never fused)
//   c = acc (f32) or bf16_rn(acc).
// Tolerance class: exact against the reference's exact mode (registered as fp8_gemm backend
//   "simt" for accumulation "exact", any block_size).
// Launch: 16×16 threads per block, one output element per thread; a 1-D grid of
//   ceil(M/16)·ceil(N/16) blocks, block i covering rows 16·(i / ceil(N/16)), columns
//   16·(i % ceil(N/16)). Each K block is staged in shared memory in chunks of up to 128 codes
//   (decoded exactly to f32) and dotted in f64.
// Napkin math: 2·M·N·K flops in f64 on CUDA cores: a correctness kernel, not a fast one.

#include "common.cuh"

#define TILE 16
#define CHUNK 128

// ---- kernels

extern "C" __global__ void __launch_bounds__(TILE * TILE)
fp8_gemm_simt(const unsigned char* __restrict__ a, const float* __restrict__ a_s, const unsigned char* __restrict__ b,
              const float* __restrict__ b_s, float* __restrict__ c_f32, __nv_bfloat16* __restrict__ c_bf16, int M, int N,
              int K, int block_size, int out_bf16) {
    __shared__ float a_tile[TILE][CHUNK + 1];
    __shared__ float b_tile[TILE][CHUNK + 1];
    const int n_tiles = (N + TILE - 1) / TILE;
    const int tile_m = (int)(blockIdx.x / n_tiles), tile_n = (int)(blockIdx.x % n_tiles);
    const int tid = threadIdx.y * TILE + threadIdx.x;
    const int m = tile_m * TILE + threadIdx.y;
    const int n = tile_n * TILE + threadIdx.x;
    const int k_blocks = (K + block_size - 1) / block_size;
    float acc = 0.0f;
    for (int kb = 0; kb < k_blocks; ++kb) {
        const int k_begin = kb * block_size, k_end = min(k_begin + block_size, K);
        // exact block dot in f64 (any order is exact), over chunks of up to CHUNK codes
        double dot = 0.0;
        for (int k0 = k_begin; k0 < k_end; k0 += CHUNK) {
            const int width = min(CHUNK, k_end - k0);
            // stage the chunk of the 16 rows of a and the 16 rows of b (zero past the edges)
            for (int i = tid; i < TILE * CHUNK; i += TILE * TILE) {
                const int r = i / CHUNK, j = i % CHUNK;
                const int gm = tile_m * TILE + r, gn = tile_n * TILE + r;
                a_tile[r][j] = (gm < M && j < width) ? e4m3_to_f32(a[(long long)gm * K + k0 + j]) : 0.0f;
                b_tile[r][j] = (gn < N && j < width) ? e4m3_to_f32(b[(long long)gn * K + k0 + j]) : 0.0f;
            }
            __syncthreads();
            for (int j = 0; j < width; ++j)
                dot = fma((double)a_tile[threadIdx.y][j], (double)b_tile[threadIdx.x][j], dot);
            __syncthreads();  // the tiles are overwritten by the next chunk
        }
        // promotion: rounded once to f32, scales applied, never fused
        if (m < M && n < N) {
            const float scaled = __fmul_rn(__fmul_rn(__double2float_rn(dot), a_s[(long long)m * k_blocks + kb]),
                                           b_s[(long long)(n / block_size) * k_blocks + kb]);
            acc = __fadd_rn(acc, scaled);
        }
    }
    if (m < M && n < N) {
        if (out_bf16) c_bf16[(long long)m * N + n] = __float2bfloat16_rn(acc);
        else c_f32[(long long)m * N + n] = acc;
    }
}
