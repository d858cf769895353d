//! What a worker started again on a live mount needs from the filesystem (a supervised mount,
//! src/supervisor.rs): the kernel still holds the node ids and file handles the dead worker
//! gave it. Every change of names and every open and release go to the journal
//! ([`journal`](super::journal)); a restarted worker replays it ([`Fs::start_journal`]) and
//! takes the dead worker's handles over before it serves ([`Fs::take_over_handles`]): a read
//! handle reads on the object version it was opened on (a changed object then fails its reads
//! as ESTALE, never mixing two versions); a write handle goes on from the file's local bytes
//! (its staging file and journaled changes, or a stream's local copy), or fails with EIO when
//! they are not all local. A directory handle is opened again at its first readdir.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::journal::{Journal, OpenWrite, Opened};
use super::write::{Body, WriteState};
use super::{attrs, DirHandle, Errno, FileHandle, Fs, FsResult, Inode};
use crate::data::prefetch::ObjectReader;
use crate::data::staging::{maker_of, remove_with_sidecar, Base, StagedFile};
use crate::data::upload::CommittedPrefix;
use crate::store::PutCondition;

tokio::task_local! {
    /// The kernel's request an open, create or opendir serves ([`Fs::serving`]).
    static REQUEST: u64;
}

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
            *self.adopted_writes.lock() = replayed.files.clone();
            *self.adopted_requests.lock() = replayed
                .opened_by
                .iter()
                .filter_map(|(fh, req)| Some((*req, (*fh, replayed.handles.get(fh)?.0))))
                .collect();
            *self.requests_done.lock() = replayed.done.clone();
            *self.dead_workers.lock() = replayed.workers.clone();
            *self.restored_dirs.lock() = replayed
                .inodes
                .values()
                .filter(|n| n.kind == super::Kind::Dir)
                .map(|n| n.ino)
                .collect();
            self.inodes.lock().restore(replayed, stale, |n| {
                attrs::attr_from_meta(n.ino, n.kind, None, &self.cfg.defaults)
            });
            journal
        };
        journal.worker(std::process::id());
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
            j.opened(fh, ino, how, REQUEST.try_with(|r| *r).ok());
        }
    }

    /// Run `f`, an open, create or opendir serving the kernel's request `request`: the handle
    /// it opens is journaled with the request, so that the request resent to a new worker
    /// gets that handle back ([`Self::resent_open`]) instead of a second one the kernel would
    /// never release.
    pub async fn serving<F: std::future::Future>(request: u64, f: F) -> F::Output {
        REQUEST.scope(request, f).await
    }

    /// The kernel's request `request` (one that changes names or attributes) was carried out;
    /// its answer goes out next.
    pub fn request_done(&self, request: u64) {
        if let Some(j) = self.journal.get() {
            j.done(request);
        }
    }

    /// A directory restored from the journal: its attributes (mode, owner, times) from its
    /// marker, as a lookup would have read them. An implicit directory (no marker) keeps the
    /// defaults; a store that does not answer leaves them too (asked again at the next lookup).
    pub(super) async fn refresh_restored_dir(&self, inode: &Inode) {
        if inode.key.is_empty() || inode.meta.is_some() {
            return;
        }
        match self.store.head(&inode.key).await {
            Ok(meta) => self.remember_marker(inode.ino, meta),
            Err(e) => {
                tracing::debug!(key = %inode.key, error = %e, "restored directory: no marker read")
            }
        }
    }

    /// A request the kernel resent after a worker death: did the dead worker carry it out
    /// (and die before answering)? Then it must not be carried out again: a second mkdir
    /// would fail with EEXIST, a second unlink with ENOENT.
    pub fn was_done(&self, request: u64) -> bool {
        self.requests_done.lock().contains(&request)
    }

    /// An open or create the kernel resent after a worker death, if the dead worker had
    /// carried it out: the handle it opened (fh, inode), now this worker's.
    pub fn resent_open(&self, request: u64) -> Option<(u64, u64)> {
        self.adopted_requests.lock().remove(&request)
    }

    pub(super) fn journal_closed(&self, fh: u64) {
        if let Some(j) = self.journal.get() {
            j.closed(fh);
        }
    }

    /// If `fh` is a read handle the dead worker gave out on `ino`, open it again here.
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

/// Remove the local copy of a stream (and the `.info` beside it) whose bytes the bucket holds.
fn remove_local_copy(w: &OpenWrite) {
    if let Some(path) = w.path.as_deref() {
        let path = std::path::Path::new(path);
        remove_with_sidecar(path);
        tracing::debug!(path = %path.display(), "local copy of a stream committed before the worker died removed");
    }
}

