//! `optout keys`: API keys.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};

use super::CliError;

#[derive(Args, Debug)]
pub(super) struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
    /// What `new` and `list` print: text, or json (for scripts).
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = super::words::OutputArg::Text)]
    output: super::words::OutputArg,
}

#[derive(Subcommand, Debug)]
pub(super) enum KeysCommand {
    /// Make a key: prints it once, appends only its hash to the keys file.
    New {
        /// The keys file (created if missing).
        #[arg(long, env = "OPTOUT_KEYS_FILE")]
        keys_file: PathBuf,
        /// The organisation the key belongs to (ODS code).
        #[arg(long)]
        organisation: String,
        /// Roles: checker (OptOutCheck), admin (OptOutAdmin and checks).
        #[arg(long = "role", value_enum, required = true)]
        roles: Vec<RoleArg>,
        /// An exempt legal basis the key may claim in checks (repeat for more); none by default.
        #[arg(long = "exempt-basis", value_parser = exempt_basis())]
        exempt_bases: Vec<super::BasisArg>,
        /// A purpose the key may check for (repeat for more); research and planning by default.
        /// direct-care releases every valid number: grant it only to direct care systems.
        #[arg(long = "purpose", value_enum)]
        purposes: Vec<super::PurposeArg>,
    },
    /// List the keys in a keys file: id, organisation, roles, purposes, exempt bases (never a
    /// secret: the file holds only hashes).
    List {
        /// The keys file.
        #[arg(long, env = "OPTOUT_KEYS_FILE")]
        keys_file: PathBuf,
    },
    /// Revoke a key: remove its entry from the keys file (the rest of the file, comments
    /// included, is kept). Running servers re-read the file every 2 s and stop honouring the
    /// key then, on streams already open too.
    Revoke {
        /// The keys file.
        #[arg(long, env = "OPTOUT_KEYS_FILE")]
        keys_file: PathBuf,
        /// The key's id (the 12 hex digits after `oo_`, as `keys list` shows).
        #[arg(long)]
        id: String,
    },
    /// Make an audit key: base64 of 32 random bytes on stdout, for --audit-key-file. Every
    /// replica must use the same one (digests of NHS numbers are keyed with it).
    AuditKey,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub(super) enum RoleArg {
    Checker,
    Admin,
}

impl KeysArgs {
    pub(super) fn run(self) -> Result<(), CliError> {
        match self.command {
            KeysCommand::AuditKey => {
                print!("{}", crate::core::AuditKey::generate());
                eprintln!(
                    "a new audit key (base64 of 32 random bytes) is on stdout: store it as a secret \
                     shared by every replica, e.g. `optout keys audit-key > audit.key`"
                );
                Ok(())
            }
            KeysCommand::New {
                keys_file,
                organisation,
                roles,
                exempt_bases,
                purposes,
            } => new_key(
                &keys_file,
                &organisation,
                (&roles, &exempt_bases, &purposes),
                self.output,
            ),
            KeysCommand::List { keys_file } => list(&keys_file, self.output),
            KeysCommand::Revoke { keys_file, id } => revoke(&keys_file, &id),
        }
    }
}

fn new_key(
    path: &Path,
    organisation: &str,
    (roles, bases, purposes): (&[RoleArg], &[super::BasisArg], &[super::PurposeArg]),
    output: super::words::OutputArg,
) -> Result<(), CliError> {
    use std::io::Write;
    let roles: Vec<crate::auth::Role> = roles
        .iter()
        .map(|r| match r {
            RoleArg::Checker => crate::auth::Role::Checker,
            RoleArg::Admin => crate::auth::Role::Admin,
        })
        .collect();
    let (key, mut entry) = crate::auth::new_key(organisation, &roles);
    if !bases.is_empty() {
        let names: Vec<String> = bases
            .iter()
            .filter_map(|b| b.to_possible_value())
            .map(|v| format!("{:?}", v.get_name()))
            .collect();
        entry.push_str(&format!("exempt_bases = [{}]\n", names.join(", ")));
    }
    if !purposes.is_empty() {
        let names: Vec<String> = purposes
            .iter()
            .filter_map(|p| p.to_possible_value())
            .map(|v| format!("{:?}", v.get_name()))
            .collect();
        entry.push_str(&format!("purposes = [{}]\n", names.join(", ")));
    }
    // Check the entry the way the server will, before touching the file.
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    crate::auth::parse_keys_file(&format!("{existing}\n{entry}"))
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| CliError::Output(format!("{}: {e}", path.display())))?;
    writeln!(file, "\n{entry}")
        .map_err(|e| CliError::Output(format!("{}: {e}", path.display())))?;
    eprintln!(
        "added a key for {organisation} to {}; it is shown once, store it now:",
        path.display()
    );
    if output == super::words::OutputArg::Json {
        // The id is the key's public part: `oo_<id>_<secret>`.
        let id = key.split('_').nth(1).unwrap_or_default();
        return super::words::print_json(&serde_json::json!({
            "key": key,
            "id": id,
            "organisation": organisation,
            "keys_file": path.display().to_string(),
        }));
    }
    println!("{key}");
    Ok(())
}

