//! Stored metadata known per object version, and the HEADs that confirm listed entries.
//!
//! A listing names a key, its size, ETag and LastModified, but none of the metadata s3fs and
//! s3mount store (mode, owner, times; a symlink's or FIFO's type). [`KnownVersions`] remembers
//! what a HEAD or this mount's own write said about each version (ETag, plus the server's
//! LastModified when a HEAD gave it: a metadata-only copy keeps a single-PUT object's ETag), so
//! later listings of the same version show it without a request.
//!
//! Entries not known yet are *confirmed*: readdirplus starts a HEAD for each in the background
//! ([`CONFIRM_PARALLEL`] at a time) and a lookup joins the one for its key. A directory whose
//! first [`SAMPLE`] confirmed objects carry no stored metadata at all (a bucket written by plain
//! S3 clients) stops being confirmed: its listings are trusted, so `ls -l` of such a bucket
//! does not cost a HEAD per entry, as s3fs's does. A directory not sampled yet follows the
//! mount's sample (all its confirmations so far), until one of its own objects says otherwise.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::SystemTime;

use futures::future::{BoxFuture, FutureExt, Shared};
use lru::LruCache;
use parking_lot::Mutex;

use super::attrs::{self, Kind};
use super::dir::DirEntry;
use crate::store::{ObjectMeta, ObjectStore};

/// Versions whose metadata is remembered.
const VERSIONS: usize = 65_536;
/// HEADs confirming listed entries that run at once.
pub const CONFIRM_PARALLEL: usize = 16;
/// Objects of one directory confirmed before deciding it holds no stored metadata.
const SAMPLE: u32 = 16;
/// Directories whose sample is remembered.
const DIRS: usize = 4096;

/// A HEAD confirming one listed object's stored metadata (None: failed, gone, or skipped).
pub type SharedHead = Shared<BoxFuture<'static, Option<ObjectMeta>>>;

#[derive(Clone, Debug)]
struct Known {
    meta: ObjectMeta,
    server_time: Option<SystemTime>,
}

/// What the confirmations of one directory found so far.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    plain: u32,
    with_metadata: bool,
}

impl Sample {
    fn trust_listings(&self) -> bool {
        !self.with_metadata && self.plain >= SAMPLE
    }
}

pub struct KnownVersions {
    store: Arc<dyn ObjectStore>,
    versions: Mutex<LruCache<String, Known>>,
    confirming: Mutex<HashMap<String, SharedHead>>,
    slots: Arc<tokio::sync::Semaphore>,
    dirs: Mutex<LruCache<String, Sample>>,
    /// Every confirmation of the mount: a directory not sampled yet follows it, so a tree of
    /// many small directories of plain objects is not sampled directory by directory.
    mount: Mutex<Sample>,
}

/// `a/b/c` -> `a/b/`.
fn dir_of(key: &str) -> &str {
    key.rfind('/').map_or("", |i| &key[..=i])
}

/// Does an object carry any of the metadata s3fs or s3mount store?
fn has_stored_attrs(meta: &ObjectMeta) -> bool {
    ["mode", "uid", "gid", "mtime", "ctime", "atime", "xattr"]
        .iter()
        .any(|k| meta.metadata.contains_key(*k))
}

