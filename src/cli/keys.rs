//! `optout keys`: API keys.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};

use super::CliError;

#[derive(Args, Debug)]
pub(super) struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
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
        #[arg(long = "exempt-basis", value_enum)]
        exempt_bases: Vec<super::BasisArg>,
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
            } => new_key(&keys_file, &organisation, &roles, &exempt_bases),
        }
    }
}

fn new_key(
    path: &Path,
    organisation: &str,
    roles: &[RoleArg],
    bases: &[super::BasisArg],
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
    println!("{key}");
    Ok(())
}
