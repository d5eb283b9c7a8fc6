//! The check path, free of any transport: validate, apply the purpose policy, ask the filter, and
//! send the "maybe" numbers to the store in one batched lookup. Every doubt is WITHHOLD.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    core::{
        Applicable, DataOrigin, Decision, NhsNumber, Purpose, ReleaseReason, Version,
        WithholdReason, applicable, decide,
    },
    store::ConsentStore,
    sync::SyncedFilter,
};

/// One batch to check.
pub struct CheckInput<'a> {
    /// The numbers as sent.
    pub numbers: &'a [String],
    /// Why the data is extracted.
    pub purpose: Purpose,
    /// Who holds it.
    pub origin: DataOrigin,
    /// Answer only from a filter (or store) that reflects at least this version.
    pub at_least_version: Option<Version>,
    /// When the answer must be ready; the store lookup is cut off before it.
    pub deadline: Instant,
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
    store: Arc<dyn ConsentStore>,
    filter: Arc<SyncedFilter>,
}

const STORE_UNAVAILABLE: Decision = Decision::Withhold(WithholdReason::StoreUnavailable);

impl Checker {
    /// A checker over a store and the filter that follows it.
    pub fn new(store: Arc<dyn ConsentStore>, filter: Arc<SyncedFilter>) -> Self {
        Checker { store, filter }
    }

    /// Checks one batch. Never fails: what cannot be proven releasable is withheld.
    pub async fn check(&self, input: CheckInput<'_>) -> CheckOutput {
        let policy = applicable(input.purpose, input.origin);
        let parsed: Vec<Option<NhsNumber>> = input
            .numbers
            .iter()
            .map(|s| NhsNumber::parse(s).ok())
            .collect();
        let mut decisions: Vec<Decision> = parsed
            .iter()
            .map(|p| match p {
                None => Decision::Withhold(WithholdReason::InvalidNhsNumber),
                Some(_) if policy == Applicable::Exempt => {
                    Decision::Release(ReleaseReason::PurposeExempt)
                }
                // Provisional: replaced below by the filter's or the store's answer.
                Some(_) => STORE_UNAVAILABLE,
            })
            .collect();
        if policy == Applicable::Exempt {
            return CheckOutput {
                decisions,
                version: self.filter.version(),
            };
        }

        // A caller who wrote at version V wants an answer that reflects V: wait for the filter,
        // within the deadline; if it does not get there, ask the store about every number.
        let mut filter_behind = false;
        if let Some(want) = input.at_least_version
            && self.filter.version() < want
        {
            let budget = remaining(input.deadline).mul_f32(0.5);
            filter_behind = !self.filter.wait_for_version(want, budget).await;
        }

        let mut maybes: Vec<(usize, NhsNumber)> = Vec::new();
        let (filter_version, trusted) = {
            let view = self.filter.view();
            let trusted = view.trusted && !filter_behind;
            for (i, p) in parsed.iter().enumerate() {
                if let Some(n) = p {
                    if trusted && !view.may_contain(*n) {
                        decisions[i] = Decision::Release(ReleaseReason::NoOptOut);
                    } else {
                        maybes.push((i, *n));
                    }
                }
            }
            (view.version(), trusted)
        };

        let mut version = filter_version;
        if !maybes.is_empty() {
            let numbers: Vec<NhsNumber> = maybes.iter().map(|(_, n)| *n).collect();
            let lookup =
                tokio::time::timeout(remaining(input.deadline), self.store.lookup(&numbers)).await;
            match lookup {
                Ok(Ok(found)) if found.held.len() == maybes.len() => {
                    let store_behind = input.at_least_version.is_some_and(|v| found.version < v);
                    for ((i, _), held) in maybes.iter().zip(found.held) {
                        decisions[*i] = if store_behind {
                            STORE_UNAVAILABLE
                        } else {
                            decide(policy, held)
                        };
                    }
                    if !trusted {
                        version = found.version;
                    }
                }
                Ok(Ok(found)) => {
                    tracing::error!(
                        asked = maybes.len(),
                        answered = found.held.len(),
                        "store answered a different number of lookups; withholding them"
                    );
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, numbers = maybes.len(), "store lookup failed; withholding");
                }
                Err(_) => {
                    tracing::warn!(
                        numbers = maybes.len(),
                        "store lookup hit the deadline; withholding"
                    );
                }
            }
        }
        CheckOutput { decisions, version }
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}
