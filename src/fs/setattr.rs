//! chmod, chown, utimens, truncate and extended-attribute edits: where a file's or directory's
//! stored metadata lives now (the upload of an open file, the committed object, a directory's
//! marker) and how it changes there (carried into the commit, or a server-side copy onto
//! itself). Also the set-ID rules and fallocate.

use std::time::{Instant, SystemTime};

use super::attrs::{self, format_time, Attr, Kind, S_IFDIR};
use super::inode::Inode;
use super::write::{Body, WriteState};
use super::{errno_of, Errno, Fs, FsResult};
use crate::data::commit::put_checked;
use crate::data::staging::{Base, StagedFile};
use crate::store::{ObjectMeta, PutCondition, PutOptions, PutResult, StoreError, UserMetadata};

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

/// `mode` without set-user-ID, and without set-group-ID when the group may execute (a
/// set-group-ID bit without group execute means mandatory locking and stays).
pub fn without_suid_sgid(mode: u32) -> u32 {
    let mut m = mode & !libc::S_ISUID;
    if mode & 0o010 != 0 {
        m &= !libc::S_ISGID;
    }
    m
}

/// Apply a setattr to stored metadata of an object of `kind`: mode (with the kind's type
/// bits), owner, times; ctime becomes now when anything changes.
pub(super) fn apply_metadata(md: &mut UserMetadata, req: &SetAttr, kind: Kind) {
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
    pub(super) fn changes_metadata(&self) -> bool {
        self.mode.is_some()
            || self.uid.is_some()
            || self.gid.is_some()
            || self.mtime.is_some()
            || self.atime.is_some()
    }
}

/// Clear set-user-ID/set-group-ID in a stored `mode` (see [`without_suid_sgid`]); false when
/// there is no stored mode to change.
pub(super) fn drop_set_id_bits(md: &mut UserMetadata) -> bool {
    let Some(mode) = md.get("mode").and_then(|m| m.trim().parse::<u32>().ok()) else {
        return false;
    };
    md.insert("mode".into(), without_suid_sgid(mode).to_string());
    true
}

/// What a metadata-only copy left: a new ETag, and no checksum we can vouch for (the copy may
/// or may not have kept it), so a reader asks the store with a HEAD.
pub(super) fn copied(etag: String) -> PutResult {
    PutResult {
        etag: Some(etag),
        checksum_crc32: None,
    }
}

