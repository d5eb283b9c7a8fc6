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
/// extern path) for one difference: `nhs_numbers` is decoded into one [`NumberList`] (every
/// number's bytes in one buffer) rather than a `String` (or a `Bytes` slice) per number. A batch
/// of 1,000 numbers then costs two allocations instead of a thousand (the per-number `String`s,
/// then the per-number reference counts of `Bytes` slices, were a visible share of the server's
/// CPU under load). The wire format is the same (`string` and `bytes` are both length-delimited),
/// so clients built from the .proto are unaffected; a number that is not UTF-8 is an invalid NHS
/// number (WITHHOLD) rather than a decode error. Keep the fields in step with the .proto; the
/// round-trip test below compares the encoding with prost's own for every field.
#[derive(Clone, Default, PartialEq, Eq, Hash, Debug)]
pub struct CheckRequest {
    /// NHS numbers as 10 digits, or 3-3-4 separated by single spaces or single dashes.
    pub nhs_numbers: NumberList,
    /// Why the data is extracted ([`Purpose`]).
    pub purpose: i32,
    /// Where the data being extracted came from ([`DataOrigin`]).
    pub origin: i32,
    /// A version returned by an admin write: the answer reflects at least that version.
    pub at_least_version: ::prost::alloc::string::String,
    /// The caller's reference for the extract, for traceability.
    pub extract_id: ::prost::alloc::string::String,
    /// The legal basis claimed ([`LegalBasis`]; default none: opt-outs apply).
    pub legal_basis: i32,
    /// The basis's reference (a CAG number, a statute, a study), audited with the check.
    pub basis_reference: ::prost::alloc::string::String,
}

/// The `nhs_numbers` of a [`CheckRequest`]: each number's bytes as sent, all in one buffer.
#[derive(Clone, Default, PartialEq, Eq, Hash, Debug)]
pub struct NumberList {
    bytes: Vec<u8>,
    /// Where each number ends in `bytes` (it starts where the one before ends).
    ends: Vec<u32>,
}

impl NumberList {
    /// An empty list.
    pub fn new() -> Self {
        NumberList::default()
    }

    /// How many numbers.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Adds one number's bytes at the end.
    pub fn push(&mut self, number: impl AsRef<[u8]>) {
        self.bytes.extend_from_slice(number.as_ref());
        self.ends
            .push(u32::try_from(self.bytes.len()).unwrap_or(u32::MAX));
    }

    /// The `i`th number's bytes.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let end = usize::try_from(*self.ends.get(i)?).ok()?;
        let start = match i.checked_sub(1) {
            Some(p) => usize::try_from(self.ends[p]).ok()?,
            None => 0,
        };
        self.bytes.get(start..end)
    }

    /// Every number's bytes, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        let mut start = 0usize;
        self.ends.iter().map(move |&end| {
            let end = end as usize;
            let number = self.bytes.get(start..end).unwrap_or_default();
            start = end;
            number
        })
    }
}

impl<T: AsRef<[u8]>> FromIterator<T> for NumberList {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut list = NumberList::new();
        for n in iter {
            list.push(n);
        }
        list
    }
}

impl<T: AsRef<[u8]>> From<Vec<T>> for NumberList {
    fn from(numbers: Vec<T>) -> Self {
        numbers.into_iter().collect()
    }
}

