//! The pure core: NHS numbers, the purpose policy, decisions, store versions and the opted-out
//! filter with its snapshot format. No tokio, tonic or redis types in here; unit tests and the
//! criterion benches exercise it directly.

mod audit;
mod filter;
mod nhs;
mod policy;
mod version;

pub use audit::{AuditKey, AuditKeyError, AuditQuery, AuditRecord, DIGEST_LEN};
pub use filter::{FilterError, FilterStats, MIN_CAPACITY, OptOutFilter};
pub use nhs::{NhsNumber, NhsNumberError};
pub use policy::{
    Applicable, DataOrigin, Decision, OptOutSet, OptOutType, Purpose, ReleaseReason,
    WithholdReason, applicable, decide,
};
pub use version::{Version, VersionError};
