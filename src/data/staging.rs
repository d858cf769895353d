//! Local staging for modifying an existing object in place (pwrite anywhere, truncate, holes).
//!
//! Only the changed bytes are kept locally, in a sparse file (mode 0600 in a 0700 directory);
//! unchanged bytes stay in the bucket. On commit, parts that are untouched and lie within the
//! original object are copied server side (UploadPartCopy pinned to the original ETag), and only
//! parts with changes are assembled (changed bytes from the file, the rest from ranged GETs) and
//! uploaded. Appending 1 MiB to a 1 GiB object therefore uploads about 1 MiB.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::budget::{Budget, Reservation};
use super::commit::{
    abort_upload, complete_checked, put_checked, upload_part_checked, Capabilities, PartCrcs,
    UploadConfig, MAX_PART, MAX_PARTS, MIN_PART,
};
use crate::store::{
    ByteRange, CompletedPart, ObjectStore, PutOptions, PutResult, StoreError, StoreResult,
};

/// A part of a staged commit once uploaded or copied: the part, and its CRC32 with its length
/// when the bytes went through this machine.
type PartDone = (CompletedPart, Option<(u32, u64)>);

/// Lock `dir` for this process: `dir/lock` (0600) held with flock for as long as the returned
/// file is open. `None` when another process (or another open of it here) holds it.
pub fn lock_dir(dir: &Path) -> std::io::Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(dir.join("lock"))?;
    // SAFETY: flock on a descriptor this function owns; LOCK_NB never blocks.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(lock));
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(err)
    }
}

