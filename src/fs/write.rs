//! Writing files: the open-file state of an inode ([`WriteState`], shared by its descriptors
//! through [`super::open_file`]) and how its bytes reach the bucket.
//!
//! A state streams bytes into a [`StreamUpload`] while they arrive in order; flush (close) and
//! fsync commit them and report failures. After a commit, more writes continue the same object
//! (its committed bytes are copied server side). A write inside existing bytes, a truncation to
//! a smaller size, or a read through the state switches it to a [`StagedFile`]: changed bytes
//! are kept locally and merged with the object at commit. Names (create, unlink, ...) are in
//! `namespace.rs`, attribute changes in `setattr.rs`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::attrs::{self, format_time, Kind};
use super::inode::Inode;
use super::open_file::OpenFile;
use super::{errno_of, Errno, FileHandle, Fs, FsResult, Pending};
use crate::data::staging::{Base, StagedFile};
use crate::data::upload::{CommittedPrefix, StreamUpload};
use crate::store::{ObjectMeta, PutCondition, PutOptions, PutResult, StoreError, UserMetadata};

/// The most one copy_file_range reply can count (32 bits), in whole pages.
#[cfg(not(test))]
pub(super) const COPY_CHUNK: u64 = u32::MAX as u64 & !4095;
/// Small enough to test a copy that takes several calls (and at least a part's minimum).
#[cfg(test)]
pub(super) const COPY_CHUNK: u64 = 6 << 20;

/// Where the bytes of an open file are, beyond what the bucket holds (`WriteState::base`).
/// One variant at a time: a file is never streaming and staged at once, an orphan never
/// uploads, and a failed file only reports its error.
/// How long a closed file waits before its background upload starts (`--write-back`): long
/// enough for the chown, chmod and utimens that tar and cp -p send right after close.
const WRITE_BACK_SETTLE: std::time::Duration = std::time::Duration::from_millis(50);
/// How long a background upload (`--write-back`) keeps retrying a transient failure (network,
/// throttling, server errors) before it fails for good, its data kept and the next fsync
/// failing with EIO.
const WRITE_BACK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);
/// Uploads queued after close at most; the next close then uploads before it returns (as it
/// does when the queued files' bytes would pass --spool-limit).
const WRITE_BACK_MAX: usize = 256;

/// The uploads `--write-back` left to run after close: how many, and which failed since the
/// last fsync reported them.
pub(super) struct WriteBack {
    slots: Arc<tokio::sync::Semaphore>,
    /// Bytes of the queued files (on local disk while they wait).
    bytes: Arc<std::sync::atomic::AtomicU64>,
    running: Arc<std::sync::atomic::AtomicUsize>,
    idle: Arc<tokio::sync::Notify>,
    failures: parking_lot::Mutex<Vec<String>>,
}

impl Default for WriteBack {
    fn default() -> Self {
        WriteBack {
            slots: Arc::new(tokio::sync::Semaphore::new(WRITE_BACK_MAX)),
            bytes: Arc::default(),
            running: Arc::default(),
            idle: Arc::default(),
            failures: parking_lot::Mutex::default(),
        }
    }
}

/// One queued upload; its end (drop) may make the queue idle.
pub(super) struct WriteBackToken {
    _slot: tokio::sync::OwnedSemaphorePermit,
    size: u64,
    bytes: Arc<std::sync::atomic::AtomicU64>,
    running: Arc<std::sync::atomic::AtomicUsize>,
    idle: Arc<tokio::sync::Notify>,
}

impl Drop for WriteBackToken {
    fn drop(&mut self) {
        self.bytes.fetch_sub(self.size, Ordering::AcqRel);
        if self.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }
}

impl WriteBack {
    /// A place in the queue for a file of `size` bytes: none when 256 files wait already, or
    /// when the file would take the queued bytes past `limit` (a file alone is always let in,
    /// as it is on disk anyway).
    fn start(&self, size: u64, limit: u64) -> Option<WriteBackToken> {
        let queued = self.bytes.fetch_add(size, Ordering::AcqRel);
        if queued > 0 && queued + size > limit {
            self.bytes.fetch_sub(size, Ordering::AcqRel);
            return None;
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            self.bytes.fetch_sub(size, Ordering::AcqRel);
            return None;
        };
        self.running.fetch_add(1, Ordering::AcqRel);
        Some(WriteBackToken {
            _slot: slot,
            size,
            bytes: self.bytes.clone(),
            running: self.running.clone(),
            idle: self.idle.clone(),
        })
    }

