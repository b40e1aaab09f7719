//! A small blocking client of a TCPStore (PyTorch's wire protocol, served by trainctl's agent
//! through `trainctl-store`), for the store-based rendezvous in [`crate::tcp`].
//!
//! It mirrors `trainctl_store::client::StoreClient` (the async one) with `std::net` sockets, and
//! encodes every request with `trainctl_store::codec`. Only what the rendezvous needs is here:
//! the handshake (`VALIDATE` with torch's magic, so the connection lands in the workers'
//! keyspace that the agent empties for every attempt, then a `PING`), `SET`, `GET`, `ADD`,
//! `COMPARE_SET`, `CHECK`, `WAIT` and `MULTI_GET`.
//!
//! # Waiting with a timeout
//!
//! The server never times a `WAIT` out; a client that gives up sends `CANCEL_WAIT`, which the
//! server always answers with `WAIT_CANCELED`. If the keys arrived just before the cancel, the
//! server has already queued `STOP_WAITING` for the wait, and it always sends it before the
//! `WAIT_CANCELED` of the cancel. So after a cancel the client reads one byte: `WAIT_CANCELED`
//! means the wait timed out; `STOP_WAITING` means the keys exist after all, and the cancel's own
//! `WAIT_CANCELED` follows and is read too, so that the connection stays in step.

use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use trainctl_store::codec::{
    encode_request, Limits, Request, CHECK_NOT_READY, CHECK_READY, VALIDATION_MAGIC, WAIT_CANCELED,
    WAIT_STOP_WAITING,
};

/// First pause between attempts to reach the store; doubles up to the maximum.
const CONNECT_RETRY_MIN_MS: u64 = 10;
/// Longest pause between attempts to reach the store.
const CONNECT_RETRY_MAX_MS: u64 = 500;

/// Why a store call failed.
#[derive(Debug)]
pub(crate) enum StoreError {
    /// The connection failed, ended, or a reply did not come within the reply timeout. The server
    /// closes a connection whose request it refuses (a `GET` of a missing key, a full store) and
    /// every worker connection when it starts a new attempt.
    Io(io::Error),
    /// `wait` gave up: the keys did not all appear in time. The connection is still usable.
    Timeout,
    /// The server answered something the protocol does not allow.
    Protocol(String),
}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> Self {
        StoreError::Io(e)
    }
}

/// One connection to a store, in the workers' keyspace.
#[derive(Debug)]
pub(crate) struct StoreClient {
    stream: BufReader<TcpStream>,
    out: Vec<u8>,
    /// How long any reply but a `WAIT`'s may take.
    reply_timeout: Duration,
}