/// How a commit condition is journaled.
fn condition_code(c: &PutCondition) -> String {
    match c {
        PutCondition::IfNoneMatch => "n".into(),
        PutCondition::IfMatch(etag) => format!("m:{etag}"),
        PutCondition::Overwrite => "o".into(),
    }
}

fn condition_of(code: &str) -> PutCondition {
    match code.strip_prefix("m:") {
        Some(etag) => PutCondition::IfMatch(etag.to_string()),
        None if code == "n" => PutCondition::IfNoneMatch,
        None => PutCondition::Overwrite,
    }
}

impl Fs {
    /// Journal where the bytes of an open file are now (a stream just started, a file just
    /// staged, a stream grown), so that a worker started after a death goes on with it.
    pub(super) fn journal_writing(&self, st: &WriteState) {
        let Some(j) = self.journal.get() else { return };
        let (staged, path, upload_id) = match &st.body {
            Body::Staged(f) => (true, Some(f.path().display().to_string()), None),
            Body::Streaming(u) => (
                false,
                u.spool_path().map(|p| p.display().to_string()),
                u.upload_id().map(str::to_string),
            ),
            _ => return,
        };
        j.writing(
            st.ino,
            &OpenWrite {
                staged,
                path,
                base_etag: st.base.etag.clone(),
                base_size: st.base.size,
                condition: condition_code(&st.expect),
                metadata: serde_json::to_string(&st.metadata).ok(),
                changes: Vec::new(),
                upload_id,
                lost: false,
            },
        );
    }

    /// After a write to a stream (`--supervise`): every byte goes to its local copy before the
    /// write returns, so a new worker can go on with the file; past --spool-limit it cannot.
    pub(super) async fn keep_stream_local(&self, st: &mut WriteState) {
        if self.journal.get().is_none() {
            return;
        }
        let Some(u) = st.upload_mut() else { return };
        let copy = u.persist().await.then(|| {
            (
                u.spool_path().map(std::path::Path::to_path_buf),
                u.upload_id().map(str::to_string),
            )
        });
        match copy {
            // Journaled again only when the local copy or the upload changed, not per write.
            Some(copy) if st.journaled_copy.as_ref() != Some(&copy) => {
                self.journal_writing(st);
                st.journaled_copy = Some(copy);
            }
            Some(_) => {}
            None => self.journal_lost(st.ino),
        }
    }

    pub(super) fn journal_wrote(&self, ino: u64, offset: u64, len: u64) {
        if let Some(j) = self.journal.get() {
            j.wrote(ino, offset, len);
        }
    }

    /// A staged file's new size.
    pub(super) fn journal_resized(&self, st: &WriteState) {
        if let Some(j) = self.journal.get() {
            j.resized(st.ino, st.size);
        }
    }

    pub(super) fn journal_committed(&self, ino: u64) {
        if let Some(j) = self.journal.get() {
            j.committed(ino);
        }
    }

    pub(super) fn journal_lost(&self, ino: u64) {
        if let Some(j) = self.journal.get() {
            j.lost(ino);
        }
    }

    /// If `fh` is a descriptor the dead worker had open for writing on `ino`, take it over: the file's state is rebuilt from its local
    /// bytes (a staged file with its changes, a stream from its local copy, which becomes a
    /// staged new object; the dead worker's multipart upload is aborted), or from the object if
    /// everything was committed. A file whose bytes were not all local stays EIO.
    pub async fn adopt_writer(&self, ino: u64, fh: u64) -> FsResult<()> {
        if self.files.lock().contains_key(&fh)
            || self.adopted.lock().get(&fh) != Some(&(ino, Opened::Write))
        {
            return Ok(());
        }
        let file = match self.open_files.join(ino) {
            Some(file) => file,
            None => {
                let inode = self.inode(ino)?;
                // Unlinked meanwhile: nothing to go on with (it gets EIO).
                let linked = self.inodes.lock().find(inode.parent, &inode.name) == Some(ino);
                let rec = self.adopted_writes.lock().get(&ino).cloned();
                let state = match rec {
                    _ if !linked => return Ok(()),
                    Some(w) if w.lost => return Ok(()),
                    None => self.clean_state(&inode, false).await?,
                    // The dead worker's own commit landed just before it died (it journals
                    // the commit right after): the object is the stream's bytes, and their
                    // local copy is not needed any more.
                    Some(w) if self.stream_already_committed(&inode, &w).await => {
                        remove_local_copy(&w);
                        self.clean_state(&inode, false).await?
                    }
                    Some(w) => match self.state_from_journal(&inode, &w).await {
                        Ok(st) => st,
                        // Its local bytes are gone: the dead worker removes them once the
                        // object is committed, just before it journals that. An object that
                        // is not the one the file was opened on is that commit.
                        Err(e)
                            if e.kind() == std::io::ErrorKind::NotFound
                                && self.committed_meanwhile(&inode, &w).await =>
                        {
                            self.clean_state(&inode, false).await?
                        }
                        Err(e) => {
                            tracing::error!(fh, ino, key = %inode.key, error = %e, "cannot go on with a file the previous worker was writing");
                            return Ok(());
                        }
                    },
                };
                self.open_files.insert_or_join(state).0
            }
        };
        self.adopted.lock().remove(&fh);
        self.files
            .lock()
            .insert(fh, Arc::new(FileHandle::Write(file)));
        tracing::info!(
            fh,
            ino,
            "file being written by the previous worker taken over"
        );
        Ok(())
    }

