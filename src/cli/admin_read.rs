//! The admin commands that read and print: `admin get`, `admin status`, `admin audit`, in the
//! CLI's vocabulary (`words`), as text or JSON.

use std::{process::ExitCode, time::Duration};

use super::{
    CliError,
    admin::Admin,
    words::{self, OutputArg},
};
use crate::cli::client::proto::{self, GetOptOutRequest, GetStatusRequest};

pub(super) async fn get(
    client: &mut Admin,
    nhs_number: String,
    timeout: Duration,
    output: OutputArg,
) -> Result<ExitCode, CliError> {
    // Say which scheme the number is in, and why it is refused when it is.
    let digits: String = nhs_number.chars().filter(char::is_ascii_digit).collect();
    let scheme = digits
        .parse::<u64>()
        .ok()
        .filter(|_| digits.len() == 10)
        .map(crate::core::Scheme::of);
    let shown_scheme = match (crate::core::NhsNumber::parse(&nhs_number), scheme) {
        (Ok(n), _) => n.scheme().describe(),
        (Err(e), Some(s)) => {
            return Err(CliError::Input(format!(
                "the NHS number given is not valid ({e}); its range is the {}",
                s.describe()
            )));
        }
        (Err(e), None) => {
            return Err(CliError::Input(format!(
                "the NHS number given is not valid: {e}"
            )));
        }
    };
    let mut request = tonic::Request::new(GetOptOutRequest {
        nhs_number: nhs_number.clone(),
    });
    request.set_timeout(timeout);
    let r = client.get_opt_out(request).await?.into_inner();
    if output == OutputArg::Json {
        let opt_outs: Vec<_> = r
            .opt_outs
            .iter()
            .map(|o| {
                let mut v = serde_json::json!({
                    "type": words::opt_out_type(o.r#type),
                    "recorded_at": words::time(o.recorded_at_unix_ms),
                    "source": o.source,
                });
                if !o.practices.is_empty()
                    && let Some(obj) = v.as_object_mut()
                {
                    obj.insert("practices".into(), o.practices.clone().into());
                }
                v
            })
            .collect();
        words::print_json(&serde_json::json!({
            "nhs_number": nhs_number,
            "scheme": shown_scheme,
            "opt_outs": opt_outs,
            "version": r.version,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("scheme: {shown_scheme}");
    if r.opt_outs.is_empty() {
        println!("no opt-out recorded (version {})", r.version);
    }
    for o in r.opt_outs {
        println!(
            "{}\trecorded {}\tsource {}{}",
            words::opt_out_type(o.r#type),
            words::time(o.recorded_at_unix_ms),
            o.source,
            if o.practices.is_empty() {
                String::new()
            } else {
                format!("\tpractices {}", o.practices.join(","))
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn audit(
    client: &mut Admin,
    query: proto::ReadAuditRequest,
    timeout: Duration,
    (output, show_parts): (OutputArg, bool),
) -> Result<ExitCode, CliError> {
    // The caller asked for one record more than it shows (the server gives at most 10,000).
    let shown = usize::try_from(query.limit.saturating_sub(1)).unwrap_or(usize::MAX);
    let mut request = tonic::Request::new(query);
    request.set_timeout(timeout);
    let mut r = client.read_audit(request).await?.into_inner();
    let more = if r.records.len() > shown {
        r.records.truncate(shown);
        Some("more records match")
    } else if r.records.len() == shown && shown == 10_000 {
        Some("more records may match")
    } else {
        None
    };
    if let (Some(more), Some(last)) = (more, r.records.last()) {
        eprintln!(
            "{more}: read on with --from {} (records of that millisecond shown here come again)",
            words::time(last.at_unix_ms)
        );
    }
    if output == OutputArg::Json {
        let records: Vec<_> = r.records.iter().map(audit_json).collect();
        words::print_json(&serde_json::Value::Array(records))?;
        return Ok(ExitCode::SUCCESS);
    }
    // An import's parts (import-added, import-removed: 10,000 numbers a record) fold into its
    // line: the main record's, or one line for parts whose main record is not on this page.
    let mut folded: std::collections::BTreeMap<String, Parts> = std::collections::BTreeMap::new();
    if !show_parts {
        for e in r.records.iter().filter(|e| is_part(e)) {
            let p = folded.entry(e.part_of.clone()).or_default();
            let (records, numbers) = if e.action == "import-added" {
                (&mut p.added_records, &mut p.added)
            } else {
                (&mut p.removed_records, &mut p.removed)
            };
            *records += 1;
            *numbers += e.digests;
        }
    }
    let mains: std::collections::HashSet<String> = r
        .records
        .iter()
        .filter(|e| !is_part(e) && !e.part_of.is_empty())
        .map(|e| e.part_of.clone())
        .collect();
    for e in r.records {
        if !show_parts && is_part(&e) {
            if !mains.contains(&e.part_of)
                && let Some(p) = folded.remove(&e.part_of)
            {
                println!(
                    "{}	{}	key {}	import parts	import {} (its main record is not on this page)	{}",
                    words::time(e.at_unix_ms),
                    e.organisation,
                    e.key_id,
                    e.part_of,
                    p.describe()
                );
            }
            continue;
        }
        let parts = folded
            .get(&e.part_of)
            .filter(|_| !is_part(&e))
            .map(|p| format!("\t{}", p.describe()))
            .unwrap_or_default();
        println!("{}", record_line(&e));
        if !parts.is_empty() {
            println!("\t{}", parts.trim_start());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One audit record as a line of text (tab-separated).
fn record_line(e: &proto::AuditEntry) -> String {
    let withheld: Vec<String> = e
        .withheld
        .iter()
        .map(|(k, v)| format!("{}={v}", words::recorded(k)))
        .collect();
    // A check's count of numbers applied is what it released.
    let applied = if e.action == "check" {
        "released"
    } else {
        "applied"
    };
    format!(
        "{}\t{}\tkey {}\t{}\t{}\tcount {}\t{applied} {}\t{}\tversion {}",
        words::time(e.at_unix_ms),
        e.organisation,
        e.key_id,
        e.action,
        [
            words::recorded_type(&e.opt_out_type),
            e.source.clone(),
            e.extract_id.clone(),
            words::recorded(&e.purpose),
            words::recorded(&e.origin),
            e.legal_basis.clone(),
            if e.part_of.is_empty() {
                String::new()
            } else {
                format!("import {}", e.part_of)
            },
            if e.population > 0 {
                format!(
                    "national check of {} patients at {}",
                    e.population,
                    words::time(e.checked_at_unix_ms)
                )
            } else {
                String::new()
            },
            if e.override_reason.is_empty() {
                String::new()
            } else {
                format!("overridden: {}", e.override_reason)
            },
            if e.practice.is_empty() {
                String::new()
            } else {
                format!("practice {}", e.practice)
            },
        ]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" "),
        e.count,
        e.applied,
        if withheld.is_empty() {
            String::new()
        } else {
            format!("withheld {}", withheld.join(","))
        },
        e.version
    )
}

/// Whether a record is one of an import's parts.
fn is_part(e: &proto::AuditEntry) -> bool {
    matches!(e.action.as_str(), "import-added" | "import-removed")
}

/// An import's parts on a page, folded.
#[derive(Default)]
struct Parts {
    added_records: u64,
    added: u64,
    removed_records: u64,
    removed: u64,
}

impl Parts {
    fn describe(&self) -> String {
        format!(
            "parts: {} numbers added in {} records, {} removed in {} records (--parts shows them)",
            self.added, self.added_records, self.removed, self.removed_records
        )
    }
}

/// One audit record as JSON, in the CLI's names.
fn audit_json(e: &proto::AuditEntry) -> serde_json::Value {
    let withheld: serde_json::Map<String, serde_json::Value> = e
        .withheld
        .iter()
        .map(|(k, v)| (words::recorded(k), serde_json::Value::from(*v)))
        .collect();
    let text = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let mut v = serde_json::json!({
        "at": words::time(e.at_unix_ms),
        "organisation": e.organisation,
        "key_id": e.key_id,
        "action": e.action,
        "type": text(&e.opt_out_type).map(|t| words::recorded_type(&t)),
        "source": text(&e.source),
        "extract_id": text(&e.extract_id),
        "purpose": text(&e.purpose).map(|p| words::recorded(&p)),
        "origin": text(&e.origin).map(|o| words::recorded(&o)),
        "legal_basis": text(&e.legal_basis),
        "basis_reference": text(&e.basis_reference),
        "count": e.count,
        "withheld": withheld,
        "digests": e.digests,
        "version": e.version,
        "import": text(&e.part_of),
        "override_reason": text(&e.override_reason),
        "practice": text(&e.practice),
    });
    if let Some(obj) = v.as_object_mut() {
        let key = if e.action == "check" {
            "released"
        } else {
            "applied"
        };
        obj.insert(key.into(), e.applied.into());
        if e.population > 0 {
            obj.insert("population".into(), e.population.into());
            obj.insert(
                "checked_at".into(),
                words::time(e.checked_at_unix_ms).into(),
            );
        }
        obj.retain(|_, v| !v.is_null());
    }
    v
}

pub(super) async fn status(
    client: &mut Admin,
    timeout: Duration,
    output: OutputArg,
) -> Result<ExitCode, CliError> {
    let mut request = tonic::Request::new(GetStatusRequest {});
    request.set_timeout(timeout);
    let r = client.get_status(request).await?.into_inner();
    if output == OutputArg::Json {
        words::print_json(&status_json(&r))?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "store:                    {} (dataset {})",
        r.store_kind, r.dataset_id
    );
    println!("version:                  {}", r.version);
    if !r.server_version.is_empty() {
        println!("server:                   optout {}", r.server_version);
    }
    println!("national data opt-outs:   {}", r.national_data_opt_outs);
    println!("type 1 opt-outs:          {}", r.type_1_opt_outs);
    println!("patients with an opt-out: {}", r.patients);
    for l in &r.lists {
        println!("{}", list_line(l));
    }
    if !r.store_regressed.is_empty() {
        println!(
            "STORE WENT BACK IN TIME:  {} (every number is withheld; restore the lost \
             changes, then `optout admin acknowledge-regression --reason ...`)",
            r.store_regressed
        );
    }
    if let Some(f) = r.filter {
        println!(
            "filter:                   generation {}, {} items of {} capacity, {} bits, {} hashes",
            f.generation, f.items, f.capacity, f.bits, f.hash_functions
        );
        println!(
            "false-positive rate:      target {:.4}%, estimated {:.4}%",
            f.target_false_positive_rate * 100.0,
            f.estimated_false_positive_rate * 100.0
        );
        println!(
            "filter version:           {} ({}, last caught up {} ms ago, bound {} ms)",
            f.version,
            if f.fresh {
                "fresh"
            } else {
                "NOT fresh: checks ask the store"
            },
            f.freshness_age_ms,
            f.freshness_bound_ms
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `status --output json`: the same facts, the CLI's names, RFC 3339 times.
fn status_json(r: &proto::GetStatusResponse) -> serde_json::Value {
    let lists: Vec<_> = r
        .lists
        .iter()
        .map(|l| {
            serde_json::json!({
                "type": words::opt_out_type(l.r#type),
                "mode": l.mode,
                "population": l.population,
                "as_of": (l.as_of_unix_ms > 0).then(|| words::time(l.as_of_unix_ms)),
                "max_age_ms": (l.max_age_ms > 0).then_some(l.max_age_ms),
                "expires_at": (l.max_age_ms > 0).then(|| words::time(l.expires_at_unix_ms)),
                "expired": l.expired,
                "owner": (!l.owner.is_empty()).then(|| l.owner.clone()),
                "practices": l.practices.iter().map(|p| serde_json::json!({
                    "practice": p.practice,
                    "as_of": words::time(p.as_of_unix_ms),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let filter = r.filter.as_ref().map(|f| {
        serde_json::json!({
            "generation": f.generation,
            "items": f.items,
            "capacity": f.capacity,
            "bits": f.bits,
            "hash_functions": f.hash_functions,
            "target_false_positive_rate": f.target_false_positive_rate,
            "estimated_false_positive_rate": f.estimated_false_positive_rate,
            "version": f.version,
            "fresh": f.fresh,
            "freshness_age_ms": f.freshness_age_ms,
            "freshness_bound_ms": f.freshness_bound_ms,
            "loaded_from": f.loaded_from,
        })
    });
    serde_json::json!({
        "store": r.store_kind,
        "dataset": r.dataset_id,
        "server_version": r.server_version,
        "version": r.version,
        "national_data_opt_outs": r.national_data_opt_outs,
        "type_1_opt_outs": r.type_1_opt_outs,
        "patients": r.patients,
        "lists": lists,
        "filter": filter,
        "store_regressed": (!r.store_regressed.is_empty()).then(|| r.store_regressed.clone()),
    })
}

/// One type's list in `status`: its mode, population, date and expiry.
fn list_line(l: &proto::ListCoverage) -> String {
    let name = match proto::OptOutType::try_from(l.r#type) {
        Ok(proto::OptOutType::NationalDataOptOut) => "national list:",
        Ok(proto::OptOutType::Type1) => "type 1 list:",
        _ => "list:",
    };
    let time = words::time;
    let mut parts = vec![format!("{} mode", l.mode)];
    if !l.practices.is_empty() {
        let oldest = l.practices.iter().min_by_key(|p| p.as_of_unix_ms);
        parts.push(format!(
            "{} practice{}{}",
            l.practices.len(),
            if l.practices.len() == 1 { "" } else { "s" },
            oldest.map_or_else(String::new, |p| format!(
                " (oldest list {} of {})",
                p.practice,
                time(p.as_of_unix_ms)
            ))
        ));
    }
    if l.mode == "population" {
        parts.push(format!("population {}", l.population));
        parts.push(if l.owner.is_empty() {
            "no owning organisation named".into()
        } else {
            format!("checks of {} only", l.owner)
        });
    }
    parts.push(if l.as_of_unix_ms > 0 {
        format!("as of {}", time(l.as_of_unix_ms))
    } else {
        "never imported whole".into()
    });
    if l.max_age_ms > 0 {
        let days = l.max_age_ms as f64 / 86_400_000.0;
        parts.push(if l.expired {
            format!("EXPIRED (maximum age {days} days): its numbers are withheld")
        } else {
            format!(
                "expires {} (maximum age {days} days)",
                time(l.expires_at_unix_ms)
            )
        });
    } else {
        parts.push("no maximum age".into());
    }
    format!("{name:<26}{}", parts.join(", "))
}