    fn pending(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    fn failed(&self, key: String) {
        self.failures.lock().push(key);
    }

    fn take_failure(&self) -> Option<String> {
        let mut f = self.failures.lock();
        (!f.is_empty()).then(|| f.remove(0))
    }

    async fn drain(&self) {
        loop {
            let idle = self.idle.notified();
            if self.pending() == 0 {
                return;
            }
            idle.await;
        }
    }
}

// One per open file, matched on every write: an indirection would cost more than the bytes.
#[allow(clippy::large_enum_variant)]
pub(super) enum Body {
    /// Everything written is committed: the bucket holds the file.
    Clean,
    /// Bytes arriving in order after `base`, going out as a single PUT or multipart upload.
    Streaming(StreamUpload),
    /// Changes to `base` kept in a local staging file, merged with it at commit.
    Staged(StagedFile),
    /// Unlinked while open: every byte is in the staging file (none taken from an object),
    /// nothing is uploaded again, and the file goes with the last descriptor.
    Orphan(StagedFile),
    /// An upload failed for good: every later call on the file reports this.
    Failed(Errno),
}

pub(super) struct WriteState {
    pub(super) ino: u64,
    pub(super) key: String,
    pub(super) body: Body,
    /// What the bucket holds for this key as far as this state knows (size 0 = nothing to keep).
    pub(super) base: CommittedPrefix,
    /// Logical size of the file.
    pub(super) size: u64,
    pub(super) metadata: UserMetadata,
    /// Set by an unlink of a file too large to keep locally: its commit is dropped.
    pub(super) unlinked: Arc<std::sync::atomic::AtomicBool>,
    /// What the bucket must still hold for the next commit to apply (If-Match / If-None-Match).
    pub(super) expect: PutCondition,
    /// When the bytes were last changed and the stored mtime not yet set to it.
    pub(super) last_write: Option<SystemTime>,
    /// `--supervise`: the stream's local copy and multipart upload as last journaled, so each
    /// write journals them only when they change.
    pub(super) journaled_copy: Option<(Option<std::path::PathBuf>, Option<String>)>,
}

impl WriteState {
    /// Bytes that must reach the bucket at the next commit.
    pub(super) fn dirty(&self) -> bool {
        matches!(self.body, Body::Streaming(_) | Body::Staged(_))
    }

    pub(super) fn failed(&self) -> Option<Errno> {
        match self.body {
            Body::Failed(e) => Some(e),
            _ => None,
        }
    }

    pub(super) fn orphan(&self) -> bool {
        matches!(self.body, Body::Orphan(_))
    }

    /// The local staging file, of a staged file or an orphan.
    pub(super) fn staged_mut(&mut self) -> Option<&mut StagedFile> {
        match &mut self.body {
            Body::Staged(f) | Body::Orphan(f) => Some(f),
            _ => None,
        }
    }

    pub(super) fn upload_mut(&mut self) -> Option<&mut StreamUpload> {
        match &mut self.body {
            Body::Streaming(u) => Some(u),
            _ => None,
        }
    }

    /// Take the body out, leaving the file clean.
    pub(super) fn take_body(&mut self) -> Body {
        std::mem::replace(&mut self.body, Body::Clean)
    }

    pub(super) fn ino(&self) -> u64 {
        self.ino
    }

    /// A write changed the bytes now.
    pub(super) fn touched(&mut self) {
        self.last_write = Some(SystemTime::now());
    }

