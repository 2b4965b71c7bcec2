//! Agent authentication by bearer token: against a file of accepted tokens
//! (re-read on every agent connect, so tokens rotate without a restart), or
//! by asking kube-apiserver (TokenReview, [`konnectivity_kube::token_review`]).
//! The `authorization` metadata is checked here first: missing, repeated or
//! non-`Bearer` values are refused without reading the file or calling the API.

use std::path::PathBuf;
use std::sync::Arc;

use konnectivity_kube::token_review::{Refusal, TokenReviewer};

/// Why an agent was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` metadata.
    #[error("no bearer token presented")]
    Missing,
    /// More than one `authorization` value.
    #[error("several authorization values")]
    Several,
    /// The metadata is not `Bearer <token>`.
    #[error("authorization metadata is not a bearer token")]
    Malformed,
    /// The token is not in the accepted set.
    #[error("bearer token not accepted")]
    Rejected,
    /// The token file could not be read.
    #[error("token file {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// kube-apiserver's review refused the token, or could not be asked.
    #[error("{0}")]
    Review(Refusal),
}

impl AuthError {
    /// Metric label (`reason` of the agent refusal counter).
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "no_token",
            AuthError::Several => "several_tokens",
            AuthError::Malformed => "malformed_token",
            AuthError::Rejected => "unauthenticated",
            AuthError::File { .. } => "token_file_unreadable",
            AuthError::Review(r) => r.reason(),
        }
    }

    /// True when the refusal says nothing about the agent (retry later).
    pub fn is_transient(&self) -> bool {
        match self {
            AuthError::File { .. } => true,
            AuthError::Review(r) => r.is_transient(),
            _ => false,
        }
    }
}

/// The token from the `authorization` values of a stream.
pub fn bearer<'a>(values: &[&'a str]) -> Result<&'a str, AuthError> {
    let value = match values {
        [] => return Err(AuthError::Missing),
        [one] => *one,
        _ => return Err(AuthError::Several),
    };
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::Malformed)
}

/// How agent streams are authenticated (beyond the TLS client certificate,
/// which the listener checks when `--cluster-ca-cert` is set).
#[derive(Debug, Clone, Default)]
pub enum AgentAuth {
    /// No token check.
    #[default]
    None,
    /// `--agent-tokens-file`.
    TokenFile(Arc<TokenFile>),
    /// `--agent-namespace`, `--agent-service-account`, `--authentication-audience`.
    TokenReview(Arc<TokenReviewer>),
}

impl AgentAuth {
    /// Checks a stream's `authorization` values; returns who the agent is
    /// when a review says so.
    pub async fn check(&self, values: &[&str]) -> Result<Option<String>, AuthError> {
        match self {
            AgentAuth::None => Ok(None),
            AgentAuth::TokenFile(f) => f.check_token(bearer(values)?).map(|()| None),
            AgentAuth::TokenReview(r) => r
                .review(bearer(values)?)
                .await
                .map(Some)
                .map_err(AuthError::Review),
        }
    }
}

/// Largest token file we read.
const MAX_FILE: u64 = 1 << 20;

/// A file of accepted tokens, one per line; blank lines and `#` comments are
/// ignored.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
}

impl TokenFile {
    /// A token file at `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// Reads the accepted tokens.
    pub fn load(&self) -> Result<Vec<String>, AuthError> {
        let err = |reason: String| AuthError::File {
            path: self.path.display().to_string(),
            reason,
        };
        let meta = std::fs::metadata(&self.path).map_err(|e| err(e.to_string()))?;
        if meta.len() > MAX_FILE {
            return Err(err(format!("larger than {MAX_FILE} bytes")));
        }
        let text = std::fs::read_to_string(&self.path).map_err(|e| err(e.to_string()))?;
        let tokens: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect();
        if tokens.is_empty() {
            return Err(err("no tokens in file".into()));
        }
        Ok(tokens)
    }

    /// Checks a bearer token (without its `Bearer ` prefix).
    pub fn check_token(&self, token: &str) -> Result<(), AuthError> {
        let accepted = self.load()?;
        // Compare every token in full so timing does not tell which prefix matched.
        let mut ok = false;
        for a in &accepted {
            ok |= constant_time_eq(a.as_bytes(), token.as_bytes());
        }
        if ok {
            Ok(())
        } else {
            Err(AuthError::Rejected)
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_bearer_tokens_against_the_file_and_sees_rotation() {
        let dir = std::env::temp_dir().join(format!("tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        std::fs::write(&path, "# agents\nalpha\n\n").unwrap();
        let f = TokenFile::new(path.clone());
        let check = |v: &[&str]| f.check_token(bearer(v)?);
        assert_eq!(check(&["Bearer alpha"]), Ok(()));
        assert_eq!(check(&["Bearer beta"]), Err(AuthError::Rejected));
        assert_eq!(check(&[]), Err(AuthError::Missing));
        assert_eq!(
            check(&["Bearer alpha", "Bearer alpha"]),
            Err(AuthError::Several)
        );
        assert_eq!(check(&["Basic alpha"]), Err(AuthError::Malformed));
        assert_eq!(check(&["Bearer "]), Err(AuthError::Malformed));
        std::fs::write(&path, "beta\n").unwrap();
        assert_eq!(check(&["Bearer beta"]), Ok(()));
        assert_eq!(check(&["Bearer alpha"]), Err(AuthError::Rejected));
        std::fs::remove_dir_all(&dir).ok();
    }
}
