//! One ACME order, start to finish, through `instant-acme`: the account (made once per
//! directory and kept in `storage`), the challenges answered from `storage`, and the
//! certificate installed there. Called only by the holder of the renewal lock.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, CertificateIdentifier,
    ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};

use super::{challenge, storage};
use crate::config::{AcmeChallenge, AcmeConfig};

/// Why an attempt failed, in words for the log and `/status`.
pub type Failure = String;

/// How long the CA gets to validate and to issue (each).
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(2.0)
    .timeout(Duration::from_secs(90));

/// The HTTP client for the CA: ballast's rustls provider, trusting the Mozilla roots
/// (webpki-roots: the container image has no CA store) and `directory_ca`.
fn http_client(cfg: &AcmeConfig) -> Result<Box<dyn instant_acme::HttpClient>, Failure> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = &cfg.directory_ca {
        roots.roots.extend(ca.roots.roots.iter().cloned());
    }
    let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS client: {e}"))?
        .with_root_certificates(Arc::new(roots))
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    let client: hyper_util::client::legacy::Client<_, BodyWrapper<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    Ok(Box::new(client))
}

/// The account's file: one per directory URL, so a switch from staging to production
/// makes a new account instead of presenting the wrong one.
fn account_path(cfg: &AcmeConfig) -> PathBuf {
    let digest = ring::digest::digest(&ring::digest::SHA256, cfg.directory.as_bytes());
    let short: String = digest.as_ref()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    cfg.storage.join(format!("account-{short}.json"))
}

/// The stored account, without creating one: for ARI, which any replica may ask.
pub async fn existing_account(cfg: &AcmeConfig) -> Option<Account> {
    let text = std::fs::read(account_path(cfg)).ok()?;
    let creds: AccountCredentials = serde_json::from_slice(&text).ok()?;
    let http = http_client(cfg).ok()?;
    Account::builder_with_http(http)
        .from_credentials(creds)
        .await
        .ok()
}

/// The stored account, or a new one (saved, 0600). Under the lock.
async fn account(cfg: &AcmeConfig) -> Result<Account, Failure> {
    let path = account_path(cfg);
    if let Ok(text) = std::fs::read(&path) {
        let creds: AccountCredentials = serde_json::from_slice(&text)
            .map_err(|e| format!("{}: unreadable account: {e}", path.display()))?;
        return Account::builder_with_http(http_client(cfg)?)
            .from_credentials(creds)
            .await
            .map_err(|e| format!("directory {}: {}", cfg.directory, why(&e)));
    }
    let contact: Vec<String> = cfg.email.iter().map(|e| format!("mailto:{e}")).collect();
    let contact: Vec<&str> = contact.iter().map(|c| c.as_str()).collect();
    let (account, creds) = Account::builder_with_http(http_client(cfg)?)
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            cfg.directory.clone(),
            None,
        )
        .await
        .map_err(|e| format!("creating an account at {}: {}", cfg.directory, why(&e)))?;
    let json = serde_json::to_vec(&creds).map_err(|e| format!("account: {e}"))?;
    storage::write_atomic(&path, &json)
        .map_err(|e| format!("cannot save the account in {}: {e}", path.display()))?;
    tracing::info!(directory = %cfg.directory, file = %path.display(), "ACME account created");
    Ok(account)
}

