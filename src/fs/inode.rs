//! The inode table: inode numbers <-> (parent, name), what each inode is in the bucket, and the
//! kernel's lookup counts (an inode is dropped when the kernel forgets it).

use std::collections::HashMap;
use std::time::Instant;

use super::attrs::{Attr, Kind};
use super::journal::{Journal, Named, Replayed};
use crate::store::ObjectMeta;

pub const ROOT_INO: u64 = 1;

#[derive(Clone, Debug)]
pub struct Inode {
    pub ino: u64,
    pub parent: u64,
    pub name: String,
    pub kind: Kind,
    /// Files: the object key. Directories: the key prefix, ending in `/` (or empty at a bucket root).
    pub key: String,
    pub attr: Attr,
    /// What the bucket said last, with when; `None` for directories without a marker.
    pub meta: Option<ObjectMeta>,
    pub fetched: Instant,
    pub lookups: u64,
    /// The ETag whose bytes the kernel page cache may hold for this inode.
    pub page_cache_etag: Option<String>,
    /// The ETag of the last version this mount committed (read descriptors move to it).
    pub written_etag: Option<String>,
    /// Unlinked while open: it lives on, with nlink 0, until the kernel forgets it.
    pub unlinked: bool,
}

#[derive(Debug)]
pub struct InodeTable {
    inodes: HashMap<u64, Inode>,
    by_name: HashMap<(u64, String), u64>,
    next_ino: u64,
    /// `--supervise`: every change of names, for a worker started again (fs/journal.rs).
    journal: Option<std::sync::Arc<Journal>>,
}

/// The lookup count of an inode read back from the journal: unknown, so no forget drops it.
const RESTORED_LOOKUPS: u64 = 1 << 40;

impl InodeTable {
    pub fn new(root: Inode) -> Self {
        let mut inodes = HashMap::new();
        inodes.insert(ROOT_INO, root);
        InodeTable {
            inodes,
            by_name: HashMap::new(),
            next_ino: ROOT_INO + 1,
            journal: None,
        }
    }

    /// Journal every change of names from now on.
    pub fn set_journal(&mut self, journal: std::sync::Arc<Journal>) {
        self.journal = Some(journal);
    }

    /// Take back the inodes a journal names (a worker started again on a live mount): numbered
    /// and named as the kernel knows them, their attributes from `make_attr` (placeholders,
    /// `fetched` at `stale`, so the first getattr asks the bucket).
    pub fn restore(&mut self, r: Replayed, stale: Instant, make_attr: impl Fn(&Named) -> Attr) {
        for n in r.inodes.values() {
            if n.ino == ROOT_INO {
                continue;
            }
            self.inodes.insert(
                n.ino,
                Inode {
                    ino: n.ino,
                    parent: n.parent,
                    name: n.name.clone(),
                    kind: n.kind,
                    key: n.key.clone(),
                    attr: make_attr(n),
                    meta: None,
                    fetched: stale,
                    lookups: RESTORED_LOOKUPS,
                    page_cache_etag: None,
                    written_etag: None,
                    unlinked: false,
                },
            );
        }
        self.by_name = r.names;
        self.next_ino = self.next_ino.max(r.next_ino);
    }

    pub fn get(&self, ino: u64) -> Option<&Inode> {
        self.inodes.get(&ino)
    }

    pub fn get_mut(&mut self, ino: u64) -> Option<&mut Inode> {
        self.inodes.get_mut(&ino)
    }

    pub fn find(&self, parent: u64, name: &str) -> Option<u64> {
        self.by_name.get(&(parent, name.to_string())).copied()
    }

