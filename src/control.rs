//! `s3mount status`: each mount serves a one-request control socket
//! (`RUNTIME_DIR/ID.sock`, in a 0700 directory: see [`crate::paths`]) that answers `status` with
//! a JSON [`MountStatus`]; the `status` command asks every socket of the user (or the one of a
//! mount point), prints what it hears, and finds mounts that no longer answer. Exit status: 0
//! healthy, 1 when a commit failed since a mount started, 2 when a mount is dead or unreachable
//! (or the mount point asked about is not an s3mount mount).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::fs::status::FsStatus;
use crate::fs::Fs;

/// What a mount says about itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountStatus {
    pub version: String,
    pub pid: u32,
    pub source: String,
    pub endpoint: String,
    pub bucket: String,
    pub prefix: String,
    pub mountpoint: String,
    /// Options given on the command line or in the environment (defaults left out).
    pub options: Vec<String>,
    pub started_unix: u64,
    pub uptime_seconds: u64,
    pub rss_bytes: u64,
    /// A supervised mount: the workers of this mount that died and were replaced.
    #[serde(default)]
    pub worker_restarts: Vec<crate::supervisor::Restart>,
    /// A supervised mount: the process holding the mount (`pid` is the worker serving it).
    #[serde(default)]
    pub supervisor_pid: Option<u32>,
    /// The filesystem's own report (open files, failed commits, memory, caches).
    pub fs: FsStatus,
}

/// What is fixed for the life of a mount.
#[derive(Clone, Debug)]
pub struct MountInfo {
    pub source: String,
    pub endpoint: String,
    pub bucket: String,
    pub prefix: String,
    pub mountpoint: PathBuf,
    pub options: Vec<String>,
    pub started: SystemTime,
    pub restarts: Vec<crate::supervisor::Restart>,
    /// The supervisor's pid when this process is a worker of a supervised mount.
    pub supervisor: Option<u32>,
}

fn snapshot(info: &MountInfo, fs: &Fs) -> MountStatus {
    let fs_status: FsStatus = fs.status();
    MountStatus {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        source: info.source.clone(),
        endpoint: info.endpoint.clone(),
        bucket: info.bucket.clone(),
        prefix: info.prefix.clone(),
        mountpoint: info.mountpoint.display().to_string(),
        options: info.options.clone(),
        started_unix: info
            .started
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        uptime_seconds: info.started.elapsed().map_or(0, |d| d.as_secs()),
        rss_bytes: crate::metrics::rss_bytes(),
        worker_restarts: info.restarts.clone(),
        supervisor_pid: info.supervisor,
        fs: fs_status,
    }
}

/// The control socket of a live mount; removed when dropped.
pub struct ControlSocket {
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listen on `dir/NAME.sock` (the directory made 0700) and answer status requests on `rt`.
pub fn serve(
    rt: &tokio::runtime::Handle,
    dir: &Path,
    name: &str,
    info: MountInfo,
    fs: Arc<Fs>,
) -> std::io::Result<ControlSocket> {
    crate::paths::private_dir(dir)?;
    let path = dir.join(format!("{name}.sock"));
    // A socket left by a daemon that died: nothing answers it any more.
    if path.exists() && std::os::unix::net::UnixStream::connect(&path).is_err() {
        let _ = std::fs::remove_file(&path);
    }
    let _guard = rt.enter();
    let listener = tokio::net::UnixListener::bind(&path)?;
    rt.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let info = info.clone();
            let fs = fs.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
                let (rd, mut wr) = stream.into_split();
                let mut line = String::new();
                let mut rd = tokio::io::BufReader::new(rd);
                let read = tokio::time::timeout(Duration::from_secs(5), rd.read_line(&mut line));
                if !matches!(read.await, Ok(Ok(_))) {
                    return;
                }
                let answer = match line.trim() {
                    "status" => serde_json::to_string(&snapshot(&info, &fs))
                        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
                    other => serde_json::json!({ "error": format!("unknown request '{other}'") })
                        .to_string(),
                };
                let _ = wr.write_all(answer.as_bytes()).await;
                let _ = wr.write_all(b"\n").await;
            });
        }
    });
    Ok(ControlSocket { path })
}

/// Ask the mount behind `socket` for its status.
fn ask(socket: &Path) -> std::io::Result<MountStatus> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"status\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}

/// s3mount mounts in /proc/self/mountinfo: (mount point, source).
fn mounted_here() -> Vec<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            if fields.get(sep + 1) != Some(&"fuse.s3mount") {
                return None;
            }
            let mp = String::from_utf8_lossy(&crate::mount::unescape_mountinfo(fields.get(4)?))
                .into_owned();
            Some((mp, fields.get(sep + 2).unwrap_or(&"").to_string()))
        })
        .collect()
}

