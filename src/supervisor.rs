//! A mount that outlives its worker (`--supervise`).
//!
//! Without it, the daemon that mounts also serves: when it dies (kill -9, a panic, the OOM
//! killer), every process using the mount gets "Transport endpoint is not connected" until
//! someone unmounts by hand. With it, two processes share the work:
//!
//! - the **supervisor** ([`run`]) mounts and keeps the kernel connection (the `/dev/fuse`
//!   descriptor, [`crate::fuse::HeldMount`]) and nothing else: no S3 client, no async runtime,
//!   a few MB. It starts a worker, reports the mount ready once the worker says it serves, and
//!   forwards SIGTERM, SIGINT, SIGHUP and SIGUSR2 to it. A worker that exits 0 was unmounted:
//!   the supervisor exits 0 too. One that dies any other way while the mount is still there is
//!   started again on the same connection, unless five died within a minute (then it gives
//!   up, logs why and unmounts) or the kernel cannot resend requests (before Linux 6.9: it
//!   unmounts, which is what a crash did before).
//! - the **worker** is this binary again, with the same arguments and [`WorkerEnv`] in its
//!   environment: `mount::run` does everything a daemon does except mount. It serves the held
//!   descriptor (`fuse::serve_held`) and journals its inodes and handles in the state
//!   directory (`fs/journal.rs`); a worker started after a death takes the same state
//!   directory, replays the journal, and asks the kernel for the requests its predecessor had
//!   read and not answered.
//!
//! Worker and supervisor talk over one pipe, a line per message: `ready\tSTATE_DIR` once the
//! worker serves, `fail\tCODE\tMESSAGE` if it cannot start (the supervisor then fails with that
//! message and exit status, as a daemon that cannot mount does).
//!
//! Under systemd (`$NOTIFY_SOCKET`), the supervisor also hands a copy of the connection to
//! systemd's file descriptor store (`FDSTORE=1`, the unit's `FileDescriptorStoreMax=`): when
//! the supervisor itself dies and systemd starts the service again, the new supervisor finds
//! the connection in `$LISTEN_FDS` ([`stored_connection`]) and, instead of mounting, starts a
//! worker on it as after a worker death. A clean end takes it out of the store again.

use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::fuse::HeldMount;
use crate::mount::{Fatal, ReadyPipe};

const ENV_FD: &str = "S3MOUNT_WORKER_FD";
const ENV_REPORT: &str = "S3MOUNT_WORKER_REPORT_FD";
const ENV_RESTART: &str = "S3MOUNT_WORKER_RESTART";
const ENV_STATE: &str = "S3MOUNT_WORKER_STATE";
const ENV_MOUNTPOINT: &str = "S3MOUNT_WORKER_MOUNTPOINT";
const ENV_HISTORY: &str = "S3MOUNT_WORKER_HISTORY";

/// The name of the connection in systemd's file descriptor store: `s3mount-fuse`, then `.`
/// and the state directory's name when it is a valid name there (no `:`, printable).
const FDNAME: &str = "s3mount-fuse";

/// A connection systemd kept for this service from its previous run.
pub struct StoredConnection {
    fd: OwnedFd,
    /// Its name in the store.
    name: String,
    /// The state directory the previous run used, from the name.
    state: Option<String>,
}

/// The connection systemd's file descriptor store passed this process (`$LISTEN_FDS`, named
/// `s3mount-fuse...` in `$LISTEN_FDNAMES`), if `mountpoint` is still a FUSE mount: the mount
/// survived the death of the previous supervisor and must be served again, not mounted. A
/// stored connection whose mount is gone is closed and taken out of the store. Called before
/// anything looks at the mount point: a `stat` of a mount nobody serves waits forever.
pub fn stored_connection(mountpoint: &Path) -> Option<StoredConnection> {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() }.to_string();
    if std::env::var("LISTEN_PID").ok()? != me {
        return None;
    }
    let count: i32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let (index, name) = names
        .split(':')
        .take(count.max(0) as usize)
        .enumerate()
        .find(|(_, n)| *n == FDNAME || n.starts_with(&format!("{FDNAME}.")))?;
    // sd_listen_fds(3): the descriptors start at 3, in the order of the names.
    let raw = 3 + index as i32;
    // SAFETY: fcntl on a descriptor number only reads its flags.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: systemd passed this descriptor to this process (LISTEN_PID is ours) and nothing
    // else here owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: setting close-on-exec on a descriptor we own.
    unsafe { libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) };
    let stored = StoredConnection {
        fd,
        name: name.to_string(),
        state: name.strip_prefix(&format!("{FDNAME}.")).map(str::to_string),
    };
    let mounted = crate::mount::mounted_fstype(mountpoint).is_some_and(|t| t.starts_with("fuse"));
    if !mounted {
        tracing::info!(
            "systemd kept the connection of a mount on {} that is gone: mounting again",
            mountpoint.display()
        );
        let _ = crate::mount::sd_notify_checked(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
        return None;
    }
    Some(stored)
}

