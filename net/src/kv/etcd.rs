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

use super::{parse, BoxFuture, Kv, Listing, Value, FAMILY_PREFIX, NEXT_KEY};
use crate::map::ClusterMap;
use crate::metadata::{validate_name, validate_size, Metadata, MetadataError, VolumeRecord};
use rpc::compare::{CompareResult, CompareTarget, TargetUnion};
use rpc::kv_client::KvClient;
use rpc::lease_client::LeaseClient;
use rpc::request_op::Request;
use rpc::{
    Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest,
    PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use std::collections::HashMap;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// etcd's v3 gRPC API, as much as torus uses: generated from `net/proto/etcd.proto` by
/// `cargo run -p torus-codegen` and committed, so that building torus needs no `protoc`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod rpc;

pub const PREFIX: &str = "/torus/";

/// What the volume poller reads: see `Etcd::volumes`.
#[derive(Debug, Clone, Default)]
pub struct VolumeList {
    pub volumes: Vec<VolumeRecord>,
    pub next_id: u32,
    pub families: HashMap<u32, u32>,
}

/// A connection to etcd: one gRPC channel balanced over every endpoint given, shared by
/// clones (cloning is cheap; tonic multiplexes calls over HTTP/2).
#[derive(Clone)]
pub struct Etcd {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    endpoints: String,
    prefix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd endpoint {endpoint:?}: {why}")]
    Endpoint { endpoint: String, why: String },
    #[error("etcd at {endpoints}: {}", describe(.status))]
    Rpc {
        endpoints: String,
        status: Box<tonic::Status>,
    },
    #[error("etcd key {key}: {why}")]
    Corrupt { key: String, why: String },
    #[error("etcd at {endpoints} did not answer within {limit:?}")]
    Timeout { endpoints: String, limit: Duration },
}

/// One line for a gRPC failure: what etcd (or the transport) said, without tonic's debug dump.
fn describe(status: &tonic::Status) -> String {
    use tonic::Code;
    let what = match status.code() {
        Code::Unavailable => "unreachable",
        Code::DeadlineExceeded => "did not answer in time",
        Code::ResourceExhausted => "is out of space or over its request limit",
        Code::Unauthenticated | Code::PermissionDenied => "refused torus's credentials",
        _ => "failed",
    };
    let message = status.message();
    if message.is_empty() {
        format!("{what} ({:?})", status.code())
    } else {
        format!("{what} ({:?}: {message})", status.code())
    }
}

/// How long a call may take before the node treats etcd as unreachable.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a connection attempt to one endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 pings on an idle connection, so a dead etcd host is noticed without a call.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// `host:port` or a URL; etcd's own clients take both.
fn endpoint(url: &str) -> Result<Endpoint, EtcdError> {
    let url = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let e = Endpoint::from_shared(url.clone()).map_err(|e| EtcdError::Endpoint {
        endpoint: url,
        why: e.to_string(),
    })?;
    Ok(e.connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}

/// The end of the range of every key that starts with `prefix` (etcd's convention: the
/// prefix with its last byte below 0xff incremented).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

fn compare(key: &str, target: CompareTarget, union: TargetUnion) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: target as i32,
        key: key.as_bytes().to_vec(),
        target_union: Some(union),
        range_end: Vec::new(),
    }
}

/// The key's last change was at `revision` (0: the key is absent).
fn mod_revision_is(key: &str, revision: i64) -> Compare {
    compare(key, CompareTarget::Mod, TargetUnion::ModRevision(revision))
}

/// The key was created at `revision` (0: the key is absent).
fn create_revision_is(key: &str, revision: i64) -> Compare {
    compare(
        key,
        CompareTarget::Create,
        TargetUnion::CreateRevision(revision),
    )
}

fn value_is(key: &str, value: Vec<u8>) -> Compare {
    compare(key, CompareTarget::Value, TargetUnion::Value(value))
}

fn put_op(key: &str, value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: key.as_bytes().to_vec(),
            value,
            lease,
            prev_kv: false,
        })),
    }
}

fn delete_op(key: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
            range_end: Vec::new(),
            prev_kv: false,
        })),
    }
}

impl Etcd {
    pub async fn connect(endpoints: &[String]) -> Result<Etcd, EtcdError> {
        let list = endpoints
            .iter()
            .map(|e| endpoint(e))
            .collect::<Result<Vec<_>, _>>()?;
        let channel = Channel::balance_list(list.into_iter());
        let etcd = Etcd {
            kv: KvClient::new(channel.clone()),
            lease: LeaseClient::new(channel),
            endpoints: endpoints.join(","),
            prefix: PREFIX.to_owned(),
        };
        // Fail at start, with a clear line, when nothing answers.
        etcd.get("map").await?;
        Ok(etcd)
    }

