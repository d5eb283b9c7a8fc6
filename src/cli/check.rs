//! `optout check`: decisions for numbers on the command line or stdin, one line each.

use std::{io::Write, process::ExitCode};

use clap::Args;

use super::{
    BasisArgs, CliError, ClientArgs, OriginArg, PurposeArg,
    words::{self, OutputArg},
};
use crate::cli::client::proto::{self, CheckRequest, opt_out_check_client::OptOutCheckClient};

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
    /// text: a line a number (the number, release or withhold, the reason); json: an array of
    /// {nhs_number, outcome, reason}, and the version answered at.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputArg::Text)]
    output: OutputArg,
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
    let mut json = Vec::new();
    let mut version = String::new();
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
            let (outcome, reason) = (words::outcome(d.outcome), words::reason(d.reason));
            match args.output {
                OutputArg::Text => {
                    writeln!(stdout, "{n}\t{outcome}\t{reason}").map_err(write_err)?;
                }
                OutputArg::Json => json.push(serde_json::json!({
                    "nhs_number": n,
                    "outcome": outcome,
                    "reason": reason,
                })),
            }
        }
        version = response.version;
    }
    if args.output == OutputArg::Json {
        words::print_json(&serde_json::json!({ "decisions": json, "version": version }))?;
    }
    stdout.flush().map_err(write_err)?;
    Ok(ExitCode::SUCCESS)
}