    /// Store the time of the last write as mtime and ctime (unless an explicit time was set
    /// since: that one stays).
    pub(super) fn stamp_write_time(&mut self) {
        if let Some(t) = self.last_write.take() {
            self.metadata.insert("mtime".into(), format_time(t));
            self.metadata.insert("ctime".into(), format_time(t));
        }
    }
}

impl Fs {
    pub(super) fn check_writable(&self) -> FsResult<()> {
        if self.cfg.read_only {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    pub(super) fn mark_pending(&self, key: &str, ino: u64) -> Arc<std::sync::atomic::AtomicBool> {
        let mut pending = self.pending.lock();
        let p = pending.entry(key.to_string()).or_insert_with(|| Pending {
            ino,
            unlinked: Default::default(),
        });
        p.ino = ino;
        p.unlinked.clone()
    }

    pub(super) fn set_local_size(&self, ino: u64, size: u64) {
        if let Some(i) = self.inodes.lock().get_mut(ino) {
            i.attr.size = size;
            i.attr.mtime = SystemTime::now();
            i.attr.ctime = i.attr.mtime;
        }
    }

    /// A new write descriptor on `file` (already counted in `open_files`).
    pub(super) fn new_handle(&self, file: Arc<OpenFile>) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.journal_opened(fh, file.ino, super::journal::Opened::Write);
        self.files
            .lock()
            .insert(fh, Arc::new(FileHandle::Write(file)));
        fh
    }

    /// Read descriptors open on `ino`.
    pub(super) fn has_readers(&self, ino: u64) -> bool {
        self.files
            .lock()
            .values()
            .any(|h| matches!(&**h, FileHandle::Read(r) if r.ino == ino))
    }

    pub(super) fn start_upload(
        &self,
        key: &str,
        metadata: &UserMetadata,
        expect: &PutCondition,
    ) -> StreamUpload {
        let opts = PutOptions {
            metadata: metadata.clone(),
            content_type: self.content_type_of(key),
            condition: expect.clone(),
        };
        StreamUpload::new(
            self.store.clone(),
            key.to_string(),
            opts,
            self.cfg.upload,
            self.budget.clone(),
            self.caps.clone(),
        )
        .with_recovery_dir(self.recovery_dir())
    }

    /// The Content-Type a new or rewritten object named `key` gets (see [`super::mime`]).
    pub(super) fn content_type_of(&self, key: &str) -> Option<String> {
        self.cfg.infer_content_type.then(|| super::mime::guess(key))
    }

    /// Where conflicting writes leave their data: `recovered/` under the staging directory.
    pub fn recovery_dir(&self) -> std::path::PathBuf {
        self.cfg.staging_dir.join("recovered")
    }

    /// Stored metadata of an existing object, fetched if the cached entry came from a listing.
    pub(super) async fn metadata_of(
        &self,
        inode: &Inode,
    ) -> FsResult<(UserMetadata, Option<ObjectMeta>)> {
        if let Some(m) = inode.meta.as_ref().filter(|m| m.has_metadata) {
            return Ok((m.metadata.clone(), Some(m.clone())));
        }
        match self.store.head(&inode.key).await {
            Ok(m) => Ok((m.metadata.clone(), Some(m))),
            Err(StoreError::NotFound(_)) => Ok((UserMetadata::new(), None)),
            Err(e) => Err(errno_of(&e, "open for write")),
        }
    }

    pub(super) async fn open_for_write(&self, inode: &Inode, flags: i32) -> FsResult<(u64, bool)> {
        self.check_writable()?;
        if inode.kind != Kind::File {
            return Err(Errno::EINVAL);
        }
        let truncate = flags & libc::O_TRUNC != 0;
        // Another descriptor has the file open for writing: share its state.
        if let Some(file) = self.open_files.join(inode.ino) {
            if truncate {
                let mut st = file.state.lock().await;
                if let Err(e) = self.truncate_state(&mut st, 0).await {
                    drop(st);
                    self.release_writer(&file).await.ok();
                    return Err(e);
                }
            }
            return Ok((self.new_handle(file), false));
        }
        let state = self.clean_state(inode, truncate).await?;
        let (file, fresh) = self.open_files.insert_or_join(state);
        if !fresh && truncate {
            let mut st = file.state.lock().await;
            self.truncate_state(&mut st, 0).await?;
        }
        if let Some(i) = self.inodes.lock().get_mut(inode.ino) {
            i.page_cache_etag = None;
        }
        Ok((self.new_handle(file), false))
    }

    /// The state of a file opened for writing with nothing written yet: the committed object
    /// (if any) is its base; with `truncate` it starts empty, uploading a new object.
    pub(super) async fn clean_state(&self, inode: &Inode, truncate: bool) -> FsResult<WriteState> {
        let (mut metadata, meta) = self.metadata_of(inode).await?;
        let base = match (&meta, truncate) {
            (Some(m), false) => CommittedPrefix {
                etag: m.etag.clone().unwrap_or_default(),
                size: m.size,
            },
            _ => CommittedPrefix {
                etag: String::new(),
                size: 0,
            },
        };
        if truncate || meta.is_none() {
            let now = format_time(SystemTime::now());
            metadata.insert("mtime".into(), now.clone());
            metadata.insert("ctime".into(), now);
        }
        let unlinked = Default::default();
        let mut state = WriteState {
            ino: inode.ino,
            key: inode.key.clone(),
            body: Body::Clean,
            size: base.size,
            base,
            metadata,
            unlinked,
            expect: match meta.as_ref().and_then(|m| m.etag.clone()) {
                Some(etag) => PutCondition::IfMatch(etag),
                None => PutCondition::IfNoneMatch,
            },
            last_write: None,
            journaled_copy: None,
        };
        if truncate || meta.is_none() {
            state.body =
                Body::Streaming(self.start_upload(&inode.key, &state.metadata, &state.expect));
            state.unlinked = self.mark_pending(&inode.key, inode.ino);
            self.set_local_size(inode.ino, 0);
            self.journal_writing(&state);
        }
        Ok(state)
    }

    /// Truncate an open file's state to `size` (ftruncate, O_TRUNC of a second descriptor).
    pub(super) async fn truncate_state(&self, st: &mut WriteState, size: u64) -> FsResult<()> {
        if size > self.cfg.upload.max_object_size() {
            return Err(Errno::EFBIG);
        }
        if size == 0 && !st.orphan() && (st.size > 0 || !st.dirty()) {
            if let Body::Streaming(u) = st.take_body() {
                u.abort().await;
            }
            st.base = CommittedPrefix {
                etag: String::new(),
                size: 0,
            };
            st.size = 0;
            st.body = Body::Streaming(self.start_upload(&st.key, &st.metadata, &st.expect));
            st.unlinked = self.mark_pending(&st.key, st.ino);
            self.set_local_size(st.ino, 0);
        } else if size != st.size {
            if size > st.size && st.staged_mut().is_none() {
                self.fill_zeros(st, size).await?;
            } else {
                self.ensure_staged(st).await?;
                let Some(staged) = st.staged_mut() else {
                    return Err(Errno::EIO);
                };
                staged.truncate(size).map_err(|e| {
                    tracing::error!(error = %e, "cannot truncate the staging file");
                    Errno::from_io(&e)
                })?;
                st.size = size;
                self.set_local_size(st.ino, size);
            }
        }
        st.touched();
        // Where the bytes are now, for a worker started after a death (--supervise).
        if st.staged_mut().is_some() {
            self.journal_resized(st);
        } else {
            self.keep_stream_local(st).await;
        }
        Ok(())
    }

    pub(super) fn write_handle(&self, fh: u64) -> FsResult<Arc<OpenFile>> {
        let h = self.files.lock().get(&fh).cloned();
        let h = h.ok_or_else(|| self.unknown_handle(fh))?;
        match &*h {
            FileHandle::Write(file) => Ok(file.clone()),
            FileHandle::Read(..) => Err(Errno::EBADF),
        }
    }

    /// Make sure `st` has an upload positioned at the end of the file.
    pub(super) async fn ensure_upload(&self, st: &mut WriteState) -> FsResult<()> {
        if st.upload_mut().is_some() {
            return Ok(());
        }
        // Appending to a committed object: the upload carries the time of this first write
        // (a multipart upload's metadata is fixed when it is created).
        st.touched();
        st.stamp_write_time();
        let upload = self.start_upload(&st.key, &st.metadata, &st.expect);
        let upload = upload.continuing(st.base.clone()).await.map_err(|e| {
            tracing::error!(key = %st.key, error = %e, "cannot continue the committed object");
            errno_of(&e, "append")
        })?;
        st.body = Body::Streaming(upload);
        st.unlinked = self.mark_pending(&st.key, st.ino);
        Ok(())
    }

    pub(super) async fn append(&self, st: &mut WriteState, data: &[u8]) -> FsResult<()> {
        self.ensure_upload(st).await?;
        let Some(upload) = st.upload_mut() else {
            return Err(Errno::EIO);
        };
        if let Err(e) = upload.write(data).await {
            tracing::error!(key = %st.key, error = %e, "upload failed while writing");
            // Finishing a failed upload aborts it and keeps what it holds in the recovery folder.
            if let Body::Streaming(u) = st.take_body() {
                let _ = u.finish().await;
            }
            st.body = Body::Failed(Errno::EIO);
            self.pending.lock().remove(&st.key);
            self.journal_lost(st.ino);
            return Err(Errno::EIO);
        }
        st.size += data.len() as u64;
        self.set_local_size(st.ino, st.size);
        Ok(())
    }

    /// Grow the file with zeros up to `to` (holes, ftruncate up).
    pub(super) async fn fill_zeros(&self, st: &mut WriteState, to: u64) -> FsResult<()> {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        while st.size < to {
            let n = ((to - st.size) as usize).min(ZEROS.len());
            self.append(st, &ZEROS[..n]).await?;
        }
        Ok(())
    }

    pub async fn write(&self, fh: u64, offset: i64, data: &[u8]) -> FsResult<u32> {
        let file = self.write_handle(fh)?;
        let mut st = file.state.lock().await;
        if let Some(e) = st.failed() {
            return Err(e);
        }
        let offset = u64::try_from(offset).map_err(|_| Errno::EINVAL)?;
        if offset.saturating_add(data.len() as u64) > self.cfg.upload.max_object_size() {
            return Err(Errno::EFBIG);
        }
        st.touched();
        // A supervised mount appends to a committed object through a staging file, not a
        // stream continuing it (whose start is copied server side and never local): every
        // byte written stays on local disk, so a new worker can go on with the file (an
        // appender that fsyncs each line, then a worker death).
        let append_locally =
            self.journal.get().is_some() && matches!(st.body, Body::Clean) && st.base.size > 0;
        if offset < st.size || st.staged_mut().is_some() || append_locally {
            self.ensure_staged(&mut st).await?;
            let key = st.key.clone();
            let Some(staged) = st.staged_mut() else {
                return Err(Errno::EIO);
            };
            staged.write(offset, data).map_err(|e| {
                tracing::error!(key = %key, error = %e, "cannot write the staging file");
                Errno::from_io(&e)
            })?;
            st.size = staged.size();
            self.set_local_size(st.ino, st.size);
            self.journal_wrote(st.ino, offset, data.len() as u64);
            return Ok(data.len() as u32);
        }
        self.fill_zeros(&mut st, offset).await?;
        self.append(&mut st, data).await?;
        self.keep_stream_local(&mut st).await;
        Ok(data.len() as u32)
    }

    /// copy_file_range(2) within the mount, as `cp` uses it: an object copied from its start
    /// into an empty file becomes the start of that file's upload, copied server side at
    /// commit (UploadPartCopy pinned to the source's ETag; under 5 MiB, one GET), so no byte
    /// travels through the kernel. The file keeps its own metadata and commit condition. A reply
    /// counts at most 4 GiB, so a larger object takes several calls, each going on where the last
    /// stopped; a call that would leave less than a whole object under 4 GiB is refused. Anything
    /// else (other offsets, a file already written to, a source being written) gives
    /// EOPNOTSUPP, on which `cp` copies through read and write as before.
    pub async fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: i64,
        fh_out: u64,
        off_out: i64,
        len: u64,
    ) -> FsResult<u32> {
        let h_in = self.files.lock().get(&fh_in).cloned().ok_or(Errno::EBADF)?;
        let FileHandle::Read(h) = &*h_in else {
            return Err(Errno::ENOTSUP);
        };
        if self.open_files.get(h.ino).is_some() {
            // The source is being written (or unlinked): its bytes are not all in its object.
            return Err(Errno::ENOTSUP);
        }
        let reader = self.current_reader(h).await?;
        let (off_in, off_out) = match (u64::try_from(off_in), u64::try_from(off_out)) {
            (Ok(a), Ok(b)) => (a, b),
            _ => return Err(Errno::EINVAL),
        };
        let size = reader.size();
        if off_in >= size || len == 0 {
            return Ok(0);
        }
        let remaining = size - off_in;
        let n = remaining.min(len).min(COPY_CHUNK);
        let Some(etag) = reader.etag().filter(|_| off_in == off_out) else {
            return Err(Errno::ENOTSUP);
        };
        let file = self.write_handle(fh_out)?;
        let mut st = file.state.lock().await;
        if let Some(e) = st.failed() {
            return Err(e);
        }
        if !matches!(st.body, Body::Streaming(_) | Body::Clean)
            || st.size != off_out
            || st.base.size != 0
            || st.key == reader.key()
        {
            return Err(Errno::ENOTSUP);
        }
        if off_in > 0 {
            // Going on: only while the file is still nothing but the copy so far.
            let extended = st
                .upload_mut()
                .is_some_and(|u| u.extend_prefix(reader.key(), etag, off_in + n));
            if !extended {
                return Err(Errno::ENOTSUP);
            }
        } else {
            if n < remaining && n < COPY_CHUNK {
                // Only the start of an object that would fit: a plain copy does it as well.
                return Err(Errno::ENOTSUP);
            }
            if let Body::Streaming(u) = st.take_body() {
                u.abort().await;
            }
            let committed = CommittedPrefix {
                etag: etag.to_string(),
                size: n,
            };
            let upload = self
                .start_upload(&st.key, &st.metadata, &st.expect)
                .starting_with(reader.key(), size, committed)
                .await;
            match upload {
                Ok(u) => st.body = Body::Streaming(u),
                Err(e) => {
                    // The file is as it was: empty, with a fresh upload.
                    st.body = Body::Streaming(self.start_upload(&st.key, &st.metadata, &st.expect));
                    return Err(errno_of(&e, "copy_file_range"));
                }
            }
        }
        tracing::debug!(from = %reader.key(), to = %st.key, off_in, n, "copy_file_range: server-side copy");
        st.size = off_in + n;
        st.touched();
        self.set_local_size(st.ino, st.size);
        Ok(n as u32)
    }

