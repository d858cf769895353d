//! Everything between a validated [`Config`] and a live mount: pre-flight checks with one clear
//! message each, logging, going to the background, and unmounting on SIGTERM/SIGINT.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::fs::Fs;
use crate::fuse::{self, KernelMountOptions};
use crate::paths::StateDir;
use crate::store::s3::S3Store;
use crate::store::{ObjectStore, StoreError};
use crate::supervisor::WorkerEnv;

/// How long the bucket check may take before the endpoint counts as unreachable.
const REACH_TIMEOUT: Duration = Duration::from_secs(10);
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// A failure that ends the command: one line for the user and the exit status.
#[derive(Debug)]
pub struct Fatal {
    pub message: String,
    pub code: i32,
}

impl Fatal {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Fatal {
            message: message.into(),
            code: 1,
        }
    }
}

/// Decode the octal escapes (`\040` for a space) /proc/self/mountinfo uses.
pub fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8)
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// The filesystem type mounted exactly at `path`, if something is.
pub fn mounted_fstype(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.as_os_str().as_bytes();
    info.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let mp = fields.get(4)?;
        if unescape_mountinfo(mp) != want {
            return None;
        }
        let sep = fields.iter().position(|f| *f == "-")?;
        fields.get(sep + 1).map(|s| s.to_string())
    })
}

