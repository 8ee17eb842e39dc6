// moe_gate: the router of a MoE layer (V3 eqs. (13)-(16), §2.1.2; OFF Gate.forward; HF
// DeepseekV3TopkRouter): logits u = x·Wᵀ, affinities s = σ(u) | softmax(u), selection scores
// b = s + bias (noaux_tc), group-limited top-k, weights s[ids] (normalised) × scale.
//
// Must equal: reference/src/moe/gate.rs::route (after reference/src/linear.rs::linear in f32
//   precision) within the moe_gate policy (src/ops/moe_gate.rs):
//   moe_gate_logits: u[n,e] in f32 (fmaf per lane over d = lane, lane+32, ..., then a warp
//     butterfly): any-order f32 sums, inside the policy's δu = D·2^-24·Σ|x w| + 2^-24|u|;
//   moe_gate_route: everything after the logits in f64 exactly as the reference (same formulas,
//     same summation orders, ties to the lower index), so ids differ from the reference only
//     where the f32 logits move a selection score across a near-tie, which the policy reports
//     apart; weights rounded to f32 once.
// Tolerance class: ids as sets except near-ties; weights within the score-error bound.
// Launch: logits: one warp per (token, expert), 8 warps per block, grid = ceil(N·E / 8);
//   route: one thread per token, 128 threads per block, grid = ceil(N / 128), with a global
//   f64 scratch of 2E + n_group values per token (affinities, selection scores, group scores).
// Napkin math: the logits GEMM reads W once per token from L2 (E·D·4 B = 7.3 MB for V3 in f32)
//   and does 2·N·E·D flops on CUDA cores; the routing is O(top_k·E) f64 work per token.

#include "common.cuh"

// topk_method codes (the wrapper's order)
#define NOAUX_TC 0
#define GREEDY 1
#define GROUP_LIMITED_GREEDY 2

// ---- device helpers

// Index of the largest value among the entries not yet taken (NaN marks taken ones); ties go
// to the lower index, −inf entries included (the reference's stable descending sort).
__device__ int argmax_untaken(const double* v, int len) {
    int best = -1;
    for (int i = 0; i < len; ++i) {
        if (isnan(v[i])) continue;
        if (best < 0 || v[i] > v[best]) best = i;
    }
    return best;
}

// ---- kernels

extern "C" __global__ void __launch_bounds__(256)
moe_gate_logits(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ u, int n_tokens,
                int n_experts, int d) {
    const int lane = threadIdx.x & 31;
    const long long pair = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (pair >= (long long)n_tokens * n_experts) return;  // the whole warp leaves together
    const long long n = pair / n_experts, e = pair % n_experts;
    const float* xr = x + n * d;
    const float* wr = w + e * d;
    float acc = 0.0f;
    for (int c = lane; c < d; c += 32) acc = fmaf(xr[c], wr[c], acc);
    acc = warp_sum(acc);
    if (lane == 0) u[pair] = acc;
}

extern "C" __global__ void __launch_bounds__(128)
moe_gate_route(const float* __restrict__ u, const float* __restrict__ bias, double* __restrict__ scratch,
               float* __restrict__ topk_w, long long* __restrict__ topk_ids, int n_tokens, int n_experts, int top_k,
               int n_group, int topk_group, int sigmoid, int method, int norm_topk_prob, double scaling) {
    const long long n = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= n_tokens) return;
    const int E = n_experts;
    const float* un = u + n * E;
    double* affinity = scratch + n * (2LL * E + n_group);
    double* selection = affinity + E;
    double* groups = selection + E;

    // step 1: affinities (eq. (15) sigmoid, or softmax over all experts)
    if (sigmoid) {
        for (int e = 0; e < E; ++e) affinity[e] = 1.0 / (1.0 + exp(-(double)un[e]));
    } else {
        double mx = -inf_f64();
        for (int e = 0; e < E; ++e) mx = fmax(mx, (double)un[e]);
        double sum = 0.0;
        for (int e = 0; e < E; ++e) {
            affinity[e] = exp((double)un[e] - mx);
            sum += affinity[e];
        }
        for (int e = 0; e < E; ++e) affinity[e] /= sum;
    }

    // step 2: selection scores (the bias only ever touches selection, noaux_tc only)
    for (int e = 0; e < E; ++e) selection[e] = method == NOAUX_TC ? affinity[e] + (double)bias[e] : affinity[e];

    // step 3: group-limited selection: score the groups, keep topk_group, −inf elsewhere
    if (n_group > 1 && method != GREEDY) {
        const int per = E / n_group;
        for (int g = 0; g < n_group; ++g) {
            const double* m = selection + g * per;
            if (method == NOAUX_TC) {
                // sum of the two largest (ties: lower index first, as the reference's top-2)
                int i1 = 0;
                for (int i = 1; i < per; ++i)
                    if (m[i] > m[i1]) i1 = i;
                int i2 = -1;
                for (int i = 0; i < per; ++i)
                    if (i != i1 && (i2 < 0 || m[i] > m[i2])) i2 = i;
                groups[g] = m[i1] + m[i2];
            } else {
                double mx = -inf_f64();
                for (int i = 0; i < per; ++i) mx = fmax(mx, m[i]);
                groups[g] = mx;
            }
        }
        // keep the topk_group best groups: mark them NaN (taken), then mask the others
        for (int j = 0; j < topk_group; ++j) {
            const int g = argmax_untaken(groups, n_group);
            if (g < 0) break;  // (not reached: the wrapper checks topk_group ≤ n_group)
            groups[g] = nan_f64();
        }
        for (int g = 0; g < n_group; ++g)
            if (!isnan(groups[g]))
                for (int i = 0; i < per; ++i) selection[g * per + i] = -inf_f64();
    }

    // step 4: top-k over the selection scores, best first; weights from the unbiased affinities
    float* wn = topk_w + n * top_k;
    long long* idn = topk_ids + n * top_k;
    for (int j = 0; j < top_k; ++j) {
        const int e = argmax_untaken(selection, E);
        if (e < 0) return;  // (not reached: the wrapper checks top_k ≤ the kept experts)
        selection[e] = nan_f64();
        idn[j] = e;
    }
    double sum = 0.0;
    if (norm_topk_prob)
        for (int j = 0; j < top_k; ++j) sum += affinity[idn[j]];
    for (int j = 0; j < top_k; ++j) {
        const double w = norm_topk_prob ? affinity[idn[j]] / sum : affinity[idn[j]];
        wn[j] = (float)(w * scaling);
    }
}
