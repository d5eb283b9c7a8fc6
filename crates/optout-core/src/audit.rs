//! Audit records and the keyed digest that stands in for an NHS number in them.
//!
//! An audit record says who (organisation and key id) did what (a change of opt-outs, or a check),
//! when, about how many numbers, and at which store version. It never holds an NHS number: each is
//! replaced by a keyed pseudorandom digest (see [`AuditKey`]) under the audit key from
//! configuration, truncated to 8 bytes. Without the key the digests cannot be reversed by
//! enumerating the ten-digit space; with it, the service can answer "which records concern this patient?" by computing the digest of the number asked.
//! 8 bytes keep a check of millions of numbers affordable; a false match between two patients is
//! about one in 2^64 per pair.

use std::collections::BTreeMap;

use aes::{
    Aes256, Block,
    cipher::{BlockEncrypt, KeyInit},
};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::NhsNumber;

/// The secret that keys audit digests. Configuration, never in the repository.
///
/// A digest is AES-256 of one block (a fixed domain tag and the number) under a key derived from
/// the secret with HMAC-SHA-256, truncated to 8 bytes. AES under a secret key is a pseudorandom
/// permutation, so on the at most 10^10 possible inputs it is a keyed pseudorandom function just
/// as HMAC is (the PRP/PRF distance is about q^2 / 2^129, nothing for q = 10^10), at a fraction of
/// the cost with AES-NI (`cargo bench --bench core -- audit_digest` measures it). Digests are computed
/// for every released number, so their cost shows directly in the check path's CPU.
#[derive(Clone)]
pub struct AuditKey {
    cipher: Aes256,
    /// The public id, as the 8 hex digits every sealed line carries.
    id_hex: [u8; 8],
    /// HMAC-SHA-256 under the trail MAC key (derived from the secret apart from the digest key),
    /// already keyed: each line's MAC clones it rather than hashing the key's pads again (two of
    /// the four SHA-256 blocks of a MAC).
    mac: Hmac<Sha256>,
}

/// An audit key that cannot be used.
/// Why an audit key was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuditKeyError {
    /// Fewer than 32 bytes of secret.
    #[error("the audit key must be at least 32 bytes of secret, got {0}")]
    TooShort(usize),
    /// A key file that is not base64 text.
    #[error(
        "the audit key file must hold base64 text (make one with `optout keys audit-key`); byte \
         {position} is {byte:#04x}, which is not base64"
    )]
    NotBase64 {
        /// 0-based position of the first bad byte, after leading whitespace.
        position: usize,
        /// The byte.
        byte: u8,
    },
    /// Base64 text that does not decode (wrong length or padding).
    #[error("the audit key file is not valid base64: {0}")]
    BadBase64(String),
}

/// Length of one digest in bytes.
pub const DIGEST_LEN: usize = 8;

/// The first half of every block: keeps digests of NHS numbers apart from any other use of the key.
const DOMAIN: &[u8; 8] = b"optoutN1";

impl AuditKey {
    /// A key from secret bytes (at least 32).
    pub fn new(secret: &[u8]) -> Result<Self, AuditKeyError> {
        if secret.len() < 32 {
            return Err(AuditKeyError::TooShort(secret.len()));
        }
        // HMAC takes keys of any length; the error arm cannot happen.
        let mut kdf = <Hmac<Sha256> as Mac>::new_from_slice(secret)
            .map_err(|_| AuditKeyError::TooShort(secret.len()))?;
        kdf.update(b"optout audit digest key, AES-256, v2");
        let derived = kdf.finalize().into_bytes();
        let id = Sha256::digest([b"optout audit key id".as_slice(), secret].concat());
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
            .map_err(|_| AuditKeyError::TooShort(secret.len()))?;
        mac.update(b"optout audit trail MAC key, HMAC-SHA-256, v1");
        let mac_key = mac.finalize().into_bytes();
        let mut id_hex = [0u8; 8];
        // 8 hex digits of 4 bytes: cannot fail.
        let _ = hex::encode_to_slice(&id[..4], &mut id_hex);
        Ok(AuditKey {
            cipher: Aes256::new(&derived),
            id_hex,
            mac: <Hmac<Sha256> as Mac>::new_from_slice(&mac_key)
                .map_err(|_| AuditKeyError::TooShort(secret.len()))?,
        })
    }

