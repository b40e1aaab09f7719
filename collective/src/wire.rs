//! The byte format of every message the TCP transport exchanges, as pure encode/decode functions.
//!
//! Every control message starts with the 4-byte magic `TRCL`, a little-endian `u16` protocol version
//! and a one-byte kind, so that a peer speaking something else is named as such rather than misread.
//! Bulk data (f32 chunks) follows an [`OpHeader`] and is raw little-endian bytes whose length both
//! sides already know.

use std::fmt;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::MAX_WORLD_SIZE;

/// First bytes of every control message.
pub(crate) const MAGIC: [u8; 4] = *b"TRCL";
/// Bumped whenever any message below changes shape.
pub(crate) const PROTOCOL_VERSION: u16 = 1;
/// Longest free-text reason an abort may carry.
const ABORT_DETAIL_MAX_LEN: usize = 1024;
/// Encoded size of a socket address: family, 16 address bytes, port.
const ADDR_LEN: usize = 19;

const KIND_JOIN: u8 = 1;
const KIND_TABLE: u8 = 2;
const KIND_ABORT: u8 = 3;
const KIND_HELLO: u8 = 4;
const KIND_HELLO_ACK: u8 = 5;
const KIND_OP: u8 = 6;

const ABORT_TIMEOUT: u8 = 1;
const ABORT_WORLD_SIZE: u8 = 2;
const ABORT_DUPLICATE_RANK: u8 = 3;
const ABORT_OTHER: u8 = 4;

/// Why a message could not be read.
#[derive(Debug)]
pub(crate) enum WireError {
    /// The stream failed or ended.
    Io(io::Error),
    /// The peer is not speaking this protocol, or a different version of it, or sent nonsense.
    Mismatch(String),
}

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> Self {
        WireError::Io(e)
    }
}

/// A rank announcing itself to rank 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Join {
    pub rank: u32,
    pub world_size: u32,
    pub data_addr: SocketAddr,
}

/// Rank 0's answer to a [`Join`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// Everyone joined: the data address of every rank, indexed by rank.
    Table {
        session: u64,
        addrs: Vec<SocketAddr>,
    },
    /// The rendezvous failed; the reason, to report on every rank.
    Abort(Abort),
}

/// Why rank 0 gave up on a rendezvous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Abort {
    Timeout {
        timeout_ms: u64,
        joined: u32,
        missing: Vec<u32>,
    },
    WorldSizeMismatch {
        expected: u32,
        rank: u32,
        got: u32,
    },
    DuplicateRank {
        rank: u32,
    },
    Other(String),
}

/// The first message on a ring connection, from the connecting rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hello {
    pub session: u64,
    pub from: u32,
    pub to: u32,
}

/// The accepting rank's answer to a [`Hello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HelloAck {
    pub session: u64,
    pub from: u32,
}

/// Which collective an [`OpHeader`] announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    AllReduceSumF32,
    BroadcastF32,
    Barrier,
    AllReduceSumI64,
}

/// Sent to the next rank at the start of every collective so that ranks calling different
/// collectives (or the same one with different lengths) fail loudly instead of exchanging garbage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpHeader {
    pub seq: u64,
    pub kind: OpKind,
    pub len: u64,
    pub root: u32,
}

impl fmt::Display for OpHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            OpKind::AllReduceSumF32 => {
                write!(f, "all_reduce_sum_f32 #{} (len {})", self.seq, self.len)
            }
            OpKind::BroadcastF32 => write!(
                f,
                "broadcast_f32 #{} (len {}, root {})",
                self.seq, self.len, self.root
            ),
            OpKind::Barrier => write!(f, "barrier #{}", self.seq),
            OpKind::AllReduceSumI64 => {
                write!(f, "all_reduce_sum_i64 #{} (len {})", self.seq, self.len)
            }
        }
    }
}

fn start(kind: u8) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    b.push(kind);
    b
}

fn put_addr(b: &mut Vec<u8>, addr: SocketAddr) {
    let mut ip = [0u8; 16];
    match addr.ip() {
        IpAddr::V4(v4) => {
            b.push(4);
            ip[..4].copy_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            b.push(6);
            ip.copy_from_slice(&v6.octets());
        }
    }
    b.extend_from_slice(&ip);
    b.extend_from_slice(&addr.port().to_le_bytes());
}

