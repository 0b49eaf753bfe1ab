//! Who is calling the panel and API, and what they may do.
//!
//! * Browsers log in with a password (argon2 hashes) and get a session
//!   cookie (`HttpOnly`, `SameSite=Strict`, `Secure` under TLS). Every
//!   change made with a session must carry the session's CSRF token in the
//!   `X-CSRF-Token` header (a synchronizer token: a cross-site page can make
//!   the browser send the cookie, but cannot read the token).
//! * Scripts use API tokens (`Authorization: Bearer bft_…`) with a scope;
//!   no cookie is involved, so no CSRF token is needed.
//! * Secrets (session ids, tokens) are stored only as SHA-256 hashes.
//! * Failed logins are rate-limited per client address and per user name.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::http::{HeaderMap, Method};
use sha2::{Digest, Sha256};

use super::ApiError;
use crate::store::{InventoryStore, Scope};

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "bf_session";
/// How long a session lasts.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Failed logins allowed per address, and per address and user name
/// together, within [`FAILURE_WINDOW`].
const MAX_FAILURES: usize = 5;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The user name, or `token:NAME` for API tokens (the audit log's actor).
    pub actor: String,
    pub scope: Scope,
    /// The session's CSRF token (none for API tokens).
    pub csrf: Option<String>,
}

/// Hex of random bytes.
pub fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    rand::fill(&mut buffer[..]);
    crate::proto::lower_hex(&buffer)
}

/// SHA-256 of a secret, as stored.
pub fn secret_hash(secret: &str) -> String {
    crate::proto::lower_hex(&Sha256::digest(secret.as_bytes()))
}

/// An argon2id hash in PHC format.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
}

/// Whether `password` matches the stored hash.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A password an operator may choose.
pub fn check_password_strength(password: &str) -> Result<(), String> {
    if password.chars().count() < 10 {
        return Err("the password must have at least 10 characters".into());
    }
    Ok(())
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// The caller of a request needing `required`, checking CSRF for changes
/// made with a session.
pub fn authorize(
    store: &dyn InventoryStore,
    headers: &HeaderMap,
    method: &Method,
    required: Scope,
) -> Result<Caller, ApiError> {
    let now = super::now_ms();
    let caller = if let Some(auth) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let secret = auth
            .strip_prefix("Bearer ")
            .ok_or_else(|| ApiError::unauthorized("Authorization must be \"Bearer <token>\""))?;
        let token = store
            .token(&secret_hash(secret.trim()), now)?
            .ok_or_else(|| ApiError::unauthorized("unknown or revoked API token"))?;
        Caller {
            actor: format!("token:{}", token.name),
            scope: token.scope,
            csrf: None,
        }
    } else if let Some(session_id) = cookie_value(headers, SESSION_COOKIE) {
        let session = store
            .session(&secret_hash(session_id), now)?
            .ok_or_else(|| ApiError::unauthorized("session expired; log in again"))?;
        Caller {
            actor: session.user,
            scope: session.scope,
            csrf: Some(session.csrf),
        }
    } else {
        return Err(ApiError::unauthorized(
            "log in (POST /api/v1/login) or send an API token (Authorization: Bearer …)",
        ));
    };
    if let Some(expected) = &caller.csrf {
        let changes = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        let sent = headers.get("x-csrf-token").and_then(|v| v.to_str().ok());
        if changes && sent != Some(expected.as_str()) {
            return Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "missing or wrong X-CSRF-Token header (GET /api/v1/session gives it)",
            ));
        }
    }
    if caller.scope < required {
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            format!(
                "{} has scope {}; this needs {}",
                caller.actor,
                caller.scope.as_str(),
                required.as_str()
            ),
        ));
    }
    Ok(caller)
}

/// A submitted login name as logs, the audit log and the limiter keep it:
/// at most 64 characters, control characters escaped (a failed login once
/// stored 1.5 MB of name verbatim).
pub fn login_name_for_records(name: &str) -> String {
    const MAX: usize = 64;
    let mut kept: String = name
        .chars()
        .take(MAX)
        .flat_map(char::escape_default)
        .collect();
    if name.chars().count() > MAX {
        kept.push('…');
    }
    kept
}

/// Failed logins by client address, and by address and user name together.
/// Never by the name alone: then anyone could keep `admin` locked out from
/// everywhere by failing to log in as it.
#[derive(Default)]
pub struct LoginLimiter {
    failures: Mutex<HashMap<String, Vec<Instant>>>,
}

impl LoginLimiter {
    fn keys(client: IpAddr, user: &str) -> [String; 2] {
        [
            format!("ip:{client}"),
            format!("ip:{client} user:{}", login_name_for_records(user)),
        ]
    }

    /// Seconds to wait before another attempt, if any.
    pub fn retry_after(&self, client: IpAddr, user: &str) -> Option<u64> {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        Self::keys(client, user)
            .iter()
            .filter_map(|key| {
                let list = failures.get_mut(key)?;
                list.retain(|t| now.duration_since(*t) < FAILURE_WINDOW);
                (list.len() >= MAX_FAILURES)
                    .then(|| (FAILURE_WINDOW - now.duration_since(list[0])).as_secs() + 1)
            })
            .max()
    }

    pub fn failed(&self, client: IpAddr, user: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() > 100_000 {
            failures.clear();
        }
        for key in Self::keys(client, user) {
            failures.entry(key).or_default().push(Instant::now());
        }
    }

    pub fn succeeded(&self, client: IpAddr, user: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        for key in Self::keys(client, user) {
            failures.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_and_verify() {
        let hash = hash_password("correct horse battery").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(verify_password("correct horse battery", &hash));
        assert!(!verify_password("correct horse batterY", &hash));
        assert!(!verify_password("x", "not a hash"));
    }

    #[test]
    fn stored_login_names_are_short_and_printable() {
        assert_eq!(login_name_for_records("alice"), "alice");
        assert_eq!(login_name_for_records("a\nb"), "a\\nb");
        let long = "x".repeat(1_500_000);
        assert_eq!(login_name_for_records(&long).chars().count(), 65);
    }

    #[test]
    fn the_limiter_blocks_after_five_failures() {
        let limiter = LoginLimiter::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            assert_eq!(limiter.retry_after(ip, "alice"), None);
            limiter.failed(ip, "alice");
        }
        assert!(limiter.retry_after(ip, "alice").is_some());
        // The address is blocked for every name; the user is not blocked
        // from another address (security review finding 12: failures from
        // one host kept `admin` locked out everywhere).
        assert!(limiter.retry_after(ip, "bob").is_some());
        assert_eq!(
            limiter.retry_after("10.0.0.2".parse().unwrap(), "alice"),
            None
        );
        assert_eq!(
            limiter.retry_after("10.0.0.2".parse().unwrap(), "bob"),
            None
        );
    }
}
