//! Block cache: recently read bytes in memory (LRU, charged to the global budget) and, with
//! `--cache-dir`, 1 MiB blocks on local disk that survive a remount.
//!
//! Everything is keyed by object key *and* ETag, so a replaced object never hits its old bytes.
//! Every disk block carries a header with a CRC32 (crc32fast) over the header fields and the data,
//! the object key, the ETag and the block number: a block that does not match what was asked for,
//! or whose CRC does not match its bytes, is deleted and reported as a miss — never returned.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use lru::LruCache;
use parking_lot::Mutex;

use super::budget::{Budget, Reservation};
use crate::store::ByteRange;

/// Size (and alignment) of the blocks kept on disk.
pub const BLOCK: u64 = 1 << 20;

const MAGIC: &[u8; 8] = b"S3MBLK01";
/// Magic, CRC32, block number, data length, key length, ETag length.
const HEADER_FIXED: usize = 8 + 4 + 8 + 4 + 4 + 4;
/// Disk writes in flight at once; more blocks than that waiting are not cached (a cache may skip).
const MAX_PENDING_WRITES: usize = 16;

/// One version of one object: the key and the ETag it had when read.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ObjectId {
    pub key: Arc<str>,
    pub etag: Arc<str>,
}

impl ObjectId {
    pub fn new(key: &str, etag: &str) -> Self {
        ObjectId {
            key: key.into(),
            etag: etag.into(),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct CacheConfig {
    /// Bytes the memory cache may hold (taken from the global budget while held).
    pub memory_bytes: u64,
    /// The persistent cache, if any.
    pub disk: Option<DiskCacheConfig>,
}

#[derive(Clone, Debug)]
pub struct DiskCacheConfig {
    /// Directory given by the user; blocks go to a subdirectory per bucket (`namespace`).
    pub dir: PathBuf,
    pub max_bytes: u64,
    /// What separates caches of different buckets/endpoints sharing one directory.
    pub namespace: String,
}

struct MemEntry {
    end: u64,
    data: Bytes,
    _reservation: Reservation,
}

struct MemCache {
    lru: LruCache<(ObjectId, u64), MemEntry>,
    /// Per object version: start -> end of the ranges held.
    index: HashMap<ObjectId, BTreeMap<u64, u64>>,
    bytes: u64,
}

impl MemCache {
    fn pop_lru(&mut self) -> Option<u64> {
        let ((obj, start), e) = self.lru.pop_lru()?;
        self.unindex(&obj, start);
        self.bytes -= e.data.len() as u64;
        crate::metrics::cache_evicted("memory", 1);
        Some(e.data.len() as u64)
    }

    fn unindex(&mut self, obj: &ObjectId, start: u64) {
        if let Some(m) = self.index.get_mut(obj) {
            m.remove(&start);
            if m.is_empty() {
                self.index.remove(obj);
            }
        }
    }
}

pub struct BlockCache {
    memory_limit: u64,
    budget: Arc<Budget>,
    mem: Mutex<MemCache>,
    disk: Option<Arc<DiskCache>>,
}

impl std::fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCache")
            .field("memory_limit", &self.memory_limit)
            .field("disk", &self.disk.as_ref().map(|d| &d.dir))
            .finish()
    }
}

impl BlockCache {
    /// Open the cache; with a disk part, its directory is created (0700), locked against a second
    /// mount using it, and its index rebuilt from the blocks already there.
    pub fn new(cfg: &CacheConfig, budget: Arc<Budget>) -> std::io::Result<Arc<Self>> {
        let disk = match &cfg.disk {
            Some(d) => Some(Arc::new(DiskCache::open(d)?)),
            None => None,
        };
        Ok(Arc::new(BlockCache {
            memory_limit: cfg.memory_bytes,
            budget,
            mem: Mutex::new(MemCache {
                lru: LruCache::unbounded(),
                index: HashMap::new(),
                bytes: 0,
            }),
            disk,
        }))
    }

    /// Where the stored metadata this mount knows per object version is kept across remounts:
    /// beside the blocks, in the directory this mount holds locked (None without a disk cache).
    pub fn known_versions_path(&self) -> Option<PathBuf> {
        self.disk.as_ref().map(|d| d.dir.join("known-versions"))
    }

    /// A cache that keeps nothing.
    pub fn disabled(budget: Arc<Budget>) -> Arc<Self> {
        Self::new(&CacheConfig::default(), budget).expect("no disk cache, nothing to fail")
    }

