//! GIDs: the 128-bit port addresses of InfiniBand and RoCE, their types, and their text forms.
//! Pure.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::sys::verbs as sys;

/// A GID (`union ibv_gid`), in network byte order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Gid(pub [u8; 16]);

impl Gid {
    /// Whether every byte is zero: an empty GID table entry.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// The IPv4 address of a RoCE v2 GID made from one (`::ffff:a.b.c.d`), else `None`.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        Ipv6Addr::from(self.0).to_ipv4_mapped()
    }

    pub(crate) fn to_sys(self) -> sys::ibv_gid {
        sys::ibv_gid { raw: self.0 }
    }
}

/// The sysfs form (`/sys/class/infiniband/*/ports/*/gids/N`): eight groups of four hex digits,
/// e.g. `fe80:0000:0000:0000:0202:c9ff:fe00:0001`.
impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, pair) in self.0.chunks(2).enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{:02x}{:02x}", pair[0], pair[1])?;
        }
        Ok(())
    }
}

impl fmt::Debug for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gid({self})")
    }
}

/// A GID that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "'{0}' is not a GID: accepted are sysfs' eight groups of four hex digits \
     (fe80:0000:0000:0000:0202:c9ff:fe00:0001) or any IPv6 notation (fe80::202:c9ff:fe00:1, ::ffff:10.0.0.1)"
)]
pub struct GidParseError(pub String);

/// Parses sysfs' form and every IPv6 notation (compressed, IPv4-mapped).
impl FromStr for Gid {
    type Err = GidParseError;

    fn from_str(s: &str) -> Result<Gid, GidParseError> {
        Ipv6Addr::from_str(s.trim())
            .map(|addr| Gid(addr.octets()))
            .map_err(|_| GidParseError(s.to_owned()))
    }
}

/// The type of a GID table entry (`enum ibv_gid_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GidType {
    /// InfiniBand.
    Ib,
    /// RoCE v1 (Ethernet, not routable).
    RoceV1,
    /// RoCE v2 (UDP/IP, routable): the one `NCCL_IB_GID_INDEX` should name on RoCE.
    RoceV2,
    /// A value this crate does not know.
    Other(u32),
}

impl GidType {
    /// Decodes `ibv_gid_entry::gid_type`.
    pub fn from_raw(raw: u32) -> GidType {
        match raw {
            sys::IBV_GID_TYPE_IB => GidType::Ib,
            sys::IBV_GID_TYPE_ROCE_V1 => GidType::RoceV1,
            sys::IBV_GID_TYPE_ROCE_V2 => GidType::RoceV2,
            other => GidType::Other(other),
        }
    }

    /// The name sysfs' `gid_attrs/types/N` file uses ("IB/RoCE v1", "RoCE v2").
    pub fn sysfs_name(self) -> &'static str {
        match self {
            GidType::Ib | GidType::RoceV1 => "IB/RoCE v1",
            GidType::RoceV2 => "RoCE v2",
            GidType::Other(_) => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_print_as_sysfs_and_parse_back() {
        let cases = [
            (
                "fe80:0000:0000:0000:0202:c9ff:fe00:0001",
                "fe80:0000:0000:0000:0202:c9ff:fe00:0001",
            ),
            (
                "fe80::202:c9ff:fe00:1",
                "fe80:0000:0000:0000:0202:c9ff:fe00:0001",
            ),
            ("::ffff:10.0.0.1", "0000:0000:0000:0000:0000:ffff:0a00:0001"),
            ("  ::  ", "0000:0000:0000:0000:0000:0000:0000:0000"),
        ];
        for (text, sysfs) in cases {
            let gid: Gid = text.parse().expect(text);
            assert_eq!(gid.to_string(), sysfs, "{text}");
            assert_eq!(sysfs.parse::<Gid>().expect(sysfs), gid);
        }
    }

    #[test]
    fn bad_gids_say_what_is_accepted() {
        for text in [
            "",
            "fe80",
            "fe80:0000:0000:0000:0202:c9ff:fe00:0001:0002",
            "10.0.0.1",
            "gggg::1",
        ] {
            let err = text.parse::<Gid>().expect_err(text);
            assert!(
                err.to_string().contains("eight groups of four hex digits"),
                "{err}"
            );
            assert_eq!(err.0, text);
        }
    }

    #[test]
    fn roce_v2_gids_carry_their_ipv4_address() {
        let cases = [
            ("::ffff:192.168.1.7", Some(Ipv4Addr::new(192, 168, 1, 7))),
            ("fe80::202:c9ff:fe00:1", None),
            ("::", None),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<Gid>().expect(text).ipv4(), want, "{text}");
        }
        assert!(Gid::default().is_zero());
        assert!(!"fe80::1".parse::<Gid>().expect("gid").is_zero());
    }

    #[test]
    fn gid_types_decode() {
        let cases = [
            (0, GidType::Ib, "IB/RoCE v1"),
            (1, GidType::RoceV1, "IB/RoCE v1"),
            (2, GidType::RoceV2, "RoCE v2"),
            (5, GidType::Other(5), "unknown"),
        ];
        for (raw, want, name) in cases {
            assert_eq!(GidType::from_raw(raw), want);
            assert_eq!(want.sysfs_name(), name);
        }
    }
}
