#!/usr/bin/env python3
"""GPU calibration of dsv3's Tensor Core model (issue 16): run block-scaled FP8 GEMMs of real
kernels on the same inputs and dump inputs and outputs as safetensors, for
`dsv3 judge-calibration DIR` to judge on a CPU machine.

    python3 benches/calibrate.py --dsv3 .devbin/dsv3 --out DIR

Implementations (each dumped as `c_<name>`, f32 outputs so the accumulator's bits show):
- `triton`: our own Triton kernel with the official kernel.py fp8_gemm semantics (per 128-deep
  K-block `acc += tl.dot(a, bᵀ) · a_s · b_s`, f32 accumulator; Triton's FP8 dot on Hopper is
  wgmma);
- `scaled_mm`: torch._scaled_mm with 1x128 / 128x128 block scales when this torch supports them
  on this GPU (the metadata says which, or why not);
- `wgmma`, `simt`: dsv3's own backends (`dsv3 run fp8_gemm --backend ...`): the Hopper
  tensor_core model's kernel and the exact CUDA-core kernel.

Cases (one file each, ≤ 16 MiB): `v3` (M 64, N 1536, K 7168, activations 1x128 / weights 128x128
as V3 quantizes them), `k4096` (M = N = 128, K = 4096: the paper's accumulation example) and
`probes` (one 128-deep block per probe row/column, unit scales: P1 write-back, P2 alignment
width, P3 toward zero vs floor on negative terms, P4 a tiny product beside ±448² products; the
rest of the matrix crosses the probe vectors, which the model predicts too).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

E4M3 = torch.float8_e4m3fn


def act_quant(x):
    """1x128 tiles, s = amax/448 (f32), codes e4m3(x/s) (V3 §3.3.2)."""
    m, k = x.shape
    t = x.float().view(m, k // 128, 128)
    s = t.abs().amax(dim=-1).clamp_min(1e-4) / 448.0
    return (t / s[..., None]).to(E4M3).view(m, k), s.contiguous()


def weight_quant(w):
    """128x128 blocks, s = amax/448."""
    n, k = w.shape
    t = w.float().view(n // 128, 128, k // 128, 128)
    s = t.abs().amax(dim=(1, 3)).clamp_min(1e-4) / 448.0
    return (t / s[:, None, :, None]).to(E4M3).view(n, k), s.contiguous()


def probes(device):
    """Probe vectors over one 128-deep block (K = 128): rows of a and b; the GEMM crosses them
    all. Each probe is (a values, b values) with E4M3-exact entries; steps are k = 32 wide."""
    rows = []

    def vec(pairs):  # {k: (a, b)}
        a = torch.zeros(128)
        b = torch.zeros(128)
        for k, (x, y) in pairs.items():
            a[k], b[k] = x, y
        return a, b

    # P1: c = 2 − 2^-13 from 14 products 2^-i in step 0, then 1.875 in step 1: truncation gives
    # 3.875 − 2^-12, nearest-even 3.875
    p1 = {i: (2.0 ** -(i // 2), 2.0 ** -(i - i // 2)) for i in range(14)}
    p1[32] = (1.875, 1.0)
    rows.append(vec(p1))
    # P2: c = 16 (step 0), one product 2^(4 − t) in step 1, t = 10..16: kept iff t ≤ F
    for t in range(10, 17):
        rows.append(vec({0: (2.0, 8.0), 32: (2.0 ** -6, 2.0 ** (10 - t))}))
    # P3: c = 16, a product −1.5·2^(4−14): toward zero keeps 16, floor gives 16 − 2^-9
    rows.append(vec({0: (2.0, 8.0), 32: (-1.5 * 2.0 ** -6, 2.0 ** -4)}))
    # P4: +448², −448² at k = 0, 1 and a tiny product at k = p (same step when p < 32)
    for p in (2, 17, 31, 33):
        rows.append(vec({0: (448.0, 448.0), 1: (-448.0, 448.0), p: (2.0 ** -9, 2.0 ** -9)}))
    a = torch.stack([r[0] for r in rows]).to(E4M3)
    b = torch.stack([r[1] for r in rows]).to(E4M3)
    assert torch.equal(a.float(), torch.stack([r[0] for r in rows])), "probe values must be E4M3-exact"
    n = a.shape[0]
    pad = (-n) % 128  # N must fill a 128-row weight block for the scales' shape; zero rows
    b = torch.cat([b, torch.zeros(pad, 128, dtype=E4M3)])
    a_s = torch.ones(n, 1)
    b_s = torch.ones(b.shape[0] // 128, 1)
    return a.to(device), a_s.to(device), b.to(device), b_s.to(device)


def cases(device, gen):
    x = torch.randn(64, 7168, generator=gen).to(device)
    w = (torch.randn(1536, 7168, generator=gen) / 7168 ** 0.5).to(device)
    a, a_s = act_quant(x)
    b, b_s = weight_quant(w)
    yield "v3", (a, a_s, b, b_s)
    x = torch.rand(128, 4096, generator=gen).to(device)  # all positive: the accumulation error adds up
    w = torch.rand(128, 4096, generator=gen).to(device)
    a, a_s = act_quant(x)
    b, b_s = weight_quant(w)
    yield "k4096", (a, a_s, b, b_s)
    yield "probes", probes(device)


def triton_gemm(a, a_s, b, b_s):
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K, KB,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pm = tl.program_id(0)
        pn = tl.program_id(1)
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kb in range(0, KB):
            ka = kb * BK + rk
            at = tl.load(a_ptr + rm[:, None] * K + ka[None, :], mask=(rm[:, None] < M) & (ka[None, :] < K), other=0.0)
            bt = tl.load(b_ptr + rn[None, :] * K + ka[:, None], mask=(rn[None, :] < N) & (ka[:, None] < K), other=0.0)
            sa = tl.load(as_ptr + rm * KB + kb, mask=rm < M, other=0.0)
            sb = tl.load(bs_ptr + (rn // 128) * KB + kb, mask=rn < N, other=0.0)
            # official kernel.py: accumulator += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
            acc += tl.dot(at, bt) * sa[:, None] * sb[None, :]
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))

    m, k = a.shape
    n = b.shape[0]
    c = torch.empty(m, n, device=a.device, dtype=torch.float32)
    kb = (k + 127) // 128
    kernel[(triton.cdiv(m, 64), triton.cdiv(n, 64))](a, b, c, a_s, b_s, m, n, k, kb, BM=64, BN=64, BK=128)
    return c


def scaled_mm(a, a_s, b, b_s):
    """torch._scaled_mm with block scales (1x128 activations, 128x128 weights), f32 out."""
    m, k = a.shape
    n = b.shape[0]
    sa = a_s.contiguous()                      # [M, K/128]
    sb = b_s.t().contiguous().t()              # [N/128, K/128] read as the blockwise layout
    out = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb.t(), out_dtype=torch.float32)
    return out


def dsv3_backend(dsv3, backend, accumulation, tensors, tmp):
    inp = os.path.join(tmp, "in.safetensors")
    out = os.path.join(tmp, f"{backend or 'reference'}-{accumulation}.safetensors")
    save_file({k: tensors[k].cpu().contiguous() for k in ("a", "a_s", "b", "b_s")}, inp)
    cfg = json.dumps({"accumulation": accumulation, "out_dtype": "f32"})
    cmd = [dsv3, "run", "fp8_gemm", "--inputs", inp, "--out", out, "--config", cfg]
    if backend:  # None: the reference (dry run)
        cmd += ["--backend", backend]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError((r.stdout + r.stderr).strip())
    return load_file(out)["c"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsv3", default=".devbin/dsv3")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="no GPU: dump the cases with dsv3's reference in place of wgmma (tensor_core) and simt (exact), "
                         "to test the judge (`dsv3 judge-calibration`) end to end")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dry = args.cpu_dry_run
    device = "cpu" if dry else "cuda"
    gen = torch.Generator().manual_seed(16)
    meta = {"torch": torch.__version__, "dry_run": dry}
    if not dry:
        meta.update(device=torch.cuda.get_device_name(), capability=str(torch.cuda.get_device_capability()))
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError as e:
        meta["triton"] = f"not importable: {e}"
    status = 0
    for name, (a, a_s, b, b_s) in cases(device, gen):
        tensors = {"a": a.cpu(), "a_s": a_s.cpu(), "b": b.cpu(), "b_s": b_s.cpu()}
        notes = dict(meta)
        impls = [] if dry else [("triton", lambda: triton_gemm(a, a_s, b, b_s)),
                                ("scaled_mm", lambda: scaled_mm(a, a_s, b, b_s))]
        with tempfile.TemporaryDirectory() as tmp:
            def backend(b):  # the dry run stands the reference in for the kernel
                return None if dry else b
            impls += [("wgmma", lambda: dsv3_backend(args.dsv3, backend("wgmma"), "tensor_core", tensors, tmp)),
                      ("simt", lambda: dsv3_backend(args.dsv3, backend("simt"), "exact", tensors, tmp))]
            for impl, fn in impls:
                try:
                    c = fn()
                    if not dry:
                        torch.cuda.synchronize()
                    tensors[f"c_{impl}"] = c.float().cpu().contiguous()
                    notes[impl] = "ran"
                except Exception as e:  # recorded, the others still run
                    notes[impl] = f"failed: {type(e).__name__}: {str(e)[:300]}"
                    status = 1
                print(f"{name:8s} {impl:10s} {notes[impl]}", flush=True)
        path = os.path.join(args.out, f"calib_{name}.safetensors")
        save_file(tensors, path, metadata={"dsv3_calibration": json.dumps(notes, sort_keys=True)})
        print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB)", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
