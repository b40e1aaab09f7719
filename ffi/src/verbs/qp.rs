//! Reliable-connected queue pairs without the library: the record two peers exchange to connect
//! (its wire form), and the attributes of the INIT -> RTR -> RTS transitions. Pure.

use std::fmt;

use super::gid::Gid;
use super::port::Mtu;
use crate::sys::verbs as sys;

/// The largest queue pair number or packet sequence number: both are 24-bit.
pub const MAX_24_BIT: u32 = 0x00ff_ffff;
/// Receiver-not-ready NAK timer code (12 = 0.64 ms), the value NCCL and perftest use.
pub const MIN_RNR_TIMER: u8 = 12;
/// Local ACK timeout code: 4.096 us x 2^14 = 67 ms per try.
pub const ACK_TIMEOUT: u8 = 14;
/// Transport retries before a send fails (7 is the most the field holds).
pub const RETRY_COUNT: u8 = 7;
/// Receiver-not-ready retries (7 = retry forever).
pub const RNR_RETRY: u8 = 7;
/// Hop limit of the global route header (RoCE v2, routed IB).
pub const HOP_LIMIT: u8 = 64;
/// Outstanding RDMA reads/atomics each way.
pub const MAX_RD_ATOMIC: u8 = 1;

/// What one end of an RC connection tells the other: its address (port, LID, GID), its queue
/// pair, the first packet sequence number it sends, and the registered buffer it lets the peer
/// write into. Sent through a rendezvous as [`QpInfo::encode`]'s bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpInfo {
    /// The port number (from 1).
    pub port: u8,
    /// The port's LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// The GID the peer addresses (zero when the sender has none, e.g. IB without GRH).
    pub gid: Gid,
    /// The index of that GID in the sender's table (for diagnostics; the peer uses its own).
    pub gid_index: u8,
    /// The sender's active MTU; the connection uses the smaller of both.
    pub mtu: Mtu,
    /// The queue pair number (24 bits).
    pub qpn: u32,
    /// The first packet sequence number the sender sends (24 bits).
    pub psn: u32,
    /// The address of the buffer the peer may write.
    pub addr: u64,
    /// Its length in bytes.
    pub len: u64,
    /// Its remote key.
    pub rkey: u32,
}

/// The size of [`QpInfo::encode`]'s output.
pub const QP_INFO_BYTES: usize = 56;
const QP_INFO_MAGIC: &[u8; 4] = b"TQP1";

/// Why bytes are not a [`QpInfo`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QpInfoError {
    /// The record has the wrong size.
    #[error("a queue pair record is {QP_INFO_BYTES} bytes, got {0}")]
    Length(usize),
    /// The record does not start with the format's magic.
    #[error("a queue pair record starts with \"TQP1\", got {0:?}")]
    Magic([u8; 4]),
    /// A field is out of range.
    #[error("queue pair record field {field} is {value}: accepted {accepted}")]
    Field {
        /// The field's name.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What is accepted.
        accepted: &'static str,
    },
}

impl QpInfo {
    /// The record's wire form, version 1, 56 bytes little-endian: `"TQP1"`, port u8, MTU code u8,
    /// GID index u8, 0u8, LID u16, 0u16, QPN u32, PSN u32, rkey u32, addr u64, len u64, GID 16
    /// bytes (network order, as is).
    pub fn encode(&self) -> [u8; QP_INFO_BYTES] {
        let mut out = [0u8; QP_INFO_BYTES];
        out[0..4].copy_from_slice(QP_INFO_MAGIC);
        out[4] = self.port;
        out[5] = self.mtu.raw() as u8;
        out[6] = self.gid_index;
        out[8..10].copy_from_slice(&self.lid.to_le_bytes());
        out[12..16].copy_from_slice(&self.qpn.to_le_bytes());
        out[16..20].copy_from_slice(&self.psn.to_le_bytes());
        out[20..24].copy_from_slice(&self.rkey.to_le_bytes());
        out[24..32].copy_from_slice(&self.addr.to_le_bytes());
        out[32..40].copy_from_slice(&self.len.to_le_bytes());
        out[40..56].copy_from_slice(&self.gid.0);
        out
    }

