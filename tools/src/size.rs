//! Sizes as people write them: `512`, `4K`, `1G`, `1GiB`, `1.5T`, and `10%` where a whole is
//! known (the free space of a filesystem for `--size`). K, M, G, T, P are powers of 1024, with
//! or without a trailing `B` or `iB`.

pub fn parse_size(text: &str, whole: Option<u64>) -> Result<u64, String> {
    let t = text.trim();
    if let Some(pct) = t.strip_suffix('%') {
        let whole = whole.ok_or_else(|| format!("{text:?}: a percentage is not allowed here"))?;
        let p: f64 = pct
            .trim()
            .parse()
            .map_err(|_| format!("{text:?}: not a percentage"))?;
        if !(p > 0.0 && p <= 100.0) {
            return Err(format!(
                "{text:?}: a percentage must be above 0 and at most 100"
            ));
        }
        return Ok((whole as f64 * p / 100.0) as u64);
    }
    let lower = t.to_ascii_lowercase();
    let digits_end = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let (number, unit) = lower.split_at(digits_end);
    let unit = unit.trim();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(unit);
    let multiplier: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        "p" => 1 << 50,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit (use K, M, G, T, P, optionally with B or iB)"
            ))
        }
    };
    if number.is_empty() {
        return Err(format!("{text:?}: no number"));
    }
    if number.contains('.') {
        let v: f64 = number
            .parse()
            .map_err(|_| format!("{text:?}: not a number"))?;
        let bytes = v * multiplier as f64;
        if !(bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64) {
            return Err(format!("{text:?}: out of range"));
        }
        return Ok(bytes as u64);
    }
    let v: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: not a number"))?;
    v.checked_mul(multiplier)
        .ok_or_else(|| format!("{text:?}: too large"))
}

/// `45s`, `3m12s`, `2h05m`, `3d04h`: an elapsed time for messages.
pub fn span(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{:.1}s", ms as f64 / 1000.0),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// `1 GiB`, `512 MiB`, `4 KiB`, `100 B`: for messages.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else if v.fract() == 0.0 {
        format!("{} {}", v as u64, UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_as_people_write_them() {
        assert_eq!(span(0), "0.0s");
        assert_eq!(span(45_300), "45.3s");
        assert_eq!(span(192_000), "3m12s");
        assert_eq!(span(2 * 3_600_000 + 5 * 60_000), "2h05m");
        assert_eq!(span(3 * 86_400_000 + 4 * 3_600_000), "3d04h");
    }

    #[test]
    fn parses_the_forms_of_the_contract() {
        assert_eq!(parse_size("512", None), Ok(512));
        assert_eq!(parse_size("4K", None), Ok(4096));
        assert_eq!(parse_size("1G", None), Ok(1 << 30));
        assert_eq!(parse_size("1GiB", None), Ok(1 << 30));
        assert_eq!(parse_size("2gb", None), Ok(2 << 30));
        assert_eq!(parse_size("1.5K", None), Ok(1536));
        assert_eq!(parse_size("10%", Some(1000)), Ok(100));
        assert!(parse_size("10%", None).is_err());
        assert!(parse_size("1X", None).is_err());
        assert!(parse_size("", None).is_err());
        assert!(parse_size("99999999999P", None).is_err());
        assert_eq!(human(1 << 30), "1 GiB");
        assert_eq!(human(1536), "1.5 KiB");
    }
}