/// The `status` subcommand's options.
#[derive(clap::Parser, Debug)]
#[command(
    name = "s3mount status",
    about = "Show the state of s3mount mounts: uploads in progress, failed commits, memory and cache use",
    after_help = "Exit status: 0 healthy, 1 a commit failed since the mount started, 2 a mount is dead or unreachable."
)]
pub struct StatusCli {
    /// Only this mount point (default: every s3mount mount of this user)
    pub mountpoint: Option<PathBuf>,
    /// Print one JSON object: {"mounts": [reports], "dead": [...], "others": [...]}
    #[arg(long)]
    pub json: bool,
}

/// Run `s3mount status`; returns the exit status.
pub fn status_command(args: &[String]) -> i32 {
    use clap::Parser;
    let argv = std::iter::once("s3mount status".to_string()).chain(args.iter().skip(1).cloned());
    let cli = match StatusCli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let want = cli
        .mountpoint
        .as_ref()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()));
    let dir = crate::paths::runtime_base();
    let mut reports = Vec::new();
    let mut dead: Vec<String> = Vec::new();
    let mut sockets: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect()
        })
        .unwrap_or_default();
    sockets.sort();
    for sock in sockets {
        match ask(&sock) {
            Ok(s) => {
                if want.as_ref().is_none_or(|w| Path::new(&s.mountpoint) == w) {
                    reports.push(s);
                }
            }
            // Nothing listens: the daemon is gone (a dead mount shows below, from the mount
            // table); the socket file is only a leftover.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                let _ = std::fs::remove_file(&sock);
            }
            Err(e) if want.is_none() => {
                dead.push(format!("{}: not answering ({e})", sock.display()));
            }
            Err(_) => {}
        }
    }
    // Mounts the kernel still has whose daemon no socket here speaks for: dead when the
    // kernel says so (ENOTCONN); otherwise another user's (or another runtime directory's).
    let mut others = Vec::new();
    for (mp, source) in mounted_here() {
        let answered = reports.iter().any(|r| r.mountpoint == mp);
        let wanted = want.as_ref().is_none_or(|w| Path::new(&mp) == w);
        if answered || !wanted {
            continue;
        }
        if crate::mount::statfs_errno(Path::new(&mp)) == Some(libc::ENOTCONN) {
            dead.push(format!(
                "{mp} ({source}): the daemon died (\"transport endpoint is not connected\"); \
                 `umount -l {mp}` and mount again"
            ));
        } else {
            others.push(format!("{mp} ({source})"));
        }
    }
    if let (Some(w), true, true) = (&want, reports.is_empty(), dead.is_empty()) {
        if !others.is_empty() {
            eprintln!(
                "s3mount: {} is an s3mount mount this user's status cannot reach (another user's?)",
                w.display()
            );
            return 2;
        }
        eprintln!("s3mount: {} is not an s3mount mount point", w.display());
        return 2;
    }
    let failed = reports.iter().any(|r| !r.fs.failed_commits.is_empty());
    if cli.json {
        let out = serde_json::json!({ "mounts": reports, "dead": dead, "others": others });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        if reports.is_empty() && dead.is_empty() {
            println!("no s3mount mounts of this user");
        }
        for r in &reports {
            print_report(r);
        }
        for d in &dead {
            println!("DEAD {d}");
        }
        for o in &others {
            println!(
                "other {o}: not this user's (no control socket in {})",
                dir.display()
            );
        }
    }
    if !dead.is_empty() {
        2
    } else if failed {
        1
    } else {
        0
    }
}