    /// The key in a key file: base64 text of at least 32 random bytes (what
    /// [`AuditKey::generate`] writes), ASCII whitespace around it ignored. Anything else is
    /// refused: a binary file, text that is not base64, or fewer than 32 bytes once decoded. The
    /// secret is the base64 text itself, exactly as written (so digests stay what they were for
    /// key files made as the README has always said, `head -c 48 /dev/urandom | base64`).
    pub fn from_file(contents: &[u8]) -> Result<Self, AuditKeyError> {
        let start = contents
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(contents.len());
        let end = contents
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(start, |e| e + 1);
        let text = &contents[start..end.max(start)];
        if let Some(position) = text
            .iter()
            .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')))
        {
            return Err(AuditKeyError::NotBase64 {
                position,
                byte: text[position],
            });
        }
        let engine = base64::engine::general_purpose::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        let secret = engine
            .decode(text)
            .map_err(|e| AuditKeyError::BadBase64(e.to_string()))?;
        if secret.len() < 32 {
            return Err(AuditKeyError::TooShort(secret.len()));
        }
        Self::new(text)
    }

    /// A new key file's contents: base64 of 32 random bytes and a newline.
    pub fn generate() -> String {
        let mut secret = [0u8; 32];
        rand::fill(&mut secret);
        format!(
            "{}\n",
            base64::engine::general_purpose::STANDARD.encode(secret)
        )
    }

    /// HMAC-SHA-256 of `data` under the key's trail MAC key.
    pub fn mac(&self, data: &[u8]) -> [u8; 32] {
        let mut m = self.mac.clone();
        m.update(data);
        m.finalize().into_bytes().into()
    }

    /// A short public id of the key (8 hex digits), to tell keys apart when one is rotated.
    pub fn id(&self) -> String {
        self.id_str().to_string()
    }

    /// [`AuditKey::id`] without a string of its own.
    pub fn id_str(&self) -> &str {
        // Hex digits are ASCII.
        std::str::from_utf8(&self.id_hex).unwrap_or_default()
    }

    fn block(n: NhsNumber) -> Block {
        let mut b = Block::default();
        b[..8].copy_from_slice(DOMAIN);
        b[8..].copy_from_slice(&n.as_u64().to_be_bytes());
        b
    }

    /// The digest of one NHS number.
    pub fn digest(&self, n: NhsNumber) -> [u8; DIGEST_LEN] {
        let mut b = Self::block(n);
        self.cipher.encrypt_block(&mut b);
        let mut out = [0u8; DIGEST_LEN];
        out.copy_from_slice(&b[..DIGEST_LEN]);
        out
    }

    /// The digests of many numbers, concatenated and base64-encoded, as stored in a record.
    pub fn digests(&self, numbers: impl IntoIterator<Item = NhsNumber>) -> String {
        let mut blocks: Vec<Block> = numbers.into_iter().map(Self::block).collect();
        // Many blocks at once: AES-NI pipelines them.
        self.cipher.encrypt_blocks(&mut blocks);
        let mut raw = Vec::with_capacity(blocks.len() * DIGEST_LEN);
        for b in &blocks {
            raw.extend_from_slice(&b[..DIGEST_LEN]);
        }
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(raw)
    }
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(<secret>)")
    }
}

/// One audit record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When, ms since the Unix epoch.
    pub at_ms: i64,
    /// The calling organisation (ODS code, or "anonymous" when the service runs without keys).
    pub organisation: String,
    /// The id of the API key used ("-" without keys).
    pub key_id: String,
    /// "add", "remove", "import-merge", "import-replace" or "check".
    pub action: String,
    /// The opt-out type changed (admin changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opt_out_type: Option<String>,
    /// Where the change came from (admin changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The caller's extract reference (checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extract_id: Option<String>,
    /// Purpose (checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// Data origin (checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// The legal basis a check claimed ("consent", "cag-opt-out-set-aside", ...; absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub legal_basis: Option<String>,
    /// The reference given for that basis (a CAG number, a statute, a study).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basis_reference: Option<String>,
    /// NHS numbers in the request (valid and invalid).
    pub count: u64,
    /// Numbers actually changed (admin changes), or released (checks).
    pub applied: u64,
    /// Numbers withheld, by reason (checks).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub withheld: BTreeMap<String, u64>,
    /// The store version the change took effect at, or the check's answer reflects.
    #[serde(default)]
    pub version: String,
    /// Base64 of the 8-byte digests: every number of an admin change request, the numbers an import
    /// added or removed, the numbers a check released.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digests: String,
    /// An import's id, on its main record and on each of its `import-added` and
    /// `import-removed` parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_of: Option<String>,
    /// A national check round trip: how many patients were in the population checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub population: Option<u64>,
    /// A national check round trip: when the check was made, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at_ms: Option<u64>,
    /// A check log's anchor (action `check-log-anchor`): where a replica's log stood.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_log: Option<crate::anchors::LogAnchor>,
    /// Why an admin overrode a refusal: a national check older than the one in force imported
    /// on purpose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub override_reason: Option<String>,
    /// A type 1 change or import: the practice whose objections it records or withdraws (its
    /// ODS code, or "unknown").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub practice: Option<String>,
}

