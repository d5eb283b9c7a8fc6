//! The `optout.v1` protobuf and gRPC code, generated from `proto/` at the top of the repository,
//! and its conversions to and from the core types. The server, the load-test harness and any
//! Rust client depend on this crate, not on the server.
#![deny(missing_docs)]

#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod generated {
    tonic::include_proto!("optout.v1");
}
pub use generated::*;

/// `optout.v1.CheckRequest`, written by hand rather than generated (build.rs names it as an
/// extern path) for one difference: `nhs_numbers` is decoded into `Bytes` slices of the received
/// message rather than a `String` per number. A batch of 1,000 numbers then costs no allocation
/// per number (the per-number `String`s were a visible share of the server's CPU under load). The
/// wire format is the same (`string` and `bytes` are both length-delimited), so clients built
/// from the .proto are unaffected; a number that is not UTF-8 is an invalid NHS number
/// (WITHHOLD) rather than a decode error. Keep the fields in step with the .proto.
#[derive(Clone, PartialEq, Eq, Hash, ::prost::Message)]
pub struct CheckRequest {
    /// NHS numbers as 10 digits, or 3-3-4 separated by single spaces or single dashes.
    #[prost(bytes = "bytes", repeated, tag = "1")]
    pub nhs_numbers: ::prost::alloc::vec::Vec<::bytes::Bytes>,
    /// Why the data is extracted.
    #[prost(enumeration = "Purpose", tag = "2")]
    pub purpose: i32,
    /// Where the data being extracted came from.
    #[prost(enumeration = "DataOrigin", tag = "3")]
    pub origin: i32,
    /// A version returned by an admin write: the answer reflects at least that version.
    #[prost(string, tag = "4")]
    pub at_least_version: ::prost::alloc::string::String,
    /// The caller's reference for the extract, for traceability.
    #[prost(string, tag = "5")]
    pub extract_id: ::prost::alloc::string::String,
    /// The legal basis claimed (default none: opt-outs apply).
    #[prost(enumeration = "LegalBasis", tag = "6")]
    pub legal_basis: i32,
    /// The basis's reference (a CAG number, a statute, a study), audited with the check.
    #[prost(string, tag = "7")]
    pub basis_reference: ::prost::alloc::string::String,
}

/// The encoded descriptor set, served by the reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/optout_descriptor.bin"));

/// Conversions between the wire types and the core's, with the errors a caller is shown.
pub mod convert {
    use tonic::Status;

    /// A request's purpose; unspecified or unknown is an invalid argument.
    pub fn purpose(p: i32) -> Result<optout_core::Purpose, Status> {
        match crate::Purpose::try_from(p) {
            Ok(crate::Purpose::DirectCare) => Ok(optout_core::Purpose::DirectCare),
            Ok(crate::Purpose::Research) => Ok(optout_core::Purpose::Research),
            Ok(crate::Purpose::Planning) => Ok(optout_core::Purpose::Planning),
            Ok(crate::Purpose::Unspecified) => Err(Status::invalid_argument(
                "purpose is required: say why the data is extracted (PURPOSE_DIRECT_CARE, \
                 PURPOSE_RESEARCH or PURPOSE_PLANNING)",
            )),
            Err(_) => Err(Status::invalid_argument(format!(
                "purpose {p} is not a known Purpose"
            ))),
        }
    }

    /// A request's data origin; unknown is an invalid argument.
    pub fn origin(o: i32) -> Result<optout_core::DataOrigin, Status> {
        match crate::DataOrigin::try_from(o) {
            Ok(crate::DataOrigin::Unspecified) => Ok(optout_core::DataOrigin::Unspecified),
            Ok(crate::DataOrigin::GpPractice) => Ok(optout_core::DataOrigin::GpPractice),
            Ok(crate::DataOrigin::Other) => Ok(optout_core::DataOrigin::Other),
            Err(_) => Err(Status::invalid_argument(format!(
                "origin {o} is not a known DataOrigin"
            ))),
        }
    }