    pub fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    /// Awaits `f` with the call timeout, naming the endpoints in its error.
    async fn timed<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, EtcdError> {
        match tokio::time::timeout(CALL_TIMEOUT, f).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(status)) => Err(self.rpc_error(status)),
            Err(_) => Err(EtcdError::Timeout {
                endpoints: self.endpoints.clone(),
                limit: CALL_TIMEOUT,
            }),
        }
    }

    fn rpc_error(&self, status: tonic::Status) -> EtcdError {
        EtcdError::Rpc {
            endpoints: self.endpoints.clone(),
            status: Box::new(status),
        }
    }

    /// Runs one call with the call timeout.
    async fn call<T>(
        &self,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, EtcdError> {
        Ok(self.timed(f).await?.into_inner())
    }

    /// Runs a transaction on full keys: `success` if every compare holds. Returns whether
    /// they held.
    async fn txn(&self, compare: Vec<Compare>, success: Vec<RequestOp>) -> Result<bool, EtcdError> {
        let request = TxnRequest {
            compare,
            success,
            failure: Vec::new(),
        };
        Ok(self.call(self.kv.clone().txn(request)).await?.succeeded)
    }

    /// Value and mod revision of one key.
    pub async fn get(&self, k: &str) -> Result<Option<(Vec<u8>, i64)>, EtcdError> {
        let request = RangeRequest {
            key: self.key(k).into_bytes(),
            ..Default::default()
        };
        let r = self.call(self.kv.clone().range(request)).await?;
        Ok(r.kvs
            .into_iter()
            .next()
            .map(|kv| (kv.value, kv.mod_revision)))
    }

    /// Every key under `k` (with the prefix and `k` stripped), value, create revision.
    pub async fn list(&self, k: &str) -> Result<Vec<(String, Vec<u8>, i64)>, EtcdError> {
        let full = self.key(k);
        let request = RangeRequest {
            key: full.clone().into_bytes(),
            range_end: prefix_end(full.as_bytes()),
            ..Default::default()
        };
        let r = self.call(self.kv.clone().range(request)).await?;
        Ok(r.kvs
            .into_iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(&kv.key);
                (
                    key.strip_prefix(&full).unwrap_or(&key).to_owned(),
                    kv.value,
                    kv.create_revision,
                )
            })
            .collect())
    }

    pub async fn put(&self, k: &str, value: Vec<u8>, lease: Option<i64>) -> Result<(), EtcdError> {
        let request = PutRequest {
            key: self.key(k).into_bytes(),
            value,
            lease: lease.unwrap_or(0),
            prev_kv: false,
        };
        self.call(self.kv.clone().put(request)).await?;
        Ok(())
    }

    pub async fn delete(&self, k: &str) -> Result<(), EtcdError> {
        let request = DeleteRangeRequest {
            key: self.key(k).into_bytes(),
            ..Default::default()
        };
        self.call(self.kv.clone().delete_range(request)).await?;
        Ok(())
    }

    /// Puts `value` only if the key's mod revision is still `revision` (0: absent).
    pub async fn cas(&self, k: &str, revision: i64, value: Vec<u8>) -> Result<bool, EtcdError> {
        let key = self.key(k);
        self.txn(
            vec![mod_revision_is(&key, revision)],
            vec![put_op(&key, value, 0)],
        )
        .await
    }

    /// Creates the key on a lease if nobody holds it. Returns the holder's value and the key's
    /// create revision (a fencing epoch: it grows every time the key is created anew).
    pub async fn acquire(
        &self,
        k: &str,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<(Vec<u8>, i64), EtcdError> {
        let key = self.key(k);
        self.txn(
            vec![create_revision_is(&key, 0)],
            vec![put_op(&key, value, lease)],
        )
        .await?;
        let request = RangeRequest {
            key: key.into_bytes(),
            ..Default::default()
        };
        let r = self.call(self.kv.clone().range(request)).await?;
        match r.kvs.into_iter().next() {
            Some(kv) => Ok((kv.value, kv.create_revision)),
            None => Ok((Vec::new(), 0)),
        }
    }

    /// Deletes the key if it still holds `value` (releases what `acquire` took).
    pub async fn release(&self, k: &str, value: Vec<u8>) -> Result<(), EtcdError> {
        let key = self.key(k);
        self.txn(vec![value_is(&key, value)], vec![delete_op(&key)])
            .await?;
        Ok(())
    }

    pub async fn lease_grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let request = LeaseGrantRequest {
            ttl: ttl.as_secs().max(1) as i64,
            id: 0,
        };
        let r = self.call(self.lease.clone().lease_grant(request)).await?;
        if !r.error.is_empty() {
            return Err(self.rpc_error(tonic::Status::unavailable(r.error)));
        }
        Ok(r.id)
    }

    /// Keeps a lease alive once. Returns false when etcd says it has expired.
    pub async fn keep_alive_once(&self, lease: i64) -> Result<bool, EtcdError> {
        let request = tokio_stream::once(LeaseKeepAliveRequest { id: lease });
        let mut stream = self
            .call(self.lease.clone().lease_keep_alive(request))
            .await?;
        // No answer (the stream ended): etcd no longer knows the lease.
        Ok(self
            .timed(stream.message())
            .await?
            .is_some_and(|r| r.ttl > 0))
    }

    pub async fn lease_revoke(&self, lease: i64) -> Result<(), EtcdError> {
        let request = LeaseRevokeRequest { id: lease };
        self.call(self.lease.clone().lease_revoke(request)).await?;
        Ok(())
    }

    /// The cluster map and its revision (0 when there is none yet).
    pub async fn map(&self) -> Result<(Option<ClusterMap>, i64), EtcdError> {
        Kv::map(self).await
    }

    /// Changes the map by compare-and-swap (`Kv::update_map`).
    pub async fn update_map(
        &self,
        replicas_max: u32,
        mut change: impl FnMut(&mut ClusterMap) -> bool + Send,
    ) -> Result<Option<ClusterMap>, EtcdError> {
        Kv::update_map(self, replicas_max, &mut change).await
    }

    /// Every volume, the next id and the families' next numbers (`Kv::volumes`).
    pub async fn volumes(&self) -> Result<VolumeList, EtcdError> {
        Kv::volumes(self).await
    }
}

