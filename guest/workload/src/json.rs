//! A writer for the one flat JSON object each workload prints.
//!
//! Every result is a single object of strings, integers, floats, booleans
//! and nulls, so a few dozen lines do the job of a serialization crate,
//! whose size every guest would otherwise copy under emulation.

use std::fmt::Write;

/// Builds one JSON object, keys in insertion order, on a single line.
pub struct Object {
    out: String,
}

impl Object {
    pub fn new() -> Object {
        Object {
            out: String::from("{"),
        }
    }

    fn key(&mut self, key: &str) {
        if self.out.len() > 1 {
            self.out.push(',');
        }
        escape_into(&mut self.out, key);
        self.out.push(':');
    }

    pub fn str(mut self, key: &str, value: &str) -> Object {
        self.key(key);
        escape_into(&mut self.out, value);
        self
    }

    pub fn u64(mut self, key: &str, value: u64) -> Object {
        self.key(key);
        // Writing into a String cannot fail.
        let _ = write!(self.out, "{value}");
        self
    }

    /// A float rounded to 6 decimals (nanoseconds for seconds, far below
    /// the noise for rates), so the lines stay readable. JSON has no NaN or
    /// infinity: those (a rate over a zero duration) become `null`.
    pub fn f64(mut self, key: &str, value: f64) -> Object {
        self.key(key);
        let rounded = (value * 1e6).round() / 1e6;
        if rounded.is_finite() {
            // Display never uses exponent notation, and prints integral
            // values without a fraction: both are valid JSON numbers.
            let _ = write!(self.out, "{rounded}");
        } else {
            self.out.push_str("null");
        }
        self
    }

    pub fn bool(mut self, key: &str, value: bool) -> Object {
        self.key(key);
        self.out.push_str(if value { "true" } else { "false" });
        self
    }

    /// The finished object, without a trailing newline.
    pub fn finish(mut self) -> String {
        self.out.push('}');
        self.out
    }
}

/// Appends `s` as a quoted JSON string: quote, backslash and every control
/// character escaped, everything else (valid UTF-8 already) as is.
pub fn escape_into(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escape(s: &str) -> String {
        let mut out = String::new();
        escape_into(&mut out, s);
        out
    }

    #[test]
    fn escaping() {
        assert_eq!(escape(""), r#""""#);
        assert_eq!(escape("plain /path"), r#""plain /path""#);
        assert_eq!(escape(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(escape("l1\nl2\r\t"), r#""l1\nl2\r\t""#);
        assert_eq!(escape("\u{8}\u{c}"), r#""\b\f""#);
        assert_eq!(escape("\u{0}\u{1f}\u{7f}"), "\"\\u0000\\u001f\u{7f}\"");
        // Non-ASCII stays as UTF-8, which JSON allows.
        assert_eq!(escape("héllo ✓"), "\"héllo ✓\"");
    }

    #[test]
    fn object() {
        let line = Object::new()
            .str("workload", "x\"y")
            .u64("n", 18_446_744_073_709_551_615)
            .f64("rate", 1_234.567_890_4)
            .f64("whole", 5.0)
            .f64("tiny", 0.000_000_4)
            .f64("bad", f64::NAN)
            .f64("inf", f64::INFINITY)
            .bool("ok", true)
            .bool("no", false)
            .finish();
        assert_eq!(
            line,
            r#"{"workload":"x\"y","n":18446744073709551615,"rate":1234.56789,"whole":5,"tiny":0,"bad":null,"inf":null,"ok":true,"no":false}"#
        );
        assert_eq!(Object::new().finish(), "{}");
    }
}
