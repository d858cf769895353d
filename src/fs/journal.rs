//! The inode table's journal, for a worker started again on a live mount (`--supervise`).
//!
//! The kernel keeps the node ids it was given across a worker restart and goes on using them:
//! a `getattr`, `lookup` under a directory it holds, `open` or `readdir` of inode 4711. The
//! new worker can answer only if it knows what 4711 is. The [`InodeTable`](super::inode)
//! appends every change of its names to this file as it happens (one `write(2)` per change,
//! no fsync: a worker that dies leaves what it wrote in the page cache; the machine crashing
//! takes the mount with it anyway), and a restarted worker replays it.
//!
//! One record per line, fields separated by tabs, names and keys escaped (`\t`, `\n`, `\\`):
//! `N ino parent kind name key` (a new inode), `M ino parent name` (renamed), `K old new`
//! (keys under a renamed directory), `X parent name` (the name no longer leads to its inode),
//! `D ino` (the kernel forgot it), `O fh ino r|w|d` (a file opened for reading, for writing, a
//! directory opened), `P fh etag size` (the object version a read handle reads), `C fh`
//! (released). What is kept of an inode is what names it; its attributes
//! are read from the bucket again, its lookup count is unknown (restored inodes are never
//! dropped by a forget: a leak bounded by what the kernel held, instead of an ESTALE).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use super::attrs::Kind;

/// The journal file of one mount, open for appending.
#[derive(Debug)]
pub struct Journal {
    file: parking_lot::Mutex<Option<std::fs::File>>,
    path: PathBuf,
}

/// An inode as the journal knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named {
    pub ino: u64,
    pub parent: u64,
    pub kind: Kind,
    pub name: String,
    pub key: String,
}

/// What the kernel may still hold: inodes by number, and which name leads to which.
#[derive(Debug, Default)]
pub struct Replayed {
    pub inodes: std::collections::BTreeMap<u64, Named>,
    pub names: std::collections::HashMap<(u64, String), u64>,
    pub next_ino: u64,
    /// Open handles: fh -> (ino, how opened).
    pub handles: std::collections::BTreeMap<u64, (u64, Opened)>,
    /// The object version (ETag, size) each read handle reads.
    pub pinned: std::collections::HashMap<u64, (String, u64)>,
}

/// How a handle was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opened {
    Read,
    Write,
    Dir,
}