    /// Bytes held in memory now.
    pub fn memory_used(&self) -> u64 {
        self.mem.lock().bytes
    }

    /// Is there a disk cache (which keeps whole blocks only)?
    pub fn has_disk(&self) -> bool {
        self.disk.is_some()
    }

    /// Blocks on disk now and their total size.
    pub fn disk_usage(&self) -> Option<(usize, u64)> {
        self.disk.as_ref().map(|d| {
            let idx = d.index.lock();
            (idx.lru.len(), idx.bytes)
        })
    }

    /// Bytes held in memory covering `pos`: the whole cached range and its data (counts as a use).
    pub fn lookup_memory(&self, obj: &ObjectId, pos: u64) -> Option<(ByteRange, Bytes)> {
        let found = self.find_memory(obj, pos, true);
        let bytes = found.as_ref().map_or(0, |(_, d)| d.len() as u64);
        crate::metrics::cache_lookup("memory", found.is_some(), bytes);
        found
    }

    fn find_memory(&self, obj: &ObjectId, pos: u64, used: bool) -> Option<(ByteRange, Bytes)> {
        let mut mem = self.mem.lock();
        let start = {
            let ranges = mem.index.get(obj)?;
            // Ranges may overlap; the one starting last before `pos` usually covers it.
            ranges
                .range(..=pos)
                .rev()
                .take(4)
                .find(|(_, &end)| end > pos)
                .map(|(&s, _)| s)?
        };
        let key = (obj.clone(), start);
        let e = if used {
            mem.lru.get(&key)?
        } else {
            mem.lru.peek(&key)?
        };
        Some((ByteRange::new(start, e.end), e.data.clone()))
    }

    /// Is block `block` of the object on disk (as far as the index knows)?
    pub fn on_disk(&self, obj: &ObjectId, block: u64) -> bool {
        self.disk.as_ref().is_some_and(|d| d.contains(obj, block))
    }

    /// Is anything for `pos` cached (memory or disk)?
    pub fn contains(&self, obj: &ObjectId, pos: u64) -> bool {
        self.find_memory(obj, pos, false).is_some() || self.on_disk(obj, pos / BLOCK)
    }

    /// Read block `block` from disk, verified; `None` when it is missing or damaged (then it is
    /// deleted). `len` is the block's expected length (shorter only at the end of the object).
    pub async fn read_disk(&self, obj: &ObjectId, block: u64, len: u64) -> Option<Bytes> {
        let disk = self.disk.clone()?;
        let obj = obj.clone();
        let got = tokio::task::spawn_blocking(move || disk.read(&obj, block, len))
            .await
            .ok()
            .flatten();
        crate::metrics::cache_lookup(
            "disk",
            got.is_some(),
            got.as_ref().map_or(0, |b| b.len() as u64),
        );
        got
    }

    /// Keep bytes `range` of an object just fetched: in memory, and their whole blocks on disk.
    /// `size` is the object's size (a block ending there may be short). `crcs`, when known, are
    /// the CRC32s of the range's pieces between block boundaries (see `PieceCrcs`): blocks
    /// written to disk take theirs instead of hashing the data again.
    pub fn insert(
        self: &Arc<Self>,
        obj: &ObjectId,
        range: ByteRange,
        data: &Bytes,
        size: u64,
        crcs: Option<&[u32]>,
    ) {
        if data.len() as u64 != range.len() || range.is_empty() {
            return;
        }
        self.insert_memory(obj, range, data);
        if let Some(disk) = &self.disk {
            let mut b = range.start.div_ceil(BLOCK);
            while b * BLOCK < range.end {
                let (from, to) = (b * BLOCK, ((b + 1) * BLOCK).min(size));
                if to > range.end {
                    break;
                }
                if !disk.contains(obj, b) {
                    let slice =
                        data.slice((from - range.start) as usize..(to - range.start) as usize);
                    let crc = crcs.and_then(|c| c.get((b - range.start / BLOCK) as usize));
                    disk.write_later(obj.clone(), b, slice, crc.copied(), &self.budget);
                }
                b += 1;
            }
        }
    }