/// The report of the live mount on `mountpoint` (canonical), if one of this user's answers.
fn report_of(mountpoint: &Path) -> Option<MountStatus> {
    let dir = crate::paths::runtime_base();
    std::fs::read_dir(&dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .filter_map(|sock| ask(&sock).ok())
        .find(|s| Path::new(&s.mountpoint) == mountpoint)
}

/// The `upgrade` subcommand's options.
#[derive(clap::Parser, Debug)]
#[command(
    name = "s3mount upgrade",
    about = "Hand a supervised mount (the default) to a worker started from the s3mount binary installed now, without unmounting",
    after_help = "The worker serving the mount hands over once every file open for writing can go on in the new one (its bytes all on local disk; it waits for the others and for queued --write-back uploads); requests in flight are resent to the new one (Linux 6.9 or later). Exit status: 0 handed over, 1 it did not happen within the time, 2 not a supervised s3mount mount."
)]
pub struct UpgradeCli {
    /// The mount point
    pub mountpoint: PathBuf,
    /// Seconds to wait for the hand-over (files being written delay it)
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

/// Run `s3mount upgrade`; returns the exit status.
pub fn upgrade_command(args: &[String]) -> i32 {
    use clap::Parser;
    let argv = std::iter::once("s3mount upgrade".to_string()).chain(args.iter().skip(1).cloned());
    let cli = match UpgradeCli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let mp = std::fs::canonicalize(&cli.mountpoint).unwrap_or(cli.mountpoint.clone());
    let Some(before) = report_of(&mp) else {
        eprintln!(
            "s3mount: {} is not a live s3mount mount of this user",
            mp.display()
        );
        return 2;
    };
    let Some(supervisor) = before.supervisor_pid else {
        eprintln!(
            "s3mount: {} was mounted with --no-supervise: unmount it and mount it again to run the new binary",
            mp.display()
        );
        return 2;
    };
    // SAFETY: kill(2) with a pid and a valid signal; no memory is involved.
    if unsafe { libc::kill(supervisor as libc::pid_t, libc::SIGUSR1) } != 0 {
        eprintln!(
            "s3mount: cannot signal the supervisor (pid {supervisor}): {}",
            std::io::Error::last_os_error()
        );
        return 2;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(cli.timeout);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(now) = report_of(&mp) {
            if now.pid != before.pid && now.worker_restarts.len() > before.worker_restarts.len() {
                let pause = now.worker_restarts.last().map_or(0, |r| r.pause_ms);
                println!(
                    "{}: worker {} ({}) handed over to {} ({}); the mount paused {pause} ms",
                    mp.display(),
                    before.pid,
                    before.version,
                    now.pid,
                    now.version
                );
                return 0;
            }
        }
    }
    eprintln!(
        "s3mount: {} was not handed over within {} s (files still being written? see `s3mount status`)",
        mp.display(),
        cli.timeout
    );
    1
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn print_report(r: &MountStatus) {
    let fs = &r.fs;
    println!(
        "{} on {} (pid {}, up {} s)",
        r.source, r.mountpoint, r.pid, r.uptime_seconds
    );
    let prefix = if r.prefix.is_empty() {
        "(none)"
    } else {
        &r.prefix
    };
    println!(
        "  endpoint:  {}  bucket: {}  prefix: {prefix}",
        r.endpoint, r.bucket
    );
    if !r.options.is_empty() {
        println!("  options:   {}", r.options.join(" "));
    }
    if let Some(last) = r.worker_restarts.last() {
        let ago = std::time::SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
            .saturating_sub(last.died_unix_ms)
            / 1000;
        println!(
            "  worker:    restarted {} times; last {} s ago ({}), the mount paused {} ms",
            r.worker_restarts.len(),
            ago,
            last.cause,
            last.pause_ms
        );
    }
    println!(
        "  store:     checksums {}, conditional writes {}",
        if fs.checksums {
            "on"
        } else {
            "off (refused by the store)"
        },
        if fs.conditional_writes { "on" } else { "off" }
    );
    println!(
        "  memory:    {} of {} budget in use, {} cached; RSS {}",
        human(fs.budget_used),
        human(fs.budget_limit),
        human(fs.memory_cache_bytes),
        human(r.rss_bytes)
    );
    if let Some(b) = fs.disk_cache_bytes {
        println!(
            "  disk cache: {} in {} blocks",
            human(b),
            fs.disk_cache_blocks.unwrap_or(0)
        );
    }
    println!(
        "  staging:   {} files, {} in {}",
        fs.staged_files,
        human(fs.staged_bytes),
        fs.staging_dir
    );
    if fs.write_back_pending > 0 {
        println!(
            "  write-back: {} uploads queued after close",
            fs.write_back_pending
        );
    }
    if fs.open_files.is_empty() {
        println!("  open files: none being written");
    }
    for f in &fs.open_files {
        let rate = match f.upload_rate {
            0 => String::new(),
            r => format!(" at {}/s", human(r)),
        };
        println!(
            "  open:      {} [{}] {} written, {} uploaded{rate}, {} descriptor(s)",
            f.key,
            f.state,
            human(f.pending_bytes),
            human(f.uploaded_bytes),
            f.descriptors
        );
    }
    for f in &fs.failed_commits {
        let kept = f
            .kept
            .as_ref()
            .map(|k| format!(" (data kept at {k})"))
            .unwrap_or_default();
        println!("  FAILED:    {}: {}{kept}", f.key, f.error);
    }
}
