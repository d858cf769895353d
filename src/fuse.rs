//! The only user of fuser: turns kernel requests into `Fs` calls. A request is started in the
//! request loop and answered there when the answer is in memory; one that has to wait (for the
//! store, a lock, memory) continues as an async task, so the loop never waits on the network.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    consts, FileAttr, FileType, Filesystem, KernelConfig, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    Request, TimeOrNow,
};
use tokio::runtime::Handle;

use crate::fs::{Attr, Caller, Errno, Fs, Kind, SetAttr};

/// Directory entries taken from the filesystem at a time while filling one readdir reply.
const DIR_SLICE: usize = 64;

/// Hand directory entries from `offset` on to `add`, a slice at a time, until it reports the
/// reply full (`Ok(true)`), the directory ends, or (once the reply holds something) no more
/// entries have arrived yet: a directory whose listing is still coming goes to the kernel in
/// the pieces that have come, and a listing that fails half way gives what came before the
/// error, which the next request then gets.
async fn fill_dir(
    fs: &Fs,
    fh: u64,
    mut offset: i64,
    mut add: impl FnMut(crate::fs::DirItem) -> Result<bool, i32>,
) -> Result<(), i32> {
    let mut first = true;
    loop {
        let items = match fs.readdir(fh, offset, DIR_SLICE, first).await {
            Ok(items) => items,
            Err(_) if !first => return Ok(()),
            Err(e) => return Err(e.0),
        };
        first = false;
        let Some(last) = items.last().map(|i| i.next_offset) else {
            return Ok(());
        };
        for item in items {
            if add(item)? {
                return Ok(());
            }
        }
        offset = last;
    }
}

/// Answer a request with an error, counted by errno for the metrics.
macro_rules! fail {
    ($t:expr, $reply:expr, $errno:expr) => {{
        let errno = $errno;
        $t.fail(errno);
        $reply.error(errno)
    }};
}

/// FUSE_UNIQUE_RESEND (Linux 6.9): the kernel sets it on a request it sends again to a new
/// worker because the dead one read it and did not answer.
const RESENT: u64 = 1 << 63;

/// The kernel's id of `req` (without the resend bit), and whether it is a resend. A request
/// that changes names or attributes is journaled as carried out just before its answer
/// ([`Fs::request_done`]); resent, it is answered from what was done instead of being carried
/// out twice (a second mkdir would fail with EEXIST, a second unlink with ENOENT).
fn request_of(req: &Request<'_>) -> (u64, bool) {
    let u = req.unique();
    (u & !RESENT, u & RESENT != 0)
}

/// Carry out `op`, which serves the kernel's request `req` (from [`request_of`]) and changes
/// names or attributes, once: a resend of a request the dead worker had carried out gets
/// `if_done` instead (the entry looked up, or nothing), and a request carried out is journaled
/// as done before its answer goes out. A resend that fails with `done_errno` (EEXIST for a
/// mkdir, ENOENT for an unlink: what carrying it out twice gives) was carried out by the dead
/// worker after all, between its last request to the store and its journal record: it gets
/// `if_done` too (0: no such errno).
async fn once<T>(
    fs: &Fs,
    (id, resent): (u64, bool),
    done_errno: i32,
    op: impl std::future::Future<Output = crate::fs::FsResult<T>>,
    if_done: impl std::future::Future<Output = crate::fs::FsResult<T>>,
) -> crate::fs::FsResult<T> {
    if resent && fs.was_done(id) {
        return if_done.await;
    }
    let result = match op.await {
        Err(Errno(e)) if resent && done_errno != 0 && e == done_errno => if_done.await,
        result => result,
    };
    if result.is_ok() {
        fs.request_done(id);
    }
    result
}

/// One kernel request's latency and errors, recorded (only when metrics are on) when it is
/// answered: the value moves into the request's task and is dropped with it.
struct Timed {
    op: &'static str,
    start: Option<std::time::Instant>,
}

impl Timed {
    fn start(op: &'static str) -> Timed {
        Timed {
            op,
            start: crate::metrics::enabled().then(std::time::Instant::now),
        }
    }