    fn insert_memory(&self, obj: &ObjectId, range: ByteRange, data: &Bytes) {
        let len = range.len();
        if len > self.memory_limit / 4 {
            return;
        }
        let mut mem = self.mem.lock();
        if mem
            .index
            .get(obj)
            .and_then(|m| m.get(&range.start))
            .is_some_and(|&end| end >= range.end)
        {
            return;
        }
        while mem.bytes + len > self.memory_limit {
            if mem.pop_lru().is_none() {
                return;
            }
        }
        let reservation = loop {
            match self.budget.try_reserve(len) {
                Some(r) => break r,
                // The budget is needed for I/O in flight: the cache gives way.
                None => {
                    if mem.pop_lru().is_none() {
                        return;
                    }
                }
            }
        };
        let key = (obj.clone(), range.start);
        if let Some(old) = mem.lru.put(
            key,
            MemEntry {
                end: range.end,
                data: data.clone(),
                _reservation: reservation,
            },
        ) {
            mem.bytes -= old.data.len() as u64;
        }
        mem.bytes += len;
        mem.index
            .entry(obj.clone())
            .or_default()
            .insert(range.start, range.end);
    }

    /// Give up to `bytes` of memory back to the budget (prefetch needs it more than the cache).
    pub fn shrink(&self, bytes: u64) {
        let mut mem = self.mem.lock();
        let mut freed = 0;
        while freed < bytes {
            match mem.pop_lru() {
                Some(n) => freed += n,
                None => break,
            }
        }
    }

    /// Drop everything cached for this object version (its bytes failed verification).
    pub fn forget(&self, obj: &ObjectId, size: u64) {
        {
            let mut mem = self.mem.lock();
            if let Some(starts) = mem.index.remove(obj) {
                for start in starts.keys() {
                    if let Some(e) = mem.lru.pop(&(obj.clone(), *start)) {
                        mem.bytes -= e.data.len() as u64;
                    }
                }
            }
        }
        if let Some(disk) = &self.disk {
            for b in 0..size.div_ceil(BLOCK) {
                disk.remove(obj, b);
            }
        }
    }
}

/// The persistent part: one file per block under `<dir>/<namespace hash>/<xx>/`.
struct DiskCache {
    dir: PathBuf,
    max_bytes: u64,
    index: Mutex<DiskIndex>,
    pending: std::sync::atomic::AtomicUsize,
    /// Held for the life of the cache: a second mount on the same directory is refused.
    _lock: File,
}

struct DiskIndex {
    /// Relative path -> size on disk, least recently used first.
    lru: LruCache<String, u64>,
    bytes: u64,
}

/// FNV-1a, 64 bit: stable across builds and versions (file names must not change).
fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn block_name(obj: &ObjectId, block: u64) -> String {
    let h = fnv64(&[obj.key.as_bytes(), obj.etag.as_bytes()]);
    format!("{:02x}/{h:016x}-{block}", h >> 56)
}

/// The header of a block file whose data (`len` bytes, CRC32 `data_crc`) follows it: the CRC32
/// it carries covers the rest of the header and the data, combined without reading the data.
fn header(obj: &ObjectId, block: u64, len: usize, data_crc: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_FIXED + obj.key.len() + obj.etag.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&(obj.key.len() as u32).to_le_bytes());
    out.extend_from_slice(&(obj.etag.len() as u32).to_le_bytes());
    out.extend_from_slice(obj.key.as_bytes());
    out.extend_from_slice(obj.etag.as_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&out[12..]);
    h.combine(&crc32fast::Hasher::new_with_initial_len(
        data_crc, len as u64,
    ));
    let crc = h.finalize();
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The data of a block file, if it is intact and is block `block` of `obj`.
fn decode(buf: Vec<u8>, obj: &ObjectId, block: u64) -> Result<Bytes, &'static str> {
    if buf.len() < HEADER_FIXED || &buf[..8] != MAGIC {
        return Err("not a cache block");
    }
    let u32_at = |o: usize| u32::from_le_bytes(buf[o..o + 4].try_into().unwrap()) as usize;
    let crc = u32_at(8) as u32;
    if crc32fast::hash(&buf[12..]) != crc {
        return Err("CRC32 mismatch");
    }
    let stored_block = u64::from_le_bytes(buf[12..20].try_into().unwrap());
    let (len, klen, elen) = (u32_at(20), u32_at(24), u32_at(28));
    if buf.len() != HEADER_FIXED + klen + elen + len {
        return Err("length mismatch");
    }
    let key = &buf[HEADER_FIXED..HEADER_FIXED + klen];
    let etag = &buf[HEADER_FIXED + klen..HEADER_FIXED + klen + elen];
    if stored_block != block || key != obj.key.as_bytes() || etag != obj.etag.as_bytes() {
        return Err("block of another object");
    }
    let start = HEADER_FIXED + klen + elen;
    Ok(Bytes::from(buf).slice(start..))
}

