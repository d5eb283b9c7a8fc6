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

use parking_lot::RwLock;
use subtle::ConstantTimeEq;

pub use crate::core::keys::{Caller, KeysFileError, Role, hash_key, new_key, parse_keys_file};

/// One entry of the keys file.
#[derive(Clone, Debug)]
struct KeyEntry {
    hash: [u8; 32],
    /// Shared with every request it authenticates (no copy of its strings per call).
    caller: Arc<Caller>,
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
            .map(|(id, caller, hash)| {
                (
                    id,
                    KeyEntry {
                        hash,
                        caller: Arc::new(caller),
                    },
                )
            })
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
            .is_some_and(|e| *e.caller == *caller)
    }

    /// The caller a key belongs to, if any.
    pub fn authenticate(&self, key: &str) -> Option<Arc<Caller>> {
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
}