    /// Keys of the files open for writing that a worker started now could not go on with, so
    /// that `s3mount upgrade` waits for them: a stream whose bytes are not all in its local
    /// copy (past --spool-limit, or started by a server-side copy), a file unlinked while open,
    /// and one in the middle of a call right now (asked again a moment later). A staged file,
    /// a stream kept locally and a clean file are taken over as after a crash.
    pub fn writers_to_wait_for(&self) -> Vec<String> {
        self.open_files
            .all()
            .into_iter()
            .filter_map(|(file, _)| {
                let key = || {
                    self.inodes
                        .lock()
                        .get(file.ino)
                        .map(|i| i.key.clone())
                        .unwrap_or_default()
                };
                let Ok(st) = file.state.try_lock() else {
                    return Some(key());
                };
                let local = match &st.body {
                    Body::Clean | Body::Staged(_) | Body::Failed(_) => true,
                    Body::Streaming(u) => u.kept_locally(),
                    Body::Orphan(_) => false,
                };
                (!local).then(key)
            })
            .collect()
    }

    /// Is the object `inode` names the stream `w` kept locally, committed by the dead worker
    /// before it could journal so? A new version whose size and CRC32 are the local copy's.
    async fn stream_already_committed(&self, inode: &Inode, w: &OpenWrite) -> bool {
        let (false, Some(path)) = (w.staged, w.path.as_deref()) else {
            return false;
        };
        let Ok(m) = self.store.head(&inode.key).await else {
            return false;
        };
        if m.etag.as_deref().is_none_or(|e| e == w.base_etag) {
            return false;
        }
        let path = std::path::PathBuf::from(path);
        let local = tokio::task::spawn_blocking(move || -> std::io::Result<(u64, u32)> {
            use std::io::Read;
            let mut f = std::fs::File::open(path)?;
            let (mut crc, mut len, mut buf) = (crc32fast::Hasher::new(), 0u64, vec![0u8; 1 << 20]);
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    return Ok((len, crc.finalize()));
                }
                crc.update(&buf[..n]);
                len += n as u64;
            }
        })
        .await;
        match (local, m.checksum_crc32.as_deref()) {
            (Ok(Ok((len, crc))), Some(stored)) => {
                len == m.size && stored == crate::store::crc32_header(crc)
            }
            (Ok(Ok((len, _))), None) => len == m.size,
            _ => false,
        }
    }

    /// Does the bucket hold a version of `inode` other than the one `w` was written over?
    async fn committed_meanwhile(&self, inode: &Inode, w: &OpenWrite) -> bool {
        match self.store.head(&inode.key).await {
            Ok(m) => m.etag.as_deref().is_some_and(|e| e != w.base_etag),
            Err(_) => false,
        }
    }

    /// Take over, before serving, every descriptor the dead worker had open for reading or
    /// writing: files being written are there at once for lookups, `stat` and `chmod`
    /// (pending, with their size), and no read or write has to look for its descriptor among
    /// the dead worker's. Directory handles are taken at their first readdir (that lists the
    /// directory again). Returns how many files being written were taken over.
    pub async fn take_over_handles(&self) -> usize {
        let handles: Vec<(u64, u64, Opened)> = self
            .adopted
            .lock()
            .iter()
            .map(|(fh, (ino, how))| (*fh, *ino, *how))
            .collect();
        let mut writers = 0;
        let mut held = std::collections::HashSet::new();
        for (fh, ino, how) in handles {
            match how {
                Opened::Read => self.adopt_file(ino, fh),
                Opened::Write => {
                    writers += 1;
                    held.insert(ino);
                    if let Err(e) = self.adopt_writer(ino, fh).await {
                        tracing::warn!(fh, ino, error = ?e, "cannot take over a file being written");
                    }
                }
                Opened::Dir => {}
            }
        }
        // Streams no descriptor holds any more (closed, committed, then the death came before
        // the commit was journaled): a local copy the bucket holds byte for byte is removed,
        // else every later mount would report it as left over.
        let unheld: Vec<(u64, OpenWrite)> = self
            .adopted_writes
            .lock()
            .iter()
            .filter(|(ino, w)| !held.contains(*ino) && !w.staged && w.path.is_some())
            .map(|(ino, w)| (*ino, w.clone()))
            .collect();
        for (ino, w) in unheld {
            let Ok(inode) = self.inode(ino) else { continue };
            if self.stream_already_committed(&inode, &w).await {
                remove_local_copy(&w);
                self.journal_committed(ino);
            }
        }
        self.remove_unjournaled_copies();
        writers
    }

    /// Local files a dead worker of this mount made and had not journaled yet: it died
    /// between making the file (a stream's local copy, a staging file) and journaling it, so
    /// the write that made it never returned and the kernel sent it again to this worker; and
    /// the `.info` of a journaled file already removed. Removed; else every later mount
    /// reports them as data left over. Files of earlier runs
    /// (other pids) are kept and reported as before, and so is everything under --write-back,
    /// whose queued uploads are local files no journal names.
    fn remove_unjournaled_copies(&self) {
        let dead = self.dead_workers.lock().clone();
        if self.cfg.write_back || dead.is_empty() {
            return;
        }
        let journaled: std::collections::HashSet<std::path::PathBuf> = self
            .adopted_writes
            .lock()
            .values()
            .filter_map(|w| w.path.as_deref().map(std::path::PathBuf::from))
            .collect();
        let dir = &self.cfg.staging_dir;
        for d in [dir.clone(), dir.join("spool")] {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                // A `.info` alone counts too: it is written before the file it describes.
                let Some(name) = e
                    .file_name()
                    .to_str()
                    .map(|n| n.trim_end_matches(".info").to_string())
                else {
                    continue;
                };
                let path = d.join(&name);
                let made_by = maker_of(&name);
                // A journaled file that is gone leaves its `.info` alone when the worker died
                // between removing the two (after its commit): that goes too.
                let unneeded = !journaled.contains(&path) || !path.exists();
                if made_by.is_some_and(|pid| dead.contains(&pid)) && unneeded {
                    remove_with_sidecar(&path);
                    tracing::debug!(path = %path.display(), "local file of a write the dead worker never answered removed");
                }
            }
        }
    }

    /// The state of a file open for writing, from what the journal says of it.
    async fn state_from_journal(
        &self,
        inode: &Inode,
        w: &OpenWrite,
    ) -> std::io::Result<WriteState> {
        let metadata = match w
            .metadata
            .as_deref()
            .and_then(|m| serde_json::from_str(m).ok())
        {
            Some(m) => m,
            None => self
                .metadata_of(inode)
                .await
                .map(|(m, _)| m)
                .unwrap_or_default(),
        };
        let expect = condition_of(&w.condition);
        if let Some(id) = &w.upload_id {
            let (store, key, id) = (self.store.clone(), inode.key.clone(), id.clone());
            tokio::spawn(async move { crate::data::commit::abort_upload(&store, &key, &id).await });
        }
        let (body, base) = match (&w.path, w.staged) {
            (Some(path), true) => {
                let base = Base {
                    key: inode.key.clone(),
                    etag: w.base_etag.clone(),
                    size: w.base_size,
                };
                let staged = StagedFile::adopt(path.into(), base, &w.changes)?;
                (
                    Body::Staged(staged),
                    CommittedPrefix {
                        etag: w.base_etag.clone(),
                        size: w.base_size,
                    },
                )
            }
            // Every byte of the stream is in its local copy: it goes on as a staged new object.
            (Some(path), false) => {
                let len = std::fs::metadata(path)?.len();
                let base = Base {
                    key: inode.key.clone(),
                    etag: String::new(),
                    size: 0,
                };
                let staged = StagedFile::adopt(path.into(), base, &[(0, Some(len))])?;
                (
                    Body::Staged(staged),
                    CommittedPrefix {
                        etag: String::new(),
                        size: 0,
                    },
                )
            }
            // A stream nothing was written to yet.
            (None, _) => (
                Body::Streaming(self.start_upload(&inode.key, &metadata, &expect)),
                CommittedPrefix {
                    etag: String::new(),
                    size: 0,
                },
            ),
        };
        let size = match &body {
            Body::Staged(f) => f.size(),
            _ => 0,
        };
        let unlinked = self.mark_pending(&inode.key, inode.ino);
        // A listing under way (lookups after the restart start them) was taken before this
        // file is pending here: it must not answer for the file's directory.
        self.listings_changed(None);
        self.set_local_size(inode.ino, size);
        let st = WriteState {
            ino: inode.ino,
            key: inode.key.clone(),
            body,
            base,
            size,
            metadata,
            unlinked,
            expect,
            last_write: Some(std::time::SystemTime::now()),
            journaled_copy: None,
        };
        self.journal_writing(&st);
        Ok(st)
    }
}