impl DiskCache {
    fn open(cfg: &DiskCacheConfig) -> std::io::Result<Self> {
        let dir = namespace_dir(cfg);
        super::staging::prepare_dir(&cfg.dir)?;
        super::staging::prepare_dir(&dir)?;
        let Some(lock) = super::staging::lock_dir(&dir)? else {
            return Err(std::io::Error::other(format!(
                "cache directory {} is in use by another s3mount (give each mount its own --cache-dir)",
                cfg.dir.display()
            )));
        };
        let cache = DiskCache {
            index: Mutex::new(DiskIndex {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            dir,
            max_bytes: cfg.max_bytes,
            pending: Default::default(),
            _lock: lock,
        };
        cache.rebuild()?;
        Ok(cache)
    }

    /// Index the blocks a previous mount left, oldest use first; drop unfinished writes.
    fn rebuild(&self) -> std::io::Result<()> {
        let mut found: Vec<(SystemTime, String, u64)> = Vec::new();
        for sub in std::fs::read_dir(&self.dir)? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            let sub_name = sub.file_name().to_string_lossy().into_owned();
            for f in std::fs::read_dir(sub.path())? {
                let f = f?;
                let name = f.file_name().to_string_lossy().into_owned();
                let meta = f.metadata()?;
                if name.contains(".tmp") || !meta.is_file() {
                    let _ = std::fs::remove_file(f.path());
                    continue;
                }
                let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((used, format!("{sub_name}/{name}"), meta.len()));
            }
        }
        found.sort();
        let mut idx = self.index.lock();
        for (_, name, size) in found {
            idx.bytes += size;
            idx.lru.put(name, size);
        }
        drop(idx);
        self.evict();
        Ok(())
    }

    fn contains(&self, obj: &ObjectId, block: u64) -> bool {
        self.index.lock().lru.contains(&block_name(obj, block))
    }

    fn read(&self, obj: &ObjectId, block: u64, len: u64) -> Option<Bytes> {
        let name = block_name(obj, block);
        self.index.lock().lru.get(&name)?;
        let path = self.dir.join(&name);
        let result = std::fs::read(&path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    "missing"
                } else {
                    "unreadable"
                }
            })
            .and_then(|buf| decode(buf, obj, block))
            .and_then(|d| {
                if d.len() as u64 == len {
                    Ok(d)
                } else {
                    Err("wrong length")
                }
            });
        match result {
            Ok(d) => {
                // Remember the use across remounts (the index is rebuilt by modification time).
                if let Ok(f) = File::options().write(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                Some(d)
            }
            Err(why) => {
                tracing::warn!(key = %obj.key, block, file = %path.display(), "disk cache block rejected ({why}); fetching it again");
                self.remove(obj, block);
                None
            }
        }
    }

    fn remove(&self, obj: &ObjectId, block: u64) {
        let name = block_name(obj, block);
        let removed = {
            let mut idx = self.index.lock();
            let r = idx.lru.pop(&name);
            if let Some(n) = r {
                idx.bytes -= n;
            }
            r.is_some()
        };
        if removed {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
    }

    /// Write a block in the background (a full write queue or budget skips it: it is a cache).
    fn write_later(
        self: &Arc<Self>,
        obj: ObjectId,
        block: u64,
        data: Bytes,
        crc: Option<u32>,
        budget: &Arc<Budget>,
    ) {
        use std::sync::atomic::Ordering;
        if self.pending.fetch_add(1, Ordering::AcqRel) >= MAX_PENDING_WRITES {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let Some(reservation) = budget.try_reserve(data.len() as u64) else {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return;
        };
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let crc = crc.unwrap_or_else(|| crc32fast::hash(&data));
            if let Err(e) = me.write(&obj, block, &data, crc) {
                tracing::warn!(key = %obj.key, block, dir = %me.dir.display(), "cannot write disk cache block: {e}");
            }
            drop(reservation);
            me.pending.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// Store block `block` of `obj`, whose CRC32 is `crc`.
    fn write(&self, obj: &ObjectId, block: u64, data: &[u8], crc: u32) -> std::io::Result<()> {
        let name = block_name(obj, block);
        let path = self.dir.join(&name);
        // The cache directory itself is made at mount; if it was removed since, it stays gone.
        if !self.dir.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the cache directory was removed",
            ));
        }
        if let Some(parent) = path.parent() {
            super::staging::prepare_dir(parent)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let head = header(obj, block, data.len(), crc);
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&head)?;
            f.write_all(data)?;
            std::fs::rename(&tmp, &path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
            return written;
        }
        {
            let mut idx = self.index.lock();
            let file_len = (head.len() + data.len()) as u64;
            if let Some(old) = idx.lru.put(name, file_len) {
                idx.bytes -= old;
            }
            idx.bytes += file_len;
        }
        self.evict();
        Ok(())
    }

