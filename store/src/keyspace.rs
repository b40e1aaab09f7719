//! One keyspace of the store and every request's meaning, as a pure state machine: a request in,
//! reply bytes and the connections to wake out. The server ([`crate::server`]) does the IO.
//!
//! Semantics follow PyTorch's servers (`shared/notes/torchrun.md` section 5): a `WAIT` is
//! answered once every key it names exists (a key "exists" when it has a value or a non-empty
//! queue); the server never times a wait out (clients do, with `CANCEL_WAIT`); `ADD` keeps
//! counters as ASCII decimal text; `QUEUE_PUSH` wakes one waiter, every other write wakes all.

use std::collections::{HashMap, VecDeque};

use thiserror::Error;

use crate::codec::{
    put_blob, put_i64, Request, CHECK_NOT_READY, CHECK_READY, WAIT_CANCELED, WAIT_STOP_WAITING,
};

/// A connection, as the keyspace knows it (the server numbers them).
pub type ConnId = u64;

/// Why a request could not be served. The server closes the connection that sent it (torch's
/// servers do the same), and keeps serving the others.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ApplyError {
    /// `GET` or `MULTI_GET` of a key that has no value (clients `WAIT` first).
    #[error("GET of a key that has no value: {0:?}")]
    NoSuchKey(String),
    /// `ADD` to a key whose value is not a decimal integer.
    #[error("ADD to {key:?}, whose value is not a decimal integer")]
    NotACounter {
        /// The key.
        key: String,
    },
    /// `ADD` past the range of an `i64`.
    #[error("ADD to {key:?} overflows a 64-bit counter")]
    CounterOverflow {
        /// The key.
        key: String,
    },
    /// The write would take the keyspace past its byte limit.
    #[error(
        "the store is full: {stored} bytes stored, this write needs {more} more (limit {max})"
    )]
    Full {
        /// Bytes stored now.
        stored: u64,
        /// Bytes the write adds.
        more: u64,
        /// The limit.
        max: u64,
    },
    /// A connection with too many `WAIT`s pending.
    #[error("{0} WAITs pending on one connection (the limit)")]
    TooManyWaits(usize),
    /// `VALIDATE` is the handshake; the server handles it, never the keyspace.
    #[error("VALIDATE after the handshake")]
    ValidateAfterHandshake,
}

/// A pending `WAIT` (every key exists) or `BARRIER` (the counter at its one key has reached
/// `at_least`).
#[derive(Debug)]
struct Wait {
    conn: ConnId,
    keys: Vec<Vec<u8>>,
    at_least: Option<i64>,
}

/// Identifies a pending wait.
type WaitId = u64;

/// One keyspace: values, queues and pending waits, with a bound on the bytes it stores.
#[derive(Debug)]
pub struct Keyspace {
    values: HashMap<Vec<u8>, Vec<u8>>,
    queues: HashMap<Vec<u8>, VecDeque<Vec<u8>>>,
    /// Waits blocked on each key, oldest first (a wait is listed under every key it names that
    /// did not exist when it was parked).
    blocked_on: HashMap<Vec<u8>, Vec<WaitId>>,
    waits: HashMap<WaitId, Wait>,
    waits_of_conn: HashMap<ConnId, Vec<WaitId>>,
    next_wait: WaitId,
    stored_bytes: u64,
    max_bytes: u64,
    max_waits_per_conn: usize,
}

/// Default bound on a keyspace's stored keys and values.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
/// Default bound on the `WAIT`s one connection may have pending.
pub const DEFAULT_MAX_WAITS_PER_CONN: usize = 1024;