pub(crate) fn encode_join(m: &Join) -> Vec<u8> {
    let mut b = start(KIND_JOIN);
    b.extend_from_slice(&m.rank.to_le_bytes());
    b.extend_from_slice(&m.world_size.to_le_bytes());
    put_addr(&mut b, m.data_addr);
    b
}

pub(crate) fn encode_reply(m: &Reply) -> Vec<u8> {
    match m {
        Reply::Table { session, addrs } => {
            let mut b = start(KIND_TABLE);
            b.extend_from_slice(&session.to_le_bytes());
            b.extend_from_slice(&(addrs.len() as u32).to_le_bytes());
            for a in addrs {
                put_addr(&mut b, *a);
            }
            b
        }
        Reply::Abort(abort) => {
            let mut b = start(KIND_ABORT);
            match abort {
                Abort::Timeout {
                    timeout_ms,
                    joined,
                    missing,
                } => {
                    b.push(ABORT_TIMEOUT);
                    b.extend_from_slice(&timeout_ms.to_le_bytes());
                    b.extend_from_slice(&joined.to_le_bytes());
                    b.extend_from_slice(&(missing.len() as u32).to_le_bytes());
                    for r in missing {
                        b.extend_from_slice(&r.to_le_bytes());
                    }
                }
                Abort::WorldSizeMismatch {
                    expected,
                    rank,
                    got,
                } => {
                    b.push(ABORT_WORLD_SIZE);
                    for v in [expected, rank, got] {
                        b.extend_from_slice(&v.to_le_bytes());
                    }
                }
                Abort::DuplicateRank { rank } => {
                    b.push(ABORT_DUPLICATE_RANK);
                    b.extend_from_slice(&rank.to_le_bytes());
                }
                Abort::Other(text) => {
                    let mut end = text.len().min(ABORT_DETAIL_MAX_LEN);
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    b.push(ABORT_OTHER);
                    b.extend_from_slice(&(end as u32).to_le_bytes());
                    b.extend_from_slice(&text.as_bytes()[..end]);
                }
            }
            b
        }
    }
}

pub(crate) fn encode_hello(m: &Hello) -> Vec<u8> {
    let mut b = start(KIND_HELLO);
    b.extend_from_slice(&m.session.to_le_bytes());
    b.extend_from_slice(&m.from.to_le_bytes());
    b.extend_from_slice(&m.to.to_le_bytes());
    b
}

pub(crate) fn encode_hello_ack(m: &HelloAck) -> Vec<u8> {
    let mut b = start(KIND_HELLO_ACK);
    b.extend_from_slice(&m.session.to_le_bytes());
    b.extend_from_slice(&m.from.to_le_bytes());
    b
}

pub(crate) fn encode_op(m: &OpHeader) -> Vec<u8> {
    let mut b = start(KIND_OP);
    b.extend_from_slice(&m.seq.to_le_bytes());
    b.push(match m.kind {
        OpKind::AllReduceSumF32 => 1,
        OpKind::BroadcastF32 => 2,
        OpKind::Barrier => 3,
        OpKind::AllReduceSumI64 => 4,
    });
    b.extend_from_slice(&m.len.to_le_bytes());
    b.extend_from_slice(&m.root.to_le_bytes());
    b
}

/// Reads the fixed fields of a message from a stream.
struct Fields<'a, R: Read>(&'a mut R);

impl<R: Read> Fields<'_, R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut b = [0u8; N];
        self.0.read_exact(&mut b)?;
        Ok(b)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.bytes::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn addr(&mut self) -> Result<SocketAddr, WireError> {
        let raw: [u8; ADDR_LEN] = self.bytes()?;
        let mut ip16 = [0u8; 16];
        ip16.copy_from_slice(&raw[1..17]);
        let port = u16::from_le_bytes([raw[17], raw[18]]);
        let ip = match raw[0] {
            4 => IpAddr::V4(Ipv4Addr::new(ip16[0], ip16[1], ip16[2], ip16[3])),
            6 => IpAddr::V6(Ipv6Addr::from(ip16)),
            other => {
                return Err(WireError::Mismatch(format!(
                    "address family byte {other} is neither 4 nor 6"
                )))
            }
        };
        Ok(SocketAddr::new(ip, port))
    }
    /// A count of ranks, checked against the largest world before anything is allocated for it.
    fn rank_count(&mut self) -> Result<usize, WireError> {
        let n = self.u32()?;
        if n > MAX_WORLD_SIZE {
            return Err(WireError::Mismatch(format!(
                "a list of {n} ranks is longer than the largest world ({MAX_WORLD_SIZE})"
            )));
        }
        Ok(n as usize)
    }
}

