//! POSIX semantics on objects. No fuser types and no AWS types: everything here is testable
//! against [`crate::store::mock::MockStore`].
//!
//! Where things are: [`Fs`] (this file) answers lookups, attributes, opens, reads and
//! directory listings; `namespace.rs` creates and removes names; `write.rs` holds the open-file
//! state of a file being written and commits it; `open_file.rs` shares that state among the
//! descriptors of one inode; `setattr.rs` changes stored metadata; `rename.rs` moves keys;
//! `known.rs` remembers stored metadata per object version and confirms listed entries;
//! `inode.rs`, `dir.rs`, `attrs.rs`, `xattr.rs` and `mime.rs` are the tables and formats.
//!
//! What `Fs` knows of the bucket lives in a few maps, each behind its own short lock, never
//! held across an await. When two are held at once it is in this order, and only this order:
//! `open_files` -> `files` -> `inodes` -> `pending`; a directory handle's `items` -> `inodes`
//! -> `known`'s maps; a read descriptor's reader -> `inodes`; `listings` -> `negative`.
//! `inflight`, `walked`, `storm_below` and `dirs` are taken alone.
//! An open file's state (a tokio mutex) may be held across awaits and is taken before any of
//! the maps, never while one is held.

pub mod attrs;
pub mod dir;
pub mod inode;
pub mod journal;
mod known;
mod mime;
mod namespace;
mod open_file;
mod rename;
mod restart;
mod setattr;
pub mod status;
mod write;
mod xattr;

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use lru::LruCache;
use parking_lot::Mutex;

use crate::data::budget::Budget;
use crate::data::cache::{BlockCache, CacheConfig};
use crate::data::commit::{Capabilities, UploadConfig};
use crate::data::prefetch::{ObjectReader, PrefetchConfig};
use crate::store::{
    ByteRange, ListPage, ObjectMeta, ObjectStore, StoreError, LEGACY_FOLDER_SUFFIX,
};
pub use attrs::{Attr, AttrDefaults, Kind};
use dir::{invalid_name_reason, DirEntry, Listing, WarnOnce};
use inode::{Inode, InodeTable, ROOT_INO};
pub use namespace::Caller;
pub use setattr::SetAttr;

/// An errno, the only error the kernel understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EROFS: Errno = Errno(libc::EROFS);
    pub const EBADF: Errno = Errno(libc::EBADF);
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    pub const EISDIR: Errno = Errno(libc::EISDIR);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const EACCES: Errno = Errno(libc::EACCES);
    pub const ESTALE: Errno = Errno(libc::ESTALE);
    pub const ENAMETOOLONG: Errno = Errno(libc::ENAMETOOLONG);
    pub const ENOTSUP: Errno = Errno(libc::ENOTSUP);
    pub const ETIMEDOUT: Errno = Errno(libc::ETIMEDOUT);
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    pub const ENOTEMPTY: Errno = Errno(libc::ENOTEMPTY);
    pub const EXDEV: Errno = Errno(libc::EXDEV);
    pub const EBUSY: Errno = Errno(libc::EBUSY);
    pub const EFBIG: Errno = Errno(libc::EFBIG);
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const ENODATA: Errno = Errno(libc::ENODATA);
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    pub const ENXIO: Errno = Errno(libc::ENXIO);
}

