#!/usr/bin/env python3
"""PyTorch yardsticks on the GPU for `dsv3 gpu-bench` (run both in the same session, e.g. by
scripts/gpu-check.sh): torch._scaled_mm FP8 GEMM TFLOP/s at DeepSeek-V3 shapes (with 1x128 /
128x128 block scales when this torch supports them, else per-row/per-tensor scales; the line says
which) and the device-to-device copy bandwidth.

    python3 benches/gpu_torch.py [--quick]
"""
import argparse
import sys

import torch


def time_ms(fn, warmup=3, reps=20):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def scaled_mm(m, n, k):
    a = (torch.randn(m, k, device="cuda") * 0.1).to(torch.float8_e4m3fn)
    b = (torch.randn(n, k, device="cuda") * 0.1).to(torch.float8_e4m3fn)
    attempts = [
        ("blockwise 1x128 / 128x128", torch.ones(m, k // 128, device="cuda"), torch.ones(k // 128, n // 128, device="cuda").t()),
        ("row-wise", torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")),
        ("per-tensor", torch.ones((), device="cuda"), torch.ones((), device="cuda")),
    ]
    for name, sa, sb in attempts:
        try:
            f = lambda: torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
            f()
            torch.cuda.synchronize()
            return name, time_ms(f, reps=5 if m >= 4096 else 20)
        except Exception as e:  # noqa: BLE001 - report and try the next scaling recipe
            last = e
    raise RuntimeError(f"torch._scaled_mm failed for every scaling recipe: {last}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("SKIP gpu_torch.py: no CUDA device visible to torch")
        return 0
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    n_bytes = 1 << 30
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    print(f"copy (device to device) {n_bytes} B: {ms:.4f} ms, {2 * n_bytes / ms / 1e6:.0f} GB/s")
    nk = [(7168, 2048), (4096, 7168)] if args.quick else [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
    ms_list = [128, 4096] if args.quick else [64, 128, 4096]
    for n, k in nk:
        for m in ms_list:
            recipe, ms = scaled_mm(m, n, k)
            print(f"torch._scaled_mm [{recipe}] M={m} N={n} K={k}: {ms:.4f} ms, {2 * m * n * k / ms / 1e9:.1f} TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
