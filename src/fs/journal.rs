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
//! `N ino parent kind name key` (a new inode), `M ino parent name key` (renamed; `key` absent
//! in records of older workers), `K old new`
//! (keys under a renamed directory), `X parent name` (the name no longer leads to its inode),
//! `D ino` (the kernel forgot it), `O fh ino r|w|d [REQ]` (a file opened for reading, for
//! writing, a directory opened; REQ the kernel's request id of the open, when known), `P fh
//! etag size` (the object version a read handle reads), `C fh` (released), `R REQ` (a request
//! that changed names or attributes carried out, just before its answer: the kernel resends
//! those the dead worker did not answer, and the new one must not carry them out twice),
//! `I pid` (a worker that journaled here: its local files are named after its pid). A file open for writing keeps its bytes on local disk where a new worker finds
//! them: `G ino s|t PATH BASE_ETAG BASE_SIZE COND` (staged over the object, or a stream whose
//! every byte is in its local copy PATH; `-` for none yet), `A ino JSON` (its metadata),
//! `W ino off len` and `Z ino size` (writes and truncations of a staged file), `U ino ID` (the
//! stream's multipart upload), `E ino` (committed: nothing to take over). What is kept of an inode is what names it; its attributes
//! are read from the bucket again, its lookup count is unknown (restored inodes are never
//! dropped by a forget: a leak bounded by what the kernel held, instead of an ESTALE).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use super::attrs::Kind;

/// The journal file of one mount, open for appending.
#[derive(Debug)]
pub struct Journal {
    inner: parking_lot::Mutex<Inner>,
    path: PathBuf,
    /// Compacted when it grows (the mount's own journal; not a compaction's temporary file).
    compacts: bool,
}

#[derive(Debug)]
struct Inner {
    /// None once a write failed (given up).
    file: Option<std::fs::File>,
    /// Bytes appended since the file was last started or compacted.
    written: u64,
    /// Its size then.
    base: u64,
}

/// The journal is compacted (read back and written again with what is still live) once this
/// much was appended, or four times its compacted size if that is more: an inode costs two
/// records over its life (made, forgotten), so a `find` over a million files would otherwise
/// leave ~100 MB behind.
const COMPACT_AFTER: u64 = 8 << 20;

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
    /// Files open for writing whose bytes are on local disk, by inode.
    pub files: std::collections::BTreeMap<u64, OpenWrite>,
    /// The request that opened each open handle, where known: fh -> request id.
    pub opened_by: std::collections::HashMap<u64, u64>,
    /// The latest requests carried out (at most [`DONE_KEPT`]).
    pub done: std::collections::BTreeSet<u64>,
    /// The workers that journaled here, by pid.
    pub workers: std::collections::BTreeSet<u32>,
}

/// Requests carried out that the journal remembers: more than the kernel can have had in
/// flight at a worker's death (its queue of background requests is 12 deep by default, plus
/// one synchronous request per thread of the processes using the mount).
pub const DONE_KEPT: usize = 4096;