    /// Reads [`QpInfo::encode`]'s form, checking every field's range.
    pub fn decode(bytes: &[u8]) -> Result<QpInfo, QpInfoError> {
        let bytes: &[u8; QP_INFO_BYTES] = bytes
            .try_into()
            .map_err(|_| QpInfoError::Length(bytes.len()))?;
        let magic: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
        if &magic != QP_INFO_MAGIC {
            return Err(QpInfoError::Magic(magic));
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let field = |field, value: u64, accepted| QpInfoError::Field {
            field,
            value,
            accepted,
        };
        let port = bytes[4];
        if port == 0 {
            return Err(field("port", 0, "1 to 255"));
        }
        let mtu = Mtu::from_raw(u32::from(bytes[5])).ok_or_else(|| {
            field(
                "mtu",
                u64::from(bytes[5]),
                "codes 1 to 5 (256 to 4096 bytes)",
            )
        })?;
        let qpn = u32_at(12);
        if qpn > MAX_24_BIT {
            return Err(field("qpn", u64::from(qpn), "0 to 16777215 (24 bits)"));
        }
        let psn = u32_at(16);
        if psn > MAX_24_BIT {
            return Err(field("psn", u64::from(psn), "0 to 16777215 (24 bits)"));
        }
        Ok(QpInfo {
            port,
            mtu,
            gid_index: bytes[6],
            lid: u16::from_le_bytes([bytes[8], bytes[9]]),
            qpn,
            psn,
            rkey: u32_at(20),
            addr: u64_at(24),
            len: u64_at(32),
            gid: Gid(bytes[40..56].try_into().expect("16 bytes")),
        })
    }
}

impl fmt::Display for QpInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "qpn {:#x} psn {:#x} port {} lid {} gid {} (index {}) mtu {} buffer {:#x}+{} rkey {:#x}",
            self.qpn, self.psn, self.port, self.lid, self.gid, self.gid_index, self.mtu, self.addr, self.len, self.rkey
        )
    }
}

/// One `ibv_modify_qp` call: the attributes and the mask naming those that are set.
#[derive(Clone, Copy)]
pub(crate) struct QpTransition {
    pub attr: sys::ibv_qp_attr,
    pub mask: u32,
}

/// RESET -> INIT on `port` (from 1), allowing the remote side the `access` flags
/// (`IBV_ACCESS_*`).
pub(crate) fn init_transition(port: u8, access: u32) -> QpTransition {
    let attr = sys::ibv_qp_attr {
        qp_state: sys::IBV_QPS_INIT,
        pkey_index: 0,
        port_num: port,
        qp_access_flags: access,
        ..Default::default()
    };
    QpTransition {
        attr,
        mask: sys::IBV_QP_STATE
            | sys::IBV_QP_PKEY_INDEX
            | sys::IBV_QP_PORT
            | sys::IBV_QP_ACCESS_FLAGS,
    }
}

