//! The TCPStore wire format, as pure functions: requests decoded from a byte buffer that may hold
//! a partial message or several, and replies encoded into one.
//!
//! The layout is PyTorch's (`torch/csrc/distributed/c10d/TCPStore*.cpp`, checked byte for byte
//! against torch 2.15's libuv and legacy servers; see `shared/notes/torchrun.md` section 5): no
//! frame header, a one-byte query type, then fields. Integers are little-endian; a string or byte
//! blob is a `u64` length and the bytes; a key list is a `u64` count and that many strings.
//!
//! Decoding happens in two steps so that a large value arriving in many reads is never copied
//! before it is whole: [`frame_len`] walks the length fields (checking every limit as soon as a
//! length is known, so an oversized message is refused after its first bytes), then [`decode`]
//! builds the [`Request`] from a complete frame.

use thiserror::Error;

/// The first message of every connection: `VALIDATE` with this `u32`.
pub const VALIDATION_MAGIC: u32 = 0x3C85_F7CE;
/// trainctl's own launchers send this instead of [`VALIDATION_MAGIC`] to reach the control
/// keyspace, which a worker's `TCPStore` client can never see (see [`crate::Namespace`]).
pub const CONTROL_MAGIC: u32 = 0x7472_6374; // "trct"

/// Reply to `CHECK`: every key exists.
pub const CHECK_READY: u8 = 0;
/// Reply to `CHECK`: some key is missing.
pub const CHECK_NOT_READY: u8 = 1;
/// Reply to `WAIT` once every key exists.
pub const WAIT_STOP_WAITING: u8 = 0;
/// Reply to `CANCEL_WAIT`.
pub const WAIT_CANCELED: u8 = 1;

/// Bounds on what one message may carry. The defaults are PyTorch's own server's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest key, in bytes (torch: 8 KiB).
    pub max_key_bytes: u64,
    /// Longest value, in bytes (torch: 8 MiB).
    pub max_value_bytes: u64,
    /// Most keys in one key list (`CHECK`, `WAIT`, `MULTI_GET`, `MULTI_SET`).
    pub max_keys_per_request: u64,
    /// Largest whole message, in bytes (a `MULTI_SET` of many large values).
    pub max_request_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: 8 * 1024,
            max_value_bytes: 8 * 1024 * 1024,
            max_keys_per_request: 65_536,
            max_request_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Query types, numbered as in torch's `QueryType` (current layout, VALIDATE = 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum QueryType {
    /// Handshake: `u32` magic, no reply.
    Validate = 0,
    /// Store a value.
    Set = 1,
    /// Replace a value if it equals an expected one.
    CompareSet = 2,
    /// Read a value.
    Get = 3,
    /// Add to a counter.
    Add = 4,
    /// Whether keys exist, without waiting.
    Check = 5,
    /// Wait until keys exist.
    Wait = 6,
    /// Number of keys.
    GetNumKeys = 7,
    /// Delete a key.
    DeleteKey = 8,
    /// Append to a value.
    Append = 9,
    /// Read several values.
    MultiGet = 10,
    /// Store several values.
    MultiSet = 11,
    /// Abandon a pending `WAIT`.
    CancelWait = 12,
    /// Liveness check: `u32` nonce echoed.
    Ping = 13,
    /// Append to a queue.
    QueuePush = 14,
    /// Take from the front of a queue.
    QueuePop = 15,
    /// Length of a queue.
    QueueLen = 16,
    /// Every key with a value (torch's libuv server; its legacy one has no such request).
    ListKeys = 17,
    /// Count this caller in at a named barrier and wait for `world_size` callers: `ADD key 1`,
    /// then a wait until the counter reaches `world_size` (torch 2.15, both servers).
    Barrier = 18,
}

impl QueryType {
    /// The type for a wire byte, if there is one.
    pub fn from_byte(b: u8) -> Option<QueryType> {
        use QueryType::*;
        Some(match b {
            0 => Validate,
            1 => Set,
            2 => CompareSet,
            3 => Get,
            4 => Add,
            5 => Check,
            6 => Wait,
            7 => GetNumKeys,
            8 => DeleteKey,
            9 => Append,
            10 => MultiGet,
            11 => MultiSet,
            12 => CancelWait,
            13 => Ping,
            14 => QueuePush,
            15 => QueuePop,
            16 => QueueLen,
            17 => ListKeys,
            18 => Barrier,
            _ => return None,
        })
    }
}

