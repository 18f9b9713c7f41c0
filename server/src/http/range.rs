//! The `Range` request header (RFC 9110 §14), single byte ranges only.
//!
//! Every number is parsed with saturating arithmetic, so a value too large for `u64` cannot wrap
//! (the nginx CVE-2017-7529 class): a huge first position is past the end (416), a huge last
//! position is clamped to the last byte, a huge suffix means the whole file. Signs, spaces inside
//! numbers and reversed ranges make the header invalid, and an invalid header is ignored (200 with
//! the whole body), as RFC 9110 allows. More than one range is answered 200 with the whole body
//! too (allowed, never wrong, and it avoids multipart amplification).

/// What to send for a `Range` header against a representation of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ranged {
    /// No usable range: the whole body, 200.
    Full,
    /// Bytes `start..=end` (inclusive, `end < size`), 206.
    Part { start: u64, end: u64 },
    /// 416 with `Content-Range: bytes */size`.
    Unsatisfiable,
}

/// A run of ASCII digits as a saturating `u64`; `None` if empty or anything else is in it.
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().fold(0u64, |v, b| {
        v.saturating_mul(10).saturating_add(u64::from(b - b'0'))
    }))
}

/// Interprets a `Range` header value (`None`: no header) for a body of `size` bytes.
pub fn resolve(header: Option<&str>, size: u64) -> Ranged {
    let Some(h) = header else {
        return Ranged::Full;
    };
    let h = h.trim();
    let Some((unit, set)) = h.split_once('=') else {
        return Ranged::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return Ranged::Full; // unknown range unit: ignored
    }
    let mut specs = set.split(',').map(str::trim).filter(|s| !s.is_empty());
    let (Some(spec), None) = (specs.next(), specs.next()) else {
        return Ranged::Full; // empty or several ranges: whole body
    };
    let Some((first, last)) = spec.split_once('-') else {
        return Ranged::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // Suffix range: the last n bytes.
        let Some(n) = number(last) else {
            return Ranged::Full;
        };
        if n == 0 || size == 0 {
            return Ranged::Unsatisfiable;
        }
        return Ranged::Part {
            start: size - n.min(size),
            end: size - 1,
        };
    }
    let Some(start) = number(first) else {
        return Ranged::Full;
    };
    let end = if last.is_empty() {
        u64::MAX
    } else {
        match number(last) {
            Some(e) if e >= start => e,
            _ => return Ranged::Full, // malformed or reversed: invalid, ignored
        }
    };
    if start >= size {
        return Ranged::Unsatisfiable;
    }
    Ranged::Part {
        start,
        end: end.min(size - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::Ranged::{Full, Part, Unsatisfiable};
    use super::*;

    #[test]
    fn the_three_forms() {
        assert_eq!(
            resolve(Some("bytes=0-99"), 1000),
            Part { start: 0, end: 99 }
        );
        assert_eq!(
            resolve(Some("bytes=500-"), 1000),
            Part {
                start: 500,
                end: 999
            }
        );
        assert_eq!(
            resolve(Some("bytes=-100"), 1000),
            Part {
                start: 900,
                end: 999
            }
        );
        assert_eq!(
            resolve(Some("bytes=999-999"), 1000),
            Part {
                start: 999,
                end: 999
            }
        );
        assert_eq!(
            resolve(Some(" Bytes = 1-2 "), 1000),
            Part { start: 1, end: 2 }
        );
        assert_eq!(resolve(None, 1000), Full);
    }

    #[test]
    fn clamping_and_unsatisfiable() {
        assert_eq!(
            resolve(Some("bytes=900-5000"), 1000),
            Part {
                start: 900,
                end: 999
            }
        );
        assert_eq!(
            resolve(Some("bytes=-5000"), 1000),
            Part { start: 0, end: 999 }
        );
        assert_eq!(resolve(Some("bytes=1000-"), 1000), Unsatisfiable);
        assert_eq!(resolve(Some("bytes=1000-2000"), 1000), Unsatisfiable);
        assert_eq!(resolve(Some("bytes=-0"), 1000), Unsatisfiable);
        assert_eq!(resolve(Some("bytes=0-"), 0), Unsatisfiable);
        assert_eq!(resolve(Some("bytes=-5"), 0), Unsatisfiable);
    }

    #[test]
    fn overflow_cannot_wrap() {
        let huge = "99999999999999999999999999999999999999";
        assert_eq!(
            resolve(Some(&format!("bytes={huge}-")), 1000),
            Unsatisfiable
        );
        assert_eq!(
            resolve(Some(&format!("bytes=0-{huge}")), 1000),
            Part { start: 0, end: 999 }
        );
        assert_eq!(
            resolve(Some(&format!("bytes=-{huge}")), 1000),
            Part { start: 0, end: 999 }
        );
        // nginx CVE-2017-7529 shape: a suffix so large that start would go negative.
        assert_eq!(
            resolve(Some("bytes=-9223372036854773000"), 1000),
            Part { start: 0, end: 999 }
        );
        assert_eq!(
            resolve(
                Some("bytes=18446744073709551615-18446744073709551615"),
                u64::MAX
            ),
            Unsatisfiable
        );
        assert_eq!(
            resolve(Some("bytes=0-18446744073709551616"), u64::MAX),
            Part {
                start: 0,
                end: u64::MAX - 1
            }
        );
    }

    #[test]
    fn invalid_or_multiple_is_the_whole_body() {
        for h in [
            "bytes=--5",
            "bytes=-5-10",
            "bytes=+5-10",
            "bytes=5-+10",
            "bytes=10-5",
            "bytes=a-b",
            "bytes=1 0-20",
            "bytes=",
            "bytes=,",
            "bytes=5",
            "items=0-5",
            "0-5",
            "bytes=0-1,2-3",
            "bytes=0-1, -1",
            "bytes=-1,0-0,1-1,2-2",
        ] {
            assert_eq!(resolve(Some(h), 1000), Full, "{h}");
        }
        // Empty list elements are allowed around a single range.
        assert_eq!(
            resolve(Some("bytes=,0-1,"), 1000),
            Part { start: 0, end: 1 }
        );
    }

    #[test]
    fn any_header_gives_a_range_inside_the_file() {
        // Exhaustive over small numbers and sizes: a Part always lies inside the body.
        for size in 0..20u64 {
            for a in ["", "0", "1", "5", "19", "20", "25"] {
                for b in ["", "0", "1", "5", "19", "20", "25"] {
                    let h = format!("bytes={a}-{b}");
                    if let Part { start, end } = resolve(Some(&h), size) {
                        assert!(start <= end && end < size, "{h} on {size}");
                    }
                }
            }
        }
    }
}
