//! Where a client command (`check`, `filter`, `admin`) finds the service, and how it connects.

use std::{path::PathBuf, time::Duration};

use clap::Args;
use tonic::transport::{Channel, Endpoint};

use super::CliError;

/// The wire types, for every client command: the CLI reaches the API through this module and the
/// proto crate, never through the server's `api` services.
pub(crate) use optout_proto as proto;

/// Where a client command finds the service. Global: given before or after a subcommand
/// (`optout admin --server X add` and `optout admin add --server X` are the same).
#[derive(Args, Debug, Clone)]
pub(crate) struct ClientArgs {
    /// The service's address.
    #[arg(
        long,
        global = true,
        env = "OPTOUT_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
    /// Deadline of each call of `check`, `admin` and `health` (500ms, 10s, 2m). (`filter`
    /// streams; the server's request timeout bounds its stream.)
    #[arg(long, global = true, env = "OPTOUT_TIMEOUT", default_value = "10s", value_parser = super::words::duration_arg)]
    timeout: Duration,
    /// The deadline in ms, as earlier versions took it.
    #[arg(long, global = true, env = "OPTOUT_TIMEOUT_MS", hide = true)]
    timeout_ms: Option<u64>,
    /// API key, sent as `authorization: Bearer <key>`. Prefer the environment variable: a key on
    /// the command line is visible to other users of the machine.
    #[arg(long, global = true, env = "OPTOUT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// CA certificate (PEM) that signed the server's certificate, for https:// servers.
    #[arg(long, global = true, env = "OPTOUT_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(
        long,
        global = true,
        env = "OPTOUT_CLIENT_CERT",
        requires = "client_key"
    )]
    client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(
        long,
        global = true,
        env = "OPTOUT_CLIENT_KEY",
        requires = "client_cert"
    )]
    client_key: Option<PathBuf>,
}

/// What failed when connecting, with the error's causes (tonic says only "transport error") and
/// what to try.
fn connect_failure(server: &str, e: &tonic::transport::Error) -> String {
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        // Layers often repeat the same words ("tcp connect error: tcp connect error").
        if causes.last() != Some(&text) {
            causes.push(text);
        }
        source = s.source();
    }
    let why = if causes.is_empty() {
        e.to_string()
    } else {
        causes.join(": ")
    };
    let lower = why.to_lowercase();
    let hint = if lower.contains("refused") {
        "is the server running, and listening on that address and port (optout serve --listen)?"
    } else if lower.contains("certificate") || lower.contains("invalid peer") {
        "the server's certificate is not trusted: give the CA that signed it with --ca-cert"
    } else if lower.contains("timed out") || lower.contains("deadline") {
        "nothing answered within 5 s: check the address, the port and any firewall"
    } else if server.starts_with("https://")
        && (lower.contains("record") || lower.contains("handshake"))
    {
        "the server may not use TLS: try http://"
    } else if lower.contains("dns") || lower.contains("resolve") || lower.contains("lookup") {
        "the host name does not resolve"
    } else {
        "check --server (http:// for a plaintext server, https:// with --ca-cert for TLS)"
    };
    format!("{server}: {why}; {hint}")
}

/// Adds the API key to every call.
#[derive(Clone)]
pub(crate) struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

/// A channel that authenticates each call.
pub(crate) type AuthChannel = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

pub(super) fn read_file(flag: &str, path: &std::path::Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| CliError::Usage(format!("{flag} {}: {e}", path.display())))
}

impl ClientArgs {
    pub(crate) async fn channel(&self) -> Result<Channel, CliError> {
        if !(self.server.starts_with("http://") || self.server.starts_with("https://")) {
            return Err(CliError::Usage(format!(
                "--server {:?}: give the scheme, http://{} for a plaintext server or https://{} \
                 for TLS",
                self.server, self.server, self.server
            )));
        }
        let mut endpoint = Endpoint::from_shared(self.server.clone())
            .map_err(|e| CliError::Usage(format!("--server {:?}: {e}", self.server)))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        if self.server.starts_with("https://") {
            let mut tls = tonic::transport::ClientTlsConfig::new();
            if let Some(ca) = &self.ca_cert {
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read_file(
                    "--ca-cert",
                    ca,
                )?));
            } else {
                tls = tls.with_enabled_roots();
            }
            if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    read_file("--client-cert", cert)?,
                    read_file("--client-key", key)?,
                ));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| CliError::Usage(format!("TLS settings: {e}")))?;
        }
        endpoint
            .connect()
            .await
            .map_err(|e| CliError::Connect(connect_failure(&self.server, &e)))
    }

    /// The channel with the API key attached.
    pub(crate) async fn authed(&self) -> Result<(Channel, Bearer), CliError> {
        let bearer = match &self.api_key {
            Some(k) => Some(
                format!("Bearer {}", k.trim())
                    .parse()
                    .map_err(|_| CliError::Usage("--api-key is not a valid key".into()))?,
            ),
            None => None,
        };
        Ok((self.channel().await?, Bearer(bearer)))
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout_ms.map_or(self.timeout, Duration::from_millis)
    }
}