impl StoreClient {
    /// Connects to the store at `addr` and does the handshake, retrying (with backoff) on any IO
    /// failure until `deadline`: the store may not be up yet, or may be refusing connections
    /// for a moment. A peer that answers the handshake wrongly is not retried.
    ///
    /// Every later reply, except that of [`StoreClient::wait`], must come within
    /// `reply_timeout`.
    pub(crate) fn connect(
        addr: SocketAddr,
        deadline: Instant,
        reply_timeout: Duration,
    ) -> Result<StoreClient, StoreError> {
        let mut pause = Duration::from_millis(CONNECT_RETRY_MIN_MS);
        loop {
            let err = match Self::connect_once(addr, deadline, reply_timeout) {
                Ok(client) => return Ok(client),
                Err(StoreError::Io(e)) => e,
                Err(other) => return Err(other),
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(StoreError::Io(err));
            }
            thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(CONNECT_RETRY_MAX_MS));
        }
    }

    fn connect_once(
        addr: SocketAddr,
        deadline: Instant,
        reply_timeout: Duration,
    ) -> Result<StoreClient, StoreError> {
        let stream = TcpStream::connect_timeout(&addr, remaining(deadline))?;
        stream.set_nodelay(true)?;
        // The handshake is bounded by the connect deadline too: a silent peer is retried.
        stream.set_read_timeout(Some(remaining(deadline).min(reply_timeout)))?;
        stream.set_write_timeout(Some(reply_timeout))?;
        let mut client = StoreClient {
            stream: BufReader::new(stream),
            out: Vec::new(),
            reply_timeout,
        };
        client.send(&Request::Validate {
            magic: VALIDATION_MAGIC,
        })?;
        let nonce = std::process::id();
        client.send(&Request::Ping { nonce })?;
        let echoed = client.read_u32()?;
        if echoed != nonce {
            return Err(StoreError::Protocol(format!(
                "the store echoed PING {nonce} as {echoed}; is something other than a TCPStore listening there?"
            )));
        }
        client
            .stream
            .get_ref()
            .set_read_timeout(Some(reply_timeout))?;
        Ok(client)
    }

    /// This end of the connection (the address other hosts can reach this one at, if the store
    /// is on another host).
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.get_ref().local_addr()
    }

    fn send(&mut self, request: &Request) -> io::Result<()> {
        self.out.clear();
        encode_request(request, &mut self.out);
        self.stream.get_mut().write_all(&self.out)
    }

    /// Sends several requests with one write (the server answers them in order).
    fn send_all(&mut self, requests: impl IntoIterator<Item = Request>) -> io::Result<()> {
        self.out.clear();
        for request in requests {
            encode_request(&request, &mut self.out);
        }
        self.stream.get_mut().write_all(&self.out)
    }

    fn read_u8(&mut self) -> io::Result<u8> {
        let mut b = [0u8; 1];
        self.stream.read_exact(&mut b)?;
        Ok(b[0])
    }

    fn read_u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.stream.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn read_u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.stream.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A length-prefixed value, refused (before anything is allocated) if it is longer than any
    /// value the store accepts.
    fn read_blob(&mut self) -> Result<Vec<u8>, StoreError> {
        let len = self.read_u64()?;
        let max = Limits::default().max_value_bytes;
        if len > max {
            return Err(StoreError::Protocol(format!(
                "a value of {len} bytes in a reply (a store's values are at most {max} bytes)"
            )));
        }
        let mut value = vec![0; len as usize];
        self.stream.read_exact(&mut value)?;
        Ok(value)
    }

    /// `SET` (no reply: a refusal shows as a closed connection on the next read).
    pub(crate) fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.send(&Request::Set {
            key: key.into(),
            value: value.to_vec(),
        })?;
        Ok(())
    }

    /// `GET` of a key that exists (the server closes the connection otherwise: `wait` first).
    pub(crate) fn get(&mut self, key: &str) -> Result<Vec<u8>, StoreError> {
        self.send(&Request::Get { key: key.into() })?;
        self.read_blob()
    }

    /// `ADD`: the counter's new value.
    pub(crate) fn add(&mut self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.send(&Request::Add {
            key: key.into(),
            delta,
        })?;
        Ok(self.read_u64()? as i64)
    }

    /// `COMPARE_SET`: stores `desired` if the value is `expected` (an empty `expected` matches a
    /// missing key); returns the value stored afterwards, so a caller that lost a race learns
    /// what won.
    pub(crate) fn compare_set(
        &mut self,
        key: &str,
        expected: &[u8],
        desired: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        self.send(&Request::CompareSet {
            key: key.into(),
            expected: expected.to_vec(),
            desired: desired.to_vec(),
        })?;
        self.read_blob()
    }

    /// `CHECK` of each key on its own, pipelined (one write, then one byte per key): which keys
    /// exist.
    pub(crate) fn check_each(&mut self, keys: &[String]) -> Result<Vec<bool>, StoreError> {
        self.send_all(keys.iter().map(|k| Request::Check {
            keys: vec![k.as_bytes().to_vec()],
        }))?;
        keys.iter()
            .map(|_| match self.read_u8()? {
                CHECK_READY => Ok(true),
                CHECK_NOT_READY => Ok(false),
                other => Err(StoreError::Protocol(format!("CHECK answered {other}"))),
            })
            .collect()
    }

    /// `WAIT` until every key exists, giving up after `timeout` with `CANCEL_WAIT` (see the
    /// module docs for the race between the keys arriving and the cancel).
    pub(crate) fn wait(&mut self, keys: &[String], timeout: Duration) -> Result<(), StoreError> {
        self.send(&Request::Wait {
            keys: keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
        })?;
        self.stream
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let first = self.read_u8();
        self.stream
            .get_ref()
            .set_read_timeout(Some(self.reply_timeout))?;
        let first = match first {
            Ok(reply) => reply,
            Err(e) if is_timeout(&e) => return self.cancel_wait(),
            Err(e) => return Err(e.into()),
        };
        if first != WAIT_STOP_WAITING {
            return Err(StoreError::Protocol(format!("WAIT answered {first}")));
        }
        Ok(())
    }

    /// Abandons the pending `WAIT`: `Timeout`, or `Ok` if the keys arrived just before.
    fn cancel_wait(&mut self) -> Result<(), StoreError> {
        self.send(&Request::CancelWait)?;
        match self.read_u8()? {
            WAIT_CANCELED => Err(StoreError::Timeout),
            WAIT_STOP_WAITING => match self.read_u8()? {
                WAIT_CANCELED => Ok(()),
                other => Err(StoreError::Protocol(format!(
                    "CANCEL_WAIT answered {other} after STOP_WAITING"
                ))),
            },
            other => Err(StoreError::Protocol(format!(
                "CANCEL_WAIT answered {other}"
            ))),
        }
    }

    /// `MULTI_GET` of keys that exist: their values, in order.
    pub(crate) fn multi_get(&mut self, keys: &[String]) -> Result<Vec<Vec<u8>>, StoreError> {
        self.send(&Request::MultiGet {
            keys: keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
        })?;
        keys.iter().map(|_| self.read_blob()).collect()
    }

    /// Whether bytes the server sent are waiting to be read (none should be, between requests).
    #[cfg(test)]
    fn has_unread_bytes(&mut self) -> io::Result<bool> {
        use std::io::BufRead as _;
        self.stream.get_ref().set_nonblocking(true)?;
        let buffered = match self.stream.fill_buf() {
            Ok(buf) => !buf.is_empty(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => return Err(e),
        };
        self.stream.get_ref().set_nonblocking(false)?;
        Ok(buffered)
    }
}

