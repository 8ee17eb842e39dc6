//! FlashMLA's FP8 latent cache, accepted as a layout of `mla_decode`'s `k_cache` (FlashMLA
//! `tests/quant.py`, `FP8KVCacheLayout.V32_FP8Sparse`): per token 656 bytes,
//!
//! - bytes `0..512`: the 512 `c_kv` values as E4M3 codes, in 4 tiles of 128;
//! - bytes `512..528`: the tiles' 4 scales as little-endian f32 (FlashMLA writes powers of two:
//!   `2^⌈log2(max(amax, 1e-4)/448)⌉`);
//! - bytes `528..656`: the 64 `k_pe` values in BF16, little-endian.
//!
//! A `k_cache` of dtype `U8` or `F8_E4M3` (torch's view of the same bytes) shaped
//! `[NB, 64, 1, 656]` is dequantized as FlashMLA's `dequantize_k_cache` does, `c_kv = e4m3 ·
//! scale` into BF16, which is exact for a power-of-two scale: the check then judges the kernel
//! against those BF16 keys with `mla_decode`'s own policy. The tokens a sequence reads must
//! hold finite codes and positive power-of-two scales (else exit 2 naming the byte); the
//! others (pages past `cache_seqlens`) are not read and may hold anything.

use dsv3_reference::fp8::E4M3;

use crate::registry::config::Config;
use crate::registry::error::{Error, Result, Role};
use crate::registry::io::TensorMap;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::OpEntry;

use super::{D_QK, D_V, PAGE};

/// Bytes per token in FlashMLA's FP8 cache.
pub const TOKEN_BYTES: usize = 656;
/// `c_kv` tile width (one scale each).
const TILE: usize = 128;
const SCALES_AT: usize = D_V;
const ROPE_AT: usize = D_V + 4 * (D_V / TILE);

/// `k_cache` dequantized when it is in the FP8 layout (module doc); `None` otherwise.
pub(super) fn adapt_inputs(
    op: &OpEntry,
    inputs: &TensorMap,
    _config: &Config,
    place: &str,
) -> Result<Option<TensorMap>> {
    let Some(cache) = inputs.get("k_cache") else {
        return Ok(None);
    };
    if !matches!(cache.dtype, DType::U8 | DType::F8E4M3) {
        return Ok(None);
    }
    let shape = &cache.shape;
    if shape.len() != 4 || shape[1] != PAGE || shape[2] != 1 || shape[3] != TOKEN_BYTES {
        return Err(Error::Shape {
            op: op.name,
            role: Role::Input,
            name: "k_cache".into(),
            got: shape.clone(),
            expected: format!(
                "[NB, {PAGE}, 1, {TOKEN_BYTES}] for FlashMLA's FP8 cache{place} (per token 512 E4M3 c_kv bytes, 4 f32 \
scales, 64 BF16 k_pe)"
            ),
        });
    }
    let n_blocks = shape[0];
    let read = read_tokens(inputs, n_blocks);
    let mut values = Vec::with_capacity(n_blocks * PAGE * D_QK);
    for token in 0..n_blocks * PAGE {
        let bytes = &cache.data[token * TOKEN_BYTES..(token + 1) * TOKEN_BYTES];
        let at = |byte: usize| vec![token / PAGE, token % PAGE, 0, byte];
        let is_read = read.get(token).copied().unwrap_or(false);
        for j in 0..D_V {
            let scale_at = SCALES_AT + 4 * (j / TILE);
            let scale =
                f32::from_le_bytes(bytes[scale_at..scale_at + 4].try_into().expect("4 bytes"));
            let code = u16::from(bytes[j]);
            if is_read {
                if !(scale.is_finite() && scale > 0.0 && scale.to_bits() & 0x7F_FFFF == 0) {
                    return Err(value_error(
                        at(scale_at),
                        format!("{scale}"),
                        "a c_kv tile's scale must be a positive power \
of two (FlashMLA writes UE8M0 values as f32)",
                    ));
                }
                if E4M3.is_nan(code) {
                    return Err(value_error(
                        at(j),
                        format!("0x{code:02x} (NaN)"),
                        "a token the sequence reads must hold \
finite E4M3 codes",
                    ));
                }
            }
            values.push(f64::from(E4M3.decode(code)) * f64::from(scale));
        }
        for j in 0..D_QK - D_V {
            let b = ROPE_AT + 2 * j;
            values.push(f64::from(
                half::bf16::from_le_bytes([bytes[b], bytes[b + 1]]).to_f32(),
            ));
        }
    }
    let mut out = inputs.clone();
    out.insert(
        "k_cache".into(),
        Tensor::from_f64_as(DType::BF16, vec![n_blocks, PAGE, 1, D_QK], &values),
    );
    Ok(Some(out))
}