/// The fields of an [`AuditRecord`] before `digests`, borrowed, serialised exactly as the record
/// serialises them (same names, order and skipping). Only [`AuditRecord::write_json`] uses it.
#[derive(Serialize)]
struct RecordHead<'a> {
    at_ms: i64,
    organisation: &'a str,
    key_id: &'a str,
    action: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    opt_out_type: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    extract_id: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    purpose: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    origin: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    legal_basis: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    basis_reference: &'a Option<String>,
    count: u64,
    applied: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    withheld: &'a BTreeMap<String, u64>,
    version: &'a str,
}

/// Whether every byte is of the standard base64 alphabet, none of which JSON escapes. Folded
/// without an early exit so that it vectorises.
fn is_base64(s: &str) -> bool {
    s.bytes().fold(true, |ok, b| {
        ok & (b.is_ascii_alphanumeric() | (b == b'+') | (b == b'/'))
    })
}

impl AuditRecord {
    /// Appends the record as JSON to `out`: the very bytes `serde_json::to_writer` writes (a unit
    /// test holds it to that), but a check record's digests (about 11 bytes a released number;
    /// escaping them was about 6% of the service's CPU under batches) are copied once, without
    /// serde_json's escaping pass, when they are plain base64 and the last field.
    pub fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        // Every field named, so that a field added to the record cannot be left out here.
        let AuditRecord {
            at_ms,
            organisation,
            key_id,
            action,
            opt_out_type,
            source,
            extract_id,
            purpose,
            origin,
            legal_basis,
            basis_reference,
            count,
            applied,
            withheld,
            version,
            digests,
            part_of,
            population,
            checked_at_ms,
            check_log,
            override_reason,
            practice,
        } = self;
        let digests_last = part_of.is_none()
            && population.is_none()
            && checked_at_ms.is_none()
            && check_log.is_none()
            && override_reason.is_none()
            && practice.is_none();
        if digests.is_empty() || !digests_last || !is_base64(digests) {
            return serde_json::to_writer(out, self);
        }
        let head = RecordHead {
            at_ms: *at_ms,
            organisation,
            key_id,
            action,
            opt_out_type,
            source,
            extract_id,
            purpose,
            origin,
            legal_basis,
            basis_reference,
            count: *count,
            applied: *applied,
            withheld,
            version,
        };
        serde_json::to_writer(&mut *out, &head)?;
        // `head` always has fields, so it ends `...}`: the digests go before that brace.
        out.pop();
        out.reserve(digests.len() + 16);
        out.extend_from_slice(b",\"digests\":\"");
        out.extend_from_slice(digests.as_bytes());
        out.extend_from_slice(b"\"}");
        Ok(())
    }
}

/// Digests an import's part holds at most: an import of millions of numbers is recorded
/// as many bounded records, never one giant one.
pub const IMPORT_DIGEST_CHUNK: usize = 10_000;

impl AuditRecord {
    /// One part of an import whose main record is `self`: the digests of `numbers` (at most
    /// [`IMPORT_DIGEST_CHUNK`]) it `added` (action `import-added`) or removed (`import-removed`),
    /// naming the import (`part_of`).
    pub fn import_part(
        &self,
        key: &AuditKey,
        numbers: &[NhsNumber],
        import_id: &str,
        added: bool,
    ) -> AuditRecord {
        AuditRecord {
            action: if added {
                "import-added"
            } else {
                "import-removed"
            }
            .into(),
            count: numbers.len() as u64,
            applied: numbers.len() as u64,
            digests: key.digests(numbers.iter().copied()),
            part_of: Some(import_id.to_string()),
            withheld: BTreeMap::new(),
            ..self.clone()
        }
    }

