//! API keys: the keys file, its roles and organisations, and new keys (pure; the service's
//! keyring, which reloads the file and checks presented keys, is in the server crate).
//!
//! A key looks like `oo_<id>_<secret>`: the id (12 hex digits) is public and names the key in
//! audit records; the secret is 32 random bytes. The keys file stores only the SHA-256 of the whole
//! key, so the file leaking does not leak keys (a fast hash is right here: the secret has 256 bits
//! of entropy, nothing to brute-force). Keys are compared in constant time.
//!
//! The keys file is TOML, one `[[key]]` table per key:
//!
//! ```toml
//! [[key]]
//! id = "3f9a2c41b7d0"
//! organisation = "RX1"          # ODS code of the calling organisation
//! roles = ["checker"]           # "checker": OptOutCheck; "admin": OptOutAdmin and checks
//! hash = "sha256:9b71d2..."
//! purposes = ["research"]       # what checks may claim; absent: research and planning
//! exempt_bases = ["consent"]    # legal bases checks may claim; absent: none
//! ```

use crate::{LegalBasis, Purpose};
use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// OptOutCheck.
    Checker,
    /// OptOutAdmin, and checks.
    Admin,
}

impl Role {
    /// The role named in a keys file.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "checker" => Some(Role::Checker),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// The role's name in the keys file.
    pub fn name(self) -> &'static str {
        match self {
            Role::Checker => "checker",
            Role::Admin => "admin",
        }
    }
}

/// The authenticated caller, put into each request's extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The organisation (ODS code).
    pub organisation: String,
    /// The key's public id.
    pub key_id: String,
    roles: Vec<Role>,
    /// The exempt legal bases this key may claim in a check (`exempt_bases` in the keys file).
    bases: Vec<LegalBasis>,
    /// The purposes this key may claim in a check (`purposes` in the keys file).
    purposes: Vec<Purpose>,
}

impl Caller {
    /// The key's roles.
    pub fn roles(&self) -> &[Role] {
        &self.roles
    }

    /// The exempt legal bases the key may claim.
    pub fn bases(&self) -> &[LegalBasis] {
        &self.bases
    }

    /// The purposes the key may claim.
    pub fn purposes(&self) -> &[Purpose] {
        &self.purposes
    }

    /// The caller of a service that runs without keys (loopback development only).
    pub fn anonymous() -> Caller {
        Caller {
            organisation: "anonymous".into(),
            key_id: "-".into(),
            roles: vec![Role::Checker, Role::Admin],
            bases: LegalBasis::EXEMPT.to_vec(),
            purposes: Purpose::ALL.to_vec(),
        }
    }

    /// Whether this is the caller of a service running without keys.
    pub fn is_anonymous(&self) -> bool {
        self.key_id == "-"
    }

    /// Whether the caller may check for `purpose`: only the purposes its keys-file entry lists
    /// (research and planning when it lists none).
    pub fn may_purpose(&self, purpose: Purpose) -> bool {
        self.purposes.contains(&purpose)
    }

    /// Whether the caller may claim `basis` for a check: always for none; an exempt basis only
    /// if the keys file lists it for this key.
    pub fn may_claim(&self, basis: LegalBasis) -> bool {
        basis == LegalBasis::None || self.bases.contains(&basis)
    }

    /// Whether the caller may use a service that needs `role` (admins may also check).
    pub fn may(&self, role: Role) -> bool {
        self.roles.contains(&role) || (role == Role::Checker && self.roles.contains(&Role::Admin))
    }
}