fn value_error(index: Vec<usize>, value: String, why: &'static str) -> Error {
    Error::Reference(dsv3_reference::Error::Value {
        op: "mla_decode",
        tensor: "k_cache",
        index,
        value,
        why,
    })
}

/// Which cache tokens some sequence reads (entries out of range are left to the reference,
/// which names them).
fn read_tokens(inputs: &TensorMap, n_blocks: usize) -> Vec<bool> {
    let mut read = vec![false; n_blocks * PAGE];
    let (Some(table), Some(lens)) = (inputs.get("block_table"), inputs.get("cache_seqlens")) else {
        return read;
    };
    let Some(&max_blocks) = table.shape.get(1) else {
        return read;
    };
    for b in 0..lens.numel().min(table.shape[0]) {
        let len = lens.value(b).max(0.0) as usize;
        for t in 0..len.min(max_blocks * PAGE) {
            let blk = table.value(b * max_blocks + t / PAGE);
            if blk >= 0.0 && (blk as usize) < n_blocks {
                read[blk as usize * PAGE + t % PAGE] = true;
            }
        }
    }
    read
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::mla::MLA_DECODE;
    use crate::ops::policy_report;
    use crate::registry::rng::Rng;
    use crate::registry::Sizes;
    use dsv3_reference::fp8::{act_quant_any_k, ScaleFmt};
    use ndarray::ArrayView2;

    /// A `[NB, 64, 1, 576]` cache in the FP8 layout's bytes: `c_kv` in 1×128 tiles with ue8m0
    /// scales by the existing `act_quant` rule (its floor applies to amax, FlashMLA's
    /// quantizer's to amax/448: both give powers of two, which is what the layout holds), `k_pe`
    /// rounded to BF16.
    fn quantize_cache(values: &[f32]) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(values.len() / D_QK * TOKEN_BYTES);
        for token in values.chunks(D_QK) {
            let c_kv = ArrayView2::from_shape((1, D_V), &token[..D_V]).expect("512 values");
            let q = act_quant_any_k(c_kv, TILE, ScaleFmt::Ue8m0).expect("finite values");
            bytes.extend(q.y.iter());
            q.s.iter()
                .for_each(|s| bytes.extend_from_slice(&s.to_le_bytes()));
            for &v in &token[D_V..] {
                bytes.extend_from_slice(&dsv3_reference::numeric::round_to_bf16(v).to_le_bytes());
            }
        }
        bytes
    }

    /// The generator's inputs with the cache in the FP8 layout: the bf16 cache the adapter
    /// decodes, and the FP8 inputs.
    fn fp8_inputs(seed: u64) -> (TensorMap, TensorMap) {
        let op = &MLA_DECODE;
        let cfg = op.default_config();
        let mut inputs = (op.generate)(&mut Rng::new(seed), &cfg, &Sizes::new()).unwrap();
        let cache = inputs["k_cache"].clone();
        let n_blocks = cache.shape[0];
        // garbage (NaN) in the pages no sequence reads stays allowed: keep the values finite here
        let vals: Vec<f32> = cache
            .floats()
            .iter()
            .map(|v| if v.is_finite() { *v } else { 0.0 })
            .collect();
        let bytes = quantize_cache(&vals);
        let fp8 =
            Tensor::from_bytes(DType::U8, vec![n_blocks, PAGE, 1, TOKEN_BYTES], bytes).unwrap();
        inputs.insert("k_cache".into(), fp8);
        let decoded = adapt_inputs(op, &inputs, &cfg, "").unwrap().unwrap();
        (inputs, decoded)
    }

    #[test]
    fn the_fp8_cache_decodes_exactly_and_is_judged_like_its_bf16_keys() {
        let op = &MLA_DECODE;
        let cfg = op.default_config();
        for seed in 0..12u64 {
            let (inputs, decoded) = fp8_inputs(seed);
            let c = &decoded["k_cache"];
            assert_eq!((c.dtype, c.shape[3]), (DType::BF16, D_QK));
            // token 0's first value: code · scale, exactly
            let bytes = &inputs["k_cache"].data;
            let s0 = f32::from_le_bytes(bytes[SCALES_AT..SCALES_AT + 4].try_into().unwrap());
            assert_eq!(
                c.value(0),
                f64::from(E4M3.decode(u16::from(bytes[0]))) * f64::from(s0)
            );
            // the reference on the decoded keys passes against itself through the FP8 layout, and
            // a wrong output element fails with its index
            let bindings = op.contract().check_inputs(&decoded, &cfg, "").unwrap();
            let want =
                crate::registry::without_aux(op.run_reference(&decoded, &cfg, &bindings).unwrap());
            assert!(policy_report(op, &inputs, &want, &cfg).pass, "seed {seed}");
            let out = &want["out"];
            if out.numel() > 0 && out.value(0).is_finite() && out.value(0) != 0.0 {
                let mut bad = want.clone();
                let vals: Vec<f64> = (0..out.numel())
                    .map(|i| {
                        if i == 0 {
                            out.value(i) * 1.5 + 0.1
                        } else {
                            out.value(i)
                        }
                    })
                    .collect();
                bad.insert(
                    "out".into(),
                    Tensor::from_f64_as(out.dtype, out.shape.clone(), &vals),
                );
                let rep = policy_report(op, &inputs, &bad, &cfg);
                assert!(!rep.pass);
            }
        }
    }

    #[test]
    fn a_bad_scale_or_code_in_a_read_token_is_named() {
        let op = &MLA_DECODE;
        let cfg = op.default_config();
        let (mut inputs, _) = fp8_inputs(3);
        let table = inputs["block_table"].clone();
        let lens = inputs["cache_seqlens"].clone();
        let Some(b) = (0..lens.numel()).find(|&b| lens.value(b) > 0.0) else {
            panic!("seed 3 reads no token")
        };
        let blk = table.value(b * table.shape[1]) as usize;
        let mut bytes = inputs["k_cache"].data.to_vec();
        let token = blk * PAGE;
        bytes[token * TOKEN_BYTES + SCALES_AT..token * TOKEN_BYTES + SCALES_AT + 4]
            .copy_from_slice(&0.3f32.to_le_bytes());
        inputs.insert(
            "k_cache".into(),
            Tensor::from_bytes(DType::U8, inputs["k_cache"].shape.clone(), bytes.clone()).unwrap(),
        );
        let e = adapt_inputs(op, &inputs, &cfg, "").unwrap_err().to_string();
        assert!(
            e.contains(&format!("k_cache[{blk}, 0, 0, 512]")) && e.contains("power"),
            "{e}"
        );
        bytes[token * TOKEN_BYTES + SCALES_AT..token * TOKEN_BYTES + SCALES_AT + 4]
            .copy_from_slice(&1.0f32.to_le_bytes());
        bytes[token * TOKEN_BYTES + 7] = 0x7F;
        inputs.insert(
            "k_cache".into(),
            Tensor::from_bytes(DType::U8, inputs["k_cache"].shape.clone(), bytes).unwrap(),
        );
        let e = adapt_inputs(op, &inputs, &cfg, "").unwrap_err().to_string();
        assert!(
            e.contains(&format!("k_cache[{blk}, 0, 0, 7]")) && e.contains("NaN"),
            "{e}"
        );
        // a wrong width is a shape error naming the layout
        let short =
            Tensor::from_bytes(DType::U8, vec![1, PAGE, 1, 576], vec![0; PAGE * 576]).unwrap();
        inputs.insert("k_cache".into(), short);
        let e = adapt_inputs(op, &inputs, &cfg, "").unwrap_err().to_string();
        assert!(e.contains("656"), "{e}");
    }
}