    /// Switch the handle to local staging: what was streamed so far is committed first and
    /// becomes the base the staged changes apply to.
    pub(super) async fn ensure_staged(&self, st: &mut WriteState) -> FsResult<()> {
        match st.body {
            Body::Staged(_) | Body::Orphan(_) => return Ok(()),
            Body::Failed(e) => return Err(e),
            Body::Streaming(_) => self.commit(st).await?,
            Body::Clean => {}
        }
        let base = Base {
            key: st.key.clone(),
            etag: st.base.etag.clone(),
            size: st.base.size,
        };
        let staged = StagedFile::create(&self.cfg.staging_dir, base).map_err(|e| {
            tracing::error!(dir = %self.cfg.staging_dir.display(), error = %e, "cannot create a staging file");
            Errno::from_io(&e)
        })?;
        st.body = Body::Staged(staged);
        st.unlinked = self.mark_pending(&st.key, st.ino);
        self.journal_writing(st);
        Ok(())
    }

    /// Read through a write handle (O_RDWR): staged changes merged with the object.
    pub(super) async fn read_writer(
        &self,
        file: &OpenFile,
        offset: u64,
        size: u32,
    ) -> FsResult<bytes::Bytes> {
        let mut st = file.state.lock().await;
        if let Some(e) = st.failed() {
            return Err(e);
        }
        let end = (offset + size as u64).min(st.size);
        if offset >= end {
            return Ok(bytes::Bytes::new());
        }
        if let Body::Streaming(u) = &st.body {
            // A small file still wholly in memory reads from there; otherwise it is uploaded
            // and staged, and read from the staging file.
            if let Some(bytes) = u.read_buffered(offset, end) {
                return Ok(bytes);
            }
            self.ensure_staged(&mut st).await?;
        }
        match st.staged_mut() {
            Some(staged) => staged
                .read(self.store.as_ref(), offset, end)
                .await
                .map_err(|e| errno_of(&e, "read")),
            None => self
                .store
                .get_range(
                    &st.key,
                    crate::store::ByteRange::new(offset, end),
                    Some(&st.base.etag),
                )
                .await
                .map_err(|e| errno_of(&e, "read")),
        }
    }

