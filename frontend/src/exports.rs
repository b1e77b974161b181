//! The volumes this node exports, by name, as the frontends see them. The control plane
//! (torusd) adds, resizes and removes entries; handshakes look names up; connections hold an
//! `Arc` to their volume and count themselves in `connections` so that a volume with clients
//! is not deleted under them.

use parking_lot::RwLock;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct Volume {
    pub name: String,
    pub id: u32,
    size: AtomicU64,
    pub read_only: bool,
    connections: AtomicUsize,
}

impl Volume {
    pub fn new(name: &str, id: u32, size: u64, read_only: bool) -> Volume {
        Volume {
            name: name.to_owned(),
            id,
            size: AtomicU64::new(size),
            read_only,
            connections: AtomicUsize::new(0),
        }
    }
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    pub fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release)
    }
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }
}

/// A connection's claim on a volume; dropping it releases the claim.
#[derive(Debug)]
pub struct Attachment(pub Arc<Volume>);

impl Drop for Attachment {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Default)]
pub struct Exports {
    volumes: RwLock<BTreeMap<String, Arc<Volume>>>,
}

/// The empty export name means the volume `default`.
pub fn resolve_name(name: &str) -> &str {
    if name.is_empty() {
        "default"
    } else {
        name
    }
}

impl Exports {
    pub fn insert(&self, volume: Volume) {
        self.volumes
            .write()
            .insert(volume.name.clone(), Arc::new(volume));
    }

    pub fn get(&self, name: &str) -> Option<Arc<Volume>> {
        self.volumes.read().get(resolve_name(name)).cloned()
    }

    pub fn attach(&self, name: &str) -> Option<Attachment> {
        let volumes = self.volumes.read();
        let v = volumes.get(resolve_name(name))?;
        v.connections.fetch_add(1, Ordering::AcqRel);
        Some(Attachment(v.clone()))
    }

    /// Removes a volume unless it has clients; returns the number of clients when refused.
    pub fn remove_unless_attached(&self, name: &str) -> Result<Option<Arc<Volume>>, usize> {
        let mut volumes = self.volumes.write();
        match volumes.get(name) {
            None => Ok(None),
            Some(v) if v.connections() > 0 => Err(v.connections()),
            Some(_) => Ok(volumes.remove(name)),
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.volumes.read().keys().cloned().collect()
    }

    pub fn all(&self) -> Vec<Arc<Volume>> {
        self.volumes.read().values().cloned().collect()
    }
}