/// The checks that need no network: the mount point and /dev/fuse.
pub fn check_local(cfg: &Config) -> Result<PathBuf, Fatal> {
    let mp = &cfg.mountpoint;
    let shown = mp.display();
    let meta = match std::fs::metadata(mp) {
        Ok(m) => m,
        // Under systemd the unit owns its mount point: its own previous run's dead mount
        // (a crash with --no-supervise, or a store that did not keep the connection) is
        // cleared, as the unit's ExecStop used to do after every crash.
        Err(e)
            if e.raw_os_error() == Some(libc::ENOTCONN)
                && std::env::var_os("NOTIFY_SOCKET").is_some()
                && unmount(mp, true).is_ok() =>
        {
            eprintln!("s3mount: cleared the stale mount on {shown} left by the service's previous run");
            std::fs::metadata(mp)
                .map_err(|e| Fatal::new(format!("cannot use mount point {shown}: {e}")))?
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(Fatal::new(format!(
                "mount point {shown} is a stale FUSE mount whose daemon died (\"transport endpoint is not connected\"); \
                 clean it with `fusermount3 -u {shown}` (or `umount -l {shown}`) and mount again"
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Fatal::new(format!("mount point {shown} does not exist; create it with `mkdir -p {shown}`")))
        }
        Err(e) => return Err(Fatal::new(format!("cannot use mount point {shown}: {e}"))),
    };
    if !meta.is_dir() {
        return Err(Fatal::new(format!(
            "mount point {shown} is not a directory"
        )));
    }
    let canonical = std::fs::canonicalize(mp)
        .map_err(|e| Fatal::new(format!("cannot resolve mount point {shown}: {e}")))?;
    if let Some(fstype) = mounted_fstype(&canonical) {
        // Attributes may be cached by the kernel; statfs always reaches the daemon.
        if fstype.starts_with("fuse") && statfs_errno(&canonical) == Some(libc::ENOTCONN) {
            return Err(Fatal::new(format!(
                "mount point {shown} is a stale FUSE mount whose daemon died (\"transport endpoint is not connected\"); \
                 clean it with `fusermount3 -u {shown}` (or `umount -l {shown}`) and mount again"
            )));
        }
        return Err(Fatal::new(format!(
            "mount point {shown} is already mounted ({fstype}); unmount it first with `umount {shown}`"
        )));
    }
    // Mounting over files hides them until the unmount, which is rarely meant (FUSE's nonempty).
    if !cfg.nonempty {
        if let Ok(mut entries) = std::fs::read_dir(&canonical) {
            if entries.next().is_some() {
                return Err(Fatal::new(format!(
                    "mount point {shown} is not empty; mounting would hide what it holds: use an empty directory, \
                     or --nonempty (-o nonempty) to mount over it anyway"
                )));
            }
        }
    }
    // Local directories inside the mount would be served by the mount itself (and deadlock).
    let local_dirs = [
        (
            "--cache-dir",
            cfg.fs.cache.disk.as_ref().map(|d| d.dir.clone()),
        ),
        ("--staging-dir", Some(cfg.state_base.clone())),
    ];
    for (option, dir) in local_dirs {
        if let Some(dir) = dir {
            let resolved = std::fs::canonicalize(&dir).unwrap_or(dir.clone());
            if resolved.starts_with(&canonical) {
                return Err(Fatal::new(format!(
                    "{option} {} is inside the mount point {shown}; put it on a local disk",
                    dir.display()
                )));
            }
        }
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(Fatal::new(
            "/dev/fuse is missing: load the FUSE kernel module (`modprobe fuse`) or, in a container, pass the device \
             (e.g. `--device /dev/fuse`)",
        ));
    }
    Ok(canonical)
}

fn endpoint_name(cfg: &Config) -> String {
    cfg.s3
        .endpoint_url
        .clone()
        .unwrap_or_else(|| "the AWS S3 endpoint".to_string())
}

/// One listing of one key proves the bucket and prefix are reachable with these credentials.
pub async fn check_bucket(store: &dyn ObjectStore, cfg: &Config) -> Result<(), Fatal> {
    let res = tokio::time::timeout(
        REACH_TIMEOUT,
        store.list_page(&cfg.prefix, Some("/"), None, Some(1)),
    )
    .await;
    let err = match res {
        Ok(Ok(_)) => return Ok(()),
        Ok(Err(e)) => e,
        Err(_) => {
            return Err(Fatal::new(format!(
                "cannot reach {}: no answer within {} s; check --endpoint-url, the network and any proxy",
                endpoint_name(cfg),
                REACH_TIMEOUT.as_secs()
            )))
        }
    };
    Err(Fatal::new(describe_store_error(&err, cfg)))
}

/// The one line a user reads when the store cannot be used: the cause and the fix.
pub fn describe_store_error(err: &StoreError, cfg: &Config) -> String {
    let b = &cfg.bucket;
    let endpoint = endpoint_name(cfg);
    let host_port = cfg
        .s3
        .endpoint_url
        .as_deref()
        .and_then(crate::config::endpoint_host_port);
    match err {
        StoreError::NoCredentials(d) => format!(
            "no AWS credentials found ({d}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or use \
             --profile NAME or --passwd-file PATH (-o passwd_file=PATH), or --no-sign-request for a public bucket"
        ),
        StoreError::NoSuchBucket(_) => format!(
            "bucket '{b}' does not exist at {endpoint}; check the bucket name, --region and --endpoint-url"
        ),
        StoreError::NotFound(_) => format!(
            "bucket '{b}' was not found at {endpoint} (404); check the bucket name, --endpoint-url and --force-path-style"
        ),
        StoreError::AccessDenied(d) => format!(
            "access denied to bucket '{b}' ({d}); check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, \
             --profile, --passwd-file) and the bucket policy"
        ),
        StoreError::Unreachable(d) if d.ends_with("connection refused") => match host_port {
            Some((h, p)) => format!(
                "cannot connect to {h}:{p}: connection refused (is the S3 server running and listening there? \
                 check --endpoint-url)"
            ),
            None => format!("cannot connect to {endpoint}: connection refused; check the network and any proxy"),
        },
        StoreError::Unreachable(d) if d.contains("dns error") || d.contains("lookup address") => {
            match host_port {
                Some((h, _)) if !cfg.s3.force_path_style => format!(
                    "cannot resolve {b}.{h} (the bucket as a host name, virtual-hosted style): add \
                     --force-path-style (-o force_path_style) if the server serves buckets as paths, or check --endpoint-url"
                ),
                Some((h, _)) => format!("cannot resolve host {h}; check --endpoint-url and DNS"),
                None => format!("cannot resolve {endpoint}; check DNS and --region ({d})"),
            }
        }
        StoreError::Unreachable(d) | StoreError::Timeout(d) => {
            format!("cannot reach {endpoint}: {d}; check --endpoint-url and the network")
        }
        other => format!("cannot list bucket '{b}': {other}"),
    }
}

/// The write end of the pipe a backgrounded child uses to tell its parent the mount is live.
pub struct ReadyPipe(OwnedFd);

impl ReadyPipe {
    pub(crate) fn send_ok(self) {
        let mut f = std::fs::File::from(self.0);
        let _ = f.write_all(b"0");
    }
}

/// Fork. The parent waits for the child to report the mount live (exit 0) or to fail (its exit
/// status; the child has printed why), and never returns. The child returns its end of the pipe.
/// `note` is printed by the parent once the mount is live.
pub fn daemonize(note: Option<String>) -> Result<ReadyPipe, Fatal> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given, which has room for two.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Fatal::new(format!(
            "cannot create a pipe: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: pipe2 just made these two descriptors; nothing else owns them.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: called from main before the runtime or any other thread exists, so the child
    // inherits no lock held by another thread.
    match unsafe { libc::fork() } {
        -1 => Err(Fatal::new(format!(
            "cannot fork: {}",
            std::io::Error::last_os_error()
        ))),
        0 => {
            drop(rd);
            // SAFETY: setsid has no preconditions; it fails only for a group leader, which a
            // freshly forked child is not.
            unsafe { libc::setsid() };
            close_inherited_fds(wr.as_raw_fd());
            Ok(ReadyPipe(wr))
        }
        child => {
            drop(wr);
            let mut byte = [0u8; 1];
            let mut f = std::fs::File::from(rd);
            if matches!(f.read(&mut byte), Ok(1)) && byte[0] == b'0' {
                if let Some(note) = note {
                    eprintln!("{note}");
                }
                std::process::exit(0);
            }
            let mut status = 0;
            // SAFETY: waitpid on our own child, with a valid pointer to a local status.
            unsafe { libc::waitpid(child, &mut status, 0) };
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                1
            };
            std::process::exit(if code == 0 { 1 } else { code });
        }
    }
}

/// Close every descriptor above stderr the caller left open, but `keep`: a caller that waits
/// for EOF on a pipe it handed down (`$(...)` with a redirect, a test harness, an init script)
/// would otherwise wait for as long as the daemon lives.
fn close_inherited_fds(keep: i32) {
    let fds: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => return,
    };
    for fd in fds.into_iter().filter(|&fd| fd > 2 && fd != keep) {
        // SAFETY: nothing in this process owns these descriptors yet (we are right after
        // fork, before any file is opened); the one read_dir used is already closed.
        unsafe { libc::close(fd) };
    }
}

/// Detach from the terminal once the mount is live: stdio to /dev/null, cwd to /.
fn detach_stdio() {
    if let Ok(null) = CString::new("/dev/null") {
        // SAFETY: open/dup2/close on descriptors this process owns; stdio is redirected, not freed.
        unsafe {
            let fd = libc::open(null.as_ptr(), libc::O_RDWR);
            if fd >= 0 {
                libc::dup2(fd, 0);
                libc::dup2(fd, 1);
                libc::dup2(fd, 2);
                if fd > 2 {
                    libc::close(fd);
                }
            }
        }
    }
    let _ = std::env::set_current_dir("/");
}

/// The errno of statfs(2) on `path`, if it fails.
pub fn statfs_errno(path: &Path) -> Option<i32> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs is plain old data (zeroed is a valid value), filled by statfs(2) from a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a pointer to a statfs buffer we own.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 {
        None
    } else {
        std::io::Error::last_os_error().raw_os_error()
    }
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// SIGUSR2 cycles the log level, SIGHUP reopens the log file; neither ends the mount.
fn handle_log_signals(rt: &tokio::runtime::Runtime) {
    use tokio::signal::unix::{signal, SignalKind};
    rt.spawn(async {
        let (Ok(mut usr2), Ok(mut hup)) = (
            signal(SignalKind::user_defined2()),
            signal(SignalKind::hangup()),
        ) else {
            return;
        };
        loop {
            tokio::select! {
                _ = usr2.recv() => {
                    if let Some(level) = crate::logging::cycle_level() {
                        tracing::warn!(filter = %level, "SIGUSR2: log level changed");
                    }
                }
                _ = hup.recv() => match crate::logging::reopen() {
                    Some(Ok(path)) => tracing::info!(path = %path.display(), "SIGHUP: log file reopened"),
                    Some(Err(e)) => tracing::error!("SIGHUP: cannot reopen the log file: {e}"),
                    None => tracing::info!("SIGHUP: no log file to reopen"),
                },
            }
        }
    });
}

/// SIGUSR1 (`s3mount upgrade`, passed on by the supervisor): once every file open for writing
/// can be taken over (its bytes all local: [`Fs::writers_to_wait_for`]) and no upload is
/// queued, end this worker with [`EXIT_UPGRADE`] and leave the mount to the one the supervisor
/// starts from the binary on disk: it takes the files over from the journal as after a crash,
/// and the kernel resends it the requests read and not answered. A mount made with
/// `--no-supervise` ignores the signal, saying why.
///
/// [`EXIT_UPGRADE`]: crate::supervisor::EXIT_UPGRADE
fn handle_upgrade_signal(rt: &tokio::runtime::Runtime, fs: Arc<Fs>, supervised: bool) {
    use tokio::signal::unix::{signal, SignalKind};
    rt.spawn(async move {
        let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
            return;
        };
        loop {
            usr1.recv().await;
            if !supervised {
                tracing::warn!(
                    "SIGUSR1 ignored: this mount was made with --no-supervise, and handing it to a new binary needs a supervisor"
                );
                continue;
            }
            tracing::info!("upgrade asked: handing the mount over once every file being written can go on in the new worker");
            let mut told = std::time::Instant::now();
            loop {
                let waiting = fs.writers_to_wait_for();
                let queued = fs.write_back_pending();
                if waiting.is_empty() && queued == 0 {
                    let open = fs.open_keys().len();
                    tracing::info!(
                        files_being_written = open,
                        "handing the mount over to a new worker"
                    );
                    std::process::exit(crate::supervisor::EXIT_UPGRADE);
                }
                if told.elapsed() > Duration::from_secs(10) {
                    tracing::info!(
                        files = waiting.len(),
                        first = waiting.first().map(String::as_str).unwrap_or(""),
                        write_back_queued = queued,
                        "the upgrade waits for files whose bytes are not all on local disk (past --spool-limit, started by a server-side copy, or unlinked while open)"
                    );
                    told = std::time::Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
}

/// Unmount `path`: umount2(2) as root, else fusermount3 -u; `lazy` detaches even when busy.
pub(crate) fn unmount(path: &Path, lazy: bool) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: umount2 with a NUL-terminated path; it has no other preconditions.
    if unsafe { libc::umount2(c.as_ptr(), if lazy { libc::MNT_DETACH } else { 0 }) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EPERM) {
        return Err(err);
    }
    let status = std::process::Command::new("fusermount3")
        .arg(if lazy { "-uz" } else { "-u" })
        .arg(path)
        .stderr(std::process::Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(libc::EBUSY))
    }
}

/// Say what an earlier run left behind: staged changes that never reached the bucket, data kept
/// after write conflicts, and multipart uploads still open under the prefix. Nothing is deleted.
fn report_leftovers(cfg: &Config, rt: &tokio::runtime::Runtime, store: &S3Store) {
    for (path, about) in crate::data::staging::leftovers(&cfg.fs.staging_dir) {
        tracing::warn!(
            path = %path.display(),
            endpoint = %endpoint_name(cfg),
            bucket = %cfg.bucket,
            about = %about,
            "found data not uploaded by an earlier run of this mount (crash or write conflict); it is kept for you to recover"
        );
    }
    let listed = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(10),
            store.list_multipart_uploads(&cfg.prefix),
        )
        .await
    });
    match listed {
        Ok(Ok(open)) if !open.is_empty() => {
            for u in open.iter().take(20) {
                tracing::warn!(key = %u.key, upload_id = %u.upload_id, "multipart upload left open (by a crash, or kept after a write conflict)");
            }
            tracing::warn!(count = open.len(), prefix = %cfg.prefix, "open multipart uploads under the mounted prefix");
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "could not list open multipart uploads"),
        _ => {}
    }
}

