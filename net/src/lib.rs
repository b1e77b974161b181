//! torus-net: what nodes share. The metadata trait with its embedded and etcd stores, the
//! cluster map and placement, the node-to-node wire protocol, and the cluster's data path
//! (routing, replication, catch-up).

#![forbid(unsafe_code)]

pub mod cluster;
pub mod counted;
pub mod counter_table;
/// etcd, the cluster's metadata store (`kv::etcd`).
pub use kv::etcd;
pub mod kv;
pub mod map;
pub mod metadata;
pub mod peer;
pub mod replication;
#[cfg(feature = "testing")]
pub mod testing;
pub mod wire;
