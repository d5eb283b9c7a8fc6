//! `serve --config FILE`: settings from a TOML file, beneath flags and environment variables.
//!
//! One order of precedence for every setting: a flag on the command line wins over its `OPTOUT_…`
//! environment variable, which wins over the config file, which wins over the built-in default.
//! The file's keys are the long flag names without the dashes in front (`filter-capacity = 5000000`,
//! `listen = "0.0.0.0:50051"`); a key that names no flag, or a value the flag would refuse, is an
//! error that names the file and the key. A flag that takes no value would take `true` or `false`
//! (serve has none today); a list gives the flag once per element.
//!
//! How: the command line is parsed once; every key of the file whose setting came from neither the
//! command line nor the environment is appended as `--key=value`, and the whole is parsed again, so
//! clap validates file values exactly as it validates flags.

use std::{ffi::OsString, path::Path};

use clap::{ArgAction, CommandFactory, FromArgMatches, parser::ValueSource};

use super::Cli;

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The command line (or an environment variable) itself is wrong: clap's own message.
    #[error("{0}")]
    Clap(#[from] clap::Error),
    /// The file could not be read or is not TOML.
    #[error("config file {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// One setting of the file is wrong.
    #[error("config file {path}: setting `{key}`: {reason}")]
    Setting {
        /// The file.
        path: String,
        /// The key as written in the file.
        key: String,
        /// What went wrong.
        reason: String,
    },
}

/// Parses `args` (the program name first) and, for `serve --config FILE`, merges the file in.
pub fn parse(args: Vec<OsString>) -> Result<Cli, ConfigError> {
    let matches = Cli::command().try_get_matches_from(&args)?;
    let Some(("serve", serve)) = matches.subcommand() else {
        return Ok(Cli::from_arg_matches(&matches)?);
    };
    let Some(path) = serve.get_one::<std::path::PathBuf>("config").cloned() else {
        return Ok(Cli::from_arg_matches(&matches)?);
    };
    let (extra, from_file) = file_args(&path, serve)?;
    let mut all = args;
    all.extend(extra);
    let merged = Cli::command()
        .try_get_matches_from(all)
        .map_err(|e| file_error(&path, &from_file, &e))?;
    Ok(Cli::from_arg_matches(&merged)?)
}

/// A value of the file clap refused, named by the file's key (`max-batch`, or an older spelling
/// such as `type1-max-age-days`) rather than the flag clap parsed it as (`--max-batch
/// <MAX_BATCH>`); anything else as clap says it. `from_file` pairs each flag the file set with
/// its key.
fn file_error(path: &Path, from_file: &[(String, String)], e: &clap::Error) -> ConfigError {
    use clap::error::{ContextKind, ContextValue};
    let text = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        Some(ContextValue::Strings(list)) => Some(list.join(", ")),
        _ => None,
    };
    let key = text(ContextKind::InvalidArg).and_then(|flag| {
        let long = flag
            .strip_prefix("--")?
            .split([' ', '='])
            .next()?
            .to_string();
        from_file
            .iter()
            .find(|(flag, _)| *flag == long)
            .map(|(_, key)| key.clone())
    });
    match (key, text(ContextKind::InvalidValue)) {
        (Some(key), Some(value)) => {
            let why = std::error::Error::source(e)
                .map(|s| format!(": {s}"))
                .or_else(|| text(ContextKind::ValidValue).map(|v| format!(" (one of {v})")))
                .unwrap_or_default();
            ConfigError::Setting {
                path: path.display().to_string(),
                key,
                reason: format!("invalid value {value:?}{why}"),
            }
        }
        _ => ConfigError::File {
            path: path.display().to_string(),
            reason: e.render().to_string().trim().to_string(),
        },
    }
}

/// The file's settings as `--flag=value` arguments, leaving out those set by flag or environment,
/// and each flag with the key that set it (a key may be an alias of the flag).
type FileArgs = (Vec<OsString>, Vec<(String, String)>);

/// The file's settings as `--flag=value` arguments, leaving out those set by flag or environment.
fn file_args(path: &Path, given: &clap::ArgMatches) -> Result<FileArgs, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::File {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let mut cli = Cli::command();
    cli.build();
    let serve = cli
        .find_subcommand("serve")
        .ok_or_else(|| ConfigError::File {
            path: shown.clone(),
            reason: "the serve command is missing (a bug)".into(),
        })?;
    let mut out = Vec::new();
    let mut keys = Vec::new();
    for (key, value) in &table {
        let setting = |reason: String| ConfigError::Setting {
            path: shown.clone(),
            key: key.clone(),
            reason,
        };
        let Some(arg) = serve.get_arguments().find(|a| {
            a.get_long() == Some(key.as_str())
                || a.get_all_aliases()
                    .is_some_and(|all| all.contains(&key.as_str()))
        }) else {
            let hint = if key.contains('_') {
                format!(" (keys are the flag names: `{}`)", key.replace('_', "-"))
            } else {
                String::new()
            };
            return Err(setting(format!("no such setting of `optout serve`{hint}")));
        };
        if key == "config" {
            return Err(setting("a config file cannot name another".into()));
        }
        let flag = arg.get_long().unwrap_or(key.as_str()).to_string();
        if let Some(ValueSource::CommandLine | ValueSource::EnvVariable) =
            given.value_source(arg.get_id().as_str())
        {
            continue;
        }
        let flag_only = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
        let values: Vec<&toml::Value> = match value {
            toml::Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        for v in values {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) if flag_only => {
                    if *b {
                        out.push(OsString::from(format!("--{flag}")));
                    }
                    continue;
                }
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(setting(format!(
                        "expected a string, number or boolean, got {}",
                        other.type_str()
                    )));
                }
            };
            if flag_only {
                return Err(setting(format!("takes true or false, got {text:?}")));
            }
            out.push(OsString::from(format!("--{flag}={text}")));
        }
        keys.push((flag, key.clone()));
    }
    Ok((out, keys))
}
