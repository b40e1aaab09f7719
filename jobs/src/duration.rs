//! Durations as users write them in a spec: `"500ms"`, `"30s"`, `"10m"`, `"2h"`, `"1d"`, or
//! several of them run together, `"1h30m"`. Stored as whole milliseconds.

/// The accepted forms, for messages.
pub(crate) const FORMS: &str =
    "e.g. \"500ms\", \"30s\", \"10m\", \"2h\" or \"1h30m\"; units ms, s, m, h, d";

const UNITS: &[(&str, u64)] = &[
    ("d", 24 * 60 * 60 * 1000),
    ("h", 60 * 60 * 1000),
    ("m", 60 * 1000),
    ("s", 1000),
    ("ms", 1),
];

/// Parses a duration string to milliseconds. The error says what is wrong with the text,
/// without the field or the accepted forms (callers add both).
pub fn parse_ms(text: &str) -> Result<u64, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{text:?} has no unit; write \"{s}s\" for seconds or \"{s}ms\" for milliseconds"
        ));
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "{text:?} is not a duration: expected a number at {rest:?}"
            ));
        }
        let (number, after) = rest.split_at(digits);
        if after.starts_with(['.', ',']) {
            return Err(format!(
                "{text:?}: fractions are not accepted; combine units instead, e.g. \"1h30m\" or \"1500ms\""
            ));
        }
        let letters = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(letters);
        let Some(&(_, scale)) = UNITS.iter().find(|(u, _)| *u == unit) else {
            return Err(if unit.is_empty() {
                format!("{text:?}: the number {number} has no unit")
            } else {
                format!("{text:?}: unknown unit {unit:?}")
            });
        };
        let too_long = || format!("{text:?} is too long");
        let value: u64 = number.parse().map_err(|_| too_long())?;
        total = value
            .checked_mul(scale)
            .and_then(|ms| total.checked_add(ms))
            .ok_or_else(too_long)?;
        rest = after;
    }
    Ok(total)
}

/// Milliseconds the way [`parse_ms`] reads them, in the largest units: `"1h30m"`, `"500ms"`,
/// `"0s"`.
pub(crate) fn format_ms(ms: u64) -> String {
    if ms == 0 {
        return "0s".to_owned();
    }
    let mut rest = ms;
    let mut out = String::new();
    for &(unit, scale) in UNITS {
        let n = rest / scale;
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
            rest %= scale;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let cases: &[(&str, u64)] = &[
            ("500ms", 500),
            ("30s", 30_000),
            ("10m", 600_000),
            ("2h", 7_200_000),
            ("1d", 86_400_000),
            ("1h30m", 5_400_000),
            ("1m30s250ms", 90_250),
            (" 0s ", 0),
            ("90m", 5_400_000),
        ];
        for &(text, want) in cases {
            assert_eq!(parse_ms(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn says_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            ("", "must not be empty"),
            (
                "30",
                "\"30\" has no unit; write \"30s\" for seconds or \"30ms\"",
            ),
            ("1.5h", "fractions are not accepted"),
            ("10min", "unknown unit \"min\""),
            ("10 m", "the number 10 has no unit"),
            ("-5s", "expected a number at \"-5s\""),
            ("s", "expected a number"),
            ("1h30", "the number 30 has no unit"),
            ("99999999999999999999s", "too long"),
            ("999999999999d", "too long"),
        ];
        for &(text, want) in cases {
            let got = parse_ms(text).expect_err(text);
            assert!(got.contains(want), "{text}: {got:?} lacks {want:?}");
        }
    }

    #[test]
    fn formats_in_the_largest_units() {
        let cases: &[(u64, &str)] = &[
            (0, "0s"),
            (500, "500ms"),
            (1_500, "1s500ms"),
            (120_000, "2m"),
            (5_400_000, "1h30m"),
            (604_800_000, "7d"),
        ];
        for &(ms, want) in cases {
            assert_eq!(format_ms(ms), want);
            assert_eq!(parse_ms(want), Ok(ms));
        }
    }
}
