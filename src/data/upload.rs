//! Streaming upload of one object: parts go out in the background while the application keeps
//! writing; a file smaller than one part becomes a single PUT at close. Every body carries a
//! CRC32 (crc32fast) the server checks, and the object's checksum is compared after completion.
//! Nothing becomes visible until every part succeeded; on failure the upload is aborted.
//!
//! Part sizes grow with the part number so any stream up to 5 TiB fits in S3's 10,000 parts
//! without knowing its size in advance: `min_part_size` for parts 1-1000, then doubling every
//! 1000 parts, capped at `max_part_size` (8 MiB default: 8, 16, 32 ... 4096 MiB; 5 TiB is
//! reached near part 9,600).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::task::JoinSet;

use super::budget::{Budget, Reservation};
use super::commit::{
    abort_upload, carry_patience, complete_checked, copy_any_size, copy_pieces, put_checked,
    send_with_checksum, Capabilities, PartCrcs, UploadConfig, MAX_PART, MAX_PARTS, MIN_PART,
};
use super::direct::DirectAppender;
use crate::store::{
    ByteRange, CompletedPart, ObjectStore, PutCondition, PutOptions, PutResult, StoreError,
    StoreResult,
};

/// How long a write waits for other files' buffers to come back when the memory budget is
/// spent and it has no part of its own uploading, before it takes the memory anyway.
const BUDGET_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// What an already committed object contributes to the start of a continued upload.
#[derive(Clone, Debug)]
pub struct CommittedPrefix {
    pub etag: String,
    pub size: u64,
}

type PartResult = StoreResult<(CompletedPart, u32, u64)>;

/// What the `.info` beside a stream's local copy says: the key it is for.
fn spool_info(key: &str) -> String {
    format!("key: {key}\nkind: bytes of a streamed upload, from offset 0\n")
}

pub struct StreamUpload {
    store: Arc<dyn ObjectStore>,
    key: String,
    opts: PutOptions,
    cfg: UploadConfig,
    budget: Arc<Budget>,
    caps: Arc<Capabilities>,
    upload_id: Option<String>,
    next_part: i32,
    buf: BytesMut,
    /// CRC32 of `buf`, taken in as bytes are appended (while they are in the CPU cache; a pass
    /// over a finished part runs at a quarter of that speed).
    buf_crc: crc32fast::Hasher,
    buf_reservation: Reservation,
    inflight: JoinSet<PartResult>,
    /// (part, CRC32 of its bytes, its length)
    done: Vec<(CompletedPart, u32, u64)>,
    total: u64,
    failed: Option<StoreError>,
    /// A committed object whose bytes come first (writes after fsync continue it).
    prefix: Option<CommittedPrefix>,
    /// The object the prefix comes from, when not this upload's own key (copy_file_range).
    prefix_source: Option<String>,
    /// The size of that object (the prefix is the whole of it when it is this long).
    prefix_source_size: u64,
    copied_prefix: bool,
    /// Bytes of parts the store acknowledged (counted by the part tasks themselves).
    acked: Arc<std::sync::atomic::AtomicU64>,
    /// Bytes of the prefix copied server side (UploadPartCopy).
    copied_bytes: u64,
    /// The part being written to a local file instead of memory, if any.
    spill: Option<Spill>,
    /// The buffer of a part the store has taken, handed back for the next part: a fresh
    /// 8 MiB buffer per part costs the kernel a page fault and a zeroed page per 4 KiB (about
    /// a sixth of the daemon's CPU while writing). At most one is kept.
    spare: Arc<parking_lot::Mutex<Option<BytesMut>>>,
    /// Bytes at the start of `buf` that [`Self::persist`] already wrote to the spool.
    spooled_ahead: u64,
    started: std::time::Instant,
    /// The metadata the multipart upload was created with: changed later (chmod, touch,
    /// setxattr on the open file), it is applied by a copy onto itself after completion.
    created_with: Option<crate::store::UserMetadata>,
    /// Where a conflicting upload leaves what it holds (bytes, or a note on the open upload).
    recovery_dir: Option<std::path::PathBuf>,
    /// Local copy of the bytes shipped as parts (see [`UploadConfig::spool_limit`]).
    spool: Option<Spool>,
    /// Set once a spool was given up (too large, or the disk refused it).
    spool_off: bool,
    /// The part for which a write already waited [`BUDGET_PATIENCE`] for memory in vain; the
    /// rest of that part goes over the budget without waiting again.
    over_budget_part: Option<i32>,
}

/// The bytes of a streamed upload, on local disk until the object is complete.
/// A part written to a local file as it arrives (see [`UploadConfig::spill_above`]).
struct Spill {
    /// Out (None) only while a blocking-pool thread appends to it.
    file: Option<DirectAppender>,
    path: std::path::PathBuf,
    len: u64,
}

struct Spool {
    /// Appended to by a blocking-pool thread, one part at a time (out, None, meanwhile).
    file: Option<DirectAppender>,
    path: std::path::PathBuf,
    bytes: u64,
}

/// Append `body` on the blocking pool (a slow or throttled local disk must not stall a runtime
/// worker, which also serves FUSE requests and the network), then, if `flush`, write the last
/// partial block too. The appender comes back unless its thread panicked.
async fn append_blocking(
    mut file: DirectAppender,
    body: Bytes,
    flush: bool,
) -> (Option<DirectAppender>, std::io::Result<()>) {
    match tokio::task::spawn_blocking(move || {
        let r = file
            .append(&body)
            .and_then(|()| if flush { file.flush_tail() } else { Ok(()) });
        (file, r)
    })
    .await
    {
        Ok((file, r)) => (Some(file), r),
        Err(e) => (None, Err(std::io::Error::other(e))),
    }
}