impl StoredConnection {
    /// Give the kept mount up (a start with `--no-supervise` cannot serve it): out of the
    /// store, closed, and unmounted (lazily: nobody answers it).
    pub fn discard(self, mountpoint: &Path) {
        let _ = crate::mount::sd_notify_checked(&format!("FDSTOREREMOVE=1\nFDNAME={}", self.name));
        drop(self.fd);
        let _ = crate::mount::unmount(mountpoint, true);
    }
}

/// Keep a copy of the connection in systemd's store (under systemd only), named after the
/// state directory the workers use.
fn store_in_systemd(held: &HeldMount, state: &Path) -> Option<String> {
    let dir = state.file_name()?.to_str()?;
    let name = if dir.len() <= 200 && dir.chars().all(|c| c.is_ascii_graphic() && c != ':') {
        format!("{FDNAME}.{dir}")
    } else {
        FDNAME.to_string()
    };
    match crate::mount::sd_notify_with_fd(&format!("FDSTORE=1\nFDNAME={name}"), held.fd()) {
        Ok(true) => {
            tracing::debug!(name, "connection kept in systemd's file descriptor store");
            Some(name)
        }
        Ok(false) => None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot hand the connection to systemd's file descriptor store: a restart of the service will mount again");
            None
        }
    }
}

/// One worker death of this mount, for `s3mount status`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Restart {
    /// When the worker was found dead (Unix time, milliseconds).
    pub died_unix_ms: u64,
    /// How long the mount waited for the next worker; 0 until the worker that replaced it
    /// serves.
    pub pause_ms: u64,
    /// "killed by signal 9 (SIGKILL: ...)", "exit status 101".
    pub cause: String,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Deaths within [`DEATH_WINDOW`] after which the supervisor gives up
/// (`S3MOUNT_MAX_WORKER_DEATHS` changes it, for tests and benchmarks that kill workers).
const MAX_DEATHS: usize = 5;
const DEATH_WINDOW: Duration = Duration::from_secs(60);
/// How long a worker may take to start serving.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// What a worker process got from its supervisor.
pub struct WorkerEnv {
    /// The kernel connection to serve.
    pub fuse_fd: OwnedFd,
    /// 0 for the first worker of a mount, then 1, 2, ... after each death.
    pub restart: u32,
    /// The state directory the first worker took (every later one takes the same).
    pub state: Option<PathBuf>,
    /// The mount point, as the supervisor resolved it.
    pub mountpoint: Option<PathBuf>,
    /// The deaths of earlier workers of this mount, the last one this worker's reason to be.
    pub restarts: Vec<Restart>,
    report: WorkerReport,
}

/// The worker's side of the pipe to its supervisor.
pub struct WorkerReport(std::fs::File);

impl WorkerReport {
    /// The worker serves; its state directory is `state`.
    pub fn ready(&self, state: &Path) {
        self.say(&format!("ready\t{}", state.display()));
    }

    /// The worker cannot start: the supervisor fails with `message` and exit status `code`.
    pub fn failed(&self, message: &str, code: i32) {
        self.say(&format!("fail\t{code}\t{}", message.replace('\n', " ")));
    }

    fn say(&self, line: &str) {
        let _ = (&self.0).write_all(format!("{line}\n").as_bytes());
    }
}