/// Create the staging directory (0700) if needed.
pub fn prepare_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Half-open byte ranges, kept merged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        let overlapping: Vec<(u64, u64)> = self
            .ranges
            .range(..=end)
            .filter(|(&a, &b)| b >= start && a <= end)
            .map(|(&a, &b)| (a, b))
            .collect();
        for (a, b) in overlapping {
            s = s.min(a);
            e = e.max(b);
            self.ranges.remove(&a);
        }
        self.ranges.insert(s, e);
    }

    /// Drop everything at or beyond `at`.
    pub fn truncate(&mut self, at: u64) {
        let cut: Vec<(u64, u64)> = self
            .ranges
            .range(..)
            .filter(|(_, &b)| b > at)
            .map(|(&a, &b)| (a, b))
            .collect();
        for (a, _) in &cut {
            self.ranges.remove(a);
        }
        if let Some((a, _)) = cut.first() {
            if *a < at {
                self.ranges.insert(*a, at);
            }
        }
    }

    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.ranges.range(..end).any(|(_, &b)| b > start)
    }

    /// The pieces of `[start, end)`: (range, is it in the set).
    pub fn split(&self, start: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let mut out = Vec::new();
        let mut pos = start;
        for (&a, &b) in self.ranges.range(..end) {
            if b <= pos {
                continue;
            }
            if a > pos {
                out.push((pos, a.min(end), false));
            }
            out.push((a.max(pos), b.min(end), true));
            pos = b.min(end);
            if pos >= end {
                break;
            }
        }
        if pos < end {
            out.push((pos, end, false));
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn total(&self) -> u64 {
        self.ranges.iter().map(|(a, b)| b - a).sum()
    }
}

/// The original object a staged file modifies.
#[derive(Clone, Debug)]
pub struct Base {
    pub key: String,
    pub etag: String,
    pub size: u64,
}

pub struct StagedFile {
    file: std::fs::File,
    path: PathBuf,
    dirty: RangeSet,
    size: u64,
    base: Base,
    /// Bytes of the original object still part of the file (shrinks with truncation).
    base_valid: u64,
}

impl StagedFile {
    /// Bytes changed locally and not yet in the bucket.
    pub fn changed_bytes(&self) -> u64 {
        self.dirty.total()
    }

    pub fn create(dir: &Path, base: Base) -> std::io::Result<StagedFile> {
        prepare_dir(dir)?;
        let name = format!(
            "{}-{}.staged",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        // A sidecar names the object, so changes left by a crash can be matched to it.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(sidecar(&path))
            .and_then(|mut f| {
                std::io::Write::write_all(
                    &mut f,
                    format!(
                        "key: {}\netag: {}\nsize: {}\n",
                        base.key, base.etag, base.size
                    )
                    .as_bytes(),
                )
            })?;
        Ok(StagedFile::over(file, path, base))
    }

    /// `file` at `path` holding no change yet over `base`.
    fn over(file: std::fs::File, path: PathBuf, base: Base) -> StagedFile {
        StagedFile {
            file,
            path,
            dirty: RangeSet::default(),
            size: base.size,
            base_valid: base.size,
            base,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)?;
        self.dirty.insert(offset, offset + data.len() as u64);
        self.size = self.size.max(offset + data.len() as u64);
        Ok(())
    }

    /// Set the size: bytes beyond it are dropped; growing adds zeros.
    pub fn truncate(&mut self, size: u64) -> std::io::Result<()> {
        if size != self.size {
            self.file.set_len(size)?;
        }
        self.resized(size);
        Ok(())
    }

    /// What a truncation to `size` changes in the bookkeeping (the file itself is already cut).
    fn resized(&mut self, size: u64) {
        if size < self.size {
            self.dirty.truncate(size);
            self.base_valid = self.base_valid.min(size);
        } else if size > self.size {
            // The gap reads as zeros: mark it dirty so it is never taken from the old object.
            self.dirty.insert(self.size, size);
        }
        self.size = size;
    }

    /// Take over a staging file a process that died left (a worker restarted on a live mount,
    /// `--supervise`): the file at `path` over `base`, with the writes and truncations it saw
    /// in order (`Some(len)` at an offset: a write; `None`: a truncation to the offset).
    pub fn adopt(
        path: PathBuf,
        base: Base,
        changes: &[(u64, Option<u64>)],
    ) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        let mut staged = StagedFile::over(file, path, base);
        for &(offset, len) in changes {
            match len {
                Some(len) => {
                    staged.dirty.insert(offset, offset + len);
                    staged.size = staged.size.max(offset + len);
                }
                None => staged.resized(offset),
            }
        }
        Ok(staged)
    }

    /// Copy every byte still taken from the original object into the local file, so the file
    /// no longer needs the object (which is about to be deleted: a file unlinked while open).
    /// Reads at most 8 MiB at a time.
    pub async fn materialize(&mut self, store: &dyn ObjectStore) -> StoreResult<()> {
        const CHUNK: u64 = 8 << 20;
        let gaps: Vec<(u64, u64)> = self
            .dirty
            .split(0, self.base_valid)
            .into_iter()
            .filter(|(_, _, staged)| !staged)
            .map(|(a, b, _)| (a, b))
            .collect();
        for (a, b) in gaps {
            let mut at = a;
            while at < b {
                let end = b.min(at + CHUNK);
                let bytes = store
                    .get_range(
                        &self.base.key,
                        ByteRange::new(at, end),
                        Some(&self.base.etag),
                    )
                    .await?;
                if bytes.len() as u64 != end - at {
                    return Err(StoreError::Other(format!(
                        "{}: short read of the original object",
                        self.base.key
                    )));
                }
                self.write(at, &bytes).map_err(|e| {
                    StoreError::Other(format!("staging file {}: {e}", self.path.display()))
                })?;
                at = end;
            }
        }
        self.base_valid = 0;
        Ok(())
    }

    /// The bytes `[start, end)` of the file as it now is.
    pub async fn read(&self, store: &dyn ObjectStore, start: u64, end: u64) -> StoreResult<Bytes> {
        let end = end.min(self.size);
        let mut out = BytesMut::with_capacity(end.saturating_sub(start) as usize);
        if start >= end {
            return Ok(out.freeze());
        }
        for (a, b, staged) in self.dirty.split(start, end) {
            if staged {
                let at = out.len();
                out.resize(at + (b - a) as usize, 0);
                self.file.read_exact_at(&mut out[at..], a).map_err(|e| {
                    StoreError::Other(format!("staging file {}: {e}", self.path.display()))
                })?;
            } else {
                let from_base = b.min(self.base_valid);
                if a < from_base {
                    let bytes = store
                        .get_range(
                            &self.base.key,
                            ByteRange::new(a, from_base),
                            Some(&self.base.etag),
                        )
                        .await?;
                    if bytes.len() as u64 != from_base - a {
                        return Err(StoreError::Other(format!(
                            "{}: short read of the original object",
                            self.base.key
                        )));
                    }
                    out.extend_from_slice(&bytes);
                }
                out.resize(out.len() + (b - from_base.max(a)) as usize, 0);
            }
        }
        Ok(out.freeze())
    }

    /// Write the new object to `key`: unchanged parts copied server side, changed parts uploaded.
    pub async fn upload(
        &self,
        store: &Arc<dyn ObjectStore>,
        key: &str,
        opts: &PutOptions,
        cfg: &UploadConfig,
        budget: &Arc<Budget>,
        caps: &Capabilities,
    ) -> StoreResult<PutResult> {
        let n = self.size;
        let part = cfg
            .min_part_size
            .max(n.div_ceil(MAX_PARTS as u64))
            .clamp(MIN_PART, MAX_PART);
        let copyable = self.base.key == key || !self.base.etag.is_empty();
        if n <= part {
            let _r = budget.reserve_required(n);
            let body = self.read(store.as_ref(), 0, n).await?;
            let crc = crc32fast::hash(&body);
            return put_checked(store, caps, key, body, crc, opts).await;
        }
        let id = store.create_multipart(key, opts, caps.checksums()).await?;
        // Up to `cfg.concurrency` parts at a time, as a streamed upload does. Memory: the first
        // part in flight may take the budget beyond its bound (so the commit always progresses);
        // more go out only while the budget has room. Server-side copies need none.
        let result: StoreResult<Vec<PartDone>> = async {
            let mut parts = Vec::new();
            let mut inflight = futures::stream::FuturesUnordered::new();
            let (mut start, mut number) = (0, 1);
            while start < n || !inflight.is_empty() {
                if start < n && inflight.len() < cfg.concurrency.max(1) {
                    let end = (start + part).min(n);
                    let copy =
                        copyable && end <= self.base_valid && !self.dirty.overlaps(start, end);
                    let memory = if copy {
                        None
                    } else if inflight.is_empty() {
                        Some(budget.reserve_required(end - start))
                    } else {
                        budget.try_reserve(end - start)
                    };
                    if copy || memory.is_some() {
                        let range = ByteRange::new(start, end);
                        inflight.push(
                            self.commit_part(store, key, &id, number, range, copy, memory, caps),
                        );
                        (start, number) = (end, number + 1);
                        continue;
                    }
                }
                if let Some(done) = futures::StreamExt::next(&mut inflight).await {
                    parts.push(done?);
                }
            }
            parts.sort_by_key(|(p, _): &(CompletedPart, _)| p.part_number);
            Ok(parts)
        }
        .await;
        let outcome = match result {
            Ok(parts) => {
                // Every part uploaded from here has its CRC32; one copied server side has none.
                let crcs: PartCrcs = parts.iter().map(|(_, c)| *c).collect();
                let parts = parts.into_iter().map(|(p, _)| p).collect();
                complete_checked(store, caps, key, &id, parts, &opts.condition, crcs).await
            }
            Err(e) => Err(e),
        };
        if outcome.is_err() {
            abort_upload(store, key, &id).await;
        }
        outcome
    }

    /// One part of [`StagedFile::upload`]: copied server side from the original object when
    /// `copy`, else assembled and uploaded. `_memory` is held until the part is done.
    #[allow(clippy::too_many_arguments)]
    async fn commit_part(
        &self,
        store: &Arc<dyn ObjectStore>,
        key: &str,
        id: &str,
        number: i32,
        range: ByteRange,
        copy: bool,
        _memory: Option<Reservation>,
        caps: &Capabilities,
    ) -> StoreResult<(CompletedPart, Option<(u32, u64)>)> {
        if copy {
            let part = store
                .upload_part_copy(key, id, number, &self.base.key, &self.base.etag, range)
                .await?;
            return Ok((part, None));
        }
        let body = self.read(store.as_ref(), range.start, range.end).await?;
        let crc = crc32fast::hash(&body);
        let len = body.len() as u64;
        let part = upload_part_checked(store, caps, key, id, number, body, crc).await?;
        Ok((part, Some((crc, len))))
    }

    /// Keep the staged bytes (and their sidecar) on disk for recovery instead of deleting them;
    /// with `dir`, move both there (falling back to where they are).
    pub fn keep(mut self, dir: Option<&Path>) -> PathBuf {
        let path = std::mem::take(&mut self.path);
        std::mem::forget(self);
        let Some(dir) = dir else { return path };
        let target = dir.join(path.file_name().unwrap_or_default());
        if prepare_dir(dir).is_ok() && std::fs::rename(&path, &target).is_ok() {
            let _ = std::fs::rename(sidecar(&path), sidecar(&target));
            return target;
        }
        path
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            remove_with_sidecar(&self.path);
        }
    }
}

