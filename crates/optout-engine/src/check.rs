//! The check path, free of any transport: apply the purpose policy, ask the filter, send the
//! "maybe" numbers to the store in one batched lookup, and record what was released before the
//! answer leaves. Every doubt is WITHHOLD, and nothing is released unrecorded.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    check_log::{CheckLog, PendingCheck},
    filter::{SyncedFilter, VersionWait},
};
use crate::{
    core::{
        Applicable, AuditRecord, DataOrigin, Decision, DecisionCounts, LegalBasis, NhsNumber,
        OptOutSet, Purpose, ReleaseReason, Version, WithholdReason, applicable,
        coverage::{Coverage, CoverageRule},
        decide,
        keys::Caller,
    },
    store::{CheckReads, Lookup},
};

/// One batch to check.
pub struct CheckInput<'a> {
    /// The numbers as sent, parsed by the caller (`None`: not a valid NHS number).
    pub numbers: &'a [Option<NhsNumber>],
    /// Why the data is extracted.
    pub purpose: Purpose,
    /// Who holds it.
    pub origin: DataOrigin,
    /// The legal basis claimed (the caller's key was checked for it).
    pub basis: LegalBasis,
    /// Answer only from a filter (or store) that reflects at least this version.
    pub at_least_version: Option<Version>,
    /// When the answer must be ready; the store lookup is cut off before it.
    pub deadline: Instant,
}

/// Who asked, for the record.
pub struct Requester<'a> {
    /// The authenticated caller.
    pub caller: &'a Caller,
    /// The caller's reference for the extract (empty: none).
    pub extract_id: &'a str,
    /// The reference of the legal basis claimed (the CAG number, the statute, the study).
    pub basis_reference: &'a str,
}

/// The decisions, in input order, and the version they reflect.
#[derive(Clone, Debug)]
pub struct CheckOutput {
    /// One per input number.
    pub decisions: Vec<Decision>,
    /// The store version the answer reflects.
    pub version: Version,
}

/// The check engine shared by Check and CheckStream.
#[derive(Clone)]
pub struct Checker {
    store: Arc<dyn CheckReads>,
    filter: Arc<SyncedFilter>,
    log: Arc<CheckLog>,
}

const STORE_UNAVAILABLE: Decision = Decision::Withhold(WithholdReason::StoreUnavailable);

/// The filter's pass over a batch: the numbers it could not rule out.
struct Screened {
    maybes: Vec<(usize, NhsNumber)>,
    version: Version,
    trusted: bool,
    /// What the lists covered at the filter's version (read under the same lock).
    coverage: Arc<Coverage>,
}

impl Checker {
    /// A checker over a store and the filter that follows it; every answer is recorded in `log`.
    pub fn new(store: Arc<dyn CheckReads>, filter: Arc<SyncedFilter>, log: Arc<CheckLog>) -> Self {
        Checker { store, filter, log }
    }

    /// The organisation a population-mode store belongs to, when it is not `organisation`: the
    /// national check's licence lets an organisation apply the result to its own patients only.
    /// `None`: this caller's checks may be answered here.
    pub fn owned_by_another(&self, organisation: &str) -> Option<String> {
        self.filter
            .coverage()
            .population_owner()
            .filter(|owner| *owner != organisation)
            .map(str::to_string)
    }

