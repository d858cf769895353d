//! Creating, replacing, appending to and deleting files and directories.
//!
//! A write handle streams its bytes into a [`StreamUpload`] while they arrive in order; flush
//! (close) and fsync make them durable and report failures. After a commit, more writes continue
//! the same object (its committed bytes are copied server side). A write inside existing bytes,
//! a truncation to a smaller size, or a read through the handle switches it to a
//! [`StagedFile`]: changed bytes are kept locally and merged with the object at commit.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::attrs::{self, format_time, Attr, Kind, S_IFDIR, S_IFMT, S_IFREG};
use super::dir::{invalid_name_reason, DirEntry};
use super::inode::Inode;
use super::open_file::OpenFile;
use super::{errno_of, Errno, FileHandle, Fs, FsResult, Pending};
use crate::data::staging::{Base, StagedFile};
use crate::data::upload::{CommittedPrefix, StreamUpload};
use crate::store::{ObjectMeta, PutCondition, PutOptions, PutResult, StoreError, UserMetadata};

/// Who is asking (for the owner of new files and directories).
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// Attribute changes requested by setattr.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub mtime: Option<SystemTime>,
    pub atime: Option<SystemTime>,
    /// Clear set-user-ID, and set-group-ID where the group may execute, as a chown or an
    /// unprivileged truncate must (the kernel leaves it to us: FUSE_HANDLE_KILLPRIV_V2).
    /// Regular files only; an explicit `mode` in the same request wins.
    pub kill_suid_sgid: bool,
}

/// The most one copy_file_range reply can count (32 bits), in whole pages.
#[cfg(not(test))]
pub(super) const COPY_CHUNK: u64 = u32::MAX as u64 & !4095;
/// Small enough to test a copy that takes several calls (and at least a part's minimum).
#[cfg(test)]
pub(super) const COPY_CHUNK: u64 = 6 << 20;

/// `mode` without set-user-ID, and without set-group-ID when the group may execute (a
/// set-group-ID bit without group execute means mandatory locking and stays).
pub fn without_suid_sgid(mode: u32) -> u32 {
    let mut m = mode & !libc::S_ISUID;
    if mode & 0o010 != 0 {
        m &= !libc::S_ISGID;
    }
    m
}

pub(super) struct WriteState {
    ino: u64,
    key: String,
    /// Upload in progress; None when everything written so far is committed.
    upload: Option<StreamUpload>,
    /// What the bucket holds for this key as far as this handle knows (size 0 = nothing to keep).
    base: CommittedPrefix,
    /// Logical size of the file.
    size: u64,
    /// Bytes that must reach the bucket at the next flush.
    dirty: bool,
    /// A failed upload poisons the handle: every later call reports it.
    error: Option<Errno>,
    metadata: UserMetadata,
    unlinked: Arc<std::sync::atomic::AtomicBool>,
    /// Local changes to the committed object (in-place modification).
    staged: Option<StagedFile>,
    /// What the bucket must still hold for the next commit to apply (If-Match / If-None-Match).
    expect: PutCondition,
    /// When the bytes were last changed and the stored mtime not yet set to it.
    last_write: Option<SystemTime>,
    /// Unlinked while open: every byte is in `staged` (none taken from an object), nothing is
    /// uploaded again, and the staging file goes with the last descriptor.
    orphan: bool,
}

impl WriteState {
    pub(super) fn ino(&self) -> u64 {
        self.ino
    }

    /// A write changed the bytes now.
    fn touched(&mut self) {
        self.last_write = Some(SystemTime::now());
    }

    /// Store the time of the last write as mtime and ctime (unless an explicit time was set
    /// since: that one stays).
    fn stamp_write_time(&mut self) {
        if let Some(t) = self.last_write.take() {
            self.metadata.insert("mtime".into(), format_time(t));
            self.metadata.insert("ctime".into(), format_time(t));
        }
    }
}

/// Apply a setattr to stored metadata of an object of `kind`: mode (with the kind's type
/// bits), owner, times; ctime becomes now when anything changes.
fn apply_metadata(md: &mut UserMetadata, req: &SetAttr, kind: Kind) {
    let now = SystemTime::now();
    if let Some(m) = req.mode {
        md.insert("mode".into(), ((m & 0o7777) | kind.type_bits()).to_string());
    }
    if let Some(u) = req.uid {
        md.insert("uid".into(), u.to_string());
    }
    if let Some(g) = req.gid {
        md.insert("gid".into(), g.to_string());
    }
    if let Some(t) = req.mtime {
        md.insert("mtime".into(), format_time(t));
    }
    if let Some(t) = req.atime {
        md.insert("atime".into(), format_time(t));
    }
    if req.kill_suid_sgid && req.mode.is_none() && !kind.is_dir() {
        drop_set_id_bits(md);
    }
    if req.changes_metadata() || req.size.is_some() {
        md.insert("ctime".into(), format_time(now));
    }
}

impl SetAttr {
    /// Does this request change anything stored in metadata (besides the size)?
    fn changes_metadata(&self) -> bool {
        self.mode.is_some()
            || self.uid.is_some()
            || self.gid.is_some()
            || self.mtime.is_some()
            || self.atime.is_some()
    }
}

/// Clear set-user-ID/set-group-ID in a stored `mode` (see [`without_suid_sgid`]); false when
/// there is no stored mode to change.
fn drop_set_id_bits(md: &mut UserMetadata) -> bool {
    let Some(mode) = md.get("mode").and_then(|m| m.trim().parse::<u32>().ok()) else {
        return false;
    };
    md.insert("mode".into(), without_suid_sgid(mode).to_string());
    true
}

fn new_file_metadata(mode: u32, caller: Caller, now: SystemTime) -> UserMetadata {
    let mut md = UserMetadata::new();
    md.insert("mode".into(), ((mode & 0o7777) | S_IFREG).to_string());
    md.insert("uid".into(), caller.uid.to_string());
    md.insert("gid".into(), caller.gid.to_string());
    md.insert("mtime".into(), format_time(now));
    md.insert("ctime".into(), format_time(now));
    md
}