impl ::prost::Message for CheckRequest {
    fn encode_raw(&self, buf: &mut impl ::bytes::BufMut) {
        use ::prost::encoding::{self as enc, WireType};
        for n in self.nhs_numbers.iter() {
            enc::encode_key(1, WireType::LengthDelimited, buf);
            enc::encode_varint(n.len() as u64, buf);
            buf.put_slice(n);
        }
        if self.purpose != 0 {
            enc::int32::encode(2, &self.purpose, buf);
        }
        if self.origin != 0 {
            enc::int32::encode(3, &self.origin, buf);
        }
        if !self.at_least_version.is_empty() {
            enc::string::encode(4, &self.at_least_version, buf);
        }
        if !self.extract_id.is_empty() {
            enc::string::encode(5, &self.extract_id, buf);
        }
        if self.legal_basis != 0 {
            enc::int32::encode(6, &self.legal_basis, buf);
        }
        if !self.basis_reference.is_empty() {
            enc::string::encode(7, &self.basis_reference, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: ::prost::encoding::WireType,
        buf: &mut impl ::bytes::Buf,
        ctx: ::prost::encoding::DecodeContext,
    ) -> Result<(), ::prost::DecodeError> {
        use ::prost::encoding as enc;
        let named = |mut e: ::prost::DecodeError, field: &'static str| {
            e.push("CheckRequest", field);
            e
        };
        match tag {
            1 => merge_number(&mut self.nhs_numbers, wire_type, buf)
                .map_err(|e| named(e, "nhs_numbers")),
            2 => enc::int32::merge(wire_type, &mut self.purpose, buf, ctx)
                .map_err(|e| named(e, "purpose")),
            3 => enc::int32::merge(wire_type, &mut self.origin, buf, ctx)
                .map_err(|e| named(e, "origin")),
            4 => enc::string::merge(wire_type, &mut self.at_least_version, buf, ctx)
                .map_err(|e| named(e, "at_least_version")),
            5 => enc::string::merge(wire_type, &mut self.extract_id, buf, ctx)
                .map_err(|e| named(e, "extract_id")),
            6 => enc::int32::merge(wire_type, &mut self.legal_basis, buf, ctx)
                .map_err(|e| named(e, "legal_basis")),
            7 => enc::string::merge(wire_type, &mut self.basis_reference, buf, ctx)
                .map_err(|e| named(e, "basis_reference")),
            _ => enc::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        use ::prost::encoding as enc;
        let numbers: usize = self
            .nhs_numbers
            .iter()
            .map(|n| enc::key_len(1) + enc::encoded_len_varint(n.len() as u64) + n.len())
            .sum();
        numbers
            + if self.purpose != 0 {
                enc::int32::encoded_len(2, &self.purpose)
            } else {
                0
            }
            + if self.origin != 0 {
                enc::int32::encoded_len(3, &self.origin)
            } else {
                0
            }
            + if self.at_least_version.is_empty() {
                0
            } else {
                enc::string::encoded_len(4, &self.at_least_version)
            }
            + if self.extract_id.is_empty() {
                0
            } else {
                enc::string::encoded_len(5, &self.extract_id)
            }
            + if self.legal_basis != 0 {
                enc::int32::encoded_len(6, &self.legal_basis)
            } else {
                0
            }
            + if self.basis_reference.is_empty() {
                0
            } else {
                enc::string::encoded_len(7, &self.basis_reference)
            }
    }

    fn clear(&mut self) {
        *self = CheckRequest::default();
    }
}

/// One length-delimited number appended to the list (checked against what the buffer holds).
fn merge_number(
    list: &mut NumberList,
    wire_type: ::prost::encoding::WireType,
    buf: &mut impl ::bytes::Buf,
) -> Result<(), ::prost::DecodeError> {
    use ::prost::encoding::{self as enc, WireType};
    enc::check_wire_type(WireType::LengthDelimited, wire_type)?;
    let len = enc::decode_varint(buf)?;
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= buf.remaining())
        .ok_or_else(underflow)?;
    if list.ends.is_empty() {
        // The first number: room for what the rest of the message could hold (a 10-digit
        // number takes 12 bytes on the wire), so the buffers grow at most once or twice.
        list.bytes.reserve(buf.remaining());
        list.ends.reserve(buf.remaining() / 12);
    }
    let start = list.bytes.len();
    list.bytes.resize(start + len, 0);
    buf.copy_to_slice(&mut list.bytes[start..]);
    // A message is far below 4 GiB (the server's decoding limit); past it, refuse rather than
    // wrap.
    let end = u32::try_from(list.bytes.len()).map_err(|_| underflow())?;
    list.ends.push(end);
    Ok(())
}

/// A number longer than what is left of the message. prost 0.14 offers no other constructor to a
/// hand-written `Message` (`new` is deprecated for a future breaking release; the dependency is
/// pinned to 0.14, and a move to 0.15 will show this).
#[allow(deprecated)]
fn underflow() -> ::prost::DecodeError {
    ::prost::DecodeError::new("buffer underflow")
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// The request as prost would generate it from the .proto, to compare encodings with.
    #[derive(Clone, PartialEq, ::prost::Message)]
    struct Generated {
        #[prost(string, repeated, tag = "1")]
        nhs_numbers: Vec<String>,
        #[prost(int32, tag = "2")]
        purpose: i32,
        #[prost(int32, tag = "3")]
        origin: i32,
        #[prost(string, tag = "4")]
        at_least_version: String,
        #[prost(string, tag = "5")]
        extract_id: String,
        #[prost(int32, tag = "6")]
        legal_basis: i32,
        #[prost(string, tag = "7")]
        basis_reference: String,
        #[prost(string, tag = "99")]
        unknown: String,
    }

    fn generated() -> Generated {
        Generated {
            nhs_numbers: vec!["9434765919".into(), "".into(), "943 476 5919".into()],
            purpose: 2,
            origin: -1,
            at_least_version: "12-3".into(),
            extract_id: "extract".into(),
            legal_basis: 5,
            basis_reference: "CAG 1-02(a)/2026".into(),
            unknown: String::new(),
        }
    }

    fn written(g: &Generated) -> CheckRequest {
        CheckRequest {
            nhs_numbers: g.nhs_numbers.iter().collect(),
            purpose: g.purpose,
            origin: g.origin,
            at_least_version: g.at_least_version.clone(),
            extract_id: g.extract_id.clone(),
            legal_basis: g.legal_basis,
            basis_reference: g.basis_reference.clone(),
        }
    }

    #[test]
    fn encodes_and_decodes_as_the_generated_message_does() {
        for g in [generated(), Generated::default()] {
            let ours = written(&g);
            assert_eq!(ours.encode_to_vec(), g.encode_to_vec());
            assert_eq!(ours.encoded_len(), g.encoded_len());
            let back = CheckRequest::decode(g.encode_to_vec().as_slice()).expect("decodes");
            assert_eq!(back, ours);
            let list: Vec<&[u8]> = back.nhs_numbers.iter().collect();
            let want: Vec<&[u8]> = g.nhs_numbers.iter().map(String::as_bytes).collect();
            assert_eq!(list, want);
            for (i, n) in want.iter().enumerate() {
                assert_eq!(back.nhs_numbers.get(i), Some(*n));
            }
            assert_eq!(back.nhs_numbers.get(want.len()), None);
        }
    }

    #[test]
    fn unknown_fields_are_skipped_and_truncation_is_an_error() {
        let mut g = generated();
        g.unknown = "from a newer client".into();
        let bytes = g.encode_to_vec();
        let back = CheckRequest::decode(bytes.as_slice()).expect("decodes");
        g.unknown.clear();
        assert_eq!(back, written(&g));
        // Cut inside the first number: an error, not a short number.
        assert!(CheckRequest::decode(&bytes[..6]).is_err());
        // A number given as a varint: the wrong wire type is an error naming the field.
        let err = CheckRequest::decode(&[0x08u8, 0x01][..]).expect_err("wrong wire type");
        assert!(err.to_string().contains("nhs_numbers"), "{err}");
    }
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
            Ok(crate::LegalBasis::CagOptOutSetAside) => Ok(LegalBasis::CagOptOutSetAside),
            Ok(crate::LegalBasis::PublicHealth) => Ok(LegalBasis::PublicHealth),
            Ok(crate::LegalBasis::InvoiceValidation) => Ok(LegalBasis::InvoiceValidation),
            Ok(crate::LegalBasis::OfficialStatistics) => Ok(LegalBasis::OfficialStatistics),
            Ok(crate::LegalBasis::DirectionType1SetAside) => Ok(LegalBasis::DirectionType1SetAside),
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
                    optout_core::LegalBasis::CagOptOutSetAside => Reason::ExemptCagOptOutSetAside,
                    optout_core::LegalBasis::PublicHealth => Reason::ExemptPublicHealth,
                    optout_core::LegalBasis::InvoiceValidation => Reason::ExemptInvoiceValidation,
                    optout_core::LegalBasis::OfficialStatistics => Reason::ExemptOfficialStatistics,
                    optout_core::LegalBasis::DirectionType1SetAside => {
                        Reason::ExemptDirectionType1SetAside
                    }
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
            Decision::Withhold(WithholdReason::NotInCheckedPopulation) => {
                (Outcome::Withhold, Reason::NotInCheckedPopulation)
            }
            Decision::Withhold(WithholdReason::ListTooOld) => {
                (Outcome::Withhold, Reason::ListTooOld)
            }
            Decision::Withhold(WithholdReason::ListNeverImported) => {
                (Outcome::Withhold, Reason::ListNeverImported)
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
