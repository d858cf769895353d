//! rename(2): files by server-side copy then delete (metadata kept); directories by moving
//! every key below them with bounded parallelism. Not atomic: a failure part way leaves each
//! object at its old key, its new key, or both, never neither.

use std::time::Instant;

use futures::StreamExt;

use super::attrs::Kind;
use super::dir::DirEntry;
use super::{errno_of, Errno, Fs, FsResult};
use crate::data::commit::copy_any_size;
use crate::store::{ObjectMeta, PutCondition, PutOptions, StoreError};

/// RENAME_NOREPLACE and RENAME_EXCHANGE from <linux/fs.h>.
const RENAME_NOREPLACE: u32 = 1;
const RENAME_EXCHANGE: u32 = 2;
/// Keys moved at the same time when renaming a directory.
const MOVE_PARALLELISM: usize = 8;

impl Fs {
    /// Server-side copy of one object to `dst` with its metadata; multipart above 5 GiB.
    async fn copy_whole(&self, src: &ObjectMeta, dst: &str) -> Result<Option<String>, StoreError> {
        let etag = src.etag.clone().unwrap_or_default();
        let opts = PutOptions {
            metadata: src.metadata.clone(),
            // A file takes the type of its new name (as s3fs does); a marker stays a directory.
            content_type: match &src.content_type {
                Some(t) if t.starts_with("application/x-directory") => Some(t.clone()),
                t => self.content_type_of(dst).or_else(|| t.clone()),
            },
            condition: PutCondition::Overwrite,
        };
        copy_any_size(&self.store, &src.key, &etag, src.size, dst, &opts)
            .await
            .map(|r| r.etag)
    }

    /// Move one object: copy, then delete the source only once the copy exists. `known` is the
    /// source's HEAD when the caller already has it (its metadata must travel with the copy).
    async fn move_object(
        &self,
        src_key: &str,
        dst_key: &str,
        known: Option<&ObjectMeta>,
    ) -> Result<Option<String>, StoreError> {
        let meta = match known.filter(|m| m.has_metadata && m.etag.is_some() && m.key == src_key) {
            Some(m) => m.clone(),
            None => self.store.head(src_key).await?,
        };
        let etag = self.copy_whole(&meta, dst_key).await?;
        self.store.delete(src_key).await?;
        Ok(etag)
    }