impl Errno {
    /// A local I/O error keeps its errno (a full staging disk is ENOSPC, not EIO).
    pub fn from_io(e: &std::io::Error) -> Errno {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

pub type FsResult<T> = Result<T, Errno>;

/// The one place store errors become errnos; everything but "not found" is logged with its key.
fn errno_of(e: &StoreError, op: &str) -> Errno {
    let errno = match e {
        StoreError::NotFound(_) => return Errno::ENOENT,
        StoreError::NoSuchBucket(_) => Errno::EIO,
        StoreError::AccessDenied(_) | StoreError::NoCredentials(_) => Errno::EACCES,
        StoreError::PreconditionFailed(_) => Errno::ESTALE,
        StoreError::InvalidRange(_) => Errno::EINVAL,
        StoreError::Timeout(_) => Errno::ETIMEDOUT,
        StoreError::Unsupported { .. } => Errno::ENOTSUP,
        StoreError::Unreachable(_) | StoreError::Checksum(_) | StoreError::Other(_) => Errno::EIO,
    };
    tracing::warn!(op, error = %e, errno = errno.0, "store request failed");
    errno
}

#[derive(Clone, Debug)]
pub struct FsConfig {
    /// Key prefix the mount shows, empty or ending in `/`.
    pub prefix: String,
    pub read_only: bool,
    pub defaults: AttrDefaults,
    /// How long listings, attributes and negative lookups are trusted.
    pub metadata_ttl: Duration,
    pub prefetch: PrefetchConfig,
    /// Memory and (optional) disk block cache.
    pub cache: CacheConfig,
    pub upload: UploadConfig,
    pub max_memory: u64,
    /// Where modified files keep their changed bytes until they are uploaded (mode 0700).
    pub staging_dir: std::path::PathBuf,
    /// `--write-back`: close returns once the bytes are local; the upload runs in the
    /// background (see [`write::WriteBack`]); fsync and the end of the mount wait for it.
    pub write_back: bool,
    /// HEAD every listed file so listings show stored metadata (one request per entry).
    pub list_metadata: bool,
    /// Extended attributes are served (`--xattr`); otherwise the kernel is told they are not
    /// implemented and stops asking.
    pub xattrs: bool,
    /// New objects get a Content-Type from their name's extension.
    pub infer_content_type: bool,
    /// Listed files whose stored metadata is not known are confirmed with a HEAD (once per
    /// object version) before the kernel keeps their attributes; off: listings alone answer
    /// (`--listing-only-metadata`).
    pub confirm_listed: bool,
    /// Send If-Match / If-None-Match so a concurrent change is detected, not overwritten.
    pub conditional_writes: bool,
    /// Longest a lookup, getattr, listing, open for reading or read may take before it fails
    /// with ETIMEDOUT (uploads are bounded by their retries instead: cancelling one half way
    /// would leave less than the application wrote).
    pub op_timeout: Duration,
}

impl FsConfig {
    pub fn new(prefix: &str) -> Self {
        FsConfig {
            prefix: prefix.to_string(),
            read_only: false,
            defaults: AttrDefaults {
                // SAFETY: getuid/getgid have no preconditions and cannot fail.
                uid: unsafe { libc::getuid() },
                // SAFETY: getgid has no preconditions and cannot fail.
                gid: unsafe { libc::getgid() },
                file_mode: 0o644,
                dir_mode: 0o755,
                mount_time: SystemTime::now(),
            },
            metadata_ttl: Duration::from_secs(5),
            prefetch: PrefetchConfig::default(),
            cache: CacheConfig {
                memory_bytes: 64 << 20,
                disk: None,
            },
            upload: UploadConfig::default(),
            max_memory: 512 << 20,
            list_metadata: false,
            xattrs: false,
            infer_content_type: true,
            confirm_listed: true,
            conditional_writes: true,
            write_back: false,
            op_timeout: Duration::from_secs(60),
            staging_dir: std::env::temp_dir()
                // SAFETY: getuid has no preconditions and cannot fail.
                .join(format!("s3mount-staging-{}", unsafe { libc::getuid() })),
        }
    }
}

/// One entry handed to readdir.
#[derive(Clone, Debug)]
pub struct DirItem {
    /// Offset of the entry after this one (what the kernel passes back to continue).
    pub next_offset: i64,
    pub name: String,
    pub kind: Kind,
    /// The listing entry (None for `.` and `..`).
    pub entry: Option<DirEntry>,
    /// Inode to report: known ino, or a stable stand-in for entries never looked up.
    pub ino: u64,
    /// When the directory was opened: the entry shows the bucket as it was then, or later.
    listed_at: Instant,
}

#[derive(Clone, Copy, Debug)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// An open directory: its entries in the order readdir hands them out. While its listing is
/// still being fetched, an entry is added as soon as no later page can change it, so a large
/// directory is handed to the kernel while the rest of it is still arriving.
struct DirHandle {
    ino: u64,
    parent: u64,
    items: Arc<Mutex<Vec<(String, DirEntry)>>>,
    progress: tokio::sync::watch::Receiver<DirProgress>,
    /// When it was opened (what its entries are at least as new as).
    listed_at: Instant,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct DirProgress {
    /// Pages of the listing received.
    pages: usize,
    /// Entries in `items`.
    ready: usize,
    /// Set once no more entries will come: Ok when the listing is complete.
    end: Option<Result<(), Errno>>,
}

impl DirHandle {
    /// A directory whose entries are all known.
    fn complete(ino: u64, parent: u64, items: Vec<(String, DirEntry)>, listed_at: Instant) -> Self {
        let (_tx, progress) = tokio::sync::watch::channel(DirProgress {
            pages: 1,
            ready: items.len(),
            end: Some(Ok(())),
        });
        DirHandle {
            ino,
            parent,
            items: Arc::new(Mutex::new(items)),
            progress,
            listed_at,
        }
    }
}

enum FileHandle {
    Read(ReadHandle),
    /// A write descriptor: the inode's open-file state, shared with its other descriptors.
    Write(Arc<open_file::OpenFile>),
}

/// A read-only descriptor. While the inode has an open-file state (a writer, or an orphan),
/// reads go through that; otherwise through `reader`, pinned to one version of the object. A
/// newer version committed by this mount replaces the reader at the next read, so `tail -f`
/// beside an appending writer reads the new bytes instead of a short read at the old end.
struct ReadHandle {
    ino: u64,
    /// None until the first read that finds no open-file state (opened through one: the
    /// object it would read may not exist yet, or be replaced by the writer's commit).
    reader: Mutex<Option<Arc<ObjectReader>>>,
}

/// A file created or being rewritten by this mount and not yet committed to the bucket.
#[derive(Clone, Debug)]
struct Pending {
    ino: u64,
    /// Set by unlink while the file is still open: the upload is then dropped.
    unlinked: Arc<std::sync::atomic::AtomicBool>,
}

pub struct Fs {
    store: Arc<dyn ObjectStore>,
    cfg: FsConfig,
    inodes: Mutex<InodeTable>,
    listings: Arc<Mutex<ListingCache>>,
    /// Listings being fetched, so concurrent and prefetched requests for one prefix share a LIST.
    inflight: Arc<Mutex<HashMap<String, SharedListing>>>,
    listing_changes: Arc<ListingChanges>,
    /// Directories whose subtree was listed ahead, and when.
    walked: Mutex<LruCache<String, Instant>>,
    /// Subdirectories listed ahead below a directory under a storm of lookups (rsync's
    /// generator, `find -exec stat`): the first lookup in each confirms its names ahead, as the
    /// storm's own lookup does, since the storm moves on into them.
    storm_below: Mutex<LruCache<String, Instant>>,
    negative: Mutex<LruCache<String, Instant>>,
    /// Lookups that had to probe, per directory: (start of the window, count). A storm of them
    /// in a directory with no listing (`stat` of many files after a remount) lists it instead.
    probes: Mutex<LruCache<String, (Instant, u32)>>,
    /// Stored metadata (mode, owner, times, kind) known per object version, so a listing, which
    /// carries none, does not make a symlink a file again or times the upload times.
    known: Arc<known::KnownVersions>,
    files: Mutex<HashMap<u64, Arc<FileHandle>>>,
    dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    /// `--supervise`: where inodes and handles are journaled (see [`restart`]).
    journal: std::sync::OnceLock<Arc<journal::Journal>>,
    /// Handles the kernel holds from a worker that died, not taken over yet.
    adopted: Mutex<std::collections::BTreeMap<u64, (u64, journal::Opened)>>,
    /// The object versions their read handles read (ETag, size).
    adopted_pins: Mutex<HashMap<u64, (String, u64)>>,
    /// Where the dead worker kept the bytes of the files it had open for writing, by inode.
    adopted_writes: Mutex<std::collections::BTreeMap<u64, journal::OpenWrite>>,
    /// The dead worker's open handles by the request that opened them, and the requests it
    /// carried out: what a resent request finds done ([`restart`]).
    adopted_requests: Mutex<HashMap<u64, (u64, u64)>>,
    /// Directories restored from the journal whose attributes are still the defaults: the
    /// first getattr reads their marker.
    restored_dirs: Mutex<std::collections::HashSet<u64>>,
    /// The pids of the workers that journaled before this one (their local files are theirs).
    dead_workers: Mutex<std::collections::BTreeSet<u32>>,
    requests_done: Mutex<std::collections::BTreeSet<u64>>,
    budget: Arc<Budget>,
    cache: Arc<BlockCache>,
    caps: Arc<Capabilities>,
    /// Files written through this mount and not committed yet, by key.
    pending: Mutex<HashMap<String, Pending>>,
    /// The open-file state of each inode open for writing (see [`open_file`]).
    open_files: open_file::OpenFiles,
    warn: Arc<WarnOnce>,
    /// Commits that failed since the mount (for `s3mount status`).
    failures: Mutex<Vec<status::FailedCommit>>,
    /// Uploads left to run after close (`--write-back`).
    write_back: write::WriteBack,
    /// This filesystem, for the background uploads it starts (set by [`Fs::attach`]).
    me: std::sync::OnceLock<std::sync::Weak<Fs>>,
}

type ListingCache = LruCache<String, (Instant, Arc<Listing>)>;

/// `a/b/` -> `a/`, `a/` -> `` (the bucket root); `` has no parent.
fn parent_prefix(prefix: &str) -> Option<&str> {
    let trimmed = prefix.strip_suffix('/')?;
    Some(trimmed.rfind('/').map_or("", |i| &trimmed[..=i]))
}
type SharedListing = Shared<BoxFuture<'static, FsResult<Arc<Listing>>>>;

/// Where a listing fetch stands after a page: more pages follow, all after this key; done;
/// or failed.
enum PageEnd<'a> {
    More(&'a str),
    Done,
    Failed(Errno),
}
type OnPage = Box<dyn FnMut(&Listing, PageEnd<'_>) + Send>;

/// The largest key or common prefix of a page: every later page's keys sort after it.
fn page_last_key(page: &ListPage) -> Option<String> {
    let obj = page.objects.last().map(|o| o.key.as_str());
    let cp = page.common_prefixes.last().map(String::as_str);
    obj.max(cp).map(str::to_string)
}

/// No key after `last` can change entry `name` of the listing of `prefix`: the keys that
/// could (`name`, `name/`, `name_$folder$`) all sort at or before `last`.
fn entry_settled(prefix: &str, name: &str, last: &str) -> bool {
    let longest = prefix
        .bytes()
        .chain(name.bytes())
        .chain(LEGACY_FOLDER_SUFFIX.bytes());
    longest.cmp(last.bytes()) != std::cmp::Ordering::Greater
}

/// How long a lookup waits for a listing of its directory under way before probing its name.
const JOIN_LISTING_WAIT: Duration = Duration::from_secs(1);
/// A stale listing up to this long is fetched again by the first lookup after the TTL (one
/// LIST a thousand names, shared by the lookups behind it); a larger directory is probed name
/// by name instead, so a `stat` of one file never lists a huge directory.
const RELIST_MAX_ENTRIES: usize = 5_000;
/// Lookups that probe one directory within [`PROBE_WINDOW`] before it is listed instead: a
/// few names are cheaper probed, many cheaper listed (a LIST answers a thousand).
const PROBE_STORM: u32 = 8;
const PROBE_WINDOW: Duration = Duration::from_secs(2);

/// Subdirectories whose listings are fetched ahead when their parent is listed (for `find`,
/// `du`, `ls -R`, `cp -r`), and how many such LISTs run at once.
const PREFETCH_SUBDIRS: usize = 128;
const PREFETCH_PARALLEL: usize = 8;
/// Pages (of up to 1,000 keys) the delimiter-less walks below a listed directory may read in
/// all, and how many walks (over key ranges split at subdirectories) run at once.
const FLAT_PAGES: usize = 16;
const PARALLEL_WALKS: usize = 4;
/// How long a listing of a subdirectory a walk is about to reach waits for it before listing
/// the subdirectory itself.
const WALK_WAIT: Duration = Duration::from_secs(1);

/// Subdirectories a walk will list on its way, each with the listing future others join
/// meanwhile (so `find`, running ahead of the walk, waits for it instead of listing the same
/// keys again) and the sender that completes it.
type Promises = HashMap<String, (SharedListing, tokio::sync::oneshot::Sender<Arc<Listing>>)>;

/// The changes this mount made to directories, so that a listing fetched across a change of
/// its directory (which it may miss) is returned but not cached. Per directory: rsync or tar
/// filling one directory must not keep every other directory's listings from being cached.
#[derive(Debug)]
struct ListingChanges {
    /// Counts every change; a fetch notes it when it starts.
    count: AtomicU64,
    /// The count at the last change of each recently changed directory, and the highest count
    /// the map has forgotten (a directory not in it may have changed as late as that).
    dirs: Mutex<(LruCache<String, u64>, u64)>,
    /// The count at the last change that may concern any directory (a directory renamed).
    everywhere: AtomicU64,
}

impl Default for ListingChanges {
    fn default() -> Self {
        ListingChanges {
            count: AtomicU64::new(0),
            dirs: Mutex::new((LruCache::new(nz(4096)), 0)),
            everywhere: AtomicU64::new(0),
        }
    }
}

impl ListingChanges {
    fn now(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// Record a change of `dir` (None: of any directory).
    fn changed(&self, dir: Option<&str>) {
        let n = self.count.fetch_add(1, Ordering::AcqRel) + 1;
        match dir {
            Some(dir) => {
                let mut dirs = self.dirs.lock();
                if let Some((old, at)) = dirs.0.push(dir.to_string(), n) {
                    if old != dir {
                        dirs.1 = dirs.1.max(at);
                    }
                }
            }
            None => self.everywhere.store(n, Ordering::Release),
        }
    }

    /// Did this mount change `dir` after the count was `since`?
    fn changed_since(&self, dir: &str, since: u64) -> bool {
        if self.everywhere.load(Ordering::Acquire) > since {
            return true;
        }
        let dirs = self.dirs.lock();
        dirs.0.peek(dir).copied().unwrap_or(dirs.1) > since
    }
}

/// What fetching a listing needs, detached from `Fs` so it can run in a task of its own.
#[derive(Clone)]
struct ListingFetch {
    store: Arc<dyn ObjectStore>,
    warn: Arc<WarnOnce>,
    listings: Arc<Mutex<ListingCache>>,
    inflight: Arc<Mutex<HashMap<String, SharedListing>>>,
    /// Changes this mount made to directories: a listing fetched across a change of its
    /// directory may miss it, so it is returned but not cached.
    changes: Arc<ListingChanges>,
    ttl: Duration,
}

impl ListingFetch {
    /// The listing of `prefix`: joins a fetch already under way when `join`, else starts one.
    fn shared(&self, prefix: &str, join: bool) -> SharedListing {
        let mut inflight = self.inflight.lock();
        if join {
            if let Some(f) = inflight.get(prefix) {
                return f.clone();
            }
        }
        self.start(&mut inflight, prefix, None)
    }

    /// Start fetching the listing of `prefix` (shared with later callers until it is done);
    /// `on_page` sees the listing so far after each page.
    fn start(
        &self,
        inflight: &mut HashMap<String, SharedListing>,
        prefix: &str,
        on_page: Option<OnPage>,
    ) -> SharedListing {
        let me = self.clone();
        let key = prefix.to_string();
        let fut = async move {
            let result = me.fetch(&key, on_page).await;
            me.inflight.lock().remove(&key);
            result
        }
        .boxed()
        .shared();
        inflight.insert(prefix.to_string(), fut.clone());
        fut
    }

    async fn fetch(&self, prefix: &str, mut on_page: Option<OnPage>) -> FsResult<Arc<Listing>> {
        let generation = self.changes.now();
        let mut listing = Listing::default();
        let mut token = None;
        loop {
            let page = match self.store.list_page(prefix, Some("/"), token, None).await {
                Ok(page) => page,
                Err(e) => {
                    let e = errno_of(&e, "list");
                    if let Some(f) = on_page.as_mut() {
                        f(&listing, PageEnd::Failed(e));
                    }
                    return Err(e);
                }
            };
            token = page.next_token.clone();
            let last = page_last_key(&page);
            listing.add_page(prefix, page, &self.warn);
            if let Some(f) = on_page.as_mut() {
                match (&token, &last) {
                    (None, _) => f(&listing, PageEnd::Done),
                    (Some(_), Some(last)) => f(&listing, PageEnd::More(last)),
                    (Some(_), None) => {}
                }
            }
            if token.is_none() {
                break;
            }
        }
        let listing = Arc::new(listing);
        self.keep(prefix.to_string(), listing.clone(), generation);
        Ok(listing)
    }

    /// Register a listing of `prefix` that a walk will deliver: joiners wait for it (at most
    /// [`WALK_WAIT`], and if the walk ends without it they list `prefix` themselves). Nothing
    /// is registered when the listing is cached or being fetched already.
    fn promise(&self, prefix: &str, promises: &mut Promises) {
        if self.cached(prefix) {
            return;
        }
        let mut inflight = self.inflight.lock();
        if inflight.contains_key(prefix) {
            return;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let me = self.clone();
        let key = prefix.to_string();
        let fut = async move {
            match tokio::time::timeout(WALK_WAIT, rx).await {
                Ok(Ok(listing)) => Ok(listing),
                _ => me.fetch(&key, None).await,
            }
        }
        .boxed()
        .shared();
        inflight.insert(prefix.to_string(), fut.clone());
        promises.insert(prefix.to_string(), (fut, tx));
    }

    /// Hand a walked listing to whoever waits for it, and stop offering the promise (later
    /// callers find the listing cached). Without a listing: the walk gave up, joiners list it
    /// themselves.
    fn fulfil(&self, prefix: &str, promises: &mut Promises, listing: Option<Arc<Listing>>) {
        let Some((fut, tx)) = promises.remove(prefix) else {
            return;
        };
        {
            let mut inflight = self.inflight.lock();
            if inflight.get(prefix).is_some_and(|f| f.ptr_eq(&fut)) {
                inflight.remove(prefix);
            }
        }
        if let Some(listing) = listing {
            let _ = tx.send(listing);
        }
    }

    fn cached(&self, prefix: &str) -> bool {
        self.listings
            .lock()
            .peek(prefix)
            .is_some_and(|(at, _)| at.elapsed() < self.ttl)
    }

    /// After a directory was listed, list what is below it in the background so that `find`,
    /// `du` and `ls -R` find their listings cached: first the whole subtree without a
    /// delimiter, split at subdirectories into [`PARALLEL_WALKS`] key ranges walked at once (at
    /// most [`FLAT_PAGES`] pages in all; every directory a walk covers completely is cached),
    /// then, one listing each, the subdirectories those walks did not finish.
    fn prefetch_subdirs(&self, prefix: &str, listing: &Listing) {
        let mut subdirs: Vec<String> = listing
            .entries
            .iter()
            .filter(|(_, e)| e.kind == Kind::Dir)
            .map(|(name, _)| format!("{prefix}{name}/"))
            .collect();
        if subdirs.is_empty() || self.ttl.is_zero() {
            return;
        }
        // Key order (bytes), which is what the walks' ranges are in.
        subdirs.sort_unstable();
        let me = self.clone();
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            let walks = PARALLEL_WALKS.min(subdirs.len());
            // Walk `i` covers subdirs[split(i)..split(i + 1)], from the first of them (the start
            // for the first walk) to the first of the next walk's (the end for the last).
            let split = |i: usize| i * subdirs.len() / walks;
            let bound = |i: usize| (i > 0 && i < walks).then(|| subdirs[split(i)].as_str());
            let pages = FLAT_PAGES.div_ceil(walks);
            futures::future::join_all((0..walks).map(|i| {
                let mut promises = Promises::new();
                for sub in &subdirs[split(i)..split(i + 1)] {
                    me.promise(sub, &mut promises);
                }
                me.walk_flat(&prefix, bound(i), bound(i + 1), pages, promises)
            }))
            .await;
            if subdirs.len() > PREFETCH_SUBDIRS {
                return;
            }
            use futures::StreamExt;
            futures::stream::iter(subdirs)
                .for_each_concurrent(PREFETCH_PARALLEL, |sub| {
                    let me = me.clone();
                    async move {
                        if !me.cached(&sub) {
                            let _ = me.shared(&sub, true).await;
                        }
                    }
                })
                .await;
        });
    }

    /// List the keys below `root` from `from` (a subdirectory's prefix; the start when `None`)
    /// up to `to` (excluded; the end when `None`) in key order, reading at most `pages` pages,
    /// and cache the listing of each directory as soon as the walk has passed it (keys under
    /// one prefix are contiguous in that order, so no directory below `root` straddles a
    /// bound that is itself a directory below `root`).
    /// Directories in `promises` are handed to those waiting for them as the walk completes
    /// them; the rest are released when it ends.
    async fn walk_flat(
        &self,
        root: &str,
        from: Option<&str>,
        to: Option<&str>,
        pages: usize,
        mut promises: Promises,
    ) {
        self.walk_range(root, from, to, pages, &mut promises).await;
        let left: Vec<String> = promises.keys().cloned().collect();
        for dir in left {
            self.fulfil(&dir, &mut promises, None);
        }
    }

    async fn walk_range(
        &self,
        root: &str,
        from: Option<&str>,
        to: Option<&str>,
        pages: usize,
        promises: &mut Promises,
    ) {
        let generation = self.changes.now();
        // The directories containing the current key, outermost first, with what they hold so far.
        let mut open: Vec<(String, Listing)> = Vec::new();
        let mut token = None;
        for n in 0..pages {
            let page = match (n, from) {
                // Keys between `a/b` and `a/b/` (`a/b-c`) sort before the bound and are skipped.
                (0, Some(from)) => {
                    let after = from.strip_suffix('/').unwrap_or(from);
                    self.store.list_page_after(root, after).await
                }
                _ => self.store.list_page(root, None, token.take(), None).await,
            };
            let Ok(page) = page else {
                return;
            };
            for obj in page.objects {
                if from.is_some_and(|f| obj.key.as_str() < f) {
                    continue;
                }
                let Some(rest) = obj.key.strip_prefix(root) else {
                    continue;
                };
                if to.is_some_and(|t| obj.key.as_str() >= t) {
                    // Every directory still open ends before the bound: complete.
                    for (d, l) in open.drain(..) {
                        self.walked(d, l, generation, promises);
                    }
                    return;
                }
                while open
                    .last()
                    .is_some_and(|(d, _)| !obj.key.starts_with(d.as_str()))
                {
                    let (d, l) = open.pop().expect("checked");
                    self.walked(d, l, generation, promises);
                }
                for (i, _) in rest.match_indices('/') {
                    let dir = &obj.key[..root.len() + i + 1];
                    if !open.iter().any(|(d, _)| d == dir) {
                        open.push((dir.to_string(), Listing::default()));
                    }
                }
                for (dir, listing) in open.iter_mut() {
                    let below = &obj.key[dir.len()..];
                    let page = match below.find('/') {
                        Some(i) => ListPage {
                            common_prefixes: vec![obj.key[..dir.len() + i + 1].to_string()],
                            ..ListPage::default()
                        },
                        None => ListPage {
                            objects: vec![obj.clone()],
                            ..ListPage::default()
                        },
                    };
                    listing.add_page(dir, page, &self.warn);
                }
            }
            token = page.next_token;
            if token.is_none() {
                for (d, l) in open.drain(..) {
                    self.walked(d, l, generation, promises);
                }
                return;
            }
        }
        // Out of pages: the directories still open are incomplete and are not kept.
    }

    /// A directory the walk has passed completely: cache it, and hand it to its waiters. If
    /// this mount changed a directory since the walk began, its pages may predate the change:
    /// waiters then list the directory themselves, as they asked after the change.
    fn walked(&self, dir: String, listing: Listing, generation: u64, promises: &mut Promises) {
        let listing = Arc::new(listing);
        self.keep(dir.clone(), listing.clone(), generation);
        let current = !self.changes.changed_since(&dir, generation);
        self.fulfil(&dir, promises, current.then_some(listing));
    }

    /// Cache a listing fetched since `generation`, unless this mount changed the directory
    /// since. A directory this mount made, listed again with no names but those it knows, is
    /// still known to hold only what this mount put there (see [`Listing::made_here`]).
    fn keep(&self, dir: String, listing: Arc<Listing>, generation: u64) {
        if self.ttl.is_zero() || self.changes.changed_since(&dir, generation) {
            return;
        }
        let mut listings = self.listings.lock();
        let listing = match listings.peek(&dir) {
            Some((_, old))
                if old.made_here
                    && !listing.made_here
                    && old.entries.keys().eq(listing.entries.keys()) =>
            {
                let mut l = (*listing).clone();
                l.made_here = true;
                Arc::new(l)
            }
            _ => listing,
        };
        listings.put(dir, (Instant::now(), listing));
    }
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("store", &self.store)
            .field("prefix", &self.cfg.prefix)
            .finish()
    }
}

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN)
}

impl Fs {
    /// A filesystem whose cache needs no disk (tests); see [`Fs::try_new`].
    pub fn new(store: Arc<dyn ObjectStore>, cfg: FsConfig) -> Self {
        Self::try_new(store, cfg).expect("cannot open the block cache")
    }

