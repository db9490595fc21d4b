//! Who may use a listener or a route: lists of IP ranges (`allow_from`, `deny_from`, a
//! route's `client_cidrs`, `accept_proxy`), on `ipnet`.
//!
//! Every check takes the client's address as the request path knows it (the PROXY header's
//! when there was one). An IPv4 client on a dual-stack socket shows up as
//! `::ffff:a.b.c.d`; ranges are written as IPv4, so such an address is compared as IPv4.

use std::net::IpAddr;

use ipnet::IpNet;

/// IP ranges, written `"10.0.0.0/8"`, `"2001:db8::/32"`, or a bare address (one host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranges(Vec<IpNet>);

impl Ranges {
    pub fn new(ranges: Vec<IpNet>) -> Ranges {
        Ranges(ranges)
    }

    /// One range as an operator writes it. Host bits below the prefix are dropped
    /// (`10.1.2.3/8` is `10.0.0.0/8`), as nginx and HAProxy read it.
    pub fn parse_one(s: &str) -> Option<IpNet> {
        match s.split_once('/') {
            // ipnet reads the prefix with `u8::from_str`, which takes a leading `+`.
            Some((_, prefix)) if !prefix.bytes().all(|b| b.is_ascii_digit()) => None,
            Some(_) => s.parse::<IpNet>().ok().map(|n| n.trunc()),
            None => s.parse::<IpAddr>().ok().map(IpNet::from),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|range| range.contains(&ip))
    }
}

impl std::fmt::Display for Ranges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// `allow_from` and `deny_from` of a listener or a route. A client is refused when its
/// address is in `deny_from`, or when `allow_from` is set and the address is not in it:
/// `deny_from` carves exceptions out of `allow_from` (`allow_from = ["10.0.0.0/8"]`,
/// `deny_from = ["10.6.6.0/24"]`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Access {
    pub allow: Option<Ranges>,
    pub deny: Option<Ranges>,
}

impl Access {
    /// Nothing to check: every client may.
    pub fn is_open(&self) -> bool {
        self.allow.is_none() && self.deny.is_none()
    }

    pub fn permits(&self, ip: IpAddr) -> bool {
        self.allow.as_ref().is_none_or(|a| a.contains(ip))
            && !self.deny.as_ref().is_some_and(|d| d.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(list: &[&str]) -> Ranges {
        Ranges::new(
            list.iter()
                .map(|s| Ranges::parse_one(s).unwrap_or_else(|| panic!("{s}")))
                .collect(),
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_hold_their_addresses_in_both_families() {
        let r = ranges(&["10.0.0.0/8", "127.0.0.1", "2001:db8::/32"]);
        assert!(r.contains(ip("10.200.3.4")));
        assert!(r.contains(ip("::ffff:10.1.2.3")), "v4-mapped is IPv4");
        assert!(!r.contains(ip("11.0.0.1")));
        assert!(r.contains(ip("127.0.0.1")));
        assert!(!r.contains(ip("127.0.0.2")), "a bare address is one host");
        assert!(r.contains(ip("2001:db8:1::9")));
        assert!(!r.contains(ip("2001:db9::1")));
        assert!(ranges(&["::/0"]).contains(ip("2001:db8::1")));
        assert!(ranges(&["0.0.0.0/0"]).contains(ip("8.8.8.8")));
        assert!(
            ranges(&["10.1.2.3/8"]).contains(ip("10.9.9.9")),
            "host bits dropped"
        );
        assert_eq!(
            ranges(&["10.1.2.3/8", "::1"]).to_string(),
            "10.0.0.0/8, ::1/128"
        );
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0/8",
            "::1/129",
            "x",
            "10.0.0.0/+8",
            "",
        ] {
            assert!(Ranges::parse_one(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn deny_carves_exceptions_out_of_allow() {
        let access = Access {
            allow: Some(ranges(&["10.0.0.0/8"])),
            deny: Some(ranges(&["10.6.6.0/24"])),
        };
        assert!(access.permits(ip("10.1.1.1")));
        assert!(!access.permits(ip("10.6.6.7")));
        assert!(!access.permits(ip("192.168.1.1")));
        let deny_only = Access {
            allow: None,
            deny: Some(ranges(&["192.168.0.0/16"])),
        };
        assert!(deny_only.permits(ip("10.1.1.1")));
        assert!(!deny_only.permits(ip("192.168.3.3")));
        assert!(Access::default().permits(ip("1.2.3.4")));
        assert!(Access::default().is_open());
    }
}
