//! `optout audit verify`: checks sealed audit trail files (the check log's segments) and names
//! the first record that was altered, removed or reordered.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Args, Subcommand};

use super::CliError;
use crate::{
    core::{
        AuditKey,
        trail::{self, ChainHead},
    },
    engine::check_files::segments,
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
}

pub(super) fn run(args: AuditArgs) -> Result<ExitCode, CliError> {
    let AuditCommand::Verify {
        audit_key_file,
        paths,
    } = args.command;
    let raw = super::client::read_file("--audit-key-file", &audit_key_file)?;
    let key = AuditKey::from_file(&raw).map_err(|e| {
        CliError::Usage(format!(
            "--audit-key-file {}: {e}",
            audit_key_file.display()
        ))
    })?;
    let files = files_of(&paths)?;
    let mut head: Option<ChainHead> = None;
    let mut records = 0u64;
    for file in &files {
        let text = std::fs::read_to_string(file)
            .map_err(|e| CliError::Input(format!("{}: {e}", file.display())))?;
        let lines: Vec<&str> = text.lines().collect();
        // The first file may start after segments removed by retention: from its own first line.
        match trail::verify(lines.iter().copied(), &key, head, 1) {
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
