//! Cluster metadata in etcd. Every key lives under one prefix (`/torus/` by default):
//!
//! | key | value | lifetime |
//! |---|---|---|
//! | `volumes/<name>` | a `VolumeRecord` (JSON) | until deleted |
//! | `volumes/=next` | the next volume id (ids are never reused) | forever |
//! | `nodes/<name>` | the node's `NodeInfo` | on the node's lease |
//! | `stats/<name>` | used bytes, heartbeat time, catch-up progress | on the node's lease |
//! | `map` | the `ClusterMap` (JSON), changed by compare-and-swap on its revision | forever |
//! | `leader` | name of the node that reconciles the map | on the leader's lease |
//! | `writers/<volume id>` | the node that writes the volume; its create revision is the fencing epoch | on that node's lease |
//!
//! The `Metadata` trait is synchronous (admin threads call it); it blocks on the control
//! plane's tokio runtime. Every etcd call has a timeout, so a node cut off from etcd answers
//! an error instead of hanging.

use crate::map::ClusterMap;
use crate::metadata::{validate_name, validate_size, Metadata, MetadataError, VolumeRecord};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};
use std::collections::HashMap;
use std::time::Duration;

pub const PREFIX: &str = "/torus/";
const NEXT_KEY: &str = "volumes/=next";
/// `volumes/=family-<family id>`: the next member number of a family (snapshots, clones).
const FAMILY_PREFIX: &str = "=family-";

/// What the volume poller reads: see `Etcd::volumes`.
#[derive(Debug, Clone, Default)]
pub struct VolumeList {
    pub volumes: Vec<VolumeRecord>,
    pub next_id: u32,
    pub families: HashMap<u32, u32>,
}

#[derive(Clone)]
pub struct Etcd {
    client: Client,
    prefix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd: {0}")]
    Client(Box<etcd_client::Error>),
    #[error("etcd key {key}: {why}")]
    Corrupt { key: String, why: String },
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
}

impl From<etcd_client::Error> for EtcdError {
    fn from(e: etcd_client::Error) -> EtcdError {
        EtcdError::Client(Box::new(e))
    }
}

const CALL_TIMEOUT: Duration = Duration::from_secs(3);

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(EtcdError::Timeout(CALL_TIMEOUT)),
    }
}

fn parse<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, EtcdError> {
    serde_json::from_slice(value).map_err(|e| EtcdError::Corrupt {
        key: key.to_owned(),
        why: e.to_string(),
    })
}

