//! Redaction: values at the policy's `redact` paths into a request's args and context,
//! masked for every outward view (cards, chat answers, CLI listings) as `[redacted]` and
//! for the audit trail as the SHA-256 of their canonical JSON — pure. The agent's own API
//! and webhooks carry the real values.

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{canonical_json, ApprovalRequest, RequestContext};

/// What views show in place of a redacted value.
pub const REDACTED: &str = "[redacted]";

/// One `redact` path: `args.card_number` or `context.customer.email`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedactPath {
    pub root: RedactRoot,
    /// Object keys below the root, at least one.
    pub keys: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedactRoot {
    Args,
    Context,
}

impl RedactPath {
    /// Parses `args.KEY[.KEY...]` or `context.KEY[.KEY...]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = text.split('.');
        let root = match parts.next() {
            Some("args") => RedactRoot::Args,
            Some("context") => RedactRoot::Context,
            _ => {
                return Err(format!(
                    "redact path {text:?} must start with args. or context."
                ))
            }
        };
        let keys: Vec<String> = parts.map(str::to_string).collect();
        if keys.is_empty() || keys.iter().any(|key| key.trim().is_empty()) {
            return Err(format!(
                "redact path {text:?} needs a field after its root, like args.card_number"
            ));
        }
        Ok(Self { root, keys })
    }
}

/// How a redacted value is replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mask {
    /// `[redacted]`: for people (cards, chat, CLI).
    Shown,
    /// `sha256:<hex>` of the value's RFC 8785 canonical JSON: for the audit trail, which
    /// can then still prove what was decided without holding it.
    Hashed,
}

impl Mask {
    fn replace(self, value: &Value) -> Value {
        match self {
            Mask::Shown => Value::String(REDACTED.into()),
            Mask::Hashed => Value::String(format!(
                "sha256:{}",
                hex::encode(Sha256::digest(canonical_json::to_canonical_vec(value)))
            )),
        }
    }
}

/// `value` (args, or the context as JSON) with every path under `root` masked.
pub fn mask_value(value: &Value, root: RedactRoot, paths: &[RedactPath], mask: Mask) -> Value {
    let mut masked = value.clone();
    for path in paths.iter().filter(|path| path.root == root) {
        mask_at(&mut masked, &path.keys, mask);
    }
    masked
}

/// Masks what `keys` names under `value`. A field name reaches through arrays into every
/// element (`args.items.card` masks each item's card); a number picks one element.
fn mask_at(value: &mut Value, keys: &[String], mask: Mask) {
    let Some((key, rest)) = keys.split_first() else {
        *value = mask.replace(value);
        return;
    };
    match value {
        Value::Object(fields) => {
            if let Some(child) = fields.get_mut(key) {
                mask_at(child, rest, mask);
            }
        }
        Value::Array(elements) => match key.parse::<usize>() {
            Ok(index) => {
                if let Some(element) = elements.get_mut(index) {
                    mask_at(element, rest, mask);
                }
            }
            Err(_) => {
                for element in elements {
                    mask_at(element, keys, mask);
                }
            }
        },
        _ => {}
    }
}

/// The context with every context path masked.
pub fn mask_context(context: &RequestContext, paths: &[RedactPath], mask: Mask) -> RequestContext {
    if !paths.iter().any(|path| path.root == RedactRoot::Context) {
        return context.clone();
    }
    let value = serde_json::to_value(context).unwrap_or(Value::Null);
    let masked = mask_value(&value, RedactRoot::Context, paths, mask);
    // A masked known field (`reversible`, `links`) no longer has its type: it moves to
    // the free-form fields, still masked, rather than failing to read back.
    serde_json::from_value(masked.clone()).unwrap_or_else(|_| RequestContext {
        extra: masked.as_object().cloned().unwrap_or_default(),
        ..RequestContext::default()
    })
}

/// `request` as people may see it: args (current, original, decided) and context masked.
pub fn mask_request(
    request: &ApprovalRequest,
    paths: &[RedactPath],
    mask: Mask,
) -> ApprovalRequest {
    let mut masked = request.clone();
    if paths.is_empty() {
        return masked;
    }
    masked.args = mask_value(&request.args, RedactRoot::Args, paths, mask);
    masked.original_args = mask_value(&request.original_args, RedactRoot::Args, paths, mask);
    masked.context = mask_context(&request.context, paths, mask);
    if let Some(decision) = masked.decision.as_mut() {
        decision.args = mask_value(&decision.args, RedactRoot::Args, paths, mask);
    }
    masked
}

/// Does `new_args` hold a value of its own at a redacted path (anything but `[redacted]`)?
/// Modifications may not: whether such a value equals the hidden one would show in the
/// answer (`args_unchanged`), letting an approver guess it.
pub fn sets_redacted_value(new_args: &Value, paths: &[RedactPath]) -> bool {
    mask_value(new_args, RedactRoot::Args, paths, Mask::Shown) != *new_args
}

/// New args an approver submitted, where `[redacted]` at a redacted path (what the modify
/// form showed them) keeps the value of `current` there.
pub fn restore_redacted(new_args: &Value, current: &Value, paths: &[RedactPath]) -> Value {
    let mut restored = new_args.clone();
    for path in paths.iter().filter(|path| path.root == RedactRoot::Args) {
        restore_at(&mut restored, current, &path.keys);
    }
    restored
}

