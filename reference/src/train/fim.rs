//! Fill-in-Middle and document packing (V3 §4.1).
//!
//! FIM: "applied at the document level before the packing process", rate 0.1, Prefix-Suffix-
//! Middle order: `<|fim▁begin|> f_pre <|fim▁hole|> f_suf <|fim▁end|> f_middle <|eos_token|>`.
//! We split at the token level (the paper does not say; DeepSeek-Coder and Bavarian et al. split
//! characters before tokenisation): two cut points drawn uniformly from `0..=len` and sorted,
//! so prefix, middle and suffix may each be empty.
//!
//! Packing: each (possibly transformed) document is followed by EOS, the documents are
//! concatenated in order and cut into rows of `seq_len` tokens; a document may run across a row
//! boundary, and no attention mask separates documents inside a row (V3 §4.2 "document packing
//! … without cross-sample attention masking"). The last row is filled with `pad` tokens
//! (to be loss-masked; their count is returned), so no token is ever dropped.
//!
//! Randomness: one [`Rng`] stream over the corpus in document order; per document one uniform
//! draw decides FIM (`u < rate`), and a FIM document takes two more draws (the cut points).
//! The same seed, rate and documents give the same output.

use ndarray::Array2;

use crate::error::{Error, Result};
use crate::rng::Rng;

/// V3 §4.1.
pub const FIM_RATE: f64 = 0.1;

/// Token ids of the special tokens (the V3 tokenizer's `<｜fim▁begin｜>`, `<｜fim▁hole｜>`,
/// `<｜fim▁end｜>` and EOS; their ids live in its `tokenizer.json`, not vendored here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    pub fim_begin: u32,
    pub fim_hole: u32,
    pub fim_end: u32,
    pub eos: u32,
}

/// One document in PSM form: `begin, prefix, hole, suffix, end, middle` with
/// `prefix = doc[..a]`, `middle = doc[a..b]`, `suffix = doc[b..]`, `a ≤ b`.
pub fn fim_psm(doc: &[u32], a: usize, b: usize, sp: &SpecialTokens) -> Result<Vec<u32>> {
    if !(a <= b && b <= doc.len()) {
        return Err(Error::Argument {
            op: "fim_psm",
            name: "cut points",
            value: format!("({a}, {b})"),
            why: format!("need a ≤ b ≤ document length {}", doc.len()),
        });
    }
    let mut out = Vec::with_capacity(doc.len() + 3);
    out.push(sp.fim_begin);
    out.extend_from_slice(&doc[..a]);
    out.push(sp.fim_hole);
    out.extend_from_slice(&doc[b..]);
    out.push(sp.fim_end);
    out.extend_from_slice(&doc[a..b]);
    Ok(out)
}

/// Apply FIM at `rate` to every document, in order, from `seed` (see the module doc for the
/// draws). Documents that draw `u ≥ rate` are returned unchanged. EOS is added by [`pack`].
pub fn fim_transform(
    docs: &[Vec<u32>],
    rate: f64,
    seed: u64,
    sp: &SpecialTokens,
) -> Result<Vec<Vec<u32>>> {
    if !(0.0..=1.0).contains(&rate) {
        return Err(Error::Argument {
            op: "fim_transform",
            name: "rate",
            value: rate.to_string(),
            why: "must be in [0, 1]".into(),
        });
    }
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(docs.len());
    for doc in docs {
        // one draw decides; a FIM document draws its two cut points
        if rng.uniform() < rate {
            let x = rng.range(0, doc.len());
            let y = rng.range(0, doc.len());
            out.push(fim_psm(doc, x.min(y), x.max(y), sp)?);
        } else {
            out.push(doc.clone());
        }
    }
    Ok(out)
}

/// Packed training rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// `[rows, seq_len]` token ids.
    pub tokens: Array2<u32>,
    /// Pad tokens at the end of the last row.
    pub n_pad: usize,
}