    /// Whether the record concerns the number with this digest.
    pub fn mentions(&self, digest: &[u8; DIGEST_LEN]) -> bool {
        base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(&self.digests)
            .map(|raw| raw.chunks_exact(DIGEST_LEN).any(|d| d == digest))
            .unwrap_or(false)
    }

    /// How many digests the record holds.
    pub fn digest_count(&self) -> usize {
        base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(&self.digests)
            .map(|raw| raw.len() / DIGEST_LEN)
            .unwrap_or(0)
    }
}

/// What to read from the audit log.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    /// From this time (ms since the epoch, inclusive).
    pub from_ms: i64,
    /// To this time (inclusive); 0 means now.
    pub to_ms: i64,
    /// Only this organisation.
    pub organisation: Option<String>,
    /// Only this extract reference.
    pub extract_id: Option<String>,
    /// Only records that mention this number's digest.
    pub digest: Option<[u8; DIGEST_LEN]>,
    /// Only records of this action.
    pub action: Option<String>,
    /// At most this many records, oldest first.
    pub limit: usize,
}

impl AuditQuery {
    /// Whether a record passes the filters other than time.
    pub fn matches(&self, r: &AuditRecord) -> bool {
        self.organisation
            .as_ref()
            .is_none_or(|o| *o == r.organisation)
            && self
                .extract_id
                .as_ref()
                .is_none_or(|e| r.extract_id.as_ref() == Some(e))
            && self.digest.as_ref().is_none_or(|d| r.mentions(d))
            && self.action.as_ref().is_none_or(|a| *a == r.action)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_key_file_is_base64_of_at_least_32_bytes_and_nothing_else() {
        let made = AuditKey::generate();
        let key = AuditKey::from_file(made.as_bytes()).expect("a generated key is accepted");
        // The secret is the text as written: a key file made as the README always said keeps
        // its digests.
        let legacy = "  Zm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFy\r\n";
        let n = NhsNumber::parse("9434765919").expect("valid");
        assert_eq!(
            AuditKey::from_file(legacy.as_bytes())
                .expect("legacy")
                .digest(n),
            AuditKey::new(legacy.trim().as_bytes())
                .expect("text")
                .digest(n)
        );
        assert_eq!(key.id().len(), 8);
        assert_ne!(
            key.id(),
            AuditKey::from_file(AuditKey::generate().as_bytes())
                .expect("another")
                .id()
        );
        // Binary: refused, naming the byte, rather than losing entropy in a lossy conversion.
        let mut binary = vec![0x80u8, 0xff, 0x00];
        binary.extend([7u8; 40]);
        assert!(matches!(
            AuditKey::from_file(&binary),
            Err(AuditKeyError::NotBase64 {
                position: 0,
                byte: 0x80
            })
        ));
        // 31 bytes of secret: too short, although its text is 44 characters long.
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 31]);
        assert_eq!(
            AuditKey::from_file(short.as_bytes()).err(),
            Some(AuditKeyError::TooShort(31))
        );
        assert!(matches!(
            AuditKey::from_file(b"abc"),
            Err(AuditKeyError::BadBase64(_) | AuditKeyError::TooShort(_))
        ));
        assert!(AuditKey::from_file(b"").is_err());
        assert!(AuditKey::from_file(b"a key with spaces inside it that is long enough").is_err());
    }

    use super::*;

    #[test]
    fn an_import_is_recorded_in_bounded_parts_that_name_it() {
        let key = AuditKey::new(&[1u8; 32]).expect("key");
        let numbers: Vec<NhsNumber> = (4_000_000_000u64..)
            .filter_map(|v| NhsNumber::from_u64(v).ok())
            .take(IMPORT_DIGEST_CHUNK * 2 + 1)
            .collect();
        let main = AuditRecord {
            action: "import-replace".into(),
            organisation: "RX1".into(),
            part_of: Some("ab12".into()),
            ..AuditRecord::default()
        };
        let parts: Vec<AuditRecord> = numbers
            .chunks(IMPORT_DIGEST_CHUNK)
            .map(|c| main.import_part(&key, c, "ab12", true))
            .collect();
        assert_eq!(
            parts.iter().map(|p| p.digest_count()).collect::<Vec<_>>(),
            vec![IMPORT_DIGEST_CHUNK, IMPORT_DIGEST_CHUNK, 1]
        );
        assert!(parts.iter().all(|p| p.action == "import-added"
            && p.organisation == "RX1"
            && p.part_of.as_deref() == Some("ab12")));
        assert_eq!(
            main.import_part(&key, &numbers[..1], "ab12", false).action,
            "import-removed"
        );
        let last = numbers[numbers.len() - 1];
        assert!(parts[2].mentions(&key.digest(last)));
        assert!(!parts[0].mentions(&key.digest(last)));
    }

    #[test]
    fn digests_are_keyed_and_findable() {
        let a = AuditKey::new(&[1u8; 32]).expect("key");
        let b = AuditKey::new(&[2u8; 32]).expect("key");
        let n = NhsNumber::parse("9434765919").expect("valid");
        let m = NhsNumber::parse("4010232137").expect("valid");
        assert_ne!(a.digest(n), b.digest(n), "another key, another digest");
        assert_ne!(a.digest(n), a.digest(m));
        let r = AuditRecord {
            digests: a.digests([n]),
            ..AuditRecord::default()
        };
        assert!(r.mentions(&a.digest(n)));
        assert!(!r.mentions(&a.digest(m)));
        assert_eq!(r.digest_count(), 1);
        assert!(
            !serde_json::to_string(&r)
                .expect("json")
                .contains("9434765919")
        );
    }

    #[test]
    fn write_json_writes_what_serde_json_writes() {
        let key = AuditKey::new(&[7u8; 32]).expect("key");
        let numbers: Vec<NhsNumber> = ["9434765919", "4010232137"]
            .iter()
            .map(|n| NhsNumber::parse(n).expect("valid"))
            .collect();
        let check = AuditRecord {
            at_ms: 1_700_000_000_000,
            organisation: "RX1 \"quoted\"".into(),
            key_id: "k\u{e9}y".into(),
            action: "check".into(),
            extract_id: Some("ext\n1".into()),
            purpose: Some("research".into()),
            origin: Some("other".into()),
            legal_basis: Some("section-251".into()),
            basis_reference: Some("CAG 1-02(a)/2026".into()),
            count: 3,
            applied: 2,
            withheld: [("invalid-nhs-number".to_string(), 1)]
                .into_iter()
                .collect(),
            version: "5-1".into(),
            digests: key.digests(numbers.iter().copied()),
            ..AuditRecord::default()
        };
        let mut variants = vec![
            check.clone(),
            AuditRecord {
                extract_id: None,
                legal_basis: None,
                basis_reference: None,
                withheld: BTreeMap::new(),
                ..check.clone()
            },
            // Digests not last, absent, or not base64: the ordinary path.
            AuditRecord {
                part_of: Some("import-1".into()),
                ..check.clone()
            },
            AuditRecord {
                population: Some(10),
                checked_at_ms: Some(5),
                ..check.clone()
            },
            AuditRecord {
                digests: String::new(),
                ..check.clone()
            },
            AuditRecord {
                digests: "not\"base64\\".into(),
                ..check.clone()
            },
            AuditRecord::default(),
        ];
        variants.push(AuditRecord {
            opt_out_type: Some("national".into()),
            source: Some("admin".into()),
            ..variants[1].clone()
        });
        for r in &variants {
            let mut fast = Vec::new();
            r.write_json(&mut fast).expect("write_json");
            let slow = serde_json::to_vec(r).expect("serde_json");
            assert_eq!(
                String::from_utf8_lossy(&fast),
                String::from_utf8_lossy(&slow)
            );
        }
    }

    #[test]
    fn the_trail_mac_and_key_id_are_as_defined() {
        // HMAC-SHA-256 under HMAC-SHA-256(secret, label), and the first 4 bytes of
        // SHA-256(label || secret) in hex: computed here from their definitions, so that keeping
        // a keyed MAC state (or anything else) cannot change a sealed line.
        let secret = [9u8; 40];
        let key = AuditKey::new(&secret).expect("key");
        let mut kdf = <Hmac<Sha256> as Mac>::new_from_slice(&secret).expect("hmac");
        kdf.update(b"optout audit trail MAC key, HMAC-SHA-256, v1");
        let mac_key = kdf.finalize().into_bytes();
        for data in [&b""[..], b"a line", &[0x5a; 200]] {
            let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&mac_key).expect("hmac");
            m.update(data);
            let want: [u8; 32] = m.finalize().into_bytes().into();
            assert_eq!(key.mac(data), want);
        }
        let id = Sha256::digest([b"optout audit key id".as_slice(), &secret].concat());
        assert_eq!(key.id(), crate::trail::hex(&id[..4]));
        assert_eq!(key.id_str(), key.id());
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(AuditKey::new(b"too short").is_err());
    }
}
