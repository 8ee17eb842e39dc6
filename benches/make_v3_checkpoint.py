#!/usr/bin/env python3
"""Write a checkpoint with DeepSeek-V3's real dimensions, for timing `dsv3 forward` (SPEC.md
"Model forward", fast path): hidden 7168, 128 heads, MLA ranks 1536/512, vocab 129280, FP8
128×128 blocks with `weight_scale_inv`, one dense layer (intermediate 18432) and one MoE layer
(24 routed experts of 2048, one shared, 8 per token, 8 groups / top-4, sigmoid + correction
bias), BF16 embedding, norms, router and head; the V3 config (fixtures/configs/deepseek-v3)
with `num_hidden_layers` 2, `first_k_dense_replace` 1, 24 experts, no MTP. One shard of
about 5.6 GB of random weights (not committed).

Usage (numpy needed):

    python3 benches/make_v3_checkpoint.py OUT_DIR [--experts 24] [--seed 0]
    dsv3 forward --model OUT_DIR --tokens 1,2,3,4,5,6,7,8            # prefill
    dsv3 forward --model OUT_DIR --tokens 1,2,3,4,5,6,7,8 --decode   # decode
"""

import argparse
import json
import os
import struct

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = 128
CHUNK = 1 << 26  # elements generated at a time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--experts", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with open(os.path.join(ROOT, "fixtures", "configs", "deepseek-v3", "config.json")) as f:
        cfg = json.load(f)
    cfg.update(num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=a.experts,
               num_nextn_predict_layers=0)
    h, v, heads = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    q_rank, kv_rank = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    nope, rope, vdim = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    inter, moe_inter = cfg["intermediate_size"], cfg["moe_intermediate_size"]

    tensors = []  # (name, dtype, shape, kind)

    def bf16(name, shape, kind="weight"):
        tensors.append((name, "BF16", shape, kind))

    def fp8(name, shape):
        tensors.append((name, "F8_E4M3", shape, "codes"))
        tensors.append((name + "_scale_inv", "F32", [-(-shape[0] // BLOCK), -(-shape[1] // BLOCK)], "scale"))

    bf16("model.embed_tokens.weight", [v, h])
    for layer in range(2):
        p = f"model.layers.{layer}."
        bf16(p + "input_layernorm.weight", [h], "norm")
        bf16(p + "post_attention_layernorm.weight", [h], "norm")
        fp8(p + "self_attn.q_a_proj.weight", [q_rank, h])
        bf16(p + "self_attn.q_a_layernorm.weight", [q_rank], "norm")
        fp8(p + "self_attn.q_b_proj.weight", [heads * (nope + rope), q_rank])
        fp8(p + "self_attn.kv_a_proj_with_mqa.weight", [kv_rank + rope, h])
        bf16(p + "self_attn.kv_a_layernorm.weight", [kv_rank], "norm")
        fp8(p + "self_attn.kv_b_proj.weight", [heads * (nope + vdim), kv_rank])
        fp8(p + "self_attn.o_proj.weight", [h, heads * vdim])
        if layer == 0:
            for name, shape in [("gate_proj", [inter, h]), ("up_proj", [inter, h]), ("down_proj", [h, inter])]:
                fp8(p + f"mlp.{name}.weight", shape)
        else:
            bf16(p + "mlp.gate.weight", [a.experts, h])
            tensors.append((p + "mlp.gate.e_score_correction_bias", "F32", [a.experts], "bias"))
            for e in [f"experts.{i}" for i in range(a.experts)] + ["shared_experts"]:
                for name, shape in [("gate_proj", [moe_inter, h]), ("up_proj", [moe_inter, h]),
                                    ("down_proj", [h, moe_inter])]:
                    fp8(p + f"mlp.{e}.{name}.weight", shape)
    bf16("model.norm.weight", [h], "norm")
    bf16("lm_head.weight", [v, h])

    size = {"BF16": 2, "F8_E4M3": 1, "F32": 4}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, _ in tensors:
        n = int(np.prod(shape)) * size[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    rng = np.random.default_rng(a.seed)
    path = os.path.join(a.out, "model.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i, (name, dtype, shape, kind) in enumerate(tensors):
            total = int(np.prod(shape))
            for start in range(0, total, CHUNK):
                n = min(CHUNK, total - start)
                if kind == "codes":
                    # every finite E4M3 code (0x7F/0xFF are NaN: moved to 0x7E/0xFE)
                    c = rng.integers(0, 256, n, dtype=np.uint8)
                    c[(c & 0x7F) == 0x7F] -= 1
                    f.write(c.tobytes())
                elif kind == "scale":
                    # |code| averages about 60: weights of about 0.02/sqrt-ish size
                    f.write((rng.uniform(0.5, 1.5, n) * 2e-4).astype("<f4").tobytes())
                elif kind == "bias":
                    f.write((rng.standard_normal(n) * 0.01).astype("<f4").tobytes())
                else:
                    x = rng.standard_normal(n, dtype=np.float32) * (0.02 if kind == "weight" else 0.1)
                    if kind == "norm":
                        x += 1.0
                    f.write((x.view(np.uint32) >> 16).astype("<u2").tobytes())
            if i % 20 == 0:
                print(f"  {i + 1}/{len(tensors)} tensors, {name}", flush=True)
    print(f"wrote {path} ({os.path.getsize(path) / 1e9:.2f} GB) and config.json")


if __name__ == "__main__":
    main()
