//! The tamper-evident audit trail: event hashing, chain verification and JSON Lines export.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::domain::{canonical_json, AuditKind};

/// `prev_hash` of the first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An event about to be appended: the store assigns `seq`, `prev_hash` and `hash`.
#[derive(Clone, Debug, PartialEq)]
pub struct NewAuditEvent {
    pub at: DateTime<Utc>,
    pub request_id: Option<String>,
    pub kind: AuditKind,
    pub actor: String,
    pub payload: Value,
}

/// A stored, chained event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub seq: i64,
    pub at: DateTime<Utc>,
    pub request_id: Option<String>,
    pub kind: String,
    pub actor: String,
    pub payload: Value,
    pub prev_hash: String,
    pub hash: String,
}

/// hex(SHA-256(prev_hash || canonical JSON of the event's content)).
pub fn link_hash(
    prev_hash: &str,
    seq: i64,
    at: &DateTime<Utc>,
    request_id: Option<&str>,
    kind: &str,
    actor: &str,
    payload: &Value,
) -> String {
    hash_link(
        prev_hash,
        &canonical_prefix(at, request_id, kind, actor, payload),
        seq,
    )
}

/// The canonical JSON (RFC 8785) of an event's content up to its sequence number. Keys
/// sort, and `seq` sorts last, so the whole is this prefix, the number and `}`: the costly
/// part can be worked out before the event's place in the chain is known.
fn canonical_prefix(
    at: &DateTime<Utc>,
    request_id: Option<&str>,
    kind: &str,
    actor: &str,
    payload: &Value,
) -> Vec<u8> {
    // The keys in canonical order: actor, at, kind, payload, request_id, (seq).
    let mut canonical = Vec::with_capacity(256);
    canonical.extend_from_slice(br#"{"actor":"#);
    canonical_json::write_string(&mut canonical, actor);
    canonical.extend_from_slice(br#","at":"#);
    canonical_json::write_string(
        &mut canonical,
        &at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    );
    canonical.extend_from_slice(br#","kind":"#);
    canonical_json::write_string(&mut canonical, kind);
    canonical.extend_from_slice(br#","payload":"#);
    canonical_json::write_value(&mut canonical, payload);
    canonical.extend_from_slice(br#","request_id":"#);
    match request_id {
        Some(id) => canonical_json::write_string(&mut canonical, id),
        None => canonical.extend_from_slice(b"null"),
    }
    canonical.extend_from_slice(br#","seq":"#);
    canonical
}

fn hash_link(prev_hash: &str, canonical_prefix: &[u8], seq: i64) -> String {
    let mut hasher = Sha256::new();
    hasher.update(prev_hash.as_bytes());
    hasher.update(canonical_prefix);
    hasher.update(seq.to_string().as_bytes());
    hasher.update(b"}");
    hex::encode(hasher.finalize())
}

/// An event whose serialisations are done: what remains is its place in the chain, which
/// only the store knows, under its append lock. Preparing outside that lock keeps the
/// serial part of a commit short.
#[derive(Debug)]
pub struct PreparedAuditEvent {
    pub event: NewAuditEvent,
    /// The payload as stored.
    pub payload_json: Box<RawValue>,
    canonical_prefix: Vec<u8>,
}

/// An event's place in the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainLink {
    pub seq: i64,
    pub prev_hash: String,
    pub hash: String,
}

impl PreparedAuditEvent {
    /// The link that puts this event at `seq`, after the event whose hash is `prev_hash`.
    pub fn link(&self, seq: i64, prev_hash: String) -> ChainLink {
        let hash = hash_link(&prev_hash, &self.canonical_prefix, seq);
        ChainLink {
            seq,
            prev_hash,
            hash,
        }
    }
}

impl NewAuditEvent {
    pub fn prepare(self) -> PreparedAuditEvent {
        let canonical_prefix = canonical_prefix(
            &self.at,
            self.request_id.as_deref(),
            self.kind.as_str(),
            &self.actor,
            &self.payload,
        );
        let payload_json = serde_json::value::to_raw_value(&self.payload)
            .unwrap_or_else(|_| RawValue::NULL.to_owned());
        PreparedAuditEvent {
            event: self,
            payload_json,
            canonical_prefix,
        }
    }

    pub fn seal(self, seq: i64, prev_hash: String) -> AuditEvent {
        let prepared = self.prepare();
        let ChainLink {
            seq,
            prev_hash,
            hash,
        } = prepared.link(seq, prev_hash);
        let event = prepared.event;
        AuditEvent {
            seq,
            at: event.at,
            request_id: event.request_id,
            kind: event.kind.to_string(),
            actor: event.actor,
            payload: event.payload,
            prev_hash,
            hash,
        }
    }
}

/// Where a chain stops being trustworthy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("audit chain broken at seq {seq}: {problem}")]
pub struct ChainBreak {
    pub seq: i64,
    pub problem: String,
}

/// The last event's place in the chain, as `audit head` prints it, to be kept outside the
/// database: a chain cut short, or rewritten from some event on and rehashed, still links,
/// but no longer holds this. An empty trail's head is `{"seq":0,"hash":GENESIS_HASH}`,
/// which every trail holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditHead {
    pub seq: i64,
    pub hash: String,
}

impl AuditHead {
    pub fn genesis() -> Self {
        Self {
            seq: 0,
            hash: GENESIS_HASH.to_string(),
        }
    }

    /// Reads a head as `audit head` printed it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let head: Self = serde_json::from_str(text).map_err(|error| {
            format!("{error} (expected {{\"seq\":N,\"hash\":\"<64 hex digits>\"}}, as `audit head` prints)")
        })?;
        if head.seq < 0 {
            return Err(format!("seq {} is negative", head.seq));
        }
        let is_sha256_hex = head.hash.len() == 64
            && head
                .hash
                .bytes()
                .all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'));
        if !is_sha256_hex {
            return Err(format!(
                "hash {:?} is not 64 lowercase hex digits",
                head.hash
            ));
        }
        if head.seq == 0 && head.hash != GENESIS_HASH {
            return Err("seq 0 (an empty trail) goes with the genesis hash, 64 zeros".into());
        }
        Ok(head)
    }

    /// Whether the trail still holds this head, given its event at `self.seq` (the first
    /// with a greater or equal seq, if any) and its last seq. `Err` names `self.seq`.
    pub fn check(&self, event: Option<&AuditEvent>, last_seq: i64) -> Result<(), ChainBreak> {
        if self.seq == 0 {
            return Ok(());
        }
        match event.filter(|event| event.seq == self.seq) {
            None => Err(ChainBreak {
                seq: self.seq,
                problem: format!(
                    "event {} of the saved head is missing: the trail ends at seq {last_seq} (cut short)",
                    self.seq
                ),
            }),
            Some(event) if event.hash != self.hash => Err(ChainBreak {
                seq: self.seq,
                problem: format!(
                    "event {} no longer carries the saved head's hash: the chain was rewritten at or before it",
                    self.seq
                ),
            }),
            Some(_) => Ok(()),
        }
    }
}

/// Walks events in `seq` order, checking each link. Returns how many events were verified.
#[derive(Default)]
pub struct ChainVerifier {
    previous_hash: Option<String>,
    previous_seq: Option<i64>,
    verified: u64,
}

impl ChainVerifier {
    pub fn check(&mut self, event: &AuditEvent) -> Result<(), ChainBreak> {
        let broken_at = |seq: i64, problem: String| ChainBreak { seq, problem };
        let expected_previous = self.previous_hash.as_deref().unwrap_or(GENESIS_HASH);
        let previous_seq = self.previous_seq.unwrap_or(0);
        {
            if event.seq != previous_seq + 1 {
                // The first bad sequence number is the one that is missing.
                return Err(broken_at(
                    previous_seq + 1,
                    format!(
                        "event {} is missing (the next is {})",
                        previous_seq + 1,
                        event.seq
                    ),
                ));
            }
        }
        if event.prev_hash != expected_previous {
            return Err(broken_at(
                event.seq,
                "prev_hash does not match the previous event's hash".into(),
            ));
        }
        let recomputed = link_hash(
            &event.prev_hash,
            event.seq,
            &event.at,
            event.request_id.as_deref(),
            &event.kind,
            &event.actor,
            &event.payload,
        );
        if recomputed != event.hash {
            return Err(broken_at(
                event.seq,
                "content does not match its hash (the row was altered)".into(),
            ));
        }
        self.previous_hash = Some(event.hash.clone());
        self.previous_seq = Some(event.seq);
        self.verified += 1;
        Ok(())
    }

    pub fn verified(&self) -> u64 {
        self.verified
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chain(length: usize) -> Vec<AuditEvent> {
        let mut previous = GENESIS_HASH.to_string();
        (1..=length as i64)
            .map(|seq| {
                let event = NewAuditEvent {
                    at: crate::domain::now(),
                    request_id: Some(format!("apr_{seq}")),
                    kind: AuditKind::Vote,
                    actor: "cli:alice".into(),
                    payload: json!({"n": seq}),
                }
                .seal(seq, previous.clone());
                previous = event.hash.clone();
                event
            })
            .collect()
    }

    #[test]
    fn the_link_hash_is_the_hash_of_the_whole_canonical_content() {
        let at = crate::domain::now();
        for (seq, request_id, payload) in [
            (
                1,
                Some("apr_1"),
                json!({"b": 1, "a": [1.5, "x"], "é": null}),
            ),
            (42, None, json!(null)),
            (
                9_007_199_254_740_991,
                Some("apr_\u{1F600}"),
                json!({"seq": 7}),
            ),
        ] {
            let whole = json!({
                "seq": seq,
                "at": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "request_id": request_id,
                "kind": "vote",
                "actor": "cli:alice",
                "payload": payload,
            });
            let mut hasher = Sha256::new();
            hasher.update(GENESIS_HASH.as_bytes());
            hasher.update(serde_json_canonicalizer::to_vec(&whole).expect("canonical"));
            let expected = hex::encode(hasher.finalize());
            let hash = link_hash(
                GENESIS_HASH,
                seq,
                &at,
                request_id,
                "vote",
                "cli:alice",
                &payload,
            );
            assert_eq!(hash, expected, "seq {seq}");
        }
    }

    fn verify(events: &[AuditEvent]) -> Result<u64, ChainBreak> {
        let mut verifier = ChainVerifier::default();
        for event in events {
            verifier.check(event)?;
        }
        Ok(verifier.verified())
    }

    #[test]
    fn heads_are_parsed_strictly() {
        let hash = "ab".repeat(32);
        assert_eq!(
            AuditHead::parse(&format!(r#"{{"seq":7,"hash":"{hash}"}}"#)),
            Ok(AuditHead {
                seq: 7,
                hash: hash.clone()
            })
        );
        assert_eq!(
            AuditHead::parse(&serde_json::to_string(&AuditHead::genesis()).unwrap()),
            Ok(AuditHead::genesis())
        );
        for bad in [
            "",
            "not json",
            r#"{"seq":7}"#,
            &format!(r#"{{"seq":"7","hash":"{hash}"}}"#),
            &format!(r#"{{"seq":-1,"hash":"{hash}"}}"#),
            r#"{"seq":7,"hash":"abc"}"#,
            &format!(r#"{{"seq":7,"hash":"{}"}}"#, "AB".repeat(32)),
            &format!(r#"{{"seq":0,"hash":"{hash}"}}"#),
            &format!(r#"{{"seq":7,"hash":"{hash}","extra":1}}"#),
        ] {
            assert!(AuditHead::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_head_catches_truncation_and_rewrites() {
        let events = chain(5);
        let head = AuditHead {
            seq: 4,
            hash: events[3].hash.clone(),
        };
        assert_eq!(head.check(Some(&events[3]), 5), Ok(()));
        // Cut short before event 4: the trail's next event is not there.
        let cut = head.check(None, 3).unwrap_err();
        assert_eq!(cut.seq, 4);
        assert!(cut.problem.contains("ends at seq 3"), "{cut}");
        // Rewritten and rehashed from event 2 on: it links, but event 4 has another hash.
        let rewritten = AuditEvent {
            payload: json!({"n": 99}),
            ..events[3].clone()
        };
        let rewritten = NewAuditEvent {
            at: rewritten.at,
            request_id: rewritten.request_id,
            kind: AuditKind::Vote,
            actor: rewritten.actor,
            payload: rewritten.payload,
        }
        .seal(4, events[2].hash.clone());
        let broken = head.check(Some(&rewritten), 5);
        assert_eq!(broken.map_err(|error| error.seq), Err(4));
        assert_eq!(AuditHead::genesis().check(None, 0), Ok(()));
    }

    #[test]
    fn intact_chain_verifies() {
        assert_eq!(verify(&chain(5)), Ok(5));
        assert_eq!(verify(&[]), Ok(0));
    }

    #[test]
    fn tampering_is_found_at_the_first_bad_event() {
        type Tamper = fn(&mut Vec<AuditEvent>);
        let table: Vec<(&str, Tamper, i64)> = vec![
            (
                "payload altered",
                |events| events[2].payload = json!({"n": 99}),
                3,
            ),
            (
                "actor altered",
                |events| events[1].actor = "cli:mallory".into(),
                2,
            ),
            (
                "event removed",
                |events| {
                    events.remove(3);
                },
                4,
            ),
            (
                "hash rewritten",
                |events| events[2].hash = "f".repeat(64),
                3,
            ),
            (
                "first prev_hash altered",
                |events| events[0].prev_hash = "1".repeat(64),
                1,
            ),
        ];
        for (name, tamper, first_bad) in table {
            let mut events = chain(6);
            tamper(&mut events);
            assert_eq!(
                verify(&events).map_err(|error| error.seq),
                Err(first_bad),
                "{name}"
            );
        }
    }
}