    /// Fails only when the disk cache cannot be opened (directory not writable, or in use).
    pub fn try_new(store: Arc<dyn ObjectStore>, cfg: FsConfig) -> std::io::Result<Self> {
        let root_attr = attrs::attr_from_meta(ROOT_INO, Kind::Dir, None, &cfg.defaults);
        let root = Inode {
            ino: ROOT_INO,
            parent: ROOT_INO,
            name: String::new(),
            kind: Kind::Dir,
            key: cfg.prefix.clone(),
            attr: root_attr,
            meta: None,
            fetched: Instant::now(),
            lookups: 1,
            page_cache_etag: None,
            written_etag: None,
            unlinked: false,
        };
        let budget = Budget::new(cfg.max_memory);
        let cache = BlockCache::new(&cfg.cache, budget.clone())?;
        let caps = Arc::new(Capabilities::default());
        if !cfg.conditional_writes {
            caps.disable_conditional();
        }
        Ok(Fs {
            known: known::KnownVersions::new(store.clone(), cache.known_versions_path().as_deref()),
            store,
            inodes: Mutex::new(InodeTable::new(root)),
            listings: Arc::new(Mutex::new(LruCache::new(nz(1024)))),
            inflight: Arc::default(),
            listing_changes: Arc::default(),
            walked: Mutex::new(LruCache::new(nz(1024))),
            storm_below: Mutex::new(LruCache::new(nz(1024))),
            negative: Mutex::new(LruCache::new(nz(16_384))),
            probes: Mutex::new(LruCache::new(nz(1024))),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            journal: std::sync::OnceLock::new(),
            adopted: Mutex::default(),
            adopted_pins: Mutex::default(),
            adopted_writes: Mutex::default(),
            adopted_requests: Mutex::default(),
            restored_dirs: Mutex::default(),
            dead_workers: Mutex::default(),
            requests_done: Mutex::default(),
            budget,
            cache,
            caps,
            pending: Mutex::new(HashMap::new()),
            open_files: Default::default(),
            warn: Arc::default(),
            failures: Mutex::default(),
            write_back: write::WriteBack::default(),
            me: std::sync::OnceLock::new(),
            cfg,
        })
    }