    fn evict(&self) {
        loop {
            let victim = {
                let mut idx = self.index.lock();
                if idx.bytes <= self.max_bytes {
                    return;
                }
                match idx.lru.pop_lru() {
                    Some((name, size)) => {
                        idx.bytes -= size;
                        name
                    }
                    None => return,
                }
            };
            let _ = std::fs::remove_file(self.dir.join(victim));
            crate::metrics::cache_evicted("disk", 1);
        }
    }
}

/// The subdirectory of `--cache-dir` holding one bucket's blocks.
fn namespace_dir(cfg: &DiskCacheConfig) -> PathBuf {
    cfg.dir
        .join(format!("{:016x}", fnv64(&[cfg.namespace.as_bytes()])))
}

/// Path of the file holding a block (tests corrupt it on purpose).
pub fn block_path(cfg: &DiskCacheConfig, obj: &ObjectId, block: u64) -> PathBuf {
    namespace_dir(cfg).join(block_name(obj, block))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj() -> ObjectId {
        ObjectId::new("dir/file", "\"etag1\"")
    }

    fn disk_cfg(dir: &std::path::Path, max: u64) -> CacheConfig {
        CacheConfig {
            memory_bytes: 8 << 20,
            disk: Some(DiskCacheConfig {
                dir: dir.to_path_buf(),
                max_bytes: max,
                namespace: "http://127.0.0.1:1|bucket".into(),
            }),
        }
    }

    async fn settle(c: &BlockCache, blocks: usize) {
        for _ in 0..500 {
            if c.disk_usage().unwrap().0 >= blocks {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("blocks not written: {:?}", c.disk_usage());
    }

    fn body(n: usize, seed: u8) -> Bytes {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<_>>()
            .into()
    }

    #[test]
    fn memory_cache_is_bounded_and_keyed_by_etag() {
        let budget = Budget::new(1 << 30);
        let c = BlockCache::new(
            &CacheConfig {
                memory_bytes: 4 << 20,
                disk: None,
            },
            budget.clone(),
        )
        .unwrap();
        let o = obj();
        for i in 0..8u64 {
            c.insert(
                &o,
                ByteRange::new(i << 20, (i + 1) << 20),
                &body(1 << 20, i as u8),
                64 << 20,
                None,
            );
        }
        assert!(c.memory_used() <= 4 << 20);
        assert_eq!(budget.used(), c.memory_used());
        // The newest survive, the oldest went.
        let (r, d) = c.lookup_memory(&o, (7 << 20) + 5).unwrap();
        assert_eq!(r, ByteRange::new(7 << 20, 8 << 20));
        assert_eq!(d, body(1 << 20, 7));
        assert!(c.lookup_memory(&o, 5).is_none());
        assert!(c
            .lookup_memory(&ObjectId::new("dir/file", "\"etag2\""), (7 << 20) + 5)
            .is_none());
        c.forget(&o, 64 << 20);
        assert_eq!(c.memory_used(), 0);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn memory_cache_gives_way_to_the_budget() {
        let budget = Budget::new(3 << 20);
        let c = BlockCache::new(
            &CacheConfig {
                memory_bytes: 64 << 20,
                disk: None,
            },
            budget.clone(),
        )
        .unwrap();
        let o = obj();
        for i in 0..3u64 {
            c.insert(
                &o,
                ByteRange::new(i << 20, (i + 1) << 20),
                &body(1 << 20, 0),
                64 << 20,
                None,
            );
        }
        let held = budget.reserve_required(1 << 20);
        c.insert(
            &o,
            ByteRange::new(3 << 20, 4 << 20),
            &body(1 << 20, 0),
            64 << 20,
            None,
        );
        assert!(budget.used() <= 3 << 20, "{}", budget.used());
        c.shrink(u64::MAX);
        assert_eq!(budget.used(), 1 << 20);
        drop(held);
    }

    #[tokio::test]
    async fn disk_blocks_survive_reopen_and_damage_is_a_miss() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let cfg = disk_cfg(&dir, 64 << 20);
        let o = obj();
        let size = (2 << 20) + 1000;
        let data = body(size as usize, 3);
        {
            let c = BlockCache::new(&cfg, Budget::new(1 << 30)).unwrap();
            // A second mount on the same directory is refused while this one holds it.
            let err = BlockCache::new(&cfg, Budget::new(1 << 30)).unwrap_err();
            assert!(err.to_string().contains("in use"), "{err}");
            // With the CRC32s of its pieces, as a verifying reader's GET brings them.
            let crcs = crate::store::piece_crcs(&data, 0, BLOCK);
            c.insert(&o, ByteRange::new(0, size), &data, size, Some(&crcs));
            settle(&c, 3).await;
        }
        let c = BlockCache::new(&cfg, Budget::new(1 << 30)).unwrap();
        assert_eq!(c.disk_usage().unwrap().0, 3);
        assert!(c.on_disk(&o, 2));
        let last = c.read_disk(&o, 2, 1000).await.unwrap();
        assert_eq!(&last[..], &data[2 << 20..]);
        // Another ETag never reads these blocks.
        assert!(c
            .read_disk(&ObjectId::new("dir/file", "other"), 0, 1 << 20)
            .await
            .is_none());

        // Modes: 0700 directories, 0600 files.
        use std::os::unix::fs::PermissionsExt;
        let path = block_path(cfg.disk.as_ref().unwrap(), &o, 1);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        for d in [
            &dir,
            path.parent().unwrap(),
            path.parent().unwrap().parent().unwrap(),
        ] {
            assert_eq!(
                std::fs::metadata(d).unwrap().permissions().mode() & 0o777,
                0o700,
                "{}",
                d.display()
            );
        }
        // Flip one data byte: the block is rejected and deleted, never returned.
        let mut raw = std::fs::read(&path).unwrap();
        let n = raw.len();
        raw[n - 10] ^= 0x40;
        std::fs::write(&path, &raw).unwrap();
        assert!(c.read_disk(&o, 1, 1 << 20).await.is_none());
        assert!(!path.exists());
        assert!(!c.on_disk(&o, 1));
        // Block 0 is still good.
        assert_eq!(
            &c.read_disk(&o, 0, 1 << 20).await.unwrap()[..],
            &data[..1 << 20]
        );
    }

    #[tokio::test]
    async fn disk_cache_evicts_least_recently_used() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = disk_cfg(tmp.path(), (3 << 20) + 4096);
        let c = BlockCache::new(&cfg, Budget::new(1 << 30)).unwrap();
        let size = 8u64 << 20;
        let data = body(size as usize, 1);
        for b in 0..3u64 {
            c.insert(
                &obj(),
                ByteRange::new(b << 20, (b + 1) << 20),
                &data.slice((b << 20) as usize..((b + 1) << 20) as usize),
                size,
                None,
            );
            settle(&c, b as usize + 1).await;
        }
        // Use block 0, then add block 3: block 1 (least recently used) goes.
        assert!(c.read_disk(&obj(), 0, 1 << 20).await.is_some());
        c.insert(
            &obj(),
            ByteRange::new(3 << 20, 4 << 20),
            &data.slice(3 << 20..4 << 20),
            size,
            None,
        );
        for _ in 0..500 {
            if c.on_disk(&obj(), 3) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(c.on_disk(&obj(), 3) && c.on_disk(&obj(), 0));
        assert!(!c.on_disk(&obj(), 1));
        assert!(c.disk_usage().unwrap().1 <= (3 << 20) + 4096);
    }

    #[tokio::test]
    async fn a_block_written_with_a_wrong_crc_is_never_read() {
        // The CRC32 a GET computed is what the block file carries: a wrong one makes the block
        // a miss, so a mistake there can cost a fetch but never return bad bytes.
        let tmp = tempfile::tempdir().unwrap();
        let cfg = disk_cfg(tmp.path(), 64 << 20);
        let c = BlockCache::new(&cfg, Budget::new(1 << 30)).unwrap();
        let data = body(2 << 20, 5);
        let mut crcs = crate::store::piece_crcs(&data, 0, BLOCK);
        crcs[1] ^= 1;
        c.insert(
            &obj(),
            ByteRange::new(0, 2 << 20),
            &data,
            2 << 20,
            Some(&crcs),
        );
        settle(&c, 2).await;
        assert_eq!(
            &c.read_disk(&obj(), 0, 1 << 20).await.unwrap()[..],
            &data[..1 << 20]
        );
        assert!(c.read_disk(&obj(), 1, 1 << 20).await.is_none());
    }
}
