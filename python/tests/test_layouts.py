"""The anchors' scale layouts, accepted by check and reference as the kernels emit them.

`deepgemm_packed_ue8m0` is written here from DeepGEMM's own definition
(tests/test_layout.py: get_mn_major_tma_aligned_packed_ue8m0_tensor_torch_impl, and
csrc/jit_kernels/impls/smxx_layout.hpp): the UE8M0 byte of an f32 power of two is its bits >> 23;
the [mn, k] bytes are zero-padded to [align(mn, 4), align(k, 4)], each row's bytes read as
little-endian int32 (byte j of int32 i = K-block 4i + j), and the result stored MN-major
(strides (1, align(mn, 4)) in elements), viewed back as [mn, ceil(k/4)]."""

import ml_dtypes
import numpy as np
import pytest

import dsv3

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


def align(x, a):
    return (x + a - 1) // a * a


def deepgemm_packed_ue8m0(sf):
    """DeepGEMM's MN-major, TMA-aligned packed UE8M0 tensor of f32 scales sf [mn, k] (numpy)."""
    mn, k = sf.shape
    ue8m0 = (sf.view(np.uint32) >> 23).astype(np.uint8)
    aligned_mn, aligned_k = align(mn, 4), align(k, 4)
    padded = np.zeros((aligned_mn, aligned_k), np.uint8)
    padded[:mn, :k] = ue8m0
    packed = padded.view("<i4")  # [aligned_mn, aligned_k // 4], little-endian
    storage = np.zeros((aligned_k // 4, aligned_mn), np.int32)  # MN-major storage
    storage.T[:, :] = packed
    return storage.T[:mn, :], storage


def mn_major_f32(sf):
    """DeepGEMM's get_mn_major_tma_aligned_tensor for f32 scales: storage [k, align(mn, 4)]."""
    mn, k = sf.shape
    storage = np.zeros((k, align(mn, 4)), np.float32)
    storage[:, :mn] = sf.T
    return storage.T[:mn, :], storage


def gemm_case(m=5, n=256, k=640, seed=3):
    """A blockwise-FP8 GEMM with power-of-two scales (exact in UE8M0) and its reference c."""
    rng = np.random.default_rng(seed)
    kb, nb = -(-k // 128), -(-n // 128)
    inputs = {
        "a": rng.standard_normal((m, k)).astype(E4M3),
        "a_s": np.exp2(rng.integers(-8, 3, (m, kb))).astype(np.float32),
        "b": rng.standard_normal((n, k)).astype(E4M3),
        "b_s": np.exp2(rng.integers(-8, 3, (nb, kb))).astype(np.float32),
    }
    return inputs, dsv3.reference("fp8_gemm", inputs)


def with_(inputs, **changes):
    d = dict(inputs)
    d.update(changes)
    return d


def test_packing_follows_deepgemms_definition():
    sf = np.exp2(np.array([[0, 1, -1, 2, 3], [-2, 0, 0, 1, -127]], np.float32))
    view, storage = deepgemm_packed_ue8m0(sf)
    assert view.shape == (2, 2) and view.strides == (4, 16) and storage.shape == (2, 4)
    # row 0: exponents 127, 128, 126, 129 | 130 then three zero bytes of padding
    assert int(view[0, 0]) & 0xFFFFFFFF == 127 | 128 << 8 | 126 << 16 | 129 << 24
    assert view[0, 1] == 130
    assert view[1, 1] == 0  # 2^-127 is the UE8M0 code 0


@pytest.mark.parametrize("m", [1, 5, 8])
def test_packed_ue8m0_scales_check_like_f32_scales(m):
    inputs, out = gemm_case(m=m)
    a_s, _ = deepgemm_packed_ue8m0(inputs["a_s"])
    b_s, _ = deepgemm_packed_ue8m0(inputs["b_s"])
    assert a_s.dtype == np.int32 and a_s.shape == (m, 2)  # 5 K-blocks, packed 4 per int32
    for packed in (with_(inputs, a_s=a_s), with_(inputs, b_s=b_s), with_(inputs, a_s=a_s, b_s=b_s)):
        r = dsv3.check("fp8_gemm", packed, out)
        assert r.passed and r.tensors["c"]["exact_fraction"] == 1.0
        ref = dsv3.reference("fp8_gemm", packed)
        np.testing.assert_array_equal(ref["c"].view(np.uint16), out["c"].view(np.uint16))
    # the same scales as UE8M0 codes (ml_dtypes float8_e8m0fnu)
    e8m0 = with_(inputs, a_s=inputs["a_s"].astype(ml_dtypes.float8_e8m0fnu))
    assert dsv3.check("fp8_gemm", e8m0, out).passed


def test_wrongly_packed_scales_fail():
    inputs, out = gemm_case()
    a_s, _ = deepgemm_packed_ue8m0(inputs["a_s"])
    big_endian = a_s.byteswap()
    r = dsv3.check("fp8_gemm", with_(inputs, a_s=big_endian), out)
    assert not r.passed and r.tensors["c"]["violations"] > 0
    # a packed tensor must hold ceil(blocks/4) int32 along K
    with pytest.raises(dsv3.InputError, match="a_s"):
        dsv3.check("fp8_gemm", with_(inputs, a_s=np.zeros((5, 5), np.int32)), out)


def test_mn_major_scales_as_strided_views_need_no_config():
    inputs, out = gemm_case()
    a_s, _ = mn_major_f32(inputs["a_s"])
    assert a_s.strides == (4, 4 * 8)  # MN-major: M contiguous, padded to align(5, 4) = 8
    assert dsv3.check("fp8_gemm", with_(inputs, a_s=a_s), out).passed


def test_mn_major_storage_with_mn_major_scales():
    inputs, out = gemm_case()
    _, a_storage = mn_major_f32(inputs["a_s"])  # [5 K-blocks, 8]: 3 columns of padding
    _, b_packed_storage = deepgemm_packed_ue8m0(inputs["b_s"])  # [2, 4]: packed, MN-major
    cfg = {"mn_major_scales": "both"}
    r = dsv3.check("fp8_gemm", with_(inputs, a_s=a_storage, b_s=b_packed_storage), out, config=cfg)
    assert r.passed and r.tensors["c"]["exact_fraction"] == 1.0
    r = dsv3.check("fp8_gemm", with_(inputs, a_s=a_storage), out, config={"mn_major_scales": "lhs"})
    assert r.passed
    # without the config the storage's shape is wrong, and the error says so
    with pytest.raises(dsv3.InputError, match="a_s"):
        dsv3.check("fp8_gemm", with_(inputs, a_s=a_storage), out)
    # storage too narrow for M
    with pytest.raises(dsv3.InputError, match="a_s"):
        dsv3.check("fp8_gemm", with_(inputs, a_s=a_storage[:, :4]), out, config={"mn_major_scales": "lhs"})


def test_the_cli_accepts_the_same_layouts(cli, tmp_path):
    import json
    import subprocess

    from conftest import read_safetensors, write_safetensors

    inputs, out = gemm_case()
    _, a_storage = deepgemm_packed_ue8m0(inputs["a_s"])  # packed and MN-major: [2, 8] int32
    b_s, _ = deepgemm_packed_ue8m0(inputs["b_s"])  # packed, canonical orientation
    good = with_(inputs, a_s=a_storage, b_s=np.ascontiguousarray(b_s))
    bad = with_(good, b_s=np.ascontiguousarray(b_s).byteswap())

    def cli_check(case, name):
        write_safetensors(tmp_path / f"{name}.safetensors", {**case, **out})
        f = str(tmp_path / f"{name}.safetensors")
        return subprocess.run([cli, "check", "fp8_gemm", "--inputs", f, "--outputs", f,
                               "--config", json.dumps({"mn_major_scales": "lhs"})], capture_output=True, text=True)

    ok = cli_check(good, "good")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = cli_check(bad, "bad")
    assert wrong.returncode == 1 and "FAIL" in wrong.stdout, wrong.stdout + wrong.stderr
    # dsv3 run writes the reference from the same packed, MN-major inputs
    write_safetensors(tmp_path / "in.safetensors", good)
    run = subprocess.run([cli, "run", "fp8_gemm", "--inputs", str(tmp_path / "in.safetensors"), "--out",
                          str(tmp_path / "ref.safetensors"), "--config", '{"mn_major_scales":"lhs"}'],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    ref = read_safetensors(tmp_path / "ref.safetensors")
    np.testing.assert_array_equal(ref["c"].view(np.uint16), out["c"].view(np.uint16))
