//! What a worker started again on a live mount needs from the filesystem (`--supervise`,
//! src/supervisor.rs): the kernel still holds the node ids and file handles the dead worker
//! gave it. Every change of names and every open and release go to the journal
//! ([`journal`](super::journal)); a restarted worker replays it ([`Fs::start_journal`]), and
//! takes the handles the kernel goes on using as they come: a read handle reads on the object
//! version it was opened on (a changed object then fails its reads as ESTALE, never mixing
//! two versions), a directory handle is opened again on its inode, a write handle fails with EIO (what the dead worker held
//! of it is reported from the staging directory at the restart, as after any crash).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::journal::{Journal, Opened};
use super::{attrs, DirHandle, Errno, Fs, FsResult};
use crate::data::prefetch::ObjectReader;

impl Fs {
    /// Journal this mount's inodes and handles in `path` from now on. After a worker restart
    /// (`restart` > 0), first take back what the journal there names, and number new handles
    /// above the old ones. Returns how many inodes were taken back.
    pub fn start_journal(&self, path: &Path, restart: u32) -> std::io::Result<usize> {
        let journal = if restart == 0 {
            Journal::create(path)?
        } else {
            let replayed = Journal::replay(path)?;
            let journal = Journal::rewrite(path, &replayed)?;
            // Stale at once: the first getattr of a restored file asks the bucket.
            let stale = Instant::now()
                .checked_sub(self.cfg.metadata_ttl + Duration::from_secs(1))
                .unwrap_or_else(Instant::now);
            let above = replayed.handles.keys().next_back().copied().unwrap_or(0);
            self.next_fh.fetch_max(
                above.max(u64::from(restart) << 40) + 1,
                std::sync::atomic::Ordering::Relaxed,
            );
            *self.adopted.lock() = replayed.handles.clone();
            *self.adopted_pins.lock() = replayed.pinned.clone();
            self.inodes.lock().restore(replayed, stale, |n| {
                attrs::attr_from_meta(n.ino, n.kind, None, &self.cfg.defaults)
            });
            journal
        };
        let journal = Arc::new(journal);
        self.inodes.lock().set_journal(journal.clone());
        let _ = self.journal.set(journal);
        Ok(if restart == 0 {
            0
        } else {
            self.inodes.lock().len()
        })
    }

    pub(super) fn journal_opened(&self, fh: u64, ino: u64, how: Opened) {
        if let Some(j) = self.journal.get() {
            j.opened(fh, ino, how);
        }
    }

    pub(super) fn journal_closed(&self, fh: u64) {
        if let Some(j) = self.journal.get() {
            j.closed(fh);
        }
    }

    /// A read of `fh` on `ino`: if `fh` is a read handle the dead worker gave out, open it
    /// again here (its reader is made at the first read).
    pub fn adopt_file(&self, ino: u64, fh: u64) {
        if self.files.lock().contains_key(&fh) {
            return;
        }
        let mut adopted = self.adopted.lock();
        if adopted.get(&fh) != Some(&(ino, Opened::Read)) {
            return;
        }
        adopted.remove(&fh);
        drop(adopted);
        // The version it was reading, without a HEAD; else the current one at its first read.
        let pinned = self.adopted_pins.lock().remove(&fh);
        let reader = pinned.and_then(|(etag, size)| {
            let key = self.inodes.lock().get(ino)?.key.clone();
            Some(Arc::new(ObjectReader::new(
                self.store.clone(),
                key,
                Some(etag),
                size,
                None,
                self.cfg.prefetch,
                self.budget.clone(),
                self.cache.clone(),
            )))
        });
        self.insert_read_handle(fh, ino, reader);
        tracing::debug!(fh, ino, "read handle of the previous worker taken over");
    }

    /// A readdir of `fh` on `ino`: if `fh` is a directory handle the dead worker gave out,
    /// open the directory again under that handle (offsets go on in the same name order).
    pub async fn adopt_dir(&self, ino: u64, fh: u64) -> FsResult<()> {
        if self.dirs.lock().contains_key(&fh)
            || self.adopted.lock().get(&fh) != Some(&(ino, Opened::Dir))
        {
            return Ok(());
        }
        let fresh = self.opendir(ino).await?;
        let handle: Option<Arc<DirHandle>> = self.dirs.lock().remove(&fresh);
        self.journal_closed(fresh);
        if let Some(h) = handle {
            self.dirs.lock().insert(fh, h);
            self.adopted.lock().remove(&fh);
            tracing::debug!(
                fh,
                ino,
                "directory handle of the previous worker taken over"
            );
        }
        Ok(())
    }

    /// The error for a handle this worker does not know: EIO for a file the dead worker had
    /// open for writing (its bytes since the last commit are not here), EBADF otherwise.
    pub(super) fn unknown_handle(&self, fh: u64) -> Errno {
        match self.adopted.lock().get(&fh) {
            Some((ino, Opened::Write)) => {
                tracing::error!(fh, ino, "a file open for writing when the worker died: writes through this descriptor fail (what was staged is reported at the restart)");
                Errno::EIO
            }
            _ => Errno::EBADF,
        }
    }

    /// flush or fsync of a handle this worker does not know: nothing to do for a read handle
    /// of the dead worker (its reads came from the page cache since), else as
    /// [`Self::unknown_handle`].
    pub(super) fn sync_unknown(&self, fh: u64) -> FsResult<()> {
        if matches!(self.adopted.lock().get(&fh), Some((_, Opened::Read))) {
            return Ok(());
        }
        Err(self.unknown_handle(fh))
    }

    /// A handle of the dead worker released by the kernel.
    pub(super) fn release_adopted(&self, fh: u64) {
        self.adopted_pins.lock().remove(&fh);
        if self.adopted.lock().remove(&fh).is_some() {
            self.journal_closed(fh);
        }
    }
}
