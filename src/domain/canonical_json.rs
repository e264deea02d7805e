//! RFC 8785 canonical JSON of `serde_json` values, written straight into a byte buffer:
//! the bytes that audit hashes and action hashes are taken over.
//!
//! Every request hashes its action and its `created` audit event, so this is on the intake
//! path. `serde_json_canonicalizer` gives the same bytes but re-parses every object key to
//! sort it; here keys are compared in place. Its number formatting (ECMAScript's) is still
//! used for the rare number that is not a small integer, so the two agree byte for byte.

use std::cmp::Ordering;

use serde_json::{Number, Value};

/// The canonical form of `value`.
pub fn to_canonical_vec(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    write_value(&mut out, value);
    out
}

/// Appends the canonical form of `value`.
pub fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(number) => write_number(out, number),
        Value::String(text) => write_string(out, text),
        Value::Array(items) => {
            out.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|(first, _), (second, _)| utf16_order(first, second));
            out.push(b'{');
            for (index, (key, item)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_string(out, key);
                out.push(b':');
                write_value(out, item);
            }
            out.push(b'}');
        }
    }
}

/// Appends `text` as a JSON string. serde_json escapes exactly as RFC 8785 §3.2.2.2 asks:
/// `"` and `\`, control characters as `\b \t \n \f \r` or `\u00xx`, nothing else.
pub fn write_string(out: &mut Vec<u8>, text: &str) {
    // Writing into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// Numbers as ECMAScript prints the nearest double (RFC 8785 §3.2.2.3). For integers a
/// double holds exactly, that is their digits.
fn write_number(out: &mut Vec<u8>, number: &Number) {
    const EXACT_IN_A_DOUBLE: u64 = 1 << 53;
    match number.as_i64() {
        Some(integer) if integer.unsigned_abs() <= EXACT_IN_A_DOUBLE => {
            out.extend_from_slice(itoa::Buffer::new().format(integer).as_bytes());
        }
        // A `Number` is finite, so this cannot fail.
        _ => out.extend(serde_json_canonicalizer::to_vec(number).unwrap_or_default()),
    }
}

/// Object keys sort by their UTF-16 code units. UTF-8 byte order is code point order,
/// which differs only where a character above U+FFFF meets one in U+E000..=U+FFFF.
fn utf16_order(first: &str, second: &str) -> Ordering {
    if first.is_ascii() && second.is_ascii() {
        first.cmp(second)
    } else {
        first.encode_utf16().cmp(second.encode_utf16())
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    use super::*;

    fn reference(value: &Value) -> String {
        String::from_utf8(serde_json_canonicalizer::to_vec(value).expect("canonical"))
            .expect("utf-8")
    }

    fn canonical(value: &Value) -> String {
        String::from_utf8(to_canonical_vec(value)).expect("utf-8")
    }

    #[test]
    fn matches_the_reference_canonicalizer_on_edge_cases() {
        for value in [
            json!(null),
            json!(true),
            json!({}),
            json!([]),
            json!(""),
            json!(0),
            json!(-0.0),
            json!(1.0),
            json!(0.1),
            json!(1e21),
            json!(1e-7),
            json!(5e-324),
            json!(123456789.125),
            json!(i64::MIN),
            json!(u64::MAX),
            json!(9_007_199_254_740_992_i64),
            json!(-9_007_199_254_740_992_i64),
            json!(9_007_199_254_740_993_u64),
            json!("\u{0}\u{7}\u{8}\t\n\u{b}\u{c}\r\u{1f} \u{7f}\"\\/é€😀"),
            json!({"b": 1, "a": 2, "": 3, "A": 4, "aa": 5}),
            json!({"\u{e000}": 1, "\u{1f600}": 2, "\u{ffff}": 3, "z": 4, "é": 5}),
            json!({"nested": {"y": [1, {"d": null, "c": [true, false]}], "x": "\n"}}),
            json!([[], {}, [[]], {"": {}}]),
        ] {
            assert_eq!(canonical(&value), reference(&value), "{value}");
        }
    }

    #[test]
    fn keys_sort_by_utf16_code_units() {
        // U+1F600 is D83D DE00 in UTF-16, so it sorts before U+E000, unlike in UTF-8.
        assert_eq!(
            canonical(&json!({"\u{e000}": 1, "\u{1f600}": 2})),
            "{\"\u{1f600}\":2,\"\u{e000}\":1}"
        );
    }

    fn random_string(random: &mut StdRng) -> String {
        const PIECES: &[&str] = &[
            "a", "b", "Z", "0", " ", "\"", "\\", "/", "\n", "\u{1}", "\u{1f}", "\u{7f}", "é",
            "\u{e000}", "\u{ffff}", "😀", "日",
        ];
        (0..random.gen_range(0..6))
            .map(|_| PIECES[random.gen_range(0..PIECES.len())])
            .collect()
    }

    fn random_value(random: &mut StdRng, depth: u32) -> Value {
        let kinds = if depth == 0 { 6 } else { 8 };
        match random.gen_range(0..kinds) {
            0 => Value::Null,
            1 => Value::Bool(random.gen()),
            2 => json!(random.gen::<i64>() >> random.gen_range(0..64)),
            3 => json!(random.gen::<f64>() * 10f64.powi(random.gen_range(-30..30))),
            4 => json!(random.gen::<u64>()),
            5 => Value::String(random_string(random)),
            6 => Value::Array(
                (0..random.gen_range(0..4))
                    .map(|_| random_value(random, depth - 1))
                    .collect(),
            ),
            _ => Value::Object(
                (0..random.gen_range(0..5))
                    .map(|_| (random_string(random), random_value(random, depth - 1)))
                    .collect(),
            ),
        }
    }

    #[test]
    fn matches_the_reference_canonicalizer_on_random_values() {
        let mut random = StdRng::seed_from_u64(8785);
        for _ in 0..2_000 {
            let value = random_value(&mut random, 4);
            assert_eq!(canonical(&value), reference(&value), "{value}");
        }
    }
}
