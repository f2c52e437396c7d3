//! The resource limits of an agent (`"limits": {"CPU": "10%", "memory": "20M"}` in a
//! BootAgent job): their syntax, defined once, and what they mean as numbers.
//!
//! Keys are matched without regard to case (`CPU`, `cpu`, `Memory`); any other key is an
//! error that names it. Values:
//!
//! - `CPU`: a percentage of one core, `10%`, `2.5%`, `150%` (more than one core), with at
//!   most two decimals, from [`MIN_CPU_HUNDREDTHS`] (0.1%) to [`MAX_CPU_HUNDREDTHS`]
//!   (100 cores).
//! - `memory`: a whole number of bytes with an optional binary suffix, `1536K`, `20M`, `2G`
//!   (also `KB`/`MB`/`GB`, `KiB`/`MiB`/`GiB`, `B`, any case, a space allowed before the
//!   suffix; 1K = 1024), from [`MIN_MEMORY_BYTES`] (1 MiB) to [`MAX_MEMORY_BYTES`] (1 EiB).
//!
//! The texts of [`LimitError`] go into job results as they are.

use std::collections::BTreeMap;
use std::fmt;

/// `cpu_percent` counts hundredths of a percent of one core: 10% is 1000, 2.5% is 250.
pub const CPU_SCALE: u32 = 100;
/// Smallest CPU limit, 0.1% of a core: the kernel's CFS bandwidth control enforces at least
/// 1 ms of run time per period, and a period is at most 1 s.
pub const MIN_CPU_HUNDREDTHS: u32 = 10;
/// Largest CPU limit: 100 cores (10000%).
pub const MAX_CPU_HUNDREDTHS: u32 = 100 * 100 * CPU_SCALE;
/// Smallest memory limit, 1 MiB: below that the control script itself is killed before it
/// can start anything.
pub const MIN_MEMORY_BYTES: u64 = 1 << 20;
/// Largest memory limit, 1 EiB: far above any machine, and below what both cgroup versions
/// read as a signed 64-bit number.
pub const MAX_MEMORY_BYTES: u64 = 1 << 60;
/// Longest part of a bad value quoted in an error, in bytes.
pub const MAX_QUOTED_LEN: usize = 64;

const CPU_SYNTAX: &str = "expected a percentage of one core such as 10%, 2.5% or 150%";
const MEMORY_SYNTAX: &str = "expected a size such as 1024K, 20M or 2G";

/// The limits of one agent, as numbers. `None` means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// CPU time, in hundredths of a percent of one core ([`CPU_SCALE`]): `Some(1000)` is
    /// 10%, `Some(15000)` one and a half cores.
    pub cpu_percent: Option<u32>,
    /// Memory (anonymous and page cache, as the kernel counts it), in bytes.
    pub memory_bytes: Option<u64>,
}

impl Limits {
    /// True when no limit is set.
    pub fn is_empty(&self) -> bool {
        self.cpu_percent.is_none() && self.memory_bytes.is_none()
    }

    /// The limits in words, for logs and status: `CPU 10%, memory 20 MiB`, or `no limits`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(c) = self.cpu_percent {
            parts.push(format!("CPU {}", format_cpu(c)));
        }
        if let Some(m) = self.memory_bytes {
            parts.push(format!("memory {}", format_size(m)));
        }
        if parts.is_empty() {
            "no limits".to_string()
        } else {
            parts.join(", ")
        }
    }
}

/// Which limit a value was given for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKey {
    /// `CPU`.
    Cpu,
    /// `memory`.
    Memory,
}

impl LimitKey {
    fn of(key: &str) -> Option<LimitKey> {
        if key.eq_ignore_ascii_case("cpu") {
            Some(LimitKey::Cpu)
        } else if key.eq_ignore_ascii_case("memory") {
            Some(LimitKey::Memory)
        } else {
            None
        }
    }
}

impl fmt::Display for LimitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LimitKey::Cpu => "CPU",
            LimitKey::Memory => "memory",
        })
    }
}

