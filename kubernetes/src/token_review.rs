//! Agent authentication by service-account token: the server asks
//! kube-apiserver (TokenReview, with the configured audience) and admits the
//! agent only if the token is authenticated, carries no error, is valid for
//! our audience, and belongs to `system:serviceaccount:<namespace>:<name>`.
//!
//! Beyond upstream: each review has a deadline, at most [`MAX_IN_FLIGHT`]
//! run at once, and positive answers are cached for [`POSITIVE_TTL`] under a
//! SHA-256 of the token (the token itself is never kept or logged). An
//! unreachable kube-apiserver is a refusal, never an admission.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

/// How long a positive review is reused for the same token.
pub const POSITIVE_TTL: Duration = Duration::from_secs(10);
/// Most cached positive reviews.
pub const MAX_CACHED: usize = 4096;
/// Most reviews in flight; more agents wait (within the deadline).
pub const MAX_IN_FLIGHT: usize = 16;

/// The service account agents must run as, and the token audience.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// `--agent-namespace`.
    pub namespace: String,
    /// `--agent-service-account`.
    pub service_account: String,
    /// `--authentication-audience`.
    pub audience: String,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// kube-apiserver did not authenticate the token (bad signature, expired,
    /// another audience, revoked...); its reason, when it gave one.
    #[error("token not authenticated by kube-apiserver: {0}")]
    NotAuthenticated(String),
    /// The review authenticated the token but also carried an error.
    #[error("token review error: {0}")]
    ReviewError(String),
    /// Authenticated, but not for our audience.
    #[error("token audiences {got:?} do not include {want:?}")]
    WrongAudience {
        /// `status.audiences`.
        got: Vec<String>,
        /// Ours.
        want: String,
    },
    /// The user is not a service account.
    #[error("user {0:?} is not a service account")]
    NotServiceAccount(String),
    /// A service account of another namespace.
    #[error("service account namespace {got:?}, want {want:?}")]
    WrongNamespace {
        /// Seen.
        got: String,
        /// Configured.
        want: String,
    },
    /// Another service account of the right namespace.
    #[error("service account {got:?}, want {want:?}")]
    WrongServiceAccount {
        /// Seen.
        got: String,
        /// Configured.
        want: String,
    },
    /// kube-apiserver could not be asked (down, timeout, forbidden).
    #[error("token review failed: {0}")]
    Unavailable(String),
}

impl Refusal {
    /// Metric label for the refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NotAuthenticated(_) => "token_not_authenticated",
            Refusal::ReviewError(_) => "token_review_error",
            Refusal::WrongAudience { .. } => "token_wrong_audience",
            Refusal::NotServiceAccount(_) => "token_not_service_account",
            Refusal::WrongNamespace { .. } => "token_wrong_namespace",
            Refusal::WrongServiceAccount { .. } => "token_wrong_service_account",
            Refusal::Unavailable(_) => "token_review_unavailable",
        }
    }

    /// True when the refusal says nothing about the token (the agent should
    /// retry; gRPC `Unavailable` rather than `Unauthenticated`).
    pub fn is_transient(&self) -> bool {
        matches!(self, Refusal::Unavailable(_))
    }
}

/// Judges a review's status against what we expect; returns the username.
pub fn judge(status: &TokenReviewStatus, want: &Expected) -> Result<String, Refusal> {
    let error = status.error.as_deref().filter(|e| !e.is_empty());
    if status.authenticated != Some(true) {
        let why = error.unwrap_or("no reason given");
        return Err(Refusal::NotAuthenticated(why.to_string()));
    }
    if let Some(e) = error {
        return Err(Refusal::ReviewError(e.to_string()));
    }
    let audiences = status.audiences.clone().unwrap_or_default();
    if !audiences.contains(&want.audience) {
        return Err(Refusal::WrongAudience {
            got: audiences,
            want: want.audience.clone(),
        });
    }
    let username = status
        .user
        .as_ref()
        .and_then(|u| u.username.clone())
        .unwrap_or_default();
    let parts: Vec<&str> = username.split(':').collect();
    let [system, serviceaccount, ns, sa] = parts[..] else {
        return Err(Refusal::NotServiceAccount(username));
    };
    if system != "system" || serviceaccount != "serviceaccount" {
        return Err(Refusal::NotServiceAccount(username));
    }
    if ns != want.namespace {
        return Err(Refusal::WrongNamespace {
            got: ns.into(),
            want: want.namespace.clone(),
        });
    }
    if sa != want.service_account {
        return Err(Refusal::WrongServiceAccount {
            got: sa.into(),
            want: want.service_account.clone(),
        });
    }
    Ok(username)
}

type TokenHash = [u8; 32];

/// Positive reviews, by token hash, each with its expiry.
#[derive(Debug, Default)]
struct Cache {
    entries: HashMap<TokenHash, (Instant, String)>,
}

