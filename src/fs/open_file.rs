//! One open-file state per inode, shared by every descriptor of that file in this mount.
//!
//! A file opened for writing gets an [`OpenFile`]: its [`WriteState`] (what has been written and
//! where it is: streaming to a multipart upload, staged locally against the committed object,
//! or committed) behind one lock. Every write descriptor of the inode holds the same
//! `OpenFile`, so two `dd conv=notrunc`, two `>>` loops or ten threads with their own fds write
//! into one file instead of racing to overwrite each other's commits. Read descriptors of an
//! inode that has an `OpenFile` read through it, so they see what was written. close/fsync of
//! any descriptor commits the shared state; the last release commits what is left and drops it.
//!
//! An inode unlinked while open becomes an orphan: its bytes are made local (staged in full),
//! the object is deleted, nothing is ever uploaded for it again, and the staging file goes with
//! the last close.
//!
//! Lock order: `Fs::open_files` (a short map lock, never held across an await) before an
//! `OpenFile`'s state lock; the inode table is only taken briefly inside.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::write::WriteState;

pub(super) struct OpenFile {
    pub ino: u64,
    pub state: tokio::sync::Mutex<WriteState>,
}

/// The open files of a mount by inode, with how many write descriptors share each.
#[derive(Default)]
pub(super) struct OpenFiles {
    by_ino: Mutex<HashMap<u64, (Arc<OpenFile>, usize)>>,
}

impl OpenFiles {
    /// The open-file state of `ino`, if a descriptor has it open for writing (or it is an
    /// orphan still open).
    pub fn get(&self, ino: u64) -> Option<Arc<OpenFile>> {
        self.by_ino.lock().get(&ino).map(|(f, _)| f.clone())
    }

    /// Every open file with its count of write descriptors (for `s3mount status`).
    pub fn all(&self) -> Vec<(Arc<OpenFile>, usize)> {
        self.by_ino.lock().values().cloned().collect()
    }

    /// Join the state of `ino` as one more descriptor, if there is one.
    pub fn join(&self, ino: u64) -> Option<Arc<OpenFile>> {
        let mut map = self.by_ino.lock();
        let (f, n) = map.get_mut(&ino)?;
        *n += 1;
        Some(f.clone())
    }

    /// Register `state` as the open state of its inode, with one descriptor; if another
    /// descriptor registered one meanwhile, join that instead (and return false: `state` was
    /// not used).
    pub fn insert_or_join(&self, state: WriteState) -> (Arc<OpenFile>, bool) {
        let ino = state.ino();
        let mut map = self.by_ino.lock();
        if let Some((f, n)) = map.get_mut(&ino) {
            *n += 1;
            return (f.clone(), false);
        }
        let f = Arc::new(OpenFile {
            ino,
            state: tokio::sync::Mutex::new(state),
        });
        map.insert(ino, (f.clone(), 1));
        (f, true)
    }

    /// Register a state with no descriptor of its own (an orphan made for read descriptors);
    /// it goes when [`OpenFiles::drop_if_unused`] finds no descriptor on it.
    pub fn insert_unowned(&self, state: WriteState) -> Arc<OpenFile> {
        let ino = state.ino();
        let mut map = self.by_ino.lock();
        if let Some((f, _)) = map.get(&ino) {
            return f.clone();
        }
        let f = Arc::new(OpenFile {
            ino,
            state: tokio::sync::Mutex::new(state),
        });
        map.insert(ino, (f.clone(), 0));
        f
    }

    /// One write descriptor of `file` is released: true when it was the last.
    pub fn release(&self, file: &Arc<OpenFile>) -> bool {
        let mut map = self.by_ino.lock();
        match map.get_mut(&file.ino) {
            Some((f, n)) if Arc::ptr_eq(f, file) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            _ => true,
        }
    }

    /// Forget `file` if no write descriptor has joined it since its last release and `keep`
    /// (asked under the map lock) does not hold it. Returns whether it was removed.
    pub fn drop_if_unused(&self, file: &Arc<OpenFile>, keep: impl FnOnce() -> bool) -> bool {
        let mut map = self.by_ino.lock();
        match map.get(&file.ino) {
            Some((f, 0)) if Arc::ptr_eq(f, file) => {
                if keep() {
                    return false;
                }
                map.remove(&file.ino);
                true
            }
            _ => false,
        }
    }
}