impl Journal {
    /// Start a new journal at `path` (a fresh mount: nothing before counts).
    pub fn create(path: &Path) -> std::io::Result<Journal> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        Ok(Journal {
            file: parking_lot::Mutex::new(Some(file)),
            path: path.to_path_buf(),
        })
    }

    pub fn new_inode(&self, n: &Named) {
        self.append(format!(
            "N\t{}\t{}\t{}\t{}\t{}\n",
            n.ino,
            n.parent,
            kind_code(n.kind),
            escape(&n.name),
            escape(&n.key)
        ));
    }

    pub fn moved(&self, ino: u64, parent: u64, name: &str) {
        self.append(format!("M\t{ino}\t{parent}\t{}\n", escape(name)));
    }

    pub fn rekeyed(&self, old_prefix: &str, new_prefix: &str) {
        self.append(format!(
            "K\t{}\t{}\n",
            escape(old_prefix),
            escape(new_prefix)
        ));
    }

    pub fn unnamed(&self, parent: u64, name: &str) {
        self.append(format!("X\t{parent}\t{}\n", escape(name)));
    }

    pub fn dropped(&self, ino: u64) {
        self.append(format!("D\t{ino}\n"));
    }

    pub fn opened(&self, fh: u64, ino: u64, how: Opened) {
        let c = match how {
            Opened::Read => 'r',
            Opened::Write => 'w',
            Opened::Dir => 'd',
        };
        self.append(format!("O\t{fh}\t{ino}\t{c}\n"));
    }

    pub fn pinned(&self, fh: u64, etag: &str, size: u64) {
        self.append(format!("P\t{fh}\t{}\t{size}\n", escape(etag)));
    }

    pub fn closed(&self, fh: u64) {
        self.append(format!("C\t{fh}\n"));
    }

    /// One record, one write. A journal that cannot be written is given up (logged once): the
    /// mount goes on, only a worker restart would then fail the kernel's older node ids.
    fn append(&self, line: String) {
        let mut file = self.file.lock();
        let Some(f) = file.as_mut() else { return };
        if let Err(e) = f.write_all(line.as_bytes()) {
            tracing::error!(path = %self.path.display(), "cannot write the inode journal ({e}): a worker restart will not find the inodes the kernel holds");
            *file = None;
        }
    }

    /// Read a journal back (what a worker that died wrote). A last line cut short by the death
    /// is ignored.
    pub fn replay(path: &Path) -> std::io::Result<Replayed> {
        let mut r = Replayed {
            next_ino: super::inode::ROOT_INO + 1,
            ..Replayed::default()
        };
        let reader = std::io::BufReader::new(std::fs::File::open(path)?);
        for line in reader.split(b'\n') {
            let line = line?;
            let Ok(line) = std::str::from_utf8(&line) else {
                continue;
            };
            let f: Vec<&str> = line.split('\t').collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
            match (f.first().copied(), f.len()) {
                (Some("N"), 6) => {
                    let (Some(ino), Some(parent), Some(kind)) =
                        (num(1), num(2), f.get(3).and_then(|k| kind_of(k)))
                    else {
                        continue;
                    };
                    let n = Named {
                        ino,
                        parent,
                        kind,
                        name: unescape(f[4]),
                        key: unescape(f[5]),
                    };
                    r.names.insert((parent, n.name.clone()), ino);
                    r.next_ino = r.next_ino.max(ino + 1);
                    r.inodes.insert(ino, n);
                }
                (Some("M"), 4) => {
                    let (Some(ino), Some(parent)) = (num(1), num(2)) else {
                        continue;
                    };
                    let name = unescape(f[3]);
                    if let Some(n) = r.inodes.get_mut(&ino) {
                        let old = (n.parent, n.name.clone());
                        if r.names.get(&old) == Some(&ino) {
                            r.names.remove(&old);
                        }
                        n.parent = parent;
                        n.name = name.clone();
                    }
                    r.names.insert((parent, name), ino);
                }
                (Some("K"), 3) => {
                    let (old, new) = (unescape(f[1]), unescape(f[2]));
                    for n in r.inodes.values_mut() {
                        if let Some(rest) = n.key.strip_prefix(&old) {
                            n.key = format!("{new}{rest}");
                        }
                    }
                }
                (Some("X"), 3) => {
                    if let Some(parent) = num(1) {
                        r.names.remove(&(parent, unescape(f[2])));
                    }
                }
                (Some("O"), 4) => {
                    let how = match f[3] {
                        "r" => Opened::Read,
                        "w" => Opened::Write,
                        "d" => Opened::Dir,
                        _ => continue,
                    };
                    if let (Some(fh), Some(ino)) = (num(1), num(2)) {
                        r.handles.insert(fh, (ino, how));
                    }
                }
                (Some("P"), 4) => {
                    if let (Some(fh), Some(size)) = (num(1), num(3)) {
                        r.pinned.insert(fh, (unescape(f[2]), size));
                    }
                }
                (Some("C"), 2) => {
                    if let Some(fh) = num(1) {
                        r.handles.remove(&fh);
                        r.pinned.remove(&fh);
                    }
                }
                (Some("D"), 2) => {
                    if let Some(ino) = num(1) {
                        if let Some(n) = r.inodes.remove(&ino) {
                            let key = (n.parent, n.name);
                            if r.names.get(&key) == Some(&ino) {
                                r.names.remove(&key);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(r)
    }

    /// Start the journal again with just `r` (after a replay: it does not grow without end
    /// over many restarts). Written beside it and renamed over it.
    pub fn rewrite(path: &Path, r: &Replayed) -> std::io::Result<Journal> {
        let tmp = path.with_extension("new");
        {
            let j = Journal::create(&tmp)?;
            for n in r.inodes.values() {
                j.new_inode(n);
            }
            for (fh, (ino, how)) in &r.handles {
                j.opened(*fh, *ino, *how);
                if let Some((etag, size)) = r.pinned.get(fh) {
                    j.pinned(*fh, etag, *size);
                }
            }
            // Names that lead nowhere now (unlinked while the kernel still holds the inode).
            for n in r.inodes.values() {
                if !r.names.contains_key(&(n.parent, n.name.clone())) {
                    j.unnamed(n.parent, &n.name);
                }
            }
            let synced = match j.file.lock().as_ref() {
                Some(f) => f.sync_data(),
                None => Err(std::io::Error::other(
                    "the new journal could not be written",
                )),
            };
            synced?;
        }
        std::fs::rename(&tmp, path)?;
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        Ok(Journal {
            file: parking_lot::Mutex::new(Some(file)),
            path: path.to_path_buf(),
        })
    }
}

fn kind_code(k: Kind) -> String {
    match k {
        Kind::File => "f".into(),
        Kind::Dir => "d".into(),
        Kind::Symlink => "l".into(),
        Kind::Special(bits) => format!("s{bits}"),
    }
}

fn kind_of(code: &str) -> Option<Kind> {
    Some(match code {
        "f" => Kind::File,
        "d" => Kind::Dir,
        "l" => Kind::Symlink,
        s => Kind::Special(s.strip_prefix('s')?.parse().ok()?),
    })
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\t', "\\t")
        .replace('\n', "\\n")
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(ino: u64, parent: u64, kind: Kind, name: &str, key: &str) -> Named {
        Named {
            ino,
            parent,
            kind,
            name: name.into(),
            key: key.into(),
        }
    }

    /// Every record kind, awkward names, and a last line cut short by a crash.
    #[test]
    fn a_replay_gives_back_what_was_journaled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inodes.journal");
        let j = Journal::create(&path).unwrap();
        j.new_inode(&named(2, 1, Kind::Dir, "src", "src/"));
        j.new_inode(&named(3, 2, Kind::File, "a\tb\nc\\d", "src/a\tb\nc\\d"));
        j.new_inode(&named(4, 1, Kind::Symlink, "link", "link"));
        j.new_inode(&named(5, 1, Kind::Special(0o010000), "fifo", "fifo"));
        j.new_inode(&named(6, 1, Kind::File, "gone", "gone"));
        j.moved(2, 1, "lib");
        j.rekeyed("src/", "lib/");
        j.dropped(6);
        j.unnamed(1, "link");
        j.opened(10, 3, Opened::Read);
        j.pinned(10, "\"e1\"", 6);
        j.opened(13, 3, Opened::Read);
        j.pinned(13, "\"e2\"", 7);
        j.opened(11, 3, Opened::Write);
        j.opened(12, 2, Opened::Dir);
        j.closed(10);
        drop(j);
        // A record cut short by the worker's death.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"N\t7\t1\tf\tpartial").unwrap();
        drop(f);

        let r = Journal::replay(&path).unwrap();
        assert_eq!(r.inodes.len(), 4);
        assert_eq!(r.inodes[&2], named(2, 1, Kind::Dir, "lib", "lib/"));
        assert_eq!(
            r.inodes[&3],
            named(3, 2, Kind::File, "a\tb\nc\\d", "lib/a\tb\nc\\d")
        );
        assert_eq!(r.inodes[&5].kind, Kind::Special(0o010000));
        assert_eq!(r.names.get(&(1, "lib".into())), Some(&2));
        assert_eq!(r.names.get(&(1, "src".into())), None);
        assert_eq!(r.names.get(&(1, "link".into())), None, "unnamed");
        assert!(r.inodes.contains_key(&4), "the kernel may still hold it");
        assert_eq!(r.names.get(&(1, "gone".into())), None);
        assert_eq!(r.next_ino, 7);
        assert_eq!(
            r.handles.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(),
            vec![
                (11, (3, Opened::Write)),
                (12, (2, Opened::Dir)),
                (13, (3, Opened::Read))
            ]
        );
        assert_eq!(r.pinned.len(), 1);
        assert_eq!(r.pinned[&13], ("\"e2\"".to_string(), 7));

        // Compacted, it replays to the same.
        let j = Journal::rewrite(&path, &r).unwrap();
        j.new_inode(&named(8, 2, Kind::File, "new", "lib/new"));
        drop(j);
        let again = Journal::replay(&path).unwrap();
        assert_eq!(again.inodes.len(), 5);
        assert_eq!(again.inodes[&2], r.inodes[&2]);
        assert_eq!(again.names.get(&(1, "link".into())), None);
        assert_eq!(again.names.get(&(2, "new".into())), Some(&8));
        assert_eq!(again.next_ino, 9);
        assert_eq!(again.handles, r.handles);
        assert_eq!(again.pinned, r.pinned);
    }
}