/// The kernel offers FUSE filesystems only 128 KiB of read-ahead, so sequential reads arrive as
/// 128 KiB requests. Root may raise it on the mount's backing device info; larger windows let the
/// kernel send up to 1 MiB per request and keep several in flight.
fn raise_readahead(path: &Path, kb: u32) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    match std::fs::write(&knob, kb.to_string()) {
        Ok(()) => tracing::debug!(knob, kb, "kernel read-ahead raised"),
        Err(e) => {
            tracing::debug!(knob, error = %e, "kernel read-ahead left at its default (needs root)")
        }
    }
}

/// Tell systemd (a `Type=notify` unit: `$NOTIFY_SOCKET`) how the mount is doing, so that
/// units ordered after it start only once it answers. Without the variable, nothing.
fn sd_notify(state: &str) {
    let Some(sock) = notify_socket() else { return };
    match sock.and_then(|s| s.send(state.as_bytes())) {
        Ok(_) => tracing::debug!(state, "told systemd"),
        Err(e) => tracing::warn!(state, error = %e, "cannot notify systemd"),
    }
}

/// A datagram socket connected to `$NOTIFY_SOCKET` (a path, or `@name` for an abstract
/// socket); None without the variable.
fn notify_socket() -> Option<std::io::Result<std::os::unix::net::UnixDatagram>> {
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let path = std::env::var_os("NOTIFY_SOCKET")?;
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
        None => SocketAddr::from_pathname(Path::new(&path)),
    };
    Some(UnixDatagram::unbound().and_then(|sock| {
        sock.connect_addr(&addr?)?;
        Ok(sock)
    }))
}

