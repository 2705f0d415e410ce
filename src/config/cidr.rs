//! Network blocks in CIDR notation (`10.0.0.0/8`, `fd00::/8`, or a bare address meaning that
//! one host), as given in the configuration's trusted-network lists, and the membership test
//! the listeners make with them.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("{0:?} is not an IP address or network (\"10.0.0.0/8\", \"fd00::/8\", \"192.0.2.1\")")]
    Syntax(String),
    #[error("{text:?}: prefix length must be at most {max}")]
    Prefix { text: String, max: u8 },
    /// `10.1.2.3/8` is almost always a typo for `10.0.0.0/8` or `10.1.2.3/32`; guessing which
    /// could trust far more (or less) than meant.
    #[error("{text:?} has host bits set; the network is {network}")]
    HostBits { text: String, network: Cidr },
}

/// One network block: an address with its prefix length, host bits all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` lies in this block. An IPv4-mapped IPv6 address (`::ffff:10.1.2.3`, what a
    /// dual-stack `[::]` socket reports for an IPv4 peer) is matched as the IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(ip) & mask_v4(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & mask_v6(self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }

    /// Whether any of `networks` holds `ip`.
    pub fn any_contains(networks: &[Cidr], ip: IpAddr) -> bool {
        networks.iter().any(|n| n.contains(ip))
    }
}

fn mask_v4(prefix: u8) -> u32 {
    // A shift by 32 overflows: /0 is the empty mask.
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask_v6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, CidrError> {
        let syntax = || CidrError::Syntax(text.to_owned());
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| syntax())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            // Digits only: `u8::from_str` would take "+8".
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().map_err(|_| syntax())?
            }
            Some(_) => return Err(syntax()),
        };
        if prefix > max {
            return Err(CidrError::Prefix {
                text: text.to_owned(),
                max,
            });
        }
        // An IPv4-mapped block (`::ffff:10.0.0.0/104`) is the IPv4 block it maps: peers are
        // matched in their canonical form, so as written it would never hold one.
        let (addr, prefix) = match addr {
            IpAddr::V6(a) if prefix >= 96 => match a.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), prefix - 96),
                None => (addr, prefix),
            },
            _ => (addr, prefix),
        };
        let network = match addr {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) & mask_v4(prefix)).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & mask_v6(prefix)).into()),
        };
        let cidr = Cidr { network, prefix };
        if network != addr {
            return Err(CidrError::HostBits {
                text: text.to_owned(),
                network: cidr,
            });
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_and_bare_addresses() {
        let n: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains(ip("10.255.1.2")));
        assert!(!n.contains(ip("11.0.0.1")));
        assert!(
            n.contains(ip("::ffff:10.1.2.3")),
            "IPv4-mapped peer of a [::] socket"
        );
        assert!(!n.contains(ip("fd00::1")));
        let h: Cidr = "192.0.2.1".parse().unwrap();
        assert_eq!(h.to_string(), "192.0.2.1/32");
        assert!(h.contains(ip("192.0.2.1")) && !h.contains(ip("192.0.2.2")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fdab::1")) && !v6.contains(ip("fe80::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        let one: Cidr = "::1".parse().unwrap();
        assert!(one.contains(ip("::1")) && !one.contains(ip("::2")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.7")));
        let all6: Cidr = "::/0".parse().unwrap();
        assert!(all6.contains(ip("2001:db8::1")));
        // Written IPv4-mapped, as one might for a dual-stack listener: the same IPv4 block.
        let mapped: Cidr = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(mapped.to_string(), "10.0.0.0/8");
        assert!(mapped.contains(ip("::ffff:10.1.2.3")) && mapped.contains(ip("10.1.2.3")));
        assert!(!mapped.contains(ip("11.0.0.1")));
        let host: Cidr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(host.contains(ip("::ffff:192.0.2.1")) && !host.contains(ip("192.0.2.2")));
    }

    #[test]
    fn bad_text_is_refused() {
        for bad in [
            "",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0/8",
            "host.example",
            "10.0.0.0/8/8",
        ] {
            assert!(
                matches!(bad.parse::<Cidr>(), Err(CidrError::Syntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::Prefix { max: 32, .. })
        ));
        assert!(matches!(
            "fd00::/129".parse::<Cidr>(),
            Err(CidrError::Prefix { max: 128, .. })
        ));
        let e = "10.1.2.3/8".parse::<Cidr>().unwrap_err();
        assert!(e.to_string().contains("10.0.0.0/8"), "{e}");
        let e = "::ffff:10.1.2.3/104".parse::<Cidr>().unwrap_err();
        assert!(e.to_string().contains("10.0.0.0/8"), "{e}");
    }
}