/// Puts `current`'s value back wherever `new` holds `[redacted]` at `keys`, walking both
/// the way `mask_at` does (arrays element by element, by position).
fn restore_at(new: &mut Value, current: &Value, keys: &[String]) {
    let Some((key, rest)) = keys.split_first() else {
        if new.as_str() == Some(REDACTED) {
            *new = current.clone();
        }
        return;
    };
    match (new, current) {
        (Value::Object(new_fields), Value::Object(current_fields)) => {
            if let (Some(new_child), Some(current_child)) =
                (new_fields.get_mut(key), current_fields.get(key))
            {
                restore_at(new_child, current_child, rest);
            }
        }
        (Value::Array(new_elements), Value::Array(current_elements)) => {
            match key.parse::<usize>() {
                Ok(index) => {
                    if let (Some(new_element), Some(current_element)) =
                        (new_elements.get_mut(index), current_elements.get(index))
                    {
                        restore_at(new_element, current_element, rest);
                    }
                }
                Err(_) => {
                    for (new_element, current_element) in
                        new_elements.iter_mut().zip(current_elements)
                    {
                        restore_at(new_element, current_element, keys);
                    }
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn paths(texts: &[&str]) -> Vec<RedactPath> {
        texts
            .iter()
            .map(|text| RedactPath::parse(text).unwrap())
            .collect()
    }

    #[test]
    fn paths_parse_or_say_why_not() {
        let table = [
            ("args.card_number", true),
            ("context.customer.email", true),
            ("args", false),
            ("args.", false),
            ("args..x", false),
            ("body.x", false),
            ("", false),
        ];
        for (text, valid) in table {
            assert_eq!(RedactPath::parse(text).is_ok(), valid, "{text}");
        }
    }

    #[test]
    fn paths_reach_through_arrays() {
        let redact = paths(&["args.items.card", "args.contacts.1"]);
        let args = json!({
            "items": [{"card": "4111", "sku": "a"}, {"card": "5500", "sku": "b"}, "plain"],
            "contacts": ["first@example.com", "second@example.com"],
        });
        let shown = mask_value(&args, RedactRoot::Args, &redact, Mask::Shown);
        assert_eq!(
            shown,
            json!({
                "items": [{"card": "[redacted]", "sku": "a"}, {"card": "[redacted]", "sku": "b"}, "plain"],
                "contacts": ["first@example.com", "[redacted]"],
            })
        );
        assert_eq!(restore_redacted(&shown, &args, &redact), args);
    }

    #[test]
    fn masks_only_the_named_values() {
        let redact = paths(&["args.card_number", "args.customer.email", "args.missing.x"]);
        let args = json!({
            "card_number": "4111111111111111",
            "amount": 5,
            "customer": {"email": "a@b.c", "name": "Ann"},
        });
        let shown = mask_value(&args, RedactRoot::Args, &redact, Mask::Shown);
        assert_eq!(
            shown,
            json!({
                "card_number": "[redacted]",
                "amount": 5,
                "customer": {"email": "[redacted]", "name": "Ann"},
            })
        );
        let hashed = mask_value(&args, RedactRoot::Args, &redact, Mask::Hashed);
        let expected = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(
                serde_json_canonicalizer::to_vec(&json!("4111111111111111")).unwrap()
            ))
        );
        assert_eq!(hashed["card_number"], json!(expected));
        assert_eq!(hashed["amount"], json!(5));
        assert!(!hashed.to_string().contains("a@b.c"));
    }

    #[test]
    fn context_paths_mask_known_and_free_fields() {
        let redact = paths(&["context.customer.email", "context.summary"]);
        let context: RequestContext = serde_json::from_value(json!({
            "summary": "refund for a@b.c",
            "customer": {"email": "a@b.c", "tier": "vip"},
        }))
        .unwrap();
        let masked = mask_context(&context, &redact, Mask::Shown);
        assert_eq!(masked.summary.as_deref(), Some(REDACTED));
        assert_eq!(
            masked.extra["customer"],
            json!({"email": "[redacted]", "tier": "vip"})
        );
    }

    #[test]
    fn a_submitted_placeholder_keeps_the_original_value() {
        let redact = paths(&["args.card_number"]);
        let current = json!({"card_number": "4111", "amount": 5});
        let table = [
            (
                json!({"card_number": "[redacted]", "amount": 7}),
                json!({"card_number": "4111", "amount": 7}),
            ),
            (
                json!({"card_number": "5555", "amount": 5}),
                json!({"card_number": "5555", "amount": 5}),
            ),
            (json!({"amount": 5}), json!({"amount": 5})),
        ];
        for (submitted, expected) in table {
            assert_eq!(restore_redacted(&submitted, &current, &redact), expected);
        }
    }

    #[test]
    fn a_modification_may_keep_or_drop_a_redacted_value_but_not_set_one() {
        let redact = paths(&["args.card_number", "args.items.pan"]);
        let table = [
            (json!({"card_number": "[redacted]", "amount": 7}), false),
            (json!({"amount": 7}), false),
            (json!({"items": [{"pan": "[redacted]"}, {"sku": 1}]}), false),
            (json!({"card_number": "4111", "amount": 5}), true),
            (json!({"card_number": null}), true),
            (
                json!({"items": [{"pan": "[redacted]"}, {"pan": "5555"}]}),
                true,
            ),
        ];
        for (submitted, sets) in table {
            assert_eq!(
                sets_redacted_value(&submitted, &redact),
                sets,
                "{submitted}"
            );
        }
    }
}
