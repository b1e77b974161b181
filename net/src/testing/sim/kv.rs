//! etcd in the simulation: keys with create and mod revisions, compare-and-swap, leases that
//! expire on the simulated clock. Each node reaches it through its own `SimKv`: a call takes
//! a moment; from a node cut off from etcd it fails after the etcd client's call timeout;
//! from a process that has died it never returns.

use super::world::World;
use crate::etcd::EtcdError;
use crate::kv::{BoxFuture, Kv, Listing, Value};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

/// The etcd client's call timeout (`etcd.rs`).
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

struct Entry {
    value: Vec<u8>,
    create: i64,
    modified: i64,
    lease: i64,
}

#[derive(Default)]
pub(super) struct KvState {
    revision: i64,
    keys: BTreeMap<String, Entry>,
    /// Lease → when it expires.
    leases: BTreeMap<i64, Instant>,
    next_lease: i64,
    /// Puts of flush records (`flushed/…`).
    pub flush_records: u64,
    /// Lines for the log, said under the world's lock.
    said: Vec<String>,
}

impl KvState {
    /// Drops expired leases and their keys.
    fn expire(&mut self) {
        let now = Instant::now();
        let gone: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(l, _)| *l)
            .collect();
        for l in gone {
            self.leases.remove(&l);
            self.keys.retain(|_, e| e.lease != l);
        }
    }

    pub fn get(&mut self, key: &str) -> Option<(Vec<u8>, i64)> {
        self.expire();
        self.keys.get(key).map(|e| (e.value.clone(), e.modified))
    }

    /// How long the lease `key` is held on has left, if etcd has the key on a lease.
    pub fn lease_left(&mut self, key: &str) -> Option<Duration> {
        self.expire();
        let at = self.leases.get(&self.keys.get(key)?.lease)?;
        Some(at.saturating_duration_since(Instant::now()))
    }

    pub fn put(&mut self, key: &str, value: Vec<u8>, lease: i64) -> bool {
        self.expire();
        if lease != 0 && !self.leases.contains_key(&lease) {
            return false;
        }
        if key.starts_with("flushed/") {
            self.flush_records += 1;
        }
        self.revision += 1;
        let rev = self.revision;
        let create = self.keys.get(key).map_or(rev, |e| e.create);
        self.keys.insert(
            key.to_owned(),
            Entry {
                value,
                create,
                modified: rev,
                lease,
            },
        );
        true
    }
}

/// A node's connection to the simulated etcd.
pub(super) struct SimKv {
    pub world: World,
    pub node: usize,
    pub gen: u64,
}

fn lease_not_found() -> EtcdError {
    EtcdError::Corrupt {
        key: "lease".into(),
        why: "requested lease not found".into(),
    }
}

impl SimKv {
    /// Runs `op` on etcd after a moment, as this node reaches it.
    fn call<'a, T: Send + 'a>(
        &'a self,
        op: impl FnOnce(&mut KvState) -> Result<T, EtcdError> + Send + 'a,
    ) -> BoxFuture<'a, Result<T, EtcdError>> {
        Box::pin(async move {
            let reach = {
                let mut w = self.world.lock();
                let d =
                    Duration::from_micros(w.rng.range(100, 1500)) + w.nodes[self.node].etcd_slow;
                w.alive(self.node, self.gen)
                    .then_some((w.nodes[self.node].etcd_cut, d))
            };
            let Some((cut, delay)) = reach else {
                return std::future::pending().await;
            };
            if !cut {
                tokio::time::sleep(delay).await;
                let done = {
                    let mut w = self.world.lock();
                    if !w.alive(self.node, self.gen) {
                        None
                    } else if !w.nodes[self.node].etcd_cut {
                        let r = op(&mut w.kv);
                        for line in std::mem::take(&mut w.kv.said) {
                            w.log(line);
                        }
                        Some(Some(r))
                    } else {
                        Some(None)
                    }
                };
                match done {
                    None => return std::future::pending().await,
                    Some(Some(r)) => return r,
                    Some(None) => {}
                }
            }
            tokio::time::sleep(CALL_TIMEOUT).await;
            Err(EtcdError::Timeout {
                endpoints: "sim".into(),
                limit: CALL_TIMEOUT,
            })
        })
    }
}