/// What is wrong with a `limits` map. Values and keys are quoted cut to
/// [`MAX_QUOTED_LEN`] bytes, control characters replaced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// A key that is neither `CPU` nor `memory`.
    #[error("limits: unknown key {key:?} (known: CPU, memory)")]
    UnknownKey { key: String },
    /// The same limit under two spellings (`CPU` and `cpu`).
    #[error("limits: {key} given twice ({first:?} and {second:?})")]
    Twice {
        key: LimitKey,
        first: String,
        second: String,
    },
    /// A value that does not follow the syntax.
    #[error("limits: {key} {value:?}: {}", syntax(*.key))]
    Syntax { key: LimitKey, value: String },
    /// A value in the syntax but outside the accepted range.
    #[error("limits: {key} {value:?}: {reason}")]
    Range {
        key: LimitKey,
        value: String,
        /// Which bound it crossed, in words: `below the minimum of 1 MiB`.
        reason: String,
    },
}

fn syntax(key: LimitKey) -> &'static str {
    match key {
        LimitKey::Cpu => CPU_SYNTAX,
        LimitKey::Memory => MEMORY_SYNTAX,
    }
}

fn quote(s: &str) -> String {
    crate::clean_text(s, MAX_QUOTED_LEN)
}

/// Reads a `limits` map (keys in any case). An empty map is no limits.
pub fn parse_limits(map: &BTreeMap<String, String>) -> Result<Limits, LimitError> {
    let mut limits = Limits::default();
    let mut seen: [Option<&str>; 2] = [None, None];
    for (key, value) in map {
        let Some(k) = LimitKey::of(key.trim()) else {
            return Err(LimitError::UnknownKey { key: quote(key) });
        };
        let slot = &mut seen[k as usize];
        if let Some(first) = slot {
            return Err(LimitError::Twice {
                key: k,
                first: quote(first),
                second: quote(key),
            });
        }
        *slot = Some(key);
        match k {
            LimitKey::Cpu => limits.cpu_percent = Some(parse_cpu(value)?),
            LimitKey::Memory => limits.memory_bytes = Some(parse_memory(value)?),
        }
    }
    Ok(limits)
}

/// A `CPU` value (`10%`, `2.5%`) in hundredths of a percent.
pub fn parse_cpu(value: &str) -> Result<u32, LimitError> {
    let bad = || LimitError::Syntax {
        key: LimitKey::Cpu,
        value: quote(value),
    };
    let number = value
        .trim()
        .strip_suffix('%')
        .map(str::trim_end)
        .ok_or_else(bad)?;
    let (whole, frac) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(frac) {
        return Err(bad());
    }
    if frac.len() > 2 {
        return Err(LimitError::Range {
            key: LimitKey::Cpu,
            value: quote(value),
            reason: "at most two decimals".to_string(),
        });
    }
    let too_big = || LimitError::Range {
        key: LimitKey::Cpu,
        value: quote(value),
        reason: format!("above the maximum of {}", format_cpu(MAX_CPU_HUNDREDTHS)),
    };
    // Only digits are left, so the one way to fail is a number too long for u64.
    let whole: u64 = whole.parse().map_err(|_| too_big())?;
    let frac: u64 = format!("{frac:0<2}").parse().unwrap_or(0);
    let hundredths = whole
        .checked_mul(u64::from(CPU_SCALE))
        .and_then(|w| w.checked_add(frac))
        .ok_or_else(too_big)?;
    if hundredths > u64::from(MAX_CPU_HUNDREDTHS) {
        return Err(too_big());
    }
    let hundredths = hundredths as u32;
    if hundredths < MIN_CPU_HUNDREDTHS {
        return Err(LimitError::Range {
            key: LimitKey::Cpu,
            value: quote(value),
            reason: format!("below the minimum of {}", format_cpu(MIN_CPU_HUNDREDTHS)),
        });
    }
    Ok(hundredths)
}

/// A `memory` value (`20M`, `512KiB`, `1048576`) in bytes.
pub fn parse_memory(value: &str) -> Result<u64, LimitError> {
    let bad = || LimitError::Syntax {
        key: LimitKey::Memory,
        value: quote(value),
    };
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (number, suffix) = v.split_at(split);
    if number.is_empty() {
        return Err(bad());
    }
    let shift = match suffix.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(bad()),
    };
    let too_big = || LimitError::Range {
        key: LimitKey::Memory,
        value: quote(value),
        reason: format!("above the maximum of {}", format_size(MAX_MEMORY_BYTES)),
    };
    // Only digits are left, so the one way to fail is a number too long for u64.
    let n: u64 = number.parse().map_err(|_| too_big())?;
    let bytes = n.checked_mul(1u64 << shift).ok_or_else(too_big)?;
    if bytes > MAX_MEMORY_BYTES {
        return Err(too_big());
    }
    if bytes < MIN_MEMORY_BYTES {
        return Err(LimitError::Range {
            key: LimitKey::Memory,
            value: quote(value),
            reason: format!("below the minimum of {}", format_size(MIN_MEMORY_BYTES)),
        });
    }
    Ok(bytes)
}

