//! The namespace: creating (create, mknod, symlink, mkdir) and removing (unlink, rmdir) names,
//! an unlinked file that is still open (an orphan, see `open_file`), and keeping the cached
//! listings and the parent directory's times in step with what this mount changed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::attrs::{self, format_time, Attr, Kind, S_IFDIR, S_IFMT, S_IFREG};
use super::dir::{invalid_name_reason, DirEntry};
use super::inode::Inode;
use super::write::{Body, WriteState};
use super::{errno_of, Errno, Fs, FsResult};
use crate::data::commit::put_checked;
use crate::data::upload::CommittedPrefix;
use crate::store::{ObjectMeta, PutCondition, PutOptions, StoreError, UserMetadata};

/// Who is asking (for the owner of new files and directories).
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

pub(super) fn new_file_metadata(mode: u32, caller: Caller, now: SystemTime) -> UserMetadata {
    let mut md = UserMetadata::new();
    md.insert("mode".into(), ((mode & 0o7777) | S_IFREG).to_string());
    md.insert("uid".into(), caller.uid.to_string());
    md.insert("gid".into(), caller.gid.to_string());
    md.insert("mtime".into(), format_time(now));
    md.insert("ctime".into(), format_time(now));
    md
}

impl Fs {
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
        self.listings_changed(Some(dir_key));
        self.listings.lock().pop(dir_key);
        self.negative.lock().pop(key);
        self.negative.lock().pop(key.trim_end_matches('/'));
    }

    /// Record a change we made in the cached listing of `dir_key` (if it is cached), so the
    /// next lookups in a directory being filled need no request. `None` removes the entry.
    pub(super) fn note_entry(&self, dir_key: &str, name: &str, entry: Option<DirEntry>) {
        self.listings_changed(Some(dir_key));
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
    pub(super) fn note_inode(&self, ino: u64) {
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

    /// The parent directory changed (an entry created, removed or renamed): its mtime and
    /// ctime are now, as this mount shows them.
    pub(super) fn touch_dir(&self, dir_ino: u64) {
        if let Some(i) = self.inodes.lock().get_mut(dir_ino) {
            let now = SystemTime::now();
            i.attr.mtime = now;
            i.attr.ctime = now;
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
            body: Body::Streaming(self.start_upload(&key, &metadata, &PutCondition::IfNoneMatch)),
            base: CommittedPrefix {
                etag: String::new(),
                size: 0,
            },
            size: 0,
            metadata,
            unlinked,
            expect: PutCondition::IfNoneMatch,
            last_write: None,
            journaled_copy: None,
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
            .put_empty_object(&key, metadata, None, now, kind, "mknod")
            .await?;
        self.note_entry(&parent.key, name, Some(entry.clone()));
        self.touch_dir(parent.ino);
        Ok(self.remember_entry(&parent, name, &entry))
    }

    /// Store an empty object (a special file, or a directory's marker with `content_type`)
    /// through the commit engine, and return its listing entry.
    pub(super) async fn put_empty_object(
        &self,
        key: &str,
        metadata: UserMetadata,
        content_type: Option<&str>,
        now: SystemTime,
        kind: Kind,
        op: &str,
    ) -> FsResult<DirEntry> {
        let opts = PutOptions {
            metadata: metadata.clone(),
            content_type: content_type.map(str::to_string),
            ..Default::default()
        };
        let res = put_checked(&self.store, &self.caps, key, bytes::Bytes::new(), 0, &opts)
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
    pub(super) async fn orphan(&self, ino: u64) -> FsResult<()> {
        let file = match self.open_files.get(ino) {
            Some(f) => f,
            None => {
                let inode = self.inode(ino)?;
                let state = self.clean_state(&inode, false).await?;
                self.open_files.insert_unowned(state)
            }
        };
        let mut st = file.state.lock().await;
        if st.orphan() {
            return Ok(());
        }
        if st.size > self.cfg.upload.spool_limit {
            tracing::warn!(key = %st.key, size = st.size, "a file larger than --spool-limit was unlinked while open: its open descriptors will fail");
            st.unlinked.store(true, Ordering::Relaxed);
            return Ok(());
        }
        self.ensure_staged(&mut st).await?;
        let key = st.key.clone();
        let Body::Staged(mut staged) = st.take_body() else {
            return Err(Errno::EIO);
        };
        let made_local = staged.materialize(self.store.as_ref()).await;
        if let Err(e) = made_local {
            st.body = Body::Staged(staged);
            return Err(errno_of(&e, "unlink of an open file"));
        }
        tracing::debug!(key = %key, "unlinked while open: kept locally until the last close");
        st.body = Body::Orphan(staged);
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
        let marker = Some("application/x-directory");
        let entry = self
            .put_empty_object(&key, metadata, marker, now, Kind::Dir, "mkdir")
            .await?;
        self.note_entry(&parent.key, name, Some(entry.clone()));
        self.touch_dir(parent.ino);
        // The kernel looked it up before: nothing was below this prefix, so it starts empty.
        if !self.cfg.metadata_ttl.is_zero() {
            self.listings.lock().put(
                key.clone(),
                (
                    Instant::now(),
                    Arc::new(super::dir::Listing {
                        made_here: true,
                        ..Default::default()
                    }),
                ),
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
