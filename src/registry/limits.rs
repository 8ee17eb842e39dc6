//! Resource ceilings: every size that drives an allocation is checked here before allocating,
//! so an absurd request (a generator size of 2^40, a header claiming 64 GiB, a config asking
//! for 2^40 replicas) is a clear error (exit 2), never an allocation abort.
//!
//! The budget is the memory the operating system reports available (`MemAvailable` in
//! `/proc/meminfo`, or [`FALLBACK_BUDGET`] where it cannot be read), less than that when an
//! address-space limit (`ulimit -v`) leaves the process less; `DSV3_MEMORY_LIMIT`
//! (bytes, or with a `K`/`M`/`G`/`T` suffix) lowers or raises it. A request is refused when
//! its estimate exceeds the budget. Estimates count each tensor as if every zero-size dimension
//! were 1 (an empty `[2^40, 0]` tensor still drives loops over its 2^40 rows), in the widest
//! per-element cost of [`WORKING_BYTES`] (files: their own bytes).

use crate::registry::error::{Error, Result};

/// The budget where the available memory cannot be read (non-Linux systems): 16 GiB.
pub const FALLBACK_BUDGET: u64 = 16 << 30;

/// Bytes charged per element of the tensors an op will produce (generated inputs for `gen`,
/// the reference's outputs for `run` and `check`): one f64, the widest value the generators
/// and references keep per element. Loading a file is charged its tensors' own bytes. Both
/// are lower bounds of the real use, so a refusal never hits a request that would have fit.
pub const WORKING_BYTES: u64 = 8;

/// The largest number of model layers, MTP modules or routed experts a config may declare:
/// 2^16, over 200 times DeepSeek-V3's (61 layers, 256 experts).
pub const MAX_MODEL_COUNT: u64 = 1 << 16;

/// The memory dsv3 may use on this machine, in bytes.
pub fn budget() -> u64 {
    if let Some(limit) = std::env::var("DSV3_MEMORY_LIMIT")
        .ok()
        .and_then(|v| parse_bytes(&v))
    {
        return limit;
    }
    let available = available_memory().unwrap_or(FALLBACK_BUDGET);
    address_space_left().map_or(available, |left| available.min(left))
}

/// What an address-space limit (`ulimit -v`, `RLIMIT_AS`) leaves this process: the soft limit
/// in `/proc/self/limits` less the current `VmSize`; `None` when unlimited or unreadable.
fn address_space_left() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))?;
    let soft: u64 = line
        .trim_start_matches("Max address space")
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let used_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmSize:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(soft.saturating_sub(used_kib.saturating_mul(1024)))
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// `"8G"`, `"512M"`, `"1048576"` → bytes.
fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, shift) = match s.chars().last()?.to_ascii_uppercase() {
        'K' => (&s[..s.len() - 1], 10),
        'M' => (&s[..s.len() - 1], 20),
        'G' => (&s[..s.len() - 1], 30),
        'T' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

/// `1.5 GiB`-style text for messages.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The element count that drives work for `shape`: the product with every 0 counted as 1,
/// `None` on overflow.
pub fn extent(shape: &[usize]) -> Option<u64> {
    shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul((d as u64).max(1)))
}

/// Refuse `what` when `need` bytes (`None`: more than 2^64) exceed the budget.
pub fn ensure_fits(what: &str, need: Option<u64>) -> Result<()> {
    let budget = budget();
    match need {
        Some(n) if n <= budget => Ok(()),
        _ => Err(Error::TooLarge {
            what: what.to_string(),
            need: need.map_or("more than 2^64 bytes".into(), |n| {
                format!("needs about {}", human(n))
            }),
            limit: format!(
                "dsv3 may use {} here (the available memory, or what an address-space limit leaves; DSV3_MEMORY_LIMIT overrides it)",
                human(budget)
            ),
        }),
    }
}

/// Refuse work over `counts` (multiplied, zero counted as 1) at `bytes_each` bytes per
/// element when it exceeds the budget: the sims' and studies' arguments (`--tokens`,
/// `--experts`, `--m`), checked before they allocate.
pub fn ensure_elements(what: &str, counts: &[usize], bytes_each: u64) -> Result<()> {
    ensure_fits(what, extent(counts).and_then(|e| e.checked_mul(bytes_each)))
}

/// Refuse a count over a documented ceiling.
pub fn ensure_at_most(what: &str, value: u64, ceiling: u64, why: &str) -> Result<()> {
    if value <= ceiling {
        Ok(())
    } else {
        Err(Error::TooLarge {
            what: what.to_string(),
            need: format!("{value}"),
            limit: format!("the ceiling is {ceiling} ({why})"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_suffixes() {
        assert_eq!(parse_bytes("1024"), Some(1024));
        assert_eq!(parse_bytes("8G"), Some(8 << 30));
        assert_eq!(parse_bytes("3m"), Some(3 << 20));
        assert_eq!(parse_bytes("x"), None);
        assert_eq!(parse_bytes("99999999999T"), None);
    }

    #[test]
    fn empty_dims_count_as_one() {
        assert_eq!(extent(&[1 << 40, 0]), Some(1 << 40));
        assert_eq!(extent(&[]), Some(1));
        assert_eq!(extent(&[1 << 40, 1 << 40]), None);
    }

    #[test]
    fn human_units() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }
}
