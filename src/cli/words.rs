//! One vocabulary for every command's output: the kebab-case names the flags take (types
//! `national`, `type-1`; purposes `research`, `direct-care`; origins `gp-practice`; reasons
//! `national-data-opt-out`), RFC 3339 times, and `--output json` with the same names.

use clap::ValueEnum;

use crate::{cli::client::proto, core::OptOutType};

/// How a command prints what it found.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum OutputArg {
    /// Lines for people.
    #[default]
    Text,
    /// One JSON document (an object, or an array of records) for scripts.
    Json,
}

/// An opt-out type as the flags name it ([`OptOutType::name`], the one spelling).
pub(crate) fn opt_out_type(t: i32) -> &'static str {
    match proto::OptOutType::try_from(t) {
        Ok(proto::OptOutType::NationalDataOptOut) => OptOutType::NationalDataOptOut.name(),
        Ok(proto::OptOutType::Type1) => OptOutType::Type1.name(),
        _ => "unknown",
    }
}

/// An opt-out type as an audit record holds it, in today's spelling (records written before
/// hold `type1` or the Rust name `Type1`).
pub(crate) fn recorded_type(name: &str) -> String {
    OptOutType::parse(name).map_or_else(|| recorded(name), |t| t.name().to_string())
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

/// Milliseconds since the Unix epoch as RFC 3339 (UTC, always three fractional digits, so times
/// sort as text); 0 is "never".
pub(crate) fn time(ms: i64) -> String {
    if ms == 0 {
        return "never".into();
    }
    jiff::Timestamp::from_millisecond(ms).map_or_else(
        |_| format!("{ms} ms since the Unix epoch"),
        |t| format!("{t:.3}"),
    )
}

/// A length of time as people write it: `500ms`, `2s`, `90m`, `8d`, `1h30m` (a day is 24 hours),
/// or an ISO 8601 duration (`PT2S`). For clap's `value_parser`.
pub(crate) fn duration_arg(s: &str) -> Result<std::time::Duration, String> {
    let span: jiff::Span = s.trim().parse().map_err(|e| {
        format!("{s:?} is not a length of time ({e}); write it as 500ms, 2s, 90m, 8d or 1h30m")
    })?;
    let d = span
        .to_duration(jiff::SpanRelativeTo::days_are_24_hours())
        .map_err(|e| format!("{s:?}: {e}"))?;
    std::time::Duration::try_from(d).map_err(|_| format!("{s:?} is negative"))
}

/// A flag counted in `unit`s (ms, seconds, days) as people write it: a bare number in the flag's
/// unit, as before (`--idle-timeout-secs 300`), or a length of time with its own (`5m`, `2s`,
/// `8d`), which must come to a whole number of the flag's unit.
fn in_units(s: &str, unit: std::time::Duration, name: &str) -> Result<u64, String> {
    if let Ok(n) = s.trim().parse::<u64>() {
        return Ok(n);
    }
    let d = duration_arg(s).map_err(|_| {
        format!("{s:?} is not a length of time: write a number of {name}, or 500ms, 2s, 5m, 8d")
    })?;
    let units = d.as_nanos() / unit.as_nanos();
    if units * unit.as_nanos() != d.as_nanos() {
        return Err(format!("{s:?} is not a whole number of {name}"));
    }
    u64::try_from(units).map_err(|_| format!("{s:?} is too long"))
}

/// For `*-ms` flags: ms, or a length of time (`2s`).
pub(crate) fn millis(s: &str) -> Result<u64, String> {
    in_units(s, std::time::Duration::from_millis(1), "milliseconds")
}

/// For `*-secs` flags: seconds, or a length of time (`5m`).
pub(crate) fn secs(s: &str) -> Result<u64, String> {
    in_units(s, std::time::Duration::from_secs(1), "seconds")
}

/// For `*-days` flags: days, or a length of time (`2w`).
pub(crate) fn days(s: &str) -> Result<u64, String> {
    in_units(s, std::time::Duration::from_secs(86_400), "days")
}

/// An RFC 3339 time, or a date (its start, UTC): the two absolute forms every time flag takes.
pub(crate) fn instant(s: &str) -> Option<jiff::Timestamp> {
    s.parse::<jiff::Timestamp>().ok().or_else(|| {
        let date = s.parse::<jiff::civil::Date>().ok()?;
        format!("{date}T00:00:00Z").parse().ok()
    })
}

/// A time as people give it: RFC 3339 (`2026-11-27T09:00:00Z`), a date (its start, UTC), or how
/// long ago (`24h`, `7d`), as ms since the Unix epoch. For clap's `value_parser`.
pub(crate) fn time_arg(s: &str) -> Result<i64, String> {
    if let Some(t) = instant(s) {
        return Ok(t.as_millisecond());
    }
    let ago = duration_arg(s).map_err(|_| {
        format!(
            "{s:?} is not a time: give an RFC 3339 time (2026-11-27T09:00:00Z), a date \
             (2026-11-27) or how long ago (24h, 7d)"
        )
    })?;
    let now = jiff::Timestamp::now().as_millisecond();
    Ok(now.saturating_sub(i64::try_from(ago.as_millis()).unwrap_or(i64::MAX)))
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
        assert_eq!(opt_out_type(proto::OptOutType::Type1 as i32), "type-1");
        for old in ["type1", "Type1", "type-1"] {
            assert_eq!(recorded_type(old), "type-1");
        }
        assert_eq!(recorded_type("national"), "national");
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
        assert_eq!(time_arg("2026-11-29T11:20:07.726Z"), Ok(1_795_951_207_726));
    }

    #[test]
    fn durations_and_times_as_people_write_them() {
        use std::time::Duration;
        assert_eq!(duration_arg("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration_arg("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(duration_arg("8d"), Ok(Duration::from_secs(8 * 86_400)));
        assert_eq!(duration_arg("1h30m"), Ok(Duration::from_secs(5_400)));
        assert!(duration_arg("2").is_err_and(|e| e.contains("500ms, 2s")));
        assert!(duration_arg("soon").is_err());
        assert_eq!(time_arg("2026-11-27T09:00:00Z"), Ok(1_795_770_000_000));
        assert_eq!(time_arg("2026-11-27"), Ok(1_795_737_600_000));
        let now = jiff::Timestamp::now().as_millisecond();
        let day_ago = time_arg("24h").expect("relative");
        assert!((now - 86_400_000 - day_ago).abs() < 5_000, "{day_ago}");
        assert!(time_arg("yesterday").is_err_and(|e| e.contains("how long ago")));
        // The unit flags: a bare number in their unit as before, or a length of time.
        assert_eq!((millis("2000"), millis("2s")), (Ok(2000), Ok(2000)));
        assert_eq!((secs("300"), secs("5m")), (Ok(300), Ok(300)));
        assert_eq!((days("400"), days("2w")), (Ok(400), Ok(14)));
        assert!(secs("1500ms").is_err_and(|e| e.contains("whole number of seconds")));
        assert!(days("soon").is_err_and(|e| e.contains("number of days")));
        // Three fractional digits always: these sort as text in time order.
        assert_eq!(time(1_795_770_000_620), "2026-11-27T09:00:00.620Z");
        assert_eq!(time(1_795_770_000_000), "2026-11-27T09:00:00.000Z");
    }

    /// One spelling a concept: what the command line prints for a type or a reason it got over
    /// the API is the core's name for it, which logs, metrics and audit records use too.
    #[test]
    fn the_command_line_spells_types_and_reasons_as_the_core_names_them() {
        use crate::core::{Decision, WithholdReason};
        use clap::ValueEnum;
        for arg in crate::cli::TypeArg::value_variants() {
            let core: OptOutType = (*arg).into();
            let typed = arg.to_possible_value().map(|v| v.get_name().to_string());
            assert_eq!(typed.as_deref(), Some(core.name()));
            let wire = proto::convert::opt_out_type_to_proto(core) as i32;
            assert_eq!(opt_out_type(wire), core.name());
        }
        for r in [
            WithholdReason::NationalDataOptOut,
            WithholdReason::Type1OptOut,
            WithholdReason::InvalidNhsNumber,
            WithholdReason::StoreUnavailable,
            WithholdReason::StoreRegressed,
            WithholdReason::VersionNotReached,
            WithholdReason::NotInCheckedPopulation,
            WithholdReason::ListTooOld,
            WithholdReason::ListNeverImported,
        ] {
            let wire = proto::convert::decision_to_proto(Decision::Withhold(r));
            assert_eq!(reason(wire.reason), r.name(), "{r:?}");
            assert_eq!(outcome(wire.outcome), Decision::Withhold(r).outcome());
        }
    }
}