impl Etcd {
    pub async fn connect(endpoints: &[String]) -> Result<Etcd, EtcdError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let client = timed(Client::connect(endpoints, Some(options))).await?;
        let etcd = Etcd {
            client,
            prefix: PREFIX.to_owned(),
        };
        // Fail at start, with a clear line, when nothing answers.
        etcd.get("map").await?;
        Ok(etcd)
    }

    pub fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    /// Value and mod revision of one key.
    pub async fn get(&self, k: &str) -> Result<Option<(Vec<u8>, i64)>, EtcdError> {
        let mut c = self.client.clone();
        let r = timed(c.get(self.key(k), None)).await?;
        Ok(r.kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    /// Every key under `k` (with the prefix and `k` stripped), value, create revision.
    pub async fn list(&self, k: &str) -> Result<Vec<(String, Vec<u8>, i64)>, EtcdError> {
        let mut c = self.client.clone();
        let full = self.key(k);
        let r = timed(c.get(full.clone(), Some(GetOptions::new().with_prefix()))).await?;
        Ok(r.kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                (
                    key.strip_prefix(&full).unwrap_or(&key).to_owned(),
                    kv.value().to_vec(),
                    kv.create_revision(),
                )
            })
            .collect())
    }

    pub async fn put(&self, k: &str, value: Vec<u8>, lease: Option<i64>) -> Result<(), EtcdError> {
        let mut c = self.client.clone();
        let options = lease.map(|l| PutOptions::new().with_lease(l));
        timed(c.put(self.key(k), value, options)).await?;
        Ok(())
    }

    pub async fn delete(&self, k: &str) -> Result<(), EtcdError> {
        let mut c = self.client.clone();
        timed(c.delete(self.key(k), None)).await?;
        Ok(())
    }

    /// Puts `value` only if the key's mod revision is still `revision` (0: absent).
    pub async fn cas(&self, k: &str, revision: i64, value: Vec<u8>) -> Result<bool, EtcdError> {
        let mut c = self.client.clone();
        let key = self.key(k);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::put(key, value, None)]);
        Ok(timed(c.txn(txn)).await?.succeeded())
    }

    /// Creates the key on a lease if nobody holds it. Returns the holder's value and the key's
    /// create revision (a fencing epoch: it grows every time the key is created anew).
    pub async fn acquire(
        &self,
        k: &str,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<(Vec<u8>, i64), EtcdError> {
        let mut c = self.client.clone();
        let key = self.key(k);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        timed(c.txn(txn)).await?;
        let r = timed(c.get(key, None)).await?;
        match r.kvs().first() {
            Some(kv) => Ok((kv.value().to_vec(), kv.create_revision())),
            None => Ok((Vec::new(), 0)),
        }
    }

    /// Deletes the key if it still holds `value` (releases what `acquire` took).
    pub async fn release(&self, k: &str, value: Vec<u8>) -> Result<(), EtcdError> {
        let mut c = self.client.clone();
        let key = self.key(k);
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, value)])
            .and_then([TxnOp::delete(key, None)]);
        timed(c.txn(txn)).await?;
        Ok(())
    }

    pub async fn lease_grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let mut c = self.client.clone();
        Ok(timed(c.lease_grant(ttl.as_secs().max(1) as i64, None))
            .await?
            .id())
    }

    /// Keeps a lease alive once. Returns false when etcd says it has expired.
    pub async fn keep_alive_once(&self, lease: i64) -> Result<bool, EtcdError> {
        let mut c = self.client.clone();
        let (mut keeper, mut stream) = timed(c.lease_keep_alive(lease)).await?;
        timed(keeper.keep_alive()).await?;
        match timed(stream.message()).await? {
            Some(r) => Ok(r.ttl() > 0),
            None => Ok(false),
        }
    }

    pub async fn lease_revoke(&self, lease: i64) -> Result<(), EtcdError> {
        let mut c = self.client.clone();
        timed(c.lease_revoke(lease)).await?;
        Ok(())
    }

    /// The cluster map and its revision (0 when there is none yet).
    pub async fn map(&self) -> Result<(Option<ClusterMap>, i64), EtcdError> {
        match self.get("map").await? {
            Some((v, rev)) => Ok((Some(parse("map", &v)?), rev)),
            None => Ok((None, 0)),
        }
    }

    /// Changes the map by compare-and-swap, retrying on conflict. `change` returns false to
    /// leave the map as it is.
    pub async fn update_map(
        &self,
        replicas_max: u32,
        mut change: impl FnMut(&mut ClusterMap) -> bool,
    ) -> Result<Option<ClusterMap>, EtcdError> {
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
    }

    /// Volumes and the next id, read at one revision.
    /// Every volume (snapshots and clones too), the next volume id, and the next member
    /// number of each family that has had members, read at one revision.
    pub async fn volumes(&self) -> Result<VolumeList, EtcdError> {
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
    }
}

/// The `Metadata` trait over etcd, for the admin API and the NBD handshake.
pub struct EtcdMetadata {
    pub etcd: Etcd,
    pub rt: tokio::runtime::Handle,
}

fn unavailable(e: EtcdError) -> MetadataError {
    MetadataError::Unavailable(e.to_string())
}

impl EtcdMetadata {
    fn block<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    fn try_volumes(&self) -> Result<Vec<VolumeRecord>, MetadataError> {
        self.block(self.etcd.volumes())
            .map(|l| l.volumes)
            .map_err(unavailable)
    }

    /// A volume's record and the mod revision of its key.
    async fn volume_at(&self, name: &str) -> Result<(VolumeRecord, i64), MetadataError> {
        let k = format!("volumes/{name}");
        let (bytes, rev) = self
            .etcd
            .get(&k)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| MetadataError::NotFound(name.to_owned()))?;
        Ok((parse(&k, &bytes).map_err(unavailable)?, rev))
    }

    async fn update_volume(
        &self,
        name: &str,
        change: impl Fn(&mut VolumeRecord) -> Result<(), MetadataError>,
    ) -> Result<VolumeRecord, MetadataError> {
        let k = format!("volumes/{name}");
        loop {
            let (mut v, rev) = self.volume_at(name).await?;
            change(&mut v)?;
            let value = serde_json::to_vec(&v).expect("volume serializes");
            if self.etcd.cas(&k, rev, value).await.map_err(unavailable)? {
                return Ok(v);
            }
        }
    }
}

impl Metadata for EtcdMetadata {
    fn volumes(&self) -> Vec<VolumeRecord> {
        self.try_volumes().unwrap_or_default()
    }

    fn volume(&self, name: &str) -> Option<VolumeRecord> {
        let k = format!("volumes/{name}");
        let (bytes, _) = self.block(self.etcd.get(&k)).ok()??;
        parse(&k, &bytes).ok()
    }

