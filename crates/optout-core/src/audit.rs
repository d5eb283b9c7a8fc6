//! Audit records and the keyed digest that stands in for an NHS number in them.
//!
//! An audit record says who (organisation and key id) did what (a change of opt-outs, or a check),
//! when, about how many numbers, and at which store version. It never holds an NHS number: each is
//! encrypted under a key derived from the audit key (see [`AuditKey`]): its first nine digits
//! (which decide the tenth) as 4 bytes, AES-128 in counter mode under a nonce of the record's own,
//! 5.3 bytes a number in the record's base64. Without the key a record says nothing of whom it
//! concerns, not even whether two records concern the same patient; with it, the service answers
//! "which records concern this patient?" by decrypting each record's numbers and comparing them
//! with the number asked, so the answer is exact.
//!
//! Records written before (no `digest_scheme`, or `"aes-8"`) hold 8-byte truncated AES digests
//! instead; they are still read and found, each record by its own scheme.

use std::collections::BTreeMap;

use aes::{
    Aes128, Aes256, Block,
    cipher::{BlockEncrypt, KeyInit, KeyIvInit, StreamCipher},
};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::NhsNumber;

/// The cipher of the numbers in records: AES-128, CTR with a 96-bit nonce and a 32-bit counter.
type NumberCipher = ctr::Ctr32BE<Aes128>;

/// The secret that keys audit digests. Configuration, never in the repository.
///
/// What records hold now is each number's first nine digits (which decide the tenth), encrypted
/// with AES-128-CTR under a key derived from the secret and a random nonce per record (the first
/// 12 bytes of the record's `digests`): one AES block of keystream covers four numbers, half the
/// CPU of one digest a number (`cargo bench --bench core -- audit_digest`). Before, it was a digest, still computed to find older
/// records: AES-256 of one block (a fixed domain tag and the number) under a key derived from
/// the secret with HMAC-SHA-256, truncated to 8 bytes. AES under a secret key is a pseudorandom
/// permutation, so on the at most 10^10 possible inputs it is a keyed pseudorandom function just
/// as HMAC is (the PRP/PRF distance is about q^2 / 2^129, nothing for q = 10^10), at a fraction of
/// the cost with AES-NI (`cargo bench --bench core -- audit_digest` measures it). Digests are computed
/// for every released number, so their cost shows directly in the check path's CPU.
#[derive(Clone)]
pub struct AuditKey {
    cipher: Aes256,
    /// The key of the numbers records hold now (AES-128-CTR).
    numbers_key: [u8; 16],
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

/// Length of one (older) digest in bytes.
pub const DIGEST_LEN: usize = 8;

/// Length of one encrypted number in bytes: its first nine digits, below 10^9, as a big-endian
/// `u32`, encrypted.
pub const SEALED_LEN: usize = 4;

/// Length of the nonce at the head of a record's encrypted numbers.
pub const NONCE_LEN: usize = 12;

/// How a record's `digests` stand for NHS numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DigestScheme {
    /// 8-byte truncated AES-256 digests: records written before the encrypted numbers, which
    /// carry no `digest_scheme`.
    Aes8,
    /// A 12-byte nonce, then each number's first nine digits as 4 bytes, AES-128-CTR: what
    /// every record is written with now.
    #[default]
    AesCtr,
}

impl DigestScheme {
    /// The scheme of a record whose `digest_scheme` is absent: one written before the field.
    fn before_the_field() -> Self {
        DigestScheme::Aes8
    }

    fn is_aes8(&self) -> bool {
        *self == DigestScheme::Aes8
    }

    /// Bytes per number, and before the first.
    fn layout(self) -> (usize, usize) {
        match self {
            DigestScheme::Aes8 => (DIGEST_LEN, 0),
            DigestScheme::AesCtr => (SEALED_LEN, NONCE_LEN),
        }
    }
}

/// A look-up of one patient in records of either scheme ([`AuditKey::lookup`]).
#[derive(Clone)]
pub struct PatientQuery {
    /// The 8-byte digest older records hold.
    aes8: [u8; DIGEST_LEN],
    /// The first nine digits, as encrypted records hold them once decrypted.
    body: [u8; SEALED_LEN],
    numbers_key: [u8; 16],
}

impl std::fmt::Debug for PatientQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No number, no key.
        f.write_str("PatientQuery(<one patient>)")
    }
}

/// The first half of every block: keeps digests of NHS numbers apart from any other use of the key.
const DOMAIN: &[u8; 8] = b"optoutN1";

