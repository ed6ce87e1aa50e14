//! Release tokens: what binds a source's copy to the one transfer that may
//! release it. The source hands a fresh token out with a move's export and
//! keeps only its SHA-256; the destination keeps the token with its
//! transfer and presents it when it asks the source to release (after the
//! move) or to withdraw the export (after an abort). Anyone without it,
//! whatever their certificate, releases nothing.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::AgentError;

/// Random bytes in a token: 256 bits, far past guessing.
const TOKEN_BYTES: usize = 32;

/// How many tokens of one export stay valid: a caller that repeats
/// ExportVolume (a lost answer, a retry) gets a new token each time, and
/// the few before it still work for a transfer that already holds one.
pub const TOKENS_KEPT: usize = 4;

/// A release token in the clear. Its `Debug` never shows it, so it cannot
/// reach a log line by accident.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReleaseToken(String);

impl ReleaseToken {
    /// A fresh token from the operating system's random source.
    pub fn generate() -> Result<Self, AgentError> {
        let mut bytes = [0u8; TOKEN_BYTES];
        getrandom::fill(&mut bytes)
            .map_err(|err| AgentError::Internal(format!("no random bytes for a token: {err}")))?;
        Ok(Self(hex(&bytes)))
    }

    /// A token a caller presented; an empty one is none.
    pub fn presented(text: &str) -> Option<Self> {
        (!text.is_empty()).then(|| Self(text.to_owned()))
    }

    /// The token's SHA-256 in hex: what the source stores.
    pub fn digest(&self) -> String {
        hex(&Sha256::digest(self.0.as_bytes()))
    }

    /// Whether this token's digest is one of `digests`.
    pub fn matches(&self, digests: &[String]) -> bool {
        let mine = self.digest();
        digests.contains(&mine)
    }

    /// The token for the wire, to the one party that must hold it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ReleaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReleaseToken(<redacted>)")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tokens_are_fresh_long_and_never_shown_by_debug() {
        let one = ReleaseToken::generate().unwrap();
        let two = ReleaseToken::generate().unwrap();
        assert_ne!(one, two);
        assert_eq!(one.expose().len(), 2 * TOKEN_BYTES);
        let shown = format!("{one:?} {:?}", Some(&two));
        assert!(!shown.contains(one.expose()) && !shown.contains(two.expose()));
        assert!(shown.contains("redacted"), "{shown}");
    }

    #[test]
    fn only_the_token_itself_matches_its_digest() {
        let token = ReleaseToken::generate().unwrap();
        let digests = vec![ReleaseToken::generate().unwrap().digest(), token.digest()];
        assert!(token.matches(&digests));
        assert!(!token.matches(&digests[..1]));
        assert_ne!(
            token.digest(),
            token.expose(),
            "the digest is not the token"
        );
        let presented = ReleaseToken::presented(token.expose()).unwrap();
        assert!(presented.matches(&digests));
        assert_eq!(ReleaseToken::presented(""), None);
    }
}