    fn create_member(
        &self,
        origin: &str,
        name: &str,
        fill: &mut dyn FnMut(&VolumeRecord) -> Result<(), String>,
    ) -> Result<VolumeRecord, MetadataError> {
        crate::metadata::validate_member_name(name)?;
        let etcd = &self.etcd;
        loop {
            let o = self
                .volume(origin)
                .ok_or_else(|| MetadataError::NotFound(origin.to_owned()))?;
            if self.volume(name).is_some() {
                return Err(MetadataError::Exists(name.to_owned()));
            }
            let family = torus_engine::layout::family(o.id);
            let fkey = format!("volumes/{FAMILY_PREFIX}{family}");
            let (next, rev) = match self.block(etcd.get(&fkey)).map_err(unavailable)? {
                Some((v, rev)) => (parse::<u32>(&fkey, &v).map_err(unavailable)?, rev),
                None => (1, 0),
            };
            let record = VolumeRecord::member(name, &o, next)?;
            // The blocks first: a record is never published for blocks that are not there. If
            // the publication loses a race, the blocks made under this id are orphans, freed
            // by every node's volume poller (their member number is below the family's next).
            fill(&record).map_err(MetadataError::Unsupported)?;
            let key = etcd.key(&format!("volumes/{name}"));
            let txn = Txn::new()
                .when([
                    Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                    Compare::mod_revision(etcd.key(&fkey), CompareOp::Equal, rev),
                ])
                .and_then([
                    TxnOp::put(key, serde_json::to_vec(&record).expect("json"), None),
                    TxnOp::put(
                        etcd.key(&fkey),
                        serde_json::to_vec(&(next + 1)).expect("json"),
                        None,
                    ),
                ]);
            let mut c = etcd.client.clone();
            if self
                .block(timed(c.txn(txn)))
                .map_err(unavailable)?
                .succeeded()
            {
                return Ok(record);
            }
        }
    }

    fn create_volume(
        &self,
        name: &str,
        size_bytes: u64,
        replicas: u32,
    ) -> Result<VolumeRecord, MetadataError> {
        validate_name(name)?;
        validate_size(size_bytes)?;
        let etcd = &self.etcd;
        self.block(async {
            loop {
                let (next, next_rev) = match etcd.get(NEXT_KEY).await.map_err(unavailable)? {
                    Some((v, rev)) => (parse::<u32>(NEXT_KEY, &v).map_err(unavailable)?, rev),
                    None => (1, 0),
                };
                let record = VolumeRecord::new(name, next, size_bytes, replicas);
                let key = etcd.key(&format!("volumes/{name}"));
                let txn = Txn::new()
                    .when([
                        Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                        Compare::mod_revision(etcd.key(NEXT_KEY), CompareOp::Equal, next_rev),
                    ])
                    .and_then([
                        TxnOp::put(
                            key.clone(),
                            serde_json::to_vec(&record).expect("json"),
                            None,
                        ),
                        TxnOp::put(
                            etcd.key(NEXT_KEY),
                            serde_json::to_vec(&(next + 1)).expect("json"),
                            None,
                        ),
                    ]);
                let mut c = etcd.client.clone();
                if timed(c.txn(txn)).await.map_err(unavailable)?.succeeded() {
                    return Ok(record);
                }
                if etcd
                    .get(&format!("volumes/{name}"))
                    .await
                    .map_err(unavailable)?
                    .is_some()
                {
                    return Err(MetadataError::Exists(name.to_owned()));
                }
            }
        })
    }

    fn delete_volume(&self, name: &str) -> Result<VolumeRecord, MetadataError> {
        self.block(async {
            let (v, rev) = self.volume_at(name).await?;
            let key = self.etcd.key(&format!("volumes/{name}"));
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
                .and_then([TxnOp::delete(key, None)]);
            let mut c = self.etcd.client.clone();
            if !timed(c.txn(txn)).await.map_err(unavailable)?.succeeded() {
                return Err(MetadataError::Unavailable(format!(
                    "volume {name:?} changed while being deleted; try again"
                )));
            }
            Ok(v)
        })
    }

    fn resize_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeRecord, MetadataError> {
        validate_size(size_bytes)?;
        self.block(self.update_volume(name, |v| {
            v.size_bytes = size_bytes;
            Ok(())
        }))
    }

    fn set_quota(&self, name: &str, quota: Option<u64>) -> Result<VolumeRecord, MetadataError> {
        self.block(self.update_volume(name, |v| {
            v.quota_bytes = quota;
            Ok(())
        }))
    }
}