    /// Insert or refresh the inode for `parent/name` and count one kernel lookup on it.
    /// A change of kind (file replaced by a directory) gets a fresh inode number.
    pub fn upsert(
        &mut self,
        parent: u64,
        name: &str,
        kind: Kind,
        key: String,
        meta: Option<ObjectMeta>,
        make_attr: impl Fn(u64) -> Attr,
    ) -> Attr {
        // What a HEAD, a mkdir or a write of this mount told about the entry outlives a
        // listing, which knows less: a listing shows no stored mode, owner or times, and no
        // symlink or special file (all look like plain files), nor a directory's marker
        // metadata. Kept while the object is the same version (same ETag; any ETag for a
        // directory, whose listing entry names no version).
        if let Some(inode) = self
            .find(parent, name)
            .and_then(|ino| self.inodes.get_mut(&ino))
        {
            let listed = meta.as_ref().is_none_or(|m| !m.has_metadata);
            let known = inode.meta.as_ref().is_some_and(|m| m.has_metadata);
            let same_version = match (&inode.meta, &meta) {
                (Some(old), Some(new)) => old.etag.is_some() && old.etag == new.etag,
                _ => false,
            };
            // An entry with no ETag is this mount's own file being written as it was when a
            // directory was opened: what the inode learnt since (its commit) is newer.
            let stale_pending = meta.as_ref().is_some_and(|m| m.etag.is_none());
            let keep = listed
                && known
                && match (inode.kind, kind) {
                    (Kind::Dir, Kind::Dir) => true,
                    (Kind::Dir, _) | (_, Kind::Dir) => false,
                    (old, new) => {
                        (old == new || new == Kind::File) && (same_version || stale_pending)
                    }
                };
            if keep {
                inode.lookups += 1;
                return inode.attr;
            }
        }
        let existing = self
            .find(parent, name)
            .filter(|ino| self.inodes.get(ino).is_some_and(|i| i.kind == kind));
        let ino = match existing {
            Some(ino) => ino,
            None => {
                let ino = self.next_ino;
                self.next_ino += 1;
                self.by_name.insert((parent, name.to_string()), ino);
                if let Some(j) = &self.journal {
                    j.new_inode(&Named {
                        ino,
                        parent,
                        kind,
                        name: name.to_string(),
                        key: key.clone(),
                    });
                }
                ino
            }
        };
        let attr = make_attr(ino);
        let entry = self.inodes.entry(ino).or_insert_with(|| Inode {
            ino,
            parent,
            name: name.to_string(),
            kind,
            key: key.clone(),
            attr,
            meta: None,
            fetched: Instant::now(),
            lookups: 0,
            page_cache_etag: None,
            written_etag: None,
            unlinked: false,
        });
        entry.key = key;
        entry.attr = attr;
        entry.meta = meta;
        entry.fetched = Instant::now();
        entry.lookups += 1;
        attr
    }

    /// `parent/name` no longer exists: later lookups must not find the old inode (the kernel
    /// may still hold it until it forgets).
    pub fn remove_name(&mut self, parent: u64, name: &str) {
        if self.by_name.remove(&(parent, name.to_string())).is_some() {
            if let Some(j) = &self.journal {
                j.unnamed(parent, name);
            }
        }
    }

    /// The inode `ino` is now `newparent/newname` (same inode number, as rename(2) requires).
    pub fn rename_entry(
        &mut self,
        ino: u64,
        parent: u64,
        name: &str,
        newparent: u64,
        newname: &str,
    ) {
        if self.by_name.get(&(parent, name.to_string())) == Some(&ino) {
            self.by_name.remove(&(parent, name.to_string()));
        }
        self.by_name.insert((newparent, newname.to_string()), ino);
        let mut key = String::new();
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.parent = newparent;
            i.name = newname.to_string();
            key.clone_from(&i.key);
        }
        if let Some(j) = &self.journal {
            // The caller set the new key before (a file's in rename, a directory's by rekey).
            j.moved(ino, newparent, newname, &key);
        }
    }

    /// Keys below a renamed directory: `old_prefix...` becomes `new_prefix...` everywhere.
    pub fn rekey(&mut self, old_prefix: &str, new_prefix: &str) {
        if let Some(j) = &self.journal {
            j.rekeyed(old_prefix, new_prefix);
        }
        for i in self.inodes.values_mut() {
            if let Some(rest) = i.key.strip_prefix(old_prefix) {
                i.key = format!("{new_prefix}{rest}");
                if let Some(m) = i.meta.as_mut() {
                    m.key = i.key.clone();
                }
            }
        }
    }

    /// The kernel dropped `n` references.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let Some(inode) = self.inodes.get_mut(&ino) else {
            return;
        };
        inode.lookups = inode.lookups.saturating_sub(n);
        if inode.lookups == 0 {
            let key = (inode.parent, inode.name.clone());
            self.inodes.remove(&ino);
            if self.by_name.get(&key) == Some(&ino) {
                self.by_name.remove(&key);
            }
            if let Some(j) = &self.journal {
                j.dropped(ino);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.inodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inodes.is_empty()
    }
}
