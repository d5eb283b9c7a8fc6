//! The gate in front of each service: who is calling, may they, and are they within their rate.

use std::{num::NonZeroU32, sync::Arc};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tonic::{Request, Status, service::Interceptor};

use crate::auth::{Caller, Keyring, Role};

/// Per-organisation rate, in NHS numbers checked (each admin call counts as one): a Check of
/// 10,000 numbers costs 10,000 times a Check of one, and every CheckStream message is charged.
#[derive(Clone, Copy, Debug)]
pub struct RateLimit {
    /// Numbers per second per organisation; 0 turns the limit off.
    pub per_second: u32,
    /// Numbers an organisation may send at once above that rate (also the largest message it
    /// can send at all).
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

impl GateState {
    /// Charges `cost` (NHS numbers, or 1 for an admin call) to the caller's organisation.
    pub fn charge(&self, caller: &Caller, cost: usize) -> Result<(), Status> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let organisation = &caller.organisation;
        let n = NonZeroU32::new(u32::try_from(cost.max(1)).unwrap_or(u32::MAX))
            .unwrap_or(NonZeroU32::MIN);
        let refused = match limiter.check_key_n(organisation, n) {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(_)) => format!(
                "organisation {organisation} is over its rate limit of {} NHS numbers per second; \
                 slow down",
                self.limit.per_second
            ),
            Err(_) => format!(
                "a message of {cost} NHS numbers is more than organisation {organisation} may send \
                 at once (burst {}); send smaller messages",
                self.limit.burst.max(self.limit.per_second)
            ),
        };
        metrics::counter!("optout_rate_limited_total").increment(1);
        Err(Status::resource_exhausted(refused))
    }

    /// Whether the caller's key is still in force (always, when the service runs without keys).
    pub fn still_valid(&self, caller: &Caller) -> bool {
        self.keyring.as_ref().is_none_or(|k| k.still_valid(caller))
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
        // Rate-limit refusals are counted where they are made (`GateState::charge`).
        if let Err(s) = &result
            && s.code() != tonic::Code::ResourceExhausted
        {
            metrics::counter!("optout_auth_refused_total", "code" => crate::telemetry::code_label(s.code()))
                .increment(1);
        }
        result
    }
}

impl Gate {
    fn admit(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = match &self.state.keyring {
            None => anonymous(),
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
        // Admin calls cost one each here; checks are charged per number by the check service,
        // once their size is known.
        if self.need == Role::Admin {
            self.state.charge(&caller, 1)?;
        }
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The caller a gate admitted (anonymous if the request did not pass one, as in unit tests).
pub(crate) fn caller_of<T>(request: &Request<T>) -> Arc<Caller> {
    request
        .extensions()
        .get::<Arc<Caller>>()
        .cloned()
        .unwrap_or_else(anonymous)
}

/// The one anonymous caller, shared (a service without keys admits every request as it).
fn anonymous() -> Arc<Caller> {
    static ANONYMOUS: std::sync::LazyLock<Arc<Caller>> =
        std::sync::LazyLock::new(|| Arc::new(Caller::anonymous()));
    Arc::clone(&ANONYMOUS)
}
