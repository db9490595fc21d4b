//! TLS session tickets that outlive a reload and, with a shared key file, work across
//! replicas.
//!
//! A ticket is the server's encrypted session state, kept by the client: a client that
//! returns with one skips the certificate signature, the expensive part of a full
//! handshake. Which server can read it depends on the key:
//! - without `session_ticket_keys_file`, one process-wide set of random keys, made at the
//!   first TLS listener and kept across every reload. A new key every 12 hours, the
//!   previous one still accepted (rustls's `TicketRotator`).
//! - with it, the file's keys, so that every replica reading the same file reads the
//!   others' tickets. The operator rotates them by putting a new key first and keeping the
//!   old one after it until its tickets have expired; the file is watched like a
//!   certificate.
//!
//! A ticket is the key's 16-byte name, a random 96-bit nonce, and the state sealed with
//! AES-256-GCM under the key's last 32 bytes, with the name as associated data. The key
//! file's layout is nginx's (`ssl_session_ticket_key`): name, 32 bytes nginx uses for HMAC
//! (unused here: GCM authenticates), then the AES key.

use std::sync::{Arc, OnceLock};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;

use crate::config::tls::{TicketKeys, TICKET_KEY_LEN};

/// How long a client is told to keep a ticket; also how often the process's own keys
/// change (each accepted for up to twice this).
const LIFETIME_SECS: u32 = 12 * 60 * 60;
const NAME_LEN: usize = 16;

/// The ticketer for a listener: the file's keys, else the process-wide rotating ones.
pub fn ticketer(keys: Option<&TicketKeys>) -> Result<Arc<dyn ProducesTickets>, rustls::Error> {
    match keys {
        Some(keys) => Ok(Arc::new(FileTicketer::new(keys)?)),
        None => process_ticketer(),
    }
}

/// Made once: every accept loop, before and after any reload, shares it.
fn process_ticketer() -> Result<Arc<dyn ProducesTickets>, rustls::Error> {
    static TICKETER: OnceLock<Arc<dyn ProducesTickets>> = OnceLock::new();
    if let Some(t) = TICKETER.get() {
        return Ok(Arc::clone(t));
    }
    let made: Arc<dyn ProducesTickets> = Arc::new(rustls::ticketer::TicketRotator::new(
        LIFETIME_SECS,
        random_key,
    )?);
    // Two listeners racing here both end up with the one that was stored first.
    Ok(Arc::clone(TICKETER.get_or_init(|| made)))
}

fn random_key() -> Result<Box<dyn ProducesTickets>, rustls::crypto::GetRandomFailed> {
    let mut key = [0u8; TICKET_KEY_LEN];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| rustls::crypto::GetRandomFailed)?;
    let sealer = Sealer::new(&key).ok_or(rustls::crypto::GetRandomFailed)?;
    Ok(Box::new(FileTicketer {
        sealers: vec![sealer],
    }))
}

/// One key: its name and its AEAD key.
struct Sealer {
    name: [u8; NAME_LEN],
    key: LessSafeKey,
}

impl Sealer {
    fn new(raw: &[u8]) -> Option<Sealer> {
        let name = raw.get(..NAME_LEN)?.try_into().ok()?;
        let aes = raw.get(TICKET_KEY_LEN - 32..TICKET_KEY_LEN)?;
        let key = UnboundKey::new(&aead::AES_256_GCM, aes).ok()?;
        Some(Sealer {
            name,
            key: LessSafeKey::new(key),
        })
    }
}

/// Seals with the first key, opens with any.
struct FileTicketer {
    sealers: Vec<Sealer>,
}

impl FileTicketer {
    fn new(keys: &TicketKeys) -> Result<FileTicketer, rustls::Error> {
        let sealers: Option<Vec<Sealer>> = keys.keys().map(Sealer::new).collect();
        match sealers {
            Some(sealers) if !sealers.is_empty() => Ok(FileTicketer { sealers }),
            _ => Err(rustls::Error::General(format!(
                "{}: unusable session ticket keys",
                keys.path.display()
            ))),
        }
    }
}

impl std::fmt::Debug for FileTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileTicketer")
            .field("keys", &self.sealers.len())
            .finish()
    }
}

impl ProducesTickets for FileTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        LIFETIME_SECS
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let sealer = self.sealers.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(NAME_LEN + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&sealer.name);
        out.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        sealer
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&sealer.name),
                &mut sealed,
            )
            .ok()?;
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        let name = ticket.get(..NAME_LEN)?;
        let nonce = ticket.get(NAME_LEN..NAME_LEN + NONCE_LEN)?;
        let sealer = self.sealers.iter().find(|s| s.name == name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut sealed = ticket.get(NAME_LEN + NONCE_LEN..)?.to_vec();
        let plain = sealer
            .key
            .open_in_place(nonce, Aad::from(&sealer.name), &mut sealed)
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(raw: &[[u8; TICKET_KEY_LEN]]) -> FileTicketer {
        FileTicketer {
            sealers: raw.iter().filter_map(|k| Sealer::new(k)).collect(),
        }
    }

    #[test]
    fn a_ticket_opens_with_its_key_wherever_it_sits_and_not_otherwise() {
        let (old, new) = ([1u8; TICKET_KEY_LEN], [2u8; TICKET_KEY_LEN]);
        let before = keys(&[old]);
        let ticket = before.encrypt(b"session state").expect("sealed");
        // Rotated: the new key first, the old one still accepted.
        let rotated = keys(&[new, old]);
        assert_eq!(
            rotated.decrypt(&ticket).as_deref(),
            Some(&b"session state"[..])
        );
        let fresh = rotated.encrypt(b"later").expect("sealed");
        assert_eq!(
            &fresh[..NAME_LEN],
            &new[..NAME_LEN],
            "sealed with the first key"
        );
        // The old key dropped: its tickets are refused, not misread.
        assert_eq!(keys(&[new]).decrypt(&ticket), None);
        // Tampering, truncation and garbage are refused.
        let mut bent = ticket.clone();
        let last = bent.len() - 1;
        bent[last] ^= 1;
        assert_eq!(rotated.decrypt(&bent), None);
        assert_eq!(rotated.decrypt(&ticket[..20]), None);
        assert_eq!(rotated.decrypt(b""), None);
    }

    #[test]
    fn the_process_keys_are_one_set_for_every_listener() {
        let (a, b) = (
            process_ticketer().expect("a"),
            process_ticketer().expect("b"),
        );
        let ticket = a.encrypt(b"state").expect("sealed");
        assert_eq!(b.decrypt(&ticket).as_deref(), Some(&b"state"[..]));
    }
}