/// Where a file open for writing keeps its bytes, as journaled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenWrite {
    /// Staged over the committed object (else a stream: every byte in `path` from offset 0).
    pub staged: bool,
    /// The local file; None for a stream nothing was written to yet.
    pub path: Option<String>,
    pub base_etag: String,
    pub base_size: u64,
    /// The commit's condition: `n` (If-None-Match), `o` (none), `m:ETAG` (If-Match).
    pub condition: String,
    /// Its metadata as JSON.
    pub metadata: Option<String>,
    /// A staged file's writes (offset, Some(len)) and truncations (size, None), in order.
    pub changes: Vec<(u64, Option<u64>)>,
    pub upload_id: Option<String>,
    /// Its bytes are not all on local disk (past --spool-limit, or a write failed): a new
    /// worker cannot go on with it.
    pub lost: bool,
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
        Ok(Journal::with_file(path, file, 0, true))
    }

    fn with_file(path: &Path, file: std::fs::File, base: u64, compacts: bool) -> Journal {
        Journal {
            inner: parking_lot::Mutex::new(Inner {
                file: Some(file),
                written: 0,
                base,
            }),
            path: path.to_path_buf(),
            compacts,
        }
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

    pub fn moved(&self, ino: u64, parent: u64, name: &str, key: &str) {
        self.append(format!(
            "M\t{ino}\t{parent}\t{}\t{}\n",
            escape(name),
            escape(key)
        ));
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

    /// `fh` opened on `ino`, by the kernel's request `request` if known.
    pub fn opened(&self, fh: u64, ino: u64, how: Opened, request: Option<u64>) {
        let c = match how {
            Opened::Read => 'r',
            Opened::Write => 'w',
            Opened::Dir => 'd',
        };
        self.append(match request {
            Some(r) => format!("O\t{fh}\t{ino}\t{c}\t{r}\n"),
            None => format!("O\t{fh}\t{ino}\t{c}\n"),
        });
    }

    /// Worker `pid` journals here from now on.
    pub fn worker(&self, pid: u32) {
        self.append(format!("I\t{pid}\n"));
    }

    /// The kernel's request `request` was carried out (its answer goes out next).
    pub fn done(&self, request: u64) {
        self.append(format!("R\t{request}\n"));
    }

    pub fn pinned(&self, fh: u64, etag: &str, size: u64) {
        self.append(format!("P\t{fh}\t{}\t{size}\n", escape(etag)));
    }

    pub fn closed(&self, fh: u64) {
        self.append(format!("C\t{fh}\n"));
    }

    /// The bytes of `ino` (open for writing) are in local file `w.path`, as `w` says.
    pub fn writing(&self, ino: u64, w: &OpenWrite) {
        let opt = |v: &Option<String>| v.as_deref().map_or("-".to_string(), escape);
        let mut line = format!(
            "G\t{ino}\t{}\t{}\t{}\t{}\t{}\n",
            if w.staged { 's' } else { 't' },
            opt(&w.path),
            if w.base_etag.is_empty() {
                "-".to_string()
            } else {
                escape(&w.base_etag)
            },
            w.base_size,
            escape(&w.condition)
        );
        if let Some(m) = &w.metadata {
            line += &format!("A\t{ino}\t{}\n", escape(m));
        }
        for (off, len) in &w.changes {
            match len {
                Some(len) => line += &format!("W\t{ino}\t{off}\t{len}\n"),
                None => line += &format!("Z\t{ino}\t{off}\n"),
            }
        }
        if let Some(id) = &w.upload_id {
            line += &format!("U\t{ino}\t{}\n", escape(id));
        }
        if w.lost {
            line += &format!("L\t{ino}\n");
        }
        self.append(line);
    }

    pub fn wrote(&self, ino: u64, offset: u64, len: u64) {
        self.append(format!("W\t{ino}\t{offset}\t{len}\n"));
    }

    pub fn resized(&self, ino: u64, size: u64) {
        self.append(format!("Z\t{ino}\t{size}\n"));
    }

    pub fn uploading(&self, ino: u64, upload_id: &str) {
        self.append(format!("U\t{ino}\t{}\n", escape(upload_id)));
    }

    /// `ino` is committed: nothing to take over.
    pub fn committed(&self, ino: u64) {
        self.append(format!("E\t{ino}\n"));
    }

    /// The bytes written to `ino` are not all on local disk any more.
    pub fn lost(&self, ino: u64) {
        self.append(format!("L\t{ino}\n"));
    }

    /// One record, one write. A journal that cannot be written is given up (logged once): the
    /// mount goes on, only a worker restart would then fail the kernel's older node ids.
    fn append(&self, line: String) {
        let mut inner = self.inner.lock();
        let Some(f) = inner.file.as_mut() else { return };
        if let Err(e) = f.write_all(line.as_bytes()) {
            tracing::error!(path = %self.path.display(), "cannot write the inode journal ({e}): a worker restart will not find the inodes the kernel holds");
            inner.file = None;
            return;
        }
        inner.written += line.len() as u64;
        if self.compacts && inner.written > COMPACT_AFTER.max(4 * inner.base) {
            // Appends wait meanwhile (this lock), so none is lost between the read and the
            // rename: the file read back holds every record written so far.
            match Self::replay(&self.path).and_then(|r| Self::write_compacted(&self.path, &r)) {
                Ok((file, size)) => {
                    tracing::debug!(path = %self.path.display(), bytes = size, "inode journal compacted");
                    inner.file = Some(file);
                    inner.base = size;
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), "cannot compact the inode journal: {e}");
                    inner.base = inner.base.saturating_add(inner.written);
                }
            }
            inner.written = 0;
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
                // The key came with it later: records of an older worker have none (their
                // file keeps the key it was made with, directories are rekeyed by `K`).
                (Some("M"), 4 | 5) => {
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
                        if let Some(key) = f.get(4) {
                            n.key = unescape(key);
                        }
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
                (Some("O"), 4 | 5) => {
                    let how = match f[3] {
                        "r" => Opened::Read,
                        "w" => Opened::Write,
                        "d" => Opened::Dir,
                        _ => continue,
                    };
                    if let (Some(fh), Some(ino)) = (num(1), num(2)) {
                        r.handles.insert(fh, (ino, how));
                        if let Some(req) = num(4) {
                            r.opened_by.insert(fh, req);
                        }
                    }
                }
                (Some("I"), 2) => {
                    if let Ok(pid) = f[1].parse() {
                        r.workers.insert(pid);
                    }
                }
                (Some("R"), 2) => {
                    if let Some(req) = num(1) {
                        r.done.insert(req);
                        if r.done.len() > DONE_KEPT {
                            r.done.pop_first();
                        }
                    }
                }
                (Some("P"), 4) => {
                    if let (Some(fh), Some(size)) = (num(1), num(3)) {
                        r.pinned.insert(fh, (unescape(f[2]), size));
                    }
                }
                (Some("G"), 7) => {
                    let (Some(ino), Some(base_size)) = (num(1), num(5)) else {
                        continue;
                    };
                    let field = |v: &str| (v != "-").then(|| unescape(v));
                    r.files.insert(
                        ino,
                        OpenWrite {
                            staged: f[2] == "s",
                            path: field(f[3]),
                            base_etag: field(f[4]).unwrap_or_default(),
                            base_size,
                            condition: unescape(f[6]),
                            ..OpenWrite::default()
                        },
                    );
                }
                (Some("A"), 3) => {
                    if let Some(w) = num(1).and_then(|ino| r.files.get_mut(&ino)) {
                        w.metadata = Some(unescape(f[2]));
                    }
                }
                (Some("W"), 4) => {
                    if let (Some(w), Some(off), Some(len)) =
                        (num(1).and_then(|ino| r.files.get_mut(&ino)), num(2), num(3))
                    {
                        w.changes.push((off, Some(len)));
                    }
                }
                (Some("Z"), 3) => {
                    if let (Some(w), Some(size)) =
                        (num(1).and_then(|ino| r.files.get_mut(&ino)), num(2))
                    {
                        w.changes.push((size, None));
                    }
                }
                (Some("U"), 3) => {
                    if let Some(w) = num(1).and_then(|ino| r.files.get_mut(&ino)) {
                        w.upload_id = Some(unescape(f[2]));
                    }
                }
                (Some("E"), 2) => {
                    if let Some(ino) = num(1) {
                        r.files.remove(&ino);
                    }
                }
                (Some("L"), 2) => {
                    if let Some(ino) = num(1) {
                        r.files.entry(ino).or_default().lost = true;
                    }
                }
                (Some("C"), 2) => {
                    if let Some(fh) = num(1) {
                        r.handles.remove(&fh);
                        r.pinned.remove(&fh);
                        r.opened_by.remove(&fh);
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
    /// over many restarts).
    pub fn rewrite(path: &Path, r: &Replayed) -> std::io::Result<Journal> {
        let (file, size) = Self::write_compacted(path, r)?;
        Ok(Journal::with_file(path, file, size, true))
    }

    /// Write `r` beside `path`, sync it and rename it over `path`; returns the new file open
    /// for appending, and its size.
    fn write_compacted(path: &Path, r: &Replayed) -> std::io::Result<(std::fs::File, u64)> {
        let tmp = path.with_extension("new");
        {
            let j = Journal::with_file(&tmp, Journal::create(&tmp)?.take_file()?, 0, false);
            for n in r.inodes.values() {
                j.new_inode(n);
            }
            for req in &r.done {
                j.done(*req);
            }
            for pid in &r.workers {
                j.worker(*pid);
            }
            for (fh, (ino, how)) in &r.handles {
                j.opened(*fh, *ino, *how, r.opened_by.get(fh).copied());
                if let Some((etag, size)) = r.pinned.get(fh) {
                    j.pinned(*fh, etag, *size);
                }
            }
            for (ino, w) in &r.files {
                j.writing(*ino, w);
            }
            // Names that lead nowhere now (unlinked while the kernel still holds the inode).
            for n in r.inodes.values() {
                if !r.names.contains_key(&(n.parent, n.name.clone())) {
                    j.unnamed(n.parent, &n.name);
                }
            }
            j.take_file()?.sync_data()?;
        }
        std::fs::rename(&tmp, path)?;
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok((file, size))
    }

    /// The file, if every write to it succeeded.
    fn take_file(&self) -> std::io::Result<std::fs::File> {
        self.inner
            .lock()
            .file
            .take()
            .ok_or_else(|| std::io::Error::other("the journal could not be written"))
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
    /// Inodes made and forgotten by the hundred thousand (a `find` over a big tree): the file
    /// is compacted as it goes and stays small, and replays to what is live.
    #[test]
    fn a_long_lived_journal_is_compacted_as_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inodes");
        let j = Journal::create(&path).unwrap();
        for ino in 2..12 {
            j.new_inode(&named(ino, 1, Kind::File, &format!("keep{ino}"), "k"));
        }
        j.opened(5, 3, Opened::Read, None);
        for ino in 100..250_100u64 {
            j.new_inode(&named(
                ino,
                1,
                Kind::File,
                "passing-through-a-long-name",
                "key",
            ));
            j.dropped(ino);
        }
        // About 20 MB were appended; what is left is at most what came after the last
        // compaction.
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size <= COMPACT_AFTER + 4096, "{size} bytes");
        j.new_inode(&named(300_000, 1, Kind::Dir, "last", "last/"));
        drop(j);
        let r = Journal::replay(&path).unwrap();
        assert_eq!(r.inodes.len(), 11);
        assert_eq!(r.names.get(&(1, "keep7".into())), Some(&7));
        assert_eq!(r.names.get(&(1, "last".into())), Some(&300_000));
        assert_eq!(r.handles.get(&5), Some(&(3, Opened::Read)));
        assert_eq!(r.next_ino, 300_001);
    }

    /// A renamed file comes back with its new key (rsync's temporary name renamed, then the
    /// worker died); a record of an older worker, without the key, keeps the old one.
    #[test]
    fn a_renamed_file_is_replayed_with_its_new_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inodes.journal");
        let j = Journal::create(&path).unwrap();
        j.new_inode(&named(2, 1, Kind::File, ".x.tmp", "d/.x.tmp"));
        j.moved(2, 1, "x", "d/x");
        j.new_inode(&named(3, 1, Kind::File, "old", "d/old"));
        drop(j);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"M\t3\t1\tnew\n").unwrap();
        drop(f);
        let r = Journal::replay(&path).unwrap();
        assert_eq!(r.inodes[&2], named(2, 1, Kind::File, "x", "d/x"));
        assert_eq!(r.inodes[&3], named(3, 1, Kind::File, "new", "d/old"));
    }

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
        j.moved(2, 1, "lib", "lib/");
        j.rekeyed("src/", "lib/");
        j.dropped(6);
        j.unnamed(1, "link");
        j.opened(10, 3, Opened::Read, Some(40));
        j.pinned(10, "\"e1\"", 6);
        j.opened(13, 3, Opened::Read, None);
        j.pinned(13, "\"e2\"", 7);
        j.opened(11, 3, Opened::Write, Some(44));
        j.opened(12, 2, Opened::Dir, Some(45));
        j.closed(10);
        for req in [41, 42, 43] {
            j.done(req);
        }
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
        // The requests that opened the handles still open, and those carried out.
        assert_eq!(
            r.opened_by,
            std::collections::HashMap::from([(11, 44), (12, 45)])
        );
        assert_eq!(r.done.iter().copied().collect::<Vec<_>>(), vec![41, 42, 43]);

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
        assert_eq!(again.opened_by, r.opened_by);
        assert_eq!(again.done, r.done);
    }

    /// Only the latest requests carried out are remembered, however many were journaled.
    #[test]
    fn requests_carried_out_are_kept_up_to_a_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inodes");
        let j = Journal::create(&path).unwrap();
        for req in 1..=(DONE_KEPT as u64 + 100) {
            j.done(req);
        }
        drop(j);
        let r = Journal::replay(&path).unwrap();
        assert_eq!(r.done.len(), DONE_KEPT);
        assert_eq!(r.done.first(), Some(&101));
        assert!(r.done.contains(&(DONE_KEPT as u64 + 100)));
    }
}
