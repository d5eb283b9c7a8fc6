//! Who is calling: API keys, their organisations and roles.
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
//! ```

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use base64::Engine;
use parking_lot::RwLock;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// OptOutCheck.
    Checker,
    /// OptOutAdmin, and checks.
    Admin,
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
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
}

impl Caller {
    /// The caller of a service that runs without keys (loopback development only).
    pub fn anonymous() -> Caller {
        Caller {
            organisation: "anonymous".into(),
            key_id: "-".into(),
            roles: vec![Role::Checker, Role::Admin],
        }
    }

    /// Whether the caller may use a service that needs `role` (admins may also check).
    pub fn may(&self, role: Role) -> bool {
        self.roles.contains(&role) || (role == Role::Checker && self.roles.contains(&Role::Admin))
    }
}

/// One entry of the keys file.
#[derive(Clone, Debug)]
struct KeyEntry {
    hash: [u8; 32],
    caller: Caller,
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
        if org.is_empty()
            || org.len() > 64
            || !org
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
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

fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A new key: returns `(key, keys-file entry)`. The key is shown once; only its hash is stored.
pub fn new_key(organisation: &str, roles: &[Role]) -> (String, String) {
    let mut id = [0u8; 6];
    rand::fill(&mut id);
    let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let mut secret = [0u8; 32];
    rand::fill(&mut secret);
    let key = format!(
        "oo_{id}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let hash: String = hash_key(&key).iter().map(|b| format!("{b:02x}")).collect();
    let roles: Vec<String> = roles.iter().map(|r| format!("{:?}", r.name())).collect();
    let entry = format!(
        "[[key]]\nid = \"{id}\"\norganisation = \"{organisation}\"\nroles = [{}]\nhash = \"sha256:{hash}\"\n",
        roles.join(", ")
    );
    (key, entry)
}

/// The keys in force, reloaded from the file when it changes.
pub struct Keyring {
    path: PathBuf,
    keys: RwLock<HashMap<String, KeyEntry>>,
    stamp: RwLock<Option<(SystemTime, u64)>>,
}

impl Keyring {
    /// Loads the keys file; an unreadable or invalid file is an error at start.
    pub fn load(path: &Path) -> Result<Arc<Keyring>, KeysFileError> {
        let ring = Keyring {
            path: path.to_path_buf(),
            keys: RwLock::new(HashMap::new()),
            stamp: RwLock::new(None),
        };
        ring.reload()?;
        Ok(Arc::new(ring))
    }

    fn reload(&self) -> Result<usize, KeysFileError> {
        let io = |error| KeysFileError::Io {
            path: self.path.display().to_string(),
            error,
        };
        let meta = std::fs::metadata(&self.path).map_err(io)?;
        let text = std::fs::read_to_string(&self.path).map_err(io)?;
        let entries = parse_keys_file(&text)?;
        let count = entries.len();
        *self.keys.write() = entries
            .into_iter()
            .map(|(id, caller, hash)| (id, KeyEntry { hash, caller }))
            .collect();
        *self.stamp.write() = meta.modified().ok().map(|m| (m, meta.len()));
        Ok(count)
    }

    /// Rereads the file if its modification time or size changed. A file that became invalid is
    /// reported and the keys in force stay.
    pub fn reload_if_changed(&self) {
        let Ok(meta) = std::fs::metadata(&self.path) else {
            tracing::error!(path = %self.path.display(), "keys file unreadable; keeping the keys in force");
            return;
        };
        let stamp = meta.modified().ok().map(|m| (m, meta.len()));
        if stamp.is_some() && stamp == *self.stamp.read() {
            return;
        }
        match self.reload() {
            Ok(n) => tracing::info!(keys = n, "keys file reloaded"),
            Err(e) => tracing::error!(error = %e, "keys file invalid; keeping the keys in force"),
        }
    }

    /// Reloads every `every` until the process ends (Kubernetes updates mounted Secrets in place).
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let ring = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let r = ring.clone();
                let _ = tokio::task::spawn_blocking(move || r.reload_if_changed()).await;
            }
        })
    }

    /// Whether the key `key_id` of `caller` is still in force with the same organisation and
    /// roles (a key removed from the file, or changed, stops being honoured by open streams too).
    pub fn still_valid(&self, caller: &Caller) -> bool {
        self.keys
            .read()
            .get(&caller.key_id)
            .is_some_and(|e| e.caller == *caller)
    }

    /// The caller a key belongs to, if any.
    pub fn authenticate(&self, key: &str) -> Option<Caller> {
        let id = key.strip_prefix("oo_")?.get(..12)?;
        let keys = self.keys.read();
        let entry = keys.get(id)?;
        bool::from(entry.hash.ct_eq(&hash_key(key))).then(|| entry.caller.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_authenticates_and_others_do_not() {
        let (key, entry) = new_key("RX1", &[Role::Checker]);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, &entry).expect("write");
        let ring = Keyring::load(&path).expect("load");
        let caller = ring.authenticate(&key).expect("known key");
        assert_eq!(caller.organisation, "RX1");
        assert!(caller.may(Role::Checker));
        assert!(!caller.may(Role::Admin));
        let mut forged = key.clone();
        forged.pop();
        forged.push(if key.ends_with('A') { 'B' } else { 'A' });
        assert!(ring.authenticate(&forged).is_none());
        assert!(ring.authenticate("oo_").is_none());
        assert!(ring.authenticate("").is_none());
        assert!(!entry.contains(&key), "the file holds only the hash");
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
        };
        assert!(admin.may(Role::Checker) && admin.may(Role::Admin));
    }
}