    fn fail(&self, errno: i32) {
        if self.start.is_some() {
            crate::metrics::fuse_error(self.op, errno);
        }
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        if let Some(start) = self.start {
            crate::metrics::fuse_request(self.op, start.elapsed());
        }
    }
}

pub struct FuseAdapter {
    fs: Arc<Fs>,
    rt: Handle,
}

impl FuseAdapter {
    pub fn new(fs: Arc<Fs>, rt: Handle) -> Self {
        FuseAdapter { fs, rt }
    }

    /// Start `op` (which answers the kernel itself) here, in the request loop, and hand it to
    /// the runtime only if it has to wait (for the store, a lock, memory): most metadata
    /// requests are answered from memory, and handing each one to another thread costs more
    /// than the work (two thread wake-ups per request, much more on a busy machine).
    /// Requests that carry or may commit data (read, write, flush, fsync, release, setattr,
    /// rename) go straight to the runtime: a read's reply copies up to 1 MiB and the kernel
    /// sends several at once, which the runtime's threads copy in parallel; a commit hashes
    /// and signs its body before its first wait, which must not hold up the loop.
    fn run(&self, op: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut op = Box::pin(op);
        let _in_runtime = self.rt.enter();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if op.as_mut().poll(&mut cx).is_pending() {
            // Polled again there with a real waker, it picks up where it stopped.
            self.rt.spawn(op);
        }
    }
}

/// A size probe (`size` 0) gets the length; a buffer too small for `data`, ERANGE.
fn reply_xattr(reply: fuser::ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(libc::ERANGE);
    } else {
        reply.data(data);
    }
}

/// INIT flag (ABI 7.33, not named by fuser 0.16): the filesystem clears set-user-ID and
/// set-group-ID on write, chown and truncate itself. The kernel then marks inodes S_NOSEC and
/// stops asking for `security.capability` before every write (a GETXATTR per write(2) once
/// extended attributes are supported: 4 KiB writes took 1.3-1.6x as long).
const FUSE_HANDLE_KILLPRIV_V2: u64 = 1 << 28;
/// Write flag under FUSE_HANDLE_KILLPRIV_V2: the writer lacks CAP_FSETID.
const FUSE_WRITE_KILL_SUIDGID: u32 = 1 << 2;

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Special(bits) => match bits {
            crate::fs::attrs::S_IFIFO => FileType::NamedPipe,
            crate::fs::attrs::S_IFCHR => FileType::CharDevice,
            crate::fs::attrs::S_IFBLK => FileType::BlockDevice,
            _ => FileType::Socket,
        },
    }
}

fn to_file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: a.ino,
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 1 << 20,
        flags: 0,
    }
}

