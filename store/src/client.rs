//! A small async client of the store, for trainctl's launchers (the control keyspace) and tests.
//! Ranks use torch's own `TCPStore` client.

use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use crate::codec::{encode_request, Request, CHECK_READY, WAIT_CANCELED, WAIT_STOP_WAITING};
use crate::server::Namespace;

/// Why a store call failed.
#[derive(Debug, Error)]
pub enum StoreError {
    /// Connecting or talking to the server failed (it closes a connection whose request it
    /// refuses: a limit, a missing key for `get`).
    #[error("store at {addr}: {source}")]
    Io {
        /// The server.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
    /// `wait` gave up.
    #[error("store at {addr}: keys {keys:?} did not appear within {timeout:?}")]
    Timeout {
        /// The server.
        addr: String,
        /// The keys waited for.
        keys: Vec<String>,
        /// How long it waited.
        timeout: Duration,
    },
    /// The server answered something the protocol does not allow.
    #[error("store at {addr}: unexpected reply: {what}")]
    Protocol {
        /// The server.
        addr: String,
        /// What was wrong.
        what: String,
    },
}

/// One connection to a store server.
pub struct StoreClient {
    addr: String,
    stream: BufReader<TcpStream>,
    out: Vec<u8>,
}

impl StoreClient {
    /// Connects to `addr` (`host:port`) and opens `namespace` (the handshake, then a `PING`).
    pub async fn connect(addr: &str, namespace: Namespace) -> Result<StoreClient, StoreError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| StoreError::Io {
                addr: addr.to_string(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let mut client = StoreClient {
            addr: addr.to_string(),
            stream: BufReader::new(stream),
            out: Vec::new(),
        };
        client
            .send(Request::Validate {
                magic: namespace.magic(),
            })
            .await?;
        let nonce = std::process::id();
        client.send(Request::Ping { nonce }).await?;
        let echoed = client.read_u32().await?;
        if echoed != nonce {
            return Err(client.protocol(format!("PING {nonce} echoed as {echoed}")));
        }
        Ok(client)
    }

    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io {
            addr: self.addr.clone(),
            source,
        }
    }

    fn protocol(&self, what: String) -> StoreError {
        StoreError::Protocol {
            addr: self.addr.clone(),
            what,
        }
    }

    async fn send(&mut self, request: Request) -> Result<(), StoreError> {
        self.out.clear();
        encode_request(&request, &mut self.out);
        let out = std::mem::take(&mut self.out);
        let written = self.stream.get_mut().write_all(&out).await;
        self.out = out;
        written.map_err(|e| self.io(e))
    }

    async fn read_u8(&mut self) -> Result<u8, StoreError> {
        self.stream.read_u8().await.map_err(|e| self.io(e))
    }

    async fn read_u32(&mut self) -> Result<u32, StoreError> {
        self.stream.read_u32_le().await.map_err(|e| self.io(e))
    }

    async fn read_i64(&mut self) -> Result<i64, StoreError> {
        self.stream.read_i64_le().await.map_err(|e| self.io(e))
    }

    async fn read_blob(&mut self) -> Result<Vec<u8>, StoreError> {
        let len = self.stream.read_u64_le().await.map_err(|e| self.io(e))?;
        let mut value = vec![0; usize::try_from(len).unwrap_or(usize::MAX).min(1 << 30)];
        self.stream
            .read_exact(&mut value)
            .await
            .map_err(|e| self.io(e))?;
        Ok(value)
    }

    /// `SET`.
    pub async fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.send(Request::Set {
            key: key.into(),
            value: value.to_vec(),
        })
        .await
    }

    /// `GET` of a key that exists (the server closes the connection otherwise: `wait` first).
    pub async fn get(&mut self, key: &str) -> Result<Vec<u8>, StoreError> {
        self.send(Request::Get { key: key.into() }).await?;
        self.read_blob().await
    }

    /// `ADD`: the counter's new value.
    pub async fn add(&mut self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.send(Request::Add {
            key: key.into(),
            delta,
        })
        .await?;
        self.read_i64().await
    }

    /// `COMPARE_SET`: the value now stored (see the keyspace's rules).
    pub async fn compare_set(
        &mut self,
        key: &str,
        expected: &[u8],
        desired: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        self.send(Request::CompareSet {
            key: key.into(),
            expected: expected.to_vec(),
            desired: desired.to_vec(),
        })
        .await?;
        self.read_blob().await
    }

    /// `CHECK`: whether every key exists.
    pub async fn check(&mut self, keys: &[&str]) -> Result<bool, StoreError> {
        self.send(Request::Check {
            keys: keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
        })
        .await?;
        Ok(self.read_u8().await? == CHECK_READY)
    }

    /// `WAIT` until every key exists, giving up after `timeout` with `CANCEL_WAIT`, as torch's
    /// client does.
    pub async fn wait(&mut self, keys: &[&str], timeout: Duration) -> Result<(), StoreError> {
        self.send(Request::Wait {
            keys: keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
        })
        .await?;
        let first = match tokio::time::timeout(timeout, self.stream.read_u8()).await {
            Ok(reply) => reply.map_err(|e| self.io(e))?,
            Err(_) => {
                self.send(Request::CancelWait).await?;
                let mut reply = self.read_u8().await?;
                if reply == WAIT_STOP_WAITING {
                    // The keys arrived just as we gave up: the cancel's own answer follows.
                    reply = self.read_u8().await?;
                    if reply != WAIT_CANCELED {
                        return Err(self.protocol(format!("CANCEL_WAIT answered {reply}")));
                    }
                    return Ok(());
                }
                if reply != WAIT_CANCELED {
                    return Err(self.protocol(format!("CANCEL_WAIT answered {reply}")));
                }
                return Err(StoreError::Timeout {
                    addr: self.addr.clone(),
                    keys: keys.iter().map(|k| k.to_string()).collect(),
                    timeout,
                });
            }
        };
        if first != WAIT_STOP_WAITING {
            return Err(self.protocol(format!("WAIT answered {first}")));
        }
        Ok(())
    }

    /// `DELETE_KEY`: whether the key existed.
    pub async fn delete(&mut self, key: &str) -> Result<bool, StoreError> {
        self.send(Request::DeleteKey { key: key.into() }).await?;
        Ok(self.read_i64().await? == 1)
    }

    /// `GETNUMKEYS`.
    pub async fn num_keys(&mut self) -> Result<i64, StoreError> {
        self.send(Request::GetNumKeys).await?;
        self.read_i64().await
    }

    /// `MULTI_GET` of keys that exist.
    pub async fn multi_get(&mut self, keys: &[&str]) -> Result<Vec<Vec<u8>>, StoreError> {
        self.send(Request::MultiGet {
            keys: keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
        })
        .await?;
        let mut values = Vec::with_capacity(keys.len());
        for _ in keys {
            values.push(self.read_blob().await?);
        }
        Ok(values)
    }

    /// `PING`: a round trip.
    pub async fn ping(&mut self) -> Result<(), StoreError> {
        self.send(Request::Ping { nonce: 7 }).await?;
        match self.read_u32().await? {
            7 => Ok(()),
            other => Err(self.protocol(format!("PING 7 echoed as {other}"))),
        }
    }
}
