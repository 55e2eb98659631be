//! Human sizes and durations for task spec files: `"2GiB"`, `"1.5G"`, `"90s"`, `"1h30m"`.
//!
//! Parsing is exact integer arithmetic (no floats), so `"1.5GiB"` is exactly 1610612736
//! bytes; a fraction of a byte or millisecond is rounded down. The formatters print values the
//! parsers read back, for error messages and `drover task show`.
//!
//! Size units (case-insensitive): none or `B` for bytes; `K`, `Ki`, `KiB` = 1024;
//! `M`, `Mi`, `MiB` = 1024²; `G`, `Gi`, `GiB` = 1024³; `T`, `Ti`, `TiB` = 1024⁴ — single
//! letters are binary, as in systemd, Docker and the JVM; `KB`, `MB`, `GB`, `TB` are decimal
//! (1000ⁿ). Duration units: `ms`, `s`, `m`, `h`, `d`, combinable (`"1h30m"`, `"2m 30s"`).

/// Why a string is not a size or a duration. Messages say what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("{0:?} is not a size; use e.g. 512MiB, 2GiB or a number of bytes")]
    NotASize(String),
    #[error("{0:?} is more than 16 EiB, the largest size drover can count")]
    SizeTooLarge(String),
    #[error("{0:?} is not a duration; use e.g. 90s, 30m, 1h30m or a number of milliseconds")]
    NotADuration(String),
    #[error(
        "{0:?} has no unit; write e.g. \"{0}s\" or \"{0}ms\", or the number without quotes \
         for milliseconds"
    )]
    DurationWithoutUnit(String),
    #[error("{0:?} is longer than drover can count in milliseconds")]
    DurationTooLarge(String),
}

const KIB: u128 = 1 << 10;

/// Bytes in `text`, e.g. `"512MiB"`, `"1.5G"`, `"100kB"`, `"4096"`.
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let not_a_size = || UnitError::NotASize(text.to_owned());
    let s = text.trim();
    let (number, rest) = split_number(s).ok_or_else(not_a_size)?;
    let unit = rest.trim_start().to_ascii_lowercase();
    let multiplier: u128 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => KIB,
        "m" | "mi" | "mib" => KIB.pow(2),
        "g" | "gi" | "gib" => KIB.pow(3),
        "t" | "ti" | "tib" => KIB.pow(4),
        "kb" => 1000,
        "mb" => 1000u128.pow(2),
        "gb" => 1000u128.pow(3),
        "tb" => 1000u128.pow(4),
        _ => return Err(not_a_size()),
    };
    let bytes = number.times(multiplier).ok_or_else(not_a_size)?;
    u64::try_from(bytes).map_err(|_| UnitError::SizeTooLarge(text.to_owned()))
}

/// Milliseconds in `text`, e.g. `"90s"`, `"30m"`, `"1h30m"`, `"1.5h"`, `"250ms"`.
pub fn parse_duration(text: &str) -> Result<u64, UnitError> {
    let not_a_duration = || UnitError::NotADuration(text.to_owned());
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(not_a_duration());
    }
    if rest.bytes().all(|b| b.is_ascii_digit()) {
        return Err(UnitError::DurationWithoutUnit(rest.to_owned()));
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let (number, after) = split_number(rest).ok_or_else(not_a_duration)?;
        let after = after.trim_start();
        let unit_len = after
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(after.len());
        let multiplier: u128 = match after[..unit_len].to_ascii_lowercase().as_str() {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(not_a_duration()),
        };
        total += number.times(multiplier).ok_or_else(not_a_duration)?;
        rest = after[unit_len..].trim_start();
    }
    u64::try_from(total).map_err(|_| UnitError::DurationTooLarge(text.to_owned()))
}

/// `0 B`, `512 B`, `2 GiB`, `1.5 GiB`: exact when the value is a whole number of its unit,
/// else one decimal (rounded down, so "free" figures never overstate).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut scale: u128 = 1;
    while unit + 1 < UNITS.len() && u128::from(bytes) >= scale * KIB {
        scale *= KIB;
        unit += 1;
    }
    let b = u128::from(bytes);
    if b % scale == 0 {
        format!("{} {}", b / scale, UNITS[unit])
    } else {
        let tenths = b * 10 / scale;
        format!("{}.{} {}", tenths / 10, tenths % 10, UNITS[unit])
    }
}