    /// Checks one batch and records it. Never fails: what cannot be proven releasable is
    /// withheld, and if the check log cannot take the record (failing past its bound, or full),
    /// everything is withheld rather than released unrecorded.
    pub async fn check(&self, who: &Requester<'_>, input: CheckInput<'_>) -> CheckOutput {
        let (purpose, origin, basis, numbers) =
            (input.purpose, input.origin, input.basis, input.numbers);
        let mut out = self.decide(input).await;
        if !self.log.accepting() {
            withhold_released(&mut out.decisions);
        }
        let mut record = AuditRecord {
            at_ms: i64::try_from(crate::store::now_ms()).unwrap_or(i64::MAX),
            organisation: who.caller.organisation.clone(),
            key_id: who.caller.key_id.clone(),
            action: "check".into(),
            extract_id: Some(who.extract_id.to_string()).filter(|e| !e.is_empty()),
            purpose: Some(purpose.name().to_string()),
            origin: Some(origin.name().to_string()),
            legal_basis: (basis != LegalBasis::None).then(|| basis.name().to_string()),
            basis_reference: Some(who.basis_reference.to_string()).filter(|r| !r.is_empty()),
            count: numbers.len() as u64,
            version: out.version.to_string(),
            ..AuditRecord::default()
        };
        // One pass: the released numbers for the record, and the counts by reason for both the
        // record and the metrics.
        let mut released = Vec::new();
        let mut counts = DecisionCounts::default();
        for (d, n) in out.decisions.iter().zip(numbers) {
            counts.add(d);
            if matches!(d, Decision::Release(_)) {
                released.extend(*n);
            }
        }
        for (r, n) in counts.withheld() {
            record.withheld.insert(r.name().to_string(), n);
        }
        record.applied = released.len() as u64;
        if !self.log.submit(PendingCheck { record, released }) {
            withhold_released(&mut out.decisions);
            counts = DecisionCounts::of(&out.decisions);
        }
        for (outcome, reason, n) in counts.labelled() {
            metrics::counter!("optout_check_numbers_total", "outcome" => outcome, "reason" => reason)
                .increment(n);
        }
        out
    }

