//! Where a client command (`check`, `filter`, `admin`) finds the service, and how it connects.

use std::{path::PathBuf, time::Duration};

use clap::Args;
use tonic::transport::{Channel, Endpoint};

use super::CliError;

/// Where a client command finds the service.
#[derive(Args, Debug, Clone)]
pub(crate) struct ClientArgs {
    /// The service's address.
    #[arg(long, env = "OPTOUT_SERVER", default_value = "http://127.0.0.1:50051")]
    server: String,
    /// Deadline of each unary call, in ms.
    #[arg(long, env = "OPTOUT_TIMEOUT_MS", default_value_t = 10_000)]
    timeout_ms: u64,
    /// API key, sent as `authorization: Bearer <key>`. Prefer the environment variable: a key on
    /// the command line is visible to other users of the machine.
    #[arg(long, env = "OPTOUT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// CA certificate (PEM) that signed the server's certificate, for https:// servers.
    #[arg(long, env = "OPTOUT_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "OPTOUT_CLIENT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long, env = "OPTOUT_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
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
            .map_err(|e| CliError::Connect(format!("{}: {e}", self.server)))
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
        Duration::from_millis(self.timeout_ms)
    }
}
