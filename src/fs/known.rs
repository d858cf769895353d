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
//!
//! With `--cache-dir`, what is known is also appended to a file beside the cached blocks
//! (`known-versions`, one line per version) and read back at the next mount, so a bucket
//! written by s3fs costs one HEAD per object version, not one per mount.

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

    /// Has this sample decided (objects carry metadata, or enough of them carry none)?
    fn decided(&self) -> bool {
        self.with_metadata || self.plain >= SAMPLE
    }
}

pub struct KnownVersions {
    store: Arc<dyn ObjectStore>,
    /// Appends every version learnt to the file it was loaded from.
    log: Mutex<Option<std::io::LineWriter<std::fs::File>>>,
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
    /// Versions known so far: none, or those `path` kept from earlier mounts (it is appended to
    /// from now on; an unreadable file is logged and left alone).
    pub fn new(store: Arc<dyn ObjectStore>, path: Option<&std::path::Path>) -> Arc<Self> {
        let n = |n: usize| NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN);
        let mut versions = LruCache::new(n(VERSIONS));
        let log = path.and_then(|p| match persist::load_and_open(p, &mut versions) {
            Ok(log) => Some(log),
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %e, "cannot keep known metadata on disk");
                None
            }
        });
        Arc::new(KnownVersions {
            store,
            log: Mutex::new(log),
            versions: Mutex::new(versions),
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
            if let Some(log) = self.log.lock().as_mut() {
                if let Err(e) = std::io::Write::write_all(log, persist::line(&k).as_bytes()) {
                    tracing::debug!(error = %e, "could not append to the known metadata file");
                }
            }
            self.versions.lock().put(meta.key.clone(), k);
        }
    }

    /// A listing's entry with the stored metadata of its version, if known.
    pub fn enrich(&self, entry: &DirEntry) -> Option<DirEntry> {
        self.with_known(entry, |k, listed| {
            let mut meta = k.meta.clone();
            meta.size = listed.size;
            DirEntry {
                kind: Self::kind_of(k, entry),
                meta: Some(meta),
            }
        })
    }

    /// The kind a listed entry's known version says (a symlink, a FIFO), without copying its
    /// metadata (readdir asks this of every entry for `d_type`).
    pub fn known_kind(&self, entry: &DirEntry) -> Option<Kind> {
        self.with_known(entry, |k, _| Self::kind_of(k, entry))
    }

    fn kind_of(k: &Known, entry: &DirEntry) -> Kind {
        attrs::kind_from_meta(&k.meta)
            .filter(|k| !k.is_dir())
            .unwrap_or(entry.kind)
    }

    /// `f` of the known version of a listing's entry, if it is the version listed (a known
    /// version that is not is forgotten).
    fn with_known<T>(
        &self,
        entry: &DirEntry,
        f: impl FnOnce(&Known, &ObjectMeta) -> T,
    ) -> Option<T> {
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
        Some(f(k, listed))
    }

    /// Is the directory of `key` one whose listings are trusted (its sample carried no stored
    /// metadata)?
    pub fn trusts_listings_of(&self, key: &str) -> bool {
        match self.dirs.lock().peek(dir_of(key)) {
            Some(s) if s.with_metadata || s.plain > 0 => s.trust_listings(),
            _ => self.mount.lock().trust_listings(),
        }
    }

    /// Is it decided whether listings of the directory `dir` (a prefix ending in `/`) are
    /// trusted, by its own sample or, when it has none yet, the mount's?
    pub fn decided_for(&self, dir: &str) -> bool {
        match self.dirs.lock().peek(dir) {
            Some(s) if s.with_metadata || s.plain > 0 => s.decided(),
            _ => self.mount.lock().decided(),
        }
    }

    /// How many objects a sample takes.
    pub fn sample_size(&self) -> usize {
        SAMPLE as usize
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

/// The `known-versions` file: one line per version, tab-separated, every field %-escaped:
/// key, ETag, server LastModified (seconds, or `-`), Content-Type (or `-`), size, then
/// `name=value` pairs of the stored metadata. Later lines win; a malformed line is skipped.
mod persist {
    use std::io::{BufRead, Write};
    use std::path::Path;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use lru::LruCache;

    use super::{Known, VERSIONS};
    use crate::store::ObjectMeta;

    fn esc(s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        for c in s.chars() {
            match c {
                '%' | '\t' | '\n' | '\r' | '=' => out.push_str(&format!("%{:02X}", c as u32)),
                c => out.push(c),
            }
        }
        out
    }

    fn unesc(s: &str) -> Option<String> {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).ok()
    }

    pub fn line(k: &Known) -> String {
        let m = &k.meta;
        let secs = |t: Option<SystemTime>| {
            t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or("-".to_string(), |d| d.as_secs().to_string())
        };
        let mut l = format!(
            "{}\t{}\t{}\t{}\t{}",
            esc(&m.key),
            esc(m.etag.as_deref().unwrap_or("")),
            secs(k.server_time),
            m.content_type.as_deref().map_or("-".to_string(), esc),
            m.size
        );
        for (name, value) in &m.metadata {
            l.push_str(&format!("\t{}={}", esc(name), esc(value)));
        }
        l.push('\n');
        l
    }

    fn parse(line: &str) -> Option<Known> {
        let mut f = line.split('\t');
        let key = unesc(f.next()?)?;
        let etag = unesc(f.next()?)?;
        let server_time = match f.next()? {
            "-" => None,
            s => Some(UNIX_EPOCH + Duration::from_secs(s.parse().ok()?)),
        };
        let content_type = match f.next()? {
            "-" => None,
            s => Some(unesc(s)?),
        };
        let size = f.next()?.parse().ok()?;
        let mut metadata = crate::store::UserMetadata::new();
        for pair in f {
            let (n, v) = pair.split_once('=')?;
            metadata.insert(unesc(n)?, unesc(v)?);
        }
        Some(Known {
            meta: ObjectMeta {
                key,
                size,
                etag: (!etag.is_empty()).then_some(etag),
                last_modified: server_time,
                content_type,
                metadata,
                has_metadata: true,
                checksum_crc32: None,
            },
            server_time,
        })
    }

    /// Read what earlier mounts kept into `versions`, then open the file for appending
    /// (rewritten first when it holds far more lines than versions are kept).
    pub fn load_and_open(
        path: &Path,
        versions: &mut LruCache<String, Known>,
    ) -> std::io::Result<std::io::LineWriter<std::fs::File>> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut lines = 0usize;
        if let Ok(f) = std::fs::File::open(path) {
            for line in std::io::BufReader::new(f).lines() {
                let line = line?;
                lines += 1;
                if let Some(k) = parse(&line) {
                    versions.put(k.meta.key.clone(), k);
                }
            }
        }
        if lines > 2 * VERSIONS {
            let tmp = path.with_extension("tmp");
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            // Oldest first, so the order of use survives the next load.
            for (_, k) in versions.iter().rev() {
                out.write_all(line(k).as_bytes())?;
            }
            std::fs::rename(&tmp, path)?;
        }
        let f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)?;
        Ok(std::io::LineWriter::new(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mock::MockStore;

    #[test]
    fn versions_survive_a_remount_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known-versions");
        let store: Arc<dyn ObjectStore> = Arc::new(MockStore::new());
        let mut meta = ObjectMeta {
            key: "dir/we\tird=name%".into(),
            size: 4,
            etag: Some("\"e1\"".into()),
            last_modified: Some(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
            ),
            has_metadata: true,
            ..Default::default()
        };
        meta.metadata.insert("mode".into(), "41471".into());
        meta.metadata.insert("xattr".into(), "%7B%7D".into());
        {
            let k = KnownVersions::new(store.clone(), Some(&path));
            k.learn(&meta, true);
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"garbage line\n"))
            .unwrap();
        let k = KnownVersions::new(store, Some(&path));
        let listed = DirEntry {
            kind: Kind::File,
            meta: Some(ObjectMeta {
                has_metadata: false,
                metadata: Default::default(),
                last_modified: Some(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_250),
                ),
                ..meta.clone()
            }),
        };
        let e = k.enrich(&listed).expect("known after the remount");
        assert_eq!(e.kind, Kind::Symlink);
        assert_eq!(e.meta.unwrap().metadata, meta.metadata);
    }
}
