//! Wrapper of `kernels/mla_decode.cu` (reference: `dsv3_reference::mla::attention` on the keys
//! gathered from FlashMLA's paged cache).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::error::{Error, Result};
use crate::kernels::MLA_DECODE;
use crate::runtime::{grid_1d, DeviceFloats, Floats, Gpu, HostFloats};

/// `[c_kv | k_pe]` per token, FlashMLA's `kv_lora_rank + qk_rope_head_dim`.
pub const D_QK: usize = 576;
/// The value width (`c_kv`).
pub const D_V: usize = 512;
/// Tokens per cache block.
pub const PAGE: usize = 64;
/// Heads per thread block (one warp each).
const HEADS_PER_BLOCK: usize = 8;

/// A paged latent cache (FlashMLA `flash_mla_with_kvcache`).
#[derive(Debug, Clone, Copy)]
pub struct PagedCache<'a> {
    /// `[n_blocks, 64, 1, 576]`, f32 or bf16.
    pub k_cache: HostFloats<'a>,
    /// `[B, max_blocks]`: the cache block of each 64-token page of each sequence.
    pub block_table: &'a [i32],
    /// `[B]`: tokens in each sequence's cache.
    pub cache_seqlens: &'a [i32],
}

/// The shapes of one decode call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub batch: usize,
    pub s_q: usize,
    pub heads: usize,
    pub n_blocks: usize,
    pub max_blocks: usize,
}

/// `out [B, S_q, H, 512]` (q's dtype) and `lse [B, H, S_q]` for `q: [B, S_q, H, 576]`.
pub struct Output {
    pub out: Floats,
    pub lse: Vec<f32>,
}

/// Check every size and every block-table entry a sequence reads (the kernel reads only those).
fn check(q_len: usize, cache: &PagedCache<'_>, dims: &Dims) -> Result<()> {
    const OP: &str = "mla_decode";
    let bad = |msg: String| Err(Error::Argument { op: OP, msg });
    let Dims {
        batch,
        s_q,
        heads,
        n_blocks,
        max_blocks,
    } = *dims;
    if q_len != batch * s_q * heads * D_QK
        || cache.k_cache.len() != n_blocks * PAGE * D_QK
        || cache.block_table.len() != batch * max_blocks
        || cache.cache_seqlens.len() != batch
    {
        return bad(format!(
            "q has {q_len} values, k_cache {}, block_table {}, cache_seqlens {}; expected \
             B·S_q·H·576, NB·64·576, B·MB and B for {dims:?}",
            cache.k_cache.len(),
            cache.block_table.len(),
            cache.cache_seqlens.len()
        ));
    }
    if [batch, s_q, heads, n_blocks, max_blocks]
        .iter()
        .any(|&v| v > i32::MAX as usize)
    {
        return bad("sizes must fit in i32".into());
    }
    for (b, &len) in cache.cache_seqlens.iter().enumerate() {
        if len < 0 || len as usize > max_blocks * PAGE {
            return bad(format!(
                "cache_seqlens[{b}] = {len} is outside 0..={}",
                max_blocks * PAGE
            ));
        }
        for page in 0..(len as usize).div_ceil(PAGE) {
            let block = cache.block_table[b * max_blocks + page];
            if block < 0 || block as usize >= n_blocks {
                return bad(format!(
                    "block_table[{b}, {page}] = {block} does not index the {n_blocks} cache blocks"
                ));
            }
        }
    }
    Ok(())
}

/// Attention of every query row over its sequence's cached keys (values = their first 512
/// entries); `causal`: query s sees keys `t ≤ len − S_q + s`.
pub fn mla_decode(
    gpu: &Gpu,
    q: HostFloats<'_>,
    cache: &PagedCache<'_>,
    dims: &Dims,
    softmax_scale: f32,
    causal: bool,
) -> Result<Output> {
    check(q.len(), cache, dims)?;
    let rows = dims.batch * dims.s_q * dims.heads;
    if rows == 0 {
        return Ok(Output {
            out: Floats::zeros(q.is_bf16(), 0),
            lse: Vec::new(),
        });
    }
    let stream = gpu.stream();
    let d_q = q.upload(stream)?;
    let d_cache = cache.k_cache.upload(stream)?;
    let d_table = stream.clone_htod(if cache.block_table.is_empty() {
        &[0i32][..]
    } else {
        cache.block_table
    })?;
    let d_lens = stream.clone_htod(cache.cache_seqlens)?;
    let mut d_out = DeviceFloats::zeros(stream, q.is_bf16(), rows * D_V)?;
    let mut d_lse = stream.alloc_zeros::<f32>(rows)?;
    let buffers = Buffers {
        q: &d_q,
        k_cache: &d_cache,
        block_table: &d_table,
        cache_seqlens: &d_lens,
    };
    mla_decode_launch(
        gpu,
        &buffers,
        &mut d_out,
        &mut d_lse,
        dims,
        softmax_scale,
        causal,
    )?;
    Ok(Output {
        out: d_out.download(stream, rows * D_V)?,
        lse: stream.clone_dtoh(&d_lse)?,
    })
}

/// The device inputs of one decode call.
pub struct Buffers<'a> {
    pub q: &'a DeviceFloats,
    pub k_cache: &'a DeviceFloats,
    pub block_table: &'a CudaSlice<i32>,
    pub cache_seqlens: &'a CudaSlice<i32>,
}

/// Launch the kernel on device buffers (checked by the caller: sizes, sequence lengths and
/// block-table entries; `out` in q's dtype); nothing is copied.
pub fn mla_decode_launch(
    gpu: &Gpu,
    x: &Buffers<'_>,
    out: &mut DeviceFloats,
    lse: &mut CudaSlice<f32>,
    dims: &Dims,
    softmax_scale: f32,
    causal: bool,
) -> Result<()> {
    const OP: &str = "mla_decode";
    let blocks = dims.batch * dims.s_q * dims.heads.div_ceil(HEADS_PER_BLOCK);
    let cfg = LaunchConfig {
        grid_dim: grid_1d(OP, blocks)?,
        block_dim: (32 * HEADS_PER_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = gpu.function(
        &MLA_DECODE,
        &format!("mla_decode_{}_{}", x.q.suffix(), x.k_cache.suffix()),
    )?;
    let (s_arg, h_arg, mb_arg, causal_arg) = (
        dims.s_q as i32,
        dims.heads as i32,
        dims.max_blocks as i32,
        i32::from(causal),
    );
    let mut launch = gpu.stream().launch_builder(&f);
    x.q.push(&mut launch);
    x.k_cache.push(&mut launch);
    launch.arg(x.block_table).arg(x.cache_seqlens);
    out.push_mut(&mut launch);
    launch
        .arg(lse)
        .arg(&s_arg)
        .arg(&h_arg)
        .arg(&mb_arg)
        .arg(&softmax_scale)
        .arg(&causal_arg);
    // SAFETY: argument types and order match `mla_decode_{q}_{kv}` (out has q's dtype); block i
    // serves (b, s, 8 heads) with b < B, reads only keys t < cache_seqlens[b] through
    // block_table entries the caller checked, and writes its rows of out and lse.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}