/// Orders a certificate for `cfg.domains` and installs it. `replaces`: the certificate
/// this one renews, for a CA that offers ARI.
pub async fn obtain(
    cfg: &AcmeConfig,
    replaces: Option<CertificateIdentifier<'static>>,
) -> Result<(), Failure> {
    let account = account(cfg).await?;
    let ids: Vec<Identifier> = cfg.domains.iter().cloned().map(Identifier::Dns).collect();
    let mut new_order = NewOrder::new(&ids);
    if let Some(r) = replaces {
        new_order = new_order.replaces(r);
    }
    let mut order = match account.new_order(&new_order).await {
        Ok(order) => order,
        Err(instant_acme::Error::Api(p))
            if p.r#type
                .as_deref()
                .is_some_and(|t| t.ends_with(":accountDoesNotExist")) =>
        {
            // The CA forgot the account (a reset test CA, a deactivation): the next attempt
            // makes a new one.
            let _ = std::fs::remove_file(account_path(cfg));
            return Err(format!(
                "new order: the CA does not know the stored account ({p}); a new account is made on the next attempt"
            ));
        }
        Err(e) => return Err(format!("new order: {}", why(&e))),
    };
    let kind = match cfg.challenge {
        AcmeChallenge::Http01 => ChallengeType::Http01,
        AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
    };
    // Answers written for this order, removed whatever its outcome.
    let mut answers = Answers(Vec::new());
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz.map_err(|e| format!("authorization: {}", why(&e)))?;
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => return Err(format!("authorization is {other:?}")),
        }
        let mut ch = authz
            .challenge(kind.clone())
            .ok_or_else(|| format!("the CA offers no {kind:?} challenge"))?;
        let name = ch.identifier().to_string();
        // Both become file names in `storage`: only what was asked for, and a token in
        // RFC 8555's alphabet, ever does.
        if !cfg.domains.contains(&name) {
            return Err(format!(
                "the CA asks to validate {name:?}, which was not ordered"
            ));
        }
        let token_ok = !ch.token.is_empty()
            && ch
                .token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !token_ok {
            return Err(format!(
                "the CA sent an unusable challenge token {:?}",
                ch.token
            ));
        }
        let key_auth = ch.key_authorization();
        let (path, bytes) = match cfg.challenge {
            AcmeChallenge::Http01 => (
                challenge::http01_path(&cfg.storage, &ch.token),
                key_auth.as_str().as_bytes().to_vec(),
            ),
            AcmeChallenge::TlsAlpn01 => (
                challenge::tls_alpn_path(&cfg.storage, &name),
                challenge::tls_alpn_certificate(&name, key_auth.digest().as_ref())
                    .map_err(|e| format!("challenge certificate: {e}"))?
                    .into_bytes(),
            ),
        };
        if let Some(dir) = path.parent() {
            storage::make_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        storage::write_atomic(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        answers.0.push(path);
        ch.set_ready()
            .await
            .map_err(|e| format!("challenge for {name}: {}", why(&e)))?;
    }
    let status = order
        .poll_ready(&POLL)
        .await
        .map_err(|e| format!("waiting for validation: {}", why(&e)))?;
    if status != OrderStatus::Ready {
        return Err(format!(
            "the order is {status:?}: {}",
            why_invalid(&mut order).await
        ));
    }
    let key_pem = order
        .finalize()
        .await
        .map_err(|e| format!("finalize: {}", why(&e)))?;
    let chain_pem = order
        .poll_certificate(&POLL)
        .await
        .map_err(|e| format!("waiting for the certificate: {}", why(&e)))?;
    drop(answers);
    // What the CA sent must load as ballast would load it, before it replaces anything.
    check_issued(cfg, &chain_pem, &key_pem)?;
    storage::install_certificate(
        &cfg.cert_dir(),
        chain_pem.as_bytes(),
        key_pem.as_bytes(),
        &cfg.directory,
    )
    .map_err(|e| format!("cannot install in {}: {e}", cfg.cert_dir().display()))
}

/// The challenges' errors, as the CA gave them.
async fn why_invalid(order: &mut instant_acme::Order) -> String {
    let mut reasons = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(authz)) = authorizations.next().await {
        for ch in &authz.challenges {
            if let Some(e) = &ch.error {
                reasons.push(format!("{}: {e}", authz.identifier()));
            }
        }
    }
    if reasons.is_empty() {
        "the CA gave no reason".into()
    } else {
        reasons.join("; ")
    }
}

fn check_issued(cfg: &AcmeConfig, chain_pem: &str, key_pem: &str) -> Result<(), Failure> {
    let dir = tempfile_dir(cfg)?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let result = storage::write_atomic(&cert, chain_pem.as_bytes())
        .and_then(|()| storage::write_atomic(&key, key_pem.as_bytes()))
        .map_err(|e| format!("{}: {e}", dir.display()))
        .and_then(|()| crate::config::tls::load_pair(&cert, &key))
        .and_then(
            |pair| match cfg.domains.iter().find(|d| !pair.names.contains(d)) {
                Some(missing) => Err(format!("the issued certificate lacks {missing}")),
                None => Ok(()),
            },
        );
    let _ = std::fs::remove_dir_all(&dir);
    result.map_err(|e| format!("the CA's certificate is unusable: {e}"))
}

fn tempfile_dir(cfg: &AcmeConfig) -> Result<PathBuf, Failure> {
    let dir = cfg.storage.join(format!(".check-{}", std::process::id()));
    storage::make_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// Challenge answers to remove when the order ends.
struct Answers(Vec<PathBuf>);

impl Drop for Answers {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// An error with its causes ("client error (Connect): tcp connect error: Connection
/// refused"): the HTTP client's own message names only the step that failed.
fn why(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}