    /// Upload whatever is pending so the bucket holds the file; errors are returned, not lost.
    pub(super) async fn commit(&self, st: &mut WriteState) -> FsResult<()> {
        let dropped = st.unlinked.load(Ordering::Relaxed);
        match st.take_body() {
            // Nothing to upload: everything is committed, or an orphan keeps its bytes locally
            // for its readers and never uploads them.
            body @ (Body::Clean | Body::Orphan(_)) => {
                st.body = body;
                Ok(())
            }
            Body::Failed(e) => {
                st.body = Body::Failed(e);
                Err(e)
            }
            // Unlinked while too large to keep locally: nothing goes to the bucket.
            Body::Streaming(upload) if dropped => {
                upload.abort().await;
                Ok(())
            }
            Body::Staged(_) if dropped => Ok(()),
            Body::Staged(staged) => self.commit_staged(st, staged).await,
            Body::Streaming(upload) => self.commit_streamed(st, upload).await,
        }
    }

    /// Upload a staged file: unchanged parts copied server side, changed ones uploaded.
    async fn commit_staged(&self, st: &mut WriteState, staged: StagedFile) -> FsResult<()> {
        st.stamp_write_time();
        let condition = if self.caps.conditional() {
            st.expect.clone()
        } else {
            PutCondition::Overwrite
        };
        let opts = PutOptions {
            metadata: st.metadata.clone(),
            content_type: self.content_type_of(&st.key),
            condition,
        };
        let uploaded = staged
            .upload(
                &self.store,
                &st.key,
                &opts,
                &self.cfg.upload,
                &self.budget,
                &self.caps,
            )
            .await;
        match uploaded {
            Ok(res) => {
                self.committed(st, res);
                Ok(())
            }
            Err(e) => {
                let conflict = matches!(e, StoreError::PreconditionFailed(_));
                let recovery = self.recovery_dir();
                let kept = staged.keep(conflict.then_some(recovery.as_path()));
                self.commit_failed(&st.key, &e, Some(kept.display().to_string()));
                if conflict {
                    tracing::error!(
                        key = %st.key, kept = %kept.display(),
                        "write conflict: the object changed since it was opened; it was left untouched and the changed bytes are kept"
                    );
                }
                tracing::error!(
                    key = %st.key, error = %e, kept = %kept.display(),
                    "upload of modified file failed; the object is unchanged and the changed bytes are kept in the staging file"
                );
                st.body = Body::Failed(Errno::EIO);
                self.pending.lock().remove(&st.key);
                self.journal_lost(st.ino);
                Err(Errno::EIO)
            }
        }
    }