impl StreamUpload {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        key: String,
        opts: PutOptions,
        cfg: UploadConfig,
        budget: Arc<Budget>,
        caps: Arc<Capabilities>,
    ) -> Self {
        let buf_reservation = Reservation::empty(&budget);
        StreamUpload {
            store,
            key,
            opts,
            cfg,
            budget,
            caps,
            upload_id: None,
            next_part: 1,
            buf: BytesMut::new(),
            buf_crc: crc32fast::Hasher::new(),
            buf_reservation,
            inflight: JoinSet::new(),
            done: Vec::new(),
            total: 0,
            failed: None,
            prefix: None,
            prefix_source: None,
            prefix_source_size: 0,
            copied_prefix: false,
            acked: Arc::default(),
            copied_bytes: 0,
            spill: None,
            spare: Arc::default(),
            spooled_ahead: 0,
            started: std::time::Instant::now(),
            created_with: None,
            over_budget_part: None,
            recovery_dir: None,
            spool: None,
            spool_off: false,
        }
    }

    /// Continue an object that is already in the bucket: its bytes come first, copied server
    /// side when large enough to be parts, re-read otherwise (less than 5 MiB).
    pub async fn continuing(mut self, committed: CommittedPrefix) -> StoreResult<Self> {
        if committed.size == 0 {
            return Ok(self);
        }
        self.total = committed.size;
        self.prefix = Some(committed);
        if !self.may_copy_whole_source() {
            self.reread_small_prefix().await?;
        }
        Ok(self)
    }

    /// Can this upload, as long as nothing more is written, be one CopyObject of a whole other
    /// object? (See [`Self::copy_whole_source`].) Then a small prefix is not re-read.
    fn may_copy_whole_source(&self) -> bool {
        let unconditional =
            self.opts.condition == PutCondition::Overwrite || !self.caps.conditional();
        unconditional
            && self.prefix_source.is_some()
            && self
                .prefix
                .as_ref()
                .is_some_and(|p| p.size == self.prefix_source_size && p.size <= MAX_PART)
    }

    /// A prefix under 5 MiB cannot be a part followed by others: read its bytes into the
    /// buffer instead (one GET), before anything is appended.
    async fn reread_small_prefix(&mut self) -> StoreResult<()> {
        let Some(prefix) = self.prefix.take_if(|p| p.size < MIN_PART) else {
            return Ok(());
        };
        let source = self.prefix_source.as_deref().unwrap_or(&self.key);
        let bytes = self
            .store
            .get_range(source, ByteRange::new(0, prefix.size), Some(&prefix.etag))
            .await
            .inspect_err(|_| self.prefix = Some(prefix.clone()))?;
        self.buf_reservation
            .absorb(self.budget.reserve_required(bytes.len() as u64));
        self.total = bytes.len() as u64;
        self.buf.extend_from_slice(&bytes);
        self.buf_crc.update(&bytes);
        Ok(())
    }

    /// Start with the first `committed.size` bytes of another object, `source` (of
    /// `source_size` bytes) at `committed.etag`, the way [`Self::continuing`] starts with this
    /// key's own.
    pub async fn starting_with(
        mut self,
        source: &str,
        source_size: u64,
        committed: CommittedPrefix,
    ) -> StoreResult<Self> {
        self.prefix_source = Some(source.to_string());
        self.prefix_source_size = source_size;
        self.continuing(committed).await
    }

    /// An upload that is nothing but a whole other object of at most 5 GiB (copy_file_range
    /// of a whole file) and needs no condition (--no-conditional-writes, or a store without
    /// them) is one CopyObject: on some stores (Garage) that copies no data at all, where
    /// UploadPartCopy rewrites every byte. With a condition it goes part by part, because the
    /// condition is then checked by CompleteMultipartUpload: stores that enforce conditions on
    /// PUT may ignore them on CopyObject (moto 5 does, measured: the target was overwritten).
    async fn copy_whole_source(&mut self) -> StoreResult<Option<PutResult>> {
        let (Some(source), Some(prefix)) = (self.prefix_source.as_deref(), self.prefix.as_ref())
        else {
            return Ok(None);
        };
        let only_the_copy = self.upload_id.is_none()
            && self.buf.is_empty()
            && self.inflight.is_empty()
            && self.done.is_empty();
        if !only_the_copy || !self.may_copy_whole_source() {
            return Ok(None);
        }
        let opts = PutOptions {
            condition: PutCondition::Overwrite,
            ..self.opts.clone()
        };
        match self
            .store
            .copy_object(source, &prefix.etag, &self.key, &opts)
            .await
        {
            Ok(res) => {
                self.prefix = None;
                Ok(Some(res))
            }
            Err(StoreError::PreconditionFailed(m)) => Err(StoreError::PreconditionFailed(format!(
                "{}: the copy of {source} was not applied ({m}): the source changed since it was opened",
                self.key
            ))),
            Err(e) => Err(e),
        }
    }

    /// Grow the prefix this upload copies from `source` at `etag` to its first `size` bytes,
    /// if the upload is still nothing but that prefix (copy_file_range going on where its last
    /// call stopped). False, and nothing changed, otherwise.
    pub fn extend_prefix(&mut self, source: &str, etag: &str, size: u64) -> bool {
        let untouched = self.upload_id.is_none()
            && self.buf.is_empty()
            && self.inflight.is_empty()
            && self.done.is_empty()
            && self.prefix_source.as_deref() == Some(source);
        match self.prefix.as_mut() {
            Some(p) if untouched && p.etag == etag && size >= p.size => {
                p.size = size;
                self.total = size;
                true
            }
            _ => false,
        }
    }

    /// Keep what a conflicting upload holds in `dir` instead of losing it.
    pub fn with_recovery_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.recovery_dir = Some(dir);
        self
    }

    /// Has the multipart upload been created on the server (its metadata is fixed then)?
    /// (bytes written to this upload, bytes the store has acknowledged, seconds since the
    /// first byte): what `s3mount status` shows, rate included. Parts count as soon as their
    /// request returns, before the writer collects them.
    pub fn progress(&self) -> (u64, u64, f64) {
        let acked = self.acked.load(std::sync::atomic::Ordering::Relaxed);
        (
            self.total,
            acked + self.copied_bytes,
            self.started.elapsed().as_secs_f64(),
        )
    }

    /// Bytes `start..end` of what was written, when all of it is still in memory (nothing
    /// shipped yet, no committed prefix): a file being written, or queued by `--write-back`,
    /// reads back without an upload first.
    pub fn read_buffered(&self, start: u64, end: u64) -> Option<Bytes> {
        if self.upload_id.is_some()
            || self.prefix.is_some()
            || self.spill.is_some()
            || self.total != self.buf.len() as u64
        {
            return None;
        }
        let end = end.min(self.total) as usize;
        let start = (start as usize).min(end);
        Some(Bytes::copy_from_slice(&self.buf[start..end]))
    }

    pub fn multipart_started(&self) -> bool {
        self.upload_id.is_some()
    }

    /// Make the object go to `key` instead (the file was renamed before any of it was sent):
    /// true when nothing has gone to the store under the old key (no multipart upload, no part,
    /// no committed prefix), else false and nothing changes. The local copy's `.info` names
    /// the new key.
    pub fn retarget(&mut self, key: &str, content_type: Option<String>) -> bool {
        if self.upload_id.is_some()
            || self.prefix.is_some()
            || self.prefix_source.is_some()
            || self.failed.is_some()
            || !self.inflight.is_empty()
            || !self.done.is_empty()
        {
            return false;
        }
        self.key = key.to_string();
        self.opts.content_type = content_type;
        if let Some(spool) = &self.spool {
            if let Err(e) = std::fs::write(super::staging::sidecar(&spool.path), spool_info(key)) {
                tracing::warn!(key, path = %spool.path.display(), "cannot name the new key beside the local copy: {e}");
            }
        }
        true
    }

    /// Metadata for the object, as long as the upload has not started on the server.
    pub fn set_metadata(&mut self, metadata: crate::store::UserMetadata) {
        self.opts.metadata = metadata;
    }

    fn check_failed(&self) -> StoreResult<()> {
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Append bytes. Returns once they are buffered; parts upload in the background, and the
    /// call waits only when the part concurrency or the memory budget is exhausted.
    pub async fn write(&mut self, mut data: &[u8]) -> StoreResult<()> {
        self.check_failed()?;
        if !data.is_empty() {
            self.reread_small_prefix().await?;
        }
        while !data.is_empty() {
            let cap = self.cfg.part_size(self.next_part);
            if self.spills(cap) {
                let have = self.spill.as_ref().map_or(0, |s| s.len);
                let n = ((cap - have) as usize).min(data.len());
                self.spill_write(&data[..n]).await?;
                self.buf_crc.update(&data[..n]);
                self.total += n as u64;
                data = &data[n..];
                if self.spill.as_ref().is_some_and(|s| s.len == cap) {
                    self.ship_spilled().await?;
                }
                continue;
            }
            let n = ((cap - self.buf.len() as u64) as usize).min(data.len());
            // Back-pressure: while the budget is spent, let this file's own parts drain first,
            // then wait a while for other files' uploads to give memory back.
            while self.budget.available() < n as u64 && !self.inflight.is_empty() {
                self.reap_one().await?;
            }
            let n64 = n as u64;
            // Waiting helps only when other files hold memory that their uploads give back.
            let others_hold = self.budget.used() > self.buf_reservation.bytes();
            let reservation = if self.budget.available() >= n64
                || !others_hold
                || self.over_budget_part == Some(self.next_part)
            {
                self.budget.reserve_required(n64)
            } else {
                let (r, over) = self.budget.reserve_waiting(n64, BUDGET_PATIENCE).await;
                if over {
                    self.over_budget_part = Some(self.next_part);
                }
                r
            };
            self.buf_reservation.absorb(reservation);
            if self.buf.capacity() == 0 {
                if let Some(spare) = self.spare.lock().take() {
                    self.buf = spare;
                }
            }
            if self.buf.capacity() - self.buf.len() < n {
                self.buf
                    .reserve((cap as usize - self.buf.len()).min(n.max(1 << 20)));
            }
            self.buf.extend_from_slice(&data[..n]);
            self.buf_crc.update(&data[..n]);
            self.total += n as u64;
            data = &data[n..];
            if self.buf.len() as u64 == cap {
                self.ship_part().await?;
            }
        }
        Ok(())
    }

    /// Does the part now being written go to a file? Parts above `spill_above` do, once the
    /// multipart upload exists and if the part did not start in memory.
    fn spills(&self, cap: u64) -> bool {
        self.spill.is_some()
            || (cap > self.cfg.spill_above
                && self.upload_id.is_some()
                && self.buf.is_empty()
                && self.recovery_dir.is_some())
    }

    /// Append to the spilled part (made on first use, in `spool/` of the staging directory).
    async fn spill_write(&mut self, data: &[u8]) -> StoreResult<()> {
        if self.spill.is_none() {
            // Parts this large come long after --spool-limit; a spool still kept (a small
            // --part-size and a small budget) stops here rather than hold a second copy.
            if self.spool.is_some() {
                tracing::debug!(key = %self.key, "parts are spilled to disk from here: no further local copy kept");
                self.spool_off = true;
                self.drop_spool();
            }
            let dir = self
                .recovery_dir
                .as_ref()
                .and_then(|d| d.parent())
                .map(|d| d.join("spool"))
                .ok_or_else(|| {
                    StoreError::Other("no staging directory to spill parts to".into())
                })?;
            static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let path = dir.join(format!(
                "{}.{}.{}.part{}",
                safe_name(&self.key),
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed),
                self.next_part
            ));
            let file = super::staging::prepare_dir(&dir)
                .and_then(|_| DirectAppender::create(&path))
                .map_err(|e| {
                    self.fail(format!("cannot spill a part to {}: {e}", path.display()))
                })?;
            tracing::debug!(key = %self.key, part = self.next_part, path = %path.display(), "part spilled to disk as it is written");
            self.spill = Some(Spill {
                file: Some(file),
                path,
                len: 0,
            });
        }
        let spill = self.spill.as_mut().expect("spill opened above");
        let body = Bytes::copy_from_slice(data);
        let n = body.len() as u64;
        let written = match spill.file.take() {
            Some(file) => {
                let (file, r) = append_blocking(file, body, false).await;
                spill.file = file;
                r
            }
            None => Err(std::io::Error::other("spill file lost")),
        };
        match written {
            Ok(()) => {
                spill.len += n;
                Ok(())
            }
            Err(e) => {
                let msg = format!("cannot spill a part to {}: {e}", spill.path.display());
                Err(self.fail(msg))
            }
        }
    }

    /// Record a failure of this upload (every later call reports it).
    fn fail(&mut self, msg: String) -> StoreError {
        let e = StoreError::Other(format!("{}: {msg}", self.key));
        self.failed = Some(e.clone());
        e
    }

    /// Upload the spilled part from its file; the file goes when the part is done.
    async fn ship_spilled(&mut self) -> StoreResult<()> {
        let id = self.next_part_slot().await?;
        let Some(spill) = self.spill.take() else {
            return Ok(());
        };
        let crc = std::mem::take(&mut self.buf_crc).finalize();
        let n = self.next_part;
        self.next_part += 1;
        let (store, key, caps) = (self.store.clone(), self.key.clone(), self.caps.clone());
        let acked = self.acked.clone();
        self.inflight.spawn(carry_patience(async move {
            let Spill { file, path, len } = spill;
            // The last partial block goes to the file before it is read for the upload.
            let flushed = match file {
                Some(file) => append_blocking(file, Bytes::new(), true).await.1,
                None => Err(std::io::Error::other("spill file lost")),
            };
            if let Err(e) = flushed {
                let _ = std::fs::remove_file(&path);
                return Err(StoreError::Other(format!(
                    "{key}: cannot spill a part to {}: {e}",
                    path.display()
                )));
            }
            let part = send_with_checksum(&caps, |c| {
                let (store, key, id, path) = (store.clone(), key.clone(), id.clone(), path.clone());
                async move {
                    store
                        .upload_part_file(&key, &id, n, &path, len, c.then_some(crc))
                        .await
                }
            })
            .await;
            let _ = std::fs::remove_file(&path);
            let part = part?;
            acked.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
            Ok((part, crc, len))
        }));
        Ok(())
    }

    fn drop_spill(&mut self) {
        if let Some(spill) = self.spill.take() {
            let _ = std::fs::remove_file(&spill.path);
        }
    }

    async fn ensure_multipart(&mut self) -> StoreResult<String> {
        if let Some(id) = &self.upload_id {
            return Ok(id.clone());
        }
        let id = self
            .store
            .create_multipart(&self.key, &self.opts, self.caps.checksums())
            .await?;
        tracing::debug!(key = %self.key, upload_id = %id, "multipart upload started");
        self.upload_id = Some(id.clone());
        self.created_with = Some(self.opts.metadata.clone());
        if let Some(prefix) = self.prefix.take() {
            self.copy_prefix(&id, &prefix).await?;
        }
        Ok(id)
    }

    /// Server-side copy of a committed object into the first parts (5 GiB at most each).
    async fn copy_prefix(&mut self, id: &str, prefix: &CommittedPrefix) -> StoreResult<()> {
        let source = self
            .prefix_source
            .clone()
            .unwrap_or_else(|| self.key.clone());
        for range in copy_pieces(prefix.size) {
            let n = self.next_part;
            self.next_part += 1;
            let part = self
                .store
                .upload_part_copy(&self.key, id, n, &source, &prefix.etag, range)
                .await?;
            self.done.push((part, 0, range.len()));
            self.copied_bytes += range.len();
            self.copied_prefix = true;
        }
        Ok(())
    }

    async fn reap_one(&mut self) -> StoreResult<()> {
        match self.inflight.join_next().await {
            Some(Ok(Ok(part))) => {
                self.done.push(part);
                Ok(())
            }
            Some(Ok(Err(e))) => {
                self.failed = Some(e.clone());
                Err(e)
            }
            Some(Err(join)) => {
                let e = StoreError::Other(format!("part upload task failed: {join}"));
                self.failed = Some(e.clone());
                Err(e)
            }
            None => Ok(()),
        }
    }

    async fn ship_part(&mut self) -> StoreResult<()> {
        let id = self.next_part_slot().await?;
        let body = std::mem::take(&mut self.buf).freeze();
        self.ship_body(id, body).await
    }

    /// The upload id for the next part, once there is room for it: the part count checked,
    /// the multipart upload created, fewer than `concurrency` parts in flight.
    async fn next_part_slot(&mut self) -> StoreResult<String> {
        if self.next_part > MAX_PARTS {
            let e = StoreError::Other(format!(
                "{}: more than {MAX_PARTS} parts; the largest object with these part sizes is {} bytes",
                self.key,
                self.cfg.max_object_size()
            ));
            self.failed = Some(e.clone());
            return Err(e);
        }
        let id = match self.ensure_multipart().await {
            Ok(id) => id,
            Err(e) => {
                self.failed = Some(e.clone());
                return Err(e);
            }
        };
        while self.inflight.len() >= self.cfg.concurrency.max(1) {
            self.reap_one().await?;
        }
        Ok(id)
    }

    async fn ship_body(&mut self, id: String, body: Bytes) -> StoreResult<()> {
        let crc = std::mem::take(&mut self.buf_crc).finalize();
        debug_assert_eq!(crc, crc32fast::hash(&body), "running CRC32 of the part");
        // Awaited with the part taken out of `buf`: like every write path here, this runs to
        // completion in its own task and is never dropped half way.
        self.spool_append(body.clone()).await;
        let reservation =
            std::mem::replace(&mut self.buf_reservation, Reservation::empty(&self.budget));
        let n = self.next_part;
        self.next_part += 1;
        let (store, key, caps) = (self.store.clone(), self.key.clone(), self.caps.clone());
        let acked = self.acked.clone();
        let spare = self.spare.clone();
        self.inflight.spawn(carry_patience(async move {
            let _reservation = reservation;
            let len = body.len() as u64;
            let part = send_with_checksum(&caps, |c| {
                let (store, key, id, body) = (store.clone(), key.clone(), id.clone(), body.clone());
                async move {
                    store
                        .upload_part(&key, &id, n, body, c.then_some(crc))
                        .await
                }
            })
            .await?;
            acked.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
            // Every clone the requests took is gone now: the buffer is ours again.
            if let Ok(mut buf) = body.try_into_mut() {
                buf.clear();
                *spare.lock() = Some(buf);
            }
            Ok((part, crc, len))
        }));
        Ok(())
    }

    /// Make the object durable: a single PUT for a small file, else the last part and
    /// CompleteMultipartUpload. On any failure the multipart upload is aborted.
    pub async fn finish(mut self) -> StoreResult<PutResult> {
        let result = self.finish_inner().await;
        if result.is_err() {
            self.abort_remote().await;
            self.keep_spool().await;
        }
        self.drop_spool();
        self.drop_spill();
        result
    }

    /// Copy shipped bytes to the local spool, leaving out the start that [`Self::persist`]
    /// wrote there already.
    async fn spool_append(&mut self, body: Bytes) {
        let skip = (std::mem::take(&mut self.spooled_ahead) as usize).min(body.len());
        self.spool_write(body.slice(skip..)).await;
    }

    /// The local copy of the bytes written (the spool), while one is kept.
    pub fn spool_path(&self) -> Option<&std::path::Path> {
        self.spool.as_ref().map(|s| s.path.as_path())
    }

    /// Is every byte written so far in the local copy (after [`Self::persist`])? Then a new
    /// process can go on with the file from it.
    pub fn kept_locally(&self) -> bool {
        !self.spool_off
            && self.prefix.is_none()
            && self.spill.is_none()
            && self.spool.as_ref().map_or(0, |s| s.bytes) == self.total
    }

    /// The multipart upload under way, once one was created.
    pub fn upload_id(&self) -> Option<&str> {
        self.upload_id.as_deref()
    }

    /// Make every byte written so far local (`--write-back`, before close returns): the spool
    /// holds the shipped parts, and the part still in memory is added to it. False when there
    /// is no spool to hold them (past `--spool-limit`, a prefix copied server side, a part
    /// spilled to disk, or the disk refused): then the caller uploads before returning.
    pub async fn persist(&mut self) -> bool {
        if self.spool_off || self.prefix.is_some() || self.spill.is_some() {
            return false;
        }
        let from = self.spooled_ahead as usize;
        if self.buf.len() > from {
            let tail = Bytes::copy_from_slice(&self.buf[from..]);
            let before = self.spool.as_ref().map_or(0, |s| s.bytes);
            let n = tail.len() as u64;
            self.spool_write(tail).await;
            if self.spool_off || self.spool.as_ref().map_or(0, |s| s.bytes) != before + n {
                return false;
            }
            self.spooled_ahead = self.buf.len() as u64;
        }
        self.kept_locally()
    }

    /// Copy shipped bytes to the local spool while the file is within the spool limit. The
    /// write runs on the blocking pool, bypassing the page cache ([`DirectAppender`]), and is
    /// awaited, so the spool never has a hole.
    async fn spool_write(&mut self, body: Bytes) {
        use std::os::unix::fs::OpenOptionsExt;
        if self.spool_off || self.prefix.is_some() || body.is_empty() {
            return;
        }
        let Some(dir) = self.recovery_dir.as_ref().and_then(|d| d.parent()) else {
            return;
        };
        let shipped = self.spool.as_ref().map_or(0, |s| s.bytes);
        if shipped + body.len() as u64 > self.cfg.spool_limit {
            tracing::debug!(key = %self.key, limit = self.cfg.spool_limit, "streamed file is larger than --spool-limit: no local copy kept while it uploads");
            self.spool_off = true;
            self.drop_spool();
            return;
        }
        if self.spool.is_none() {
            let dir = dir.join("spool");
            static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let path = dir.join(format!(
                "{}.{}.{}",
                safe_name(&self.key),
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            let opened = super::staging::prepare_dir(&dir).and_then(|_| {
                std::io::Write::write_all(
                    &mut std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(super::staging::sidecar(&path))?,
                    spool_info(&self.key).as_bytes(),
                )?;
                DirectAppender::create(&path)
            });
            match opened {
                Ok(file) => {
                    self.spool = Some(Spool {
                        file: Some(file),
                        path,
                        bytes: 0,
                    })
                }
                Err(e) => {
                    tracing::warn!(key = %self.key, dir = %dir.display(), "cannot keep a local copy of the upload: {e}");
                    self.spool_off = true;
                    return;
                }
            }
        }
        let spool = self.spool.as_mut().expect("spool opened above");
        let len = body.len() as u64;
        // Every byte on disk when this returns (the tail block too): a crash leaves them all.
        let written = match spool.file.take() {
            Some(file) => {
                let (file, r) = append_blocking(file, body, true).await;
                spool.file = file;
                r
            }
            None => Err(std::io::Error::other("spool file lost")),
        };
        match written {
            Ok(()) => spool.bytes += len,
            Err(e) => {
                tracing::warn!(key = %self.key, path = %spool.path.display(), "local copy of the upload given up: {e}");
                self.spool_off = true;
                self.drop_spool();
            }
        }
    }

    /// The upload failed for good: move the spool (plus bytes never shipped) to the recovery
    /// folder and say where it is.
    async fn keep_spool(&mut self) {
        if self.spool.is_none() {
            return;
        }
        let rest = std::mem::take(&mut self.buf).freeze();
        self.buf_crc = crc32fast::Hasher::new();
        self.spool_append(rest).await;
        let (Some(spool), Some(dest)) = (self.spool.take(), self.recovery_path("data")) else {
            return;
        };
        let _ = std::fs::remove_file(super::staging::sidecar(&spool.path));
        match std::fs::rename(&spool.path, &dest) {
            Ok(()) => {
                tracing::error!(key = %self.key, kept = %dest.display(), bytes = spool.bytes, "upload failed: the bytes written are kept locally at {}", dest.display())
            }
            Err(e) => {
                tracing::error!(key = %self.key, kept = %spool.path.display(), bytes = spool.bytes, "upload failed: the bytes written are kept locally at {} ({e} moving it)", spool.path.display())
            }
        }
    }

    fn drop_spool(&mut self) {
        if let Some(spool) = self.spool.take() {
            super::staging::remove_with_sidecar(&spool.path);
        }
    }

    async fn finish_inner(&mut self) -> StoreResult<PutResult> {
        self.check_failed()?;
        if let Some(res) = self.copy_whole_source().await? {
            return Ok(res);
        }
        if self.upload_id.is_none() && self.prefix.is_none() {
            let body = std::mem::take(&mut self.buf).freeze();
            let crc = std::mem::take(&mut self.buf_crc).finalize();
            debug_assert_eq!(crc, crc32fast::hash(&body), "running CRC32 of the body");
            return match put_checked(
                &self.store,
                &self.caps,
                &self.key,
                body.clone(),
                crc,
                &self.opts,
            )
            .await
            {
                Err(StoreError::PreconditionFailed(_)) => {
                    let kept = self.keep_for_recovery(&body, "write conflict");
                    Err(StoreError::PreconditionFailed(format!(
                        "{}: changed by someone else since it was opened; this write was not applied, its bytes are kept at {kept}",
                        self.key
                    )))
                }
                Err(e) => {
                    // Failed for good (retries exhausted): the bytes exist only here now.
                    self.keep_for_recovery(&body, "upload failed");
                    Err(e)
                }
                ok => ok,
            };
        }
        if self.spill.as_ref().is_some_and(|s| s.len > 0) {
            self.ship_spilled().await?;
        } else if !self.buf.is_empty()
            || (self.done.is_empty() && self.inflight.is_empty() && self.prefix.is_none())
        {
            self.ship_part().await?;
        } else {
            self.ensure_multipart().await?;
        }
        while !self.inflight.is_empty() {
            self.reap_one().await?;
        }
        self.done.sort_by_key(|(p, _, _)| p.part_number);
        let parts: Vec<CompletedPart> = self.done.iter().map(|(p, _, _)| p.clone()).collect();
        let id = self.upload_id.clone().unwrap_or_default();
        // Parts copied server side have no local CRC: then only the part checksums vouch.
        let crcs: PartCrcs =
            (!self.copied_prefix).then(|| self.done.iter().map(|(_, c, n)| (*c, *n)).collect());
        let completed = complete_checked(
            &self.store,
            &self.caps,
            &self.key,
            &id,
            parts.clone(),
            &self.opts.condition,
            crcs,
        )
        .await;
        let res = match completed {
            Err(StoreError::PreconditionFailed(_)) => {
                // The parts stay on the server: leave the upload open (not aborted) and say how
                // to find it, since the bytes exist nowhere else.
                let note = self.note_open_upload(&id, &parts);
                self.upload_id = None;
                return Err(StoreError::PreconditionFailed(format!(
                    "{}: changed by someone else since it was opened; this write was not applied; its {} parts are kept in the open multipart upload {id} (see {note})",
                    self.key,
                    parts.len()
                )));
            }
            Err(e @ StoreError::Checksum(_)) => {
                // Completed, but not what was written: the object is there; say so.
                self.upload_id = None;
                return Err(e);
            }
            other => other,
        }?;
        self.upload_id = None;
        if self
            .created_with
            .as_ref()
            .is_some_and(|m| *m != self.opts.metadata)
        {
            return Ok(self.restamp_metadata(res).await);
        }
        Ok(res)
    }

    /// The metadata changed after the multipart upload was created with it: store the current
    /// one with a copy of the new object onto itself (pinned to its ETag; no data through this
    /// machine). The bytes are in the bucket either way: if the copy fails, that is logged and
    /// the object keeps the metadata of when the upload started.
    async fn restamp_metadata(&self, res: PutResult) -> PutResult {
        let etag = res.etag.clone().unwrap_or_default();
        let opts = PutOptions {
            metadata: self.opts.metadata.clone(),
            content_type: self.opts.content_type.clone(),
            condition: PutCondition::Overwrite,
        };
        match copy_any_size(&self.store, &self.key, &etag, self.total, &self.key, &opts).await {
            Ok(copied) => PutResult {
                etag: copied.etag.or(res.etag),
                // The same bytes: the CRC32 of the data written still vouches for them.
                checksum_crc32: res.checksum_crc32.or(copied.checksum_crc32),
            },
            Err(e) => {
                tracing::error!(key = %self.key, error = %e, "the object is stored, but the metadata changed while it was uploading (mode, owner, times, extended attributes) could not be applied");
                res
            }
        }
    }

    fn recovery_path(&self, suffix: &str) -> Option<std::path::PathBuf> {
        let dir = self.recovery_dir.as_ref()?;
        super::staging::prepare_dir(dir).ok()?;
        let safe = safe_name(&self.key);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Some(dir.join(format!("{safe}.{stamp}.{suffix}")))
    }

    /// Save the bytes of a single PUT that could not be applied; returns where (or why not).
    fn keep_for_recovery(&self, body: &[u8], why: &str) -> String {
        crate::metrics::count(crate::metrics::RECOVERED_FILES);
        use std::os::unix::fs::OpenOptionsExt;
        let Some(path) = self.recovery_path("data") else {
            tracing::error!(key = %self.key, "{why}: the bytes written are lost (no recovery directory)");
            return "nowhere (no recovery directory)".into();
        };
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, body));
        match written {
            Ok(()) => {
                tracing::error!(key = %self.key, kept = %path.display(), "{why}: the bytes written are kept locally at {}", path.display());
                path.display().to_string()
            }
            Err(e) => {
                tracing::error!(key = %self.key, "{why}: could not keep the bytes written at {}: {e}", path.display());
                format!("nowhere ({}: {e})", path.display())
            }
        }
    }

    /// Describe a multipart upload left open after a conflict (key, upload id, parts).
    fn note_open_upload(&self, id: &str, parts: &[CompletedPart]) -> String {
        use std::os::unix::fs::OpenOptionsExt;
        let mut text = format!("key: {}\nupload_id: {id}\nparts:\n", self.key);
        for p in parts {
            text.push_str(&format!("  {} {}\n", p.part_number, p.etag));
        }
        tracing::error!(key = %self.key, upload_id = %id, parts = parts.len(), "write conflict: multipart upload left open for recovery");
        let Some(path) = self.recovery_path("upload") else {
            return "the log".into();
        };
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut f) => {
                let _ = std::io::Write::write_all(&mut f, text.as_bytes());
                path.display().to_string()
            }
            Err(_) => "the log".into(),
        }
    }

    async fn abort_remote(&mut self) {
        self.inflight.abort_all();
        while self.inflight.join_next().await.is_some() {}
        if let Some(id) = self.upload_id.take() {
            abort_upload(&self.store, &self.key, &id).await;
        }
    }

    /// Give up: nothing becomes visible, the multipart upload (if any) is aborted.
    pub async fn abort(mut self) {
        self.abort_remote().await;
        self.drop_spool();
        self.drop_spill();
    }
}