    /// The decisions for one batch, before recording.
    async fn decide(&self, input: CheckInput<'_>) -> CheckOutput {
        let policy = applicable(input.purpose, input.origin, input.basis);
        let exempt = matches!(policy, Applicable::Exempt(_));
        let parsed = input.numbers;
        let mut decisions: Vec<Decision> = parsed
            .iter()
            .map(|p| match p {
                None => Decision::Withhold(WithholdReason::InvalidNhsNumber),
                Some(_) if exempt => Decision::Release(policy.release()),
                // Provisional: replaced below by the filter's or the store's answer.
                Some(_) => STORE_UNAVAILABLE,
            })
            .collect();
        if exempt {
            return CheckOutput {
                decisions,
                version: self.filter.version(),
            };
        }
        let valid: Vec<(usize, NhsNumber)> = parsed
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.map(|n| (i, n)))
            .collect();
        // The store lost changes this replica saw: nothing it says can be trusted, and no
        // rebuild from it either, until an admin acknowledges.
        if self.filter.regressed() {
            return self.withhold_all(decisions, &valid, WithholdReason::StoreRegressed);
        }
        // A caller who wrote at version V wants an answer that reflects V: wait for the filter,
        // within the deadline; if it does not get there, ask the store about every number. A V
        // beyond what the store holds (no admin write ever returned it) is answered at once.
        let mut filter_behind = false;
        if let Some(want) = input.at_least_version
            && self.filter.version() < want
        {
            let budget = remaining(input.deadline).mul_f32(0.5);
            match self.filter.wait_for_version(want, budget).await {
                VersionWait::Reached => {}
                VersionWait::Beyond => {
                    metrics::counter!("optout_check_version_not_reached_total").increment(1);
                    return self.withhold_all(decisions, &valid, WithholdReason::VersionNotReached);
                }
                VersionWait::TimedOut => filter_behind = true,
            }
        }
        let screened = self.screen(&valid, &mut decisions, filter_behind, policy.release());
        let (mut coverage, generation) = (screened.coverage.clone(), screened.version);
        let deadline = input.deadline;
        let out = self
            .resolve(decisions, &valid, screened, policy, &input)
            .await;
        if coverage.national_mode.is_none()
            && matches!(policy, Applicable::Types(t, _) if t.contains(crate::core::OptOutType::NationalDataOptOut))
        {
            coverage = self.coverage_before_load(coverage, deadline).await;
        }
        self.cover(out, &valid, policy, &coverage, generation)
    }

    /// Before this replica has read what the store's lists cover (its first moments): asks the
    /// store ([`SyncedFilter::learn_list_coverage`]); still unknown if it cannot say in time.
    async fn coverage_before_load(
        &self,
        unknown: Arc<Coverage>,
        deadline: Instant,
    ) -> Arc<Coverage> {
        let learn = self.filter.learn_list_coverage(self.store.as_ref());
        match tokio::time::timeout(remaining(deadline), learn).await {
            Ok(Some(known)) => known,
            _ => unknown,
        }
    }

    /// What no opt-out withholds may still not be released: a list of an applicable type past its
    /// maximum age, or (in population mode) a number outside the checked population. And in
    /// population mode an answer from another store version than the filter's generation could
    /// pair a newer list with an older population: its releases are withheld.
    fn cover(
        &self,
        mut out: CheckOutput,
        valid: &[(usize, NhsNumber)],
        policy: Applicable,
        coverage: &Coverage,
        generation: Version,
    ) -> CheckOutput {
        let Applicable::Types(types, _) = policy else {
            return out;
        };
        let rule = if coverage.pins_version(types) && out.version != generation {
            CoverageRule::All(WithholdReason::StoreUnavailable)
        } else {
            let max_age = self.filter.config().max_list_age;
            coverage.rule(types, crate::store::now_ms(), &max_age)
        };
        if matches!(rule, CoverageRule::Nothing) {
            return out;
        }
        for (j, &(i, n)) in valid.iter().enumerate() {
            // As for the filter: the memory of the number a few places on is asked for now.
            if let CoverageRule::Outside(p) = rule
                && let Some(&(_, next)) = valid.get(j + super::filter::SCREEN_AHEAD)
            {
                p.prefetch(next);
            }
            if let Decision::Release(_) = out.decisions[i]
                && let Some(reason) = rule.withhold(n)
            {
                out.decisions[i] = Decision::Withhold(reason);
            }
        }
        out
    }

    /// Releases what the filter rules out (when it is trusted); returns the rest.
    fn screen(
        &self,
        valid: &[(usize, NhsNumber)],
        decisions: &mut [Decision],
        filter_behind: bool,
        release: ReleaseReason,
    ) -> Screened {
        let mut maybes: Vec<(usize, NhsNumber)> = Vec::new();
        let view = self.filter.view();
        let coverage = view.coverage();
        let trusted = view.trusted && !filter_behind;
        if !trusted {
            maybes.extend_from_slice(valid);
        } else {
            let mut may = Vec::new();
            view.may_contain_each(valid.iter().map(|&(_, n)| n), &mut may);
            for (&(i, n), may) in valid.iter().zip(may) {
                if may {
                    maybes.push((i, n));
                } else {
                    decisions[i] = Decision::Release(release);
                }
            }
        }
        Screened {
            maybes,
            version: view.version(),
            trusted,
            coverage,
        }
    }

    /// Asks the store about the maybes, so that the whole answer reflects one version.
    async fn resolve(
        &self,
        mut decisions: Vec<Decision>,
        valid: &[(usize, NhsNumber)],
        screened: Screened,
        policy: Applicable,
        input: &CheckInput<'_>,
    ) -> CheckOutput {
        let Screened {
            maybes,
            version: filter_version,
            trusted,
            ..
        } = screened;
        let as_filter = |decisions| CheckOutput {
            decisions,
            version: filter_version,
        };
        if maybes.is_empty() {
            return as_filter(decisions);
        }
        let types = policy.types();
        let Some(found) = self.ask(&maybes, types, input.deadline).await else {
            // The maybes stay withheld as STORE_UNAVAILABLE.
            return as_filter(decisions);
        };
        let lag_ms = found.version.ms.saturating_sub(filter_version.ms);
        metrics::gauge!("optout_filter_version_lag_seconds").set(lag_ms as f64 / 1000.0);
        if found.version < filter_version {
            // The store answered from before what the filter already reflects: it lost changes
            // (or the answer came from a lagging node). Its "no opt-out" proves nothing.
            store_behind_filter(found.version, filter_version);
            return as_filter(decisions);
        }
        if !trusted || found.version == filter_version {
            // Either the store answered for every number, or it was at the filter's version: one
            // consistent state either way.
            let version = if trusted {
                filter_version
            } else {
                found.version
            };
            let at_least = input.at_least_version;
            self.apply(
                &mut decisions,
                &maybes,
                found.held,
                policy,
                at_least,
                found.version,
            );
            return CheckOutput { decisions, version };
        }
        // The store moved past the filter between the two reads, so the filter's "absent" answers
        // and the store's answers come from different versions: a caller could see part of a
        // change (half of a REPLACE import). Ask the store for every number, so the whole answer
        // reflects one version; if it cannot answer, withhold everything rather than mix.
        let all = self.ask(valid, types, input.deadline).await.filter(|all| {
            let current = all.version >= filter_version;
            if !current {
                store_behind_filter(all.version, filter_version);
            }
            current
        });
        match all {
            Some(all) => {
                let version = all.version;
                let at_least = input.at_least_version;
                self.apply(&mut decisions, valid, all.held, policy, at_least, version);
                CheckOutput { decisions, version }
            }
            None => {
                for &(i, _) in valid {
                    decisions[i] = STORE_UNAVAILABLE;
                }
                as_filter(decisions)
            }
        }
    }

    /// Every valid number withheld for `reason`, without asking the store.
    fn withhold_all(
        &self,
        mut decisions: Vec<Decision>,
        valid: &[(usize, NhsNumber)],
        reason: WithholdReason,
    ) -> CheckOutput {
        for &(i, _) in valid {
            decisions[i] = Decision::Withhold(reason);
        }
        CheckOutput {
            decisions,
            version: self.filter.version(),
        }
    }

    /// One batched store lookup of the applicable `types` within the deadline; `None` (logged) if
    /// it fails or runs out.
    async fn ask(
        &self,
        numbers: &[(usize, NhsNumber)],
        types: OptOutSet,
        deadline: Instant,
    ) -> Option<Lookup> {
        let list: Vec<NhsNumber> = numbers.iter().map(|(_, n)| *n).collect();
        let started = Instant::now();
        let lookup = self.store.lookup(&list, types);
        let result = tokio::time::timeout(remaining(deadline), lookup).await;
        let label = match &result {
            Ok(Ok(_)) => "ok",
            Ok(Err(_)) => "error",
            Err(_) => "timeout",
        };
        metrics::counter!("optout_store_lookups_total", "result" => label).increment(1);
        metrics::counter!("optout_store_lookup_numbers_total").increment(list.len() as u64);
        metrics::histogram!("optout_store_lookup_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        if let Ok(Ok(_)) = &result {
            self.filter.store_answered();
        }
        match result {
            Ok(Ok(found)) if found.held.len() == list.len() => Some(found),
            Ok(Ok(found)) => {
                tracing::error!(
                    asked = list.len(),
                    answered = found.held.len(),
                    "store answered a different number of lookups; withholding them"
                );
                None
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, numbers = list.len(), "store lookup failed; withholding");
                None
            }
            Err(_) => {
                tracing::warn!(
                    numbers = list.len(),
                    "store lookup hit the deadline; withholding"
                );
                None
            }
        }
    }

    /// Writes the store's answers into the decisions. A store behind the version the caller
    /// asked for cannot prove anything: withheld.
    fn apply(
        &self,
        decisions: &mut [Decision],
        asked: &[(usize, NhsNumber)],
        held: Vec<OptOutSet>,
        policy: Applicable,
        at_least: Option<Version>,
        store_version: Version,
    ) {
        let store_behind = at_least.is_some_and(|v| store_version < v);
        for (&(i, _), held) in asked.iter().zip(held) {
            decisions[i] = if store_behind {
                STORE_UNAVAILABLE
            } else {
                decide(policy, held)
            };
        }
    }
}

/// Logs and counts a store answer older than the filter (its numbers stay withheld).
fn store_behind_filter(store: Version, filter: Version) {
    metrics::counter!("optout_store_behind_filter_total").increment(1);
    tracing::warn!(
        %store,
        %filter,
        "the store answered from an older version than the filter reflects; withholding"
    );
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Every release turned into a withhold (the record could not be kept).
fn withhold_released(decisions: &mut [Decision]) {
    for d in decisions.iter_mut() {
        if matches!(d, Decision::Release(_)) {
            *d = STORE_UNAVAILABLE;
        }
    }
}