impl AuditKey {
    /// A key from secret bytes (at least 32).
    pub fn new(secret: &[u8]) -> Result<Self, AuditKeyError> {
        if secret.len() < 32 {
            return Err(AuditKeyError::TooShort(secret.len()));
        }
        let derived = derive(secret, b"optout audit digest key, AES-256, v2")?;
        let id = Sha256::digest([b"optout audit key id".as_slice(), secret].concat());
        let mac_key = derive(secret, b"optout audit trail MAC key, HMAC-SHA-256, v1")?;
        let mut numbers_key = [0u8; 16];
        numbers_key
            .copy_from_slice(&derive(secret, b"optout audit numbers key, AES-128-CTR, v1")?[..16]);
        let mut id_hex = [0u8; 8];
        // 8 hex digits of 4 bytes: cannot fail.
        let _ = hex::encode_to_slice(&id[..4], &mut id_hex);
        Ok(AuditKey {
            cipher: Aes256::new(&derived.into()),
            numbers_key,
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

    /// The older 8-byte digest of one NHS number (records before the encrypted numbers).
    pub fn digest(&self, n: NhsNumber) -> [u8; DIGEST_LEN] {
        let mut b = Self::block(n);
        self.cipher.encrypt_block(&mut b);
        let mut out = [0u8; DIGEST_LEN];
        out.copy_from_slice(&b[..DIGEST_LEN]);
        out
    }

    /// The first nine digits of a number, which decide the tenth (every [`NhsNumber`] has a
    /// valid check digit): below 10^9, so four bytes.
    fn body(n: NhsNumber) -> [u8; SEALED_LEN] {
        u32::try_from(n.as_u64() / 10)
            .unwrap_or(u32::MAX)
            .to_be_bytes()
    }

    /// What a look-up of this number looks for, in records of either scheme.
    pub fn lookup(&self, n: NhsNumber) -> PatientQuery {
        PatientQuery {
            aes8: self.digest(n),
            body: Self::body(n),
            numbers_key: self.numbers_key,
        }
    }

    /// Many numbers encrypted for a record (with [`DigestScheme::AesCtr`], a record's default):
    /// a fresh random nonce, then each number's four bytes, base64-encoded.
    pub fn digests(&self, numbers: impl IntoIterator<Item = NhsNumber>) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce);
        let numbers = numbers.into_iter();
        let mut raw = Vec::with_capacity(NONCE_LEN + numbers.size_hint().0 * SEALED_LEN);
        raw.extend_from_slice(&nonce);
        for n in numbers {
            raw.extend_from_slice(&Self::body(n));
        }
        apply_keystream(&self.numbers_key, &mut raw);
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(raw)
    }

    /// The older 8-byte digests of many numbers, as records before the encrypted numbers held them.
    pub fn aes8_digests(&self, numbers: impl IntoIterator<Item = NhsNumber>) -> String {
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

/// A key for one use, derived from the secret: HMAC-SHA-256 of the use's label.
fn derive(secret: &[u8], label: &[u8]) -> Result<[u8; 32], AuditKeyError> {
    // HMAC takes keys of any length; the error arm cannot happen.
    let mut kdf = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .map_err(|_| AuditKeyError::TooShort(secret.len()))?;
    kdf.update(label);
    Ok(kdf.finalize().into_bytes().into())
}

/// Encrypts (or decrypts) in place what follows the nonce at the head of `raw`.
fn apply_keystream(key: &[u8; 16], raw: &mut [u8]) {
    if raw.len() < NONCE_LEN {
        return;
    }
    let (nonce, numbers) = raw.split_at_mut(NONCE_LEN);
    let mut iv = [0u8; 16];
    iv[..NONCE_LEN].copy_from_slice(nonce);
    // A record of more than 2^32 blocks (64 GiB) would wrap the counter; records are bounded far
    // below that (the check log's batches, the import parts).
    NumberCipher::new(key.into(), &iv.into()).apply_keystream(numbers);
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
    /// How `digests` stand for numbers. Absent in records written before the field (8-byte
    /// digests).
    #[serde(
        default = "DigestScheme::before_the_field",
        skip_serializing_if = "DigestScheme::is_aes8"
    )]
    pub digest_scheme: DigestScheme,
    /// Base64 of the numbers, encrypted ([`AuditKey::digests`]): every number of an admin change
    /// request, the numbers an import added or removed, the numbers a check released.
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
    #[serde(skip_serializing_if = "DigestScheme::is_aes8")]
    digest_scheme: DigestScheme,
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
            digest_scheme,
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
            digest_scheme: *digest_scheme,
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

    /// Whether the record concerns the patient asked about (by the record's scheme: its digests
    /// compared, or its numbers decrypted and compared).
    pub fn mentions(&self, patient: &PatientQuery) -> bool {
        let Ok(mut raw) = base64::engine::general_purpose::STANDARD_NO_PAD.decode(&self.digests)
        else {
            return false;
        };
        let (len, head) = self.digest_scheme.layout();
        let wanted: &[u8] = match self.digest_scheme {
            DigestScheme::Aes8 => &patient.aes8,
            DigestScheme::AesCtr => {
                apply_keystream(&patient.numbers_key, &mut raw);
                &patient.body
            }
        };
        raw.get(head..)
            .is_some_and(|numbers| numbers.chunks_exact(len).any(|d| d == wanted))
    }

    /// How many numbers the record's digests stand for.
    pub fn digest_count(&self) -> usize {
        let (len, head) = self.digest_scheme.layout();
        base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(&self.digests)
            .map(|raw| raw.len().saturating_sub(head) / len)
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
    /// Only records that mention this number ([`AuditKey::lookup`]).
    pub digest: Option<PatientQuery>,
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
        assert!(parts[2].mentions(&key.lookup(last)));
        assert!(!parts[0].mentions(&key.lookup(last)));
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
        assert!(r.mentions(&a.lookup(n)));
        assert!(!r.mentions(&a.lookup(m)));
        assert!(!r.mentions(&b.lookup(n)), "another key does not find it");
        assert_eq!(r.digest_count(), 1);
        assert!(
            !serde_json::to_string(&r)
                .expect("json")
                .contains("9434765919")
        );
        // The same number in two records: nothing in common without the key.
        let again = a.digests([n]);
        assert_ne!(r.digests, again);
    }

    /// Issue 31: a check's record holds at most 6 bytes a released number, and a lookup by
    /// patient stays exact: each record's numbers decrypt to exactly the numbers written, so a
    /// patient is found in the records that hold them and in no other (no two patients can
    /// share what a record holds, as they could share a digest this short).
    #[test]
    fn encrypted_numbers_take_under_six_bytes_and_are_found_exactly() {
        let key = AuditKey::new(&[3u8; 32]).expect("key");
        let numbers: Vec<NhsNumber> = (4_000_000_000u64..)
            .filter_map(|v| NhsNumber::from_u64(v).ok())
            .take(200_000)
            .collect();
        let r = AuditRecord {
            digests: key.digests(numbers.iter().copied()),
            ..AuditRecord::default()
        };
        assert_eq!(r.digest_count(), numbers.len());
        assert!(
            r.digests.len() <= 6 * numbers.len(),
            "{} bytes for {} numbers",
            r.digests.len(),
            numbers.len()
        );
        // Decrypted, the record holds exactly the numbers written, in order.
        let mut raw = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(&r.digests)
            .expect("base64");
        apply_keystream(&key.numbers_key, &mut raw);
        let bodies: Vec<u64> = raw[NONCE_LEN..]
            .chunks_exact(SEALED_LEN)
            .map(|b| u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])))
            .collect();
        let want: Vec<u64> = numbers.iter().map(|n| n.as_u64() / 10).collect();
        assert_eq!(bodies, want);
        // Found by each number in it (a sample), and not by numbers outside it.
        for n in numbers.iter().step_by(9_973) {
            assert!(r.mentions(&key.lookup(*n)));
        }
        let outside = (4_100_000_000u64..)
            .filter_map(|v| NhsNumber::from_u64(v).ok())
            .take(50);
        for n in outside {
            assert!(!r.mentions(&key.lookup(n)));
        }
    }

    /// Records written before the encrypted numbers (no `digest_scheme`, 8-byte digests) are
    /// still found by patient, and a new record says its scheme.
    #[test]
    fn records_of_either_scheme_are_found_by_their_own() {
        let key = AuditKey::new(&[5u8; 32]).expect("key");
        let n = NhsNumber::parse("9434765919").expect("valid");
        let m = NhsNumber::parse("4010232137").expect("valid");
        let old = format!(
            r#"{{"at_ms":1,"organisation":"RX1","key_id":"k","action":"check","count":1,"applied":1,"version":"1-0","digests":"{}"}}"#,
            key.aes8_digests([n])
        );
        let old: AuditRecord = serde_json::from_str(&old).expect("an older record");
        assert_eq!(old.digest_scheme, DigestScheme::Aes8);
        assert_eq!(old.digest_count(), 1);
        assert!(old.mentions(&key.lookup(n)));
        assert!(!old.mentions(&key.lookup(m)));
        let new = AuditRecord {
            digests: key.digests([n, m]),
            ..AuditRecord::default()
        };
        let text = serde_json::to_string(&new).expect("json");
        assert!(
            text.contains(r#""digest_scheme":"aes-ctr","digests":"#),
            "{text}"
        );
        let back: AuditRecord = serde_json::from_str(&text).expect("read back");
        assert_eq!(back, new);
        assert_eq!(back.digest_count(), 2);
        assert!(back.mentions(&key.lookup(m)));
        // An older record is not read as encrypted numbers, nor the other way round.
        let confused = AuditRecord {
            digest_scheme: DigestScheme::AesCtr,
            ..old.clone()
        };
        assert!(!confused.mentions(&key.lookup(n)));
        let confused = AuditRecord {
            digest_scheme: DigestScheme::Aes8,
            ..new.clone()
        };
        assert!(!confused.mentions(&key.lookup(n)));
        assert!(!confused.mentions(&key.lookup(m)));
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
