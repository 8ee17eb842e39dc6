"""The API on torch tensors: any strides and devices in, CPU tensors of the reference's dtypes
out, FP8/E8M0/bf16/int32/bool dtypes, DeepGEMM's packing done in torch as its own test does."""

import ml_dtypes
import numpy as np
import pytest

import dsv3

torch = pytest.importorskip("torch", reason="SKIP: torch is not installed; the torch tests need it")


def official_act_quant(x, block=128):
    """OFF kernel.py act_quant in torch: per 1×block tile s = max(amax, 1e-4)/448, y = e4m3(x/s)."""
    t = x.float().unflatten(-1, (-1, block))
    s = t.abs().amax(-1).clamp(min=1e-4) / 448
    return (t / s.unsqueeze(-1)).to(torch.float8_e4m3fn).flatten(-2), s


def test_reference_returns_cpu_tensors_of_the_contract_dtypes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 512, generator=g, dtype=torch.float32).to(torch.bfloat16)
    out = dsv3.reference("act_quant", {"x": x})
    assert out["y"].dtype == torch.float8_e4m3fn and out["y"].device.type == "cpu"
    assert out["s"].dtype == torch.float32 and tuple(out["s"].shape) == (8, 4)
    y, s = official_act_quant(x)
    assert torch.equal(out["s"], s)
    assert torch.equal(out["y"].view(torch.uint8), y.view(torch.uint8))


def test_strided_tensors_and_requires_grad():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(512, 12, generator=g, requires_grad=True)
    x = base.t()[::2]  # [6, 512], non-contiguous, a view of a leaf that requires grad
    assert not x.is_contiguous()
    a = dsv3.reference("act_quant", {"x": x})
    b = dsv3.reference("act_quant", {"x": x.detach().contiguous()})
    assert torch.equal(a["y"].view(torch.uint8), b["y"].view(torch.uint8))
    y, s = official_act_quant(x.detach())
    assert dsv3.check("act_quant", {"x": x}, {"y": y, "s": s}).passed


def test_a_bug_fails_and_names_the_element():
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(2))
    y, s = official_act_quant(x)
    bad = y.view(torch.uint8).clone()
    bad[2, 17] += 1
    r = dsv3.check("act_quant", {"x": x}, {"y": bad.view(torch.float8_e4m3fn), "s": s})
    assert not r.passed and r.tensors["y"]["violations"] == 1 and r.tensors["y"]["worst_index"] == (2, 17)
    with pytest.raises(AssertionError, match=r"Mismatched elements: 1 / 1024"):
        dsv3.assert_check("act_quant", {"x": x}, {"y": bad.view(torch.float8_e4m3fn), "s": s})


def test_int32_topk_ids_from_a_router():
    g = torch.Generator().manual_seed(3)
    inputs = {"x": torch.randn(6, 32, generator=g), "weight": torch.randn(16, 32, generator=g),
              "e_score_correction_bias": 0.01 * torch.randn(16, generator=g)}
    cfg = {"top_k": 4, "n_group": 4, "topk_group": 2}
    out = dsv3.reference("moe_gate", inputs, config=cfg)
    assert out["topk_ids"].dtype == torch.int64
    ids = out["topk_ids"].to(torch.int32).flip(-1)
    r = dsv3.check("moe_gate", inputs, {"topk_ids": ids, "topk_weights": out["topk_weights"].flip(-1)}, config=cfg)
    assert r.passed


def test_bool_mask_and_f64_outputs():
    g = torch.Generator().manual_seed(4)
    q, n, l = 2, 3, 5
    inputs = {"logp": -torch.rand(q, n, l, generator=g), "logp_old": -torch.rand(q, n, l, generator=g),
              "logp_ref": -torch.rand(q, n, l, generator=g), "mask": torch.rand(q, n, l, generator=g) > 0.3,
              "rewards": torch.rand(q, n, generator=g)}
    inputs["mask"][:, :, 0] = True
    out = dsv3.reference("grpo_loss", inputs)
    as_numpy = dsv3.reference("grpo_loss", {k: v.numpy() for k, v in inputs.items()})
    assert out["loss"].dtype == torch.float64
    assert np.array_equal(out["loss"].numpy(), as_numpy["loss"])
    assert dsv3.check("grpo_loss", inputs, out, exact=True).passed


def deepgemm_packed_ue8m0(x):
    """DeepGEMM tests/test_layout.py's torch definition of the MN-major, TMA-aligned packed UE8M0
    tensor (re-written): exponent bytes, zero padding to align(mn, 4) × align(k, 4), int32 view,
    stored MN-major."""
    mn, k = x.shape
    ue8m0 = (x.view(torch.int) >> 23).to(torch.uint8)
    amn, ak = (mn + 3) // 4 * 4, (k + 3) // 4 * 4
    padded = torch.zeros((amn, ak), dtype=torch.uint8)
    padded[:mn, :k] = ue8m0
    packed = padded.view(-1).view(dtype=torch.int).view(amn, ak // 4)
    out = torch.zeros((ak // 4, amn), dtype=torch.int).T
    out[:, :] = packed
    return out[:mn, :]


def test_deepgemm_packed_scales_and_e8m0_tensors():
    g = torch.Generator().manual_seed(5)
    m, n, k = 6, 256, 640
    a = torch.randn(m, k, generator=g).to(torch.float8_e4m3fn)
    b = torch.randn(n, k, generator=g).to(torch.float8_e4m3fn)
    a_s = torch.exp2(torch.randint(-6, 3, (m, 5), generator=g).float())
    b_s = torch.exp2(torch.randint(-6, 3, (2, 5), generator=g).float())
    out = dsv3.reference("fp8_gemm", {"a": a, "a_s": a_s, "b": b, "b_s": b_s})
    assert out["c"].dtype == torch.bfloat16
    packed = deepgemm_packed_ue8m0(a_s)
    assert packed.dtype == torch.int32 and packed.stride() == (1, 8)
    assert dsv3.check("fp8_gemm", {"a": a, "a_s": packed, "b": b, "b_s": b_s}, out).passed
    e8m0 = {"a": a, "a_s": a_s.to(torch.float8_e8m0fnu), "b": b, "b_s": b_s.to(torch.float8_e8m0fnu)}
    r = dsv3.check("fp8_gemm", e8m0, out, exact=True)
    assert r.passed and r.tensors["c"]["exact_fraction"] == 1.0


def test_torch_and_numpy_give_the_same_report():
    x = torch.randn(3, 384, generator=torch.Generator().manual_seed(6))
    y, s = official_act_quant(x)
    yt = dsv3.check("act_quant", {"x": x}, {"y": y, "s": s})
    yn = dsv3.check("act_quant", {"x": x.numpy()},
                    {"y": y.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn), "s": s.numpy()})
    assert yt.tensors == yn.tensors and yt.passed == yn.passed


def test_unsupported_torch_dtype_is_an_input_error():
    with pytest.raises(dsv3.InputError, match=r"`x`.*complex64"):
        dsv3.reference("act_quant", {"x": torch.zeros(2, 128, dtype=torch.complex64)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SKIP: no CUDA device for torch")
def test_cuda_tensors_are_copied_to_the_host_once():
    x = torch.randn(4, 256, device="cuda")
    y, s = official_act_quant(x)
    r = dsv3.check("act_quant", {"x": x}, {"y": y, "s": s})
    assert r.passed and r.tensors["y"]["exact_fraction"] == 1.0
    out = dsv3.reference("act_quant", {"x": x.t().contiguous().t()})
    assert out["y"].device.type == "cpu"