/// Hundredths of a percent as the shortest percentage: `10%`, `2.5%`, `12.34%`.
pub fn format_cpu(hundredths: u32) -> String {
    let whole = hundredths / CPU_SCALE;
    match hundredths % CPU_SCALE {
        0 => format!("{whole}%"),
        f if f % 10 == 0 => format!("{whole}.{}%", f / 10),
        f => format!("{whole}.{f:02}%"),
    }
}

/// Bytes in the largest binary unit that divides them exactly: `20 MiB`, `1 EiB`,
/// `1048577 bytes`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u32, &str); 6] = [
        (60, "EiB"),
        (50, "PiB"),
        (40, "TiB"),
        (30, "GiB"),
        (20, "MiB"),
        (10, "KiB"),
    ];
    for (shift, unit) in UNITS {
        if bytes != 0 && bytes.trailing_zeros() >= shift {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn cpu_values() {
        let cases: &[(&str, Result<u32, &str>)] = &[
            ("10%", Ok(1000)),
            ("2.5%", Ok(250)),
            ("150%", Ok(15000)),
            ("0.1%", Ok(10)),
            ("12.34%", Ok(1234)),
            (" 10 % ", Ok(1000)),
            ("010%", Ok(1000)),
            ("10000%", Ok(MAX_CPU_HUNDREDTHS)),
            ("10%", Ok(1000)),
            (
                "10",
                Err(
                    r#"limits: CPU "10": expected a percentage of one core such as 10%, 2.5% or 150%"#,
                ),
            ),
            ("", Err(r#"limits: CPU "": expected a percentage"#)),
            ("%", Err(r#"limits: CPU "%": expected"#)),
            (".5%", Err(r#"limits: CPU ".5%": expected"#)),
            ("-1%", Err(r#"limits: CPU "-1%": expected"#)),
            ("1e2%", Err(r#"limits: CPU "1e2%": expected"#)),
            ("ten%", Err(r#"limits: CPU "ten%": expected"#)),
            ("0%", Err(r#"limits: CPU "0%": below the minimum of 0.1%"#)),
            (
                "0.05%",
                Err(r#"limits: CPU "0.05%": below the minimum of 0.1%"#),
            ),
            (
                "2.555%",
                Err(r#"limits: CPU "2.555%": at most two decimals"#),
            ),
            (
                "10001%",
                Err(r#"limits: CPU "10001%": above the maximum of 10000%"#),
            ),
            (
                "99999999999999999999999%",
                Err(r#"limits: CPU "99999999999999999999999%": above the maximum of 10000%"#),
            ),
        ];
        for (input, want) in cases {
            let got = parse_cpu(input).map_err(|e| e.to_string());
            match (want, &got) {
                (Ok(w), Ok(g)) => assert_eq!(w, g, "{input:?}"),
                (Err(w), Err(g)) => assert!(g.starts_with(w), "{input:?}: want {w:?}, got {g:?}"),
                _ => panic!("{input:?}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn memory_values() {
        const M: u64 = 1 << 20;
        let cases: &[(&str, Result<u64, &str>)] = &[
            ("20M", Ok(20 * M)),
            ("20m", Ok(20 * M)),
            ("20MB", Ok(20 * M)),
            ("20MiB", Ok(20 * M)),
            ("20 mib", Ok(20 * M)),
            ("1024K", Ok(M)),
            ("1024kb", Ok(M)),
            ("2G", Ok(2 << 30)),
            ("2GiB", Ok(2 << 30)),
            ("1048576", Ok(M)),
            ("1048576B", Ok(M)),
            (" 20M ", Ok(20 * M)),
            ("1073741824G", Ok(MAX_MEMORY_BYTES)),
            (
                "20X",
                Err(r#"limits: memory "20X": expected a size such as 1024K, 20M or 2G"#),
            ),
            ("", Err(r#"limits: memory "": expected a size"#)),
            ("M", Err(r#"limits: memory "M": expected a size"#)),
            ("1.5G", Err(r#"limits: memory "1.5G": expected a size"#)),
            ("-1", Err(r#"limits: memory "-1": expected a size"#)),
            ("20 M B", Err(r#"limits: memory "20 M B": expected a size"#)),
            ("20T", Err(r#"limits: memory "20T": expected a size"#)),
            (
                "512K",
                Err(r#"limits: memory "512K": below the minimum of 1 MiB"#),
            ),
            (
                "0",
                Err(r#"limits: memory "0": below the minimum of 1 MiB"#),
            ),
            (
                "1073741825G",
                Err(r#"limits: memory "1073741825G": above the maximum of 1 EiB"#),
            ),
            (
                "18446744073709551616",
                Err(r#"limits: memory "18446744073709551616": above the maximum of 1 EiB"#),
            ),
            (
                "99999999999999999999G",
                Err(r#"limits: memory "99999999999999999999G": above the maximum"#),
            ),
        ];
        for (input, want) in cases {
            let got = parse_memory(input).map_err(|e| e.to_string());
            match (want, &got) {
                (Ok(w), Ok(g)) => assert_eq!(w, g, "{input:?}"),
                (Err(w), Err(g)) => assert!(g.starts_with(w), "{input:?}: want {w:?}, got {g:?}"),
                _ => panic!("{input:?}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn maps() {
        type Case<'a> = (&'a [(&'a str, &'a str)], Result<Limits, &'a str>);
        let cases: &[Case] = &[
            (&[], Ok(Limits::default())),
            (
                &[("CPU", "10%"), ("memory", "20M")],
                Ok(Limits {
                    cpu_percent: Some(1000),
                    memory_bytes: Some(20 << 20),
                }),
            ),
            (
                &[("cpu", "2.5%"), ("Memory", "1G")],
                Ok(Limits {
                    cpu_percent: Some(250),
                    memory_bytes: Some(1 << 30),
                }),
            ),
            (
                &[("MEMORY", "20M")],
                Ok(Limits {
                    cpu_percent: None,
                    memory_bytes: Some(20 << 20),
                }),
            ),
            (
                &[("disk", "1G")],
                Err(r#"limits: unknown key "disk" (known: CPU, memory)"#),
            ),
            (
                &[("CPU", "10%"), ("cpu", "20%")],
                Err(r#"limits: CPU given twice ("CPU" and "cpu")"#),
            ),
            (
                &[("memory", "20X")],
                Err(r#"limits: memory "20X": expected a size such as 1024K, 20M or 2G"#),
            ),
            (
                &[("memory", "\n20X")],
                Err(r#"limits: memory " 20X": expected a size such as 1024K, 20M or 2G"#),
            ),
        ];
        for (pairs, want) in cases {
            let got = parse_limits(&map(pairs)).map_err(|e| e.to_string());
            assert_eq!(got, want.map_err(str::to_string), "{pairs:?}");
        }
    }

    #[test]
    fn long_values_are_cut_in_errors() {
        let long = "x".repeat(1000);
        let e = parse_limits(&map(&[("memory", &long)]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("\"{}\"", "x".repeat(MAX_QUOTED_LEN))),
            "{e}"
        );
        assert!(e.len() < 200, "{e}");
        let e = parse_limits(&map(&[(&long, "1G")]))
            .unwrap_err()
            .to_string();
        assert!(e.len() < 200, "{e}");
    }

    #[test]
    fn descriptions() {
        let cases = [
            (None, None, "no limits"),
            (Some(1000), Some(20 << 20), "CPU 10%, memory 20 MiB"),
            (Some(250), None, "CPU 2.5%"),
            (Some(1234), None, "CPU 12.34%"),
            (Some(1205), None, "CPU 12.05%"),
            (Some(15000), None, "CPU 150%"),
            (None, Some(512 << 10), "memory 512 KiB"),
            (None, Some(3 << 30), "memory 3 GiB"),
            (None, Some((1 << 20) + 1), "memory 1048577 bytes"),
            (None, Some(1 << 60), "memory 1 EiB"),
        ];
        for (cpu, mem, want) in cases {
            let l = Limits {
                cpu_percent: cpu,
                memory_bytes: mem,
            };
            assert_eq!(l.describe(), want);
            assert_eq!(l.is_empty(), cpu.is_none() && mem.is_none());
        }
    }

    #[test]
    fn what_is_described_parses_back() {
        for v in ["10%", "2.5%", "12.34%", "150%"] {
            let c = parse_cpu(v).unwrap();
            assert_eq!(format_cpu(c), v);
        }
        for v in ["20M", "1536K", "3G"] {
            let m = parse_memory(v).unwrap();
            let shown = format_size(m);
            assert_eq!(parse_memory(&shown).unwrap(), m, "{shown}");
        }
    }
}
