//! What a port's attributes mean: state, link layer, MTU, and the link rate from the active speed
//! and width codes (`ibv_port_attr`), as `ibv_devinfo` and sysfs' `rate` print them. Pure.

use std::fmt;

use crate::sys::verbs as sys;

/// A port's logical state (`enum ibv_port_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortState {
    /// `IBV_PORT_NOP`: no state change.
    Nop,
    /// `IBV_PORT_DOWN`: no link.
    Down,
    /// `IBV_PORT_INIT`: link up, not configured by the subnet manager yet.
    Init,
    /// `IBV_PORT_ARMED`: configured, not yet active.
    Armed,
    /// `IBV_PORT_ACTIVE`: ready for traffic.
    Active,
    /// `IBV_PORT_ACTIVE_DEFER`: active, deferring to the subnet manager.
    ActiveDefer,
    /// A value this crate does not know.
    Other(u32),
}

impl PortState {
    /// Decodes `ibv_port_attr::state`.
    pub fn from_raw(raw: u32) -> PortState {
        match raw {
            0 => PortState::Nop,
            1 => PortState::Down,
            2 => PortState::Init,
            3 => PortState::Armed,
            4 => PortState::Active,
            5 => PortState::ActiveDefer,
            other => PortState::Other(other),
        }
    }
}

/// The link layer under a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkLayer {
    /// InfiniBand (also what old drivers' "unspecified" means).
    InfiniBand,
    /// Ethernet: RoCE.
    Ethernet,
    /// A value this crate does not know.
    Other(u8),
}

impl LinkLayer {
    /// Decodes `ibv_port_attr::link_layer`; `IBV_LINK_LAYER_UNSPECIFIED` is InfiniBand, as
    /// libibverbs' own tools read it.
    pub fn from_raw(raw: u8) -> LinkLayer {
        match u32::from(raw) {
            sys::IBV_LINK_LAYER_UNSPECIFIED | sys::IBV_LINK_LAYER_INFINIBAND => {
                LinkLayer::InfiniBand
            }
            sys::IBV_LINK_LAYER_ETHERNET => LinkLayer::Ethernet,
            _ => LinkLayer::Other(raw),
        }
    }
}

/// A path MTU (`enum ibv_mtu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mtu {
    /// 256 bytes.
    B256,
    /// 512 bytes.
    B512,
    /// 1024 bytes.
    B1024,
    /// 2048 bytes.
    B2048,
    /// 4096 bytes.
    B4096,
}

impl Mtu {
    /// Decodes `enum ibv_mtu` (1 to 5); `None` for anything else.
    pub fn from_raw(raw: u32) -> Option<Mtu> {
        Some(match raw {
            sys::IBV_MTU_256 => Mtu::B256,
            sys::IBV_MTU_512 => Mtu::B512,
            sys::IBV_MTU_1024 => Mtu::B1024,
            sys::IBV_MTU_2048 => Mtu::B2048,
            sys::IBV_MTU_4096 => Mtu::B4096,
            _ => return None,
        })
    }

    /// The `enum ibv_mtu` value.
    pub fn raw(self) -> u32 {
        match self {
            Mtu::B256 => sys::IBV_MTU_256,
            Mtu::B512 => sys::IBV_MTU_512,
            Mtu::B1024 => sys::IBV_MTU_1024,
            Mtu::B2048 => sys::IBV_MTU_2048,
            Mtu::B4096 => sys::IBV_MTU_4096,
        }
    }

    /// The MTU in bytes.
    pub fn bytes(self) -> u32 {
        256 << (self.raw() - 1)
    }
}

impl fmt::Display for Mtu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.bytes())
    }
}

/// Lanes of a port's active width code (`ibv_port_attr::active_width`: 1 = 1x, 2 = 4x, 4 = 8x,
/// 8 = 12x, 16 = 2x); `None` for an unknown code.
pub fn width_lanes(active_width: u8) -> Option<u32> {
    Some(match active_width {
        1 => 1,
        2 => 4,
        4 => 8,
        8 => 12,
        16 => 2,
        _ => return None,
    })
}

