//! CPU and memory quantities as people write them (`--cpu 0.5`, `--cpu 500m`, `--mem 2GiB`).
//!
//! The server counts CPU in millicores and memory in MiB; this module turns the spellings of
//! Kubernetes and of byte sizes into those units, for every flag and file field that takes a
//! size or a CPU amount.
//!
//! | CPU | means | | memory | means |
//! |---|---|---|---|---|
//! | `2`, `0.5` | cores (as in Kubernetes) | | `512` | MiB (a bare number) |
//! | `500m` | millicores | | `2GiB`, `2Gi`, `512MiB`, `64Ki` | binary units |
//! | | | | `1GB`, `1G`, `100MB`, `100M`, `4096B` | decimal units and bytes |
//!
//! Bytes are rounded up to whole MiB (a task needing 1.5 MiB needs 2), fractional millicores
//! are refused. A bare CPU number above [`MAX_BARE_CORES`] is refused with a hint, because
//! before units were accepted `--cpu` took millicores: `--cpu 1500` now says "write 1500m"
//! instead of silently asking for 1,500 cores.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};

/// The largest CPU amount accepted without a unit, in cores.
pub const MAX_BARE_CORES: f64 = 64.0;

const MIB: u128 = 1 << 20;

/// Parses a CPU amount into millicores: `2` (cores), `0.25` (cores), `250m` (millicores).
pub fn parse_cpu_milli(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("an empty CPU amount: write cores (2, 0.5) or millicores (500m)".into());
    }
    if let Some(m) = t.strip_suffix('m') {
        return m.trim().parse::<u64>().map_err(|_| {
            format!("{s:?} is not a CPU amount: millicores are a whole number, e.g. 500m")
        });
    }
    let cores: f64 = t.parse().map_err(|_| {
        format!("{s:?} is not a CPU amount: write cores (2, 0.5) or millicores (500m)")
    })?;
    if !cores.is_finite() || cores < 0.0 {
        return Err(format!("{s:?} is not a CPU amount: it must be zero or more"));
    }
    if cores > MAX_BARE_CORES {
        return Err(format!(
            "{s:?} would ask for {cores} cores; for millicores write {t}m (plain numbers are \
             cores, as in Kubernetes)"
        ));
    }
    let milli = cores * 1000.0;
    if (milli - milli.round()).abs() > 1e-6 {
        return Err(format!("{s:?} is finer than a millicore"));
    }
    Ok(milli.round() as u64)
}

/// Parses a memory amount into MiB, rounding bytes up: `512` (MiB), `2GiB`, `1G`, `64Ki`.
pub fn parse_mem_mib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || {
        format!(
            "{s:?} is not a memory size: write MiB (512) or a number with a unit (2GiB, 512Mi, \
             1G, 100MB)"
        )
    };
    if num.is_empty() {
        return Err(bad());
    }
    let unit_bytes: u128 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "mi" | "mib" => MIB,
        "b" => 1,
        "k" | "kb" => 1_000,
        "ki" | "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "gi" | "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "ti" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    // Exact arithmetic on the decimal digits: `1.5Gi` is 1536 MiB, not 1535.99.
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        return Err(bad());
    }
    let scale = 10u128.checked_pow(frac.len() as u32).ok_or_else(bad)?;
    let digits: u128 = format!("{int}{frac}").parse().map_err(|_| bad())?;
    let bytes_scaled =
        digits.checked_mul(unit_bytes).ok_or_else(|| format!("{s:?} is too large"))?;
    let mib = bytes_scaled.div_ceil(scale * MIB);
    u64::try_from(mib).map_err(|_| format!("{s:?} is too large"))
}

/// A CPU amount in a file: a number of cores or a string such as `"500m"`, as millicores.
pub fn deserialize_cpu_milli<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(QuantityVisitor { parse: parse_cpu_milli, what: "a CPU amount" })
}

/// A memory amount in a file: a number of MiB or a string such as `"2GiB"`, as MiB.
pub fn deserialize_mem_mib<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(QuantityVisitor { parse: parse_mem_mib, what: "a memory size" })
}

struct QuantityVisitor {
    parse: fn(&str) -> Result<u64, String>,
    what: &'static str,
}

impl Visitor<'_> for QuantityVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (a number or a string with a unit)", self.what)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        (self.parse)(&v.to_string()).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        (self.parse)(&v.to_string()).map_err(E::custom)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        (self.parse)(&v.to_string()).map_err(E::custom)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        (self.parse)(v).map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_takes_cores_and_millicores() {
        assert_eq!(parse_cpu_milli("2"), Ok(2000));
        assert_eq!(parse_cpu_milli("0.5"), Ok(500));
        assert_eq!(parse_cpu_milli("1.25"), Ok(1250));
        assert_eq!(parse_cpu_milli("500m"), Ok(500));
        assert_eq!(parse_cpu_milli(" 64 "), Ok(64_000));
        assert_eq!(parse_cpu_milli("0"), Ok(0));
    }

    #[test]
    fn cpu_refuses_what_it_cannot_mean() {
        for bad in ["", "two", "-1", "0.0005", "1.5m", "nan", "inf", "1e400"] {
            assert!(parse_cpu_milli(bad).is_err(), "{bad:?} accepted");
        }
        let e = parse_cpu_milli("1500").unwrap_err();
        assert!(e.contains("1500m"), "the old millicore spelling gets a hint: {e}");
    }

    #[test]
    fn memory_takes_mib_and_units() {
        assert_eq!(parse_mem_mib("512"), Ok(512));
        assert_eq!(parse_mem_mib("2GiB"), Ok(2048));
        assert_eq!(parse_mem_mib("2Gi"), Ok(2048));
        assert_eq!(parse_mem_mib("1.5gib"), Ok(1536));
        assert_eq!(parse_mem_mib("256Mi"), Ok(256));
        assert_eq!(parse_mem_mib("256 MiB"), Ok(256));
        assert_eq!(parse_mem_mib("1Ti"), Ok(1 << 20));
        assert_eq!(parse_mem_mib("1G"), Ok(954), "10^9 bytes, rounded up");
        assert_eq!(parse_mem_mib("100MB"), Ok(96));
        assert_eq!(parse_mem_mib("64Ki"), Ok(1));
        assert_eq!(parse_mem_mib("4096B"), Ok(1));
        assert_eq!(parse_mem_mib("0"), Ok(0));
    }

    #[test]
    fn memory_refuses_unknown_units_and_garbage() {
        for bad in ["", "GiB", "2 parsecs", "1.2.3G", "-5", "2XB", "."] {
            assert!(parse_mem_mib(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_mem_mib("99999999999999999999999Ti").is_err());
    }

    #[test]
    fn file_fields_take_numbers_and_strings() {
        #[derive(serde::Deserialize)]
        struct R {
            #[serde(deserialize_with = "deserialize_cpu_milli")]
            cpu: u64,
            #[serde(deserialize_with = "deserialize_mem_mib")]
            mem: u64,
        }
        let r: R = serde_json::from_str(r#"{"cpu": 0.5, "mem": "2GiB"}"#).unwrap();
        assert_eq!((r.cpu, r.mem), (500, 2048));
        let r: R = serde_json::from_str(r#"{"cpu": "250m", "mem": 64}"#).unwrap();
        assert_eq!((r.cpu, r.mem), (250, 64));
        let e = serde_json::from_str::<R>(r#"{"cpu": "lots", "mem": 1}"#).err().unwrap();
        assert!(e.to_string().contains("not a CPU amount"), "{e}");
    }
}
