//! Sizes, rates and durations on the command line: one rule, strictly.
//!
//! * **Sizes**: a number and a unit. A unit with an `i` is binary, one
//!   without is decimal, as in Kubernetes quantities: `KiB`/`Ki` = 1024,
//!   `MiB`/`Mi` = 1024², `GiB`/`Gi`, `TiB`/`Ti`; `KB`/`K` = 1000,
//!   `MB`/`M` = 1000², `GB`/`G`, `TB`/`T`; `B` is bytes. A bare number
//!   is refused (is `1024` bytes, KiB or MiB?).
//! * **Rates**: a size per second (`64MB/s`, `1GiB/s`) or a bit rate
//!   (`1Gbit/s`, `500Mbit/s`, `100Mbps`; bits are decimal, as links are
//!   sold). `0` alone is allowed (an idle guest).
//! * **Durations**: a number and a unit, `ms`, `s`, `m` or `min`, `h`,
//!   and sums of them (`1m30s`). A bare number is refused.
//!
//! `b` after a prefix (`Mb`, `Gb`, `kb`) is refused as ambiguous between
//! bits and bytes. Every refusal suggests what was likely meant.

use std::time::Duration;

/// Units of sizes: name (lowercase), multiplier.
const SIZE_UNITS: [(&str, u64); 17] = [
    ("b", 1),
    ("k", 1_000),
    ("kb", 1_000),
    ("m", 1_000_000),
    ("mb", 1_000_000),
    ("g", 1_000_000_000),
    ("gb", 1_000_000_000),
    ("t", 1_000_000_000_000),
    ("tb", 1_000_000_000_000),
    ("ki", 1 << 10),
    ("kib", 1 << 10),
    ("mi", 1 << 20),
    ("mib", 1 << 20),
    ("gi", 1 << 30),
    ("gib", 1 << 30),
    ("ti", 1 << 40),
    ("tib", 1 << 40),
];

/// Bit-rate prefixes (decimal): name (lowercase), bits per second.
const BIT_PREFIXES: [(&str, u64); 5] = [
    ("", 1),
    ("k", 1_000),
    ("m", 1_000_000),
    ("g", 1_000_000_000),
    ("t", 1_000_000_000_000),
];

const SIZE_EXAMPLES: &str = "e.g. 4GiB, 512MiB (binary) or 4GB, 500MB (decimal)";
const RATE_EXAMPLES: &str = "e.g. 64MB/s, 1GiB/s or 1Gbit/s";
const DURATION_EXAMPLES: &str = "e.g. 300ms, 30s, 10m, 1m30s";

/// A size as given on the command line, with its reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Size {
    /// Bytes.
    pub bytes: u64,
    /// The text given.
    pub text: String,
    /// Its unit was decimal (`KB`, `MB`, `G`, ...).
    pub decimal: bool,
}

impl Size {
    /// The same number with the binary unit, when the unit was decimal
    /// (`256MB` → `256MiB`): what a decimal size was likely meant as.
    pub fn binary_reading(&self) -> Option<String> {
        if !self.decimal {
            return None;
        }
        let (num, unit) = split_number(self.text.trim());
        let prefix = unit.trim().chars().next()?.to_ascii_uppercase();
        Some(format!("{num}{prefix}iB"))
    }
}

/// Splits `12.5GiB` into `("12.5", "GiB")`.
fn split_number(t: &str) -> (&str, &str) {
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    t.split_at(split)
}

fn number(num: &str, s: &str, what: &str, examples: &str) -> Result<f64, String> {
    match num.parse::<f64>() {
        Ok(n) if n.is_finite() && n >= 0.0 => Ok(n),
        _ => Err(format!("'{s}' is not a {what} ({examples})")),
    }
}

/// `Mb`, `kb`, `Gb`: bits or bytes?
fn ambiguous_b(unit: &str) -> bool {
    let mut c = unit.chars();
    matches!(
        (c.next(), c.next(), c.next()),
        (Some(p), Some('b'), None) if "kKmMgGtT".contains(p)
    )
}