/// One decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)] // the fields are named as in the wire table of the module docs
pub enum Request {
    Validate {
        magic: u32,
    },
    Set {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    CompareSet {
        key: Vec<u8>,
        expected: Vec<u8>,
        desired: Vec<u8>,
    },
    Get {
        key: Vec<u8>,
    },
    Add {
        key: Vec<u8>,
        delta: i64,
    },
    Check {
        keys: Vec<Vec<u8>>,
    },
    Wait {
        keys: Vec<Vec<u8>>,
    },
    GetNumKeys,
    DeleteKey {
        key: Vec<u8>,
    },
    Append {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    MultiGet {
        keys: Vec<Vec<u8>>,
    },
    MultiSet {
        pairs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    CancelWait,
    Ping {
        nonce: u32,
    },
    QueuePush {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    QueuePop {
        key: Vec<u8>,
    },
    QueueLen {
        key: Vec<u8>,
    },
    ListKeys,
    Barrier {
        key: Vec<u8>,
        world_size: i64,
    },
}

impl Request {
    /// The query type of this request.
    pub fn query_type(&self) -> QueryType {
        use Request::*;
        match self {
            Validate { .. } => QueryType::Validate,
            Set { .. } => QueryType::Set,
            CompareSet { .. } => QueryType::CompareSet,
            Get { .. } => QueryType::Get,
            Add { .. } => QueryType::Add,
            Check { .. } => QueryType::Check,
            Wait { .. } => QueryType::Wait,
            GetNumKeys => QueryType::GetNumKeys,
            DeleteKey { .. } => QueryType::DeleteKey,
            Append { .. } => QueryType::Append,
            MultiGet { .. } => QueryType::MultiGet,
            MultiSet { .. } => QueryType::MultiSet,
            CancelWait => QueryType::CancelWait,
            Ping { .. } => QueryType::Ping,
            QueuePush { .. } => QueryType::QueuePush,
            QueuePop { .. } => QueryType::QueuePop,
            QueueLen { .. } => QueryType::QueueLen,
            ListKeys => QueryType::ListKeys,
            Barrier { .. } => QueryType::Barrier,
        }
    }
}

/// Why bytes are not a valid request. The connection that sent them is closed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    /// The first byte is not a known query type.
    #[error("unknown query type {0} (known: 0 VALIDATE to 18 BARRIER)")]
    UnknownQueryType(u8),
    /// A key longer than [`Limits::max_key_bytes`].
    #[error("{query:?}: a key of {len} bytes (at most {max})")]
    KeyTooLong {
        /// The request.
        query: QueryType,
        /// Declared length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A value longer than [`Limits::max_value_bytes`].
    #[error("{query:?}: a value of {len} bytes (at most {max})")]
    ValueTooLong {
        /// The request.
        query: QueryType,
        /// Declared length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A key list longer than [`Limits::max_keys_per_request`].
    #[error("{query:?}: {count} keys in one request (at most {max})")]
    TooManyKeys {
        /// The request.
        query: QueryType,
        /// Declared count.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// A whole message larger than [`Limits::max_request_bytes`].
    #[error("{query:?}: a message of at least {len} bytes (at most {max})")]
    RequestTooLarge {
        /// The request.
        query: QueryType,
        /// Length known so far.
        len: u64,
        /// The limit.
        max: u64,
    },
}

/// What [`frame_len`] found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A whole request of this many bytes.
    Complete(usize),
    /// Not enough bytes yet; the request is at least this long (so far as its lengths are known).
    Partial(usize),
}

/// Kind of one length-prefixed field, for limit checks.
#[derive(Clone, Copy)]
enum Field {
    Key,
    Value,
}

/// Walks a buffer's length fields without copying anything.
struct Walker<'a> {
    buf: &'a [u8],
    pos: usize,
    query: QueryType,
    limits: &'a Limits,
}

/// A walk step that needs more bytes: the message is at least this long.
struct NeedMore(usize);

enum WalkError {
    NeedMore(NeedMore),
    Invalid(CodecError),
}

impl From<CodecError> for WalkError {
    fn from(e: CodecError) -> Self {
        WalkError::Invalid(e)
    }
}

impl Walker<'_> {
    fn need(&self, n: usize) -> Result<(), WalkError> {
        let end = self.pos as u64 + n as u64;
        if end > self.limits.max_request_bytes {
            return Err(CodecError::RequestTooLarge {
                query: self.query,
                len: end,
                max: self.limits.max_request_bytes,
            }
            .into());
        }
        if self.buf.len() < self.pos + n {
            return Err(WalkError::NeedMore(NeedMore(self.pos + n)));
        }
        Ok(())
    }

    fn skip(&mut self, n: usize) -> Result<(), WalkError> {
        self.need(n)?;
        self.pos += n;
        Ok(())
    }

    fn u64(&mut self) -> Result<u64, WalkError> {
        self.need(8)?;
        let v = u64::from_le_bytes(
            self.buf[self.pos..self.pos + 8]
                .try_into()
                .expect("8 bytes"),
        );
        self.pos += 8;
        Ok(v)
    }

    fn blob(&mut self, field: Field) -> Result<(), WalkError> {
        let len = self.u64()?;
        let max = match field {
            Field::Key => self.limits.max_key_bytes,
            Field::Value => self.limits.max_value_bytes,
        };
        if len > max {
            let query = self.query;
            return Err(match field {
                Field::Key => CodecError::KeyTooLong { query, len, max },
                Field::Value => CodecError::ValueTooLong { query, len, max },
            }
            .into());
        }
        self.skip(len as usize)
    }

    fn count(&mut self) -> Result<u64, WalkError> {
        let count = self.u64()?;
        if count > self.limits.max_keys_per_request {
            return Err(CodecError::TooManyKeys {
                query: self.query,
                count,
                max: self.limits.max_keys_per_request,
            }
            .into());
        }
        Ok(count)
    }

    fn keys(&mut self) -> Result<(), WalkError> {
        for _ in 0..self.count()? {
            self.blob(Field::Key)?;
        }
        Ok(())
    }
}

/// How long the request at the start of `buf` is, or how long it is known to be at least.
/// `Partial(1)` for an empty buffer. Limits are checked as soon as each length is read.
pub fn frame_len(buf: &[u8], limits: &Limits) -> Result<Frame, CodecError> {
    let Some(&first) = buf.first() else {
        return Ok(Frame::Partial(1));
    };
    let query = QueryType::from_byte(first).ok_or(CodecError::UnknownQueryType(first))?;
    let mut w = Walker {
        buf,
        pos: 1,
        query,
        limits,
    };
    let walked: Result<(), WalkError> = (|| {
        use QueryType::*;
        match query {
            Validate | Ping => w.skip(4),
            GetNumKeys | CancelWait | ListKeys => Ok(()),
            Get | DeleteKey | QueuePop | QueueLen => w.blob(Field::Key),
            Set | Append | QueuePush => {
                w.blob(Field::Key)?;
                w.blob(Field::Value)
            }
            CompareSet => {
                w.blob(Field::Key)?;
                w.blob(Field::Value)?;
                w.blob(Field::Value)
            }
            Add | Barrier => {
                w.blob(Field::Key)?;
                w.skip(8)
            }
            Check | Wait | MultiGet => w.keys(),
            MultiSet => {
                for _ in 0..w.count()? {
                    w.blob(Field::Key)?;
                    w.blob(Field::Value)?;
                }
                Ok(())
            }
        }
    })();
    match walked {
        Ok(()) => Ok(Frame::Complete(w.pos)),
        Err(WalkError::NeedMore(NeedMore(n))) => Ok(Frame::Partial(n)),
        Err(WalkError::Invalid(e)) => Err(e),
    }
}

/// Reads fields from a frame that [`frame_len`] found complete.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        s
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().expect("4 bytes"))
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().expect("8 bytes"))
    }
    fn blob(&mut self) -> Vec<u8> {
        let len = self.u64() as usize;
        self.take(len).to_vec()
    }
    fn keys(&mut self) -> Vec<Vec<u8>> {
        let n = self.u64() as usize;
        (0..n).map(|_| self.blob()).collect()
    }
}