/// A key as one file name: `/` and control characters become `_`, at most 200 characters.
fn safe_name(key: &str) -> String {
    key.chars()
        .map(|c| if c == '/' || c.is_control() { '_' } else { c })
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{crc32_header, Feature};

    use crate::store::mock::{MockStore, Op};
    use std::sync::atomic::Ordering;

    fn small_cfg() -> UploadConfig {
        UploadConfig {
            min_part_size: 5 << 20,
            max_part_size: 64 << 20,
            concurrency: 3,
            spool_limit: 1 << 30,
            spill_above: 1 << 40,
        }
    }

    fn upload(store: &Arc<MockStore>, key: &str, budget: u64) -> StreamUpload {
        StreamUpload::new(
            store.clone(),
            key.into(),
            PutOptions::default(),
            small_cfg(),
            Budget::new(budget),
            Arc::new(Capabilities::default()),
        )
    }

    fn data(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Parts above `spill_above` go through a file, not memory: with 5 MiB parts spilled, a
    /// 64 MiB stream with 3 parts in flight never holds more than its first (in-memory) part
    /// and the write buffer of the budget, and the object is exact. The files are removed.
    #[tokio::test]
    async fn large_parts_are_spilled_to_disk_and_memory_stays_bounded() {
        let store = Arc::new(MockStore::new());
        let staging = tempfile::tempdir().unwrap();
        let budget = Budget::new(64 << 20);
        let cfg = UploadConfig {
            spill_above: 1 << 20,
            ..small_cfg()
        };
        let mut u = StreamUpload::new(
            store.clone(),
            "big".into(),
            PutOptions::default(),
            cfg,
            budget.clone(),
            Arc::new(Capabilities::default()),
        )
        .with_recovery_dir(staging.path().join("recovered"));
        store.set_latency(Some(std::time::Duration::from_millis(5)));
        let body = data(64 << 20, 3);
        for chunk in body.chunks(128 << 10) {
            u.write(chunk).await.unwrap();
        }
        u.finish().await.unwrap();
        assert!(store.get_bytes("big").unwrap() == body);
        assert!(
            budget.peak() <= (5 << 20) + (128 << 10),
            "peak {} bytes of budget for a 64 MiB stream",
            budget.peak()
        );
        let left: Vec<_> = std::fs::read_dir(staging.path().join("spool"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "spill files left: {left:?}");
    }

    #[test]
    fn schedule_reaches_five_tebibytes() {
        let cfg = UploadConfig::default();
        assert_eq!(cfg.part_size(1), 8 << 20);
        assert_eq!(cfg.part_size(1000), 8 << 20);
        assert_eq!(cfg.part_size(1001), 16 << 20);
        assert_eq!(cfg.part_size(10_000), 4 << 30);
        assert!(
            cfg.max_object_size() >= 5 << 40,
            "{}",
            cfg.max_object_size()
        );
    }

    #[tokio::test]
    async fn small_file_is_one_put_with_checksum() {
        let store = Arc::new(MockStore::new());
        let mut u = upload(&store, "f", 1 << 30);
        u.write(b"hello ").await.unwrap();
        u.write(b"world").await.unwrap();
        let res = u.finish().await.unwrap();
        assert_eq!(
            res.checksum_crc32,
            Some(crc32_header(crc32fast::hash(b"hello world")))
        );
        assert_eq!(&store.get_bytes("f").unwrap()[..], b"hello world");
        assert_eq!(store.counters.put.load(Ordering::Relaxed), 1);
        assert_eq!(store.counters.multipart.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn empty_file_is_an_empty_object() {
        let store = Arc::new(MockStore::new());
        upload(&store, "e", 1 << 30).finish().await.unwrap();
        assert_eq!(store.get_bytes("e").unwrap().len(), 0);
    }

    #[tokio::test]
    async fn exact_sizes_around_the_part_boundary() {
        let part = 5 << 20;
        for size in [part - 1, part, part + 1, 3 * part, 3 * part + 7] {
            let store = Arc::new(MockStore::new());
            let body = data(size, 3);
            let mut u = upload(&store, "k", 1 << 30);
            for chunk in body.chunks(1 << 20) {
                u.write(chunk).await.unwrap();
            }
            u.finish().await.unwrap();
            assert!(store.get_bytes("k").unwrap() == body, "size {size}");
            assert_eq!(store.open_uploads(), 0);
        }
    }

    #[tokio::test]
    async fn parts_upload_while_writing() {
        let store = Arc::new(MockStore::new());
        let mut u = upload(&store, "k", 1 << 30);
        u.write(&data(12 << 20, 1)).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // Two full parts went out before close.
        assert!(store.counters.bytes_uploaded.load(Ordering::Relaxed) >= 10 << 20);
        u.finish().await.unwrap();
    }

    #[tokio::test]
    async fn failed_part_aborts_and_keeps_old_object() {
        let store = Arc::new(MockStore::new());
        store.insert("k", "old");
        store.inject_fault(Op::UploadPart, "k", StoreError::Other("500".into()), 100);
        let mut u = upload(&store, "k", 1 << 30);
        let mut err = None;
        for chunk in data(20 << 20, 1).chunks(1 << 20) {
            if let Err(e) = u.write(chunk).await {
                err = Some(e);
                break;
            }
        }
        let res = u.finish().await;
        assert!(err.is_some() || res.is_err());
        assert_eq!(&store.get_bytes("k").unwrap()[..], b"old");
        assert_eq!(store.open_uploads(), 0, "multipart upload aborted");
    }

    #[tokio::test]
    async fn failed_small_upload_keeps_the_bytes_locally() {
        let store = Arc::new(MockStore::new());
        store.insert("dir/k", "old");
        store.inject_fault(
            Op::Put,
            "dir/k",
            StoreError::Unreachable("gone".into()),
            100,
        );
        let tmp = tempfile::tempdir().unwrap();
        let mut u = upload(&store, "dir/k", 1 << 30).with_recovery_dir(tmp.path().join("rec"));
        let body = data(300_000, 4);
        u.write(&body).await.unwrap();
        assert!(matches!(u.finish().await, Err(StoreError::Unreachable(_))));
        assert_eq!(&store.get_bytes("dir/k").unwrap()[..], b"old");
        let kept: Vec<_> = std::fs::read_dir(tmp.path().join("rec"))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(kept.len(), 1);
        assert!(kept[0].file_name().to_string_lossy().starts_with("dir_k."));
        assert_eq!(std::fs::read(kept[0].path()).unwrap(), body);
    }

    #[tokio::test]
    async fn failed_multipart_upload_keeps_every_byte_locally() {
        let store = Arc::new(MockStore::new());
        store.insert("k", "old");
        store.inject_fault(
            Op::Complete,
            "k",
            StoreError::Unreachable("gone".into()),
            100,
        );
        let tmp = tempfile::tempdir().unwrap();
        let staging = tmp.path().join("staging");
        let mut u = upload(&store, "k", 1 << 30).with_recovery_dir(staging.join("recovered"));
        let body = data((12 << 20) + 5, 7);
        for chunk in body.chunks(1 << 20) {
            u.write(chunk).await.unwrap();
        }
        // While it streams, its local copy and sidecar are private (0600 in a 0700 directory).
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&staging.join("spool")), 0o700);
        let spooled: Vec<_> = std::fs::read_dir(staging.join("spool"))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(spooled.len(), 2, "copy and sidecar");
        for f in &spooled {
            assert_eq!(mode(&f.path()), 0o600, "{}", f.path().display());
        }
        assert!(u.finish().await.is_err());
        assert_eq!(&store.get_bytes("k").unwrap()[..], b"old");
        assert_eq!(store.open_uploads(), 0);
        let kept: Vec<_> = std::fs::read_dir(staging.join("recovered"))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(kept.len(), 1);
        assert!(
            std::fs::read(kept[0].path()).unwrap() == body,
            "kept bytes differ"
        );
        // The spool itself is gone (moved), and a successful upload leaves no spool behind.
        assert_eq!(std::fs::read_dir(staging.join("spool")).unwrap().count(), 0);
        let mut u = upload(&store, "other", 1 << 30).with_recovery_dir(staging.join("recovered"));
        u.write(&body).await.unwrap();
        u.finish().await.unwrap();
        assert_eq!(std::fs::read_dir(staging.join("spool")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn corrupted_body_is_resent() {
        let store = Arc::new(MockStore::new());
        store.inject_fault(
            Op::UploadPart,
            "k",
            StoreError::Checksum("bad digest".into()),
            1,
        );
        let body = data(11 << 20, 9);
        let mut u = upload(&store, "k", 1 << 30);
        u.write(&body).await.unwrap();
        u.finish().await.unwrap();
        assert!(store.get_bytes("k").unwrap() == body);
    }

    #[tokio::test]
    async fn store_without_checksums_falls_back() {
        let store = Arc::new(MockStore::new());
        store.inject_fault(
            Op::Put,
            "k",
            StoreError::Unsupported {
                feature: Feature::Checksums,
                detail: "x-amz-checksum-crc32 not implemented".into(),
            },
            1,
        );
        let caps = Arc::new(Capabilities::default());
        let mut u = StreamUpload::new(
            store.clone(),
            "k".into(),
            PutOptions::default(),
            small_cfg(),
            Budget::new(1 << 30),
            caps.clone(),
        );
        u.write(b"data").await.unwrap();
        u.finish().await.unwrap();
        assert!(!caps.checksums());
        assert_eq!(&store.get_bytes("k").unwrap()[..], b"data");
    }

    #[tokio::test]
    async fn a_refused_condition_never_switches_checksums_off() {
        let store = Arc::new(MockStore::new());
        // A 501 that does not say which header it refuses, to a conditional PUT.
        store.inject_fault(
            Op::Put,
            "k",
            StoreError::Unsupported {
                feature: Feature::Unknown,
                detail: "A header you provided implies functionality that is not implemented"
                    .into(),
            },
            1,
        );
        let caps = Arc::new(Capabilities::default());
        let opts = PutOptions {
            condition: crate::store::PutCondition::IfNoneMatch,
            ..Default::default()
        };
        let mut u = StreamUpload::new(
            store.clone(),
            "k".into(),
            opts,
            small_cfg(),
            Budget::new(1 << 30),
            caps.clone(),
        );
        u.write(b"data").await.unwrap();
        u.finish().await.unwrap();
        assert!(!caps.conditional(), "conditions dropped");
        assert!(caps.checksums(), "checksums kept");
        assert_eq!(&store.get_bytes("k").unwrap()[..], b"data");
    }

    #[tokio::test]
    async fn memory_stays_near_the_budget() {
        let store = Arc::new(MockStore::new());
        store.set_latency(Some(std::time::Duration::from_millis(5)));
        let budget = Budget::new(16 << 20);
        let mut u = StreamUpload::new(
            store.clone(),
            "k".into(),
            PutOptions::default(),
            small_cfg(),
            budget.clone(),
            Arc::new(Capabilities::default()),
        );
        for chunk in data(60 << 20, 2).chunks(1 << 20) {
            u.write(chunk).await.unwrap();
        }
        u.finish().await.unwrap();
        // One part of overdraft at most beyond the budget.
        assert!(
            budget.peak() <= (16 << 20) + (5 << 20),
            "peak {}",
            budget.peak()
        );
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn continuing_copies_a_large_prefix_server_side() {
        let store = Arc::new(MockStore::new());
        let first = data(12 << 20, 4);
        let etag = store.insert("k", first.clone());
        let u = upload(&store, "k", 1 << 30);
        let mut u = u
            .continuing(CommittedPrefix {
                etag,
                size: first.len() as u64,
            })
            .await
            .unwrap();
        u.write(b"tail").await.unwrap();
        u.finish().await.unwrap();
        let mut want = first.clone();
        want.extend_from_slice(b"tail");
        assert!(store.get_bytes("k").unwrap() == want);
        assert_eq!(
            store.counters.bytes_copied.load(Ordering::Relaxed),
            first.len() as u64
        );
        assert_eq!(store.counters.bytes_uploaded.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn continuing_rereads_a_small_prefix() {
        let store = Arc::new(MockStore::new());
        let etag = store.insert("k", "head-");
        let mut u = upload(&store, "k", 1 << 30)
            .continuing(CommittedPrefix { etag, size: 5 })
            .await
            .unwrap();
        u.write(b"tail").await.unwrap();
        u.finish().await.unwrap();
        assert_eq!(&store.get_bytes("k").unwrap()[..], b"head-tail");
    }
}