    /// Finish a streamed upload (a single PUT, or the multipart upload's last part and
    /// completion).
    async fn commit_streamed(&self, st: &mut WriteState, mut upload: StreamUpload) -> FsResult<()> {
        if upload.multipart_started() {
            // Its metadata was fixed when it was created (with the time of the first write);
            // restamping it would copy the whole object once more.
            st.last_write = None;
        } else {
            st.stamp_write_time();
            upload.set_metadata(st.metadata.clone());
        }
        match upload.finish().await {
            Ok(res) => {
                self.committed(st, res);
                Ok(())
            }
            Err(e) => {
                self.commit_failed(&st.key, &e, None);
                tracing::error!(key = %st.key, error = %e, "upload failed; the previous object (if any) is unchanged");
                st.body = Body::Failed(Errno::EIO);
                self.pending.lock().remove(&st.key);
                self.journal_lost(st.ino);
                Err(Errno::EIO)
            }
        }
    }

    /// A commit failed for good: counted, and remembered for `s3mount status`.
    fn commit_failed(&self, key: &str, e: &StoreError, kept: Option<String>) {
        use crate::metrics as m;
        m::count(m::COMMIT_FAILURES);
        if matches!(e, StoreError::PreconditionFailed(_)) {
            m::count(m::CONFLICTS);
        }
        self.failures
            .lock()
            .push(super::status::FailedCommit::now(key, e.to_string(), kept));
    }

