//! One vocabulary for every command's output: the kebab-case names the flags take (types
//! `national`, `type1`; purposes `research`, `direct-care`; origins `gp-practice`; reasons
//! `national-data-opt-out`), RFC 3339 times, and `--output json` with the same names.

use clap::ValueEnum;

use crate::cli::client::proto;

/// How a command prints what it found.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum OutputArg {
    /// Lines for people.
    #[default]
    Text,
    /// One JSON document (an object, or an array of records) for scripts.
    Json,
}

/// An opt-out type as the flags name it.
pub(crate) fn opt_out_type(t: i32) -> &'static str {
    match proto::OptOutType::try_from(t) {
        Ok(proto::OptOutType::NationalDataOptOut) => "national",
        Ok(proto::OptOutType::Type1) => "type1",
        _ => "unknown",
    }
}

/// A proto enum's name without its prefix, in kebab case: `REASON_NATIONAL_DATA_OPT_OUT` is
/// `national-data-opt-out`.
fn kebab_of(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix)
        .to_ascii_lowercase()
        .replace('_', "-")
}

/// A decision's outcome: `release` or `withhold`.
pub(crate) fn outcome(o: i32) -> String {
    proto::Outcome::try_from(o).map_or_else(
        |_| "unknown".into(),
        |o| kebab_of(o.as_str_name(), "OUTCOME_"),
    )
}

/// A decision's reason: `no-opt-out`, `national-data-opt-out`, `type-1-opt-out`, ...
pub(crate) fn reason(r: i32) -> String {
    proto::Reason::try_from(r).map_or_else(
        |_| "unknown".into(),
        |r| kebab_of(r.as_str_name(), "REASON_"),
    )
}

/// A name as an audit record holds it (older records hold Rust names such as `GpPractice` or
/// `NationalDataOptOut`) in kebab case: `gp-practice`, `national-data-opt-out`. Names already in
/// kebab case pass unchanged.
pub(crate) fn recorded(name: &str) -> String {
    // The API's name for it (REASON_TYPE_1_OPT_OUT), not the camel-case split's "type1-".
    if name == "Type1OptOut" {
        return "type-1-opt-out".into();
    }
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Milliseconds since the Unix epoch as RFC 3339 (UTC, to the millisecond); 0 is "never".
pub(crate) fn time(ms: i64) -> String {
    if ms == 0 {
        return "never".into();
    }
    jiff::Timestamp::from_millisecond(ms).map_or_else(
        |_| format!("{ms} ms since the Unix epoch"),
        |t| t.to_string(),
    )
}

/// An RFC 3339 time given to a flag, as ms since the Unix epoch.
pub(crate) fn parse_time(flag: &str, s: &str) -> Result<i64, super::CliError> {
    s.parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond())
        .map_err(|e| {
            super::CliError::Usage(format!(
                "{flag} {s:?}: {e}; give an RFC 3339 time such as 2026-11-27T09:00:00Z"
            ))
        })
}

/// Prints a JSON value on stdout.
pub(crate) fn print_json(v: &serde_json::Value) -> Result<(), super::CliError> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| super::CliError::Output(format!("json: {e}")))?;
    println!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_flags_kebab_case() {
        assert_eq!(
            reason(proto::Reason::NationalDataOptOut as i32),
            "national-data-opt-out"
        );
        assert_eq!(
            reason(proto::Reason::ExemptCagOptOutSetAside as i32),
            "exempt-cag-opt-out-set-aside"
        );
        assert_eq!(outcome(proto::Outcome::Withhold as i32), "withhold");
        assert_eq!(opt_out_type(proto::OptOutType::Type1 as i32), "type1");
        assert_eq!(recorded("GpPractice"), "gp-practice");
        assert_eq!(recorded("NationalDataOptOut"), "national-data-opt-out");
        assert_eq!(recorded("Research"), "research");
        assert_eq!(recorded("section-251"), "section-251");
        assert_eq!(
            recorded("Type1OptOut"),
            reason(proto::Reason::Type1OptOut as i32)
        );
        assert_eq!(time(1_795_951_207_726), "2026-11-29T11:20:07.726Z");
        assert_eq!(time(0), "never");
        assert_eq!(
            parse_time("--from", "2026-11-29T11:20:07.726Z").expect("parses"),
            1_795_951_207_726
        );
        assert!(parse_time("--from", "yesterday").is_err());
    }
}