/// Send `state` to systemd with descriptor `fd` attached (`FDSTORE=1`: systemd keeps it for
/// the service across its restarts). Ok(false) without `$NOTIFY_SOCKET`.
pub(crate) fn sd_notify_with_fd(
    state: &str,
    fd: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<bool> {
    let Some(sock) = notify_socket() else {
        return Ok(false);
    };
    let sock = sock?;
    let raw = fd.as_raw_fd();
    let mut iov = libc::iovec {
        iov_base: state.as_ptr() as *mut libc::c_void,
        iov_len: state.len(),
    };
    // Room for one SCM_RIGHTS message with one descriptor, aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    assert!(space <= std::mem::size_of_val(&control));
    // SAFETY: msghdr is plain old data; zeroed is a valid value, filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space;
    // SAFETY: msg_control points at `space` bytes we own (checked above), so the first header
    // and its data fit; CMSG_FIRSTHDR/CMSG_DATA stay inside that buffer.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut libc::c_int, raw);
    }
    // SAFETY: a connected socket we own and a msghdr whose pointers (iov, control) live until
    // the call returns.
    if unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(true)
}

/// Tell systemd something without a descriptor (`FDSTOREREMOVE=1`, ...); Ok(false) without
/// `$NOTIFY_SOCKET`.
pub(crate) fn sd_notify_checked(state: &str) -> std::io::Result<bool> {
    match notify_socket() {
        None => Ok(false),
        Some(sock) => sock?.send(state.as_bytes()).map(|_| true),
    }
}