/// The name and per-lane rate in Gb/s of a port's active speed code
/// (`ibv_port_attr::active_speed`), as sysfs' `rate` file counts them (QDR 10, FDR 14, EDR 25,
/// HDR 50, NDR 100); `None` for an unknown code. (XDR needs rdma-core 48's 32-bit
/// `active_speed_ex`, which the pinned rdma-core 44 headers do not have.)
pub fn speed_lane_gbps(active_speed: u8) -> Option<(&'static str, f64)> {
    Some(match active_speed {
        1 => ("SDR", 2.5),
        2 => ("DDR", 5.0),
        4 => ("QDR", 10.0),
        8 => ("FDR10", 10.0),
        16 => ("FDR", 14.0),
        32 => ("EDR", 25.0),
        64 => ("HDR", 50.0),
        128 => ("NDR", 100.0),
        _ => return None,
    })
}

/// A port's link rate in Gb/s: lanes x per-lane rate (4x EDR = 100, 4x NDR = 400); `None` when
/// either code is unknown.
pub fn link_rate_gbps(active_speed: u8, active_width: u8) -> Option<f64> {
    let (_, lane) = speed_lane_gbps(active_speed)?;
    Some(lane * f64::from(width_lanes(active_width)?))
}

/// The smaller of two ends' MTUs: what a connection between them uses.
pub fn path_mtu(local: Mtu, remote: Mtu) -> Mtu {
    local.min(remote)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_rates_match_sysfs() {
        // (active_speed, active_width, Gb/s) as /sys/class/infiniband/*/ports/*/rate prints them.
        let cases = [
            (1, 1, Some(2.5)),
            (4, 2, Some(40.0)),
            (8, 2, Some(40.0)),
            (16, 2, Some(56.0)),
            (32, 2, Some(100.0)),
            (64, 2, Some(200.0)),
            (64, 16, Some(100.0)),
            (128, 2, Some(400.0)),
            (128, 4, Some(800.0)),
            (32, 8, Some(300.0)),
            (3, 2, None),
            (32, 3, None),
        ];
        for (speed, width, want) in cases {
            assert_eq!(
                link_rate_gbps(speed, width),
                want,
                "speed {speed} width {width}"
            );
        }
        assert_eq!(speed_lane_gbps(128).map(|(name, _)| name), Some("NDR"));
    }

    #[test]
    fn mtus_decode_and_pick_the_smaller() {
        let cases = [
            (1, Some(256)),
            (3, Some(1024)),
            (5, Some(4096)),
            (0, None),
            (6, None),
        ];
        for (raw, bytes) in cases {
            let mtu = Mtu::from_raw(raw);
            assert_eq!(mtu.map(Mtu::bytes), bytes, "raw {raw}");
            if let Some(mtu) = mtu {
                assert_eq!(mtu.raw(), raw);
            }
        }
        assert_eq!(path_mtu(Mtu::B4096, Mtu::B1024), Mtu::B1024);
        assert_eq!(path_mtu(Mtu::B2048, Mtu::B4096), Mtu::B2048);
        assert_eq!(Mtu::B4096.to_string(), "4096");
    }

    #[test]
    fn states_and_link_layers_decode() {
        let states = [
            (1, PortState::Down),
            (4, PortState::Active),
            (5, PortState::ActiveDefer),
            (9, PortState::Other(9)),
        ];
        for (raw, want) in states {
            assert_eq!(PortState::from_raw(raw), want);
        }
        let layers = [
            (0, LinkLayer::InfiniBand),
            (1, LinkLayer::InfiniBand),
            (2, LinkLayer::Ethernet),
            (7, LinkLayer::Other(7)),
        ];
        for (raw, want) in layers {
            assert_eq!(LinkLayer::from_raw(raw), want);
        }
    }
}