/// INIT -> RTR: ready to receive from `remote`, through local `port` using the local GID at
/// `sgid_index`, at `mtu` (the smaller of both ends'). A global route header is used whenever the
/// remote sent a GID (always on RoCE, where the LID is 0).
pub(crate) fn rtr_transition(port: u8, sgid_index: u8, mtu: Mtu, remote: &QpInfo) -> QpTransition {
    let mut attr = sys::ibv_qp_attr {
        qp_state: sys::IBV_QPS_RTR,
        path_mtu: mtu.raw(),
        dest_qp_num: remote.qpn,
        rq_psn: remote.psn,
        max_dest_rd_atomic: MAX_RD_ATOMIC,
        min_rnr_timer: MIN_RNR_TIMER,
        ..Default::default()
    };
    attr.ah_attr.dlid = remote.lid;
    attr.ah_attr.sl = 0;
    attr.ah_attr.src_path_bits = 0;
    attr.ah_attr.port_num = port;
    if !remote.gid.is_zero() {
        attr.ah_attr.is_global = 1;
        attr.ah_attr.grh.dgid = remote.gid.to_sys();
        attr.ah_attr.grh.sgid_index = sgid_index;
        attr.ah_attr.grh.hop_limit = HOP_LIMIT;
        attr.ah_attr.grh.traffic_class = 0;
        attr.ah_attr.grh.flow_label = 0;
    }
    QpTransition {
        attr,
        mask: sys::IBV_QP_STATE
            | sys::IBV_QP_AV
            | sys::IBV_QP_PATH_MTU
            | sys::IBV_QP_DEST_QPN
            | sys::IBV_QP_RQ_PSN
            | sys::IBV_QP_MAX_DEST_RD_ATOMIC
            | sys::IBV_QP_MIN_RNR_TIMER,
    }
}

/// RTR -> RTS: ready to send, the first packet numbered `psn` (the one sent to the peer in
/// [`QpInfo::psn`]).
pub(crate) fn rts_transition(psn: u32) -> QpTransition {
    let attr = sys::ibv_qp_attr {
        qp_state: sys::IBV_QPS_RTS,
        sq_psn: psn,
        timeout: ACK_TIMEOUT,
        retry_cnt: RETRY_COUNT,
        rnr_retry: RNR_RETRY,
        max_rd_atomic: MAX_RD_ATOMIC,
        ..Default::default()
    };
    QpTransition {
        attr,
        mask: sys::IBV_QP_STATE
            | sys::IBV_QP_TIMEOUT
            | sys::IBV_QP_RETRY_CNT
            | sys::IBV_QP_RNR_RETRY
            | sys::IBV_QP_SQ_PSN
            | sys::IBV_QP_MAX_QP_RD_ATOMIC,
    }
}

