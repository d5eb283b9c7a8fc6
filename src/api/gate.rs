//! The gate in front of each service: who is calling, may they, and are they within their rate.

use std::{num::NonZeroU32, sync::Arc};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tonic::{Request, Status, service::Interceptor};

use crate::auth::{Caller, Keyring, Role};

/// Per-organisation request rate.
#[derive(Clone, Copy, Debug)]
pub struct RateLimit {
    /// Requests per second per organisation; 0 turns the limit off.
    pub per_second: u32,
    /// Requests an organisation may send at once above that rate.
    pub burst: u32,
}

/// Shared by the gates of every service, so one organisation has one budget.
pub struct GateState {
    keyring: Option<Arc<Keyring>>,
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    limit: RateLimit,
    /// With mutual TLS, the client certificate's organisation must match the key's.
    cert_names_org: bool,
}

impl GateState {
    /// Keys (`None`: open, loopback development only), rate limit, and whether client
    /// certificates name the organisation.
    pub fn new(keyring: Option<Arc<Keyring>>, limit: RateLimit, cert_names_org: bool) -> Arc<Self> {
        let limiter = NonZeroU32::new(limit.per_second).map(|rate| {
            let burst = NonZeroU32::new(limit.burst.max(limit.per_second)).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Arc::new(GateState {
            keyring,
            limiter,
            limit,
            cert_names_org,
        })
    }
}

/// The interceptor for one service, needing one role.
#[derive(Clone)]
pub struct Gate {
    state: Arc<GateState>,
    need: Role,
}

impl Gate {
    /// A gate that admits callers with `need`.
    pub fn new(state: Arc<GateState>, need: Role) -> Self {
        Gate { state, need }
    }
}

/// The organisation a client certificate names: its subject O, else its CN.
fn certificate_org(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    subject
        .iter_organization()
        .next()
        .or_else(|| subject.iter_common_name().next())
        .and_then(|a| a.as_str().ok())
        .map(str::to_string)
}

impl Interceptor for Gate {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let result = self.admit(request);
        if let Err(s) = &result {
            if s.code() == tonic::Code::ResourceExhausted {
                metrics::counter!("optout_rate_limited_total").increment(1);
            } else {
                metrics::counter!("optout_auth_refused_total", "code" => crate::metrics::code_label(s.code()))
                    .increment(1);
            }
        }
        result
    }
}

impl Gate {
    fn admit(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = match &self.state.keyring {
            None => Caller::anonymous(),
            Some(keyring) => {
                let key = request
                    .metadata()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .ok_or_else(|| {
                        Status::unauthenticated(
                            "missing API key: send metadata `authorization: Bearer <key>`",
                        )
                    })?;
                let caller = keyring
                    .authenticate(key.trim())
                    .ok_or_else(|| Status::unauthenticated("unknown API key"))?;
                if !caller.may(self.need) {
                    return Err(Status::permission_denied(format!(
                        "key {} of organisation {} lacks the {} role",
                        caller.key_id,
                        caller.organisation,
                        self.need.name()
                    )));
                }
                if self.state.cert_names_org {
                    let org = request
                        .peer_certs()
                        .and_then(|certs| certs.first().and_then(|c| certificate_org(c)));
                    if org.as_deref() != Some(caller.organisation.as_str()) {
                        return Err(Status::permission_denied(format!(
                            "the client certificate does not name organisation {} of key {}",
                            caller.organisation, caller.key_id
                        )));
                    }
                }
                caller
            }
        };
        if let Some(limiter) = &self.state.limiter
            && limiter.check_key(&caller.organisation).is_err()
        {
            return Err(Status::resource_exhausted(format!(
                "organisation {} is over its rate limit of {} requests per second; slow down or \
                 send larger batches",
                caller.organisation, self.state.limit.per_second
            )));
        }
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The caller a gate admitted (anonymous if the request did not pass one, as in unit tests).
pub(crate) fn caller_of<T>(request: &Request<T>) -> Caller {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_else(Caller::anonymous)
}