impl Kv for Etcd {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Value>, EtcdError>> {
        Box::pin(Etcd::get(self, key))
    }
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing, EtcdError>> {
        Box::pin(Etcd::list(self, prefix))
    }
    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> BoxFuture<'a, Result<(), EtcdError>> {
        Box::pin(Etcd::put(self, key, value, lease))
    }
    fn cas<'a>(
        &'a self,
        key: &'a str,
        revision: i64,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<bool, EtcdError>> {
        Box::pin(Etcd::cas(self, key, revision, value))
    }
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: i64,
    ) -> BoxFuture<'a, Result<(Vec<u8>, i64), EtcdError>> {
        Box::pin(Etcd::acquire(self, key, value, lease))
    }
    fn release<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<(), EtcdError>> {
        Box::pin(Etcd::release(self, key, value))
    }
    fn lease_grant(&self, ttl: Duration) -> BoxFuture<'_, Result<i64, EtcdError>> {
        Box::pin(Etcd::lease_grant(self, ttl))
    }
    fn keep_alive_once(&self, lease: i64) -> BoxFuture<'_, Result<bool, EtcdError>> {
        Box::pin(Etcd::keep_alive_once(self, lease))
    }
    fn lease_revoke(&self, lease: i64) -> BoxFuture<'_, Result<(), EtcdError>> {
        Box::pin(Etcd::lease_revoke(self, lease))
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
            let fkey = etcd.key(&fkey);
            let published = etcd.txn(
                vec![create_revision_is(&key, 0), mod_revision_is(&fkey, rev)],
                vec![
                    put_op(&key, serde_json::to_vec(&record).expect("json"), 0),
                    put_op(&fkey, serde_json::to_vec(&(next + 1)).expect("json"), 0),
                ],
            );
            if self.block(published).map_err(unavailable)? {
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
                let next_key = etcd.key(NEXT_KEY);
                let created = etcd
                    .txn(
                        vec![
                            create_revision_is(&key, 0),
                            mod_revision_is(&next_key, next_rev),
                        ],
                        vec![
                            put_op(&key, serde_json::to_vec(&record).expect("json"), 0),
                            put_op(&next_key, serde_json::to_vec(&(next + 1)).expect("json"), 0),
                        ],
                    )
                    .await
                    .map_err(unavailable)?;
                if created {
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
            let deleted = self
                .etcd
                .txn(vec![mod_revision_is(&key, rev)], vec![delete_op(&key)])
                .await
                .map_err(unavailable)?;
            if !deleted {
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