/// A fresh 24-bit packet sequence number. Any value works; a random one keeps packets of an old
/// connection from being taken for the new one's.
pub fn random_psn() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    (RandomState::new().hash_one(std::time::Instant::now()) as u32) & MAX_24_BIT
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> QpInfo {
        QpInfo {
            port: 1,
            lid: 0x1234,
            gid: "fe80::202:c9ff:fe00:1".parse().expect("gid"),
            gid_index: 3,
            mtu: Mtu::B4096,
            qpn: 0x00ab_cdef,
            psn: 0x0012_3456,
            addr: 0x7f00_dead_beef_0000,
            len: 1 << 20,
            rkey: 0xfeed_f00d,
        }
    }

    #[test]
    fn qp_info_round_trips_through_its_wire_form() {
        let cases = [
            info(),
            QpInfo {
                lid: 0,
                gid: Gid::default(),
                mtu: Mtu::B256,
                qpn: 0,
                psn: MAX_24_BIT,
                ..info()
            },
        ];
        for case in cases {
            let bytes = case.encode();
            assert_eq!(&bytes[0..4], b"TQP1");
            assert_eq!(QpInfo::decode(&bytes), Ok(case));
        }
        let bytes = info().encode();
        assert_eq!(bytes[5], 5, "MTU code");
        assert_eq!(
            &bytes[12..16],
            &[0xef, 0xcd, 0xab, 0x00],
            "QPN little-endian"
        );
        assert_eq!(&bytes[40..42], &[0xfe, 0x80], "GID in network order");
    }

    #[test]
    fn bad_qp_records_name_the_field() {
        let good = info().encode();
        let with = |i: usize, value: &[u8]| {
            let mut b = good;
            b[i..i + value.len()].copy_from_slice(value);
            b
        };
        let cases: [(Vec<u8>, &str); 7] = [
            (good[..55].to_vec(), "is 56 bytes, got 55"),
            (vec![0; 57], "is 56 bytes, got 57"),
            (with(0, b"TQP2").to_vec(), "starts with \"TQP1\""),
            (with(4, &[0]).to_vec(), "field port is 0: accepted 1 to 255"),
            (with(5, &[6]).to_vec(), "field mtu is 6"),
            (
                with(12, &0x0100_0000u32.to_le_bytes()).to_vec(),
                "field qpn is 16777216",
            ),
            (
                with(16, &u32::MAX.to_le_bytes()).to_vec(),
                "field psn is 4294967295",
            ),
        ];
        for (bytes, want) in cases {
            let err = QpInfo::decode(&bytes).expect_err(want);
            assert!(err.to_string().contains(want), "{err} lacks {want}");
        }
    }

    #[test]
    fn init_sets_port_and_access() {
        let t = init_transition(
            2,
            sys::IBV_ACCESS_REMOTE_WRITE | sys::IBV_ACCESS_LOCAL_WRITE,
        );
        assert_eq!(t.attr.qp_state, sys::IBV_QPS_INIT);
        assert_eq!(t.attr.port_num, 2);
        assert_eq!(
            t.attr.qp_access_flags,
            sys::IBV_ACCESS_REMOTE_WRITE | sys::IBV_ACCESS_LOCAL_WRITE
        );
        assert_eq!(
            t.mask,
            sys::IBV_QP_STATE
                | sys::IBV_QP_PKEY_INDEX
                | sys::IBV_QP_PORT
                | sys::IBV_QP_ACCESS_FLAGS
        );
    }

    #[test]
    fn rtr_addresses_the_remote_with_a_grh_only_when_it_has_a_gid() {
        let roce = QpInfo { lid: 0, ..info() };
        let ib_no_gid = QpInfo {
            gid: Gid::default(),
            ..info()
        };
        // (remote, want is_global, want dlid)
        let cases = [(roce, 1, 0), (info(), 1, 0x1234), (ib_no_gid, 0, 0x1234)];
        for (remote, global, dlid) in cases {
            let t = rtr_transition(1, 3, Mtu::B1024, &remote);
            let a = t.attr;
            assert_eq!(
                (a.qp_state, a.dest_qp_num, a.rq_psn),
                (sys::IBV_QPS_RTR, remote.qpn, remote.psn)
            );
            assert_eq!(a.path_mtu, sys::IBV_MTU_1024);
            assert_eq!(
                (a.ah_attr.is_global, a.ah_attr.dlid, a.ah_attr.port_num),
                (global, dlid, 1)
            );
            assert_eq!(
                (a.max_dest_rd_atomic, a.min_rnr_timer),
                (MAX_RD_ATOMIC, MIN_RNR_TIMER)
            );
            if global == 1 {
                // SAFETY: reading the raw bytes of a plain-data union of 16 bytes.
                assert_eq!(unsafe { a.ah_attr.grh.dgid.raw }, remote.gid.0);
                assert_eq!(
                    (a.ah_attr.grh.sgid_index, a.ah_attr.grh.hop_limit),
                    (3, HOP_LIMIT)
                );
            }
            assert_eq!(t.mask & sys::IBV_QP_AV, sys::IBV_QP_AV);
            assert_eq!(t.mask.count_ones(), 7);
        }
    }

    #[test]
    fn rts_sets_the_send_psn_and_retries() {
        let t = rts_transition(0x42);
        let a = t.attr;
        assert_eq!((a.qp_state, a.sq_psn), (sys::IBV_QPS_RTS, 0x42));
        assert_eq!(
            (a.timeout, a.retry_cnt, a.rnr_retry, a.max_rd_atomic),
            (ACK_TIMEOUT, RETRY_COUNT, RNR_RETRY, MAX_RD_ATOMIC)
        );
        assert_eq!(t.mask.count_ones(), 6);
    }

    #[test]
    fn random_psns_fit_24_bits() {
        for _ in 0..100 {
            assert!(random_psn() <= MAX_24_BIT);
        }
    }
}