/// Concatenate `doc_0 EOS doc_1 EOS …` and cut into rows of `seq_len` (the last row padded with
/// `pad`). Errors: `seq_len = 0`.
pub fn pack(docs: &[Vec<u32>], seq_len: usize, eos: u32, pad: u32) -> Result<Packed> {
    if seq_len == 0 {
        return Err(Error::Argument {
            op: "pack",
            name: "seq_len",
            value: "0".into(),
            why: "rows need at least one token".into(),
        });
    }
    // the stream: every document followed by EOS
    let mut stream: Vec<u32> = Vec::with_capacity(docs.iter().map(|d| d.len() + 1).sum());
    for doc in docs {
        stream.extend_from_slice(doc);
        stream.push(eos);
    }
    // cut into rows; pad the last one
    let rows = stream.len().div_ceil(seq_len);
    let n_pad = rows * seq_len - stream.len();
    stream.resize(rows * seq_len, pad);
    let tokens = Array2::from_shape_vec((rows, seq_len), stream).expect("rows · seq_len tokens");
    Ok(Packed { tokens, n_pad })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SP: SpecialTokens = SpecialTokens {
        fim_begin: 1_000_001,
        fim_hole: 1_000_002,
        fim_end: 1_000_003,
        eos: 1_000_000,
    };

    /// Undo PSM: (prefix, middle, suffix) → the original document.
    fn unfim(x: &[u32]) -> Vec<u32> {
        assert_eq!(x[0], SP.fim_begin);
        let hole = x.iter().position(|&t| t == SP.fim_hole).unwrap();
        let end = x.iter().position(|&t| t == SP.fim_end).unwrap();
        let mut doc = x[1..hole].to_vec();
        doc.extend_from_slice(&x[end + 1..]);
        doc.extend_from_slice(&x[hole + 1..end]);
        doc
    }

    #[test]
    fn psm_layout() {
        // doc = 10 11 12 13 14, a = 1, b = 3: pre = 10, middle = 11 12, suf = 13 14
        let out = fim_psm(&[10, 11, 12, 13, 14], 1, 3, &SP).unwrap();
        assert_eq!(
            out,
            vec![SP.fim_begin, 10, SP.fim_hole, 13, 14, SP.fim_end, 11, 12]
        );
        assert!(fim_psm(&[1, 2], 2, 1, &SP).is_err());
    }

    #[test]
    fn about_one_document_in_ten_is_transformed() {
        let docs: Vec<Vec<u32>> = (0..20_000).map(|i| vec![i, i + 1]).collect();
        let out = fim_transform(&docs, FIM_RATE, 7, &SP).unwrap();
        let n = out
            .iter()
            .filter(|d| d.first() == Some(&SP.fim_begin))
            .count() as f64;
        // Binomial(20000, 0.1): mean 2000, sd √(20000·0.1·0.9) ≈ 42.4; 5 sd = 212
        assert!((n - 2000.0).abs() < 212.0, "{n}");
    }

    fn docs_strategy() -> impl Strategy<Value = Vec<Vec<u32>>> {
        prop::collection::vec(prop::collection::vec(0u32..50_000, 0..40), 0..30)
    }

    proptest! {
        #[test]
        fn fim_loses_no_token_and_is_deterministic(docs in docs_strategy(), seed in any::<u64>(), rate in 0.0f64..=1.0) {
            let a = fim_transform(&docs, rate, seed, &SP).unwrap();
            prop_assert_eq!(&a, &fim_transform(&docs, rate, seed, &SP).unwrap());
            prop_assert_eq!(a.len(), docs.len());
            for (x, d) in a.iter().zip(&docs) {
                if x.first() == Some(&SP.fim_begin) {
                    // exactly three special tokens added, and PSM undone gives the document back
                    prop_assert_eq!(x.len(), d.len() + 3);
                    prop_assert_eq!(&unfim(x), d);
                } else {
                    prop_assert_eq!(x, d);
                }
            }
        }

        #[test]
        fn packing_keeps_every_token_in_order(docs in docs_strategy(), seq_len in 1usize..64) {
            let p = pack(&docs, seq_len, SP.eos, u32::MAX).unwrap();
            let flat: Vec<u32> = p.tokens.iter().copied().collect();
            let n_real = flat.len() - p.n_pad;
            // no token lost, order kept: the unpadded stream is doc_0 EOS doc_1 EOS …
            let mut want = Vec::new();
            for d in &docs { want.extend_from_slice(d); want.push(SP.eos); }
            prop_assert_eq!(&flat[..n_real], &want[..]);
            // padding only at the end, less than one row
            prop_assert!(flat[n_real..].iter().all(|&t| t == u32::MAX));
            prop_assert!(p.n_pad < seq_len);
        }
    }
}