/// Decodes the request at the start of `buf`: `Ok(None)` until it is whole, else the request
/// and its length in bytes.
pub fn decode(buf: &[u8], limits: &Limits) -> Result<Option<(Request, usize)>, CodecError> {
    let len = match frame_len(buf, limits)? {
        Frame::Complete(len) => len,
        Frame::Partial(_) => return Ok(None),
    };
    let mut r = Reader {
        buf: &buf[..len],
        pos: 1,
    };
    let query = QueryType::from_byte(buf[0]).expect("frame_len checked it");
    use QueryType as Q;
    let request = match query {
        Q::Validate => Request::Validate { magic: r.u32() },
        Q::Ping => Request::Ping { nonce: r.u32() },
        Q::GetNumKeys => Request::GetNumKeys,
        Q::CancelWait => Request::CancelWait,
        Q::ListKeys => Request::ListKeys,
        Q::Barrier => Request::Barrier {
            key: r.blob(),
            world_size: r.u64() as i64,
        },
        Q::Get => Request::Get { key: r.blob() },
        Q::DeleteKey => Request::DeleteKey { key: r.blob() },
        Q::QueuePop => Request::QueuePop { key: r.blob() },
        Q::QueueLen => Request::QueueLen { key: r.blob() },
        Q::Set => Request::Set {
            key: r.blob(),
            value: r.blob(),
        },
        Q::Append => Request::Append {
            key: r.blob(),
            value: r.blob(),
        },
        Q::QueuePush => Request::QueuePush {
            key: r.blob(),
            value: r.blob(),
        },
        Q::CompareSet => Request::CompareSet {
            key: r.blob(),
            expected: r.blob(),
            desired: r.blob(),
        },
        Q::Add => Request::Add {
            key: r.blob(),
            delta: r.u64() as i64,
        },
        Q::Check => Request::Check { keys: r.keys() },
        Q::Wait => Request::Wait { keys: r.keys() },
        Q::MultiGet => Request::MultiGet { keys: r.keys() },
        Q::MultiSet => {
            let n = r.u64() as usize;
            Request::MultiSet {
                pairs: (0..n).map(|_| (r.blob(), r.blob())).collect(),
            }
        }
    };
    debug_assert_eq!(r.pos, len);
    Ok(Some((request, len)))
}

