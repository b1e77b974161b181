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
    /// Serializes the attach policy's first/last calls for this volume.
    gate: parking_lot::Mutex<()>,
}

impl Volume {
    pub fn new(name: &str, id: u32, size: u64, read_only: bool) -> Volume {
        Volume {
            name: name.to_owned(),
            id,
            size: AtomicU64::new(size),
            read_only,
            connections: AtomicUsize::new(0),
            gate: parking_lot::Mutex::new(()),
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

/// Policy for who may attach (a cluster allows one writing node per volume). `first` runs
/// before a volume's first connection on this node is admitted (it may block briefly, on the
/// handshake's thread) and may refuse it; `last` runs when its last connection here closes.
pub trait AttachPolicy: Send + Sync {
    fn first(&self, volume: &Volume) -> Result<(), String>;
    fn last(&self, volume: &Volume);
}

/// A connection's claim on a volume; dropping it releases the claim.
pub struct Attachment(pub Arc<Volume>, Option<Arc<dyn AttachPolicy>>);

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Attachment").field(&self.0).finish()
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if self.0.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(p) = &self.1 {
                let _g = self.0.gate.lock();
                if self.0.connections() == 0 {
                    p.last(&self.0);
                }
            }
        }
    }
}

#[derive(Default)]
pub struct Exports {
    volumes: RwLock<BTreeMap<String, Arc<Volume>>>,
    policy: std::sync::OnceLock<Arc<dyn AttachPolicy>>,
    /// Looks up a name this node does not know yet (a volume or snapshot created through
    /// another node of a cluster a moment ago); its answer is added to the exports.
    resolver: std::sync::OnceLock<Resolver>,
}

pub type Resolver = Arc<dyn Fn(&str) -> Option<Volume> + Send + Sync>;

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

    /// Like `get`, but a name this node does not know is asked of the resolver (a cluster's
    /// metadata) and added.
    pub fn find(&self, name: &str) -> Option<Arc<Volume>> {
        if let Some(v) = self.get(name) {
            return Some(v);
        }
        let found = self.resolver.get()?(resolve_name(name))?;
        let mut volumes = self.volumes.write();
        Some(
            volumes
                .entry(found.name.clone())
                .or_insert_with(|| Arc::new(found))
                .clone(),
        )
    }

    pub fn set_resolver(&self, resolver: Resolver) {
        let _ = self.resolver.set(resolver);
    }

    pub fn set_policy(&self, policy: Arc<dyn AttachPolicy>) {
        let _ = self.policy.set(policy);
    }

    pub fn attach(&self, name: &str) -> Option<Attachment> {
        self.attach_checked(name).ok()
    }

    /// Attaches, asking the policy on a volume's first connection here. Err(None): no such
    /// volume; Err(Some(why)): refused.
    pub fn attach_checked(&self, name: &str) -> Result<Attachment, Option<String>> {
        let v = self.find(name).ok_or(None)?;
        let policy = self.policy.get().cloned();
        if let Some(p) = &policy {
            let _g = v.gate.lock();
            if v.connections() == 0 {
                p.first(&v).map_err(Some)?;
            }
            v.connections.fetch_add(1, Ordering::AcqRel);
        } else {
            v.connections.fetch_add(1, Ordering::AcqRel);
        }
        Ok(Attachment(v, policy))
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