fn read_keys(path: &Path) -> Result<(String, Vec<(String, crate::auth::Caller)>), CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Input(format!("{}: {e}", path.display())))?;
    let keys = crate::auth::parse_keys_file(&text)
        .map_err(|e| CliError::Input(format!("{}: {e}", path.display())))?
        .into_iter()
        .map(|(id, caller, _)| (id, caller))
        .collect();
    Ok((text, keys))
}

fn list(path: &Path, output: super::words::OutputArg) -> Result<(), CliError> {
    let (_, keys) = read_keys(path)?;
    let row = |c: &crate::auth::Caller| {
        let roles: Vec<&str> = c.roles().iter().map(|r| r.name()).collect();
        let bases: Vec<&str> = c.bases().iter().map(|b| b.name()).collect();
        let purposes: Vec<&str> = c.purposes().iter().map(|p| p.name()).collect();
        (roles, bases, purposes)
    };
    if output == super::words::OutputArg::Json {
        let all: Vec<_> = keys
            .iter()
            .map(|(id, c)| {
                let (roles, bases, purposes) = row(c);
                serde_json::json!({
                    "id": id,
                    "organisation": c.organisation,
                    "roles": roles,
                    "purposes": purposes,
                    "exempt_bases": bases,
                })
            })
            .collect();
        return super::words::print_json(&serde_json::Value::Array(all));
    }
    for (id, c) in &keys {
        let (roles, bases, purposes) = row(c);
        println!(
            "{id}\t{}\troles {}\tpurposes {}\texempt bases {}",
            c.organisation,
            roles.join(","),
            purposes.join(","),
            if bases.is_empty() {
                "none".to_string()
            } else {
                bases.join(",")
            }
        );
    }
    Ok(())
}

/// Removes the `[[key]]` table whose id is `id`, keeping every other line as it was; the result
/// is checked as the server will read it, then replaces the file in one rename.
fn revoke(path: &Path, id: &str) -> Result<(), CliError> {
    let (text, keys) = read_keys(path)?;
    let Some((_, caller)) = keys.iter().find(|(k, _)| k == id) else {
        return Err(CliError::Input(format!(
            "{}: no key with id {id:?} (`optout keys list` shows the ids)",
            path.display()
        )));
    };
    let mut kept = String::with_capacity(text.len());
    let mut block: Vec<&str> = Vec::new();
    let mut in_key = false;
    let flush = |block: &mut Vec<&str>, kept: &mut String| {
        let is_it = block.iter().any(|l| {
            let l = l.trim();
            l.strip_prefix("id")
                .map(str::trim_start)
                .and_then(|l| l.strip_prefix('='))
                .map(|v| v.trim().trim_matches('"'))
                == Some(id)
        });
        if !is_it {
            for l in block.iter() {
                kept.push_str(l);
                kept.push('\n');
            }
        }
        block.clear();
    };
    for line in text.lines() {
        if line.trim_start().starts_with("[[") {
            if in_key {
                flush(&mut block, &mut kept);
            }
            in_key = line.trim() == "[[key]]";
        }
        if in_key {
            block.push(line);
        } else {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    if in_key {
        flush(&mut block, &mut kept);
    }
    let after = crate::auth::parse_keys_file(&kept)
        .map_err(|e| CliError::Input(format!("{}: after revoking: {e}", path.display())))?;
    if after.iter().any(|(k, _, _)| k == id) || after.len() + 1 != keys.len() {
        return Err(CliError::Input(format!(
            "{}: the entry of key {id} could not be removed cleanly (edit the file by hand); \
             nothing was changed",
            path.display()
        )));
    }
    let tmp = path.with_extension("revoke.tmp");
    std::fs::write(&tmp, &kept)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| CliError::Output(format!("{}: {e}", path.display())))?;
    eprintln!(
        "revoked key {id} of {} in {}; running servers stop honouring it within their reload \
         interval",
        caller.organisation,
        path.display()
    );
    Ok(())
}

/// The exempt legal bases, as --exempt-basis takes them: every basis but `none` (a key without an
/// exempt basis is one given no --exempt-basis), so --help offers only what is accepted.
fn exempt_basis() -> impl clap::builder::TypedValueParser<Value = super::BasisArg> {
    use clap::{ValueEnum, builder::TypedValueParser};
    let names: Vec<clap::builder::PossibleValue> = super::BasisArg::value_variants()
        .iter()
        .filter(|b| **b != super::BasisArg::None)
        .filter_map(|b| b.to_possible_value())
        .collect();
    clap::builder::PossibleValuesParser::new(names)
        .map(|s: String| super::BasisArg::from_str(&s, false).unwrap_or_default())
}