impl Fs {
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
            if let Some(e) = st.failed() {
                return Err(e);
            }
            if let Some(size) = req.size {
                self.truncate_state(&mut st, size).await?;
            }
            if req.mtime.is_some() {
                st.last_write = None;
            }
            apply_metadata(&mut st.metadata, &req, Kind::File);
            if st.orphan() {
                return self.settle_orphan_metadata(&mut st);
            }
            return self.settle_handle_metadata(&mut st, metadata_change).await;
        }
        if inode.kind == Kind::Dir {
            return self.setattr_dir(&inode, &req).await;
        }
        let (mut metadata, meta) = self.metadata_of(&inode).await?;
        let meta = meta.ok_or(Errno::ENOENT)?;
        if let Some(n) = req.size.filter(|n| *n == 0 || *n != meta.size) {
            // truncate(2) on a closed file: the new size and times go to the bucket now,
            // through the commit engine (an empty object is one checked PUT; another size is
            // staged against the object: unchanged parts copied server side).
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
            let res = if n == 0 {
                put_checked(
                    &self.store,
                    &self.caps,
                    &inode.key,
                    bytes::Bytes::new(),
                    0,
                    &opts,
                )
                .await
            } else {
                let base = Base {
                    key: inode.key.clone(),
                    etag: meta.etag.clone().unwrap_or_default(),
                    size: meta.size,
                };
                let mut staged = StagedFile::create(&self.cfg.staging_dir, base).map_err(|e| {
                    tracing::error!(dir = %self.cfg.staging_dir.display(), error = %e, "cannot create a staging file");
                    Errno::from_io(&e)
                })?;
                staged.truncate(n).map_err(|e| Errno::from_io(&e))?;
                staged
                    .upload(
                        &self.store,
                        &inode.key,
                        &opts,
                        &self.cfg.upload,
                        &self.budget,
                        &self.caps,
                    )
                    .await
            };
            let res = res.map_err(|e| errno_of(&e, "truncate"))?;
            return Ok(self.store_committed(ino, &inode.key, n, res, metadata));
        }
        if !metadata_change {
            return Ok(inode.attr);
        }
        apply_metadata(&mut metadata, &req, inode.kind);
        self.rewrite_file_metadata(&inode, &meta, metadata).await
    }

    /// An orphan's attributes change in memory only (it has no object any more).
    pub(super) fn settle_orphan_metadata(&self, st: &mut WriteState) -> FsResult<Attr> {
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
    pub(super) async fn settle_handle_metadata(
        &self,
        st: &mut WriteState,
        changed: bool,
    ) -> FsResult<Attr> {
        let ino = st.ino;
        if changed && matches!(st.body, Body::Clean) {
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
        if let Some(u) = st.upload_mut() {
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
    pub(super) async fn rewrite_file_metadata(
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
            if let Some(e) = st.failed() {
                return Err(e);
            }
            edit(&mut st.metadata)?;
            if st.orphan() {
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
    pub(super) async fn fresh_meta_of(&self, inode: &Inode) -> FsResult<ObjectMeta> {
        if let Some(m) = inode.meta.as_ref().filter(|m| m.has_metadata) {
            if self.fresh(inode.fetched) || self.pending.lock().contains_key(&inode.key) {
                return Ok(m.clone());
            }
        }
        let fresh = self.refresh_file(inode).await?;
        fresh.meta.ok_or(Errno::ENOENT)
    }

    /// Keep what a HEAD of a directory's marker said.
    pub(super) fn remember_marker(&self, ino: u64, meta: ObjectMeta) {
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
    pub(super) async fn setattr_dir(&self, inode: &Inode, req: &SetAttr) -> FsResult<Attr> {
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
        // The marker as this mount last wrote or read it, within the metadata TTL: no HEAD
        // (tar sets a directory's owner, mode and times one call each). Its copy is
        // conditional on that ETag; a marker changed elsewhere meanwhile is read again.
        let known = inode
            .meta
            .as_ref()
            .filter(|m| m.has_metadata && m.etag.is_some() && self.fresh(inode.fetched))
            .cloned();
        if let Some(marker) = known {
            let written = self
                .write_dir_marker(inode, Some(marker), |md| {
                    apply(md);
                    Ok(())
                })
                .await;
            match written {
                Err(Errno::ESTALE) | Err(Errno::ENOENT) => {}
                done => return done,
            }
        }
        self.rewrite_dir_marker(inode, |md| {
            apply(md);
            Ok(())
        })
        .await
    }

    /// Rewrite the `dir/` marker of `inode` with its metadata changed by `edit` (a marker is
    /// written for an implicit directory).
    pub(super) async fn rewrite_dir_marker(
        &self,
        inode: &Inode,
        edit: impl FnOnce(&mut UserMetadata) -> FsResult<()>,
    ) -> FsResult<Attr> {
        let marker = match self.store.head(&inode.key).await {
            Ok(m) => Some(m),
            Err(StoreError::NotFound(_)) => None,
            Err(e) => return Err(errno_of(&e, "setattr")),
        };
        self.write_dir_marker(inode, marker, edit).await
    }

    /// Write `marker`'s metadata as `edit` changes it: a copy onto itself, or a new marker.
    async fn write_dir_marker(
        &self,
        inode: &Inode,
        marker: Option<ObjectMeta>,
        edit: impl FnOnce(&mut UserMetadata) -> FsResult<()>,
    ) -> FsResult<Attr> {
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
    pub(super) async fn replace_metadata(
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
    pub(super) fn store_committed(
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
}
