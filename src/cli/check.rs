//! `optout check`: decisions for numbers on the command line or stdin, one line each.

use std::{io::Write, process::ExitCode};

use clap::Args;

use super::{BasisArgs, CliError, ClientArgs, OriginArg, PurposeArg};
use crate::api::proto::{self, CheckRequest, opt_out_check_client::OptOutCheckClient};

/// How many numbers each Check call carries.
const CHUNK: usize = 1000;

#[derive(Args, Debug)]
pub(crate) struct CheckArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Why the data is extracted.
    #[arg(long, value_enum)]
    purpose: PurposeArg,
    /// Who holds the data (unspecified applies both opt-out types).
    #[arg(long, value_enum, default_value = "unspecified")]
    origin: OriginArg,
    /// Answer from a state that reflects at least this version (as returned by an admin change).
    #[arg(long)]
    at_least_version: Option<String>,
    /// Your reference for the extract.
    #[arg(long, default_value = "")]
    extract_id: String,
    #[command(flatten)]
    basis: BasisArgs,
    /// NHS numbers; none reads one per line from stdin.
    numbers: Vec<String>,
}

pub(crate) async fn run(args: CheckArgs) -> Result<ExitCode, CliError> {
    let numbers = if args.numbers.is_empty() {
        super::admin::read_lines(std::io::stdin().lock(), "stdin")?
    } else {
        args.numbers.clone()
    };
    if numbers.is_empty() {
        return Err(CliError::Usage("no NHS numbers given".into()));
    }
    let (channel, bearer) = args.client.authed().await?;
    let mut client = OptOutCheckClient::with_interceptor(channel, bearer);
    let mut stdout = std::io::stdout().lock();
    let write_err = |e: std::io::Error| CliError::Output(format!("stdout: {e}"));
    let (legal_basis, basis_reference) = args.basis.fields();
    for chunk in numbers.chunks(CHUNK) {
        let mut request = tonic::Request::new(CheckRequest {
            nhs_numbers: chunk.iter().collect(),
            purpose: proto::Purpose::from(args.purpose) as i32,
            origin: proto::DataOrigin::from(args.origin) as i32,
            at_least_version: args.at_least_version.clone().unwrap_or_default(),
            extract_id: args.extract_id.clone(),
            legal_basis,
            basis_reference: basis_reference.clone(),
        });
        request.set_timeout(args.client.timeout());
        let response = client.check(request).await?.into_inner();
        for (n, d) in chunk.iter().zip(&response.decisions) {
            let outcome = proto::Outcome::try_from(d.outcome)
                .map(|o| o.as_str_name().trim_start_matches("OUTCOME_"))
                .unwrap_or("UNKNOWN");
            let reason = proto::Reason::try_from(d.reason)
                .map(|r| r.as_str_name().trim_start_matches("REASON_"))
                .unwrap_or("UNKNOWN");
            writeln!(stdout, "{n}\t{outcome}\t{reason}").map_err(write_err)?;
        }
    }
    stdout.flush().map_err(write_err)?;
    Ok(ExitCode::SUCCESS)
}