    pub fn config(&self) -> &FsConfig {
        &self.cfg
    }

    pub fn ttl(&self) -> Duration {
        self.cfg.metadata_ttl
    }

    /// Inodes currently known (for tests and diagnostics).
    pub fn inode_count(&self) -> usize {
        self.inodes.lock().len()
    }

    fn fresh(&self, at: Instant) -> bool {
        at.elapsed() < self.cfg.metadata_ttl
    }

    fn inode(&self, ino: u64) -> FsResult<Inode> {
        self.inodes.lock().get(ino).cloned().ok_or(Errno::ENOENT)
    }

    fn dir_inode(&self, ino: u64) -> FsResult<Inode> {
        let i = self.inode(ino)?;
        if i.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        Ok(i)
    }

    /// The whole listing of a directory prefix, from the cache while it is fresh.
    async fn listing(&self, prefix: &str, allow_cached: bool) -> FsResult<Arc<Listing>> {
        if allow_cached {
            if let Some((at, l)) = self.listings.lock().get(prefix) {
                if self.fresh(*at) {
                    return Ok(l.clone());
                }
            }
        }
        let fetch = self.listing_fetch();
        if !self.cfg.list_metadata {
            let listing = fetch.shared(prefix, allow_cached).await?;
            self.walk_parent_ahead(prefix);
            return Ok(listing);
        }
        let mut listing = (*fetch.shared(prefix, false).await?).clone();
        self.fetch_listed_metadata(&mut listing).await;
        let listing = Arc::new(listing);
        if !self.cfg.metadata_ttl.is_zero() {
            self.listings
                .lock()
                .put(prefix.to_string(), (Instant::now(), listing.clone()));
        }
        Ok(listing)
    }

    /// A subdirectory of a directory listed moments ago is being listed: someone is descending
    /// the tree (`find`, `du`, `cp -r`, `ls -R`), so list the rest of it ahead, once per TTL.
    /// A plain `ls` of a directory never starts this, so it costs no extra requests.
    fn walk_parent_ahead(&self, prefix: &str) {
        let Some(parent) = parent_prefix(prefix) else {
            return;
        };
        if parent.len() < self.cfg.prefix.len() {
            return;
        }
        let parent_listing = match self.listings.lock().peek(parent) {
            Some((at, l)) if self.fresh(*at) => l.clone(),
            _ => return,
        };
        self.walk_below(parent, &parent_listing);
    }

    /// List the subdirectories of `dir` ahead (see [`ListingFetch::prefetch_subdirs`]), once
    /// per TTL; true when this call started it.
    fn walk_below(&self, dir: &str, listing: &Listing) -> bool {
        {
            let mut walked = self.walked.lock();
            if walked.get(dir).is_some_and(|at| self.fresh(*at)) {
                return false;
            }
            walked.put(dir.to_string(), Instant::now());
        }
        self.listing_fetch().prefetch_subdirs(dir, listing);
        true
    }