/// Reads the magic, version and kind, and returns the kind if it is one of `accepted`.
fn read_prefix<R: Read>(r: &mut R, accepted: &[(u8, &str)]) -> Result<u8, WireError> {
    let mut f = Fields(r);
    let magic: [u8; 4] = f.bytes()?;
    if magic != MAGIC {
        return Err(WireError::Mismatch(format!(
            "expected a trainctl collective message (starting with {:?}), got bytes {:02x?}; is another program using this port?",
            String::from_utf8_lossy(&MAGIC),
            magic
        )));
    }
    let version = u16::from_le_bytes(f.bytes()?);
    if version != PROTOCOL_VERSION {
        return Err(WireError::Mismatch(format!(
            "peer speaks collective protocol version {version}, this build speaks {PROTOCOL_VERSION}; run the same trainctl version on every node"
        )));
    }
    let kind = f.u8()?;
    if accepted.iter().any(|(k, _)| *k == kind) {
        Ok(kind)
    } else {
        let names: Vec<&str> = accepted.iter().map(|(_, n)| *n).collect();
        Err(WireError::Mismatch(format!(
            "expected a {} message, got message kind {kind}",
            names.join(" or ")
        )))
    }
}

pub(crate) fn read_join<R: Read>(r: &mut R) -> Result<Join, WireError> {
    read_prefix(r, &[(KIND_JOIN, "join")])?;
    let mut f = Fields(r);
    Ok(Join {
        rank: f.u32()?,
        world_size: f.u32()?,
        data_addr: f.addr()?,
    })
}

pub(crate) fn read_reply<R: Read>(r: &mut R) -> Result<Reply, WireError> {
    let kind = read_prefix(r, &[(KIND_TABLE, "address table"), (KIND_ABORT, "abort")])?;
    let mut f = Fields(r);
    if kind == KIND_TABLE {
        let session = f.u64()?;
        let n = f.rank_count()?;
        let mut addrs = Vec::with_capacity(n);
        for _ in 0..n {
            addrs.push(f.addr()?);
        }
        return Ok(Reply::Table { session, addrs });
    }
    let abort = match f.u8()? {
        ABORT_TIMEOUT => {
            let timeout_ms = f.u64()?;
            let joined = f.u32()?;
            let n = f.rank_count()?;
            let mut missing = Vec::with_capacity(n);
            for _ in 0..n {
                missing.push(f.u32()?);
            }
            Abort::Timeout {
                timeout_ms,
                joined,
                missing,
            }
        }
        ABORT_WORLD_SIZE => Abort::WorldSizeMismatch {
            expected: f.u32()?,
            rank: f.u32()?,
            got: f.u32()?,
        },
        ABORT_DUPLICATE_RANK => Abort::DuplicateRank { rank: f.u32()? },
        ABORT_OTHER => {
            let len = f.u32()? as usize;
            if len > ABORT_DETAIL_MAX_LEN {
                return Err(WireError::Mismatch(format!(
                    "abort reason of {len} bytes is longer than {ABORT_DETAIL_MAX_LEN}"
                )));
            }
            let mut text = vec![0u8; len];
            r.read_exact(&mut text)?;
            Abort::Other(String::from_utf8_lossy(&text).into_owned())
        }
        other => {
            return Err(WireError::Mismatch(format!(
                "unknown abort reason code {other}"
            )))
        }
    };
    Ok(Reply::Abort(abort))
}

pub(crate) fn read_hello<R: Read>(r: &mut R) -> Result<Hello, WireError> {
    read_prefix(r, &[(KIND_HELLO, "ring hello")])?;
    let mut f = Fields(r);
    Ok(Hello {
        session: f.u64()?,
        from: f.u32()?,
        to: f.u32()?,
    })
}

pub(crate) fn read_hello_ack<R: Read>(r: &mut R) -> Result<HelloAck, WireError> {
    read_prefix(r, &[(KIND_HELLO_ACK, "ring hello acknowledgement")])?;
    let mut f = Fields(r);
    Ok(HelloAck {
        session: f.u64()?,
        from: f.u32()?,
    })
}

