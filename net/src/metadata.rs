//! Cluster metadata behind one trait. This build has the embedded single-node store: one JSON
//! file in the data dir, replaced atomically (write a temporary file, fsync it, rename it over
//! the old one, fsync the directory), so a crash leaves either the old or the new version.
//! The etcd implementation (`etcd.rs`) keeps the same records under one key prefix.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const METADATA_FORMAT_VERSION: u32 = 1;
/// Volume names: what fits in an NBD export name and a URL path without escaping. `@` is kept
/// for snapshots (`VOLUME@SNAPSHOT`).
pub const VOLUME_NAME_MAX: usize = 128;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeRecord {
    pub name: String,
    pub id: u32,
    pub size_bytes: u64,
    pub created_unix: u64,
    pub replicas: u32,
    /// What a snapshot was taken of (`VOLUME`) or a clone was made from (`VOLUME@SNAPSHOT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// Most bytes the volume may hold (on each node); writes past it are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_bytes: Option<u64>,
}

impl VolumeRecord {
    /// Snapshots (`VOLUME@SNAPSHOT`) are read-only.
    pub fn is_snapshot(&self) -> bool {
        self.name.contains('@')
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    format_version: u32,
    next_volume_id: u32,
    volumes: BTreeMap<String, VolumeRecord>,
    /// Next member number of each family (snapshots and clones of a volume), never reused.
    #[serde(default)]
    family_next: BTreeMap<u32, u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("volume {0:?} already exists")]
    Exists(String),
    #[error("no volume named {0:?}")]
    NotFound(String),
    #[error(
        "invalid volume name {0:?}: use 1 to 128 of A-Z a-z 0-9 . _ - (not starting with . or -)"
    )]
    InvalidName(String),
    #[error("invalid size: {0}")]
    InvalidSize(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("cluster metadata unavailable: {0}")]
    Unavailable(String),
    #[error("{path}: metadata file is damaged: {why}")]
    Corrupt { path: PathBuf, why: String },
}

pub trait Metadata: Send + Sync {
    fn volumes(&self) -> Vec<VolumeRecord>;
    fn volume(&self, name: &str) -> Option<VolumeRecord>;
    fn create_volume(
        &self,
        name: &str,
        size_bytes: u64,
        replicas: u32,
    ) -> Result<VolumeRecord, MetadataError>;
    fn delete_volume(&self, name: &str) -> Result<VolumeRecord, MetadataError>;
    fn resize_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeRecord, MetadataError>;
    /// Sets or clears a volume's quota.
    fn set_quota(&self, name: &str, quota: Option<u64>) -> Result<VolumeRecord, MetadataError>;
    /// Creates `name` in the family of volume `origin`: a snapshot (`VOLUME@SNAPSHOT` of
    /// `VOLUME`) or a clone (a plain name, of a snapshot). `fill` makes its blocks (the
    /// engine's clone) before the record is published; when it fails nothing is published.
    fn create_member(
        &self,
        origin: &str,
        name: &str,
        fill: &mut dyn FnMut(&VolumeRecord) -> Result<(), String>,
    ) -> Result<VolumeRecord, MetadataError>;
}

/// Members (snapshots and clones) a family can have over its lifetime: ids hold 8 bits for it.
pub const FAMILY_MEMBERS_MAX: u32 = 255;

/// A snapshot's (`VOLUME@SNAPSHOT`) or a clone's (a plain volume name) name is valid.
pub fn validate_member_name(name: &str) -> Result<(), MetadataError> {
    if name.contains('@') {
        split_snapshot(name).map(drop)
    } else {
        validate_name(name)
    }
}

/// `VOLUME@SNAPSHOT` → (VOLUME, SNAPSHOT), both valid names.
pub fn split_snapshot(name: &str) -> Result<(&str, &str), MetadataError> {
    match name.split_once('@') {
        Some((v, s)) => {
            validate_name(v)?;
            validate_name(s).map_err(|_| MetadataError::InvalidName(name.to_owned()))?;
            Ok((v, s))
        }
        None => Err(MetadataError::InvalidName(format!(
            "{name} (expected VOLUME@SNAPSHOT)"
        ))),
    }
}

pub fn validate_name(name: &str) -> Result<(), MetadataError> {
    let ok = !name.is_empty()
        && name.len() <= VOLUME_NAME_MAX
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(MetadataError::InvalidName(
            name.chars().take(VOLUME_NAME_MAX + 1).collect(),
        ))
    }
}

/// Volume sizes are whole 4 KiB blocks, at least one.
pub fn validate_size(size_bytes: u64) -> Result<(), MetadataError> {
    if size_bytes == 0 || !size_bytes.is_multiple_of(4096) {
        return Err(MetadataError::InvalidSize(format!(
            "{size_bytes} bytes is not a positive multiple of 4096"
        )));
    }
    if size_bytes > 1 << 60 {
        return Err(MetadataError::InvalidSize(format!(
            "{size_bytes} bytes is more than 1 EiB"
        )));
    }
    Ok(())
}