    /// A storm of lookups made this lookup list `dir`: the storm is walking a tree (rsync's
    /// generator stats every destination name, directory after directory), so list the
    /// subdirectories ahead too, and let the first lookup in each confirm its names ahead.
    fn storm_walks_below(&self, dir: &str, listing: &Listing) {
        if !self.walk_below(dir, listing) {
            return;
        }
        let now = Instant::now();
        let mut below = self.storm_below.lock();
        for (name, e) in listing.entries.iter().take(PREFETCH_SUBDIRS) {
            if e.kind == Kind::Dir {
                below.put(format!("{dir}{name}/"), now);
            }
        }
    }

    /// Is this the first lookup in `dir` since a storm above it listed it ahead?
    fn first_after_storm_above(&self, dir: &str) -> bool {
        self.storm_below
            .lock()
            .pop(dir)
            .is_some_and(|at| self.fresh(at))
    }

    fn listing_fetch(&self) -> ListingFetch {
        ListingFetch {
            store: self.store.clone(),
            warn: self.warn.clone(),
            listings: self.listings.clone(),
            inflight: self.inflight.clone(),
            changes: self.listing_changes.clone(),
            ttl: self.cfg.metadata_ttl,
        }
    }

    /// This mount changed the directory `dir` (None: directories anywhere): listings of it
    /// under way may not show that.
    pub(super) fn listings_changed(&self, dir: Option<&str>) {
        self.listing_changes.changed(dir);
        let mut inflight = self.inflight.lock();
        match dir {
            Some(dir) => {
                inflight.remove(dir);
            }
            None => inflight.clear(),
        }
    }

    /// `--list-metadata`: HEAD every listed file (16 at a time) so that `ls -l` shows stored
    /// s3fs modes, owners, times and symlinks, at one request per entry.
    async fn fetch_listed_metadata(&self, listing: &mut Listing) {
        use futures::StreamExt;
        let keys: Vec<(String, String)> = listing
            .entries
            .iter()
            .filter(|(_, e)| {
                e.kind == Kind::File
                    && e.meta.as_ref().is_some_and(|m| !m.has_metadata)
                    && self.known.known_kind(e).is_none()
            })
            .filter_map(|(n, e)| Some((n.clone(), e.meta.as_ref()?.key.clone())))
            .collect();
        let heads: Vec<(String, Result<ObjectMeta, StoreError>)> = futures::stream::iter(keys)
            .map(|(name, key)| async move { (name, self.store.head(&key).await) })
            .buffer_unordered(16)
            .collect()
            .await;
        for (name, head) in heads {
            match head {
                Ok(meta) => {
                    self.learn(&meta, true);
                    let kind = attrs::kind_from_meta(&meta)
                        .filter(|k| !k.is_dir())
                        .unwrap_or(Kind::File);
                    listing.entries.insert(
                        name,
                        DirEntry {
                            kind,
                            meta: Some(meta),
                        },
                    );
                }
                Err(StoreError::NotFound(_)) => {
                    listing.entries.remove(&name);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "HEAD for listed metadata failed; showing defaults")
                }
            }
        }
    }