    /// The bucket now holds everything written through `st`, as `res` says.
    pub(super) fn committed(&self, st: &mut WriteState, res: PutResult) {
        crate::metrics::count(crate::metrics::COMMITS);
        let PutResult {
            etag,
            checksum_crc32,
        } = res;
        st.body = Body::Clean;
        self.journal_committed(st.ino);
        st.expect = match &etag {
            Some(tag) => PutCondition::IfMatch(tag.clone()),
            None => PutCondition::Overwrite,
        };
        st.base = CommittedPrefix {
            etag: etag.clone().unwrap_or_default(),
            size: st.size,
        };
        let meta = ObjectMeta {
            key: st.key.clone(),
            size: st.size,
            etag,
            last_modified: Some(SystemTime::now()),
            content_type: None,
            metadata: st.metadata.clone(),
            has_metadata: true,
            // The checksum the store reported (and the upload compared with its own): a reader
            // of this file verifies against it without a HEAD.
            checksum_crc32,
        };
        self.learn(&meta, false);
        {
            let mut table = self.inodes.lock();
            if let Some(i) = table.get_mut(st.ino) {
                i.attr = attrs::attr_from_meta(i.ino, Kind::File, Some(&meta), &self.cfg.defaults);
                i.written_etag = meta.etag.clone();
                i.meta = Some(meta);
                i.fetched = Instant::now();
                i.page_cache_etag = None;
            }
        }
        // The cached listing learns the new size before the file stops being pending: a lookup
        // in between would otherwise take the listing's entry noted at create (size 0).
        self.note_inode(st.ino);
        {
            let mut pending = self.pending.lock();
            if pending.get(&st.key).is_some_and(|p| p.ino == st.ino) {
                pending.remove(&st.key);
            }
        }
        tracing::debug!(key = %st.key, size = st.size, "committed");
    }