impl WorkerEnv {
    /// In a worker process: what the supervisor passed (taken out of the environment, so
    /// nothing this process starts inherits it). `None` in any other process.
    pub fn from_env() -> Option<Result<WorkerEnv, String>> {
        let fd = std::env::var(ENV_FD).ok()?;
        let take = |name: &str| {
            let v = std::env::var(name).ok();
            std::env::remove_var(name);
            v
        };
        let (report, restart, state) = (take(ENV_REPORT), take(ENV_RESTART), take(ENV_STATE));
        let mountpoint = take(ENV_MOUNTPOINT).map(PathBuf::from);
        let restarts = take(ENV_HISTORY)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, '\t');
                Some(Restart {
                    died_unix_ms: f.next()?.parse().ok()?,
                    pause_ms: f.next()?.parse().ok()?,
                    cause: f.next()?.to_string(),
                })
            })
            .collect();
        std::env::remove_var(ENV_FD);
        Some((|| {
            let fuse_fd = inherited_fd(&fd)?;
            let report = inherited_fd(report.as_deref().unwrap_or(""))?;
            Ok(WorkerEnv {
                fuse_fd,
                restart: restart.and_then(|r| r.parse().ok()).unwrap_or(0),
                state: state.map(PathBuf::from),
                mountpoint,
                restarts,
                report: WorkerReport(std::fs::File::from(report)),
            })
        })())
    }

    /// This worker serves now: the pause its predecessor's death caused is known.
    pub fn served(&mut self) {
        if let Some(last) = self.restarts.last_mut() {
            if last.pause_ms == 0 {
                last.pause_ms = unix_ms().saturating_sub(last.died_unix_ms);
            }
        }
    }

    /// A handle on the pipe to the supervisor, to report a failure after `self` is used.
    pub fn report(&self) -> std::io::Result<WorkerReport> {
        Ok(WorkerReport(self.report.0.try_clone()?))
    }
}

/// A descriptor the supervisor left open across exec, by number.
fn inherited_fd(number: &str) -> Result<OwnedFd, String> {
    let fd: i32 = number
        .parse()
        .map_err(|_| format!("worker: bad descriptor number {number:?}"))?;
    // SAFETY: F_GETFD only reads the descriptor's flags; any number may be asked.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("worker: descriptor {fd} is not open"));
    }
    // SAFETY: the supervisor opened this descriptor for this process and nothing else in it
    // owns it (it is taken out of the environment once, here); checked open above.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Not to be inherited by what the worker starts.
    // SAFETY: F_SETFD on a descriptor this process owns.
    unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(owned)
}

/// Signals received and not forwarded yet, one bit each.
static PENDING: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    PENDING.fetch_or(1 << sig, Ordering::Relaxed);
}

const FORWARDED: [libc::c_int; 5] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGUSR2,
    // `s3mount upgrade`: the worker hands over to one started from the binary on disk now.
    libc::SIGUSR1,
];

/// The exit status of a worker that handed the mount over for an upgrade (SIGUSR1): start
/// the binary on disk now in its place, not counted as a death.
pub const EXIT_UPGRADE: i32 = 75;

fn catch_signals() {
    for sig in FORWARDED {
        // SAFETY: a zeroed sigaction with a handler that only does an atomic or (which is
        // async-signal-safe); the struct outlives the call.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Can this kernel resend requests a dead worker read (FUSE_NOTIFY_RESEND, Linux 6.9)?
fn kernel_resends() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 9)
}