/// Is a FUSE filesystem answering at `path`? (statfs goes through the kernel to our daemon.)
fn mount_is_live(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain old data (zeroed is a valid value), filled by statfs(2) from a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a pointer to a statfs buffer we own.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == FUSE_SUPER_MAGIC }
}

/// Why mounting on `mountpoint` failed, in one line with what to do.
pub(crate) fn mount_error(e: &std::io::Error, mountpoint: &Path) -> Fatal {
    Fatal::new(match e.kind() {
        std::io::ErrorKind::PermissionDenied => format!(
            "not allowed to mount on {}: {e} (non-root users need fusermount3 from the fuse3 package, and \
             user_allow_other in /etc/fuse.conf for --allow-other)",
            mountpoint.display()
        ),
        std::io::ErrorKind::NotFound => format!(
            "cannot mount on {}: {e} (install the fuse3 package for fusermount3)",
            mountpoint.display()
        ),
        _ => format!("cannot mount on {}: {e}", mountpoint.display()),
    })
}

/// The kernel mount options a configuration asks for.
pub(crate) fn kernel_options(cfg: &Config) -> KernelMountOptions {
    KernelMountOptions {
        fsname: cfg.source.clone(),
        read_only: cfg.read_only,
        allow_other: cfg.allow_other,
        allow_root: cfg.allow_root,
    }
}

/// Is anything mounted on `path`?
pub(crate) fn is_mounted(path: &Path) -> bool {
    mounted_fstype(path).is_some()
}

/// The mount answers: tell whoever waits for it (systemd, the parent of a daemon started in
/// the background) and let go of the terminal.
pub(crate) fn report_ready(cfg: &Config, mountpoint: &Path, ready: Option<ReadyPipe>) {
    raise_readahead(mountpoint, cfg.kernel_readahead_kb);
    tracing::info!(source = %cfg.source, mountpoint = %mountpoint.display(), "mounted");
    sd_notify("READY=1");
    if let Some(ready) = ready {
        ready.send_ok();
        detach_stdio();
    }
}