/// Parses a size (see the module doc).
pub fn parse_size_text(s: &str) -> Result<Size, String> {
    let t = s.trim();
    let (num, unit) = split_number(t);
    let unit = unit.trim();
    let n = number(num, s, "size", SIZE_EXAMPLES)?;
    if unit.is_empty() {
        return Err(format!(
            "'{s}' has no unit: write {num}GiB, {num}MiB, {num}KiB or {num}B ({SIZE_EXAMPLES})"
        ));
    }
    if ambiguous_b(unit) {
        let p = unit[..1].to_ascii_uppercase();
        return Err(format!(
            "'{s}': '{unit}' could be bits or bytes; sizes are bytes: write {num}{p}B (decimal) or {num}{p}iB (binary)"
        ));
    }
    let lower = unit.to_ascii_lowercase();
    if lower.ends_with("/s") || lower.ends_with("bit") || lower.ends_with("bps") {
        return Err(format!(
            "'{s}' is a rate; a size has no /s ({SIZE_EXAMPLES})"
        ));
    }
    let Some((_, mult)) = SIZE_UNITS.iter().find(|(u, _)| *u == lower) else {
        return Err(format!(
            "unknown size unit '{unit}' in '{s}' (B, KiB, MiB, GiB, TiB are binary; KB, MB, GB, TB decimal; {SIZE_EXAMPLES})"
        ));
    };
    let bytes = n * *mult as f64;
    if bytes > u64::MAX as f64 {
        return Err(format!("'{s}' is too large"));
    }
    Ok(Size {
        bytes: bytes.round() as u64,
        text: t.to_string(),
        decimal: *mult > 1 && !lower.contains('i'),
    })
}

/// Parses a size into bytes (see the module doc).
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_size_text(s).map(|z| z.bytes)
}

/// Parses a size that must be a whole number of 4 KiB pages (guest
/// memory, chunk size), suggesting the binary reading when a decimal unit
/// made it fall between pages (`1GB` → `1GiB`).
pub fn parse_pages(s: &str) -> Result<Size, String> {
    let z = parse_size_text(s)?;
    if z.bytes == 0 || z.bytes % 4096 != 0 {
        let hint = match z.binary_reading() {
            Some(b) => format!(
                "; '{}' is decimal ({} bytes): did you mean {b}?",
                z.text, z.bytes
            ),
            None => format!(" ({} bytes)", z.bytes),
        };
        return Err(format!("'{s}' is not a whole number of 4 KiB pages{hint}"));
    }
    Ok(z)
}

/// [`parse_pages`], in bytes.
pub fn parse_page_bytes(s: &str) -> Result<u64, String> {
    parse_pages(s).map(|z| z.bytes)
}

/// Parses a rate into bytes per second (see the module doc).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = split_number(t);
    let unit = unit.trim();
    let n = number(num, s, "rate", RATE_EXAMPLES)?;
    if unit.is_empty() {
        if n == 0.0 {
            return Ok(0);
        }
        return Err(format!(
            "'{s}' has no unit: write {num}MB/s, {num}MiB/s or {num}Mbit/s ({RATE_EXAMPLES})"
        ));
    }
    let lower = unit.to_ascii_lowercase();
    // Bits: Gbit/s, Mbit/s, Gbps, Mbps (decimal, per second).
    let bits = lower
        .strip_suffix("bit/s")
        .or_else(|| lower.strip_suffix("bps"));
    if let Some(prefix) = bits {
        let Some((_, mult)) = BIT_PREFIXES.iter().find(|(p, _)| *p == prefix) else {
            return Err(format!(
                "unknown bit-rate unit '{unit}' in '{s}' (bit/s, Kbit/s, Mbit/s, Gbit/s, or Kbps, Mbps, Gbps)"
            ));
        };
        return Ok((n * *mult as f64 / 8.0).round() as u64);
    }
    if let Some(p) = unit.strip_suffix("b/s") {
        // `Mb/s`: bits or bytes?
        return Err(format!(
            "'{s}': '{unit}' could be bits or bytes: write {num}{p}bit/s (bits) or {num}{}B/s (bytes)",
            p.to_ascii_uppercase()
        ));
    }
    let Some(size) = unit.strip_suffix("/s") else {
        return Err(format!(
            "'{s}' is not a rate: a rate is per second, e.g. {num}{unit}/s ({RATE_EXAMPLES})"
        ));
    };
    parse_size(&format!("{num}{size}"))
        .map_err(|e| format!("{e} (in the rate '{s}'; {RATE_EXAMPLES})"))
}