/// One worker process and the lines it sends.
struct Worker {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

fn spawn_worker(
    exe: &Path,
    held: &HeldMount,
    mountpoint: &Path,
    argv: &[String],
    restart: u32,
    state: Option<&Path>,
    history: &[Restart],
) -> Result<Worker, Fatal> {
    let fail = |e: std::io::Error| Fatal::new(format!("cannot start the worker: {e}"));
    // Duplicates without close-on-exec: what the worker inherits.
    // SAFETY: dup of a descriptor the held mount keeps open.
    let fuse = unsafe { libc::dup(held.fd().as_raw_fd()) };
    if fuse < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    // SAFETY: dup just returned it; nothing else owns it.
    let fuse = unsafe { OwnedFd::from_raw_fd(fuse) };
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(fail)?;
    // SAFETY: dup of the pair's open end.
    let report = unsafe { libc::dup(theirs.as_raw_fd()) };
    if report < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    // SAFETY: dup just returned it; nothing else owns it.
    let report = unsafe { OwnedFd::from_raw_fd(report) };
    drop(theirs);
    let mut cmd = Command::new(exe);
    // A process group of its own: Ctrl-C in a terminal (`-f`) reaches the supervisor only, which
    // passes it on once; the worker getting it twice would take the second as "detach now".
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.args(&argv[1..])
        .env(ENV_FD, fuse.as_raw_fd().to_string())
        .env(ENV_REPORT, report.as_raw_fd().to_string())
        .env(ENV_RESTART, restart.to_string())
        .env(ENV_MOUNTPOINT, mountpoint)
        .env(
            ENV_HISTORY,
            history
                .iter()
                .map(|r| format!("{}\t{}\t{}\n", r.died_unix_ms, r.pause_ms, r.cause))
                .collect::<String>(),
        )
        .stdin(std::process::Stdio::null());
    if let Some(s) = state {
        cmd.env(ENV_STATE, s);
    }
    let child = cmd.spawn().map_err(fail)?;
    drop((fuse, report));
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(ours).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(Worker { child, lines })
}

/// Forward the signals received since the last call to the worker; true if one of them ends
/// the mount (SIGTERM, SIGINT).
fn forward_signals(worker: &Child) -> bool {
    let pending = PENDING.swap(0, Ordering::Relaxed);
    let mut ending = false;
    for sig in FORWARDED {
        if pending & (1 << sig) != 0 {
            if sig == libc::SIGUSR1 && !kernel_resends() {
                // The new worker could not take the requests in flight: it would not start.
                tracing::warn!("upgrade refused: handing a mount to a new worker needs Linux 6.9 or later (FUSE_NOTIFY_RESEND); unmount and mount again instead");
                continue;
            }
            // SAFETY: kill with our own child's pid and a valid signal number.
            unsafe { libc::kill(worker.id() as libc::pid_t, sig) };
            ending |= sig == libc::SIGTERM || sig == libc::SIGINT;
        }
    }
    ending
}

/// Wait for the worker to say it serves: Ok(its state directory), or why not (with the exit
/// status the worker chose for it: 2 for bad input, as an unsupervised mount exits).
fn wait_ready(w: &mut Worker) -> Result<PathBuf, Fatal> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        forward_signals(&w.child);
        match w.lines.recv_timeout(Duration::from_millis(50)) {
            Ok(line) => {
                if let Some(state) = line.strip_prefix("ready\t") {
                    return Ok(PathBuf::from(state));
                }
                if let Some(rest) = line.strip_prefix("fail\t") {
                    let _ = w.child.wait();
                    let (code, message) = match rest.split_once('\t') {
                        Some((c, m)) => (c.parse().unwrap_or(1), m),
                        None => (1, rest),
                    };
                    return Err(Fatal {
                        message: message.to_string(),
                        code,
                    });
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let status = w.child.wait().ok();
                return Err(Fatal::new(format!(
                    "the worker ended before it served the mount ({})",
                    status.map_or("?".into(), |s| cause(&s))
                )));
            }
        }
        if Instant::now() > deadline {
            let _ = w.child.kill();
            let _ = w.child.wait();
            return Err(Fatal::new(
                "the worker did not start serving within a minute",
            ));
        }
    }
}

/// "signal 9 (SIGKILL)", "exit status 101".
fn cause(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}{}", signal_name(s)),
        _ => "ended".into(),
    }
}

fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGKILL => " (SIGKILL: kill -9 or the OOM killer)",
        libc::SIGABRT => " (SIGABRT)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGTERM => " (SIGTERM)",
        _ => "",
    }
}

/// Takes the connection out of systemd's store when the supervisor ends (dropped).
struct Unstore(Option<String>);

