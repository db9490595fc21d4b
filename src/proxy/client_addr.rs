//! The client's address behind proxies the listener trusts (`trusted_proxies`).
//!
//! When a connection comes from a trusted proxy, the client is the right-most entry of
//! `X-Forwarded-For` that is not itself a trusted proxy (each proxy appends the address it
//! saw, so entries right of that one were written by proxies ballast trusts, and the ones
//! left of it by whoever the client is: anything). Without `X-Forwarded-For`, the `for=`
//! parameters of `Forwarded` (RFC 7239) are read the same way. An entry that is no address
//! (`unknown`, an obfuscated name, garbage) ends the walk: the last trusted proxy before it
//! is the client as far as anyone can vouch. A connection from anywhere else keeps its own
//! address, whatever it sends.

use std::net::{IpAddr, SocketAddr};

use crate::access::Ranges;

/// The client `X-Forwarded-For` (its lines in order) or else `Forwarded` names, as seen
/// through `trusted` proxies; `None`: neither names one (the peer stands).
pub fn forwarded_client(
    forwarded_for: &[&[u8]],
    forwarded: &[&[u8]],
    trusted: &Ranges,
) -> Option<IpAddr> {
    if forwarded_for.iter().any(|l| !trim(l).is_empty()) {
        let entries = forwarded_for
            .iter()
            .rev()
            .flat_map(|line| line.rsplit(|b| *b == b','));
        walk(entries, trusted)
    } else {
        // Elements right to left, and each element's `for=` parameter.
        let entries = forwarded
            .iter()
            .rev()
            .flat_map(|line| line.rsplit(|b| *b == b','))
            .filter(|e| !trim(e).is_empty())
            .map(|element| {
                element
                    .split(|b| *b == b';')
                    .find_map(|pair| {
                        let pair = trim(pair);
                        let (name, value) = pair.split_at(pair.iter().position(|b| *b == b'=')?);
                        name.eq_ignore_ascii_case(b"for").then_some(&value[1..])
                    })
                    .unwrap_or(b"")
            });
        walk(entries, trusted)
    }
}

/// The first entry (right to left) that is an address outside `trusted`; the last trusted
/// one when an entry is no address or every entry is trusted.
fn walk<'a>(entries: impl Iterator<Item = &'a [u8]>, trusted: &Ranges) -> Option<IpAddr> {
    let mut last_trusted = None;
    for entry in entries {
        let entry = trim(entry);
        if entry.is_empty() {
            continue;
        }
        match address(entry) {
            Some(ip) if trusted.contains(ip) => last_trusted = Some(ip),
            Some(ip) => return Some(ip),
            None => return last_trusted,
        }
    }
    last_trusted
}

/// `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`, `[2001:db8::1]:4711`, optionally in
/// double quotes (`Forwarded` quotes IPv6 and ports).
fn address(entry: &[u8]) -> Option<IpAddr> {
    let entry = entry
        .strip_prefix(b"\"")
        .and_then(|e| e.strip_suffix(b"\""))
        .unwrap_or(entry);
    let text = std::str::from_utf8(entry).ok()?;
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sa) = text.parse::<SocketAddr>() {
        return Some(sa.ip().to_canonical());
    }
    // `[2001:db8::1]` without a port.
    text.strip_prefix('[')?
        .strip_suffix(']')?
        .parse::<IpAddr>()
        .ok()
}

fn trim(b: &[u8]) -> &[u8] {
    b.trim_ascii()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted() -> Ranges {
        Ranges::new(
            ["10.0.0.0/8", "2001:db8:ffff::/48"]
                .iter()
                .filter_map(|s| Ranges::parse_one(s))
                .collect(),
        )
    }

    fn xff(lines: &[&str]) -> Option<IpAddr> {
        let lines: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
        forwarded_client(&lines, &[], &trusted())
    }

    fn fwd(lines: &[&str]) -> Option<IpAddr> {
        let lines: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
        forwarded_client(&[], &lines, &trusted())
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn the_right_most_untrusted_entry_of_x_forwarded_for_is_the_client() {
        assert_eq!(xff(&["203.0.113.7"]), ip("203.0.113.7"));
        // A client's own (spoofed) entries are left of the real one.
        assert_eq!(xff(&["1.1.1.1, 203.0.113.7"]), ip("203.0.113.7"));
        assert_eq!(xff(&["1.1.1.1, 203.0.113.7, 10.1.1.1"]), ip("203.0.113.7"));
        // Lines are one list, in order.
        assert_eq!(
            xff(&["1.1.1.1", "203.0.113.7 ,10.1.1.1"]),
            ip("203.0.113.7")
        );
        assert_eq!(xff(&["1.1.1.1, 203.0.113.7", ""]), ip("203.0.113.7"));
        // Every entry trusted: the left-most.
        assert_eq!(xff(&["10.3.3.3, 10.1.1.1"]), ip("10.3.3.3"));
        // Garbage where the client should be: the proxy that wrote it.
        assert_eq!(xff(&["203.0.113.7, unknown, 10.1.1.1"]), ip("10.1.1.1"));
        assert_eq!(xff(&["unknown"]), None);
        assert_eq!(xff(&["", " "]), None);
        // Ports, brackets and IPv4-mapped IPv6 are read as the address they carry.
        assert_eq!(xff(&["203.0.113.7:4711"]), ip("203.0.113.7"));
        assert_eq!(xff(&["[2001:db8::7]:4711"]), ip("2001:db8::7"));
        assert_eq!(xff(&["::ffff:203.0.113.7"]), ip("203.0.113.7"));
        assert_eq!(xff(&["2001:db8::7, 2001:db8:ffff::1"]), ip("2001:db8::7"));
    }

    #[test]
    fn forwarded_is_read_when_there_is_no_x_forwarded_for() {
        assert_eq!(fwd(&["for=203.0.113.7;proto=https"]), ip("203.0.113.7"));
        assert_eq!(
            fwd(&["for=1.1.1.1, For=\"[2001:db8::7]:4711\";by=10.0.0.1, for=10.2.2.2"]),
            ip("2001:db8::7")
        );
        assert_eq!(fwd(&["for=\"_hidden\", for=10.2.2.2"]), ip("10.2.2.2"));
        assert_eq!(fwd(&["proto=https"]), None, "no for= at all");
        // X-Forwarded-For wins when both are there.
        let lines: [&[u8]; 1] = [b"203.0.113.9"];
        let forwarded: [&[u8]; 1] = [b"for=203.0.113.7"];
        assert_eq!(
            forwarded_client(&lines, &forwarded, &trusted()),
            ip("203.0.113.9")
        );
    }
}