/// Parses a duration (see the module doc).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err(format!("empty duration ({DURATION_EXAMPLES})"));
    }
    let mut rest = t;
    let mut secs = 0.0;
    while !rest.is_empty() {
        let (num, after) = split_number(rest);
        let n = number(num, s, "duration", DURATION_EXAMPLES)?;
        let end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(end);
        let mult = match unit.trim() {
            "" if rest == t => {
                return Err(format!(
                    "'{s}' has no unit: write {num}ms or {num}s ({DURATION_EXAMPLES})"
                ))
            }
            "" => {
                return Err(format!(
                    "'{s}': '{num}' at the end has no unit ({DURATION_EXAMPLES})"
                ))
            }
            "ms" => 1e-3,
            "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            u => {
                return Err(format!(
                    "unknown duration unit '{u}' in '{s}' (ms, s, m, h; {DURATION_EXAMPLES})"
                ))
            }
        };
        secs += n * mult;
        rest = next;
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("'{s}' is too long"))
}

pub use ferry_migration::units::human;

/// A number with at most 2 decimals, without trailing zeros.
pub fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_i_is_binary_no_i_is_decimal() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("1Gi").unwrap(), 1 << 30);
        assert_eq!(parse_size("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("1GB").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("64MB").unwrap(), 64_000_000);
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("4096B").unwrap(), 4096);
        assert_eq!(parse_size("1.5 GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("1gib").unwrap(), 1 << 30);
    }

    #[test]
    fn sizes_refused_with_a_suggestion() {
        let e = parse_size("4096").unwrap_err();
        assert!(e.contains("no unit") && e.contains("4096MiB"), "{e}");
        let e = parse_size("3 parsecs").unwrap_err();
        assert!(e.contains("unknown size unit 'parsecs'"), "{e}");
        let e = parse_size("10Mb").unwrap_err();
        assert!(e.contains("bits or bytes") && e.contains("10MiB"), "{e}");
        let e = parse_size("64MB/s").unwrap_err();
        assert!(e.contains("is a rate"), "{e}");
        assert!(parse_size("lots").is_err());
        assert!(parse_size("-1GiB").is_err());
    }

    #[test]
    fn page_sizes_suggest_the_binary_reading() {
        assert_eq!(parse_pages("1GiB").unwrap().bytes, 1 << 30);
        let e = parse_pages("1GB").unwrap_err();
        assert!(
            e.contains("not a whole number of 4 KiB pages") && e.contains("did you mean 1GiB?"),
            "{e}"
        );
        let e = parse_pages("4M").unwrap_err();
        assert!(e.contains("did you mean 4MiB?"), "{e}");
        let z = parse_pages("256MB").unwrap();
        assert_eq!(z.bytes, 256_000_000);
        assert_eq!(z.binary_reading().as_deref(), Some("256MiB"));
        assert_eq!(parse_pages("256MiB").unwrap().binary_reading(), None);
        assert!(parse_pages("0GiB").is_err());
    }

    #[test]
    fn rates_bytes_and_bits() {
        assert_eq!(parse_rate("115MB/s").unwrap(), 115_000_000);
        assert_eq!(parse_rate("1MiB/s").unwrap(), 1 << 20);
        assert_eq!(parse_rate("1Gbit/s").unwrap(), 125_000_000);
        assert_eq!(parse_rate("64Mbit/s").unwrap(), 8_000_000);
        assert_eq!(parse_rate("100Mbps").unwrap(), 12_500_000);
        assert_eq!(parse_rate("0").unwrap(), 0);
        let e = parse_rate("64").unwrap_err();
        assert!(e.contains("no unit") && e.contains("64MB/s"), "{e}");
        let e = parse_rate("64MB").unwrap_err();
        assert!(e.contains("per second") && e.contains("64MB/s"), "{e}");
        let e = parse_rate("100Mb/s").unwrap_err();
        assert!(e.contains("100Mbit/s") && e.contains("100MB/s"), "{e}");
        let e = parse_rate("5 furlongs/s").unwrap_err();
        assert!(e.contains("furlongs") && e.contains("1Gbit/s"), "{e}");
    }

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("300ms").unwrap(), Duration::from_millis(300));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        let e = parse_duration("300").unwrap_err();
        assert!(e.contains("no unit") && e.contains("300ms"), "{e}");
        let e = parse_duration("1m30").unwrap_err();
        assert!(e.contains("no unit"), "{e}");
        assert!(parse_duration("5 fortnights").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn rendering() {
        assert_eq!(trim(2.50), "2.5");
        assert_eq!(trim(300.0), "300");
    }
}