impl Cache {
    fn get(&mut self, key: &TokenHash, now: Instant) -> Option<String> {
        match self.entries.get(key) {
            Some((until, user)) if *until > now => Some(user.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn put(&mut self, key: TokenHash, user: String, now: Instant) {
        if self.entries.len() >= MAX_CACHED {
            self.entries.retain(|_, (until, _)| *until > now);
        }
        if self.entries.len() < MAX_CACHED {
            self.entries.insert(key, (now + POSITIVE_TTL, user));
        }
    }
}

/// Reviews agent tokens with kube-apiserver.
pub struct TokenReviewer {
    api: Api<TokenReview>,
    want: Expected,
    timeout: Duration,
    in_flight: Semaphore,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("want", &self.want)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    /// A reviewer asking `client`'s kube-apiserver, each review bounded by `timeout`.
    pub fn new(client: kube::Client, want: Expected, timeout: Duration) -> Self {
        Self {
            api: Api::all(client),
            want,
            timeout,
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
            cache: Mutex::new(Cache::default()),
        }
    }

    /// What agents must be.
    pub fn expected(&self) -> &Expected {
        &self.want
    }

    /// Reviews `token` (the part after `Bearer `); returns the username.
    pub async fn review(&self, token: &str) -> Result<String, Refusal> {
        let key: TokenHash = Sha256::digest(token.as_bytes()).into();
        if let Some(user) = self.lock().get(&key, Instant::now()) {
            return Ok(user);
        }
        let ask = async {
            let _permit = self.in_flight.acquire().await.expect("never closed");
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: token.to_string(),
                    audiences: Some(vec![self.want.audience.clone()]),
                },
                ..Default::default()
            };
            self.api.create(&PostParams::default(), &review).await
        };
        let answer = match tokio::time::timeout(self.timeout, ask).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(Refusal::Unavailable(e.to_string())),
            Err(_) => {
                return Err(Refusal::Unavailable(format!(
                    "no answer from kube-apiserver within {:?}",
                    self.timeout
                )))
            }
        };
        let user = judge(&answer.status.unwrap_or_default(), &self.want)?;
        self.lock().put(key, user.clone(), Instant::now());
        Ok(user)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    fn want() -> Expected {
        Expected {
            namespace: "kube-system".into(),
            service_account: "konnectivity-agent".into(),
            audience: "system:konnectivity-server".into(),
        }
    }

    fn status(auth: bool, aud: &[&str], user: &str) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(auth),
            audiences: Some(aud.iter().map(|s| s.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(user.into()),
                ..Default::default()
            }),
            error: None,
        }
    }

    #[test]
    fn each_verdict() {
        let aud = "system:konnectivity-server";
        let sa = "system:serviceaccount:kube-system:konnectivity-agent";
        assert_eq!(judge(&status(true, &[aud], sa), &want()), Ok(sa.into()));
        assert_eq!(
            judge(&status(false, &[aud], sa), &want()),
            Err(Refusal::NotAuthenticated("no reason given".into()))
        );
        let mut s = status(false, &[], "");
        s.error = Some("invalid bearer token".into());
        assert_eq!(
            judge(&s, &want()),
            Err(Refusal::NotAuthenticated("invalid bearer token".into()))
        );
        let mut s = status(true, &[aud], sa);
        s.error = Some("boom".into());
        assert_eq!(judge(&s, &want()), Err(Refusal::ReviewError("boom".into())));
        assert!(matches!(
            judge(&status(true, &["other"], sa), &want()),
            Err(Refusal::WrongAudience { .. })
        ));
        assert!(matches!(
            judge(&status(true, &[], sa), &want()),
            Err(Refusal::WrongAudience { .. })
        ));
        for user in ["admin", "system:node:n1", "a:b:c:d", ""] {
            assert!(
                matches!(
                    judge(&status(true, &[aud], user), &want()),
                    Err(Refusal::NotServiceAccount(_))
                ),
                "{user}"
            );
        }
        assert!(matches!(
            judge(
                &status(
                    true,
                    &[aud],
                    "system:serviceaccount:default:konnectivity-agent"
                ),
                &want()
            ),
            Err(Refusal::WrongNamespace { .. })
        ));
        assert!(matches!(
            judge(
                &status(true, &[aud], "system:serviceaccount:kube-system:other"),
                &want()
            ),
            Err(Refusal::WrongServiceAccount { .. })
        ));
    }

    #[test]
    fn cache_expires_and_stays_bounded() {
        let mut c = Cache::default();
        let t0 = Instant::now();
        c.put([1; 32], "u".into(), t0);
        assert_eq!(c.get(&[1; 32], t0), Some("u".into()));
        assert_eq!(c.get(&[1; 32], t0 + POSITIVE_TTL), None);
        assert!(
            c.entries.is_empty(),
            "an expired entry is dropped when seen"
        );
        for i in 0..(MAX_CACHED + 10) {
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&(i as u64).to_le_bytes());
            c.put(k, "u".into(), t0);
        }
        assert_eq!(c.entries.len(), MAX_CACHED);
        // Once the old entries expire, new ones fit again.
        c.put([9; 32], "v".into(), t0 + POSITIVE_TTL);
        assert_eq!(c.entries.len(), 1);
    }
}