/// Whether a read failed because its timeout expired.
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Time left before `deadline`, never zero (a zero timeout means "none" to some socket calls).
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use trainctl_store::codec::decode;
    use trainctl_store::{StoreConfig, StoreServer};

    const SECOND: Duration = Duration::from_secs(1);
    const LONG: Duration = Duration::from_secs(20);

    /// A store server on its own runtime, as the agent runs it.
    struct Store {
        rt: tokio::runtime::Runtime,
        server: Option<StoreServer>,
        addr: SocketAddr,
    }

    impl Store {
        fn start() -> Store {
            Self::start_on("127.0.0.1:0".parse().unwrap())
        }

        fn start_on(addr: SocketAddr) -> Store {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let server = rt
                .block_on(StoreServer::bind(addr, StoreConfig::default()))
                .unwrap();
            let addr = server.local_addr();
            Store {
                rt,
                server: Some(server),
                addr,
            }
        }

        fn client(&self) -> StoreClient {
            StoreClient::connect(self.addr, Instant::now() + LONG, LONG).unwrap()
        }
    }

    impl Drop for Store {
        fn drop(&mut self) {
            if let Some(server) = self.server.take() {
                self.rt.block_on(server.shutdown());
            }
        }
    }

    fn keys(names: &[&str]) -> Vec<String> {
        names.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn every_operation_against_the_store_server() {
        let store = Store::start();
        let mut c = store.client();
        c.set("a", b"1").unwrap();
        assert_eq!(c.get("a").unwrap(), b"1");
        assert_eq!(c.add("n", 5).unwrap(), 5);
        assert_eq!(c.add("n", -2).unwrap(), 3);
        assert_eq!(c.get("n").unwrap(), b"3");
        assert_eq!(c.compare_set("v", b"", b"first").unwrap(), b"first");
        assert_eq!(c.compare_set("v", b"", b"second").unwrap(), b"first");
        assert_eq!(c.compare_set("v", b"first", b"third").unwrap(), b"third");
        assert_eq!(
            c.check_each(&keys(&["a", "missing", "n"])).unwrap(),
            [true, false, true]
        );
        assert_eq!(
            c.multi_get(&keys(&["v", "a", "n"])).unwrap(),
            [b"third".to_vec(), b"1".to_vec(), b"3".to_vec()]
        );
        c.wait(&keys(&["a", "n"]), SECOND).unwrap();
        assert!(!c.has_unread_bytes().unwrap());
        // Another connection sees the same keyspace.
        assert_eq!(store.client().get("a").unwrap(), b"1");
    }

    #[test]
    fn wait_returns_when_another_client_sets_the_last_key() {
        let store = Store::start();
        let mut c = store.client();
        c.set("x", b"").unwrap();
        let mut setter = store.client();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(100));
            setter.set("y", b"v").unwrap();
            setter
        });
        let started = Instant::now();
        c.wait(&keys(&["x", "y"]), LONG).unwrap();
        assert!(started.elapsed() < LONG / 2);
        assert_eq!(c.get("y").unwrap(), b"v");
        drop(t.join().unwrap());
    }

    #[test]
    fn wait_times_out_cancels_and_the_connection_stays_usable() {
        let store = Store::start();
        let mut c = store.client();
        let started = Instant::now();
        let err = c
            .wait(&keys(&["never"]), Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(err, StoreError::Timeout), "{err:?}");
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(!c.has_unread_bytes().unwrap());
        // The cancelled wait is gone: setting the key now sends this connection nothing, and the
        // next request's reply is its own.
        let mut other = store.client();
        other.set("never", b"late").unwrap();
        assert_eq!(other.add("sync", 1).unwrap(), 1);
        assert_eq!(c.add("k", 7).unwrap(), 7);
        assert_eq!(c.get("never").unwrap(), b"late");
    }

    /// A fake store that answers the handshake, never answers a `WAIT`, and answers
    /// `CANCEL_WAIT` with `cancel_reply` (bytes the real server sends when the keys arrive just
    /// as the client gives up), then the `PING` after it.
    fn fake_store(cancel_reply: &'static [u8]) -> (SocketAddr, thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let t = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 256];
            loop {
                let n = s.read(&mut chunk).unwrap();
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                while let Some((request, len)) = decode(&buf, &Limits::default()).unwrap() {
                    buf.drain(..len);
                    match request {
                        Request::Ping { nonce } => s.write_all(&nonce.to_le_bytes()).unwrap(),
                        Request::CancelWait => s.write_all(cancel_reply).unwrap(),
                        _ => {}
                    }
                }
            }
        });
        (addr, t)
    }

    #[test]
    fn keys_arriving_as_the_wait_is_cancelled_count_as_arrived() {
        let (addr, server) = fake_store(&[WAIT_STOP_WAITING, WAIT_CANCELED]);
        let mut c = StoreClient::connect(addr, Instant::now() + LONG, LONG).unwrap();
        c.wait(&keys(&["k"]), Duration::from_millis(50)).unwrap();
        // Both bytes were consumed: the connection is in step for the next request.
        assert!(!c.has_unread_bytes().unwrap());
        drop(c);
        server.join().unwrap();

        let (addr, server) = fake_store(&[WAIT_CANCELED]);
        let mut c = StoreClient::connect(addr, Instant::now() + LONG, LONG).unwrap();
        let err = c
            .wait(&keys(&["k"]), Duration::from_millis(50))
            .unwrap_err();
        assert!(matches!(err, StoreError::Timeout), "{err:?}");
        drop(c);
        server.join().unwrap();

        let (addr, server) = fake_store(&[WAIT_STOP_WAITING, 7]);
        let mut c = StoreClient::connect(addr, Instant::now() + LONG, LONG).unwrap();
        let err = c
            .wait(&keys(&["k"]), Duration::from_millis(50))
            .unwrap_err();
        assert!(matches!(err, StoreError::Protocol(_)), "{err:?}");
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn get_of_a_missing_key_is_an_io_error_not_a_hang() {
        let store = Store::start();
        let mut c = store.client();
        let err = c.get("missing").unwrap_err();
        assert!(matches!(err, StoreError::Io(_)), "{err:?}");
    }

    #[test]
    fn connect_retries_until_the_store_starts() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let client = thread::spawn(move || StoreClient::connect(addr, Instant::now() + LONG, LONG));
        thread::sleep(Duration::from_millis(300));
        let store = Store::start_on(addr);
        let mut c = client.join().unwrap().unwrap();
        assert_eq!(c.add("k", 1).unwrap(), 1);
        drop(store);
    }

    #[test]
    fn connect_gives_up_at_the_deadline_with_the_last_error() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let started = Instant::now();
        let err =
            StoreClient::connect(addr, started + Duration::from_millis(300), LONG).unwrap_err();
        assert!(
            matches!(&err, StoreError::Io(e) if e.kind() == io::ErrorKind::ConnectionRefused),
            "{err:?}"
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
    }

    #[test]
    fn a_peer_that_is_not_a_store_is_named_as_such() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let t = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut hello = [0u8; 10];
            s.read_exact(&mut hello).unwrap();
            s.write_all(b"HTTP").unwrap();
            s
        });
        let err = StoreClient::connect(addr, Instant::now() + LONG, LONG).unwrap_err();
        assert!(
            matches!(&err, StoreError::Protocol(m) if m.contains("TCPStore")),
            "{err:?}"
        );
        drop(t.join().unwrap());
    }
}