impl Kv for SimKv {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Value>, EtcdError>> {
        self.call(move |kv| Ok(kv.get(key)))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing, EtcdError>> {
        Box::pin(async move {
            let listing = self
                .call(move |kv| {
                    kv.expire();
                    Ok(kv
                        .keys
                        .range(prefix.to_owned()..)
                        .take_while(|(k, _)| k.starts_with(prefix))
                        .map(|(k, e)| (k[prefix.len()..].to_owned(), e.value.clone(), e.create))
                        .collect())
                })
                .await;
            if listing.is_ok() && prefix == "nodes/" {
                self.world.lock().nodes[self.node].nodes_listed += 1;
            }
            listing
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> BoxFuture<'a, Result<(), EtcdError>> {
        self.call(move |kv| {
            if kv.put(key, value, lease.unwrap_or(0)) {
                Ok(())
            } else {
                Err(lease_not_found())
            }
        })
    }

    fn cas<'a>(
        &'a self,
        key: &'a str,
        revision: i64,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<bool, EtcdError>> {
        let trace = (key == "map")
            .then(|| {
                std::env::var("TORUS_SIM_TRACE_PG")
                    .ok()?
                    .parse::<usize>()
                    .ok()
            })
            .flatten()
            .and_then(|pg| {
                let m: crate::map::ClusterMap = serde_json::from_slice(&value).ok()?;
                Some(format!(
                    "n{}: map {} PG {pg}: {:?} nodes {:?}",
                    self.node,
                    m.epoch,
                    m.pgs.get(pg)?,
                    m.nodes
                        .iter()
                        .map(|(k, n)| (k.clone(), n.up, n.up_since, n.out))
                        .collect::<Vec<_>>()
                ))
            });
        self.call(move |kv| {
            let now = kv.get(key).map_or(0, |(_, r)| r);
            let done = now == revision && kv.put(key, value, 0);
            if let (true, Some(line)) = (done, trace) {
                kv.said.push(line);
            }
            Ok(done)
        })
    }

    fn acquire<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: i64,
    ) -> BoxFuture<'a, Result<(Vec<u8>, i64), EtcdError>> {
        self.call(move |kv| {
            if kv.get(key).is_none() && !kv.put(key, value, lease) {
                return Err(lease_not_found());
            }
            Ok(kv
                .keys
                .get(key)
                .map_or((Vec::new(), 0), |e| (e.value.clone(), e.create)))
        })
    }

    fn release<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<(), EtcdError>> {
        self.call(move |kv| {
            if kv.get(key).is_some_and(|(v, _)| v == value) {
                kv.revision += 1;
                kv.keys.remove(key);
            }
            Ok(())
        })
    }

    fn lease_grant(&self, ttl: Duration) -> BoxFuture<'_, Result<i64, EtcdError>> {
        self.call(move |kv| {
            kv.next_lease += 1;
            let l = kv.next_lease;
            kv.leases.insert(l, Instant::now() + ttl);
            Ok(l)
        })
    }

    fn keep_alive_once(&self, lease: i64) -> BoxFuture<'_, Result<bool, EtcdError>> {
        self.call(move |kv| {
            kv.expire();
            match kv.leases.get_mut(&lease) {
                // Every lease here has the cluster's TTL (`ClusterConfig::lease_ttl`).
                Some(at) => {
                    *at = Instant::now() + super::LEASE_TTL;
                    Ok(true)
                }
                None => Ok(false),
            }
        })
    }

    fn lease_revoke(&self, lease: i64) -> BoxFuture<'_, Result<(), EtcdError>> {
        self.call(move |kv| {
            kv.leases.remove(&lease);
            kv.keys.retain(|_, e| e.lease != lease);
            Ok(())
        })
    }
}
