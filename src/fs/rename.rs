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
        let (src_key, src) = self.resolve(&from_dir, name).await?;
        let dst_key = format!("{}{newname}", to_dir.key);
        if src_key == dst_key {
            return Ok(());
        }
        let target = match self.resolve(&to_dir, newname).await {
            Ok((_, e)) => Some(e),
            Err(Errno::ENOENT) => None,
            Err(e) => return Err(e),
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
            self.listings_changed();
            let mut listings = self.listings.lock();
            let stale: Vec<String> = listings
                .iter()
                .filter(|(k, _)| k.starts_with(&src_prefix))
                .map(|(k, _)| k.clone())
                .collect();
            for k in stale {
                listings.pop(&k);
            }
        } else {
            let writer = match src_ino {
                Some(ino) => self.settle_writer(ino).await?,
                None => None,
            };
            // A file still open for writing was just committed: its HEAD from resolve is stale.
            let known = if writer.is_none() {
                src.meta.as_ref()
            } else {
                None
            };
            let etag = self
                .move_object(&src_key, &dst_key, known)
                .await
                .map_err(|e| errno_of(&e, "rename"))?;
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
        } else {
            self.invalidate(&from_dir.key, &src_key);
            self.invalidate(&to_dir.key, &dst_key);
        }
        self.keep_visible(&from_dir).await;
        Ok(())
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