pub struct EmbeddedMetadata {
    path: PathBuf,
    state: parking_lot::Mutex<State>,
}

impl EmbeddedMetadata {
    /// Opens `dir/metadata.json`, creating an empty store when it does not exist. Returns the
    /// store and whether it was just created.
    pub fn open(dir: &Path) -> Result<(EmbeddedMetadata, bool), MetadataError> {
        let path = dir.join("metadata.json");
        let (state, created) = match fs::read(&path) {
            Ok(bytes) => {
                let state: State =
                    serde_json::from_slice(&bytes).map_err(|e| MetadataError::Corrupt {
                        path: path.clone(),
                        why: e.to_string(),
                    })?;
                if state.format_version != METADATA_FORMAT_VERSION {
                    return Err(MetadataError::Corrupt {
                        path,
                        why: format!("format version {} is not supported", state.format_version),
                    });
                }
                (state, false)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                State {
                    format_version: METADATA_FORMAT_VERSION,
                    next_volume_id: 1,
                    volumes: BTreeMap::new(),
                    family_next: BTreeMap::new(),
                },
                true,
            ),
            Err(source) => {
                return Err(MetadataError::Io {
                    op: "read",
                    path,
                    source,
                })
            }
        };
        let m = EmbeddedMetadata {
            path,
            state: parking_lot::Mutex::new(state),
        };
        if created {
            m.persist(&m.state.lock())?;
        }
        Ok((m, created))
    }

    fn persist(&self, state: &State) -> Result<(), MetadataError> {
        fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> MetadataError {
            let path = path.to_owned();
            move |source| MetadataError::Io { op, path, source }
        }
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(state).expect("metadata serializes");
        let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(&bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        fs::rename(&tmp, &self.path).map_err(io("rename", &self.path))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io("fsync", dir))?;
        }
        Ok(())
    }

    /// Changes one volume's record.
    fn update_volume(
        &self,
        name: &str,
        change: impl FnOnce(&mut VolumeRecord),
    ) -> Result<VolumeRecord, MetadataError> {
        self.update(|s| {
            let v = s
                .volumes
                .get_mut(name)
                .ok_or_else(|| MetadataError::NotFound(name.to_owned()))?;
            change(v);
            Ok(v.clone())
        })
    }

    fn update<T>(
        &self,
        change: impl FnOnce(&mut State) -> Result<T, MetadataError>,
    ) -> Result<T, MetadataError> {
        let mut guard = self.state.lock();
        let mut next = guard.clone();
        let out = change(&mut next)?;
        self.persist(&next)?;
        *guard = next;
        Ok(out)
    }
}

impl VolumeRecord {
    /// The record of `name`, member number `number` of `origin`'s family (a snapshot or a
    /// clone), created now; refused past `FAMILY_MEMBERS_MAX`.
    pub fn member(
        name: &str,
        origin: &VolumeRecord,
        number: u32,
    ) -> Result<VolumeRecord, MetadataError> {
        if number > FAMILY_MEMBERS_MAX {
            return Err(MetadataError::Unsupported(format!(
                "volume family of {:?} has had {FAMILY_MEMBERS_MAX} snapshots and clones, the most it can have",
                origin.name
            )));
        }
        let id = torus_engine::layout::family(origin.id) | number << 24;
        let mut record = VolumeRecord::new(name, id, origin.size_bytes, origin.replicas);
        record.origin = Some(origin.name.clone());
        Ok(record)
    }