    /// An opt-out type in a request; unspecified or unknown is an invalid argument.
    pub fn opt_out_type(t: i32) -> Result<optout_core::OptOutType, Status> {
        match crate::OptOutType::try_from(t) {
            Ok(crate::OptOutType::NationalDataOptOut) => {
                Ok(optout_core::OptOutType::NationalDataOptOut)
            }
            Ok(crate::OptOutType::Type1) => Ok(optout_core::OptOutType::Type1),
            Ok(crate::OptOutType::Unspecified) => Err(Status::invalid_argument(
                "type is required: OPT_OUT_TYPE_NATIONAL_DATA_OPT_OUT or OPT_OUT_TYPE_TYPE_1",
            )),
            Err(_) => Err(Status::invalid_argument(format!(
                "type {t} is not a known OptOutType"
            ))),
        }
    }

    /// A legal basis from the wire; an unknown value is refused, never read as none.
    pub fn legal_basis_from_proto(b: i32) -> Result<optout_core::LegalBasis, Status> {
        use optout_core::LegalBasis;
        match crate::LegalBasis::try_from(b) {
            Ok(crate::LegalBasis::None) => Ok(LegalBasis::None),
            Ok(crate::LegalBasis::Consent) => Ok(LegalBasis::Consent),
            Ok(crate::LegalBasis::LegalRequirement) => Ok(LegalBasis::LegalRequirement),
            Ok(crate::LegalBasis::PublicInterest) => Ok(LegalBasis::PublicInterest),
            Ok(crate::LegalBasis::Anonymised) => Ok(LegalBasis::Anonymised),
            Ok(crate::LegalBasis::Section251) => Ok(LegalBasis::Section251),
            Err(_) => Err(Status::invalid_argument(format!(
                "legal_basis {b} is not a known LegalBasis"
            ))),
        }
    }

    /// An opt-out type on the wire.
    pub fn opt_out_type_to_proto(t: optout_core::OptOutType) -> crate::OptOutType {
        match t {
            optout_core::OptOutType::NationalDataOptOut => crate::OptOutType::NationalDataOptOut,
            optout_core::OptOutType::Type1 => crate::OptOutType::Type1,
        }
    }

    /// A decision on the wire: outcome and reason.
    pub fn decision_to_proto(d: optout_core::Decision) -> crate::Decision {
        use crate::{Outcome, Reason};
        use optout_core::{Decision, ReleaseReason, WithholdReason};
        let (outcome, reason) = match d {
            Decision::Release(ReleaseReason::NoOptOut) => (Outcome::Release, Reason::NoOptOut),
            Decision::Release(ReleaseReason::PurposeExempt) => {
                (Outcome::Release, Reason::PurposeExempt)
            }
            Decision::Release(ReleaseReason::BasisExempt(b)) => (
                Outcome::Release,
                match b {
                    optout_core::LegalBasis::Consent => Reason::ExemptConsent,
                    optout_core::LegalBasis::LegalRequirement => Reason::ExemptLegalRequirement,
                    optout_core::LegalBasis::PublicInterest => Reason::ExemptPublicInterest,
                    optout_core::LegalBasis::Anonymised => Reason::ExemptAnonymised,
                    optout_core::LegalBasis::Section251 => Reason::ExemptSection251,
                    // `applicable` never gives BasisExempt(None); answer as for no opt-out.
                    optout_core::LegalBasis::None => Reason::NoOptOut,
                },
            ),
            Decision::Withhold(WithholdReason::NationalDataOptOut) => {
                (Outcome::Withhold, Reason::NationalDataOptOut)
            }
            Decision::Withhold(WithholdReason::Type1OptOut) => {
                (Outcome::Withhold, Reason::Type1OptOut)
            }
            Decision::Withhold(WithholdReason::InvalidNhsNumber) => {
                (Outcome::Withhold, Reason::InvalidNhsNumber)
            }
            Decision::Withhold(WithholdReason::StoreUnavailable) => {
                (Outcome::Withhold, Reason::StoreUnavailable)
            }
            Decision::Withhold(WithholdReason::StoreRegressed) => {
                (Outcome::Withhold, Reason::StoreRegressed)
            }
            Decision::Withhold(WithholdReason::VersionNotReached) => {
                (Outcome::Withhold, Reason::VersionNotReached)
            }
        };
        crate::Decision {
            outcome: outcome as i32,
            reason: reason as i32,
        }
    }

    /// Parses a version token from a request field (empty: none).
    pub fn version_field(field: &str, value: &str) -> Result<Option<optout_core::Version>, Status> {
        if value.is_empty() {
            return Ok(None);
        }
        optout_core::Version::parse(value)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
    }
}
