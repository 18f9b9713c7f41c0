//! Human byte sizes for `--block-size` and the config: `4MiB`, `512KiB`, `1GiB` or plain bytes.
//!
//! Only binary units are accepted. bytesize reads `4M` and `4MB` as 4,000,000 bytes, which is
//! never a sensible block size and is an easy mistake, so decimal units are refused with a hint.

use bytesize::ByteSize;
use ferry_common::proto::{BLOCK_MAX, BLOCK_MIN};

/// Parses a size with an optional binary unit (B, KiB, MiB, GiB, TiB; case-insensitive).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let unit_at = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(unit_at);
    let unit = unit.trim();
    if num.is_empty() {
        return Err(format!("size {text:?}: expected a number like 4MiB"));
    }
    let lower = unit.to_ascii_lowercase();
    let binary = matches!(lower.as_str(), "" | "b" | "kib" | "mib" | "gib" | "tib");
    if !binary {
        return Err(format!(
            "size {text:?}: use a binary unit (B, KiB, MiB, GiB), e.g. 4MiB; decimal units like MB are not accepted"
        ));
    }
    if lower.is_empty() || lower == "b" {
        return num
            .parse::<u64>()
            .map_err(|_| format!("size {text:?}: whole bytes expected"));
    }
    t.parse::<ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("size {text:?}: {e}"))
}

/// Parses and range-checks a block size (64 KiB ..= 64 MiB, the protocol's limits).
pub fn parse_block_size(text: &str) -> Result<u32, String> {
    let n = parse_size(text)?;
    check_block_size(n).map_err(|e| format!("block size {text:?}: {e}"))
}

pub fn check_block_size(n: u64) -> Result<u32, String> {
    if n < u64::from(BLOCK_MIN) || n > BLOCK_MAX {
        return Err(format!("{n} bytes is outside 64KiB ..= 64MiB"));
    }
    Ok(n as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_units_parse() {
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("4 MiB"), Ok(4 << 20));
        assert_eq!(parse_size("64kib"), Ok(64 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5MiB"), Ok(3 << 19));
        assert_eq!(parse_size("12345"), Ok(12345));
        assert_eq!(parse_size("7B"), Ok(7));
    }

    #[test]
    fn decimal_and_garbage_are_refused() {
        for bad in ["4MB", "4M", "4k", "4 KB", "", "MiB", "four", "-1MiB", "1.5"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_size("4MB").unwrap_err().contains("binary unit"));
    }

    #[test]
    fn block_size_limits() {
        assert_eq!(parse_block_size("64KiB"), Ok(65536));
        assert_eq!(parse_block_size("64MiB"), Ok(64 << 20));
        assert!(parse_block_size("63KiB").is_err());
        assert!(parse_block_size("65MiB").is_err());
        assert!(parse_block_size("1GiB").is_err());
    }
}