/// Remove a local file (staging file, stream's local copy) and the `.info` beside it.
pub(crate) fn remove_with_sidecar(path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(sidecar(path));
}

/// The pid of the process that made a local file, from its name: `PID-NANOS.staged` (a
/// staging file, [`StagedFile::create`]) or `KEY.PID.SEQ` (a stream's local copy, made by
/// the upload's spool). None for anything else (`.info` files, the state directory's own).
pub(crate) fn maker_of(name: &str) -> Option<u32> {
    if let Some(stem) = name.strip_suffix(".staged") {
        return stem.split('-').next()?.parse().ok();
    }
    let mut parts = name.rsplitn(3, '.');
    let _seq: u64 = parts.next()?.parse().ok()?;
    let pid = parts.next()?.parse().ok()?;
    parts.next()?;
    Some(pid)
}

/// The `.info` file beside a kept file, naming its key (reported by [`leftovers`]).
pub(crate) fn sidecar(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".info");
    PathBuf::from(p)
}

/// Changes left in `dir` by a process that stopped before uploading them (crash, kill -9,
/// power loss) and data kept after conflicts: (path, what the sidecar says).
pub fn leftovers(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for d in [dir.to_path_buf(), dir.join("recovered"), dir.join("spool")] {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            // The lock and mount.info of the state directory are not data.
            if !path.is_file()
                || path.extension().is_some_and(|x| x == "info")
                || path.file_name().is_some_and(|n| n == "lock")
            {
                continue;
            }
            let about = std::fs::read_to_string(sidecar(&path))
                .unwrap_or_default()
                .replace('\n', " ")
                .trim()
                .to_string();
            out.push((path, about));
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mock::MockStore;
    use std::sync::atomic::Ordering;

    #[test]
    fn range_set_merges_splits_and_truncates() {
        let mut r = RangeSet::default();
        r.insert(10, 20);
        r.insert(30, 40);
        r.insert(15, 32);
        assert_eq!(
            r.split(0, 50),
            vec![(0, 10, false), (10, 40, true), (40, 50, false)]
        );
        r.insert(40, 45);
        assert_eq!(r.total(), 35);
        r.truncate(42);
        assert_eq!(
            r.split(0, 50),
            vec![(0, 10, false), (10, 42, true), (42, 50, false)]
        );
        assert!(r.overlaps(41, 100) && !r.overlaps(0, 10));
    }

    async fn staged_with(store: &Arc<MockStore>, body: &[u8]) -> (StagedFile, tempfile::TempDir) {
        let etag = store.insert("k", body.to_vec());
        let dir = tempfile::tempdir().unwrap();
        let f = StagedFile::create(
            dir.path(),
            Base {
                key: "k".into(),
                etag,
                size: body.len() as u64,
            },
        )
        .unwrap();
        (f, dir)
    }

    #[tokio::test]
    async fn a_staged_commit_resends_corrupted_bodies_and_falls_back_like_a_stream() {
        use crate::store::mock::Op;
        use crate::store::Feature;
        let store = Arc::new(MockStore::new());
        let body: Vec<u8> = (0..(12 << 20)).map(|i| (i % 251) as u8).collect();
        let (mut f, _d) = staged_with(&store, &body).await;
        f.write(1, b"X").unwrap();
        f.write(11 << 20, b"Y").unwrap();
        // A corrupted part body, then a store that refuses the condition.
        store.inject_fault(
            Op::UploadPart,
            "k",
            StoreError::Checksum("bad digest".into()),
            1,
        );
        store.inject_fault(
            Op::Complete,
            "k",
            StoreError::Unsupported {
                feature: Feature::ConditionalWrites,
                detail: "If-Match not implemented".into(),
            },
            1,
        );
        let caps = Capabilities::default();
        let opts = PutOptions {
            condition: crate::store::PutCondition::IfMatch(f.base.etag.clone()),
            ..Default::default()
        };
        let cfg = UploadConfig {
            min_part_size: 5 << 20,
            ..UploadConfig::default()
        };
        f.upload(
            &(store.clone() as Arc<dyn ObjectStore>),
            "k",
            &opts,
            &cfg,
            &Budget::new(1 << 30),
            &caps,
        )
        .await
        .unwrap();
        let mut want = body.clone();
        want[1] = b'X';
        want[11 << 20] = b'Y';
        assert!(store.get_bytes("k").unwrap() == want);
        assert!(!caps.conditional() && caps.checksums());
        assert_eq!(store.open_uploads(), 0);
    }

    #[tokio::test]
    async fn pwrite_truncate_and_holes_read_back() {
        let store = Arc::new(MockStore::new());
        let (mut f, _d) = staged_with(&store, b"0123456789").await;
        f.write(2, b"ab").unwrap();
        assert_eq!(
            &f.read(store.as_ref(), 0, 10).await.unwrap()[..],
            b"01ab456789"
        );
        f.truncate(6).unwrap();
        f.truncate(8).unwrap();
        assert_eq!(
            &f.read(store.as_ref(), 0, 100).await.unwrap()[..],
            b"01ab45\0\0"
        );
        f.write(10, b"Z").unwrap();
        assert_eq!(
            &f.read(store.as_ref(), 0, 100).await.unwrap()[..],
            b"01ab45\0\0\0\0Z"
        );
    }

    #[tokio::test]
    async fn append_to_a_large_object_uploads_only_the_change() {
        let store = Arc::new(MockStore::new());
        // The case the design promises: 1 MiB appended to a 1 GiB object moves about 1 MiB.
        let mut body = vec![7u8; 1 << 30];
        body[12345] = 1;
        let (mut f, _d) = staged_with(&store, &body).await;
        let extra = vec![9u8; 1 << 20];
        f.write(body.len() as u64, &extra).unwrap();
        store.reset_counters();
        let cfg = UploadConfig::default();
        f.upload(
            &(store.clone() as Arc<dyn ObjectStore>),
            "k",
            &PutOptions::default(),
            &cfg,
            &Budget::new(1 << 30),
            &Capabilities::default(),
        )
        .await
        .unwrap();
        let got = store.get_bytes("k").unwrap();
        assert_eq!(got.len(), body.len() + extra.len());
        assert!(got[..body.len()] == body[..] && got[body.len()..] == extra[..]);
        let up = store.counters.bytes_uploaded.load(Ordering::Relaxed);
        let fetched = store.counters.bytes_fetched.load(Ordering::Relaxed);
        // 1 MiB of new bytes; the last part is the only one assembled (no read-modify-write here).
        assert_eq!(up, 1 << 20, "uploaded {up}");
        assert_eq!(fetched, 0);
        assert_eq!(
            store.counters.bytes_copied.load(Ordering::Relaxed),
            body.len() as u64
        );
    }

    #[tokio::test]
    async fn a_commit_sends_its_parts_in_parallel_within_the_budget() {
        let body: Vec<u8> = (0..(64u32 << 20)).map(|i| (i % 251) as u8).collect();
        let mut want = body.clone();
        let cfg = UploadConfig::default();
        for (budget, roomy) in [(1u64 << 30, true), (12 << 20, false)] {
            let store = Arc::new(MockStore::new());
            let (mut f, _d) = staged_with(&store, &body).await;
            // A change in each of the first seven 8 MiB parts; the last one is copied.
            for p in 0..7u64 {
                f.write((p << 23) + 1000, b"changed").unwrap();
                want[((p << 23) + 1000) as usize..][..7].copy_from_slice(b"changed");
            }
            store.reset_counters();
            store.set_latency(Some(std::time::Duration::from_millis(30)));
            let budget = Budget::new(budget);
            f.upload(
                &(store.clone() as Arc<dyn ObjectStore>),
                "k",
                &PutOptions::default(),
                &cfg,
                &budget,
                &Capabilities::default(),
            )
            .await
            .unwrap();
            assert!(store.get_bytes("k").unwrap() == want);
            assert_eq!(budget.used(), 0, "every reservation given back");
            let most = store.counters.max_in_flight.load(Ordering::Relaxed);
            if roomy {
                assert_eq!(most, cfg.concurrency as u64, "parts at once");
            } else {
                // Room for one part: the others wait for it (the copy needs no memory).
                assert!(most <= 2, "{most} requests at once with room for one part");
            }
        }
    }

    #[tokio::test]
    async fn change_in_the_middle_rewrites_one_part() {
        let store = Arc::new(MockStore::new());
        let body: Vec<u8> = (0..(40u32 << 20)).map(|i| (i % 13) as u8).collect();
        let (mut f, _d) = staged_with(&store, &body).await;
        f.write(20 << 20, b"patch").unwrap();
        store.reset_counters();
        f.upload(
            &(store.clone() as Arc<dyn ObjectStore>),
            "k",
            &PutOptions::default(),
            &UploadConfig::default(),
            &Budget::new(1 << 30),
            &Capabilities::default(),
        )
        .await
        .unwrap();
        let mut want = body.clone();
        want[20 << 20..(20 << 20) + 5].copy_from_slice(b"patch");
        assert!(store.get_bytes("k").unwrap() == want);
        assert_eq!(
            store.counters.bytes_uploaded.load(Ordering::Relaxed),
            8 << 20,
            "one 8 MiB part"
        );
        assert_eq!(
            store.counters.bytes_fetched.load(Ordering::Relaxed),
            (8 << 20) - 5
        );
    }

    #[tokio::test]
    async fn staging_files_are_private_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let store = Arc::new(MockStore::new());
        let (f, d) = staged_with(&store, b"x").await;
        assert_eq!(
            std::fs::metadata(d.path()).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(
            std::fs::metadata(f.path()).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let p = f.path().to_path_buf();
        drop(f);
        assert!(!p.exists());
    }
}
