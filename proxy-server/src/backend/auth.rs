//! Agent authentication by bearer token against a file of accepted tokens.
//! The file is re-read on every agent connect, so tokens can be rotated
//! without a restart.

use std::path::PathBuf;

/// Why an agent was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` metadata.
    #[error("no bearer token presented")]
    Missing,
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

    /// Checks an `authorization` metadata value.
    pub fn check(&self, authorization: Option<&str>) -> Result<(), AuthError> {
        let value = authorization.ok_or(AuthError::Missing)?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Malformed)?;
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
        assert_eq!(f.check(Some("Bearer alpha")), Ok(()));
        assert_eq!(f.check(Some("Bearer beta")), Err(AuthError::Rejected));
        assert_eq!(f.check(None), Err(AuthError::Missing));
        assert_eq!(f.check(Some("Basic alpha")), Err(AuthError::Malformed));
        std::fs::write(&path, "beta\n").unwrap();
        assert_eq!(f.check(Some("Bearer beta")), Ok(()));
        assert_eq!(f.check(Some("Bearer alpha")), Err(AuthError::Rejected));
        std::fs::remove_dir_all(&dir).ok();
    }
}