/// Appends a request's wire bytes to `out` (the client side, and tests).
pub fn encode_request(request: &Request, out: &mut Vec<u8>) {
    out.push(request.query_type() as u8);
    let keys = |out: &mut Vec<u8>, keys: &[Vec<u8>]| {
        out.extend_from_slice(&(keys.len() as u64).to_le_bytes());
        for k in keys {
            put_blob(out, k);
        }
    };
    match request {
        Request::Validate { magic } => out.extend_from_slice(&magic.to_le_bytes()),
        Request::Ping { nonce } => out.extend_from_slice(&nonce.to_le_bytes()),
        Request::GetNumKeys | Request::CancelWait | Request::ListKeys => {}
        Request::Get { key }
        | Request::DeleteKey { key }
        | Request::QueuePop { key }
        | Request::QueueLen { key } => put_blob(out, key),
        Request::Set { key, value }
        | Request::Append { key, value }
        | Request::QueuePush { key, value } => {
            put_blob(out, key);
            put_blob(out, value);
        }
        Request::CompareSet {
            key,
            expected,
            desired,
        } => {
            put_blob(out, key);
            put_blob(out, expected);
            put_blob(out, desired);
        }
        Request::Add { key, delta } => {
            put_blob(out, key);
            out.extend_from_slice(&delta.to_le_bytes());
        }
        Request::Barrier { key, world_size } => {
            put_blob(out, key);
            out.extend_from_slice(&world_size.to_le_bytes());
        }
        Request::Check { keys: k } | Request::Wait { keys: k } | Request::MultiGet { keys: k } => {
            keys(out, k)
        }
        Request::MultiSet { pairs } => {
            out.extend_from_slice(&(pairs.len() as u64).to_le_bytes());
            for (k, v) in pairs {
                put_blob(out, k);
                put_blob(out, v);
            }
        }
    }
}