/// `0ms`, `250ms`, `1m30s`, `1h`, `2d3h`: the same units [`parse_duration`] reads.
pub fn format_duration(ms: u64) -> String {
    if ms == 0 {
        return "0ms".into();
    }
    let mut out = String::new();
    let mut rest = ms;
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
        ("ms", 1),
    ] {
        if rest >= size {
            out.push_str(&format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    out
}

/// A non-negative decimal number kept as integer and fraction digits.
#[derive(Debug, Clone, Copy)]
struct Decimal {
    int: u128,
    frac: u128,
    frac_digits: u32,
}

impl Decimal {
    /// `self × multiplier`, rounded down; `None` on overflow.
    fn times(self, multiplier: u128) -> Option<u128> {
        let whole = self.int.checked_mul(multiplier)?;
        let frac = self.frac.checked_mul(multiplier)? / 10u128.pow(self.frac_digits);
        whole.checked_add(frac)
    }
}

/// Split a leading `digits[.digits]` off `s`. At most 20 integer and 18 fraction digits, so
/// the arithmetic in [`Decimal::times`] cannot overflow u128 before the final range check.
fn split_number(s: &str) -> Option<(Decimal, &str)> {
    let int_len = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if int_len == 0 || int_len > 20 {
        return None;
    }
    let int: u128 = s[..int_len].parse().ok()?;
    let rest = &s[int_len..];
    let Some(after_dot) = rest.strip_prefix('.') else {
        return Some((
            Decimal {
                int,
                frac: 0,
                frac_digits: 0,
            },
            rest,
        ));
    };
    let frac_len = after_dot
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(after_dot.len());
    if frac_len == 0 || frac_len > 18 {
        return None;
    }
    let frac: u128 = after_dot[..frac_len].parse().ok()?;
    Some((
        Decimal {
            int,
            frac,
            frac_digits: frac_len as u32,
        },
        &after_dot[frac_len..],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let ok = [
            ("0", 0),
            ("4096", 4096),
            ("4096B", 4096),
            ("1K", 1024),
            ("2GiB", 2 << 30),
            ("2 GiB", 2 << 30),
            ("2gib", 2 << 30),
            ("512MiB", 512 << 20),
            ("512Mi", 512 << 20),
            ("1.5G", 3 << 29),
            ("1.5GiB", 1_610_612_736),
            ("100kB", 100_000),
            ("2GB", 2_000_000_000),
            ("1TiB", 1 << 40),
            ("0.5K", 512),
            ("0.3K", 307),
            (" 8GiB ", 8 << 30),
        ];
        for (text, want) in ok {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
        for bad in [
            "", "2 gigs", "GiB", "-1G", "1.G", ".5G", "1e9", "1,5G", "2GiBs", "1.5.5G",
        ] {
            assert_eq!(
                parse_size(bad),
                Err(UnitError::NotASize(bad.into())),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_size("20000000TiB"),
            Err(UnitError::SizeTooLarge("20000000TiB".into()))
        );
        assert_eq!(
            UnitError::NotASize("2 gigs".into()).to_string(),
            "\"2 gigs\" is not a size; use e.g. 512MiB, 2GiB or a number of bytes"
        );
    }

    #[test]
    fn durations() {
        let ok = [
            ("250ms", 250),
            ("90s", 90_000),
            ("30m", 1_800_000),
            ("1h30m", 5_400_000),
            ("1h 30m", 5_400_000),
            ("1.5h", 5_400_000),
            ("2d", 172_800_000),
            ("1m30s500ms", 90_500),
            ("0.5s", 500),
            ("0s", 0),
        ];
        for (text, want) in ok {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for bad in ["", "30 minutes", "1x", "h", "-5s", "1h-30m", "s30"] {
            assert_eq!(
                parse_duration(bad),
                Err(UnitError::NotADuration(bad.into())),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_duration("500"),
            Err(UnitError::DurationWithoutUnit("500".into()))
        );
        assert!(matches!(
            parse_duration("99999999999999999999d"),
            Err(UnitError::DurationTooLarge(_))
        ));
    }

    #[test]
    fn formatting_round_trips() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(2 << 30), "2 GiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size((64 << 20) + 1), "64.0 MiB");
        assert_eq!(format_size(u64::MAX), "16383.9 PiB");
        for ms in [0, 1, 999, 1000, 90_000, 5_400_000, 90_061_001] {
            assert_eq!(parse_duration(&format_duration(ms)), Ok(ms));
        }
        assert_eq!(format_duration(5_400_000), "1h30m");
        for bytes in [0u64, 512, 1024, 2 << 30, 1 << 40] {
            let text = format_size(bytes).replace(' ', "");
            assert_eq!(parse_size(&text), Ok(bytes));
        }
    }
}
