#!/usr/bin/env python3
"""Time PyTorch on the CPU doing fp8_gemm's exact mode on the shapes of `benches/fp8_gemm.rs`
(`cpu_fp8_gemm/exact_fast/<M>x<N>x<K>`) and print the ratio to the Rust fast path.

Exact mode, as torch does it: for every K-block the float64 matmul of the decoded E4M3 codes
(exact: <= 43 significant bits), `.to(float32)`, then `acc = acc + (p * a_s) * b_s` in float32.
The operands are the bench's: the same deterministic codes and scales.

The Rust side is timed in the same run, alternating with torch (the machine is shared, so
timings taken minutes apart are not comparable): `dsv3 run fp8_gemm` with `out_dtype` f32 on the
same operands, wall time including process start and the safetensors load/save (the file is in
the page cache), and its compute alone (the reference's time that `dsv3 check --report` records).
Its output must equal torch's bit for bit, and so must the f64 micro-kernel's (`dsv3 run` with
`DSV3_EXACT_KERNEL=f64`, timed too: on a CPU with AMX the default kernel is the AMX one). The
yardstick in the same run: the roofline, one
float64 matmul of the same 2·M·N·K FLOPs (MKL through torch), and each side's share of it.
Criterion's own estimate (`target/criterion/...`, after `cargo bench --bench fp8_gemm`) is
printed too when present.

Usage (after `cargo build --release`):

    /work/pyenv/bin/python benches/compare_torch.py [--threads 2] [--repeat 3]
"""

import argparse
import json
import os
import subprocess
import tempfile
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

SHAPES = [(512, 7168, 7168), (512, 2112, 7168), (512, 24576, 1536)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def codes(rows, cols, offset):
    """The bench's `operands`: ((i * 2654435761) >> 7) % 254, skipping the NaN code 0x7F."""
    i = np.arange(rows * cols, dtype=np.uint64) + np.uint64(offset)
    c = ((i * np.uint64(2654435761)) >> np.uint64(7)) % np.uint64(254)
    c = c.astype(np.uint8)
    c = np.where(c >= 0x7F, c + 1, c).astype(np.uint8)
    return torch.from_numpy(c.reshape(rows, cols)).view(torch.float8_e4m3fn)


def scales(rows, cols):
    i = np.arange(rows, dtype=np.int64)[:, None]
    j = np.arange(cols, dtype=np.int64)[None, :]
    frac = ((i * 31 + j * 17) % 97).astype(np.float32) / np.float32(97.0)
    return torch.from_numpy(np.float32(1e-3) * (np.float32(1.0) + frac))


def fp8_gemm_exact(a, a_s, b, b_s, block=128):
    m, k = a.shape
    n = b.shape[0]
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    b_rows = b_s.repeat_interleave(block, 0)[:n]
    acc = torch.zeros(m, n, dtype=torch.float32)
    for kb in range(-(-k // block)):
        k0, k1 = kb * block, min((kb + 1) * block, k)
        p = (a64[:, k0:k1] @ b64[:, k0:k1].T).to(torch.float32)
        acc = acc + (p * a_s[:, kb:kb + 1]) * b_rows[:, kb][None, :]
    return acc


def rust_seconds(m, n, k):
    path = os.path.join(ROOT, "target", "criterion", "cpu_fp8_gemm", "exact_fast", f"{m}x{n}x{k}",
                        "new", "estimates.json")
    try:
        with open(path) as f:
            return json.load(f)["mean"]["point_estimate"] * 1e-9
    except OSError:
        return None


def time_dsv3(path_in, path_out, kernel=None):
    """`dsv3 run`'s wall time; `kernel="f64"` forces the f64 micro-kernel (`DSV3_EXACT_KERNEL`)
    where the default would take AMX."""
    exe = os.path.join(ROOT, "target", "release", "dsv3")
    env = dict(os.environ)
    env.pop("DSV3_EXACT_KERNEL", None)
    if kernel:
        env["DSV3_EXACT_KERNEL"] = kernel
    t = time.perf_counter()
    subprocess.run([exe, "run", "fp8_gemm", "--inputs", path_in, "--out", path_out,
                    "--config", '{"out_dtype":"f32"}'], check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t


def dsv3_compute_seconds(path_in, path_out, tmp):
    """The reference's compute time inside `dsv3 check` (outputs = its own, bit-identical)."""
    exe = os.path.join(ROOT, "target", "release", "dsv3")
    report = os.path.join(tmp, "report.json")
    subprocess.run([exe, "check", "fp8_gemm", "--inputs", path_in, "--outputs", path_out,
                    "--config", '{"out_dtype":"f32"}', "--report", report], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(report) as f:
        r = json.load(f)
    return (r.get("report") or r)["reference_seconds"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the machine has 2 cores)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.repeat}, alternating")
    print(f"{'shape (MxNxK)':<20} {'torch s':>9} {'dsv3 run s':>11} {'torch/dsv3':>11} {'dsv3 compute s':>15} "
          f"{'torch/dsv3 compute':>19} {'roofline s':>11} {'dsv3 % roofline':>16} {'f64-kernel run s':>17} "
          f"{'criterion s':>12} {'bitwise':>8}")
    tmp = tempfile.mkdtemp(prefix="dsv3-compare-torch-")
    for m, n, k in SHAPES:
        a, b = codes(m, k, 0), codes(n, k, 17)
        a_s, b_s = scales(m, -(-k // 128)), scales(-(-n // 128), -(-k // 128))
        path_in, path_out = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
        save_file({"a": a, "a_s": a_s, "b": b, "b_s": b_s}, path_in)
        fp8_gemm_exact(a[:8], a_s[:8], b, b_s)  # warm-up
        best_torch, best_rust, best_compute, best_roof, best_f64, c = (float("inf"),) * 5 + (None,)
        a64, b64t = a.to(torch.float64), b.to(torch.float64).T.contiguous()
        for _ in range(args.repeat):
            t = time.perf_counter()
            c = fp8_gemm_exact(a, a_s, b, b_s)
            best_torch = min(best_torch, time.perf_counter() - t)
            best_rust = min(best_rust, time_dsv3(path_in, path_out))
            best_compute = min(best_compute, dsv3_compute_seconds(path_in, path_out, tmp))
            best_f64 = min(best_f64, time_dsv3(path_in, path_out + ".f64", kernel="f64"))
            t = time.perf_counter()
            a64 @ b64t  # the roofline: one f64 GEMM of the same FLOPs
            best_roof = min(best_roof, time.perf_counter() - t)
        same = all(torch.equal(load_file(p)["c"].view(torch.int32), c.view(torch.int32))
                   for p in (path_out, path_out + ".f64"))
        crit = rust_seconds(m, n, k)
        crit_s = f"{crit:12.3f}" if crit else f"{'-':>12}"
        print(f"{f'{m}x{n}x{k}':<20} {best_torch:9.3f} {best_rust:11.3f} {best_torch / best_rust:11.2f} {best_compute:15.3f} "
              f"{best_torch / best_compute:19.2f} {best_roof:11.3f} {100 * best_roof / best_compute:15.0f}% "
              f"{best_f64:17.3f} {crit_s} {str(same):>8}")


if __name__ == "__main__":
    main()
