//! The pure core of the opt-out service: NHS numbers, the purpose policy, decisions, store
//! versions, the opted-out filter with its snapshot format, audit records and digests, the keys
//! file, and the CSV extract reader. No tokio, tonic or redis types in here; unit tests, property
//! tests, the fuzz targets and the criterion benches exercise it directly. The server crate
//! re-exports it as `optout::core`.
#![deny(missing_docs)]

pub mod anchors;
mod audit;
mod counts;
pub mod coverage;
pub mod extract;
mod filter;
pub mod keys;
mod nhs;
mod policy;
pub mod practice;
pub mod seals;
pub mod trail;
mod version;

pub use audit::{
    AuditKey, AuditKeyError, AuditQuery, AuditRecord, DIGEST_LEN, DigestScheme,
    IMPORT_DIGEST_CHUNK, PatientQuery,
};
pub use counts::{DecisionCounts, REASON_LABELS};
pub use filter::{FilterError, FilterStats, MIN_CAPACITY, OptOutFilter, Probe};
pub use nhs::{NhsNumber, NhsNumberError, Scheme};
pub use policy::{
    Applicable, DataOrigin, Decision, LegalBasis, OptOutSet, OptOutType, Purpose, ReleaseReason,
    WithholdReason, applicable, decide,
};
pub use practice::Practice;
pub use version::{Version, VersionError};