/// Appends a length-prefixed blob (a value reply, or a request field).
pub fn put_blob(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Appends an `i64` reply.
pub fn put_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes(request: &Request) -> Vec<u8> {
        let mut out = Vec::new();
        encode_request(request, &mut out);
        out
    }

    #[test]
    fn wire_bytes_match_torch_layout() {
        // Byte layouts as captured from torch 2.15's client (shared/notes/torchrun.md section 5).
        let cases: Vec<(Request, Vec<u8>)> = vec![
            (
                Request::Validate {
                    magic: VALIDATION_MAGIC,
                },
                vec![0, 0xCE, 0xF7, 0x85, 0x3C],
            ),
            (Request::Ping { nonce: 7 }, vec![13, 7, 0, 0, 0]),
            (
                Request::Set {
                    key: b"/k".to_vec(),
                    value: b"v".to_vec(),
                },
                [
                    &[1u8][..],
                    &2u64.to_le_bytes(),
                    b"/k",
                    &1u64.to_le_bytes(),
                    b"v",
                ]
                .concat(),
            ),
            (
                Request::Add {
                    key: b"/c".to_vec(),
                    delta: -3,
                },
                [
                    &[4u8][..],
                    &2u64.to_le_bytes(),
                    b"/c",
                    &(-3i64).to_le_bytes(),
                ]
                .concat(),
            ),
            (
                Request::Wait {
                    keys: vec![b"a".to_vec(), b"bc".to_vec()],
                },
                [
                    &[6u8][..],
                    &2u64.to_le_bytes(),
                    &1u64.to_le_bytes(),
                    b"a",
                    &2u64.to_le_bytes(),
                    b"bc",
                ]
                .concat(),
            ),
            (Request::GetNumKeys, vec![7]),
            (Request::CancelWait, vec![12]),
            (Request::ListKeys, vec![17]),
            (
                Request::Barrier {
                    key: b"/bar".to_vec(),
                    world_size: 2,
                },
                [
                    &[18u8][..],
                    &4u64.to_le_bytes(),
                    b"/bar",
                    &2i64.to_le_bytes(),
                ]
                .concat(),
            ),
        ];
        for (request, wire) in cases {
            assert_eq!(bytes(&request), wire, "{request:?}");
            assert_eq!(
                decode(&wire, &Limits::default()).unwrap(),
                Some((request.clone(), wire.len())),
                "{request:?}"
            );
        }
    }

    #[test]
    fn every_prefix_of_a_request_is_partial_and_says_how_much_is_known() {
        let wire = bytes(&Request::CompareSet {
            key: b"key".to_vec(),
            expected: b"".to_vec(),
            desired: b"desired".to_vec(),
        });
        for cut in 0..wire.len() {
            let frame = frame_len(&wire[..cut], &Limits::default()).unwrap();
            match frame {
                Frame::Partial(n) => assert!(n > cut && n <= wire.len(), "cut {cut}: {n}"),
                Frame::Complete(_) => panic!("cut {cut} is complete"),
            }
            assert_eq!(decode(&wire[..cut], &Limits::default()).unwrap(), None);
        }
        assert_eq!(
            frame_len(&wire, &Limits::default()).unwrap(),
            Frame::Complete(wire.len())
        );
    }

    #[test]
    fn limits_refuse_a_message_from_its_length_field() {
        let limits = Limits::default();
        let huge_key = [&[3u8][..], &(8 * 1024 + 1u64).to_le_bytes()].concat();
        assert!(matches!(
            frame_len(&huge_key, &limits),
            Err(CodecError::KeyTooLong { len: 8193, .. })
        ));
        let huge_value = [
            &[1u8][..],
            &1u64.to_le_bytes(),
            b"k",
            &u64::MAX.to_le_bytes(),
        ]
        .concat();
        assert!(matches!(
            frame_len(&huge_value, &limits),
            Err(CodecError::ValueTooLong { .. })
        ));
        let many_keys = [&[10u8][..], &u64::MAX.to_le_bytes()].concat();
        assert!(matches!(
            frame_len(&many_keys, &limits),
            Err(CodecError::TooManyKeys { .. })
        ));
        let small = Limits {
            max_request_bytes: 100,
            ..limits
        };
        let big_set = bytes(&Request::MultiSet {
            pairs: vec![(b"a".to_vec(), vec![0; 60]), (b"b".to_vec(), vec![0; 60])],
        });
        assert!(matches!(
            frame_len(&big_set[..20], &small),
            Ok(Frame::Partial(_))
        ));
        assert!(matches!(
            frame_len(&big_set, &small),
            Err(CodecError::RequestTooLarge { .. })
        ));
        assert_eq!(
            frame_len(&[200], &limits),
            Err(CodecError::UnknownQueryType(200))
        );
    }

    fn blob() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..24)
    }

    fn request() -> impl Strategy<Value = Request> {
        let keys = || proptest::collection::vec(blob(), 0..5);
        prop_oneof![
            any::<u32>().prop_map(|magic| Request::Validate { magic }),
            (blob(), blob()).prop_map(|(key, value)| Request::Set { key, value }),
            (blob(), blob(), blob()).prop_map(|(key, expected, desired)| Request::CompareSet {
                key,
                expected,
                desired
            }),
            blob().prop_map(|key| Request::Get { key }),
            (blob(), any::<i64>()).prop_map(|(key, delta)| Request::Add { key, delta }),
            keys().prop_map(|keys| Request::Check { keys }),
            keys().prop_map(|keys| Request::Wait { keys }),
            Just(Request::GetNumKeys),
            blob().prop_map(|key| Request::DeleteKey { key }),
            (blob(), blob()).prop_map(|(key, value)| Request::Append { key, value }),
            keys().prop_map(|keys| Request::MultiGet { keys }),
            proptest::collection::vec((blob(), blob()), 0..4)
                .prop_map(|pairs| Request::MultiSet { pairs }),
            Just(Request::CancelWait),
            Just(Request::ListKeys),
            (blob(), any::<i64>())
                .prop_map(|(key, world_size)| Request::Barrier { key, world_size }),
            any::<u32>().prop_map(|nonce| Request::Ping { nonce }),
            (blob(), blob()).prop_map(|(key, value)| Request::QueuePush { key, value }),
            blob().prop_map(|key| Request::QueuePop { key }),
            blob().prop_map(|key| Request::QueueLen { key }),
        ]
    }

    proptest! {
        /// Any sequence of requests, concatenated and cut anywhere, decodes back to itself.
        #[test]
        fn requests_round_trip_through_any_split(
            requests in proptest::collection::vec(request(), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let wire: Vec<u8> = requests.iter().flat_map(bytes).collect();
            let cut = cut.index(wire.len() + 1);
            let limits = Limits::default();
            // Feed the first `cut` bytes, then the rest, as a connection would.
            let mut buf = wire[..cut].to_vec();
            let mut decoded = Vec::new();
            let mut fed_rest = false;
            loop {
                match decode(&buf, &limits).unwrap() {
                    Some((request, len)) => {
                        decoded.push(request);
                        buf.drain(..len);
                    }
                    None if !fed_rest => {
                        buf.extend_from_slice(&wire[cut..]);
                        fed_rest = true;
                    }
                    None => break,
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(decoded, requests);
        }

        /// Arbitrary bytes never panic the decoder, and whatever it accepts is the frame's length.
        #[test]
        fn arbitrary_bytes_never_panic(wire in proptest::collection::vec(any::<u8>(), 0..200)) {
            let limits = Limits { max_request_bytes: 1 << 20, ..Limits::default() };
            if let Ok(Some((request, len))) = decode(&wire, &limits) {
                prop_assert!(len <= wire.len());
                prop_assert_eq!(bytes(&request), wire[..len].to_vec());
            }
        }
    }
}