impl Fs {
    fn check_writable(&self) -> FsResult<()> {
        if self.cfg.read_only {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    pub(super) fn check_new_name(name: &[u8]) -> FsResult<&str> {
        let name = std::str::from_utf8(name).map_err(|_| Errno::EINVAL)?;
        if name.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        if invalid_name_reason(name).is_some() {
            return Err(Errno::EINVAL);
        }
        Ok(name)
    }

    /// Forget cached knowledge about `key` in directory `dir_key` after a change.
    pub(super) fn invalidate(&self, dir_key: &str, key: &str) {
        self.listings_changed();
        self.listings.lock().pop(dir_key);
        self.negative.lock().pop(key);
        self.negative.lock().pop(key.trim_end_matches('/'));
    }

    /// Record a change we made in the cached listing of `dir_key` (if it is cached), so the
    /// next lookups in a directory being filled need no request. `None` removes the entry.
    pub(super) fn note_entry(&self, dir_key: &str, name: &str, entry: Option<DirEntry>) {
        self.listings_changed();
        let mut listings = self.listings.lock();
        if let Some((_, listing)) = listings.get_mut(dir_key) {
            let l = Arc::make_mut(listing);
            match entry {
                Some(e) => l.entries.insert(name.to_string(), e),
                None => l.entries.remove(name),
            };
        }
        let key = format!("{dir_key}{name}");
        let mut negative = self.negative.lock();
        negative.pop(&key);
    }

    /// Refresh the parent's cached listing entry of `ino` from the inode (after setattr).
    fn note_inode(&self, ino: u64) {
        let found = {
            let table = self.inodes.lock();
            table.get(ino).and_then(|i| {
                let parent = table.get(i.parent)?;
                Some((
                    parent.key.clone(),
                    i.name.clone(),
                    DirEntry {
                        kind: i.kind,
                        meta: i.meta.clone(),
                    },
                ))
            })
        };
        if let Some((dir_key, name, entry)) = found {
            self.note_entry(&dir_key, &name, Some(entry));
        }
    }

    pub(super) fn pending_attr(&self, key: &str) -> Option<Attr> {
        let ino = self.pending.lock().get(key)?.ino;
        self.inodes.lock().get(ino).map(|i| i.attr)
    }

    /// Files being written show in their directory with their current size.
    pub(super) fn add_pending_entries(
        &self,
        dir_ino: u64,
        dir_key: &str,
        entries: &mut std::collections::BTreeMap<String, DirEntry>,
    ) {
        let pending: Vec<(String, u64)> = self
            .pending
            .lock()
            .iter()
            .filter(|(k, _)| {
                k.strip_prefix(dir_key)
                    .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'))
            })
            .map(|(k, p)| (k[dir_key.len()..].to_string(), p.ino))
            .collect();
        let table = self.inodes.lock();
        for (name, ino) in pending {
            if let Some(i) = table.get(ino).filter(|i| i.parent == dir_ino) {
                let meta = ObjectMeta {
                    key: i.key.clone(),
                    size: i.attr.size,
                    last_modified: Some(i.attr.mtime),
                    ..Default::default()
                };
                entries.insert(
                    name,
                    DirEntry {
                        kind: Kind::File,
                        meta: Some(meta),
                    },
                );
            }
        }
    }

    fn mark_pending(&self, key: &str, ino: u64) -> Arc<std::sync::atomic::AtomicBool> {
        let mut pending = self.pending.lock();
        let p = pending.entry(key.to_string()).or_insert_with(|| Pending {
            ino,
            unlinked: Default::default(),
        });
        p.ino = ino;
        p.unlinked.clone()
    }

    fn set_local_size(&self, ino: u64, size: u64) {
        if let Some(i) = self.inodes.lock().get_mut(ino) {
            i.attr.size = size;
            i.attr.mtime = SystemTime::now();
            i.attr.ctime = i.attr.mtime;
        }
    }

    /// A new write descriptor on `file` (already counted in `open_files`).
    fn new_handle(&self, file: Arc<OpenFile>) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files
            .lock()
            .insert(fh, Arc::new(FileHandle::Write(file)));
        fh
    }

    /// The parent directory changed (an entry created, removed or renamed): its mtime and
    /// ctime are now, as this mount shows them.
    pub(super) fn touch_dir(&self, dir_ino: u64) {
        if let Some(i) = self.inodes.lock().get_mut(dir_ino) {
            let now = SystemTime::now();
            i.attr.mtime = now;
            i.attr.ctime = now;
        }
    }

    /// Read descriptors open on `ino`.
    pub(super) fn has_readers(&self, ino: u64) -> bool {
        self.files
            .lock()
            .values()
            .any(|h| matches!(&**h, FileHandle::Read(r) if r.ino == ino))
    }

    fn start_upload(
        &self,
        key: &str,
        metadata: &UserMetadata,
        expect: &PutCondition,
    ) -> StreamUpload {
        let opts = PutOptions {
            metadata: metadata.clone(),
            content_type: self.content_type_of(key),
            condition: expect.clone(),
            ..Default::default()
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
    async fn metadata_of(&self, inode: &Inode) -> FsResult<(UserMetadata, Option<ObjectMeta>)> {
        if let Some(m) = inode.meta.as_ref().filter(|m| m.has_metadata) {
            return Ok((m.metadata.clone(), Some(m.clone())));
        }
        match self.store.head(&inode.key).await {
            Ok(m) => Ok((m.metadata.clone(), Some(m))),
            Err(StoreError::NotFound(_)) => Ok((UserMetadata::new(), None)),
            Err(e) => Err(errno_of(&e, "open for write")),
        }
    }

    pub async fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> FsResult<(Attr, u64)> {
        self.check_writable()?;
        let parent = self.dir_inode(parent)?;
        let name = Self::check_new_name(name)?;
        let key = format!("{}{name}", parent.key);
        let now = SystemTime::now();
        let metadata = new_file_metadata(mode, caller, now);
        let meta = ObjectMeta {
            key: key.clone(),
            metadata: metadata.clone(),
            has_metadata: true,
            last_modified: Some(now),
            ..Default::default()
        };
        let entry = DirEntry {
            kind: Kind::File,
            meta: Some(meta),
        };
        let attr = self.remember_entry(&parent, name, &entry);
        let unlinked = self.mark_pending(&key, attr.ino);
        self.note_entry(&parent.key, name, Some(entry));
        self.touch_dir(parent.ino);
        let _ = flags;
        let state = WriteState {
            ino: attr.ino,
            key: key.clone(),
            upload: Some(self.start_upload(&key, &metadata, &PutCondition::IfNoneMatch)),
            base: CommittedPrefix {
                etag: String::new(),
                size: 0,
            },
            size: 0,
            dirty: true,
            error: None,
            metadata,
            unlinked,
            staged: None,
            expect: PutCondition::IfNoneMatch,
            last_write: None,
            orphan: false,
        };
        let (file, fresh) = self.open_files.insert_or_join(state);
        if !fresh {
            // A state this mount still holds for the name (its object gone meanwhile): the new
            // file starts empty within it.
            let mut st = file.state.lock().await;
            self.truncate_state(&mut st, 0).await?;
        }
        Ok((attr, self.new_handle(file)))
    }

    /// mknod(2): a regular file is created empty; a FIFO, socket or device node is stored as
    /// s3fs stores it, an empty object whose mode says what it is (and `rdev` its device).
    pub async fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> FsResult<Attr> {
        let bits = mode & S_IFMT;
        if bits == S_IFREG || bits == 0 {
            let (attr, fh) = self
                .create(parent, name, mode & 0o7777, libc::O_WRONLY, caller)
                .await?;
            let flushed = self.flush(fh).await;
            self.release(fh).await?;
            flushed?;
            return Ok(self.attr_of(attr.ino).unwrap_or(attr));
        }
        let kind = match attrs::kind_from_meta(&ObjectMeta {
            metadata: [("mode".to_string(), mode.to_string())].into(),
            ..Default::default()
        }) {
            Some(k @ Kind::Special(_)) => k,
            _ => return Err(Errno::EINVAL),
        };
        self.check_writable()?;
        let parent = self.dir_inode(parent)?;
        let name = Self::check_new_name(name)?;
        let key = format!("{}{name}", parent.key);
        let now = SystemTime::now();
        let mut metadata = new_file_metadata(mode, caller, now);
        metadata.insert("mode".into(), ((mode & 0o7777) | bits).to_string());
        if matches!(bits, attrs::S_IFCHR | attrs::S_IFBLK) {
            metadata.insert("rdev".into(), rdev.to_string());
        }
        let entry = self
            .put_empty_object(&key, metadata, now, kind, "mknod")
            .await?;
        self.note_entry(&parent.key, name, Some(entry.clone()));
        self.touch_dir(parent.ino);
        Ok(self.remember_entry(&parent, name, &entry))
    }

    /// Store an empty object with `metadata` (a special file) and return its listing entry.
    async fn put_empty_object(
        &self,
        key: &str,
        metadata: UserMetadata,
        now: SystemTime,
        kind: Kind,
        op: &str,
    ) -> FsResult<DirEntry> {
        let opts = PutOptions {
            metadata: metadata.clone(),
            ..Default::default()
        };
        let res = self
            .store
            .put(
                key,
                bytes::Bytes::new(),
                &opts,
                self.caps.checksums().then_some(0),
            )
            .await
            .map_err(|e| errno_of(&e, op))?;
        let meta = ObjectMeta {
            key: key.to_string(),
            etag: res.etag,
            metadata,
            has_metadata: true,
            last_modified: Some(now),
            ..Default::default()
        };
        self.learn(&meta, false);
        Ok(DirEntry {
            kind,
            meta: Some(meta),
        })
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
    async fn clean_state(&self, inode: &Inode, truncate: bool) -> FsResult<WriteState> {
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
            upload: None,
            size: base.size,
            base,
            dirty: false,
            error: None,
            metadata,
            unlinked,
            staged: None,
            expect: match meta.as_ref().and_then(|m| m.etag.clone()) {
                Some(etag) => PutCondition::IfMatch(etag),
                None => PutCondition::IfNoneMatch,
            },
            last_write: None,
            orphan: false,
        };
        if truncate || meta.is_none() {
            state.upload = Some(self.start_upload(&inode.key, &state.metadata, &state.expect));
            state.dirty = true;
            state.unlinked = self.mark_pending(&inode.key, inode.ino);
            self.set_local_size(inode.ino, 0);
        }
        Ok(state)
    }

    /// Truncate an open file's state to `size` (ftruncate, O_TRUNC of a second descriptor).
    async fn truncate_state(&self, st: &mut WriteState, size: u64) -> FsResult<()> {
        if size > self.cfg.upload.max_object_size() {
            return Err(Errno::EFBIG);
        }
        if size == 0 && !st.orphan && (st.size > 0 || !st.dirty) {
            if let Some(u) = st.upload.take() {
                u.abort().await;
            }
            st.staged = None;
            st.base = CommittedPrefix {
                etag: String::new(),
                size: 0,
            };
            st.size = 0;
            st.upload = Some(self.start_upload(&st.key, &st.metadata, &st.expect));
            st.dirty = true;
            st.unlinked = self.mark_pending(&st.key, st.ino);
            self.set_local_size(st.ino, 0);
        } else if size != st.size {
            if size > st.size && st.staged.is_none() {
                self.fill_zeros(st, size).await?;
            } else {
                self.ensure_staged(st).await?;
                let Some(staged) = st.staged.as_mut() else {
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
        Ok(())
    }

    fn write_handle(&self, fh: u64) -> FsResult<Arc<OpenFile>> {
        let h = self.files.lock().get(&fh).cloned().ok_or(Errno::EBADF)?;
        match &*h {
            FileHandle::Write(file) => Ok(file.clone()),
            FileHandle::Read(..) => Err(Errno::EBADF),
        }
    }

    /// Make sure `st` has an upload positioned at the end of the file.
    async fn ensure_upload(&self, st: &mut WriteState) -> FsResult<()> {
        if st.upload.is_some() {
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
        st.upload = Some(upload);
        st.dirty = true;
        st.unlinked = self.mark_pending(&st.key, st.ino);
        Ok(())
    }

    async fn append(&self, st: &mut WriteState, data: &[u8]) -> FsResult<()> {
        self.ensure_upload(st).await?;
        let Some(upload) = st.upload.as_mut() else {
            return Err(Errno::EIO);
        };
        if let Err(e) = upload.write(data).await {
            tracing::error!(key = %st.key, error = %e, "upload failed while writing");
            st.error = Some(Errno::EIO);
            return Err(Errno::EIO);
        }
        st.size += data.len() as u64;
        self.set_local_size(st.ino, st.size);
        Ok(())
    }

    /// Grow the file with zeros up to `to` (holes, ftruncate up).
    async fn fill_zeros(&self, st: &mut WriteState, to: u64) -> FsResult<()> {
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
        if let Some(e) = st.error {
            return Err(e);
        }
        let offset = u64::try_from(offset).map_err(|_| Errno::EINVAL)?;
        if offset.saturating_add(data.len() as u64) > self.cfg.upload.max_object_size() {
            return Err(Errno::EFBIG);
        }
        st.touched();
        if offset < st.size || st.staged.is_some() {
            self.ensure_staged(&mut st).await?;
            let key = st.key.clone();
            let Some(staged) = st.staged.as_mut() else {
                return Err(Errno::EIO);
            };
            staged.write(offset, data).map_err(|e| {
                tracing::error!(key = %key, error = %e, "cannot write the staging file");
                Errno::from_io(&e)
            })?;
            st.size = staged.size();
            self.set_local_size(st.ino, st.size);
            return Ok(data.len() as u32);
        }
        self.fill_zeros(&mut st, offset).await?;
        self.append(&mut st, data).await?;
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
        let reader = self.current_reader(h);
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
        if let Some(e) = st.error {
            return Err(e);
        }
        if st.orphan
            || st.size != off_out
            || st.base.size != 0
            || st.staged.is_some()
            || st.key == reader.key()
        {
            return Err(Errno::ENOTSUP);
        }
        if off_in > 0 {
            // Going on: only while the file is still nothing but the copy so far.
            let extended = st
                .upload
                .as_mut()
                .is_some_and(|u| u.extend_prefix(reader.key(), etag, off_in + n));
            if !extended {
                return Err(Errno::ENOTSUP);
            }
        } else {
            if n < remaining && n < COPY_CHUNK {
                // Only the start of an object that would fit: a plain copy does it as well.
                return Err(Errno::ENOTSUP);
            }
            if let Some(u) = st.upload.take() {
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
                Ok(u) => st.upload = Some(u),
                Err(e) => {
                    // The handle is as it was: empty, with a fresh upload.
                    st.upload = Some(self.start_upload(&st.key, &st.metadata, &st.expect));
                    return Err(errno_of(&e, "copy_file_range"));
                }
            }
        }
        tracing::debug!(from = %reader.key(), to = %st.key, off_in, n, "copy_file_range: server-side copy");
        st.size = off_in + n;
        st.dirty = true;
        st.touched();
        self.set_local_size(st.ino, st.size);
        Ok(n as u32)
    }

    /// fallocate(2): S3 has no space to reserve, so a plain allocation only extends the file
    /// with zeros (as ftruncate would) and FALLOC_FL_KEEP_SIZE does nothing. Punching or
    /// collapsing holes gives EOPNOTSUPP. (posix_fallocate's fallback would otherwise write a
    /// byte into every 4 KiB block.)
    pub async fn fallocate(
        &self,
        ino: u64,
        fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
    ) -> FsResult<()> {
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return Err(Errno::ENOTSUP);
        }
        let (Ok(offset), Ok(length)) = (u64::try_from(offset), u64::try_from(length)) else {
            return Err(Errno::EINVAL);
        };
        if length == 0 {
            return Err(Errno::EINVAL);
        }
        let end = offset
            .checked_add(length)
            .filter(|end| *end <= self.cfg.upload.max_object_size())
            .ok_or(Errno::EFBIG)?;
        let size = self.inode(ino)?.attr.size;
        if mode & libc::FALLOC_FL_KEEP_SIZE != 0 || end <= size {
            return Ok(());
        }
        let req = SetAttr {
            size: Some(end),
            ..Default::default()
        };
        self.setattr(ino, Some(fh), req).await.map(|_| ())
    }

    /// After a write by a process without CAP_FSETID (FUSE_WRITE_KILL_SUIDGID): the file loses
    /// set-user-ID and set-group-ID as on a local filesystem. Nothing to do, and no lock taken,
    /// for a file without them.
    pub async fn kill_suid_sgid(&self, ino: u64, fh: u64) -> FsResult<()> {
        let perm = self.attr_of(ino).map_or(0, |a| a.perm as u32);
        if without_suid_sgid(perm) == perm {
            return Ok(());
        }
        let file = self.write_handle(fh)?;
        let mut st = file.state.lock().await;
        if !drop_set_id_bits(&mut st.metadata) {
            return Ok(());
        }
        self.settle_handle_metadata(&mut st, true).await.map(|_| ())
    }

    /// Switch the handle to local staging: what was streamed so far is committed first and
    /// becomes the base the staged changes apply to.
    async fn ensure_staged(&self, st: &mut WriteState) -> FsResult<()> {
        if st.staged.is_some() {
            return Ok(());
        }
        if st.dirty && st.upload.is_some() {
            self.commit(st).await?;
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
        st.staged = Some(staged);
        st.dirty = true;
        st.unlinked = self.mark_pending(&st.key, st.ino);
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
        if let Some(e) = st.error {
            return Err(e);
        }
        let end = (offset + size as u64).min(st.size);
        if offset >= end {
            return Ok(bytes::Bytes::new());
        }
        if st.staged.is_none() && st.dirty {
            self.ensure_staged(&mut st).await?;
        }
        match &st.staged {
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
    async fn commit(&self, st: &mut WriteState) -> FsResult<()> {
        if let Some(e) = st.error {
            return Err(e);
        }
        if !st.dirty {
            return Ok(());
        }
        if st.orphan || st.unlinked.load(Ordering::Relaxed) {
            // Unlinked: nothing goes to the bucket; an orphan keeps its bytes for its readers.
            if !st.orphan {
                st.staged = None;
                if let Some(upload) = st.upload.take() {
                    upload.abort().await;
                }
            }
            st.dirty = false;
            return Ok(());
        }
        if let Some(staged) = st.staged.take() {
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
                ..Default::default()
            };
            return match staged
                .upload(
                    &self.store,
                    &st.key,
                    &opts,
                    &self.cfg.upload,
                    &self.budget,
                    &self.caps,
                )
                .await
            {
                Ok(res) => {
                    self.committed(st, res);
                    Ok(())
                }
                Err(e) => {
                    let conflict = matches!(e, StoreError::PreconditionFailed(_));
                    let recovery = self.recovery_dir();
                    let kept = staged.keep(conflict.then_some(recovery.as_path()));
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
                    st.error = Some(Errno::EIO);
                    self.pending.lock().remove(&st.key);
                    Err(Errno::EIO)
                }
            };
        }
        let Some(mut upload) = st.upload.take() else {
            return Ok(());
        };
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
                tracing::error!(key = %st.key, error = %e, "upload failed; the previous object (if any) is unchanged");
                st.error = Some(Errno::EIO);
                self.pending.lock().remove(&st.key);
                Err(Errno::EIO)
            }
        }
    }

    /// The bucket now holds everything written through `st`, as `res` says.
    fn committed(&self, st: &mut WriteState, res: PutResult) {
        let PutResult {
            etag,
            checksum_crc32,
        } = res;
        st.dirty = false;
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
            return Err(Errno::EBADF);
        };
        match &*h {
            FileHandle::Read(..) => Ok(()),
            FileHandle::Write(file) => {
                let mut st = file.state.lock().await;
                self.commit(&mut st).await
            }
        }
    }

    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        self.flush(fh).await
    }

    /// The last reference to a descriptor is gone. The last descriptor of a file commits what
    /// is still uncommitted and drops the shared state (an orphan's staging file with it, once
    /// no reader is left).
    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let Some(h) = self.files.lock().remove(&fh) else {
            return Ok(());
        };
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
        let mut st = file.state.lock().await;
        let result = if st.dirty && st.error.is_none() {
            self.commit(&mut st).await
        } else {
            Ok(())
        };
        let ino = st.ino;
        let orphan = st.orphan;
        drop(st);
        // An orphan stays while read descriptors remain (they read its local bytes).
        self.open_files
            .drop_if_unused(file, || orphan && self.has_readers(ino));
        result
    }

    /// The open-file state of an inode, if any (setattr from utimensat/chmod carries no handle).
    pub(super) fn writer_of(&self, ino: u64) -> Option<Arc<OpenFile>> {
        self.open_files.get(ino)
    }

    /// chmod/chown/utimens/truncate.
    pub async fn setattr(&self, ino: u64, fh: Option<u64>, req: SetAttr) -> FsResult<Attr> {
        self.check_writable()?;
        let inode = self.inode(ino)?;
        if req
            .size
            .is_some_and(|n| n > self.cfg.upload.max_object_size())
        {
            return Err(Errno::EFBIG);
        }
        let handle = fh
            .and_then(|fh| self.write_handle(fh).ok())
            .or_else(|| self.writer_of(ino));
        let perm = inode.attr.perm as u32;
        let metadata_change = req.changes_metadata()
            || (req.kill_suid_sgid && !inode.kind.is_dir() && without_suid_sgid(perm) != perm);
        if let Some(file) = &handle {
            let mut st = file.state.lock().await;
            if let Some(e) = st.error {
                return Err(e);
            }
            if let Some(size) = req.size {
                self.truncate_state(&mut st, size).await?;
            }
            if req.mtime.is_some() {
                st.last_write = None;
            }
            apply_metadata(&mut st.metadata, &req, Kind::File);
            if st.orphan {
                return self.settle_orphan_metadata(&mut st);
            }
            return self.settle_handle_metadata(&mut st, metadata_change).await;
        }
        if inode.kind == Kind::Dir {
            return self.setattr_dir(&inode, &req).await;
        }
        let (mut metadata, meta) = self.metadata_of(&inode).await?;
        let meta = meta.ok_or(Errno::ENOENT)?;
        match req.size {
            Some(0) => {
                apply_metadata(&mut metadata, &req, inode.kind);
                metadata.insert(
                    "mtime".into(),
                    format_time(req.mtime.unwrap_or_else(SystemTime::now)),
                );
                let opts = PutOptions {
                    metadata: metadata.clone(),
                    content_type: self.content_type_of(&inode.key),
                    ..Default::default()
                };
                let crc = self.caps.checksums().then_some(0);
                let res = self
                    .store
                    .put(&inode.key, bytes::Bytes::new(), &opts, crc)
                    .await
                    .map_err(|e| errno_of(&e, "truncate"))?;
                return Ok(self.store_committed(ino, &inode.key, 0, res, metadata));
            }
            Some(n) if n != meta.size => {
                // truncate(2) on a closed file: stage the size change against the object.
                let base = Base {
                    key: inode.key.clone(),
                    etag: meta.etag.clone().unwrap_or_default(),
                    size: meta.size,
                };
                let mut staged = StagedFile::create(&self.cfg.staging_dir, base).map_err(|e| {
                    tracing::error!(dir = %self.cfg.staging_dir.display(), error = %e, "cannot create a staging file");
                    Errno::EIO
                })?;
                staged.truncate(n).map_err(|_| Errno::EIO)?;
                apply_metadata(&mut metadata, &req, inode.kind);
                metadata.insert(
                    "mtime".into(),
                    format_time(req.mtime.unwrap_or_else(SystemTime::now)),
                );
                let opts = PutOptions {
                    metadata: metadata.clone(),
                    content_type: self.content_type_of(&inode.key),
                    ..Default::default()
                };
                let res = staged
                    .upload(
                        &self.store,
                        &inode.key,
                        &opts,
                        &self.cfg.upload,
                        &self.budget,
                        &self.caps,
                    )
                    .await
                    .map_err(|e| errno_of(&e, "truncate"))?;
                return Ok(self.store_committed(ino, &inode.key, n, res, metadata));
            }
            _ => {}
        }
        if !metadata_change {
            return Ok(inode.attr);
        }
        apply_metadata(&mut metadata, &req, inode.kind);
        self.rewrite_file_metadata(&inode, &meta, metadata).await
    }

    /// An orphan's attributes change in memory only (it has no object any more).
    fn settle_orphan_metadata(&self, st: &mut WriteState) -> FsResult<Attr> {
        let meta = ObjectMeta {
            key: st.key.clone(),
            size: st.size,
            metadata: st.metadata.clone(),
            has_metadata: true,
            ..Default::default()
        };
        let mut table = self.inodes.lock();
        let i = table.get_mut(st.ino).ok_or(Errno::ENOENT)?;
        i.attr = attrs::attr_from_meta(st.ino, Kind::File, Some(&meta), &self.cfg.defaults);
        i.attr.nlink = 0;
        Ok(i.attr)
    }

    /// Metadata of a write handle changed (`changed`) or may have: a committed handle has it
    /// rewritten server side now, an uncommitted one carries it into its commit.
    async fn settle_handle_metadata(&self, st: &mut WriteState, changed: bool) -> FsResult<Attr> {
        let ino = st.ino;
        if changed && !st.dirty {
            // Committed already: rewrite the metadata server side.
            let etag = st.base.etag.clone();
            let new_etag = self
                .replace_metadata(&st.key, &etag, &st.metadata, None)
                .await?;
            st.base.etag = new_etag.clone();
            st.expect = PutCondition::IfMatch(new_etag.clone());
            return Ok(self.store_committed(
                ino,
                &st.key,
                st.size,
                copied(new_etag),
                st.metadata.clone(),
            ));
        }
        let md = st.metadata.clone();
        if let Some(u) = st.upload.as_mut() {
            u.set_metadata(md);
        }
        // The attributes as they will be stored: with the time of writes not stamped yet.
        let mut metadata = st.metadata.clone();
        if let Some(t) = st.last_write {
            metadata.insert("mtime".into(), format_time(t));
            metadata.insert("ctime".into(), format_time(t));
        }
        let meta = ObjectMeta {
            key: st.key.clone(),
            size: st.size,
            metadata,
            has_metadata: true,
            ..Default::default()
        };
        let mut table = self.inodes.lock();
        let i = table.get_mut(ino).ok_or(Errno::ENOENT)?;
        i.attr = attrs::attr_from_meta(ino, Kind::File, Some(&meta), &self.cfg.defaults);
        Ok(i.attr)
    }

    /// Store `metadata` on the closed file `inode` (whose object is `meta`) with a server-side
    /// copy onto itself.
    async fn rewrite_file_metadata(
        &self,
        inode: &Inode,
        meta: &ObjectMeta,
        metadata: UserMetadata,
    ) -> FsResult<Attr> {
        let etag = meta.etag.clone().unwrap_or_default();
        let new_etag = self
            .replace_metadata(&inode.key, &etag, &metadata, meta.content_type.clone())
            .await?;
        Ok(self.store_committed(inode.ino, &inode.key, meta.size, copied(new_etag), metadata))
    }

    /// Change the stored metadata of `ino` with `edit`, wherever it lives now: in the upload
    /// of a file being written, on the committed object (a copy onto itself), or on a
    /// directory's marker (written for an implicit directory). Refused for symlinks and for the
    /// root of a whole-bucket mount, which have no metadata of their own to change.
    pub(super) async fn edit_metadata(
        &self,
        ino: u64,
        edit: impl FnOnce(&mut UserMetadata) -> FsResult<()>,
    ) -> FsResult<Attr> {
        self.check_writable()?;
        let inode = self.inode(ino)?;
        if let Some(file) = self.writer_of(ino) {
            let mut st = file.state.lock().await;
            if let Some(e) = st.error {
                return Err(e);
            }
            edit(&mut st.metadata)?;
            if st.orphan {
                return self.settle_orphan_metadata(&mut st);
            }
            return self.settle_handle_metadata(&mut st, true).await;
        }
        match inode.kind {
            Kind::Dir if inode.key.is_empty() => Err(Errno::ENOTSUP),
            Kind::Dir => self.rewrite_dir_marker(&inode, edit).await,
            Kind::Symlink | Kind::Special(_) => Err(Errno::EPERM),
            Kind::File => {
                let meta = self.fresh_meta_of(&inode).await?;
                let mut metadata = meta.metadata.clone();
                edit(&mut metadata)?;
                self.rewrite_file_metadata(&inode, &meta, metadata).await
            }
        }
    }

    /// The stored metadata of `ino` as this mount knows it now: a file being written has the
    /// metadata its commit will store; otherwise what a HEAD said within --metadata-ttl, or a
    /// new HEAD (of the marker, for a directory; none there means no metadata).
    pub(super) async fn current_metadata(&self, ino: u64) -> FsResult<UserMetadata> {
        let inode = self.inode(ino)?;
        if let Some(file) = self.writer_of(ino) {
            return Ok(file.state.lock().await.metadata.clone());
        }
        if inode.kind == Kind::Dir {
            if inode.key.is_empty() {
                return Ok(UserMetadata::new());
            }
            if let Some(m) = inode.meta.as_ref().filter(|m| m.has_metadata) {
                if self.fresh(inode.fetched) {
                    return Ok(m.metadata.clone());
                }
            }
            return match self.store.head(&inode.key).await {
                Ok(m) => {
                    let md = m.metadata.clone();
                    self.remember_marker(ino, m);
                    Ok(md)
                }
                Err(StoreError::NotFound(_)) => Ok(UserMetadata::new()),
                Err(e) => Err(errno_of(&e, "getxattr")),
            };
        }
        Ok(self.fresh_meta_of(&inode).await?.metadata)
    }

    /// A file's stored metadata, from a HEAD within --metadata-ttl or a new one.
    async fn fresh_meta_of(&self, inode: &Inode) -> FsResult<ObjectMeta> {
        if let Some(m) = inode.meta.as_ref().filter(|m| m.has_metadata) {
            if self.fresh(inode.fetched) || self.pending.lock().contains_key(&inode.key) {
                return Ok(m.clone());
            }
        }
        let fresh = self.refresh_file(inode).await?;
        fresh.meta.ok_or(Errno::ENOENT)
    }

    /// Keep what a HEAD of a directory's marker said.
    fn remember_marker(&self, ino: u64, meta: ObjectMeta) {
        let mut table = self.inodes.lock();
        if let Some(i) = table.get_mut(ino) {
            i.attr = attrs::attr_from_meta(ino, Kind::Dir, Some(&meta), &self.cfg.defaults);
            i.meta = Some(meta);
            i.fetched = Instant::now();
        }
    }

    /// Directory attributes live on its `dir/` marker: rewritten in place, or a marker is
    /// written for an implicit directory. The mount root of a whole bucket has no key to hold
    /// them; there the change is kept in memory only (logged).
    async fn setattr_dir(&self, inode: &Inode, req: &SetAttr) -> FsResult<Attr> {
        if req.size.is_some() {
            return Err(Errno::EISDIR);
        }
        let req = &SetAttr {
            kill_suid_sgid: false,
            ..*req
        };
        let apply = |md: &mut UserMetadata| {
            apply_metadata(md, req, Kind::Dir);
            if let Some(m) = req.mode {
                md.insert("mode".into(), ((m & 0o7777) | S_IFDIR).to_string());
            }
        };
        if inode.key.is_empty() {
            tracing::debug!("attributes of the bucket root are not stored (no key holds them)");
            let mut md = UserMetadata::new();
            apply(&mut md);
            let meta = ObjectMeta {
                metadata: md,
                has_metadata: true,
                ..Default::default()
            };
            let mut table = self.inodes.lock();
            let i = table.get_mut(inode.ino).ok_or(Errno::ENOENT)?;
            let mut attr =
                attrs::attr_from_meta(inode.ino, Kind::Dir, Some(&meta), &self.cfg.defaults);
            if req.mode.is_none() {
                attr.perm = i.attr.perm;
            }
            i.attr = attr;
            return Ok(attr);
        }
        self.rewrite_dir_marker(inode, |md| {
            apply(md);
            Ok(())
        })
        .await
    }

    /// Rewrite the `dir/` marker of `inode` with its metadata changed by `edit` (a marker is
    /// written for an implicit directory).
    async fn rewrite_dir_marker(
        &self,
        inode: &Inode,
        edit: impl FnOnce(&mut UserMetadata) -> FsResult<()>,
    ) -> FsResult<Attr> {
        let marker = match self.store.head(&inode.key).await {
            Ok(m) => Some(m),
            Err(StoreError::NotFound(_)) => None,
            Err(e) => return Err(errno_of(&e, "setattr")),
        };
        let mut md = marker
            .as_ref()
            .map(|m| m.metadata.clone())
            .unwrap_or_default();
        if !md.contains_key("mode") {
            md.insert(
                "mode".into(),
                ((inode.attr.perm as u32) | S_IFDIR).to_string(),
            );
        }
        edit(&mut md)?;
        let opts = PutOptions {
            metadata: md.clone(),
            content_type: Some("application/x-directory".into()),
            ..Default::default()
        };
        let etag = match marker.and_then(|m| m.etag) {
            Some(etag) => self
                .store
                .copy_object(&inode.key, &etag, &inode.key, &opts)
                .await
                .map(|r| r.etag),
            None => self
                .store
                .put(
                    &inode.key,
                    bytes::Bytes::new(),
                    &opts,
                    self.caps.checksums().then_some(0),
                )
                .await
                .map(|r| r.etag),
        }
        .map_err(|e| errno_of(&e, "setattr"))?;
        let meta = ObjectMeta {
            key: inode.key.clone(),
            etag,
            metadata: md,
            has_metadata: true,
            ..Default::default()
        };
        let mut table = self.inodes.lock();
        let i = table.get_mut(inode.ino).ok_or(Errno::ENOENT)?;
        i.attr = attrs::attr_from_meta(inode.ino, Kind::Dir, Some(&meta), &self.cfg.defaults);
        i.meta = Some(meta);
        i.fetched = Instant::now();
        let attr = i.attr;
        drop(table);
        self.note_inode(inode.ino);
        Ok(attr)
    }

    /// Rewrite an object's metadata with a server-side copy onto itself (no data transfer).
    /// The Content-Type is kept when known (`content_type`), else inferred from the name: a copy
    /// that replaces metadata replaces the Content-Type too.
    async fn replace_metadata(
        &self,
        key: &str,
        etag: &str,
        metadata: &UserMetadata,
        content_type: Option<String>,
    ) -> FsResult<String> {
        let opts = PutOptions {
            metadata: metadata.clone(),
            content_type: content_type.or_else(|| self.content_type_of(key)),
            ..Default::default()
        };
        let res = self
            .store
            .copy_object(key, etag, key, &opts)
            .await
            .map_err(|e| errno_of(&e, "setattr"))?;
        Ok(res.etag.unwrap_or_default())
    }

    /// Record what the bucket now holds for `ino` (`res` of the request that stored it) and
    /// return its attributes.
    fn store_committed(
        &self,
        ino: u64,
        key: &str,
        size: u64,
        res: PutResult,
        metadata: UserMetadata,
    ) -> Attr {
        let meta = ObjectMeta {
            key: key.to_string(),
            size,
            etag: res.etag,
            last_modified: Some(SystemTime::now()),
            content_type: None,
            metadata,
            has_metadata: true,
            checksum_crc32: res.checksum_crc32,
        };
        self.learn(&meta, false);
        // A symlink or special file keeps its kind (its stored mode says it).
        let kind = attrs::kind_from_meta(&meta)
            .filter(|k| !k.is_dir())
            .unwrap_or(Kind::File);
        let attr = {
            let mut table = self.inodes.lock();
            match table.get_mut(ino) {
                Some(i) => {
                    i.attr = attrs::attr_from_meta(ino, kind, Some(&meta), &self.cfg.defaults);
                    i.written_etag = meta.etag.clone();
                    i.meta = Some(meta);
                    i.fetched = Instant::now();
                    i.page_cache_etag = None;
                    i.attr
                }
                None => attrs::attr_from_meta(ino, kind, Some(&meta), &self.cfg.defaults),
            }
        };
        self.note_inode(ino);
        attr
    }

    /// Resolve `name` in `parent` to its entry (from a fresh listing, the inode table or a probe).
    pub(super) async fn resolve(&self, parent: &Inode, name: &str) -> FsResult<(String, DirEntry)> {
        let key = format!("{}{name}", parent.key);
        if self.pending.lock().contains_key(&key) {
            return Ok((
                key,
                DirEntry {
                    kind: Kind::File,
                    meta: None,
                },
            ));
        }
        let entry = self.probe(&parent.key, name).await?.ok_or(Errno::ENOENT)?;
        Ok((key, entry))
    }

    /// Keep a directory visible once its last entry is gone by giving it a marker.
    pub(super) async fn keep_visible(&self, dir: &Inode) {
        if dir.key.is_empty() || dir.key == self.cfg.prefix {
            return;
        }
        match self.store.list_page(&dir.key, None, None, Some(1)).await {
            Ok(page) if page.objects.is_empty() && page.common_prefixes.is_empty() => {
                let opts = PutOptions {
                    content_type: Some("application/x-directory".into()),
                    ..Default::default()
                };
                if let Err(e) = self
                    .store
                    .put(
                        &dir.key,
                        bytes::Bytes::new(),
                        &opts,
                        self.caps.checksums().then_some(0),
                    )
                    .await
                {
                    tracing::warn!(key = %dir.key, error = %e, "could not write a marker to keep the emptied directory");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(key = %dir.key, error = %e, "could not check whether the directory became empty")
            }
        }
    }

    pub async fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.check_writable()?;
        let parent = self.dir_inode(parent)?;
        let name = std::str::from_utf8(name).map_err(|_| Errno::ENOENT)?;
        let (key, entry) = self.resolve(&parent, name).await?;
        if entry.kind == Kind::Dir {
            return Err(Errno::EISDIR);
        }
        let open_ino = self
            .inodes
            .lock()
            .find(parent.ino, name)
            .filter(|ino| self.open_files.get(*ino).is_some() || self.has_readers(*ino));
        if let Some(ino) = open_ino {
            self.orphan(ino).await?;
        }
        let was_pending = match self.pending.lock().remove(&key) {
            Some(p) => {
                p.unlinked.store(true, Ordering::Relaxed);
                true
            }
            None => false,
        };
        match self.store.delete(&key).await {
            Ok(()) => {}
            Err(StoreError::NotFound(_)) if was_pending => {}
            Err(e) => return Err(errno_of(&e, "unlink")),
        }
        self.inodes.lock().remove_name(parent.ino, name);
        self.note_entry(&parent.key, name, None);
        self.touch_dir(parent.ino);
        self.keep_visible(&parent).await;
        Ok(())
    }

    /// `ino` is unlinked while descriptors have it open: make every byte of it local, so they
    /// go on reading and writing it after its object is deleted, and never upload it again.
    /// A file larger than --spool-limit is not copied (its descriptors then fail once the
    /// object is gone).
    async fn orphan(&self, ino: u64) -> FsResult<()> {
        let file = match self.open_files.get(ino) {
            Some(f) => f,
            None => {
                let inode = self.inode(ino)?;
                let state = self.clean_state(&inode, false).await?;
                self.open_files.insert_unowned(state)
            }
        };
        let mut st = file.state.lock().await;
        if st.orphan {
            return Ok(());
        }
        if st.size > self.cfg.upload.spool_limit {
            tracing::warn!(key = %st.key, size = st.size, "a file larger than --spool-limit was unlinked while open: its open descriptors will fail");
            st.unlinked.store(true, Ordering::Relaxed);
            return Ok(());
        }
        self.ensure_staged(&mut st).await?;
        let key = st.key.clone();
        let Some(staged) = st.staged.as_mut() else {
            return Err(Errno::EIO);
        };
        staged
            .materialize(self.store.as_ref())
            .await
            .map_err(|e| errno_of(&e, "unlink of an open file"))?;
        tracing::debug!(key = %key, "unlinked while open: kept locally until the last close");
        st.orphan = true;
        st.dirty = false;
        st.unlinked.store(true, Ordering::Relaxed);
        let mut table = self.inodes.lock();
        if let Some(i) = table.get_mut(ino) {
            i.unlinked = true;
            i.attr.nlink = 0;
            i.attr.ctime = SystemTime::now();
        }
        Ok(())
    }

    /// symlink(2), as s3fs stores it: the target is the object body, mode 0120777.
    pub async fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        caller: Caller,
    ) -> FsResult<Attr> {
        self.check_writable()?;
        let parent = self.dir_inode(parent)?;
        let name = Self::check_new_name(name)?;
        if target.is_empty() || target.len() > 4095 {
            return Err(Errno::ENAMETOOLONG);
        }
        let key = format!("{}{name}", parent.key);
        let now = SystemTime::now();
        let mut metadata = new_file_metadata(0o777, caller, now);
        metadata.insert("mode".into(), (0o777 | attrs::S_IFLNK).to_string());
        let body = bytes::Bytes::copy_from_slice(target);
        let crc = crc32fast::hash(&body);
        let opts = PutOptions {
            metadata: metadata.clone(),
            ..Default::default()
        };
        let res = self
            .store
            .put(&key, body, &opts, self.caps.checksums().then_some(crc))
            .await
            .map_err(|e| errno_of(&e, "symlink"))?;
        let meta = ObjectMeta {
            key: key.clone(),
            size: target.len() as u64,
            etag: res.etag,
            metadata,
            has_metadata: true,
            last_modified: Some(now),
            ..Default::default()
        };
        self.learn(&meta, false);
        let entry = DirEntry {
            kind: Kind::Symlink,
            meta: Some(meta),
        };
        self.note_entry(&parent.key, name, Some(entry.clone()));
        self.touch_dir(parent.ino);
        Ok(self.remember_entry(&parent, name, &entry))
    }

    pub async fn mkdir(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        caller: Caller,
    ) -> FsResult<Attr> {
        self.check_writable()?;
        let parent = self.dir_inode(parent)?;
        let name = Self::check_new_name(name)?;
        let key = format!("{}{name}/", parent.key);
        let now = SystemTime::now();
        let mut metadata = new_file_metadata(mode, caller, now);
        metadata.insert("mode".into(), ((mode & 0o7777) | S_IFDIR).to_string());
        let opts = PutOptions {
            metadata: metadata.clone(),
            content_type: Some("application/x-directory".into()),
            ..Default::default()
        };
        let res = self
            .store
            .put(
                &key,
                bytes::Bytes::new(),
                &opts,
                self.caps.checksums().then_some(0),
            )
            .await
            .map_err(|e| errno_of(&e, "mkdir"))?;
        let meta = ObjectMeta {
            key: key.clone(),
            etag: res.etag,
            metadata,
            has_metadata: true,
            last_modified: Some(now),
            ..Default::default()
        };
        let entry = DirEntry {
            kind: Kind::Dir,
            meta: Some(meta),
        };
        self.note_entry(&parent.key, name, Some(entry.clone()));
        self.touch_dir(parent.ino);
        // The kernel looked it up before: nothing was below this prefix, so it starts empty.
        if !self.cfg.metadata_ttl.is_zero() {
            self.listings.lock().put(
                key.clone(),
                (Instant::now(), Arc::new(super::dir::Listing::default())),
            );
        }
        Ok(self.remember_entry(&parent, name, &entry))
    }

    pub async fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.check_writable()?;
        let parent = self.dir_inode(parent)?;
        let name = std::str::from_utf8(name).map_err(|_| Errno::ENOENT)?;
        let (key, entry) = self.resolve(&parent, name).await?;
        if entry.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let prefix = format!("{key}/");
        if self.pending.lock().keys().any(|k| k.starts_with(&prefix)) {
            return Err(Errno::ENOTEMPTY);
        }
        let page = self
            .store
            .list_page(&prefix, None, None, Some(2))
            .await
            .map_err(|e| errno_of(&e, "rmdir"))?;
        if page.objects.iter().any(|o| o.key != prefix) || !page.common_prefixes.is_empty() {
            return Err(Errno::ENOTEMPTY);
        }
        let mut markers = vec![
            prefix.clone(),
            format!("{key}{}", crate::store::LEGACY_FOLDER_SUFFIX),
        ];
        // s3fs's old style: an object `dir` (no slash) whose Content-Type says directory, also
        // beside a `dir/` marker written since (a chmod): one HEAD to know.
        let old_style = match &entry.meta {
            Some(m) if m.key == key => true,
            _ => self
                .store
                .head(&key)
                .await
                .is_ok_and(|m| attrs::is_directory_content_type(&m)),
        };
        if old_style {
            markers.push(key.clone());
        }
        for k in markers {
            match self.store.delete(&k).await {
                Ok(()) | Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(errno_of(&e, "rmdir")),
            }
        }
        self.inodes.lock().remove_name(parent.ino, name);
        self.listings.lock().pop(&prefix);
        // The parent's cached listing loses the entry (and so a link: see with_dir_links).
        self.note_entry(&parent.key, name, None);
        self.touch_dir(parent.ino);
        self.keep_visible(&parent).await;
        Ok(())
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

/// What a metadata-only copy left: a new ETag, and no checksum we can vouch for (the copy may
/// or may not have kept it), so a reader asks the store with a HEAD.
fn copied(etag: String) -> PutResult {
    PutResult {
        etag: Some(etag),
        checksum_crc32: None,
    }
}