impl Drop for Unstore {
    fn drop(&mut self) {
        if let Some(name) = &self.0 {
            let _ = crate::mount::sd_notify_checked(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
        }
    }
}

/// Mount, then keep a worker serving the mount until it is unmounted.
pub fn run(
    cfg: &Config,
    mountpoint: &Path,
    ready: Option<ReadyPipe>,
    argv: &[String],
    stored: Option<StoredConnection>,
) -> Result<(), Fatal> {
    catch_signals();
    // The binary's path now: a package upgrade replaces the file there, and `s3mount upgrade`
    // starts what is there then (the running binary's own link reads "(deleted)" by then).
    let exe = std::env::current_exe()
        .map_err(|e| Fatal::new(format!("cannot find this binary to start workers: {e}")))?;
    let resends = kernel_resends();
    if !resends {
        tracing::warn!("this kernel cannot resend the requests a dead worker was serving (Linux 6.9 or later can): a worker that dies unmounts, as a daemon crash does");
    }
    // The mount of the previous run, kept alive by systemd: served again, as after a worker
    // death (the journal in its state directory names what the kernel holds).
    let (held, first, state_hint, kept_as) = match stored {
        Some(c) => {
            tracing::warn!(name = %c.name, "the service was started again with the mount still in place (systemd kept its connection): serving it again");
            let state = c.state.map(|s| cfg.state_base.join(s));
            (HeldMount::inherited(c.fd), 1, state, Some(c.name))
        }
        None => {
            let opts = crate::mount::kernel_options(cfg);
            let held = crate::fuse::mount_held(mountpoint, &opts)
                .map_err(|e| crate::mount::mount_error(&e, mountpoint))?;
            (held, 0, None, None)
        }
    };
    let started = spawn_worker(
        &exe,
        &held,
        mountpoint,
        argv,
        first,
        state_hint.as_deref(),
        &[],
    )
    .and_then(|mut w| wait_ready(&mut w).map(|state| (w, state)));
    let (mut worker, state) = match started {
        Ok(w) => w,
        // A kept mount that cannot be served again: out of the store and unmounted, so that
        // the next start mounts afresh instead of failing the same way.
        Err(f) if first > 0 => {
            if let Some(name) = &kept_as {
                let _ = crate::mount::sd_notify_checked(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
            }
            let _ = crate::mount::unmount(mountpoint, true);
            return Err(f);
        }
        Err(f) => return Err(f),
    };
    crate::mount::report_ready(cfg, mountpoint, ready);
    let in_store = store_in_systemd(&held, &state);
    // Out of systemd's store at the end: a stopped service must not keep a dead connection.
    let _unstore = Unstore(in_store);
    tracing::info!(
        pid = worker.child.id(),
        "supervising the worker serving {}",
        mountpoint.display()
    );
    let max_deaths = std::env::var("S3MOUNT_MAX_WORKER_DEATHS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MAX_DEATHS)
        .max(1);
    let mut deaths: Vec<Instant> = Vec::new();
    let mut history: Vec<Restart> = Vec::new();
    let mut restarts = first;
    // The next worker, serving: Err(why not) if it did not start.
    let next_worker = |restarts: u32, history: &[Restart]| -> Result<Worker, String> {
        let mut w = spawn_worker(
            &exe,
            &held,
            mountpoint,
            argv,
            restarts,
            Some(&state),
            history,
        )
        .map_err(|f| f.message)?;
        wait_ready(&mut w).map(|_| w).map_err(|f| f.message)
    };
    let give_up = |why: &str, reason: &str| {
        tracing::error!(cause = %why, "the worker died; {reason}: unmounting {}", mountpoint.display());
        let _ = crate::mount::unmount(mountpoint, true);
        Err(Fatal::new(format!("the worker died ({why}); {reason}")))
    };
    loop {
        let ending = forward_signals(&worker.child);
        match worker.child.try_wait() {
            Ok(Some(status)) if status.success() => {
                tracing::info!("the worker ended after the unmount");
                held.unmounted();
                return Ok(());
            }
            Ok(Some(status)) => {
                // Handed over for `s3mount upgrade`, or died.
                let upgrade = status.code() == Some(EXIT_UPGRADE);
                let mut why = if upgrade {
                    "upgrade (handed over on request)".to_string()
                } else {
                    cause(&status)
                };
                let mounted = crate::mount::is_mounted(mountpoint);
                if !upgrade && (ending || !mounted) {
                    if !mounted {
                        held.unmounted();
                    }
                    return Err(Fatal::new(format!("the worker ended ({why})")));
                }
                let died = Instant::now();
                history.push(Restart {
                    died_unix_ms: unix_ms(),
                    pause_ms: 0,
                    cause: why.clone(),
                });
                // A new worker; one that dies before it serves counts as another death.
                loop {
                    if !upgrade {
                        let now = Instant::now();
                        deaths.retain(|t| now.duration_since(*t) < DEATH_WINDOW);
                        deaths.push(now);
                        if !resends {
                            return give_up(
                                &why,
                                "this kernel cannot hand a dead worker's requests to a new one",
                            );
                        }
                        if deaths.len() >= max_deaths {
                            return give_up(
                                &why,
                                &format!("{max_deaths} workers died within a minute"),
                            );
                        }
                        tracing::warn!(cause = %why, restart = restarts + 1, "the worker died; starting a new one on the same mount");
                    }
                    restarts += 1;
                    match next_worker(restarts, &history) {
                        Ok(w) => {
                            worker = w;
                            break;
                        }
                        Err(e) if upgrade => {
                            return give_up(
                                &why,
                                &format!("the upgraded worker did not start: {e}"),
                            )
                        }
                        Err(e) => why = format!("a new worker did not start: {e}"),
                    }
                }
                let pause = died.elapsed().as_millis() as u64;
                if let Some(last) = history.last_mut() {
                    last.pause_ms = pause;
                    last.cause = why.clone();
                }
                tracing::warn!(
                    restart = restarts,
                    cause = %why,
                    pause_ms = pause,
                    "worker restarted{}: the mount paused for {pause} ms",
                    if upgrade { format!(" from {}", exe.display()) } else { String::new() }
                );
            }
            // A death is seen within 20 ms (part of the pause an application sees).
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(Fatal::new(format!("cannot watch the worker: {e}"))),
        }
    }
}