impl KnownVersions {
    pub fn new(store: Arc<dyn ObjectStore>) -> Arc<Self> {
        let n = |n: usize| NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN);
        Arc::new(KnownVersions {
            store,
            versions: Mutex::new(LruCache::new(n(VERSIONS))),
            confirming: Mutex::default(),
            slots: Arc::new(tokio::sync::Semaphore::new(CONFIRM_PARALLEL)),
            dirs: Mutex::new(LruCache::new(n(DIRS))),
            mount: Mutex::default(),
        })
    }

    /// Remember the stored metadata of an object version (from a HEAD when `from_server`, else
    /// from this mount's own write).
    /// Every HEAD also counts in the samples (so a directory, or the mount, whose objects do
    /// carry metadata goes back to being confirmed).
    pub fn learn(&self, meta: &ObjectMeta, from_server: bool) {
        if from_server && meta.has_metadata {
            self.sampled(meta);
        }
        if meta.has_metadata && meta.etag.is_some() {
            let k = Known {
                meta: meta.clone(),
                server_time: if from_server {
                    meta.last_modified
                } else {
                    None
                },
            };
            self.versions.lock().put(meta.key.clone(), k);
        }
    }

    /// A listing's entry with the stored metadata of its version, if known.
    pub fn enrich(&self, entry: &DirEntry) -> Option<DirEntry> {
        let listed = entry.meta.as_ref().filter(|m| !m.has_metadata)?;
        let etag = listed.etag.as_ref()?;
        let mut versions = self.versions.lock();
        let k = versions.get(&listed.key)?;
        // A HEAD's Last-Modified has whole seconds, a listing's milliseconds.
        let secs = |t: SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .ok()
        };
        let same = k.meta.etag.as_ref() == Some(etag)
            && k.server_time
                .is_none_or(|t| listed.last_modified.is_none_or(|l| secs(t) == secs(l)));
        if !same {
            versions.pop(&listed.key);
            return None;
        }
        let kind = attrs::kind_from_meta(&k.meta)
            .filter(|k| !k.is_dir())
            .unwrap_or(entry.kind);
        let mut meta = k.meta.clone();
        meta.size = listed.size;
        Some(DirEntry {
            kind,
            meta: Some(meta),
        })
    }

    /// Is the directory of `key` one whose listings are trusted (its sample carried no stored
    /// metadata)?
    pub fn trusts_listings_of(&self, key: &str) -> bool {
        match self.dirs.lock().peek(dir_of(key)) {
            Some(s) if s.with_metadata || s.plain > 0 => s.trust_listings(),
            _ => self.mount.lock().trust_listings(),
        }
    }

    /// The confirmation of `key` under way, if any.
    pub fn confirming(&self, key: &str) -> Option<SharedHead> {
        self.confirming.lock().get(key).cloned()
    }

    /// The HEAD that confirms `key`: the one under way, or a new one (started: it runs to the
    /// end even if nobody waits; skipped if its directory turns out to hold no stored metadata
    /// before its turn comes, unless `always`).
    pub fn confirm(self: &Arc<Self>, key: &str, always: bool) -> SharedHead {
        let mut all = self.confirming.lock();
        if let Some(f) = all.get(key) {
            return f.clone();
        }
        let (me, k) = (self.clone(), key.to_string());
        let fut = async move {
            let _slot = me.slots.clone().acquire_owned().await.ok();
            if !always && me.trusts_listings_of(&k) {
                me.confirming.lock().remove(&k);
                return None;
            }
            let head = me.store.head(&k).await;
            me.confirming.lock().remove(&k);
            match head {
                Ok(meta) => {
                    me.learn(&meta, true);
                    Some(meta)
                }
                Err(e) => {
                    tracing::debug!(key = %k, error = %e, "HEAD confirming a listed entry failed");
                    None
                }
            }
        }
        .boxed()
        .shared();
        all.insert(key.to_string(), fut.clone());
        tokio::spawn(fut.clone());
        fut
    }

    fn sampled(&self, meta: &ObjectMeta) {
        let rich = has_stored_attrs(meta);
        {
            let mut mount = self.mount.lock();
            if rich {
                mount.with_metadata = true;
            } else {
                mount.plain = mount.plain.saturating_add(1);
            }
        }
        let mut dirs = self.dirs.lock();
        let dir = dir_of(&meta.key).to_string();
        let mut s = dirs.get(&dir).copied().unwrap_or_default();
        if rich {
            s.with_metadata = true;
        } else {
            s.plain = s.plain.saturating_add(1);
        }
        if s.trust_listings() && s.plain == SAMPLE {
            tracing::debug!(dir = %dir, "objects here carry no stored metadata: trusting listings");
        }
        dirs.put(dir, s);
    }
}

/// The entry a confirming HEAD found (`None`: the listing's entry stands).
pub fn confirmed_entry(meta: ObjectMeta) -> DirEntry {
    let kind = if attrs::is_directory_content_type(&meta) {
        Kind::Dir
    } else {
        attrs::kind_from_meta(&meta).unwrap_or(Kind::File)
    };
    DirEntry {
        kind,
        meta: Some(meta),
    }
}
