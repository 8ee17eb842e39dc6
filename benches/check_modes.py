#!/usr/bin/env python3
"""Time `dsv3 check fp8_gemm` in each accumulation mode on one set of inputs, in one run.

The candidate is the exact-mode output (`dsv3 run`), bit-identical to the exact reference, so
exact mode compares bits only (its fastest case), while `tensor_core_bound` measures every
element against its bound (the work it always does: Tensor Core candidates are never
bit-identical). `tensor_core` (the bit-exact model) is timed only with `--with-model` (about 12 ns
per product and core: minutes at V3 sizes). Modes alternate within each repetition (the machine
is shared: timings taken minutes apart are not comparable); the median wall time per mode and the
ratio to exact mode are printed, with each run's peak RSS (`/usr/bin/time -v` when present).

Usage (after `cargo build --release`; Python stdlib only):

    python3 benches/check_modes.py [--m 4096 --n 7168 --k 7168] [--repeat 3]
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DSV3 = os.path.join(ROOT, "target", "release", "dsv3")


def run(args):
    subprocess.run([DSV3, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def timed_check(inputs, outputs, mode):
    """(wall seconds, peak RSS in MiB or None, the check's last lines)."""
    cmd = [DSV3, "check", "fp8_gemm", "--inputs", inputs, "--outputs", outputs,
           "--config", json.dumps({"accumulation": mode})]
    timer = shutil.which("time") and os.path.exists("/usr/bin/time")
    if timer:
        cmd = ["/usr/bin/time", "-v", *cmd]
    start = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if p.returncode not in (0, 1):
        raise SystemExit(f"dsv3 check failed ({p.returncode}):\n{p.stderr}")
    rss = None
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    if m:
        rss = int(m.group(1)) / 1024
    tail = [line for line in p.stdout.splitlines() if "worst element" in line or "verdict" in line]
    return wall, rss, tail


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--n", type=int, default=7168)
    ap.add_argument("--k", type=int, default=7168)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--with-model", action="store_true", help="also time the tensor_core mode")
    a = ap.parse_args()
    modes = ["exact", "tensor_core_bound"] + (["tensor_core"] if a.with_model else [])
    with tempfile.TemporaryDirectory() as d:
        inputs, outputs = os.path.join(d, "in.safetensors"), os.path.join(d, "out.safetensors")
        run(["gen", "fp8_gemm", "--out", inputs, "--size", f"M={a.m}", "--size", f"N={a.n}",
             "--size", f"K={a.k}", "--seed", "1"])
        run(["run", "fp8_gemm", "--inputs", inputs, "--out", outputs])
        print(f"dsv3 check fp8_gemm, M={a.m} N={a.n} K={a.k}, bf16 output, {a.repeat} alternating runs "
              f"({os.cpu_count()} CPUs)")
        times = {m: [] for m in modes}
        rss = {m: [] for m in modes}
        for r in range(a.repeat):
            for mode in modes:
                wall, peak, tail = timed_check(inputs, outputs, mode)
                times[mode].append(wall)
                if peak is not None:
                    rss[mode].append(peak)
                print(f"  run {r + 1} {mode}: {wall:.2f} s" + (f", peak RSS {peak:.0f} MiB" if peak else "")
                      + "".join(f"\n      {t.strip()}" for t in tail if r == 0))
        base = statistics.median(times["exact"])
        for mode in modes:
            med = statistics.median(times[mode])
            peak = f", peak RSS {max(rss[mode]):.0f} MiB" if rss[mode] else ""
            print(f"{mode:18s} median {med:7.2f} s  ratio to exact {med / base:5.2f}{peak}")


if __name__ == "__main__":
    main()