fn show(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

impl Keyspace {
    /// An empty keyspace storing at most `max_bytes` of keys and values.
    pub fn new(max_bytes: u64, max_waits_per_conn: usize) -> Keyspace {
        Keyspace {
            values: HashMap::new(),
            queues: HashMap::new(),
            blocked_on: HashMap::new(),
            waits: HashMap::new(),
            waits_of_conn: HashMap::new(),
            next_wait: 0,
            stored_bytes: 0,
            max_bytes,
            max_waits_per_conn,
        }
    }

    /// Number of keys with a value (`GETNUMKEYS`).
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether no key has a value.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Bytes of keys, values and queued items stored.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes
    }

    /// Waits pending, over all connections.
    pub fn pending_waits(&self) -> usize {
        self.waits.len()
    }

    fn exists(&self, key: &[u8]) -> bool {
        self.values.contains_key(key) || self.queues.get(key).is_some_and(|q| !q.is_empty())
    }

    fn reserve(&self, more: u64) -> Result<(), ApplyError> {
        if self.stored_bytes + more > self.max_bytes {
            return Err(ApplyError::Full {
                stored: self.stored_bytes,
                more,
                max: self.max_bytes,
            });
        }
        Ok(())
    }

    /// Stores `value` under `key`, keeping the byte count.
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), ApplyError> {
        let old = self.values.get(&key).map(|v| (key.len() + v.len()) as u64);
        let new = (key.len() + value.len()) as u64;
        self.reserve(new.saturating_sub(old.unwrap_or(0)))?;
        self.stored_bytes = self.stored_bytes - old.unwrap_or(0) + new;
        self.values.insert(key, value);
        Ok(())
    }

    /// Applies one request from `conn`, appending its reply (if it has one) to `reply`. Returns
    /// the connections whose wait this completed: each must be sent [`WAIT_STOP_WAITING`].
    /// On error nothing was changed and nothing appended.
    pub fn apply(
        &mut self,
        conn: ConnId,
        request: Request,
        reply: &mut Vec<u8>,
    ) -> Result<Vec<ConnId>, ApplyError> {
        let mut woken = Vec::new();
        match request {
            Request::Validate { .. } => return Err(ApplyError::ValidateAfterHandshake),
            Request::Ping { nonce } => reply.extend_from_slice(&nonce.to_le_bytes()),
            Request::Set { key, value } => {
                self.put(key.clone(), value)?;
                self.wake_all(&key, &mut woken);
            }
            Request::CompareSet {
                key,
                expected,
                desired,
            } => match self.values.get(&key) {
                None if expected.is_empty() => {
                    put_blob(reply, &desired);
                    self.put(key.clone(), desired)?;
                    self.wake_all(&key, &mut woken);
                }
                None => put_blob(reply, &expected),
                Some(current) if *current == expected => {
                    put_blob(reply, &desired);
                    self.put(key, desired)?;
                }
                Some(current) => put_blob(reply, current),
            },
            Request::Get { key } => match self.values.get(&key) {
                Some(v) => put_blob(reply, v),
                None => return Err(ApplyError::NoSuchKey(show(&key))),
            },
            Request::Add { key, delta } => {
                let new = self.add(&key, delta)?;
                put_i64(reply, new);
                self.wake_all(&key, &mut woken);
            }
            Request::Barrier { key, world_size } => {
                let pending = self.waits_of_conn.get(&conn).map_or(0, Vec::len);
                if pending >= self.max_waits_per_conn {
                    return Err(ApplyError::TooManyWaits(pending));
                }
                let count = self.add(&key, 1)?;
                self.wake_all(&key, &mut woken);
                if count >= world_size {
                    reply.push(WAIT_STOP_WAITING);
                } else {
                    self.park_wait(conn, vec![key], Some(world_size));
                }
            }
            Request::Check { keys } => reply.push(if keys.iter().all(|k| self.exists(k)) {
                CHECK_READY
            } else {
                CHECK_NOT_READY
            }),
            Request::Wait { keys } => {
                if keys.iter().all(|k| self.exists(k)) {
                    reply.push(WAIT_STOP_WAITING);
                } else {
                    let pending = self.waits_of_conn.get(&conn).map_or(0, Vec::len);
                    if pending >= self.max_waits_per_conn {
                        return Err(ApplyError::TooManyWaits(pending));
                    }
                    self.park_wait(conn, keys, None);
                }
            }
            Request::GetNumKeys => put_i64(reply, self.values.len() as i64),
            Request::ListKeys => {
                // torch's libuv server: a u64 count, then each key; queues are not listed. Its
                // order is a hash map's; sorted here, so the same keys always list alike.
                let mut keys: Vec<&Vec<u8>> = self.values.keys().collect();
                keys.sort();
                reply.extend_from_slice(&(keys.len() as u64).to_le_bytes());
                for key in keys {
                    put_blob(reply, key);
                }
            }
            Request::DeleteKey { key } => {
                let removed = self.values.remove(&key);
                if let Some(v) = &removed {
                    self.stored_bytes -= (key.len() + v.len()) as u64;
                }
                put_i64(reply, i64::from(removed.is_some()));
            }
            Request::Append { key, value } => {
                let mut new = self.values.get(&key).cloned().unwrap_or_default();
                new.extend_from_slice(&value);
                self.put(key.clone(), new)?;
                self.wake_all(&key, &mut woken);
            }
            Request::MultiGet { keys } => {
                let mut values = Vec::with_capacity(keys.len());
                for key in &keys {
                    match self.values.get(key) {
                        Some(v) => values.push(v),
                        None => return Err(ApplyError::NoSuchKey(show(key))),
                    }
                }
                for v in values {
                    put_blob(reply, v);
                }
            }
            Request::MultiSet { pairs } => {
                let more: u64 = pairs.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
                self.reserve(more)?;
                for (key, value) in pairs {
                    self.put(key.clone(), value)?;
                    self.wake_all(&key, &mut woken);
                }
            }
            Request::CancelWait => {
                for id in self.waits_of_conn.remove(&conn).unwrap_or_default() {
                    self.forget_wait(id);
                }
                reply.push(WAIT_CANCELED);
            }
            Request::QueuePush { key, value } => {
                let more = (key.len() + value.len()) as u64;
                self.reserve(more)?;
                self.stored_bytes += more;
                self.queues.entry(key.clone()).or_default().push_back(value);
                self.wake_one(&key, &mut woken);
            }
            Request::QueuePop { key } => {
                let queue = self.queues.get_mut(&key);
                let len = queue.as_ref().map_or(0, |q| q.len());
                put_i64(reply, len as i64);
                if let Some(value) = queue.and_then(|q| q.pop_front()) {
                    self.stored_bytes -= (key.len() + value.len()) as u64;
                    put_blob(reply, &value);
                    if self.queues.get(&key).is_some_and(|q| q.is_empty()) {
                        self.queues.remove(&key);
                    }
                }
            }
            Request::QueueLen { key } => {
                put_i64(reply, self.queues.get(&key).map_or(0, |q| q.len()) as i64)
            }
        }
        Ok(woken)
    }

    /// Forgets everything `conn` waited for (it disconnected).
    pub fn drop_conn(&mut self, conn: ConnId) {
        for id in self.waits_of_conn.remove(&conn).unwrap_or_default() {
            self.forget_wait(id);
        }
    }

    /// The counter at `key` (absent: 0), as `ADD` reads it.
    fn counter(&self, key: &[u8]) -> Result<i64, ApplyError> {
        match self.values.get(key) {
            None => Ok(0),
            Some(v) => std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .ok_or_else(|| ApplyError::NotACounter { key: show(key) }),
        }
    }

    /// `ADD`: the counter's new value (the caller wakes the waiters).
    fn add(&mut self, key: &[u8], delta: i64) -> Result<i64, ApplyError> {
        let new = self
            .counter(key)?
            .checked_add(delta)
            .ok_or_else(|| ApplyError::CounterOverflow { key: show(key) })?;
        self.put(key.to_vec(), new.to_string().into_bytes())?;
        Ok(new)
    }

    /// Whether a wait can complete now.
    fn ready(&self, wait: &Wait) -> bool {
        match wait.at_least {
            None => wait.keys.iter().all(|k| self.exists(k)),
            Some(n) => wait
                .keys
                .iter()
                .all(|k| self.counter(k).is_ok_and(|c| c >= n)),
        }
    }

    /// The keys whose next write may complete a wait that is not ready.
    fn blocking_keys(&self, wait: &Wait) -> Vec<Vec<u8>> {
        match wait.at_least {
            None => wait
                .keys
                .iter()
                .filter(|k| !self.exists(k))
                .cloned()
                .collect(),
            Some(_) => wait.keys.clone(),
        }
    }

    fn list_under(&mut self, keys: Vec<Vec<u8>>, id: WaitId) {
        for key in keys {
            let list = self.blocked_on.entry(key).or_default();
            if !list.contains(&id) {
                list.push(id);
            }
        }
    }

    fn park_wait(&mut self, conn: ConnId, keys: Vec<Vec<u8>>, at_least: Option<i64>) {
        let id = self.next_wait;
        self.next_wait += 1;
        let wait = Wait {
            conn,
            keys,
            at_least,
        };
        let blocking = self.blocking_keys(&wait);
        self.list_under(blocking, id);
        self.waits.insert(id, wait);
        self.waits_of_conn.entry(conn).or_default().push(id);
    }

    /// Removes a wait from every index.
    fn forget_wait(&mut self, id: WaitId) {
        let Some(wait) = self.waits.remove(&id) else {
            return;
        };
        for key in &wait.keys {
            if let Some(list) = self.blocked_on.get_mut(key) {
                list.retain(|w| *w != id);
                if list.is_empty() {
                    self.blocked_on.remove(key);
                }
            }
        }
        if let Some(list) = self.waits_of_conn.get_mut(&wait.conn) {
            list.retain(|w| *w != id);
            if list.is_empty() {
                self.waits_of_conn.remove(&wait.conn);
            }
        }
    }

    /// `key` now exists: completes every wait on it whose keys all exist (waits still missing
    /// another key stay parked under that one).
    fn wake_all(&mut self, key: &[u8], woken: &mut Vec<ConnId>) {
        let Some(ids) = self.blocked_on.remove(key) else {
            return;
        };
        for id in ids {
            self.complete_or_repark(id, woken);
        }
    }

    /// A queue item arrived under `key`: completes the oldest wait on it that can complete.
    fn wake_one(&mut self, key: &[u8], woken: &mut Vec<ConnId>) {
        let Some(ids) = self.blocked_on.get(key).cloned() else {
            return;
        };
        for id in ids {
            let ready = self.waits.get(&id).is_some_and(|w| self.ready(w));
            if ready {
                let conn = self.waits[&id].conn;
                self.forget_wait(id);
                woken.push(conn);
                return;
            }
        }
    }

    fn complete_or_repark(&mut self, id: WaitId, woken: &mut Vec<ConnId>) {
        let Some(wait) = self.waits.get(&id) else {
            return;
        };
        if self.ready(wait) {
            let conn = wait.conn;
            self.forget_wait(id);
            woken.push(conn);
        } else {
            let blocking = self.blocking_keys(wait);
            self.list_under(blocking, id);
        }
    }

    /// Checks the indexes agree with each other (tests, and `debug_assert!` after every apply).
    pub fn check_invariants(&self) -> Result<(), String> {
        let bytes: u64 = self
            .values
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .chain(
                self.queues
                    .iter()
                    .flat_map(|(k, q)| q.iter().map(|v| (k.len() + v.len()) as u64)),
            )
            .sum();
        if bytes != self.stored_bytes {
            return Err(format!(
                "stored_bytes {} but {bytes} stored",
                self.stored_bytes
            ));
        }
        for (key, ids) in &self.blocked_on {
            for id in ids {
                if !self.waits.contains_key(id) {
                    return Err(format!("wait {id} under {key:?} is gone"));
                }
            }
        }
        for (id, wait) in &self.waits {
            if !self
                .waits_of_conn
                .get(&wait.conn)
                .is_some_and(|l| l.contains(id))
            {
                return Err(format!("wait {id} missing from its connection's list"));
            }
            // (A wait on a queue may stay pending with items queued: each item wakes one waiter.)
            let satisfied = match wait.at_least {
                None => wait.keys.iter().all(|k| self.values.contains_key(k)),
                Some(_) => self.ready(wait),
            };
            if satisfied {
                return Err(format!("wait {id} is satisfied but still pending"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    fn blob(s: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_blob(&mut out, s);
        out
    }

    fn i64_bytes(v: i64) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }

    fn run(ks: &mut Keyspace, conn: ConnId, request: Request) -> (Vec<u8>, Vec<ConnId>) {
        let mut reply = Vec::new();
        let woken = ks.apply(conn, request, &mut reply).expect("apply");
        ks.check_invariants().expect("invariants");
        (reply, woken)
    }

    fn ks() -> Keyspace {
        Keyspace::new(DEFAULT_MAX_BYTES, DEFAULT_MAX_WAITS_PER_CONN)
    }

    #[test]
    fn replies_of_each_request() {
        // Each row: requests applied in order on one fresh keyspace, and the reply of the last.
        let set = |key: &str, value: &str| Request::Set {
            key: k(key),
            value: k(value),
        };
        let cas = |key: &str, expected: &str, desired: &str| Request::CompareSet {
            key: k(key),
            expected: k(expected),
            desired: k(desired),
        };
        let rows: Vec<(&str, Vec<Request>, Vec<u8>)> = vec![
            (
                "ping echoes",
                vec![Request::Ping { nonce: 42 }],
                42u32.to_le_bytes().to_vec(),
            ),
            ("set has no reply", vec![set("a", "1")], vec![]),
            (
                "get",
                vec![set("a", "xy"), Request::Get { key: k("a") }],
                blob(b"xy"),
            ),
            (
                "add creates",
                vec![Request::Add {
                    key: k("c"),
                    delta: 5,
                }],
                i64_bytes(5),
            ),
            (
                "add adds to decimal text",
                vec![
                    set("c", "10"),
                    Request::Add {
                        key: k("c"),
                        delta: -3,
                    },
                ],
                i64_bytes(7),
            ),
            (
                "cas absent, expected empty: stores",
                vec![cas("x", "", "d")],
                blob(b"d"),
            ),
            (
                "cas absent, expected set: returns expected",
                vec![cas("x", "e", "d")],
                blob(b"e"),
            ),
            (
                "cas equal: replaces",
                vec![set("x", "e"), cas("x", "e", "d")],
                blob(b"d"),
            ),
            (
                "cas different: current",
                vec![set("x", "z"), cas("x", "e", "d")],
                blob(b"z"),
            ),
            (
                "check ready",
                vec![set("a", "1"), Request::Check { keys: vec![k("a")] }],
                vec![CHECK_READY],
            ),
            (
                "check not ready",
                vec![Request::Check { keys: vec![k("a")] }],
                vec![CHECK_NOT_READY],
            ),
            (
                "wait on existing keys answers at once",
                vec![set("a", "1"), Request::Wait { keys: vec![k("a")] }],
                vec![WAIT_STOP_WAITING],
            ),
            (
                "numkeys",
                vec![
                    set("a", "1"),
                    set("b", "2"),
                    set("a", "3"),
                    Request::GetNumKeys,
                ],
                i64_bytes(2),
            ),
            (
                "delete present",
                vec![set("a", "1"), Request::DeleteKey { key: k("a") }],
                i64_bytes(1),
            ),
            (
                "delete absent",
                vec![Request::DeleteKey { key: k("a") }],
                i64_bytes(0),
            ),
            (
                "append creates then appends",
                vec![
                    Request::Append {
                        key: k("a"),
                        value: k("x"),
                    },
                    Request::Append {
                        key: k("a"),
                        value: k("y"),
                    },
                    Request::Get { key: k("a") },
                ],
                blob(b"xy"),
            ),
            (
                "multi get",
                vec![
                    Request::MultiSet {
                        pairs: vec![(k("a"), k("1")), (k("b"), k("22"))],
                    },
                    Request::MultiGet {
                        keys: vec![k("b"), k("a")],
                    },
                ],
                [blob(b"22"), blob(b"1")].concat(),
            ),
            (
                "cancel wait always answers canceled",
                vec![Request::CancelWait],
                vec![WAIT_CANCELED],
            ),
            (
                "queue pop: length before the pop, then the oldest value",
                vec![
                    Request::QueuePush {
                        key: k("q"),
                        value: k("first"),
                    },
                    Request::QueuePush {
                        key: k("q"),
                        value: k("second"),
                    },
                    Request::QueuePop { key: k("q") },
                ],
                [i64_bytes(2), blob(b"first")].concat(),
            ),
            (
                "queue pop of an empty queue: 0 only",
                vec![Request::QueuePop { key: k("q") }],
                i64_bytes(0),
            ),
            (
                "queue len",
                vec![
                    Request::QueuePush {
                        key: k("q"),
                        value: k("v"),
                    },
                    Request::QueueLen { key: k("q") },
                ],
                i64_bytes(1),
            ),
        ];
        for (name, requests, want) in rows {
            let mut ks = ks();
            let mut last = Vec::new();
            for request in requests {
                last = run(&mut ks, 1, request).0;
            }
            assert_eq!(last, want, "{name}");
        }
    }

    #[test]
    fn errors_change_nothing() {
        let mut ks = ks();
        run(
            &mut ks,
            1,
            Request::Set {
                key: k("s"),
                value: k("not a number"),
            },
        );
        let mut reply = Vec::new();
        assert_eq!(
            ks.apply(
                1,
                Request::Add {
                    key: k("s"),
                    delta: 1
                },
                &mut reply
            ),
            Err(ApplyError::NotACounter { key: "s".into() })
        );
        assert_eq!(
            ks.apply(1, Request::Get { key: k("missing") }, &mut reply),
            Err(ApplyError::NoSuchKey("missing".into()))
        );
        assert_eq!(
            ks.apply(
                1,
                Request::MultiGet {
                    keys: vec![k("s"), k("missing")]
                },
                &mut reply
            ),
            Err(ApplyError::NoSuchKey("missing".into()))
        );
        run(
            &mut ks,
            1,
            Request::Set {
                key: k("c"),
                value: i64::MAX.to_string().into_bytes(),
            },
        );
        assert!(matches!(
            ks.apply(
                1,
                Request::Add {
                    key: k("c"),
                    delta: 1
                },
                &mut reply
            ),
            Err(ApplyError::CounterOverflow { .. })
        ));
        assert!(reply.is_empty());

        let mut small = Keyspace::new(10, 2);
        run(
            &mut small,
            1,
            Request::Set {
                key: k("a"),
                value: k("12345"),
            },
        );
        assert!(matches!(
            small.apply(
                1,
                Request::Set {
                    key: k("b"),
                    value: k("12345")
                },
                &mut reply
            ),
            Err(ApplyError::Full {
                stored: 6,
                more: 6,
                max: 10
            })
        ));
        // Overwriting within the limit is fine: the old value's bytes are given back.
        run(
            &mut small,
            1,
            Request::Set {
                key: k("a"),
                value: k("123456789"),
            },
        );
        assert!(matches!(
            small.apply(
                1,
                Request::MultiSet {
                    pairs: vec![(k("x"), k("1")), (k("y"), k("1"))]
                },
                &mut reply
            ),
            Err(ApplyError::Full { .. })
        ));
        assert_eq!(
            small.len(),
            1,
            "a refused MULTI_SET stores none of its pairs"
        );
        run(
            &mut small,
            1,
            Request::Wait {
                keys: vec![k("w1")],
            },
        );
        run(
            &mut small,
            1,
            Request::Wait {
                keys: vec![k("w2")],
            },
        );
        assert_eq!(
            small.apply(
                1,
                Request::Wait {
                    keys: vec![k("w3")]
                },
                &mut reply
            ),
            Err(ApplyError::TooManyWaits(2))
        );
    }

    #[test]
    fn a_wait_completes_when_its_last_key_arrives() {
        let mut ks = ks();
        let (reply, _) = run(
            &mut ks,
            7,
            Request::Wait {
                keys: vec![k("a"), k("b")],
            },
        );
        assert!(reply.is_empty(), "no reply until the keys exist");
        let (_, woken) = run(
            &mut ks,
            1,
            Request::Set {
                key: k("a"),
                value: k("1"),
            },
        );
        assert!(woken.is_empty());
        let (_, woken) = run(
            &mut ks,
            1,
            Request::Add {
                key: k("b"),
                delta: 1,
            },
        );
        assert_eq!(woken, vec![7]);
        assert_eq!(ks.pending_waits(), 0);
    }

    #[test]
    fn a_key_deleted_while_waiting_keeps_the_wait_parked() {
        let mut ks = ks();
        run(
            &mut ks,
            1,
            Request::Set {
                key: k("a"),
                value: k("1"),
            },
        );
        run(
            &mut ks,
            7,
            Request::Wait {
                keys: vec![k("a"), k("b")],
            },
        );
        run(&mut ks, 1, Request::DeleteKey { key: k("a") });
        let (_, woken) = run(
            &mut ks,
            1,
            Request::Set {
                key: k("b"),
                value: k("1"),
            },
        );
        assert!(woken.is_empty(), "a is gone again");
        let (_, woken) = run(
            &mut ks,
            1,
            Request::Set {
                key: k("a"),
                value: k("2"),
            },
        );
        assert_eq!(woken, vec![7]);
    }

    #[test]
    fn every_waiter_wakes_on_a_set_but_one_per_queue_item() {
        let mut ks = ks();
        for conn in [1, 2, 3] {
            run(&mut ks, conn, Request::Wait { keys: vec![k("k")] });
        }
        let (_, woken) = run(
            &mut ks,
            9,
            Request::Set {
                key: k("k"),
                value: k("v"),
            },
        );
        assert_eq!(woken, vec![1, 2, 3]);

        for conn in [1, 2, 3] {
            run(&mut ks, conn, Request::Wait { keys: vec![k("q")] });
        }
        let (_, woken) = run(
            &mut ks,
            9,
            Request::QueuePush {
                key: k("q"),
                value: k("a"),
            },
        );
        assert_eq!(woken, vec![1], "the oldest waiter gets the item");
        let (_, woken) = run(
            &mut ks,
            9,
            Request::QueuePush {
                key: k("q"),
                value: k("b"),
            },
        );
        assert_eq!(woken, vec![2]);
        assert_eq!(ks.pending_waits(), 1);
    }

    #[test]
    fn a_barrier_counts_callers_and_releases_them_together() {
        let mut ks = ks();
        let barrier = || Request::Barrier {
            key: k("bar"),
            world_size: 3,
        };
        assert!(run(&mut ks, 1, barrier()).0.is_empty());
        assert!(run(&mut ks, 2, barrier()).0.is_empty());
        let (reply, woken) = run(&mut ks, 3, barrier());
        assert_eq!(reply, vec![WAIT_STOP_WAITING]);
        assert_eq!(woken, vec![1, 2]);
        // The counter stays: a later caller passes at once (torch's servers do the same).
        assert_eq!(run(&mut ks, 4, barrier()).0, vec![WAIT_STOP_WAITING]);
        assert_eq!(
            run(&mut ks, 4, Request::Get { key: k("bar") }).0,
            blob(b"4")
        );
        // An ADD from elsewhere counts too.
        run(
            &mut ks,
            5,
            Request::Barrier {
                key: k("b2"),
                world_size: 10,
            },
        );
        assert_eq!(
            run(
                &mut ks,
                6,
                Request::Add {
                    key: k("b2"),
                    delta: 9
                }
            )
            .1,
            vec![5]
        );
        // A barrier on a key that holds no number is refused.
        run(
            &mut ks,
            1,
            Request::Set {
                key: k("s"),
                value: k("abc"),
            },
        );
        let mut reply = Vec::new();
        assert_eq!(
            ks.apply(
                1,
                Request::Barrier {
                    key: k("s"),
                    world_size: 1
                },
                &mut reply
            ),
            Err(ApplyError::NotACounter { key: "s".into() })
        );
    }

    #[test]
    fn cancel_and_disconnect_forget_waits() {
        let mut ks = ks();
        run(&mut ks, 1, Request::Wait { keys: vec![k("a")] });
        run(
            &mut ks,
            2,
            Request::Wait {
                keys: vec![k("a"), k("b")],
            },
        );
        let (reply, _) = run(&mut ks, 1, Request::CancelWait);
        assert_eq!(reply, vec![WAIT_CANCELED]);
        ks.drop_conn(2);
        ks.check_invariants().unwrap();
        assert_eq!(ks.pending_waits(), 0);
        let (_, woken) = run(
            &mut ks,
            3,
            Request::Set {
                key: k("a"),
                value: k("1"),
            },
        );
        assert!(woken.is_empty());
    }
}
