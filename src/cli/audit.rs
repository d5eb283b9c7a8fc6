//! `optout audit verify` checks sealed audit trail files (the check log's segments) and
//! `optout audit verify-changes` the changes trail in the consent store; each names the first
//! record that was altered, removed or reordered.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Args, Subcommand};

use super::{CliError, serve::RedisArgs};
use crate::{
    core::{
        AuditKey,
        trail::{self, ChainHead},
    },
    engine::{check_files::segments, sealer},
    store::{
        ConsentStore,
        embedded::{EmbeddedConfig, EmbeddedStore},
        redis::RedisStore,
    },
};

#[derive(Args, Debug)]
pub(super) struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Verify check-log segments: every record's MAC under the audit key, and the chain from
    /// each record to the next. Give the directory (every segment, oldest first) or files in
    /// order. Exit 0 when they verify; 1, naming the file and line, when they do not.
    Verify {
        /// The audit key file the records were sealed under.
        #[arg(long, env = "OPTOUT_AUDIT_KEY_FILE")]
        audit_key_file: PathBuf,
        /// A check-log directory, or segment files in order.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Verify the changes trail (admin changes and reads) in the consent store against its seals:
    /// names the first record altered, removed or added around the service, and any seal altered
    /// or removed. Records written in the last second or so are not sealed yet and are counted.
    /// The embedded store must be stopped (its database is locked while `serve` runs).
    VerifyChanges {
        /// The audit key file the seals were made under.
        #[arg(long, env = "OPTOUT_AUDIT_KEY_FILE")]
        audit_key_file: PathBuf,
        /// The embedded store's directory (instead of a Redis store).
        #[arg(long, conflicts_with_all = ["redis_url", "redis_sentinel", "redis_cluster"])]
        data_dir: Option<PathBuf>,
        #[command(flatten)]
        redis: RedisArgs,
    },
}

pub(super) async fn run(args: AuditArgs) -> Result<ExitCode, CliError> {
    match args.command {
        AuditCommand::Verify {
            audit_key_file,
            paths,
        } => verify_files(&read_key(&audit_key_file)?, &paths),
        AuditCommand::VerifyChanges {
            audit_key_file,
            data_dir,
            redis,
        } => verify_changes(&read_key(&audit_key_file)?, data_dir, &redis).await,
    }
}

fn read_key(path: &Path) -> Result<AuditKey, CliError> {
    let raw = super::client::read_file("--audit-key-file", path)?;
    AuditKey::from_file(&raw)
        .map_err(|e| CliError::Usage(format!("--audit-key-file {}: {e}", path.display())))
}

/// Opens the named store (never creating one) and verifies its changes trail.
async fn verify_changes(
    key: &AuditKey,
    data_dir: Option<PathBuf>,
    redis: &RedisArgs,
) -> Result<ExitCode, CliError> {
    let (store, shown): (Box<dyn ConsentStore>, String) = match (data_dir, redis.config()?) {
        (Some(dir), _) => {
            if !EmbeddedStore::exists_in(&dir) {
                return Err(CliError::Input(format!(
                    "--data-dir {}: no embedded store there",
                    dir.display()
                )));
            }
            let config = EmbeddedConfig {
                data_dir: dir.clone(),
                change_log_len: crate::server::defaults::CHANGE_LOG_LEN,
                cache_bytes: crate::store::embedded::DEFAULT_CACHE_BYTES,
            };
            let (store, _) = tokio::task::spawn_blocking(move || EmbeddedStore::open(&config))
                .await
                .map_err(|e| CliError::Input(format!("opening the store: {e}")))?
                .map_err(|e| CliError::Input(format!("--data-dir {}: {e}", dir.display())))?;
            (
                Box::new(store),
                format!("embedded store in {}", dir.display()),
            )
        }
        (None, Some(config)) => {
            let store = RedisStore::connect(&config).map_err(|e| CliError::Usage(e.to_string()))?;
            store
                .open_dataset()
                .await
                .map_err(|e| CliError::Rpc(format!("{}: {e}", config.describe())))?;
            (Box::new(store), config.describe())
        }
        (None, None) => {
            return Err(CliError::Usage(
                "name the store: --data-dir DIR (embedded), or --redis-url, --redis-sentinel or \
                 --redis-cluster"
                    .into(),
            ));
        }
    };
    let verdict = sealer::verify(store.as_ref(), key)
        .await
        .map_err(|e| CliError::Rpc(format!("{shown}: {e}")))?;
    match verdict {
        Ok(r) => {
            println!(
                "verified: {} records of the changes trail under {} seals (last seal {}), audit \
                 key {}; {} newer records not sealed yet; {} sealed records older than the \
                 oldest present are gone (retention)",
                r.records,
                r.seals,
                r.last_seal,
                key.id(),
                r.unsealed,
                r.gone_before_start
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("NOT VERIFIED: {shown}: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

/// Verifies check-log segment files in order.
fn verify_files(key: &AuditKey, paths: &[PathBuf]) -> Result<ExitCode, CliError> {
    let files = files_of(paths)?;
    let mut head: Option<ChainHead> = None;
    let mut records = 0u64;
    for file in &files {
        let text = std::fs::read_to_string(file)
            .map_err(|e| CliError::Input(format!("{}: {e}", file.display())))?;
        let lines: Vec<&str> = text.lines().collect();
        // The first file may start after segments removed by retention: from its own first line.
        match trail::verify(lines.iter().copied(), key, head, 1) {
            Ok(h) => {
                records += lines.len() as u64;
                if !lines.is_empty() {
                    head = Some(h);
                }
            }
            Err(e) => {
                println!("NOT VERIFIED: {} {e}", file.display());
                return Ok(ExitCode::from(1));
            }
        }
    }
    let last = head.map_or(0, |h| h.seq);
    println!(
        "verified: {records} records in {} files, up to sequence {last}, under audit key {}",
        files.len(),
        key.id()
    );
    Ok(ExitCode::SUCCESS)
}

/// The files to check, in order: a directory's segments, oldest first, or the files as given.
fn files_of(paths: &[PathBuf]) -> Result<Vec<PathBuf>, CliError> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            out.extend(segments(p).map_err(|e| CliError::Input(format!("{}: {e}", p.display())))?);
        } else if Path::new(p).exists() {
            out.push(p.clone());
        } else {
            return Err(CliError::Input(format!("{}: no such file", p.display())));
        }
    }
    Ok(out)
}