/// What is wrong with a keys file; names the entry and the field.
#[derive(Debug, thiserror::Error)]
pub enum KeysFileError {
    /// Not readable.
    #[error("keys file {path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// Not TOML of the expected shape.
    #[error("keys file is not valid: {0}")]
    Syntax(String),
    /// An entry has a bad field.
    #[error("keys file entry {index} (id {id:?}): {problem}")]
    Entry {
        /// 1-based position of the `[[key]]` table.
        index: usize,
        /// Its id as written.
        id: String,
        /// What is wrong.
        problem: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFileToml {
    #[serde(default)]
    key: Vec<KeyToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyToml {
    id: String,
    organisation: String,
    roles: Vec<String>,
    hash: String,
    /// Exempt legal bases the key may claim (see `LegalBasis::name`); none by default.
    #[serde(default)]
    exempt_bases: Vec<String>,
    /// Purposes the key may claim (see `Purpose::name`); absent: research and planning.
    purposes: Option<Vec<String>>,
}

/// Whether `org` is a well-formed organisation code (an ODS code): 1 to 64 letters, digits, '-'
/// or '_'.
pub fn valid_organisation(org: &str) -> bool {
    !org.is_empty()
        && org.len() <= 64
        && org
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn valid_id(id: &str) -> bool {
    id.len() == 12
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Parses a keys file. Every entry is checked; the first problem is reported with its position.
pub fn parse_keys_file(text: &str) -> Result<Vec<(String, Caller, [u8; 32])>, KeysFileError> {
    let file: KeysFileToml =
        toml::from_str(text).map_err(|e| KeysFileError::Syntax(e.to_string()))?;
    let mut out = Vec::with_capacity(file.key.len());
    let mut seen = std::collections::HashSet::new();
    for (i, k) in file.key.into_iter().enumerate() {
        let bad = |problem: String| KeysFileError::Entry {
            index: i + 1,
            id: k.id.chars().take(32).collect(),
            problem,
        };
        if !valid_id(&k.id) {
            return Err(bad("id must be 12 lowercase hex digits".into()));
        }
        if !seen.insert(k.id.clone()) {
            return Err(bad("the id appears twice".into()));
        }
        let org = k.organisation.trim();
        if !valid_organisation(org) {
            return Err(bad(
                "organisation must be 1 to 64 letters, digits, '-' or '_' (an ODS code)".into(),
            ));
        }
        let mut roles = Vec::new();
        for r in &k.roles {
            roles.push(Role::parse(r).ok_or_else(|| {
                bad(format!(
                    "unknown role {r:?} (roles are \"checker\" and \"admin\")"
                ))
            })?);
        }
        if roles.is_empty() {
            return Err(bad("roles is empty".into()));
        }
        let mut bases = Vec::new();
        for b in &k.exempt_bases {
            match LegalBasis::parse(b) {
                None if b == "section-251" => {
                    return Err(bad(
                        "exempt basis \"section-251\" is no longer accepted: a section 251 \
                         approval leaves the national data opt-out in force unless its CAG \
                         decision sets it aside. Grant \"cag-opt-out-set-aside\" to keys whose \
                         approval does, and nothing to the others"
                            .into(),
                    ));
                }
                Some(LegalBasis::None) | None => {
                    let names: Vec<&str> = LegalBasis::EXEMPT.iter().map(|b| b.name()).collect();
                    return Err(bad(format!(
                        "unknown exempt basis {b:?} (exempt_bases are {})",
                        names.join(", ")
                    )));
                }
                Some(basis) => bases.push(basis),
            }
        }
        let purposes = match &k.purposes {
            None => Purpose::DEFAULT_GRANTED.to_vec(),
            Some(names) => {
                let mut purposes = Vec::new();
                for p in names {
                    purposes.push(Purpose::parse(p).ok_or_else(|| {
                        let known: Vec<&str> = Purpose::ALL.iter().map(|p| p.name()).collect();
                        bad(format!(
                            "unknown purpose {p:?} (purposes are {})",
                            known.join(", ")
                        ))
                    })?);
                }
                if purposes.is_empty() {
                    return Err(bad(
                        "purposes is empty: list what the key may check for, or leave it out \
                         for research and planning"
                            .into(),
                    ));
                }
                purposes
            }
        };
        let hex = k
            .hash
            .strip_prefix("sha256:")
            .ok_or_else(|| bad("hash must start with \"sha256:\"".into()))?;
        let hash = decode_hex32(hex).ok_or_else(|| bad("hash must be 64 hex digits".into()))?;
        out.push((
            k.id.clone(),
            Caller {
                organisation: org.to_string(),
                key_id: k.id.clone(),
                roles,
                bases,
                purposes,
            },
            hash,
        ));
    }
    Ok(out)
}

fn decode_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The SHA-256 of a whole key, as the keys file stores it.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A new key: returns `(key, keys-file entry)`. The key is shown once; only its hash is stored.
/// The entry lists no purposes (research and planning) and no exempt bases.
pub fn new_key(organisation: &str, roles: &[Role]) -> (String, String) {
    let mut id = [0u8; 6];
    rand::fill(&mut id);
    let id = crate::trail::hex(&id);
    let mut secret = [0u8; 32];
    rand::fill(&mut secret);
    let key = format!(
        "oo_{id}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let hash = crate::trail::hex(&hash_key(&key));
    let roles: Vec<String> = roles.iter().map(|r| format!("{:?}", r.name())).collect();
    let entry = format!(
        "[[key]]\nid = \"{id}\"\norganisation = \"{organisation}\"\nroles = [{}]\nhash = \"sha256:{hash}\"\n",
        roles.join(", ")
    );
    (key, entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_claims_only_the_exempt_bases_listed_for_it() {
        let (_, entry) = new_key("RX1", &[Role::Checker]);
        let plain = parse_keys_file(&entry).expect("parses");
        assert!(plain[0].1.may_claim(LegalBasis::None));
        assert!(!plain[0].1.may_claim(LegalBasis::Consent));
        let listed = format!("{entry}exempt_bases = [\"consent\", \"cag-opt-out-set-aside\"]\n");
        let caller = &parse_keys_file(&listed).expect("parses")[0].1;
        assert!(
            caller.may_claim(LegalBasis::Consent)
                && caller.may_claim(LegalBasis::CagOptOutSetAside)
        );
        assert!(!caller.may_claim(LegalBasis::PublicInterest));
        let wrong = format!("{entry}exempt_bases = [\"none\"]\n");
        let e = parse_keys_file(&wrong).expect_err("none is not an exempt basis");
        assert!(
            e.to_string().contains("unknown exempt basis \"none\""),
            "{e}"
        );
        assert!(Caller::anonymous().may_claim(LegalBasis::Anonymised));
        let old = format!("{entry}exempt_bases = [\"section-251\"]\n");
        let e = parse_keys_file(&old).expect_err("the former section-251 grant");
        assert!(e.to_string().contains("cag-opt-out-set-aside"), "{e}");
    }

    #[test]
    fn a_key_claims_only_its_purposes_and_direct_care_only_by_name() {
        let (_, entry) = new_key("RX1", &[Role::Checker]);
        let plain = &parse_keys_file(&entry).expect("parses")[0].1;
        assert!(plain.may_purpose(Purpose::Research) && plain.may_purpose(Purpose::Planning));
        assert!(!plain.may_purpose(Purpose::DirectCare));
        let care = format!("{entry}purposes = [\"direct-care\"]\n");
        let care = &parse_keys_file(&care).expect("parses")[0].1;
        assert!(care.may_purpose(Purpose::DirectCare) && !care.may_purpose(Purpose::Research));
        for (bad, says) in [
            ("purposes = []", "purposes is empty"),
            ("purposes = [\"care\"]", "unknown purpose \"care\""),
        ] {
            let e = parse_keys_file(&format!("{entry}{bad}\n")).expect_err(bad);
            assert!(e.to_string().contains(says), "{e}");
        }
        assert!(Caller::anonymous().may_purpose(Purpose::DirectCare));
    }

    #[test]
    fn keys_file_errors_name_the_entry_and_field() {
        let (_, good) = new_key("RX1", &[Role::Admin]);
        let (_, other) = new_key("RX2", &[Role::Admin]);
        let bad_role = other.replace("\"admin\"", "\"root\"");
        let err = parse_keys_file(&format!("{good}\n{bad_role}")).expect_err("bad role");
        let msg = err.to_string();
        assert!(msg.contains("entry 2"), "{msg}");
        assert!(msg.contains("unknown role \"root\""), "{msg}");
        assert!(parse_keys_file("[[key]]\nid = 1").is_err());
        assert!(parse_keys_file("").expect("empty file: no keys").is_empty());
        let err = parse_keys_file(&good.replace("sha256:", "md5:")).expect_err("hash");
        assert!(err.to_string().contains("hash"), "{err}");
    }

    #[test]
    fn admins_may_check_but_checkers_may_not_administer() {
        let admin = Caller {
            organisation: "A".into(),
            key_id: "k".into(),
            roles: vec![Role::Admin],
            bases: Vec::new(),
            purposes: Vec::new(),
        };
        assert!(admin.may(Role::Checker) && admin.may(Role::Admin));
    }
}