    /// A record for a volume created now.
    pub fn new(name: &str, id: u32, size_bytes: u64, replicas: u32) -> VolumeRecord {
        VolumeRecord {
            name: name.to_owned(),
            id,
            size_bytes,
            created_unix: now_unix(),
            replicas,
            origin: None,
            quota_bytes: None,
        }
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Metadata for EmbeddedMetadata {
    fn volumes(&self) -> Vec<VolumeRecord> {
        self.state.lock().volumes.values().cloned().collect()
    }

    fn volume(&self, name: &str) -> Option<VolumeRecord> {
        self.state.lock().volumes.get(name).cloned()
    }

    fn create_volume(
        &self,
        name: &str,
        size_bytes: u64,
        replicas: u32,
    ) -> Result<VolumeRecord, MetadataError> {
        validate_name(name)?;
        validate_size(size_bytes)?;
        self.update(|s| {
            if s.volumes.contains_key(name) {
                return Err(MetadataError::Exists(name.to_owned()));
            }
            if s.next_volume_id > torus_engine::layout::FAMILY_MASK {
                return Err(MetadataError::InvalidSize(
                    "this store has used all 16.7 million volume ids".into(),
                ));
            }
            let record = VolumeRecord::new(name, s.next_volume_id, size_bytes, replicas);
            // Ids are never reused: blocks of a deleted volume can never show up in a new one.
            s.next_volume_id += 1;
            s.volumes.insert(name.to_owned(), record.clone());
            Ok(record)
        })
    }

    fn delete_volume(&self, name: &str) -> Result<VolumeRecord, MetadataError> {
        self.update(|s| {
            s.volumes
                .remove(name)
                .ok_or_else(|| MetadataError::NotFound(name.to_owned()))
        })
    }

    fn create_member(
        &self,
        origin: &str,
        name: &str,
        fill: &mut dyn FnMut(&VolumeRecord) -> Result<(), String>,
    ) -> Result<VolumeRecord, MetadataError> {
        validate_member_name(name)?;
        self.update(|s| {
            if s.volumes.contains_key(name) {
                return Err(MetadataError::Exists(name.to_owned()));
            }
            let o = s
                .volumes
                .get(origin)
                .ok_or_else(|| MetadataError::NotFound(origin.to_owned()))?
                .clone();
            let family = torus_engine::layout::family(o.id);
            let next = s.family_next.get(&family).copied().unwrap_or(1);
            let record = VolumeRecord::member(name, &o, next)?;
            fill(&record).map_err(MetadataError::Unsupported)?;
            s.family_next.insert(family, next + 1);
            s.volumes.insert(name.to_owned(), record.clone());
            Ok(record)
        })
    }

    fn set_quota(&self, name: &str, quota: Option<u64>) -> Result<VolumeRecord, MetadataError> {
        self.update_volume(name, |v| v.quota_bytes = quota)
    }

    fn resize_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeRecord, MetadataError> {
        validate_size(size_bytes)?;
        self.update_volume(name, |v| v.size_bytes = size_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_persist_and_ids_are_never_reused() {
        let dir = std::env::temp_dir().join(format!("torus-meta-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let (m, created) = EmbeddedMetadata::open(&dir).unwrap();
        assert!(created);
        let a = m.create_volume("a", 4096, 1).unwrap();
        assert!(matches!(
            m.create_volume("a", 4096, 1),
            Err(MetadataError::Exists(_))
        ));
        assert!(matches!(
            m.create_volume("bad/name", 4096, 1),
            Err(MetadataError::InvalidName(_))
        ));
        assert!(matches!(
            m.create_volume("b", 100, 1),
            Err(MetadataError::InvalidSize(_))
        ));
        m.delete_volume("a").unwrap();
        let b = m.create_volume("b", 8192, 1).unwrap();
        assert!(b.id > a.id);
        drop(m);
        let (m, created) = EmbeddedMetadata::open(&dir).unwrap();
        assert!(!created);
        assert_eq!(m.volumes(), vec![b]);
        let c = m.create_volume("c", 4096, 1).unwrap();
        assert!(c.id > a.id + 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn snapshots_and_clones_join_their_origin_family_and_ids_are_never_reused() {
        let dir = std::env::temp_dir().join(format!("torus-meta-family-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let (m, _) = EmbeddedMetadata::open(&dir).unwrap();
        let v = m.create_volume("db", 8192, 1).unwrap();
        let mut filled = Vec::new();
        let s = m
            .create_member("db", "db@a", &mut |r| {
                filled.push(r.id);
                Ok(())
            })
            .unwrap();
        assert_eq!(s.id, v.id | 1 << 24);
        assert!(s.is_snapshot());
        assert_eq!(s.origin.as_deref(), Some("db"));
        assert_eq!(filled, vec![s.id]);
        // A failed fill publishes nothing.
        let failed = m.create_member("db@a", "clone", &mut |_| Err("engine says no".into()));
        assert!(
            matches!(failed, Err(MetadataError::Unsupported(ref w)) if w.contains("engine says no"))
        );
        assert!(m.volume("clone").is_none());
        let c = m.create_member("db@a", "clone", &mut |_| Ok(())).unwrap();
        assert_eq!(c.id, v.id | 2 << 24);
        assert!(!c.is_snapshot());
        assert!(matches!(
            m.create_member("db", "db@a", &mut |_| Ok(())),
            Err(MetadataError::Exists(_))
        ));
        assert!(matches!(
            m.create_member("db", "db@bad/name", &mut |_| Ok(())),
            Err(MetadataError::InvalidName(_))
        ));
        // Deleted members' numbers are not reused, across a reopen too.
        m.delete_volume("db@a").unwrap();
        drop(m);
        let (m, _) = EmbeddedMetadata::open(&dir).unwrap();
        let b = m.create_member("db", "db@b", &mut |_| Ok(())).unwrap();
        assert_eq!(b.id, v.id | 3 << 24);
        fs::remove_dir_all(&dir).unwrap();
    }
}