pub(crate) fn read_op<R: Read>(r: &mut R) -> Result<OpHeader, WireError> {
    read_prefix(r, &[(KIND_OP, "collective header")])?;
    let mut f = Fields(r);
    let seq = f.u64()?;
    let kind = match f.u8()? {
        1 => OpKind::AllReduceSumF32,
        2 => OpKind::BroadcastF32,
        3 => OpKind::Barrier,
        4 => OpKind::AllReduceSumI64,
        other => {
            return Err(WireError::Mismatch(format!(
                "unknown collective code {other}"
            )))
        }
    };
    Ok(OpHeader {
        seq,
        kind,
        len: f.u64()?,
        root: f.u32()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn messages_round_trip() {
        let join = Join {
            rank: 3,
            world_size: 4,
            data_addr: v4("127.0.0.2:40123"),
        };
        assert_eq!(read_join(&mut &encode_join(&join)[..]).unwrap(), join);

        let replies = [
            Reply::Table {
                session: 0xfeed_beef,
                addrs: vec![v4("10.0.0.1:1"), "[::1]:65535".parse().unwrap()],
            },
            Reply::Abort(Abort::Timeout {
                timeout_ms: 500,
                joined: 2,
                missing: vec![2, 3],
            }),
            Reply::Abort(Abort::WorldSizeMismatch {
                expected: 2,
                rank: 1,
                got: 3,
            }),
            Reply::Abort(Abort::DuplicateRank { rank: 1 }),
            Reply::Abort(Abort::Other("bad things".into())),
        ];
        for reply in replies {
            assert_eq!(read_reply(&mut &encode_reply(&reply)[..]).unwrap(), reply);
        }

        let hello = Hello {
            session: 7,
            from: 1,
            to: 2,
        };
        assert_eq!(read_hello(&mut &encode_hello(&hello)[..]).unwrap(), hello);
        let ack = HelloAck {
            session: 7,
            from: 2,
        };
        assert_eq!(
            read_hello_ack(&mut &encode_hello_ack(&ack)[..]).unwrap(),
            ack
        );
        for kind in [
            OpKind::AllReduceSumF32,
            OpKind::BroadcastF32,
            OpKind::Barrier,
            OpKind::AllReduceSumI64,
        ] {
            let op = OpHeader {
                seq: 9,
                kind,
                len: 1 << 40,
                root: 2,
            };
            assert_eq!(read_op(&mut &encode_op(&op)[..]).unwrap(), op);
        }
    }

    #[test]
    fn bad_input_is_a_mismatch_not_a_panic() {
        let good = encode_join(&Join {
            rank: 1,
            world_size: 2,
            data_addr: v4("127.0.0.1:5"),
        });
        let mut wrong_version = good.clone();
        wrong_version[4] = 99;
        let mut wrong_kind = good.clone();
        wrong_kind[6] = KIND_HELLO;
        let mut wrong_family = good.clone();
        wrong_family[15] = 5;
        let mut huge_table = encode_reply(&Reply::Table {
            session: 1,
            addrs: vec![],
        });
        huge_table.truncate(15);
        huge_table.extend_from_slice(&u32::MAX.to_le_bytes());

        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "http request",
                b"GET / HTTP/1.1\r\n\r\n".to_vec(),
                "expected a trainctl collective message",
            ),
            ("other version", wrong_version, "protocol version 99"),
            (
                "other kind",
                wrong_kind,
                "expected a join message, got message kind 4",
            ),
            ("bad address family", wrong_family, "address family byte 5"),
        ];
        for (name, bytes, want) in cases {
            match read_join(&mut &bytes[..]) {
                Err(WireError::Mismatch(msg)) => assert!(msg.contains(want), "{name}: {msg}"),
                other => panic!("{name}: expected a mismatch, got {other:?}"),
            }
        }
        match read_reply(&mut &huge_table[..]) {
            Err(WireError::Mismatch(msg)) => assert!(msg.contains("longer than the largest world")),
            other => panic!("expected a mismatch, got {other:?}"),
        }
        match read_join(&mut &good[..10]) {
            Err(WireError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
            other => panic!("expected end of stream, got {other:?}"),
        }
    }

    #[test]
    fn op_headers_describe_themselves() {
        let cases = [
            (OpKind::AllReduceSumF32, "all_reduce_sum_f32 #3 (len 10)"),
            (OpKind::BroadcastF32, "broadcast_f32 #3 (len 10, root 1)"),
            (OpKind::Barrier, "barrier #3"),
            (OpKind::AllReduceSumI64, "all_reduce_sum_i64 #3 (len 10)"),
        ];
        for (kind, want) in cases {
            let op = OpHeader {
                seq: 3,
                kind,
                len: 10,
                root: 1,
            };
            assert_eq!(op.to_string(), want);
        }
    }
}
