//! HTTP Basic authentication (`basic_auth = { realm, users_file }` on a listener or route)
//! against an htpasswd file of bcrypt hashes (`htpasswd -B`).
//!
//! bcrypt is slow on purpose (milliseconds per check at the usual costs), which makes it a
//! lever for a client that sends many guesses: each check runs on a blocking thread, never
//! on the thread that serves connections, at most [`CHECKS_AT_ONCE`] at a time (the rest
//! wait their turn), and a password that passed is remembered by its SHA-256 digest, so a
//! logged-in client's next requests cost a hash, not a bcrypt. An unknown user is checked
//! against a stand-in hash, so the time taken does not say which users exist. The password
//! and the hashes never reach a log.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use http::HeaderValue;

/// bcrypt checks running at once, at most (per listener or route with `basic_auth`).
pub const CHECKS_AT_ONCE: usize = 2;
/// Passed credentials remembered, at most; the memory is cleared when full.
const REMEMBERED: usize = 4096;

/// The users of an htpasswd file: name → bcrypt hash.
#[derive(Clone, PartialEq, Eq)]
pub struct Users(pub Arc<HashMap<String, String>>);

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: the hashes stay out of every log and error.
        let mut names: Vec<&String> = self.0.keys().collect();
        names.sort();
        f.debug_tuple("Users").field(&names).finish()
    }
}

/// Reads an htpasswd file: `user:$2y$...` lines, `#` comments and blank lines. An error
/// names the line, never its hash.
pub fn read_users(path: &Path) -> Result<Users, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let Some((user, hash)) = line.split_once(':') else {
            return Err(format!("{at}: expected user:hash"));
        };
        if user.is_empty() {
            return Err(format!("{at}: empty user name"));
        }
        let bcrypt = ["$2a$", "$2b$", "$2x$", "$2y$"]
            .iter()
            .any(|p| hash.starts_with(p));
        if !bcrypt || hash.parse::<bcrypt::HashParts>().is_err() {
            return Err(format!(
                "{at}: user {user:?}: only bcrypt hashes are accepted (make them with `htpasswd -B`)"
            ));
        }
        if users.insert(user.to_string(), hash.to_string()).is_some() {
            return Err(format!("{at}: user {user:?} is listed twice"));
        }
    }
    if users.is_empty() {
        return Err(format!("{}: no users", path.display()));
    }
    Ok(Users(Arc::new(users)))
}

/// One listener's or route's Basic authentication, live: its users, and what it remembers.
pub struct Gate {
    users: Users,
    /// Checked for a user the file does not have (see [`Gate::new`]).
    stand_in: String,
    /// `Basic realm="...", charset="UTF-8"`, for a 401.
    pub challenge: HeaderValue,
    /// SHA-256 of `user:password` pairs that passed.
    passed: Mutex<HashSet<[u8; 32]>>,
    checks: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").field("users", &self.users).finish()
    }
}

impl Gate {
    pub fn new(realm: &str, users: Users) -> Gate {
        // For unknown users: a user's hash with its last digit changed, so the check costs
        // what a known user's does and matches nothing anyone knows.
        let stand_in = users
            .0
            .values()
            .min()
            .map(|h| {
                let mut h = h.clone();
                let last = if h.ends_with('a') { "b" } else { "a" };
                h.pop();
                h.push_str(last);
                h
            })
            .unwrap_or_default();
        let realm = realm.replace(['"', '\\'], "");
        let challenge =
            HeaderValue::try_from(format!("Basic realm=\"{realm}\", charset=\"UTF-8\""))
                .unwrap_or(HeaderValue::from_static("Basic"));
        Gate {
            users,
            stand_in,
            challenge,
            passed: Mutex::default(),
            checks: Arc::new(tokio::sync::Semaphore::new(CHECKS_AT_ONCE)),
        }
    }

    /// Whether the `Authorization` value names a user of the file with its password.
    pub async fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some((user, password)) = authorization.and_then(credentials) else {
            return false;
        };
        let digest = {
            let mut pair = Vec::with_capacity(user.len() + password.len() + 1);
            pair.extend_from_slice(user.as_bytes());
            pair.push(b':');
            pair.extend_from_slice(password.as_bytes());
            let d = ring::digest::digest(&ring::digest::SHA256, &pair);
            let mut out = [0u8; 32];
            out.copy_from_slice(d.as_ref());
            out
        };
        if self.lock().contains(&digest) {
            return true;
        }
        let hash = self.users.0.get(&user).cloned();
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.stand_in.clone());
        let Ok(_permit) = Arc::clone(&self.checks).acquire_owned().await else {
            return false;
        };
        let matched = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
            .await
            .is_ok_and(|r| r.unwrap_or(false));
        if matched && known {
            let mut passed = self.lock();
            if passed.len() >= REMEMBERED {
                passed.clear();
            }
            passed.insert(digest);
        }
        matched && known
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        self.passed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `Basic base64(user:password)` → (user, password); `None` for anything else.
fn credentials(value: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, encoded) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64_decode(encoded.trim())?;
    let pair = String::from_utf8(decoded).ok()?;
    let (user, password) = pair.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// Standard base64 with padding (what clients send in `Authorization: Basic`).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(pair: &str) -> Vec<u8> {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn only_a_listed_user_with_its_password_passes() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let users = Users(Arc::new(HashMap::from([("alice".to_string(), hash)])));
        let gate = Gate::new("Staff \"only\"", users);
        assert_eq!(
            gate.challenge,
            "Basic realm=\"Staff only\", charset=\"UTF-8\""
        );
        assert!(gate.admits(Some(&basic("alice:s3cret"))).await);
        assert!(
            gate.admits(Some(&basic("alice:s3cret"))).await,
            "remembered"
        );
        assert!(!gate.admits(Some(&basic("alice:wrong"))).await);
        assert!(!gate.admits(Some(&basic("bob:s3cret"))).await);
        assert!(!gate.admits(None).await);
        for bad in [
            &b"Bearer abc"[..],
            b"Basic !!!",
            b"Basic",
            b"basic YWxpY2U=",
            b"\xff",
        ] {
            assert!(!gate.admits(Some(bad)).await, "{bad:?}");
        }
        // The stand-in hash parses: an unknown user costs a real bcrypt check.
        assert!(gate.stand_in.parse::<bcrypt::HashParts>().is_ok());
        assert!(format!("{:?}", gate).contains("alice") && !format!("{gate:?}").contains("$2"));
    }
}