    fn make_attr(&self, kind: Kind, meta: Option<&ObjectMeta>) -> impl Fn(u64) -> Attr + '_ {
        let meta = meta.cloned();
        move |ino| attrs::attr_from_meta(ino, kind, meta.as_ref(), &self.cfg.defaults)
    }

    /// Remember the stored metadata of an object version (from a HEAD when `from_server`,
    /// else from this mount's own write).
    pub(super) fn learn(&self, meta: &ObjectMeta, from_server: bool) {
        self.known.learn(meta, from_server);
    }

    /// Does this listed entry still need a HEAD to show its stored metadata (mode, owner,
    /// times, kind)? Only files whose version is not known; with `--listing-only-metadata`
    /// only empty ones (which may be special files or s3fs's old-style directories).
    fn unconfirmed(&self, entry: &DirEntry) -> bool {
        let Some(m) = entry.meta.as_ref() else {
            return false;
        };
        entry.kind == Kind::File
            && !m.has_metadata
            && (m.size == 0 || (self.cfg.confirm_listed && !self.known.trusts_listings_of(&m.key)))
            && self.known.known_kind(entry).is_none()
    }

    /// Wait for the HEAD confirming a listed entry (joining one started ahead) and return the
    /// entry with what it found; the listing's entry if it failed or was skipped.
    async fn confirmed(&self, entry: DirEntry) -> DirEntry {
        let Some(m) = entry.meta.as_ref() else {
            return entry;
        };
        // Empty objects are always looked at: only their metadata tells a FIFO or an old-style
        // directory from an empty file.
        let always = m.size == 0;
        match self.known.confirm(&m.key, always).await {
            Some(meta) => known::confirmed_entry(meta),
            None => entry,
        }
    }

    /// Before the first readdirplus reply of a directory whose sample is undecided: confirm a
    /// sample of its listed files and wait for it (at most a third of --op-timeout, 1 s), so
    /// that in a bucket of plain objects every entry goes to the kernel trusted, instead of
    /// uncached and looked up again one by one (`ls -l` of 10,000 plain objects: 10,000 more
    /// LOOKUP requests).
    pub async fn sample_before_listing(&self, fh: u64) {
        if !self.cfg.confirm_listed || self.cfg.list_metadata {
            return;
        }
        let Some(handle) = self.dirs.lock().get(&fh).cloned() else {
            return;
        };
        let Some(dir) = self.inodes.lock().get(handle.ino).map(|i| i.key.clone()) else {
            return;
        };
        if self.known.decided_for(&dir) {
            return;
        }
        let wait = JOIN_LISTING_WAIT.min(self.cfg.op_timeout / 3);
        let work = async {
            let mut rx = handle.progress.clone();
            let _ = rx.wait_for(|p| p.pages > 0 || p.end.is_some()).await;
            let sample: Vec<known::SharedHead> = handle
                .items
                .lock()
                .iter()
                .filter(|(_, e)| self.unconfirmed(e))
                .filter_map(|(_, e)| e.meta.as_ref())
                .take(self.known.sample_size())
                .map(|m| self.known.confirm(&m.key, false))
                .collect();
            futures::future::join_all(sample).await;
        };
        let _ = tokio::time::timeout(wait, work).await;
    }

    /// Start confirming a listed entry in the background (readdirplus does, for every entry it
    /// hands out unconfirmed, so the `stat`s that `ls -l`, `rsync` or `find -newer` send next
    /// find it confirmed or on its way).
    fn confirm_ahead(&self, entry: &DirEntry) {
        if let Some(m) = entry.meta.as_ref() {
            drop(self.known.confirm(&m.key, m.size == 0));
        }
    }

    /// A listing's entry with the stored metadata of its version, if known.
    fn enrich(&self, entry: &DirEntry) -> Option<DirEntry> {
        self.known.enrich(entry)
    }

    /// Register `parent/name` as found (counting one kernel lookup) and return its attributes.
    pub fn remember_entry(&self, parent: &Inode, name: &str, entry: &DirEntry) -> Attr {
        let enriched = match entry.kind {
            Kind::Dir => None,
            _ => self.enrich(entry),
        };
        let entry = enriched.as_ref().unwrap_or(entry);
        let (kind, meta) = match &entry.meta {
            Some(m) if m.has_metadata => (
                attrs::kind_from_meta(m)
                    .filter(|k| *k != Kind::Dir || entry.kind == Kind::Dir)
                    .unwrap_or(entry.kind),
                Some(m),
            ),
            m => (entry.kind, m.as_ref()),
        };
        let key = match kind {
            Kind::Dir => format!("{}{name}/", parent.key),
            _ => format!("{}{name}", parent.key),
        };
        let make = self.make_attr(kind, meta);
        self.inodes
            .lock()
            .upsert(parent.ino, name, kind, key, meta.cloned(), make)
    }

    /// Find what `name` is in directory `parent` without listing the whole directory:
    /// HEAD of the key and a one-key listing of `key/` in parallel (a directory wins),
    /// then the legacy `name_$folder$` marker.
    async fn probe(&self, parent_key: &str, name: &str) -> FsResult<Option<DirEntry>> {
        let key = format!("{parent_key}{name}");
        let dir_prefix = format!("{key}/");
        let (head, list) = tokio::join!(
            self.store.head(&key),
            self.store.list_page(&dir_prefix, Some("/"), None, Some(1))
        );
        let list = list.map_err(|e| errno_of(&e, "lookup list"))?;
        if !list.objects.is_empty() || !list.common_prefixes.is_empty() {
            let mut marker = list.objects.into_iter().find(|o| o.key == dir_prefix);
            if marker.is_some() {
                // The listing names the marker but not its metadata (mode, owner, times that
                // mkdir, chmod or s3fs stored): one HEAD, for directories with a marker only.
                match self.store.head(&dir_prefix).await {
                    Ok(m) => marker = Some(m),
                    Err(e) => {
                        tracing::debug!(key = %dir_prefix, error = %e, "HEAD of a directory marker failed; showing defaults")
                    }
                }
            }
            if head.is_ok() {
                self.warn.warn(&key, "key is both a file and a directory prefix; showing the directory, hiding the file");
            }
            return Ok(Some(DirEntry {
                kind: Kind::Dir,
                meta: marker,
            }));
        }
        match head {
            Ok(meta) => {
                self.learn(&meta, true);
                let kind = if attrs::is_directory_content_type(&meta)
                    || attrs::kind_from_meta(&meta) == Some(Kind::Dir)
                {
                    Kind::Dir
                } else {
                    Kind::File
                };
                return Ok(Some(DirEntry {
                    kind,
                    meta: Some(meta),
                }));
            }
            Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(errno_of(&e, "lookup head")),
        }
        match self
            .store
            .head(&format!("{key}{LEGACY_FOLDER_SUFFIX}"))
            .await
        {
            Ok(_) => Ok(Some(DirEntry {
                kind: Kind::Dir,
                meta: None,
            })),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(errno_of(&e, "lookup head")),
        }
    }

    /// Run a read-only operation within `op_timeout`; past it: ETIMEDOUT, logged with the key.
    async fn bounded<T>(
        &self,
        op: &str,
        ino: u64,
        fut: impl std::future::Future<Output = FsResult<T>>,
    ) -> FsResult<T> {
        match tokio::time::timeout(self.cfg.op_timeout, fut).await {
            Ok(r) => r,
            Err(_) => {
                let key = self
                    .inodes
                    .lock()
                    .get(ino)
                    .map(|i| i.key.clone())
                    .unwrap_or_default();
                tracing::error!(op, key = %key, timeout_s = self.cfg.op_timeout.as_secs_f64(), "operation timed out (store unreachable or too slow)");
                Err(Errno::ETIMEDOUT)
            }
        }
    }

    pub async fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        self.bounded("lookup", parent, self.lookup_inner(parent, name))
            .await
    }

    async fn lookup_inner(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        let parent = self.dir_inode(parent)?;
        let name = std::str::from_utf8(name).map_err(|_| Errno::ENOENT)?;
        if name.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        if invalid_name_reason(name).is_some() {
            return Err(Errno::ENOENT);
        }
        if let Some(attr) = self.pending_attr(&format!("{}{name}", parent.key)) {
            if let Some(i) = self.inodes.lock().get_mut(attr.ino) {
                i.lookups += 1;
            }
            return Ok(attr);
        }
        let cached = self
            .listings
            .lock()
            .get(&parent.key)
            .map(|(at, l)| (*at, l.clone()));
        // Set when this lookup started the listing: begun after the lookup, a name it lacks is
        // absent. One it joined, or found cached, may have begun before another client created
        // the name: a name it lacks is probed (unless it is a directory this mount made).
        let mut started = false;
        let stale_len = cached
            .as_ref()
            .filter(|(at, _)| !self.fresh(*at))
            .map(|(_, l)| l.entries.len());
        let cached = match cached {
            Some((at, l)) if self.fresh(at) => Some((at, l)),
            // Being listed right now (`ls -l` stats entries while their pages arrive): the
            // listing answers, instead of a HEAD and a LIST per name.
            _ => {
                // Waited for a while only: a listing that hangs must not hold lookups that
                // a probe of their own would answer.
                let mut under_way = self.inflight.lock().get(&parent.key).cloned();
                let at = Instant::now();
                // Listed before, stale now: list it again, once for all the lookups behind this
                // one (`stat` of every file, `make` checking its sources), instead of a HEAD and
                // a LIST per name. Started now, it is authoritative: a name it lacks is absent.
                if under_way.is_none()
                    && !self.cfg.list_metadata
                    && !self.cfg.metadata_ttl.is_zero()
                    && match stale_len {
                        Some(n) => n <= RELIST_MAX_ENTRIES,
                        None => self.probe_storm(&parent.key),
                    }
                {
                    let fetch = self.listing_fetch().shared(&parent.key, true);
                    // Runs to the end (and fills the cache) even if this lookup stops waiting.
                    tokio::spawn(fetch.clone());
                    under_way = Some(fetch);
                    started = true;
                }
                match under_way {
                    Some(fetch) => match tokio::time::timeout(
                        JOIN_LISTING_WAIT.min(self.cfg.op_timeout / 3),
                        fetch,
                    )
                    .await
                    {
                        Ok(Ok(listing)) => Some((at, listing)),
                        _ => None,
                    },
                    None => None,
                }
            }
        };
        // This lookup started a listing because names of a never-listed directory were being
        // probed one by one.
        let storm = started && stale_len.is_none();
        if let (true, Some((_, listing))) = (storm, &cached) {
            self.storm_walks_below(&parent.key, listing);
        }
        let entry = match cached {
            Some((listed_at, listing))
                if started || listing.made_here || listing.entries.contains_key(name) =>
            {
                let entry = listing.entries.get(name).cloned();
                // What this mount learnt after the listing was taken (a file it wrote) wins.
                if let Some(attr) = entry
                    .as_ref()
                    .and_then(|e| self.newer_than(&parent, name, e, listed_at))
                {
                    return Ok(attr);
                }
                match entry {
                    // The listing names no stored mode, owner or times, nor a symlink, FIFO or
                    // s3fs's old-style directory: one HEAD per object version tells (joining
                    // one readdirplus started), remembered after.
                    Some(e) if self.unconfirmed(&e) => {
                        if storm || self.first_after_storm_above(&parent.key) {
                            // Names probed one after the other (`xargs stat`, a build checking
                            // its files): the names behind this one are confirmed too, 16 at a
                            // time, instead of one HEAD per stat. This name goes first.
                            self.confirm_ahead(&e);
                            for other in listing.entries.values().take(RELIST_MAX_ENTRIES) {
                                if other.kind == Kind::File && self.unconfirmed(other) {
                                    self.confirm_ahead(other);
                                }
                            }
                        }
                        Some(self.confirmed(e).await)
                    }
                    e => e,
                }
            }
            _ => {
                let full = format!("{}{name}", parent.key);
                let negative = self
                    .negative
                    .lock()
                    .get(&full)
                    .is_some_and(|at| self.fresh(*at));
                if negative {
                    None
                } else if let Some(head) = self.known.confirming(&full) {
                    // A confirmation of this name is under way (`ls -l` of a large directory
                    // outlasting the listing's TTL): its HEAD answers, no new probe.
                    match head.await {
                        Some(meta) => Some(known::confirmed_entry(meta)),
                        None => self.probe(&parent.key, name).await?,
                    }
                } else {
                    let found = self.probe(&parent.key, name).await?;
                    if found.is_none() && !self.cfg.metadata_ttl.is_zero() {
                        self.negative.lock().put(full, Instant::now());
                    }
                    found
                }
            }
        };
        let entry = entry.ok_or(Errno::ENOENT)?;
        Ok(self.remember_entry(&parent, name, &entry))
    }

    /// Count a lookup in `dir` that would probe; true when enough came within the window that
    /// listing the directory is cheaper than probing the names one by one.
    fn probe_storm(&self, dir: &str) -> bool {
        let mut probes = self.probes.lock();
        let now = Instant::now();
        let entry = probes.get_or_insert_mut(dir.to_string(), || (now, 0));
        if now.duration_since(entry.0) > PROBE_WINDOW {
            *entry = (now, 0);
        }
        entry.1 += 1;
        if entry.1 >= PROBE_STORM {
            probes.pop(dir);
            return true;
        }
        false
    }

    /// Cached attributes of a known inode, without any request.
    pub fn attr_of(&self, ino: u64) -> Option<Attr> {
        self.inodes.lock().get(ino).map(|i| i.attr)
    }

    pub fn forget(&self, ino: u64, n: u64) {
        self.inodes.lock().forget(ino, n);
    }

    /// Fetch fresh metadata for a file inode and store it.
    async fn refresh_file(&self, inode: &Inode) -> FsResult<Inode> {
        let meta = self
            .store
            .head(&inode.key)
            .await
            .map_err(|e| errno_of(&e, "getattr"))?;
        self.learn(&meta, true);
        let kind = attrs::kind_from_meta(&meta)
            .filter(|k| !k.is_dir())
            .unwrap_or(Kind::File);
        let attr = attrs::attr_from_meta(inode.ino, kind, Some(&meta), &self.cfg.defaults);
        let mut table = self.inodes.lock();
        let i = table.get_mut(inode.ino).ok_or(Errno::ENOENT)?;
        i.attr = attr;
        i.kind = kind;
        i.meta = Some(meta);
        i.fetched = Instant::now();
        Ok(i.clone())
    }

    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        self.bounded("getattr", ino, self.getattr_inner(ino)).await
    }

    /// A directory's link count: 2 plus its subdirectories, when a fresh listing of it says
    /// how many (else 2, which tools take as "unknown": no filesystem of this type is trusted
    /// for find's leaf optimisation).
    fn with_dir_links(&self, mut attr: Attr, key: &str) -> Attr {
        if let Some((at, listing)) = self.listings.lock().peek(key) {
            if self.fresh(*at) {
                let subdirs = listing
                    .entries
                    .values()
                    .filter(|e| e.kind == Kind::Dir)
                    .count();
                attr.nlink = 2 + u32::try_from(subdirs).unwrap_or(u32::MAX - 2);
            }
        }
        attr
    }

    async fn getattr_inner(&self, ino: u64) -> FsResult<Attr> {
        let mut inode = self.inode(ino)?;
        if inode.kind == Kind::Dir {
            if self.restored_dirs.lock().remove(&ino) {
                self.refresh_restored_dir(&inode).await;
                inode = self.inode(ino)?;
            }
            return Ok(self.with_dir_links(inode.attr, &inode.key));
        }
        if inode.unlinked
            || self.fresh(inode.fetched)
            || self.pending.lock().contains_key(&inode.key)
            || self.open_files.get(ino).is_some()
        {
            return Ok(inode.attr);
        }
        Ok(self.refresh_file(&inode).await?.attr)
    }

    /// A reader of the version of `inode` its metadata names.
    fn reader_of(&self, inode: &Inode) -> ObjectReader {
        let meta = inode.meta.clone().unwrap_or_default();
        ObjectReader::new(
            self.store.clone(),
            inode.key.clone(),
            meta.etag.clone(),
            meta.size,
            meta.checksum_crc32.clone(),
            self.cfg.prefetch,
            self.budget.clone(),
            self.cache.clone(),
        )
    }

    /// Open a file for reading. Returns the handle and whether the kernel may keep cached pages.
    pub async fn open(&self, ino: u64, flags: i32) -> FsResult<(u64, bool)> {
        let inode = self.inode(ino)?;
        match inode.kind {
            Kind::Dir => return Err(Errno::EISDIR),
            Kind::Special(_) => return Err(Errno::ENXIO),
            _ => {}
        }
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return self.open_for_write(&inode, flags).await;
        }
        // A file being written (or unlinked while open) is read through its open state; the
        // reader made here is used once that state is gone and the file committed.
        let through_writer = self.open_files.get(ino).is_some() || inode.unlinked;
        let reader = if through_writer {
            None
        } else {
            Some(Arc::new(self.fresh_reader(ino).await?))
        };
        let etag = reader.as_ref().and_then(|r| r.etag().map(str::to_string));
        let keep_cache = {
            let mut table = self.inodes.lock();
            let i = table.get_mut(ino).ok_or(Errno::ENOENT)?;
            let keep = etag.is_some() && i.page_cache_etag == etag;
            if etag.is_some() {
                i.page_cache_etag = etag;
            }
            keep
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.journal_opened(fh, ino, journal::Opened::Read);
        if let (Some(j), Some(r)) = (self.journal.get(), reader.as_ref()) {
            if let Some(etag) = r.etag() {
                j.pinned(fh, etag, r.size());
            }
        }
        self.insert_read_handle(fh, ino, reader);
        Ok((fh, keep_cache))
    }

    /// Register read descriptor `fh` of `ino` (its reader made at the first read if `None`).
    fn insert_read_handle(&self, fh: u64, ino: u64, reader: Option<Arc<ObjectReader>>) {
        let handle = ReadHandle {
            ino,
            reader: Mutex::new(reader),
        };
        self.files
            .lock()
            .insert(fh, Arc::new(FileHandle::Read(handle)));
    }

    /// A reader of the object `ino` names now: its metadata from within --metadata-ttl (with an
    /// ETag), else a HEAD.
    async fn fresh_reader(&self, ino: u64) -> FsResult<ObjectReader> {
        let inode = self.inode(ino)?;
        let inode = match &inode.meta {
            Some(m) if m.etag.is_some() && self.fresh(inode.fetched) => inode,
            _ => self.bounded("open", ino, self.refresh_file(&inode)).await?,
        };
        Ok(self.reader_of(&inode))
    }

    /// The reader of a read descriptor, made now if it was opened through an open-file state
    /// that is gone since; moved to the version this mount committed last if the descriptor
    /// still reads an older one.
    async fn current_reader(&self, h: &ReadHandle) -> FsResult<Arc<ObjectReader>> {
        if h.reader.lock().is_none() {
            let made = Arc::new(self.fresh_reader(h.ino).await?);
            h.reader.lock().get_or_insert(made);
        }
        let mut guard = h.reader.lock();
        let Some(reader) = guard.as_mut() else {
            return Err(Errno::EIO);
        };
        let newer = {
            let table = self.inodes.lock();
            table.get(h.ino).and_then(|i| {
                let written = i.written_etag.as_deref()?;
                let current = i.meta.as_ref()?.etag.as_deref()?;
                (written == current && reader.etag() != Some(current)).then(|| i.clone())
            })
        };
        if let Some(inode) = newer {
            *reader = Arc::new(self.reader_of(&inode));
        }
        Ok(reader.clone())
    }

    pub async fn read(&self, fh: u64, offset: i64, size: u32) -> FsResult<Bytes> {
        let handle = self.files.lock().get(&fh).cloned();
        let handle = handle.ok_or_else(|| self.unknown_handle(fh))?;
        let offset = u64::try_from(offset).map_err(|_| Errno::EINVAL)?;
        match &*handle {
            FileHandle::Read(h) => {
                if let Some(file) = self.open_files.get(h.ino) {
                    return self.read_writer(&file, offset, size).await;
                }
                let reader = self.current_reader(h).await?;
                let ino = h.ino;
                let read = async {
                    reader.read(offset, size).await.map_err(|e| {
                        if matches!(e, StoreError::Checksum(_)) {
                            // Pages already handed out may be bad: the next open starts afresh.
                            if let Some(i) = self.inodes.lock().get_mut(ino) {
                                i.page_cache_etag = None;
                            }
                        }
                        errno_of(&e, "read")
                    })
                };
                match tokio::time::timeout(self.cfg.op_timeout, read).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::error!(key = %reader.key(), offset, "read timed out (store unreachable or too slow)");
                        Err(Errno::ETIMEDOUT)
                    }
                }
            }
            FileHandle::Write(file) => self.read_writer(file, offset, size).await,
        }
    }

    pub async fn readlink(&self, ino: u64) -> FsResult<Bytes> {
        let inode = self.inode(ino)?;
        let inode = if inode.kind == Kind::Symlink && inode.meta.is_some() {
            inode
        } else {
            self.refresh_file(&inode).await?
        };
        if inode.kind != Kind::Symlink {
            return Err(Errno::EINVAL);
        }
        let size = inode.meta.as_ref().map(|m| m.size).unwrap_or(0).min(4096);
        self.store
            .get_range(&inode.key, ByteRange::new(0, size), None)
            .await
            .map_err(|e| errno_of(&e, "readlink"))
    }

    pub async fn opendir(&self, ino: u64) -> FsResult<u64> {
        let inode = self.dir_inode(ino)?;
        let opened = Instant::now();
        let handle = match self.stream_listing(&inode, opened) {
            Some(handle) => {
                // The first page decides: a failure (no permission, no bucket) fails opendir.
                let mut rx = handle.progress.clone();
                let first = self
                    .bounded("opendir", ino, async move {
                        rx.wait_for(|p| p.pages > 0 || p.end.is_some())
                            .await
                            .map(|p| *p)
                            .map_err(|_| Errno::EIO)
                    })
                    .await?;
                if let (0, Some(Err(e))) = (first.pages, first.end) {
                    return Err(e);
                }
                handle
            }
            None => {
                let listing = self
                    .bounded("opendir", ino, self.listing(&inode.key, true))
                    .await?;
                let mut entries = listing.entries.clone();
                self.add_pending_entries(ino, &inode.key, &mut entries);
                DirHandle::complete(ino, inode.parent, entries.into_iter().collect(), opened)
            }
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.journal_opened(fh, ino, journal::Opened::Dir);
        self.dirs.lock().insert(fh, Arc::new(handle));
        Ok(fh)
    }

    /// Start fetching the listing of a directory that is neither cached nor being fetched,
    /// handing out its entries page by page (None: the whole listing is at hand or on its way
    /// for someone else, or `--list-metadata` must HEAD the entries first).
    fn stream_listing(&self, inode: &Inode, opened: Instant) -> Option<DirHandle> {
        let prefix = inode.key.clone();
        let cached = self
            .listings
            .lock()
            .get(&prefix)
            .is_some_and(|(at, _)| self.fresh(*at));
        if cached || self.cfg.list_metadata || self.inflight.lock().contains_key(&prefix) {
            return None;
        }
        // Files this mount is writing show as they are here (they override the listing).
        let mut pending = std::collections::BTreeMap::new();
        self.add_pending_entries(inode.ino, &prefix, &mut pending);
        let items = Arc::new(Mutex::new(Vec::new()));
        let (tx, progress) = tokio::sync::watch::channel(DirProgress::default());
        let mut emitted = std::collections::HashSet::new();
        let out = items.clone();
        let dir = prefix.clone();
        let on_page: OnPage = Box::new(move |listing: &Listing, end: PageEnd<'_>| {
            let mut items = out.lock();
            // Entries at or before `last` are final; at the end, all are.
            let last = match end {
                PageEnd::Failed(e) => {
                    tx.send_modify(|p| p.end = Some(Err(e)));
                    return;
                }
                PageEnd::More(last) => Some(last),
                PageEnd::Done => None,
            };
            let done = last.is_none();
            for (name, entry) in &listing.entries {
                let settled = last.is_none_or(|last| entry_settled(&dir, name, last));
                if settled && !emitted.contains(name) {
                    emitted.insert(name.clone());
                    let entry = pending.remove(name).unwrap_or_else(|| entry.clone());
                    items.push((name.clone(), entry));
                }
            }
            if done {
                items.extend(std::mem::take(&mut pending));
            }
            let ready = items.len();
            tx.send_modify(|p| {
                p.pages += 1;
                p.ready = ready;
                if done {
                    p.end = Some(Ok(()));
                }
            });
        });
        let fetch = self.listing_fetch();
        let fut = {
            let mut inflight = self.inflight.lock();
            if inflight.contains_key(&prefix) {
                return None;
            }
            fetch.start(&mut inflight, &prefix, Some(on_page))
        };
        // Fetched to the end (and cached) even if the directory is closed before.
        tokio::spawn(fut);
        self.walk_parent_ahead(&prefix);
        Some(DirHandle {
            ino: inode.ino,
            parent: inode.parent,
            items,
            progress,
            listed_at: opened,
        })
    }

    /// Up to `limit` entries from `offset` on (0 is the start; `.` and `..` come first). The
    /// kernel takes a few dozen per request, so a large directory is handed out in slices,
    /// never copied whole per request. While the listing is still arriving, `wait` waits for
    /// the entries asked for (or for the end of the listing); without it, this returns what is
    /// there now (nothing, if nothing is), so a reply can go out with what has arrived.
    pub async fn readdir(
        &self,
        fh: u64,
        offset: i64,
        limit: usize,
        wait: bool,
    ) -> FsResult<Vec<DirItem>> {
        let handle = self.dirs.lock().get(&fh).cloned().ok_or(Errno::EBADF)?;
        let start = usize::try_from(offset).map_err(|_| Errno::EINVAL)?;
        let want = start.saturating_add(limit).saturating_sub(2);
        let mut rx = handle.progress.clone();
        let progress = if wait {
            self.bounded("readdir", handle.ino, async move {
                rx.wait_for(|p| p.ready >= want || p.end.is_some())
                    .await
                    .map(|p| *p)
                    .map_err(|_| Errno::EIO)
            })
            .await?
        } else {
            *rx.borrow()
        };
        let items = handle.items.lock();
        if start >= items.len() + 2 {
            if let Some(Err(e)) = progress.end {
                return Err(e);
            }
        }
        let end = (items.len() + 2).min(start.saturating_add(limit));
        let table = self.inodes.lock();
        let mut out = Vec::with_capacity(end.saturating_sub(start));
        for idx in start..end {
            let next_offset = idx as i64 + 1;
            let item = match idx {
                0 => DirItem {
                    next_offset,
                    name: ".".into(),
                    kind: Kind::Dir,
                    entry: None,
                    ino: handle.ino,
                    listed_at: handle.listed_at,
                },
                1 => DirItem {
                    next_offset,
                    name: "..".into(),
                    kind: Kind::Dir,
                    entry: None,
                    ino: handle.parent,
                    listed_at: handle.listed_at,
                },
                _ => {
                    let (name, entry) = &items[idx - 2];
                    let ino = table
                        .find(handle.ino, name)
                        .unwrap_or_else(|| stand_in_ino(handle.ino, name));
                    // A symlink or FIFO this mount knows of is one in `ls` and `find -type` too.
                    let kind = match entry.kind {
                        Kind::File => self.known.known_kind(entry).unwrap_or(entry.kind),
                        kind => kind,
                    };
                    DirItem {
                        next_offset,
                        name: name.clone(),
                        kind,
                        entry: Some(entry.clone()),
                        ino,
                        listed_at: handle.listed_at,
                    }
                }
            };
            out.push(item);
        }
        Ok(out)
    }

    /// For readdirplus: count a lookup of a listed entry and return its attributes. What this
    /// mount knows that is newer than the listing wins: a file it is writing, or one it
    /// committed, looked up or changed after the directory was opened.
    ///
    /// Also says whether the attributes are confirmed: an entry whose stored metadata is not
    /// known yet is handed out for the kernel not to keep (its `stat` then comes as a lookup,
    /// which waits for the HEAD started here).
    pub fn lookup_listed(&self, dir_ino: u64, item: &DirItem) -> FsResult<(Attr, bool)> {
        let entry = item.entry.as_ref().ok_or(Errno::EINVAL)?;
        let parent = self.dir_inode(dir_ino)?;
        if let Some(attr) = self.newer_than(&parent, &item.name, entry, item.listed_at) {
            return Ok((attr, true));
        }
        let attr = self.remember_entry(&parent, &item.name, entry);
        let confirmed = !self.unconfirmed(entry) || self.is_known_ino(attr.ino);
        if !confirmed {
            self.confirm_ahead(entry);
        }
        Ok((attr, confirmed))
    }

    /// The inode holds stored metadata (a HEAD, or this mount wrote it).
    fn is_known_ino(&self, ino: u64) -> bool {
        self.inodes
            .lock()
            .get(ino)
            .and_then(|i| i.meta.as_ref())
            .is_some_and(|m| m.has_metadata)
    }

    /// The attributes of the known inode `name` in `parent` (counted as a lookup) if they are
    /// newer than a listing taken at `listed_at`: fetched or committed since, or being written.
    fn newer_than(
        &self,
        parent: &Inode,
        name: &str,
        entry: &DirEntry,
        listed_at: Instant,
    ) -> Option<Attr> {
        // Lock order inodes, then pending: nothing takes them the other way round.
        let mut table = self.inodes.lock();
        let i = table
            .find(parent.ino, name)
            .and_then(|ino| table.get_mut(ino))
            .filter(|i| i.kind == entry.kind)
            .filter(|i| {
                let knows_more = i.meta.as_ref().is_some_and(|m| m.has_metadata);
                (i.fetched > listed_at && knows_more) || self.pending.lock().contains_key(&i.key)
            })?;
        i.lookups += 1;
        Some(i.attr)
    }

    pub fn releasedir(&self, fh: u64) {
        if self.dirs.lock().remove(&fh).is_some() {
            self.journal_closed(fh);
        } else {
            self.release_adopted(fh);
        }
    }

    pub fn statfs(&self) -> StatFs {
        // Buckets have no capacity; report a large, stable size so df and space checks pass.
        const BSIZE: u32 = 4096;
        let blocks = (1u64 << 50) / BSIZE as u64;
        StatFs {
            blocks,
            bfree: blocks,
            bavail: blocks,
            files: 1 << 32,
            ffree: 1 << 32,
            bsize: BSIZE,
            namelen: 255,
            frsize: BSIZE,
        }
    }
}

/// A stable inode number for an entry readdir shows but nobody has looked up yet.
fn stand_in_ino(parent: u64, name: &str) -> u64 {
    let mut h = crc32fast::Hasher::new();
    h.update(&parent.to_le_bytes());
    h.update(name.as_bytes());
    (1u64 << 40) | h.finalize() as u64
}

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;