    pub async fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        if self.cfg.read_only {
            return Err(Errno::EROFS);
        }
        if flags & RENAME_EXCHANGE != 0 {
            return Err(Errno::EINVAL);
        }
        let from_dir = self.dir_inode(parent)?;
        let to_dir = self.dir_inode(newparent)?;
        let name = std::str::from_utf8(name).map_err(|_| Errno::ENOENT)?;
        let newname = Self::check_new_name(newname)?;
        // What this mount holds within the metadata TTL answers without a request (rsync
        // renames every file it writes: a probe of each name cost two round trips more).
        let (src_key, src) = match self.known_entry(&from_dir, name) {
            Some(Some(e)) => (format!("{}{name}", from_dir.key), e),
            _ => self.resolve(&from_dir, name).await?,
        };
        let dst_key = format!("{}{newname}", to_dir.key);
        if src_key == dst_key {
            return Ok(());
        }
        let target = match self.known_entry(&to_dir, newname) {
            Some(known) => known,
            None => match self.resolve(&to_dir, newname).await {
                Ok((_, e)) => Some(e),
                Err(Errno::ENOENT) => None,
                Err(e) => return Err(e),
            },
        };
        if target.is_some() && flags & RENAME_NOREPLACE != 0 {
            return Err(Errno::EEXIST);
        }
        match (src.kind.is_dir(), target.as_ref().map(|t| t.kind.is_dir())) {
            (true, Some(false)) => return Err(Errno::ENOTDIR),
            (false, Some(true)) => return Err(Errno::EISDIR),
            _ => {}
        }
        let src_ino = self.inodes.lock().find(from_dir.ino, name);
        // The moved file's stored state, when known exactly (for the listings).
        let mut moved_meta = None;
        if src.kind == Kind::Dir {
            let src_prefix = format!("{src_key}/");
            let dst_prefix = format!("{dst_key}/");
            if dst_prefix.starts_with(&src_prefix) {
                return Err(Errno::EINVAL); // into itself
            }
            if target.is_some() {
                // Only an empty directory may be replaced.
                let page = self
                    .store
                    .list_page(&dst_prefix, None, None, Some(2))
                    .await
                    .map_err(|e| errno_of(&e, "rename"))?;
                if page.objects.iter().any(|o| o.key != dst_prefix) {
                    return Err(Errno::ENOTEMPTY);
                }
            }
            if self
                .pending
                .lock()
                .keys()
                .any(|k| k.starts_with(&src_prefix))
            {
                // Files still being written below: their uploads target the old keys.
                return Err(Errno::EBUSY);
            }
            self.move_tree(&src_prefix, &dst_prefix).await?;
            self.inodes.lock().rekey(&src_prefix, &dst_prefix);
            if let Some(ino) = src_ino {
                if let Some(i) = self.inodes.lock().get_mut(ino) {
                    i.attr.ctime = std::time::SystemTime::now();
                }
            }
            self.listings_changed(None);
            let mut listings = self.listings.lock();
            let stale: Vec<String> = listings
                .iter()
                .filter(|(k, _)| k.starts_with(&src_prefix))
                .map(|(k, _)| k.clone())
                .collect();
            for k in stale {
                listings.pop(&k);
            }
        } else if target.is_none()
            && match src_ino {
                Some(ino) => self.retarget_unuploaded(ino, &src_key, &dst_key).await,
                None => false,
            }
        {
            // Nothing was in the bucket under the old name: the upload goes to the new one.
            tracing::debug!(from = %src_key, to = %dst_key, "renamed before its upload: the upload moves");
            if let Some(ino) = src_ino {
                if let Some(i) = self.inodes.lock().get_mut(ino) {
                    i.key = dst_key.clone();
                    i.attr.ctime = std::time::SystemTime::now();
                }
            }
            moved_meta = Some(None);
        } else {
            let writer = match src_ino {
                Some(ino) => self.settle_writer(ino).await?,
                None => None,
            };
            // A file still open for writing (or queued by --write-back) was just committed:
            // what resolve saw is stale, what the commit stored is known.
            let committed = match (&writer, src_ino) {
                (Some(_), Some(ino)) => self.fresh_file_meta(ino, &src_key),
                _ => None,
            };
            let known = if writer.is_none() {
                src.meta.as_ref()
            } else {
                committed.as_ref()
            };
            let (etag, known) = match self.move_object(&src_key, &dst_key, known).await {
                // Changed or gone elsewhere since this mount last saw it: ask, then move that.
                Err(StoreError::PreconditionFailed(_) | StoreError::NotFound(_))
                    if known.is_some() =>
                {
                    (self.move_object(&src_key, &dst_key, None).await, None)
                }
                moved => (moved, known),
            };
            let etag = etag.map_err(|e| errno_of(&e, "rename"))?;
            moved_meta = known.cloned().map(|mut m| {
                m.key = dst_key.clone();
                m.etag = etag.clone();
                Some(m)
            });
            if let Some(h) = writer {
                self.retarget_writer(&h, &dst_key, etag.clone()).await;
            }
            if let Some(ino) = src_ino {
                let mut table = self.inodes.lock();
                if let Some(i) = table.get_mut(ino) {
                    i.key = dst_key.clone();
                    if let Some(m) = i.meta.as_mut() {
                        m.key = dst_key.clone();
                        m.etag = etag;
                    }
                    i.fetched = Instant::now();
                    i.attr.ctime = std::time::SystemTime::now();
                }
            }
        }
        self.touch_dir(from_dir.ino);
        self.touch_dir(to_dir.ino);
        {
            let mut table = self.inodes.lock();
            table.remove_name(to_dir.ino, newname);
            if let Some(ino) = src_ino {
                table.rename_entry(ino, from_dir.ino, name, to_dir.ino, newname);
            }
        }
        if src.kind == Kind::Dir {
            // Known exactly: the entry moves (the link counts of both parents with it).
            self.note_entry(&from_dir.key, name, None);
            let moved = DirEntry {
                kind: Kind::Dir,
                meta: None,
            };
            self.note_entry(&to_dir.key, newname, Some(moved));
        } else if let Some(meta) = moved_meta {
            // Known exactly too: a directory being filled by write-then-rename (rsync, editors)
            // keeps a listing that answers the next names without a request. (A file whose
            // upload moved has no object yet: its entry comes from the pending upload.)
            self.note_entry(&from_dir.key, name, None);
            let moved = DirEntry {
                kind: Kind::File,
                meta,
            };
            self.note_entry(&to_dir.key, newname, Some(moved));
        } else {
            self.invalidate(&from_dir.key, &src_key);
            self.invalidate(&to_dir.key, &dst_key);
        }
        // A directory left empty keeps a marker; a rename within it leaves it not empty.
        if from_dir.ino != to_dir.ino {
            self.keep_visible(&from_dir).await;
        }
        Ok(())
    }

    /// A rename the kernel sent again after a worker death, which failed because its source is
    /// gone: if the destination is there, the dead worker carried it out (its copy and delete
    /// reached the store before it could answer), so it is done, and the names this mount keeps
    /// follow. Otherwise ENOENT, as for any rename of a missing name.
    pub async fn finish_resent_rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
    ) -> FsResult<()> {
        let from_dir = self.dir_inode(parent)?;
        let to_dir = self.dir_inode(newparent)?;
        let name = std::str::from_utf8(name).map_err(|_| Errno::ENOENT)?;
        let newname = Self::check_new_name(newname)?;
        let (dst_key, entry) = self.resolve(&to_dir, newname).await?;
        let src_key = format!("{}{name}", from_dir.key);
        tracing::info!(from = %src_key, to = %dst_key, "a resent rename was carried out by the worker that died");
        {
            let mut table = self.inodes.lock();
            if let Some(ino) = table.find(from_dir.ino, name) {
                if entry.kind == Kind::Dir {
                    table.rekey(&format!("{src_key}/"), &format!("{dst_key}/"));
                } else if let Some(i) = table.get_mut(ino) {
                    i.key = dst_key.clone();
                    i.meta = entry.meta.clone();
                    i.fetched = Instant::now();
                }
                table.remove_name(to_dir.ino, newname);
                table.rename_entry(ino, from_dir.ino, name, to_dir.ino, newname);
            }
        }
        self.invalidate(&from_dir.key, &src_key);
        self.invalidate(&to_dir.key, &dst_key);
        Ok(())
    }

    /// The stored state of the file `ino` at `key` as this mount last wrote or read it, with
    /// its metadata and ETag, within the metadata TTL.
    fn fresh_file_meta(&self, ino: u64, key: &str) -> Option<ObjectMeta> {
        let table = self.inodes.lock();
        let i = table.get(ino)?;
        if i.kind.is_dir() || i.unlinked || !self.fresh(i.fetched) {
            return None;
        }
        i.meta
            .as_ref()
            .filter(|m| m.has_metadata && m.etag.is_some() && m.key == key)
            .cloned()
    }

    /// What this mount knows of `name` in `dir` within the metadata TTL, without a request:
    /// Some(Some(entry)) for a file it wrote or looked up (stored metadata and ETag at hand;
    /// a copy from it is conditional on that ETag), Some(None) for a name known absent (a
    /// fresh negative answer, or a directory this mount made, whose listing it keeps), None
    /// when the store must be asked (directories, anything older than the TTL).
    fn known_entry(&self, dir: &super::Inode, name: &str) -> Option<Option<DirEntry>> {
        let key = format!("{}{name}", dir.key);
        if self.pending.lock().contains_key(&key) {
            return None;
        }
        let known = self.inodes.lock().find(dir.ino, name);
        if let Some(ino) = known {
            return self.fresh_file_meta(ino, &key).map(|m| {
                Some(DirEntry {
                    kind: Kind::File,
                    meta: Some(m),
                })
            });
        }
        if self
            .negative
            .lock()
            .peek(&key)
            .is_some_and(|at| self.fresh(*at))
        {
            return Some(None);
        }
        match self.listings.lock().peek(&dir.key) {
            Some((at, l)) if l.made_here && self.fresh(*at) && !l.entries.contains_key(name) => {
                Some(None)
            }
            _ => None,
        }
    }

    /// Move every key below `src_prefix` to `dst_prefix` (bounded parallelism), then report.
    async fn move_tree(&self, src_prefix: &str, dst_prefix: &str) -> FsResult<()> {
        let mut keys = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .store
                .list_page(src_prefix, None, token, None)
                .await
                .map_err(|e| errno_of(&e, "rename"))?;
            keys.extend(page.objects.into_iter().map(|o| o.key));
            token = page.next_token;
            if token.is_none() {
                break;
            }
        }
        // A directory without a marker becomes one with a marker at its new name if empty.
        if keys.is_empty() {
            let opts = PutOptions {
                content_type: Some("application/x-directory".into()),
                ..Default::default()
            };
            self.store
                .put(dst_prefix, bytes::Bytes::new(), &opts, None)
                .await
                .map_err(|e| errno_of(&e, "rename"))?;
            return Ok(());
        }
        let results: Vec<(String, Result<Option<String>, StoreError>)> =
            futures::stream::iter(keys)
                .map(|k| async move {
                    let dst = format!("{dst_prefix}{}", &k[src_prefix.len()..]);
                    let r = self.move_object(&k, &dst, None).await;
                    (k, r)
                })
                .buffer_unordered(MOVE_PARALLELISM)
                .collect()
                .await;
        let failed: Vec<&(String, Result<Option<String>, StoreError>)> =
            results.iter().filter(|(_, r)| r.is_err()).collect();
        if let Some((k, Err(e))) = failed.first() {
            tracing::error!(
                from = src_prefix,
                to = dst_prefix,
                failed = failed.len(),
                moved = results.len() - failed.len(),
                first_key = %k,
                error = %e,
                "directory rename stopped part way; every object is at its old or new key"
            );
            return Err(errno_of(e, "rename"));
        }
        Ok(())
    }
}