    /// close(2) of one descriptor: the data is in the bucket when this returns Ok. Every
    /// descriptor of the file shares its state, so this commits what any of them wrote.
    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        let Some(h) = self.files.lock().get(&fh).cloned() else {
            return self.sync_unknown(fh);
        };
        match &*h {
            FileHandle::Read(..) => Ok(()),
            FileHandle::Write(file) => {
                let mut st = file.state.lock().await;
                if self.cfg.write_back && self.me.get().is_some() {
                    // close returns once the bytes are here; the last release queues them.
                    return st.failed().map_or(Ok(()), Err);
                }
                self.commit(&mut st).await
            }
        }
    }

    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        if !self.cfg.write_back {
            return self.flush(fh).await;
        }
        // A background upload that failed for good is reported by the next fsync, whichever
        // file it is on (the data is in the recovery folder, as the log said).
        if let Some(key) = self.write_back.take_failure() {
            tracing::warn!(key = %key, "fsync reports an earlier background upload that failed");
            return Err(Errno::EIO);
        }
        let Some(h) = self.files.lock().get(&fh).cloned() else {
            return self.sync_unknown(fh);
        };
        let file = match &*h {
            FileHandle::Write(file) => file.clone(),
            FileHandle::Read(r) => match self.open_files.get(r.ino) {
                Some(file) => file,
                None => return Ok(()),
            },
        };
        let mut st = file.state.lock().await;
        self.commit(&mut st).await
    }

    /// `--write-back`: keep this filesystem's own handle, so that the last close of a file can
    /// leave its upload to a task of its own. Without it (unit tests), close commits.
    pub fn attach(self: &Arc<Self>) {
        let _ = self.me.set(Arc::downgrade(self));
    }

    /// Wait until every upload left by `--write-back` has finished (the end of the mount).
    pub async fn drain_write_back(&self) {
        self.write_back.drain().await
    }

    /// Uploads queued by `--write-back` and not finished yet.
    pub fn write_back_pending(&self) -> usize {
        self.write_back.pending()
    }

    /// The last reference to a descriptor is gone. The last descriptor of a file commits what
    /// is still uncommitted and drops the shared state (an orphan's staging file with it, once
    /// no reader is left).
    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let Some(h) = self.files.lock().remove(&fh) else {
            self.release_adopted(fh);
            return Ok(());
        };
        self.journal_closed(fh);
        match &*h {
            FileHandle::Write(file) => self.release_writer(file).await,
            FileHandle::Read(r) => {
                if let Some(file) = self.open_files.get(r.ino) {
                    let orphan_unread = || {
                        !self.inodes.lock().get(r.ino).is_some_and(|i| i.unlinked)
                            || self.has_readers(r.ino)
                    };
                    self.open_files.drop_if_unused(&file, orphan_unread);
                }
                Ok(())
            }
        }
    }

    /// One write descriptor of `file` is gone.
    pub(super) async fn release_writer(&self, file: &Arc<OpenFile>) -> FsResult<()> {
        if !self.open_files.release(file) {
            return Ok(());
        }
        if self.cfg.write_back && self.queue_write_back(file).await {
            return Ok(());
        }
        let mut st = file.state.lock().await;
        let result = if st.dirty() {
            self.commit(&mut st).await
        } else {
            Ok(())
        };
        let ino = st.ino;
        let orphan = st.orphan();
        drop(st);
        // An orphan stays while read descriptors remain (they read its local bytes).
        self.open_files
            .drop_if_unused(file, || orphan && self.has_readers(ino));
        result
    }

    /// `--write-back`: leave the upload of `file` (its last descriptor just closed) to a task of
    /// its own, started after [`WRITE_BACK_SETTLE`] so that what tools do right after close
    /// (tar's and cp -p's chown, chmod and utimens) folds into the upload instead of costing a
    /// copy each. False when there is nothing to upload, or when the bound on queued uploads
    /// is reached (then the caller commits, and the writer waits as without write-back).
    async fn queue_write_back(&self, file: &Arc<OpenFile>) -> bool {
        let size;
        {
            let mut st = file.state.lock().await;
            // Queued only with every byte on local disk: a staged file is; a stream puts
            // what it holds in memory into its spool (a crash then leaves it to recover).
            // What waits on local disk: a stream's bytes, a staged file's changed ranges.
            size = match &mut st.body {
                Body::Staged(f) => f.changed_bytes(),
                Body::Streaming(u) => {
                    if !u.persist().await {
                        return false;
                    }
                    u.progress().0
                }
                _ => return false,
            };
        }
        let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) else {
            return false;
        };
        // Queued bytes wait on local disk: at most --spool-limit of them (1 GiB by default).
        let Some(token) = self.write_back.start(size, self.cfg.upload.spool_limit) else {
            return false;
        };
        let file = file.clone();
        tokio::spawn(async move {
            let _token = token;
            tokio::time::sleep(WRITE_BACK_SETTLE).await;
            let mut st = file.state.lock().await;
            let result = if st.dirty() {
                // Nobody waits for this commit: transient failures are tried again for a while.
                crate::data::commit::patiently(WRITE_BACK_PATIENCE, me.commit(&mut st)).await
            } else {
                Ok(())
            };
            let (key, ino, orphan) = (st.key.clone(), st.ino, st.orphan());
            drop(st);
            if result.is_err() {
                tracing::error!(key = %key, "background upload (--write-back) failed; the next fsync reports it");
                me.write_back.failed(key);
            }
            me.open_files
                .drop_if_unused(&file, || orphan && me.has_readers(ino));
        });
        true
    }

    /// The open-file state of an inode, if any (setattr from utimensat/chmod carries no handle).
    pub(super) fn writer_of(&self, ino: u64) -> Option<Arc<OpenFile>> {
        self.open_files.get(ino)
    }
}
impl Fs {
    /// Before a file that is open for writing is renamed: commit what it has so far, so the
    /// object exists to be copied. Returns the handle to retarget afterwards.
    pub(super) async fn settle_writer(&self, ino: u64) -> FsResult<Option<Arc<OpenFile>>> {
        let Some(file) = self.writer_of(ino) else {
            return Ok(None);
        };
        self.commit(&mut *file.state.lock().await).await?;
        Ok(Some(file))
    }

    /// `--write-back`: a file renamed before any of it was uploaded (queued after close, or
    /// still being written; never committed) moves where its upload will go, instead of being
    /// uploaded, copied and deleted (rsync writes every file to a temporary name first). Only
    /// a new file (its commit is If-None-Match, kept for the new key) of a stream that has
    /// sent nothing. True when moved.
    pub(super) async fn retarget_unuploaded(&self, ino: u64, src_key: &str, dst_key: &str) -> bool {
        if !self.cfg.write_back {
            return false;
        }
        let Some(file) = self.writer_of(ino) else {
            return false;
        };
        let content_type = self.content_type_of(dst_key);
        let mut st = file.state.lock().await;
        if st.key != src_key || st.expect != PutCondition::IfNoneMatch {
            return false;
        }
        let Body::Streaming(upload) = &mut st.body else {
            return false;
        };
        if !upload.retarget(dst_key, content_type) {
            return false;
        }
        st.key = dst_key.to_string();
        let mut pending = self.pending.lock();
        if let Some(p) = pending.remove(src_key) {
            pending.insert(dst_key.to_string(), p);
        }
        true
    }

    /// After the rename: later writes through the handle continue the object at its new key.
    pub(super) async fn retarget_writer(
        &self,
        file: &OpenFile,
        new_key: &str,
        new_etag: Option<String>,
    ) {
        let mut st = file.state.lock().await;
        st.key = new_key.to_string();
        if let Some(tag) = new_etag {
            st.expect = PutCondition::IfMatch(tag.clone());
            st.base.etag = tag;
        }
    }
}
