//! `Kv`: the cluster's metadata store as the cluster reaches it — keys and values with
//! revisions, compare-and-swap, and leases. etcd is one (`Etcd`); the replication simulation
//! has another (`testing::sim`), so the simulation runs the cluster's own code on it.
//!
//! Keys are relative to the cluster's prefix (see `etcd.rs` for the key layout). What is built
//! from these calls (the map by compare-and-swap, the volume list) is here once, for both.

pub mod etcd;

use crate::map::ClusterMap;
use etcd::{EtcdError, VolumeList};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

type Result<T> = std::result::Result<T, EtcdError>;

/// A key's value and mod revision.
pub type Value = (Vec<u8>, i64);
/// Keys under a prefix (the prefix stripped), each with its value and create revision.
pub type Listing = Vec<(String, Vec<u8>, i64)>;

/// `volumes/=next`: the next volume id.
pub(crate) const NEXT_KEY: &str = "volumes/=next";
/// `volumes/=family-<family id>`: the next member number of a family (snapshots, clones).
pub(crate) const FAMILY_PREFIX: &str = "=family-";

pub(crate) fn parse<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|e| EtcdError::Corrupt {
        key: key.to_owned(),
        why: e.to_string(),
    })
}

/// A change to the map: false leaves it as it is.
pub type MapChange<'a> = &'a mut (dyn FnMut(&mut ClusterMap) -> bool + Send);

pub trait Kv: Send + Sync + 'static {
    /// Value and mod revision of one key.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Value>>>;
    /// Every key under `prefix` (the prefix stripped), its value and create revision.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing>>;
    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> BoxFuture<'a, Result<()>>;
    /// Puts `value` only if the key's mod revision is still `revision` (0: absent).
    fn cas<'a>(
        &'a self,
        key: &'a str,
        revision: i64,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<bool>>;
    /// Creates the key on a lease if nobody holds it. Returns the holder's value and the key's
    /// create revision (a fencing epoch: it grows every time the key is created anew).
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: i64,
    ) -> BoxFuture<'a, Result<(Vec<u8>, i64)>>;
    /// Deletes the key if it still holds `value` (releases what `acquire` took).
    fn release<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<()>>;
    fn lease_grant(&self, ttl: Duration) -> BoxFuture<'_, Result<i64>>;
    /// Keeps a lease alive once. False when the store says it has expired.
    fn keep_alive_once(&self, lease: i64) -> BoxFuture<'_, Result<bool>>;
    fn lease_revoke(&self, lease: i64) -> BoxFuture<'_, Result<()>>;

    /// The cluster map and its revision (0 when there is none yet).
    fn map(&self) -> BoxFuture<'_, Result<(Option<ClusterMap>, i64)>> {
        Box::pin(async move {
            match self.get("map").await? {
                Some((v, rev)) => Ok((Some(parse("map", &v)?), rev)),
                None => Ok((None, 0)),
            }
        })
    }

    /// Changes the map by compare-and-swap, retrying on conflict. Returns the new map, or
    /// None when `change` left it as it is.
    fn update_map<'a>(
        &'a self,
        replicas_max: u32,
        change: MapChange<'a>,
    ) -> BoxFuture<'a, Result<Option<ClusterMap>>> {
        Box::pin(async move {
            loop {
                let (map, rev) = self.map().await?;
                let mut map = map.unwrap_or_else(|| ClusterMap::new(replicas_max));
                if !change(&mut map) {
                    return Ok(None);
                }
                let bytes = serde_json::to_vec(&map).expect("map serializes");
                if self.cas("map", rev, bytes).await? {
                    return Ok(Some(map));
                }
            }
        })
    }

    /// Every volume (snapshots and clones too), the next volume id, and the next member
    /// number of each family that has had members, read at one revision.
    fn volumes(&self) -> BoxFuture<'_, Result<VolumeList>> {
        Box::pin(async move {
            let mut list = VolumeList {
                volumes: Vec::new(),
                next_id: 1,
                families: HashMap::new(),
            };
            for (k, v, _) in self.list("volumes/").await? {
                if k == "=next" {
                    list.next_id = parse(NEXT_KEY, &v)?;
                } else if let Some(f) = k.strip_prefix(FAMILY_PREFIX) {
                    if let Ok(family) = f.parse::<u32>() {
                        list.families
                            .insert(family, parse(&format!("volumes/{k}"), &v)?);
                    }
                } else {
                    list.volumes.push(parse(&format!("volumes/{k}"), &v)?);
                }
            }
            Ok(list)
        })
    }
}