/// Connect, check, mount, report readiness, serve until unmounted.
pub fn run(
    mut cfg: Config,
    mountpoint: PathBuf,
    ready: Option<ReadyPipe>,
    mut worker: Option<WorkerEnv>,
) -> Result<(), Fatal> {
    let about = format!(
        "endpoint: {}\nbucket: {}\nprefix: {}\nmountpoint: {}\n",
        endpoint_name(&cfg),
        cfg.bucket,
        cfg.prefix,
        mountpoint.display()
    );
    let claimed = match worker.as_ref().and_then(|w| w.state.as_deref()) {
        // A worker started again after a death: the same directory (its lock was the dead
        // worker's, gone with it).
        Some(path) => StateDir::reclaim(path, &about),
        None => StateDir::claim(&cfg.state_base, &cfg.id, &about),
    };
    let state = claimed.map_err(|e| {
        Fatal::new(format!(
            "cannot use the state directory {}: {e} (choose another with --staging-dir)",
            cfg.state_base.join(&cfg.id.0).display()
        ))
    })?;
    cfg.fs.staging_dir = state.path.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            std::thread::available_parallelism()
                .map(|n| n.get().max(4))
                .unwrap_or(4),
        )
        .thread_name("s3mount-io")
        .enable_all()
        .build()
        .map_err(|e| Fatal::new(format!("cannot start the runtime: {e}")))?;
    // Before the first slow step: a SIGHUP or SIGUSR2 from logrotate must never kill a daemon
    // that is still connecting.
    handle_log_signals(&rt);
    if let Some(addr) = cfg.metrics_addr {
        let _in_runtime = rt.enter();
        crate::metrics::install(addr).map_err(Fatal::new)?;
    }
    let store = rt
        .block_on(S3Store::connect(&cfg.s3))
        .map_err(|e| Fatal::new(describe_store_error(&e, &cfg)))?;
    rt.block_on(check_bucket(&store, &cfg))?;
    // A restarted worker takes the dead one's files over instead (reported, they would look
    // like data left over); the first worker of the mount reported what earlier runs left.
    if worker.as_ref().is_none_or(|w| w.restart == 0) {
        report_leftovers(&cfg, &rt, &store);
    }
    let traffic = store.traffic();
    let store: Arc<dyn ObjectStore> = Arc::new(store);
    let fs = Arc::new(
        Fs::try_new(store, cfg.fs.clone())
            .map_err(|e| Fatal::new(format!("cannot open the block cache: {e}")))?,
    );
    fs.attach();
    if let Some(w) = &worker {
        // In a directory of its own: the state directory's top is where leftovers are looked for.
        let journal = state.path.join("journal").join("inodes");
        let restored = crate::paths::private_dir(&state.path.join("journal"))
            .and_then(|()| fs.start_journal(&journal, w.restart))
            .map_err(|e| {
                Fatal::new(format!(
                    "cannot use the inode journal {}: {e}",
                    journal.display()
                ))
            })?;
        if w.restart > 0 {
            let writers = rt.block_on(fs.take_over_handles());
            tracing::info!(
                inodes = restored,
                files_being_written = writers,
                restart = w.restart,
                "took back the inodes and open files the kernel holds from the journal"
            );
        }
    }
    let info = crate::control::MountInfo {
        source: cfg.source.clone(),
        endpoint: endpoint_name(&cfg),
        bucket: cfg.bucket.clone(),
        prefix: cfg.prefix.clone(),
        mountpoint: mountpoint.clone(),
        options: cfg.given_options.clone(),
        started: std::time::SystemTime::now(),
        // The pause ends about now: what is left to do before serving takes milliseconds.
        restarts: worker.as_mut().map_or(Vec::new(), |w| {
            w.served();
            w.restarts.clone()
        }),
        // SAFETY: getppid has no preconditions and cannot fail.
        supervisor: worker.is_some().then(|| unsafe { libc::getppid() } as u32),
    };
    let _control = crate::control::serve(
        rt.handle(),
        &crate::paths::runtime_base(),
        // The state directory's name: ID, or ID.2 for a second live mount of one source.
        &state
            .path
            .file_name()
            .map_or(cfg.id.0.clone(), |n| n.to_string_lossy().into_owned()),
        info,
        fs.clone(),
    )
    .map_err(|e| {
        Fatal::new(format!(
            "cannot create the control socket in {}: {e}",
            crate::paths::runtime_base().display()
        ))
    })?;
    if crate::metrics::enabled() {
        let fs = fs.clone();
        rt.spawn(async move {
            loop {
                crate::metrics::set_gauges(&fs.gauges());
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    let opts = kernel_options(&cfg);
    let session = match &worker {
        None => fuse::mount(fs.clone(), rt.handle().clone(), &mountpoint, &opts)
            .map_err(|e| mount_error(&e, &mountpoint))?,
        Some(w) => {
            let fd = w
                .fuse_fd
                .try_clone()
                .map_err(|e| Fatal::new(format!("cannot use the supervisor's connection: {e}")))?;
            fuse::serve_held(fs.clone(), rt.handle().clone(), fd, &opts, w.restart > 0).map_err(
                |e| {
                    Fatal::new(format!(
                        "cannot take over the mount on {} (asking the kernel to resend requests: {e})",
                        mountpoint.display()
                    ))
                },
            )?
        }
    };
    let serving = std::thread::Builder::new()
        .name("s3mount-fuse".into())
        .spawn(move || session.run())
        .map_err(|e| Fatal::new(format!("cannot start the request loop: {e}")))?;

    handle_upgrade_signal(&rt, fs.clone(), worker.is_some());
    // Unmount cleanly on SIGTERM/SIGINT once open files are closed (their uploads finish on
    // close); a second signal detaches at once. The request loop then ends by itself.
    let mp = mountpoint.clone();
    let busy_fs = fs.clone();
    rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(term), Ok(int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            return;
        };
        let mut signals = Signals { term, int };
        signals.next().await;
        tracing::info!(mountpoint = %mp.display(), "signal received, unmounting");
        let mut told = false;
        loop {
            match unmount(&mp, false) {
                Ok(()) => return,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    if !told {
                        let keys = busy_fs.open_keys();
                        let shown: Vec<&str> = keys.iter().take(10).map(String::as_str).collect();
                        tracing::warn!(
                            mountpoint = %mp.display(),
                            files_being_written = keys.len(),
                            keys = %shown.join(", "),
                            "mount busy: waiting for open files to be closed (signal again to detach now; `fuser -vm {}` names the processes)",
                            mp.display()
                        );
                        told = true;
                    }
                }
                Err(e) => {
                    tracing::error!(mountpoint = %mp.display(), "unmount failed: {e}");
                    return;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = signals.next() => {
                    tracing::warn!(mountpoint = %mp.display(), "second signal: detaching now");
                    if let Err(e) = unmount(&mp, true) {
                        tracing::error!(mountpoint = %mp.display(), "detach failed: {e}");
                    }
                    return;
                }
            }
        }
    });

    // The mount exists; wait until it answers before telling anyone it is live.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !mount_is_live(&mountpoint) {
        if serving.is_finished() || std::time::Instant::now() > deadline {
            return Err(Fatal::new(format!(
                "the mount on {} did not come up",
                mountpoint.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match &worker {
        None => report_ready(&cfg, &mountpoint, ready),
        Some(w) => {
            if w.restart == 0 {
                raise_readahead(&mountpoint, cfg.kernel_readahead_kb);
            }
            tracing::info!(source = %cfg.source, mountpoint = %mountpoint.display(), restart = w.restart, "serving (worker)");
            if let Ok(report) = w.report() {
                report.ready(&state.path);
            }
            if !cfg.foreground {
                detach_stdio();
            }
        }
    }
    let result = serving
        .join()
        .map_err(|_| Fatal::new("the request loop panicked"))?;
    // --write-back: the mount is gone, the uploads it queued are not; finish them first.
    let queued = fs.write_back_pending();
    if queued > 0 {
        tracing::info!(
            uploads = queued,
            "unmounted; finishing the uploads queued after close (--write-back)"
        );
        rt.block_on(fs.drain_write_back());
        tracing::info!("queued uploads finished");
    }
    sd_notify("STOPPING=1");
    tracing::info!(mountpoint = %mountpoint.display(), "unmounted; store traffic: {traffic}");
    rt.shutdown_timeout(Duration::from_secs(5));
    result.map_err(|e| Fatal::new(format!("request loop failed: {e}")))
}