/// What a negative lookup reply carries: only inode 0 matters to the kernel.
fn negative_entry() -> FileAttr {
    FileAttr {
        ino: 0,
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        // readdirplus lets `ls -l` be answered from the listing; larger requests cut per-request cost.
        let _ =
            config.add_capabilities(consts::FUSE_DO_READDIRPLUS | consts::FUSE_READDIRPLUS_AUTO);
        let _ = config.add_capabilities(consts::FUSE_PARALLEL_DIROPS);
        let _ = config.add_capabilities(consts::FUSE_MAX_PAGES);
        let _ = config.add_capabilities(FUSE_HANDLE_KILLPRIV_V2);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let t = Timed::start("lookup");
        let fs = self.fs.clone();
        let name = name.as_bytes().to_vec();
        self.run(async move {
            match fs.lookup(parent, &name).await {
                Ok(attr) => reply.entry(&fs.ttl(), &to_file_attr(&attr), 0),
                // A negative entry (inode 0): the kernel keeps "no such name" for the metadata
                // TTL, as the filesystem does, instead of asking again (`cp` looks a new name up
                // three times before creating it). Names created through this mount replace
                // it at once; names created elsewhere appear within the TTL, as before.
                Err(Errno(libc::ENOENT)) if !fs.ttl().is_zero() => {
                    reply.entry(&fs.ttl(), &negative_entry(), 0)
                }
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn forget(&mut self, _req: &Request<'_>, ino: u64, nlookup: u64) {
        self.fs.forget(ino, nlookup);
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        let t = Timed::start("getattr");
        let fs = self.fs.clone();
        self.run(async move {
            match fs.getattr(ino).await {
                Ok(attr) => reply.attr(&fs.ttl(), &to_file_attr(&attr)),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn setattr(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        fh: Option<u64>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let t = Timed::start("setattr");
        let fs = self.fs.clone();
        let when = |t: Option<TimeOrNow>| {
            t.map(|t| match t {
                TimeOrNow::SpecificTime(t) => t,
                TimeOrNow::Now => std::time::SystemTime::now(),
            })
        };
        let req = SetAttr {
            mode,
            uid,
            gid,
            size,
            mtime: when(mtime),
            atime: when(atime),
            // What the kernel sends as FATTR_KILL_SUIDGID under FUSE_HANDLE_KILLPRIV_V2 (not
            // passed on by fuser 0.16): a chown always, a truncate by a caller without
            // CAP_FSETID (taken as: not root).
            kill_suid_sgid: uid.is_some() || gid.is_some() || (size.is_some() && req.uid() != 0),
        };
        self.rt.spawn(async move {
            match fs.setattr(ino, fh, req).await {
                Ok(attr) => reply.attr(&fs.ttl(), &to_file_attr(&attr)),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        let t = Timed::start("readlink");
        let fs = self.fs.clone();
        self.run(async move {
            match fs.readlink(ino).await {
                Ok(target) => reply.data(&target),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn mknod(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let t = Timed::start("mknod");
        let fs = self.fs.clone();
        let name = name.as_bytes().to_vec();
        let caller = Caller {
            uid: req.uid(),
            gid: req.gid(),
        };
        let mode = (mode & crate::fs::attrs::S_IFMT) | (mode & 0o7777 & !umask);
        let req = request_of(req);
        self.run(async move {
            match once(
                &fs,
                req,
                libc::EEXIST,
                fs.mknod(parent, &name, mode, rdev, caller),
                fs.lookup(parent, &name),
            )
            .await
            {
                Ok(attr) => reply.entry(&fs.ttl(), &to_file_attr(&attr), 0),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn mkdir(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let t = Timed::start("mkdir");
        let fs = self.fs.clone();
        let name = name.as_bytes().to_vec();
        let caller = Caller {
            uid: req.uid(),
            gid: req.gid(),
        };
        let req = request_of(req);
        self.run(async move {
            match once(
                &fs,
                req,
                libc::EEXIST,
                fs.mkdir(parent, &name, mode & !umask, caller),
                fs.lookup(parent, &name),
            )
            .await
            {
                Ok(attr) => reply.entry(&fs.ttl(), &to_file_attr(&attr), 0),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn unlink(&mut self, req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let t = Timed::start("unlink");
        let fs = self.fs.clone();
        let name = name.as_bytes().to_vec();
        let req = request_of(req);
        self.run(async move {
            match once(&fs, req, libc::ENOENT, fs.unlink(parent, &name), async {
                Ok(())
            })
            .await
            {
                Ok(()) => reply.ok(),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn rmdir(&mut self, req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let t = Timed::start("rmdir");
        let fs = self.fs.clone();
        let name = name.as_bytes().to_vec();
        let req = request_of(req);
        self.run(async move {
            match once(&fs, req, libc::ENOENT, fs.rmdir(parent, &name), async {
                Ok(())
            })
            .await
            {
                Ok(()) => reply.ok(),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn symlink(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        link: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let t = Timed::start("symlink");
        let fs = self.fs.clone();
        let (name, target) = (
            name.as_bytes().to_vec(),
            link.as_os_str().as_bytes().to_vec(),
        );
        let caller = Caller {
            uid: req.uid(),
            gid: req.gid(),
        };
        let req = request_of(req);
        self.run(async move {
            match once(
                &fs,
                req,
                libc::EEXIST,
                fs.symlink(parent, &name, &target, caller),
                fs.lookup(parent, &name),
            )
            .await
            {
                Ok(attr) => reply.entry(&fs.ttl(), &to_file_attr(&attr), 0),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn rename(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        let t = Timed::start("rename");
        let fs = self.fs.clone();
        let (name, newname) = (name.as_bytes().to_vec(), newname.as_bytes().to_vec());
        let req = request_of(req);
        self.rt.spawn(async move {
            let (_, resent) = req;
            let op = async {
                match fs.rename(parent, &name, newparent, &newname, flags).await {
                    // Its source gone: carried out by the worker that died, if the
                    // destination is there.
                    Err(Errno(libc::ENOENT)) if resent => {
                        fs.finish_resent_rename(parent, &name, newparent, &newname)
                            .await
                    }
                    result => result,
                }
            };
            match once(&fs, req, 0, op, async { Ok(()) }).await {
                Ok(()) => reply.ok(),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn link(&mut self, _req: &Request<'_>, _ino: u64, _np: u64, _nn: &OsStr, reply: ReplyEntry) {
        let t = Timed::start("link");
        fail!(t, reply, libc::EPERM);
    }

    fn open(&mut self, req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let t = Timed::start("open");
        let fs = self.fs.clone();
        let (id, resent) = request_of(req);
        self.run(async move {
            // Resent after a worker death that came after the open: the handle it opened.
            if let Some((fh, _)) = resent.then(|| fs.resent_open(id)).flatten() {
                return reply.opened(fh, 0);
            }
            match Fs::serving(id, fs.open(ino, flags)).await {
                Ok((fh, keep_cache)) => reply.opened(
                    fh,
                    if keep_cache {
                        consts::FOPEN_KEEP_CACHE
                    } else {
                        0
                    },
                ),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let t = Timed::start("read");
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            match fs.read(fh, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let t = Timed::start("write");
        let fs = self.fs.clone();
        let data = data.to_vec();
        let kill = write_flags & FUSE_WRITE_KILL_SUIDGID != 0;
        self.rt.spawn(async move {
            let mut res = fs.write(fh, offset, &data).await;
            if kill && res.is_ok() {
                if let Err(e) = fs.kill_suid_sgid(ino, fh).await {
                    res = Err(e);
                }
            }
            match res {
                Ok(n) => reply.written(n),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn flush(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _lock_owner: u64,
        reply: ReplyEmpty,
    ) {
        let t = Timed::start("flush");
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            match fs.flush(fh).await {
                Ok(()) => reply.ok(),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let t = Timed::start("release");
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            match fs.release(fh).await {
                Ok(()) => reply.ok(),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let t = Timed::start("fsync");
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            match fs.fsync(fh).await {
                Ok(()) => reply.ok(),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn opendir(&mut self, req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        let t = Timed::start("opendir");
        let fs = self.fs.clone();
        let (id, resent) = request_of(req);
        self.run(async move {
            if let Some((fh, _)) = resent.then(|| fs.resent_open(id)).flatten() {
                return reply.opened(fh, 0);
            }
            match Fs::serving(id, fs.opendir(ino)).await {
                Ok(fh) => reply.opened(fh, 0),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let t = Timed::start("readdir");
        let fs = self.fs.clone();
        // Waits while a large directory's listing is still arriving.
        self.run(async move {
            if let Err(Errno(e)) = fs.adopt_dir(ino, fh).await {
                return fail!(t, reply, e);
            }
            let filled = fill_dir(&fs, fh, offset, |item| {
                Ok(reply.add(item.ino, item.next_offset, file_type(item.kind), &item.name))
            })
            .await;
            match filled {
                Ok(()) => reply.ok(),
                Err(e) => fail!(t, reply, e),
            }
        });
    }

    fn readdirplus(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let t = Timed::start("readdirplus");
        let ttl = self.fs.ttl();
        let fs = self.fs.clone();
        // Waits while a large directory's listing is still arriving.
        self.run(async move {
            let fs = &fs;
            if let Err(Errno(e)) = fs.adopt_dir(ino, fh).await {
                return fail!(t, reply, e);
            }
            if offset == 0 {
                fs.sample_before_listing(fh).await;
            }
            let filled = fill_dir(fs, fh, offset, |item| {
                let (attr, counted, confirmed) = match &item.entry {
                    // `.` and `..` carry attributes but no lookup count.
                    None => match fs.attr_of(item.ino) {
                        Some(a) => (a, false, true),
                        None => return Ok(false),
                    },
                    Some(_) => {
                        let (attr, confirmed) = fs.lookup_listed(ino, &item).map_err(|e| e.0)?;
                        (attr, true, confirmed)
                    }
                };
                // Attributes still to be confirmed by a HEAD: not to be kept by the kernel.
                let ttl = if confirmed { ttl } else { Duration::ZERO };
                let full = reply.add(
                    attr.ino,
                    item.next_offset,
                    &item.name,
                    &ttl,
                    &to_file_attr(&attr),
                    0,
                );
                if full && counted {
                    fs.forget(attr.ino, 1);
                }
                Ok(full)
            })
            .await;
            match filled {
                Ok(()) => reply.ok(),
                Err(e) => fail!(t, reply, e),
            }
        });
    }

    fn releasedir(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        reply: ReplyEmpty,
    ) {
        let _t = Timed::start("releasedir");
        self.fs.releasedir(fh);
        reply.ok();
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let _t = Timed::start("statfs");
        let s = self.fs.statfs();
        reply.statfs(
            s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
        );
    }

    fn access(&mut self, _req: &Request<'_>, ino: u64, mask: i32, reply: ReplyEmpty) {
        let t = Timed::start("access");
        // The kernel checks mode bits (default_permissions); here only existence and read-only.
        if mask & libc::W_OK != 0 && self.fs.config().read_only {
            return fail!(t, reply, libc::EROFS);
        }
        match self.fs.attr_of(ino) {
            Some(_) => reply.ok(),
            None => fail!(t, reply, libc::ENOENT),
        }
    }

    fn getxattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        size: u32,
        reply: fuser::ReplyXattr,
    ) {
        let t = Timed::start("getxattr");
        if !self.fs.config().xattrs {
            // ENOSYS: the kernel stops asking (no request per entry for `ls -l`).
            return fail!(t, reply, libc::ENOSYS);
        }
        let fs = self.fs.clone();
        let name = name.as_bytes().to_vec();
        self.run(async move {
            match fs.getxattr(ino, &name).await {
                Ok(value) => reply_xattr(reply, size, &value),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn setxattr(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        position: u32,
        reply: ReplyEmpty,
    ) {
        let t = Timed::start("setxattr");
        if !self.fs.config().xattrs {
            return fail!(t, reply, libc::ENOTSUP);
        }
        if position != 0 {
            // Only macOS resource forks use a position.
            return fail!(t, reply, libc::EINVAL);
        }
        let fs = self.fs.clone();
        let name = name.as_bytes().to_vec();
        let value = value.to_vec();
        let req = request_of(req);
        self.run(async move {
            match once(
                &fs,
                req,
                0,
                fs.set_or_remove_xattr(ino, &name, Some(&value), flags),
                async { Ok(()) },
            )
            .await
            {
                Ok(()) => reply.ok(),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn removexattr(&mut self, req: &Request<'_>, ino: u64, name: &OsStr, reply: ReplyEmpty) {
        let t = Timed::start("removexattr");
        if !self.fs.config().xattrs {
            return fail!(t, reply, libc::ENOTSUP);
        }
        let fs = self.fs.clone();
        let name = name.as_bytes().to_vec();
        let req = request_of(req);
        self.run(async move {
            match once(
                &fs,
                req,
                libc::ENODATA,
                fs.set_or_remove_xattr(ino, &name, None, 0),
                async { Ok(()) },
            )
            .await
            {
                Ok(()) => reply.ok(),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn listxattr(&mut self, _req: &Request<'_>, ino: u64, size: u32, reply: fuser::ReplyXattr) {
        let t = Timed::start("listxattr");
        if !self.fs.config().xattrs {
            return fail!(t, reply, libc::ENOSYS);
        }
        let fs = self.fs.clone();
        self.run(async move {
            match fs.listxattr(ino).await {
                Ok(names) => reply_xattr(reply, size, &names),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let t = Timed::start("fallocate");
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            match fs.fallocate(ino, fh, offset, length, mode).await {
                Ok(()) => reply.ok(),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn copy_file_range(
        &mut self,
        _req: &Request<'_>,
        _ino_in: u64,
        fh_in: u64,
        offset_in: i64,
        _ino_out: u64,
        fh_out: u64,
        offset_out: i64,
        len: u64,
        _flags: u32,
        reply: ReplyWrite,
    ) {
        let t = Timed::start("copy_file_range");
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            match fs
                .copy_file_range(fh_in, offset_in, fh_out, offset_out, len)
                .await
            {
                Ok(n) => reply.written(n),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }

    fn create(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let t = Timed::start("create");
        let fs = self.fs.clone();
        let name = name.as_bytes().to_vec();
        let caller = Caller {
            uid: req.uid(),
            gid: req.gid(),
        };
        let (id, resent) = request_of(req);
        self.run(async move {
            let created = match resent.then(|| fs.resent_open(id)).flatten() {
                // The dead worker created the file and opened it: that handle, taken over.
                Some((fh, ino)) => fs.lookup(parent, &name).await.and_then(|attr| {
                    if attr.ino == ino {
                        Ok((attr, fh))
                    } else {
                        Err(Errno(libc::EIO))
                    }
                }),
                None => {
                    Fs::serving(id, fs.create(parent, &name, mode & !umask, flags, caller)).await
                }
            };
            match created {
                Ok((attr, fh)) => reply.created(&fs.ttl(), &to_file_attr(&attr), 0, fh, 0),
                Err(Errno(e)) => fail!(t, reply, e),
            }
        });
    }
}

/// How the kernel should present the mount.
#[derive(Clone, Debug)]
pub struct KernelMountOptions {
    /// Shown as the source in `mount` and /proc/mounts.
    pub fsname: String,
    pub read_only: bool,
    pub allow_other: bool,
    pub allow_root: bool,
}

/// A mounted filesystem whose request loop has not started yet.
pub struct MountedSession {
    session: fuser::Session<FuseAdapter>,
}

/// The kernel mount options for `opts`.
fn mount_options(opts: &KernelMountOptions) -> Vec<fuser::MountOption> {
    use fuser::MountOption as M;
    let mut options = vec![
        M::FSName(opts.fsname.clone()),
        M::Subtype("s3mount".into()),
        M::DefaultPermissions,
        M::NoDev,
        M::NoSuid,
        M::NoAtime,
        M::Async,
    ];
    // fuser hands the subtype only to fusermount3; mount(2), which root uses, needs it among
    // the kernel's options, or the mount shows as plain `fuse` instead of `fuse.s3mount`.
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        options.push(M::CUSTOM("subtype=s3mount".into()));
    }
    options.push(if opts.read_only { M::RO } else { M::RW });
    if opts.allow_other {
        options.push(M::AllowOther);
    }
    if opts.allow_root {
        options.push(M::AllowRoot);
    }
    options
}

/// Mount `fs` on `mountpoint`: as root through mount(2) directly, otherwise through fusermount3.
pub fn mount(
    fs: Arc<Fs>,
    rt: Handle,
    mountpoint: &std::path::Path,
    opts: &KernelMountOptions,
) -> std::io::Result<MountedSession> {
    let session = fuser::Session::new(FuseAdapter::new(fs, rt), mountpoint, &mount_options(opts))?;
    Ok(MountedSession { session })
}

impl MountedSession {
    /// Serve kernel requests until the filesystem is unmounted.
    pub fn run(mut self) -> std::io::Result<()> {
        self.session.run()
    }
}

/// A filesystem that is never asked anything: the supervisor's session is never run.
struct Unserved;

impl Filesystem for Unserved {}

/// The supervisor's mount (`--supervise`): the kernel connection, held open and never read
/// here; workers serve it through a duplicate of its descriptor. Dropping it unmounts.
pub struct HeldMount {
    held: Option<Held>,
    /// The mount is gone (unmounted by someone else): dropped, nothing is unmounted.
    gone: std::cell::Cell<bool>,
}

enum Held {
    /// Mounted by this process (dropped: unmounted).
    Mounted(fuser::Session<Unserved>),
    /// A live connection handed over by another process (systemd's file descriptor store,
    /// after the service was started again): dropped, only this descriptor is closed.
    Inherited(std::os::fd::OwnedFd),
}

impl HeldMount {
    /// The connection's descriptor (`/dev/fuse`), for a worker to serve.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self.held.as_ref().expect("held until dropped") {
            Held::Mounted(session) => session.as_fd(),
            Held::Inherited(fd) => fd.as_fd(),
        }
    }

    /// The mount was unmounted (the worker ended after the unmount): when this is dropped,
    /// do not unmount the mount point again, as fuser's session would. By then it may hold
    /// another mount (`umount` then `mount` at once).
    pub fn unmounted(&self) {
        self.gone.set(true);
    }

    /// A connection already mounted and initialized, kept open elsewhere while no process
    /// served it: the next worker starts on it as after a worker death.
    pub fn inherited(fd: std::os::fd::OwnedFd) -> HeldMount {
        HeldMount {
            held: Some(Held::Inherited(fd)),
            gone: std::cell::Cell::new(false),
        }
    }
}

impl Drop for HeldMount {
    fn drop(&mut self) {
        if let (true, Some(Held::Mounted(session))) = (self.gone.get(), self.held.take()) {
            // Its drop would unmount the path; the process ends right after, closing the fd.
            std::mem::forget(session);
        }
    }
}

/// Mount on `mountpoint` with the options a served mount gets, to be served by workers.
pub fn mount_held(
    mountpoint: &std::path::Path,
    opts: &KernelMountOptions,
) -> std::io::Result<HeldMount> {
    let session = fuser::Session::new(Unserved, mountpoint, &mount_options(opts))?;
    Ok(HeldMount {
        held: Some(Held::Mounted(session)),
        gone: std::cell::Cell::new(false),
    })
}

/// Serve `fs` on a connection a supervisor holds (`fd`). The first worker answers the kernel's
/// INIT; one started after a worker died (`resumed`) finds the connection initialized
/// (vendor/fuser/PATCHED.md) and first asks the kernel to send again what the dead one had
/// read and not answered.
pub fn serve_held(
    fs: Arc<Fs>,
    rt: Handle,
    fd: std::os::fd::OwnedFd,
    opts: &KernelMountOptions,
    resumed: bool,
) -> std::io::Result<MountedSession> {
    use std::os::fd::AsRawFd;
    // fuser's own checks of who may use the mount, as its `Session::new` sets them up.
    let acl = if opts.allow_root {
        fuser::SessionACL::RootAndOwner
    } else if opts.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    let adapter = FuseAdapter::new(fs, rt);
    let session = if resumed {
        notify_resend(fd.as_raw_fd())?;
        fuser::Session::from_fd_initialized(adapter, fd, acl)
    } else {
        fuser::Session::from_fd(adapter, fd, acl)
    };
    Ok(MountedSession { session })
}

/// FUSE_NOTIFY_RESEND (Linux 6.9, fs/fuse/dev.c `fuse_notify_resend`): the kernel puts every
/// request that was read from the connection and not answered back in the queue, marked
/// `FUSE_UNIQUE_RESEND`, for whoever reads next. Older kernels refuse the unknown code.
fn notify_resend(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    const FUSE_NOTIFY_RESEND: i32 = 7;
    // struct fuse_out_header { u32 len; i32 error (the notify code); u64 unique (0) }.
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&16u32.to_ne_bytes());
    header[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // SAFETY: `fd` is an open /dev/fuse descriptor and the buffer is 16 readable bytes.
    let n = unsafe { libc::write(fd, header.as_ptr().cast(), header.len()) };
    if n == header.len() as isize {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
