//! `optout health`: asks a server's `grpc.health.v1` whether it is SERVING; exit 0 if it is, 1 if
//! it answers anything else, 2 if it cannot be asked. For a container's HEALTHCHECK, a script, or
//! a person (`--service lists`: whether every opt-out list is within its maximum age).

use std::process::ExitCode;

use clap::Args;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::{CliError, ClientArgs};

#[derive(Args, Debug)]
pub(super) struct HealthArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The health service to ask: "" (the server as a whole, the default), liveness,
    /// optout.v1.OptOutCheck, optout.v1.OptOutAdmin, or lists.
    #[arg(long, default_value = "")]
    service: String,
    /// text (`server: SERVING`), or json ({"service", "status"}).
    #[arg(long, short = 'o', value_enum, default_value_t = super::words::OutputArg::Text)]
    output: super::words::OutputArg,
}

pub(super) async fn run(args: HealthArgs) -> Result<ExitCode, CliError> {
    let channel = args.client.channel().await?;
    let mut client = HealthClient::new(channel);
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: args.service.clone(),
    });
    request.set_timeout(args.client.timeout());
    let status = client.check(request).await?.into_inner().status;
    let name = ServingStatus::try_from(status)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN_STATUS");
    let shown = if args.service.is_empty() {
        "server"
    } else {
        args.service.as_str()
    };
    if args.output == super::words::OutputArg::Json {
        super::words::print_json(&serde_json::json!({"service": shown, "status": name}))?;
    } else {
        println!("{shown}: {name}");
    }
    Ok(if status == ServingStatus::Serving as i32 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
