//! Benchmark: s3mount against a plain S3 client on the same local Garage server, same run.
//!
//! `cargo run --release --example bench -- [--size-mib 2048] [--files 1000] [--soak-seconds 30]
//!  [--random-reads 2000] [--cold-repeats 3] [--skip-random] [--skip-ttfb] [--skip-listings]
//!  [--skip-readers] [--skip-disk-cache]`
//!
//! Starts Garage (with an LD_PRELOAD shim forcing TCP_NODELAY on its sockets), then measures:
//! a plain parallel multipart PUT, `dd bs=1M` into the mount (close included), a plain parallel
//! ranged GET, a cold `dd` read after a remount, a warm re-read, a re-read with every other 64 KiB
//! dropped from the page cache, more cold-read pairs (median),
//! the same with the server pinned to its own CPU, small-file creation, random 4 KiB
//! reads (IOPS, latency, and the bytes the daemon fetched for them), time to first byte (small
//! files and the large object), listings of 10,000 entries, 32 concurrent readers, and a re-read
//! from the disk cache; each mount figure is printed next to the plain client's, with the ratio
//! s3mount speed / plain speed (higher is better), and the daemon's peak RSS. Machines here are
//! noisy: compare ratios, not absolute numbers.
//!
//! The daemon is `$CARGO_TARGET_DIR/release/s3mount` (default `target/` in this crate): build it
//! first with `cargo build --release`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use futures::StreamExt;

mod report;
mod workloads;

const KEY: &str = "GK31c2f218a2e44f485b94239e";
const SECRET: &str = "b892c0665f0ada8a4755dae98baa3b133590e11dae3bcc1f9d769d67f16c3835";

/// The daemon's default `--max-memory`, printed next to its peak RSS.
const BUDGET_MIB: u64 = 512;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn garage_bin() -> PathBuf {
    std::env::var("GARAGE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
            let p = Path::new(&home).join(".cargo/bin/garage");
            if p.exists() {
                p
            } else {
                PathBuf::from("garage")
            }
        })
}

/// The release daemon: `$CARGO_TARGET_DIR/release/s3mount`, else `target/release/s3mount` in
/// this crate.
fn s3mount_bin() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("release/s3mount")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Garage {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_garage(shim: &Path) -> Garage {
    let dir = tempfile::tempdir().unwrap();
    let (s3, rpc) = (free_port(), free_port());
    let cfg = dir.path().join("garage.toml");
    std::fs::write(
        &cfg,
        format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\nreplication_factor = 1\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_secret = \"4425f5c26c5e11581d3223904324dcb5b5d5dfb14e5e7f35e38c595424f5f1e6\"\n\
             [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    let bin = garage_bin();
    let child = Command::new(&bin)
        .arg("-c")
        .arg(&cfg)
        .arg("server")
        .env("LD_PRELOAD", shim)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start garage");
    let g = |args: &[&str]| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new(&bin)
                .arg("-c")
                .arg(&cfg)
                .args(args)
                .output()
                .unwrap();
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            assert!(
                Instant::now() < deadline,
                "garage {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let node = g(&["node", "id", "-q"]);
    let node = node.trim().split('@').next().unwrap().to_string();
    g(&["layout", "assign", "-z", "dc1", "-c", "10G", &node]);
    g(&["layout", "apply", "--version", "1"]);
    g(&["key", "import", "--yes", "-n", "bench", KEY, SECRET]);
    g(&["bucket", "create", "bench"]);
    g(&[
        "bucket", "allow", "--read", "--write", "--owner", "bench", "--key", "bench",
    ]);
    Garage {
        child,
        endpoint: format!("http://127.0.0.1:{s3}"),
        _dir: dir,
    }
}

fn client(endpoint: &str) -> Client {
    let creds = aws_sdk_s3::config::Credentials::new(KEY, SECRET, None, None, "bench");
    Client::from_conf(
        aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("garage"))
            .endpoint_url(endpoint)
            .credentials_provider(creds)
            .force_path_style(true)
            // Garage has been seen, rarely, to stop answering one connection mid-upload (the
            // client had sent every byte): an attempt that hangs is retried on a new one.
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(Duration::from_secs(60))
                    .build(),
            )
            .build(),
    )
}

const PART: usize = 8 << 20;
const PARALLEL: usize = 8;
const BLOCK: usize = 4096;

async fn plain_put(c: &Client, key: &str, data: &[u8]) -> Duration {
    let t = Instant::now();
    let id = c
        .create_multipart_upload()
        .bucket("bench")
        .key(key)
        .send()
        .await
        .unwrap()
        .upload_id()
        .unwrap()
        .to_string();
    let parts: Vec<CompletedPart> = futures::stream::iter(data.chunks(PART).enumerate())
        .map(|(i, chunk)| {
            let (c, id, body) = (c.clone(), id.clone(), bytes::Bytes::copy_from_slice(chunk));
            async move {
                let n = i as i32 + 1;
                let out = c
                    .upload_part()
                    .bucket("bench")
                    .key(key)
                    .upload_id(&id)
                    .part_number(n)
                    .body(ByteStream::from(body))
                    .send()
                    .await
                    .unwrap();
                CompletedPart::builder()
                    .part_number(n)
                    .e_tag(out.e_tag().unwrap())
                    .build()
            }
        })
        .buffered(PARALLEL)
        .collect()
        .await;
    c.complete_multipart_upload()
        .bucket("bench")
        .key(key)
        .upload_id(&id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .unwrap();
    t.elapsed()
}

/// Single PUTs of `body` to every key, `parallel` at a time; returns the wall time.
async fn plain_put_many(c: &Client, keys: Vec<String>, body: &[u8], parallel: usize) -> Duration {
    let body = bytes::Bytes::copy_from_slice(body);
    let t = Instant::now();
    futures::stream::iter(keys)
        .map(|key| {
            let (c, body) = (c.clone(), body.clone());
            async move {
                c.put_object()
                    .bucket("bench")
                    .key(key)
                    .body(ByteStream::from(body))
                    .send()
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(parallel)
        .collect::<Vec<_>>()
        .await;
    t.elapsed()
}

/// One GET of `range` (an HTTP Range header value, or the whole object), body drained; returns
/// the body length.
async fn plain_get_range(c: &Client, key: &str, range: Option<String>) -> usize {
    plain_get_timed(c, key, range).await.0
}

/// One GET of `range` (or the whole object), body drained; returns the body length and the time
/// from sending the request to the first body byte.
async fn plain_get_timed(c: &Client, key: &str, range: Option<String>) -> (usize, Duration) {
    let t = Instant::now();
    let mut out = c
        .get_object()
        .bucket("bench")
        .key(key)
        .set_range(range)
        .send()
        .await
        .unwrap();
    let (mut n, mut first) = (0, None);
    while let Some(chunk) = out.body.next().await {
        let len = chunk.unwrap().len();
        if len > 0 && first.is_none() {
            first = Some(t.elapsed());
        }
        n += len;
    }
    (n, first.unwrap_or_else(|| t.elapsed()))
}

async fn plain_get(c: &Client, key: &str, size: usize) -> Duration {
    let t = Instant::now();
    let total: usize = futures::stream::iter((0..size).step_by(PART))
        .map(|start| {
            let end = (start + PART).min(size) - 1;
            plain_get_range(c, key, Some(format!("bytes={start}-{end}")))
        })
        .buffered(PARALLEL)
        .fold(0, |a, b| async move { a + b })
        .await;
    assert_eq!(total, size);
    t.elapsed()
}

/// A ListObjectsV2 walk of `prefix` over all pages; returns the time and the number of entries
/// (objects plus common prefixes).
async fn plain_list(c: &Client, prefix: &str, delimiter: Option<&str>) -> (Duration, usize) {
    let t = Instant::now();
    let (mut token, mut entries) = (None, 0);
    loop {
        let p = c
            .list_objects_v2()
            .bucket("bench")
            .prefix(prefix)
            .set_delimiter(delimiter.map(str::to_string))
            .set_continuation_token(token)
            .send()
            .await
            .unwrap();
        entries += p.contents().len() + p.common_prefixes().len();
        token = p.next_continuation_token().map(str::to_string);
        if token.is_none() {
            return (t.elapsed(), entries);
        }
    }
}

/// The request counts and bytes the daemon logs at unmount ("... store traffic: A LIST, B HEAD,
/// C GET, D PUT/part, E other requests; F bytes fetched, G bytes uploaded").
#[derive(Debug, Default)]
struct Traffic {
    list: u64,
    head: u64,
    get: u64,
    put: u64,
    other: u64,
    fetched: u64,
    uploaded: u64,
}

impl Traffic {
    /// The last store-traffic line of a daemon log, if there is one.
    fn parse(log: &str) -> Option<Traffic> {
        let line = log.lines().rev().find(|l| l.contains("store traffic:"))?;
        let words: Vec<&str> = line
            .split("store traffic:")
            .nth(1)?
            .split(|c: char| c == ',' || c == ';' || c.is_whitespace())
            .filter(|w| !w.is_empty())
            .collect();
        let mut t = Traffic::default();
        let mut seen = 0;
        for w in words.windows(3) {
            let Ok(n) = w[0].parse::<u64>() else { continue };
            let slot = match (w[1], w[2]) {
                ("LIST", _) => &mut t.list,
                ("HEAD", _) => &mut t.head,
                ("GET", _) => &mut t.get,
                ("PUT/part", _) => &mut t.put,
                ("other", _) => &mut t.other,
                ("bytes", "fetched") => &mut t.fetched,
                ("bytes", "uploaded") => &mut t.uploaded,
                _ => continue,
            };
            *slot = n;
            seen += 1;
        }
        (seen == 7).then_some(t)
    }

    /// "A LIST, B HEAD, C GET, D other" from a daemon log, or why not.
    fn summary(log: &str) -> String {
        match Traffic::parse(log) {
            Some(t) => format!(
                "{} LIST, {} HEAD, {} GET, {} PUT/part, {} other requests",
                t.list, t.head, t.get, t.put, t.other
            ),
            None => "n/a (no traffic line in log)".into(),
        }
    }
}

/// Which filesystem the benchmark mounts: s3mount, or a peer with its documented options and
/// the same metadata caching time (30 s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Daemon {
    S3mount,
    /// s3mount with `--write-back` (close returns once the bytes are on local disk).
    S3mountWriteBack,
    S3fs,
    Rclone,
}

impl Daemon {
    fn name(self) -> &'static str {
        match self {
            Daemon::S3mount => "s3mount",
            Daemon::S3mountWriteBack => "s3mount --write-back",
            Daemon::S3fs => "s3fs",
            Daemon::Rclone => "rclone",
        }
    }

    /// s3mount, with or without --write-back.
    fn is_s3mount(self) -> bool {
        matches!(self, Daemon::S3mount | Daemon::S3mountWriteBack)
    }

    /// The command that mounts the bench bucket on `dir` in the foreground.
    fn command(self, endpoint: &str, dir: &Path, log: &Path, work: &Path) -> Command {
        match self {
            Daemon::S3mount | Daemon::S3mountWriteBack => {
                let mut c = Command::new(s3mount_bin());
                if self == Daemon::S3mountWriteBack {
                    c.arg("--write-back");
                }
                c.args([
                    "bench",
                    dir.to_str().unwrap(),
                    "-f",
                    "--endpoint-url",
                    endpoint,
                    "--region",
                    "garage",
                    "--force-path-style",
                    "--log-file",
                    log.to_str().unwrap(),
                ]);
                c
            }
            Daemon::S3fs => {
                let pw = work.join("passwd-s3fs");
                std::fs::write(&pw, format!("{KEY}:{SECRET}\n")).unwrap();
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
                let mut c = Command::new("s3fs");
                c.arg("bench").arg(dir).arg("-f").arg("-o").arg(format!(
                    "url={endpoint},use_path_request_style,endpoint=garage,passwd_file={},\
                     stat_cache_expire=30,enable_noobj_cache,parallel_count=8,multipart_size=8",
                    pw.display()
                ));
                c
            }
            Daemon::Rclone => {
                let mut c = Command::new("rclone");
                c.args(["mount", ":s3:bench"])
                    .arg(dir)
                    .args([
                        "--s3-provider",
                        "Other",
                        "--s3-endpoint",
                        endpoint,
                        "--s3-region",
                        "garage",
                        "--s3-access-key-id",
                        KEY,
                        "--s3-secret-access-key",
                        SECRET,
                        "--s3-force-path-style",
                        "--vfs-cache-mode",
                        "writes",
                        "--dir-cache-time",
                        "30s",
                        "--attr-timeout",
                        "30s",
                        "--cache-dir",
                    ])
                    .arg(work.join("rclone-cache"))
                    // rclone 1.60 refuses AWS_CA_BUNDLE on its own transport ("unsupported
                    // transport"); the bench endpoint is plain HTTP anyway.
                    .env_remove("AWS_CA_BUNDLE");
                c
            }
        }
    }
}

/// A delay line between the mount (and the plain client) and the server: every chunk each
/// way is held for `one_way` and then sent, so a round trip costs twice that, without limiting
/// bandwidth (this kernel has no netem qdisc). Returns the endpoint to use instead.
fn start_delay_line(rt: &tokio::runtime::Runtime, upstream: &str, one_way: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up: std::net::SocketAddr = upstream
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    async fn pipe(
        mut r: tokio::net::tcp::OwnedReadHalf,
        mut w: tokio::net::tcp::OwnedWriteHalf,
        d: Duration,
    ) {
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        let writer = tokio::spawn(async move {
            while let Some((at, buf)) = rx.recv().await {
                tokio::time::sleep_until(at + d).await;
                if w.write_all(&buf).await.is_err() {
                    break;
                }
            }
            let _ = w.shutdown().await;
        });
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((tokio::time::Instant::now(), buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        drop(tx);
        let _ = writer.await;
    }
    rt.spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(up).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::join!(pipe(cr, sw, one_way), pipe(sr, cw, one_way));
            });
        }
    });
    format!("http://127.0.0.1:{port}")
}

/// A running daemon, mounted in the foreground on `dir`; unmounted (umount, then wait) on drop.
struct Mounted {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
}

fn is_mounted(dir: &Path) -> bool {
    let needle = format!(" {} ", dir.display());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(&needle)
}

impl Mounted {
    /// Mounts the bench bucket on `dir` with extra options, logging to `log` (given as
    /// `--log-file`, and stderr goes there too since a foreground daemon logs to stderr).
    /// Err(what the daemon said) if it exits before the mount comes up.
    fn start(
        daemon: Daemon,
        endpoint: &str,
        dir: &Path,
        log: &Path,
        extra: &[&str],
    ) -> Result<Mounted, String> {
        let bin = s3mount_bin();
        assert!(
            !daemon.is_s3mount() || bin.exists(),
            "{} is missing: build the release binary first (cargo build --release)",
            bin.display()
        );
        if !daemon.is_s3mount() && !extra.is_empty() {
            return Err(format!("{extra:?} are s3mount options"));
        }
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let work = log.parent().unwrap_or(Path::new("/tmp"));
        let mut child = daemon
            .command(endpoint, dir, log, work)
            .args(extra)
            .env("AWS_ACCESS_KEY_ID", KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(dir) {
            let said = || std::fs::read_to_string(log).unwrap_or_default();
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "{} exited ({status}): {}",
                    daemon.name(),
                    said().trim()
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("mount did not come up: {}", said().trim()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Mounted {
            child,
            dir: dir.to_path_buf(),
            log: log.to_path_buf(),
        })
    }

    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    }

    /// Unmount and return the daemon's log (also copied into $BENCH_KEEP_LOGS when set, e.g.
    /// with S3MOUNT_LOG=s3mount=debug to see every request and its time).
    fn finish(self) -> String {
        let log = self.log.clone();
        drop(self);
        std::fs::read_to_string(log).unwrap_or_default()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = self.child.wait();
        if let Some(keep) = std::env::var_os("BENCH_KEEP_LOGS") {
            let _ = std::fs::create_dir_all(&keep);
            let name = self.log.file_name().unwrap_or_default();
            let _ = std::fs::copy(&self.log, Path::new(&keep).join(name));
        }
    }
}

/// What every measurement needs: the server, a client, a runtime, the mount point.
struct Bench {
    rt: tokio::runtime::Runtime,
    c: Client,
    endpoint: String,
    garage_pid: u32,
    work: PathBuf,
    mnt: PathBuf,
    mounts: AtomicUsize,
    daemon: Daemon,
}

impl Bench {
    /// A fresh mount on `mnt` with its own log file.
    fn try_mount(&self, extra: &[&str]) -> Result<Mounted, String> {
        let n = self.mounts.fetch_add(1, Ordering::Relaxed);
        let log = self.work.join(format!("mount-{n}.log"));
        Mounted::start(self.daemon, &self.endpoint, &self.mnt, &log, extra)
    }

    fn mount(&self) -> Mounted {
        self.try_mount(&[]).unwrap_or_else(|e| panic!("{e}"))
    }
}

fn timed_sh_output(cmd: &str) -> (Duration, String) {
    let t = Instant::now();
    let out = run(Command::new("sh").arg("-c").arg(cmd));
    (t.elapsed(), out)
}

fn timed_sh(cmd: &str) -> Duration {
    timed_sh_output(cmd).0
}

/// CPUs online, whatever this process's own affinity.
fn cpus_online() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize
}

/// Restrict every thread of `pid` to `cpus` (all CPUs when empty); threads they start later
/// inherit it. Best effort: a thread that ended meanwhile is skipped.
fn pin(pid: u32, cpus: &[usize]) {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let all: Vec<usize> = (0..cpus_online()).collect();
    for &c in if cpus.is_empty() { &all[..] } else { cpus } {
        // SAFETY: c < CPU_SETSIZE for any machine this runs on; CPU_SET checks it anyway.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        if let Some(tid) = t.file_name().to_str().and_then(|t| t.parse::<i32>().ok()) {
            // SAFETY: the set outlives the call and its size is passed.
            unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
        }
    }
}

/// Drop every other `chunk` of `path` from the kernel's page cache (the rest stays cached).
fn drop_every_other(path: &Path, chunk: u64) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut ok = true;
    let mut at = 0;
    while at < len {
        // SAFETY: a valid descriptor, offsets within the file; advice only, nothing is written.
        let r = unsafe {
            libc::posix_fadvise(
                f.as_raw_fd(),
                at as libc::off_t,
                chunk as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        ok &= r == 0;
        at += 2 * chunk;
    }
    ok
}

/// One cold read of the big object by the plain client and one through a fresh mount, back to
/// back: the time of each and the CPU seconds of the client side and of Garage during each.
struct ColdPair {
    plain: Duration,
    mount: Duration,
    client_cpu: f64,
    daemon_cpu: f64,
    garage_plain_cpu: f64,
    garage_mount_cpu: f64,
}

/// A [`ColdPair`], and the mount that read (for a warm re-read, or to drop).
fn cold_pair(b: &Bench, size: usize) -> (ColdPair, Mounted) {
    let me = std::process::id();
    let (c0, g0) = (cpu_seconds(me), cpu_seconds(b.garage_pid));
    let plain = b.rt.block_on(plain_get(&b.c, "plain.bin", size));
    let (c1, g1) = (cpu_seconds(me), cpu_seconds(b.garage_pid));
    let m = b.mount();
    let (d0, gm0) = (cpu_seconds(m.child.id()), cpu_seconds(b.garage_pid));
    let cold = timed_sh(&format!(
        "dd if={}/plain.bin of=/dev/null bs=1M 2>/dev/null",
        b.mnt.display()
    ));
    let (d1, gm1) = (cpu_seconds(m.child.id()), cpu_seconds(b.garage_pid));
    let pair = ColdPair {
        plain,
        mount: cold,
        client_cpu: c1 - c0,
        daemon_cpu: d1 - d0,
        garage_plain_cpu: g1 - g0,
        garage_mount_cpu: gm1 - gm0,
    };
    (pair, m)
}

/// The middle value (upper middle for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `lo-hi` of a few figures, one decimal.
fn spread(v: impl Iterator<Item = f64>) -> String {
    let v: Vec<f64> = v.collect();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.1}-{hi:.1}")
}

/// `n` more cold-read pairs, a median being steadier than one pair on a noisy machine: first as
/// above, then with Garage on CPU 0 and everything on the client side (this program's plain
/// client, the daemon, dd and the kernel work they cause) on CPU 1, as if the server were
/// another machine. On 2 shared cores the server's CPU (2-3 CPU-s per GiB for Garage) decides
/// both figures, and the mount's extra copies (FUSE into the page cache, dd out of it) show as
/// time taken from the server.
fn repeated_cold_reads(b: &Bench, size: usize, n: usize) {
    if n == 0 {
        return;
    }
    let report = |label: &str, pairs: &[ColdPair]| {
        let plain: Vec<f64> = pairs.iter().map(|p| mbps(size, p.plain)).collect();
        let mount: Vec<f64> = pairs.iter().map(|p| mbps(size, p.mount)).collect();
        let ratios: Vec<f64> = mount.iter().zip(&plain).map(|(m, p)| m / p).collect();
        row(
            label,
            &fmt_mbps(median(plain)),
            &fmt_mbps(median(mount)),
            Some(median(ratios.clone())),
        );
        let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}x")).collect();
        println!(
            "  (ratios {}; daemon {} CPU-s, plain client {} CPU-s, garage {} CPU-s per read)",
            each.join(" "),
            spread(pairs.iter().map(|p| p.daemon_cpu)),
            spread(pairs.iter().map(|p| p.client_cpu)),
            spread(
                pairs
                    .iter()
                    .map(|p| (p.garage_plain_cpu + p.garage_mount_cpu) / 2.0)
            ),
        );
    };
    let shared: Vec<ColdPair> = (0..n).map(|_| cold_pair(b, size).0).collect();
    report(&format!("cold read, median of {n} more pairs"), &shared);
    if cpus_online() < 2 {
        println!("  (one CPU: no pinned cold read)");
        return;
    }
    let me = std::process::id();
    pin(b.garage_pid, &[0]);
    pin(me, &[1]);
    let pinned: Vec<ColdPair> = (0..n).map(|_| cold_pair(b, size).0).collect();
    pin(me, &[]);
    pin(b.garage_pid, &[]);
    report(
        &format!("cold read, server alone on CPU 0 ({n} pairs)"),
        &pinned,
    );
}

/// User + system CPU seconds a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

/// The `p`th percentile (0-100, nearest rank) of some durations.
fn percentile(values: &mut [Duration], p: f64) -> Duration {
    values.sort_unstable();
    let i = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[i.min(values.len() - 1)]
}

/// xorshift64: fixed seeds make offsets and contents repeatable across runs.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `len` incompressible bytes, different for every seed (Garage deduplicates equal blocks).
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = XorShift::new(seed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&rng.next().to_le_bytes());
    }
    v.truncate(len);
    v
}

const LABEL: usize = 44;

fn header(daemon: Daemon) {
    println!(
        "{:<LABEL$} {:>14} {:>14} {:>8}",
        "",
        "plain S3",
        daemon.name(),
        "ratio"
    );
}

/// One figure: label, plain client, s3mount, and s3mount speed / plain speed.
fn row(label: &str, plain: &str, mount: &str, ratio: Option<f64>) {
    report::record(label, plain, mount, ratio);
    let ratio = ratio.map(|r| format!("{r:.2}x")).unwrap_or_default();
    println!("{label:<LABEL$} {plain:>14} {mount:>14} {ratio:>8}");
}

fn fmt_mbps(v: f64) -> String {
    format!("{v:.0} MB/s")
}

fn fmt_ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// A row of two durations for the same work: the ratio is plain time / s3mount time.
fn row_times(label: &str, plain: Duration, mount: Duration) {
    row(
        label,
        &fmt_ms(plain),
        &fmt_ms(mount),
        Some(plain.as_secs_f64() / mount.as_secs_f64()),
    );
}

/// A row of two throughputs in MB/s.
fn row_mbps(label: &str, plain: f64, mount: f64) {
    row(
        label,
        &fmt_mbps(plain),
        &fmt_mbps(mount),
        Some(mount / plain),
    );
}

/// The number after a flag, or exit saying which flag wants one.
fn value<T: std::str::FromStr>(flag: &str, v: Option<String>) -> T {
    v.and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{flag} takes a number"))
}

struct Options {
    size_mib: usize,
    files: usize,
    soak_secs: u64,
    random_reads: usize,
    cold_repeats: usize,
    skip_random: bool,
    skip_ttfb: bool,
    skip_listings: bool,
    skip_readers: bool,
    skip_disk_cache: bool,
    skip_metadata: bool,
    skip_mountpoint: bool,
    ls_max: usize,
    restarts: usize,
    soak_kill_every: u64,
    rtt_ms: u64,
    daemons: Vec<Daemon>,
}

impl Options {
    fn parse() -> Options {
        let mut o = Options {
            size_mib: 2048,
            files: 1000,
            soak_secs: 30,
            random_reads: 2000,
            cold_repeats: 3,
            skip_random: false,
            skip_ttfb: false,
            skip_listings: false,
            skip_readers: false,
            skip_disk_cache: false,
            skip_metadata: false,
            skip_mountpoint: false,
            ls_max: 10_000,
            restarts: 20,
            soak_kill_every: 0,
            rtt_ms: 0,
            daemons: vec![Daemon::S3mount],
        };
        let daemon = |name: &str| match name {
            "s3mount" => Daemon::S3mount,
            "s3mount-wb" => Daemon::S3mountWriteBack,
            "s3fs" => Daemon::S3fs,
            "rclone" => Daemon::Rclone,
            other => panic!(
                "daemons are s3mount, s3mount-wb (--write-back), s3fs and rclone, not {other:?}"
            ),
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--size-mib" => o.size_mib = value(&a, args.next()),
                "--files" => o.files = value(&a, args.next()),
                "--soak-seconds" => o.soak_secs = value(&a, args.next()),
                "--random-reads" => o.random_reads = value(&a, args.next()),
                "--cold-repeats" => o.cold_repeats = value(&a, args.next()),
                "--skip-random" => o.skip_random = true,
                "--skip-ttfb" => o.skip_ttfb = true,
                "--skip-listings" => o.skip_listings = true,
                "--skip-readers" => o.skip_readers = true,
                "--skip-disk-cache" => o.skip_disk_cache = true,
                "--skip-metadata" => o.skip_metadata = true,
                "--skip-mountpoint" => o.skip_mountpoint = true,
                // The largest directory `ls -f` lists (100, 1,000, ... up to this).
                "--ls-max" => o.ls_max = value(&a, args.next()),
                // Worker kills for the --supervise pause (0: none).
                "--restarts" => o.restarts = value(&a, args.next()),
                // The soak on a supervised mount whose worker is killed every N seconds.
                "--soak-kill-every" => o.soak_kill_every = value(&a, args.next()),
                // Round-trip time added between the clients and the server (a delay line).
                "--rtt-ms" => o.rtt_ms = value(&a, args.next()),
                "--daemon" => o.daemons = vec![daemon(&args.next().unwrap_or_default())],
                // Several daemons in one run, one pass each on a fresh server, then one table.
                "--daemons" => {
                    o.daemons = args
                        .next()
                        .unwrap_or_default()
                        .split(',')
                        .map(daemon)
                        .collect()
                }
                // `cargo bench` passes --bench; ignore what we don't know.
                _ => {}
            }
        }
        o
    }
}

fn main() {
    let o = Options::parse();
    let size = o.size_mib << 20;
    let data: Vec<u8> = (0..size)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let src = Path::new("/dev/shm").join(format!("s3mount-bench-{}", std::process::id()));
    std::fs::write(&src, &data).unwrap();
    for &daemon in &o.daemons {
        report::set_daemon(daemon);
        pass(&o, daemon, &data, &src);
    }
    let _ = std::fs::remove_file(&src);
    if o.daemons.len() > 1 {
        println!(
            "\nAll passes (each figure with its ratio to the plain client of its own pass):\n\n{}",
            report::comparison(&o.daemons)
        );
    }
}

/// Every workload on one daemon, against a fresh Garage (and delay line).
fn pass(o: &Options, daemon: Daemon, data: &[u8], src: &Path) {
    let work = tempfile::tempdir().unwrap();
    let shim = work.path().join("nodelay.so");
    run(Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&shim)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nodelay_shim.c"))
        .arg("-ldl"));
    let garage = start_garage(&shim);
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let endpoint = if o.rtt_ms > 0 {
        start_delay_line(&rt, &garage.endpoint, Duration::from_micros(o.rtt_ms * 500))
    } else {
        garage.endpoint.clone()
    };
    let b = Bench {
        c: client(&endpoint),
        rt,
        endpoint,
        daemon,
        garage_pid: garage.child.id(),
        work: work.path().to_path_buf(),
        mnt,
        mounts: AtomicUsize::new(0),
    };
    let size = data.len();

    println!(
        "\ns3mount benchmark: {} MiB object, {} small files, Garage on {}{}, daemon {}",
        o.size_mib,
        o.files,
        garage.endpoint,
        if o.rtt_ms > 0 {
            format!(
                " behind a {} ms round-trip delay line ({})",
                o.rtt_ms, b.endpoint
            )
        } else {
            String::new()
        },
        match daemon {
            d if d.is_s3mount() => format!("{} {}", s3mount_bin().display(), d.name()),
            d => d.name().to_string(),
        }
    );
    header(daemon);
    let plain_read = sequential_and_small(&b, data, src, o.files, o.cold_repeats);
    copy_within(&b, size);
    if !o.skip_metadata {
        workloads::metadata(&b, o.files);
    }
    if !o.skip_mountpoint {
        workloads::mountpoint(&b, data, o.ls_max);
    }
    workloads::restarts(&b, o.restarts);
    if !o.skip_random {
        random_reads(&b, data, o.random_reads);
    }
    if !o.skip_ttfb {
        time_to_first_byte(&b);
    }
    if !o.skip_listings {
        listings(&b);
    }
    if !o.skip_readers {
        concurrent_readers(&b);
    }
    if !o.skip_disk_cache && daemon.is_s3mount() {
        disk_cache(&b, size, plain_read);
    }
    if o.soak_secs > 0 && daemon.is_s3mount() {
        soak(&b, o.soak_secs, o.soak_kill_every);
    }
}

/// The original figures: sequential write, cold and warm sequential read of the big object,
/// creating and listing small files. Returns the plain client's sequential read speed (MB/s).
fn sequential_and_small(
    b: &Bench,
    data: &[u8],
    src: &Path,
    files: usize,
    cold_repeats: usize,
) -> f64 {
    let (c, mnt, size) = (&b.c, b.mnt.display(), data.len());
    let me = std::process::id();
    let plain_cpu0 = cpu_seconds(me);
    let plain_w = b.rt.block_on(plain_put(c, "plain.bin", data));
    let plain_cpu = cpu_seconds(me) - plain_cpu0;
    let m = b.mount();
    let cpu0 = cpu_seconds(m.child.id());
    let t = Instant::now();
    timed_sh(&format!(
        "dd if={} of={mnt}/mount.bin bs=1M 2>/dev/null",
        src.display()
    ));
    let mount_w = t.elapsed();
    // A peer's close may return before its upload ends: durable is when the bucket has it.
    workloads::wait_for_object(b, "mount.bin", size);
    let durable_w = t.elapsed();
    let cpu = cpu_seconds(m.child.id()) - cpu0;
    row_mbps(
        "sequential write (dd bs=1M)",
        mbps(size, plain_w),
        mbps(size, mount_w),
    );
    row_mbps(
        "sequential write, durable in the bucket",
        mbps(size, plain_w),
        mbps(size, durable_w),
    );
    workloads::cpu_row(
        "CPU-s per GiB written (vs the plain client)",
        size,
        plain_cpu,
        cpu,
    );
    let rss_write = m.peak_rss_mib();
    drop(m);

    let (first, m) = cold_pair(b, size);
    let warm = timed_sh(&format!(
        "dd if={mnt}/plain.bin of=/dev/null bs=1M 2>/dev/null"
    ));
    // A re-read with part of the file still in the kernel's page cache: every other 64 KiB is
    // dropped, so the reads that reach the daemon move forward with gaps (issue 17: such a
    // reader used to be judged random and fetched 4-32 KiB at a time).
    let dropped = drop_every_other(&b.mnt.join("plain.bin"), 64 << 10);
    let partial = timed_sh(&format!(
        "dd if={mnt}/plain.bin of=/dev/null bs=1M 2>/dev/null"
    ));
    let pr = mbps(size, first.plain);
    row_mbps("cold sequential read (dd)", pr, mbps(size, first.mount));
    workloads::cpu_row(
        "CPU-s per GiB read, cold (vs the plain client)",
        size,
        first.client_cpu,
        first.daemon_cpu,
    );
    row_mbps("warm re-read (page cache)", pr, mbps(size, warm));
    row_mbps(
        "re-read, half of it dropped from the page cache",
        pr,
        mbps(size, partial),
    );
    if !dropped {
        println!("  (posix_fadvise DONTNEED failed: the re-read above is warm)");
    }
    println!(
        "  (cold read: {:.1} s wall, daemon {:.1} CPU-s, garage {:.1} CPU-s, on {} cores;\n   \
         plain GET: {:.1} s wall, client {:.1} CPU-s, garage {:.1} CPU-s)",
        first.mount.as_secs_f64(),
        first.daemon_cpu,
        first.garage_mount_cpu,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        first.plain.as_secs_f64(),
        first.client_cpu,
        first.garage_plain_cpu,
    );

    let small = vec![7u8; 4096];
    let keys = (0..files).map(|i| format!("plain-small/{i}")).collect();
    let plain_small = b.rt.block_on(plain_put_many(c, keys, &small, PARALLEL));
    let local = b.work.join("small");
    std::fs::create_dir(&local).unwrap();
    for i in 0..files {
        std::fs::write(local.join(i.to_string()), &small).unwrap();
    }
    let t = Instant::now();
    timed_sh(&format!("cp -r {} {mnt}/small", local.display()));
    let mount_small = t.elapsed();
    workloads::wait_for_keys(b, "small/", files);
    let durable_small = t.elapsed();
    let (ps, ms) = (
        files as f64 / plain_small.as_secs_f64(),
        files as f64 / mount_small.as_secs_f64(),
    );
    row(
        "create 4 KiB files (cp -r vs 8 PUTs)",
        &format!("{ps:.0} /s"),
        &format!("{ms:.0} /s"),
        Some(ms / ps),
    );
    row_times(
        "create 4 KiB files, durable in the bucket",
        plain_small,
        durable_small,
    );
    // cp copies one file after the other and each close returns once its PUT is stored, so
    // the bound for an honest close is one PUT at a time.
    let keys = (0..files).map(|i| format!("plain-small-1/{i}")).collect();
    let serial = b.rt.block_on(plain_put_many(c, keys, &small, 1));
    let ss = files as f64 / serial.as_secs_f64();
    println!(
        "  (one PUT at a time: {ss:.0} /s; cp -r is {:.2}x of that: each close waits for its PUT)",
        ms / ss
    );
    // The same listing the mount makes: the keys `cp -r` wrote (with the directory's marker,
    // which makes 1,001 keys: two pages), grouped by `/`.
    let (plain_list, _) = b.rt.block_on(plain_list(c, "small/", Some("/")));
    let mount_list = timed_sh(&format!("ls -l {mnt}/small >/dev/null"));
    row_times(
        &format!("ls -l of {files} files (vs LIST)"),
        plain_list,
        mount_list,
    );
    println!(
        "peak RSS of the daemon: write run {rss_write:.0} MiB, read run {:.0} MiB (budget --max-memory {BUDGET_MIB} MiB)",
        m.peak_rss_mib()
    );
    drop(m);
    repeated_cold_reads(b, size, cold_repeats);
    pr
}

/// `cp` of the big object to a new name inside the mount (copy_file_range, copied server side)
/// next to a plain client's CopyObject of the same object.
fn copy_within(b: &Bench, size: usize) {
    let t = Instant::now();
    b.rt.block_on(async {
        b.c.copy_object()
            .bucket("bench")
            .key("plain-copy.bin")
            .copy_source("bench/plain.bin")
            .send()
            .await
            .expect("plain CopyObject")
    });
    let plain = t.elapsed();
    let mnt = b.mnt.display();
    // By default the copy's commit is conditional (If-None-Match on the new name), which only
    // CompleteMultipartUpload checks reliably: UploadPartCopy. Without conditions: CopyObject.
    for (label, args, name) in [
        (
            "cp inside the mount (vs CopyObject)",
            &[][..],
            "mount-copy.bin",
        ),
        (
            "  the same, --no-conditional-writes",
            &["--no-conditional-writes"][..],
            "mount-copy-2.bin",
        ),
    ] {
        let m = match b.try_mount(args) {
            Ok(m) => m,
            Err(e) if !b.daemon.is_s3mount() => {
                println!("{label:<LABEL$} (skipped for {}: {e})", b.daemon.name());
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        let mount = timed_sh(&format!("cp {mnt}/plain.bin {mnt}/{name}"));
        let log = m.finish();
        row_mbps(label, mbps(size, plain), mbps(size, mount));
        println!("    s3mount requests: {}", Traffic::summary(&log));
    }
}

/// `n` 4 KiB-aligned offsets in an object of `size` bytes, always the same ones.
fn random_offsets(size: usize, n: usize) -> Vec<u64> {
    let blocks = (size / BLOCK) as u64;
    let mut rng = XorShift::new(0x5EED);
    (0..n).map(|_| rng.next() % blocks * BLOCK as u64).collect()
}

/// Random 4 KiB reads of the cold big object: 8 threads sharing one descriptor of a fresh mount
/// that does nothing else (so its traffic count is theirs), against 8 parallel ranged GETs at the
/// same offsets; IOPS, latency percentiles, and bytes fetched per byte returned.
fn random_reads(b: &Bench, data: &[u8], n: usize) {
    const THREADS: usize = 8;
    let offsets = random_offsets(data.len(), n);

    let t = Instant::now();
    let mut plain_lat: Vec<Duration> = b.rt.block_on(
        futures::stream::iter(&offsets)
            .map(|&off| async move {
                let t = Instant::now();
                let range = format!("bytes={off}-{}", off + BLOCK as u64 - 1);
                let got = plain_get_range(&b.c, "plain.bin", Some(range)).await;
                assert_eq!(got, BLOCK);
                t.elapsed()
            })
            .buffer_unordered(THREADS)
            .collect(),
    );
    let plain_time = t.elapsed();

    let m = b.mount();
    let file = File::open(b.mnt.join("plain.bin")).unwrap();
    let next = AtomicUsize::new(0);
    let t = Instant::now();
    let mut mount_lat: Vec<Duration> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    let mut buf = vec![0u8; BLOCK];
                    let mut lat = Vec::new();
                    while let Some(&off) = offsets.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let t = Instant::now();
                        file.read_exact_at(&mut buf, off)
                            .expect("pread on the mount");
                        lat.push(t.elapsed());
                        let off = off as usize;
                        assert!(buf == data[off..off + BLOCK], "wrong bytes at {off}");
                    }
                    lat
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mount_time = t.elapsed();
    drop(file);
    let log = m.finish();

    let (pi, mi) = (
        n as f64 / plain_time.as_secs_f64(),
        n as f64 / mount_time.as_secs_f64(),
    );
    row(
        &format!("random 4 KiB reads, {THREADS} threads (IOPS)"),
        &format!("{pi:.0} /s"),
        &format!("{mi:.0} /s"),
        Some(mi / pi),
    );
    for p in [50.0, 99.0] {
        row_times(
            &format!("  latency p{p}"),
            percentile(&mut plain_lat, p),
            percentile(&mut mount_lat, p),
        );
    }
    let returned = (n * BLOCK) as u64;
    match Traffic::parse(&log) {
        Some(t) => {
            row(
                "  bytes fetched / returned (target <= 2)",
                "1.00",
                &format!("{:.2}", t.fetched as f64 / returned as f64),
                None,
            );
            println!(
                "  (s3mount: {} bytes fetched in {} GETs for {returned} bytes returned; {} LIST, {} HEAD)",
                t.fetched, t.get, t.list, t.head
            );
        }
        None => row(
            "  bytes fetched / returned (target <= 2)",
            "1.00",
            "n/a (no traffic line in log)",
            None,
        ),
    }
}

/// Time to first byte of 20 fresh 64 KiB objects: open + read of the first 4 KiB on a fresh
/// mount (each file's first access, lookup included) against GetObject until the first body
/// byte; medians.
/// A GetObject of `key` (of `range`, if given) until the first body byte (the rest is drained
/// untimed, so the connection goes back to the pool).
fn plain_first_byte(b: &Bench, key: &str, range: Option<String>) -> Duration {
    b.rt.block_on(plain_get_timed(&b.c, key, range)).1
}

/// Open `key` on the mount and read its first 4 KiB.
fn mount_first_block(b: &Bench, key: &str) -> Duration {
    let mut buf = vec![0u8; BLOCK];
    let t = Instant::now();
    let file = File::open(b.mnt.join(key)).unwrap();
    file.read_exact_at(&mut buf, 0).unwrap();
    t.elapsed()
}

fn time_to_first_byte(b: &Bench) {
    const N: usize = 20;
    let keys: Vec<String> = (0..N).map(|i| format!("ttfb/{i}")).collect();
    b.rt.block_on(plain_put_many(
        &b.c,
        keys.clone(),
        &random_bytes(20, 64 << 10),
        PARALLEL,
    ));
    let mut plain: Vec<Duration> = keys
        .iter()
        .map(|key| plain_first_byte(b, key, None))
        .collect();

    let m = b.mount();
    // The directory's own lookup is not part of any file's first byte.
    std::fs::metadata(b.mnt.join("ttfb")).unwrap();
    let mut mount: Vec<Duration> = keys.iter().map(|key| mount_first_block(b, key)).collect();
    drop(m);
    row_times(
        &format!("time to first 4 KiB, {N} files (median)"),
        percentile(&mut plain, 50.0),
        percentile(&mut mount, 50.0),
    );

    // The first 4 KiB of the large object: a ranged GET of them, against open + read on a
    // fresh mount each time (lookup included).
    const BIG: usize = 7;
    let first_block = Some(format!("bytes=0-{}", BLOCK - 1));
    let mut plain: Vec<Duration> = (0..BIG)
        .map(|_| plain_first_byte(b, "plain.bin", first_block.clone()))
        .collect();
    let mut mount: Vec<Duration> = (0..BIG)
        .map(|_| {
            let _m = b.mount();
            mount_first_block(b, "plain.bin")
        })
        .collect();
    row_times(
        &format!("time to first 4 KiB of the large object ({BIG} mounts, median)"),
        percentile(&mut plain, 50.0),
        percentile(&mut mount, 50.0),
    );
}

/// One listing figure: a plain ListObjectsV2 walk of `prefix` (which must find `entries`), then
/// `cmd` (with `{mnt}` replaced) on a fresh, cold mount, timed back to back so both see the same
/// server load; prints the row and the daemon's request counts, returns `cmd`'s output.
fn listing_vs_walk(
    b: &Bench,
    label: &str,
    (prefix, delimiter, entries): (&str, Option<&str>, usize),
    cmd: &str,
) -> String {
    let (plain, n) = b.rt.block_on(plain_list(&b.c, prefix, delimiter));
    assert_eq!(n, entries, "plain listing of {prefix}");
    let m = b.mount();
    let (time, out) = timed_sh_output(&cmd.replace("{mnt}", &b.mnt.display().to_string()));
    let log = m.finish();
    row_times(label, plain, time);
    println!("    s3mount requests: {}", Traffic::summary(&log));
    out
}

/// Listings at scale: 10,000 objects in one directory, and 100 directories of 100; `ls -l`,
/// `find` and `du -s` on fresh mounts against plain ListObjectsV2 walks, with the daemon's
/// request counts (no HEAD per entry expected).
fn listings(b: &Bench) {
    const DIRS: usize = 100;
    const PER_DIR: usize = 100;
    const WIDE: usize = DIRS * PER_DIR;
    let wide_keys = (0..WIDE).map(|i| format!("wide/f{i:05}"));
    let tree_keys =
        (0..DIRS).flat_map(|d| (0..PER_DIR).map(move |f| format!("tree/d{d:03}/f{f:03}")));
    let t = b.rt.block_on(plain_put_many(
        &b.c,
        wide_keys.chain(tree_keys).collect(),
        b"x",
        64,
    ));
    println!(
        "  (created {} objects for the listings in {:.1} s, 64 PUTs in parallel)",
        2 * WIDE,
        t.as_secs_f64()
    );

    let wide = ("wide/", Some("/"), WIDE);
    let tree = ("tree/", None, WIDE);
    listing_vs_walk(
        b,
        "ls -l of 10,000 files, one dir (vs LIST /)",
        wide,
        "ls -l {mnt}/wide >/dev/null",
    );
    let out = listing_vs_walk(
        b,
        "find of 100 x 100 files (vs LIST)",
        tree,
        "find {mnt}/tree | wc -l",
    );
    let found: usize = out.trim().parse().expect("find | wc -l");
    assert_eq!(
        found,
        WIDE + DIRS + 1,
        "find on the mount saw {found} entries, expected {} (100 dirs, 10,000 files, the top)",
        WIDE + DIRS + 1
    );
    listing_vs_walk(
        b,
        "du -s of 100 x 100 files (vs LIST)",
        tree,
        "du -s {mnt}/tree >/dev/null",
    );
    println!("  (target for listings: at most 1.5x the plain walk, i.e. ratio >= 0.67x)");
}

/// 32 readers at once: 32 objects of 32 MiB, one `dd bs=1M` process each on one fresh mount,
/// against 32 parallel GetObjects; aggregate throughput and the daemon's peak RSS.
fn concurrent_readers(b: &Bench) {
    const READERS: usize = 32;
    const SIZE: usize = 32 << 20;
    let keys: Vec<String> = (0..READERS).map(|i| format!("readers/{i}")).collect();
    b.rt.block_on(async {
        for (i, key) in keys.iter().enumerate() {
            plain_put(&b.c, key, &random_bytes(1000 + i as u64, SIZE)).await;
        }
    });

    let t = Instant::now();
    let total: usize = b.rt.block_on(
        futures::stream::iter(&keys)
            .map(|key| plain_get_range(&b.c, key, None))
            .buffer_unordered(READERS)
            .fold(0, |a, n| async move { a + n }),
    );
    let plain = t.elapsed();
    assert_eq!(total, READERS * SIZE);

    let m = b.mount();
    let t = Instant::now();
    let dds: Vec<Child> = keys
        .iter()
        .map(|key| {
            Command::new("dd")
                .arg(format!("if={}", b.mnt.join(key).display()))
                .args(["of=/dev/null", "bs=1M"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut dd in dds {
        assert!(dd.wait().unwrap().success(), "dd on the mount failed");
    }
    let mount = t.elapsed();
    let rss = m.peak_rss_mib();
    drop(m);
    row_mbps(
        &format!("{READERS} readers x 32 MiB at once (dd)"),
        mbps(total, plain),
        mbps(total, mount),
    );
    println!(
        "  peak RSS of the daemon with {READERS} readers: {rss:.0} MiB (budget --max-memory {BUDGET_MIB} MiB)"
    );
}

/// The persistent disk cache: a cold `dd` of the big object fills it, then after a remount with
/// the same cache directory a second `dd` reads from it.
fn disk_cache(b: &Bench, size: usize, plain_read: f64) {
    let dir = b.work.join("cache");
    std::fs::create_dir_all(&dir).unwrap();
    let opts = [
        "--cache-dir",
        dir.to_str().unwrap(),
        "--max-cache-size",
        "4G",
    ];
    let dd = format!(
        "dd if={}/plain.bin of=/dev/null bs=1M 2>/dev/null",
        b.mnt.display()
    );
    let mut speeds = Vec::new();
    for _ in 0..2 {
        let m = match b.try_mount(&opts) {
            Ok(m) => m,
            // clap: "error: unexpected argument '--cache-dir' found"
            Err(e) if e.contains("unexpected argument") => {
                println!("disk cache: n/a (option not available)");
                return;
            }
            Err(e) => {
                println!("disk cache: n/a (mount failed: {e})");
                return;
            }
        };
        speeds.push(mbps(size, timed_sh(&dd)));
        drop(m);
    }
    row_mbps(
        "disk cache: cold read, filling it (dd)",
        plain_read,
        speeds[0],
    );
    row_mbps(
        "disk cache: re-read after remount (dd)",
        plain_read,
        speeds[1],
    );
    let used = run(Command::new("du").arg("-sm").arg(&dir));
    println!(
        "  (cache directory after the runs: {} MiB)",
        used.split_whitespace().next().unwrap_or("?")
    );
}

fn proc_count(pid: u32, what: &str) -> usize {
    match what {
        "fds" => std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0),
        _ => std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0),
    }
}

/// Content of soak file `name` of `len` bytes: recomputable by any reader.
fn soak_bytes(name: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            ((i as u64)
                .wrapping_mul(31)
                .wrapping_add(name.wrapping_mul(7919))
                >> 3) as u8
        })
        .collect()
}

/// 64 threads, half writing and half reading mixed small and large files, for `secs` seconds;
/// reports operations, errors, peak RSS, and descriptors and threads before/after.
fn soak(b: &Bench, secs: u64, kill_every: u64) {
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::sync::Arc;
    // --soak-kill-every N: a supervised mount whose worker is killed (-9) every N seconds.
    let m = if kill_every > 0 {
        std::env::set_var("S3MOUNT_MAX_WORKER_DEATHS", "100000");
        b.try_mount(&["--supervise"])
            .unwrap_or_else(|e| panic!("{e}"))
    } else {
        b.mount()
    };
    let mut kills = 0;
    let mut last_kill = Instant::now();
    let mnt = &b.mnt;
    let pid = m.child.id();
    let dir = mnt.join("soak");
    std::fs::create_dir_all(&dir).unwrap();
    // Seed files so readers have something from the start.
    let sizes = [4096usize, 65_536, 1 << 20, 8 << 20, 32 << 20];
    for n in 0..10u64 {
        let len = sizes[n as usize % sizes.len()];
        std::fs::write(dir.join(format!("{n}-{len}")), soak_bytes(n, len)).unwrap();
    }
    std::thread::sleep(Duration::from_secs(1));
    let (fds0, threads0) = (proc_count(pid, "fds"), proc_count(pid, "threads"));
    let stop = Arc::new(AtomicBool::new(false));
    let (ops, errors, bytes) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let next_name = Arc::new(AtomicU64::new(10));
    let t0 = Instant::now();
    let handles: Vec<_> = (0..64u64)
        .map(|t| {
            let (stop, ops, errors, bytes, next_name, dir) = (
                stop.clone(),
                ops.clone(),
                errors.clone(),
                bytes.clone(),
                next_name.clone(),
                dir.clone(),
            );
            std::thread::spawn(move || {
                let mut x = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let ok = if t % 2 == 0 {
                        let n = next_name.fetch_add(1, Ordering::Relaxed);
                        let len = sizes[(x % 100) as usize % 4 + usize::from(x % 20 == 0)];
                        bytes.fetch_add(len as u64, Ordering::Relaxed);
                        match std::fs::write(dir.join(format!("{n}-{len}")), soak_bytes(n, len)) {
                            Ok(()) => true,
                            Err(e) => {
                                eprintln!("soak: write {n}-{len}: {e}");
                                false
                            }
                        }
                    } else {
                        let max = next_name.load(Ordering::Relaxed).saturating_sub(40).max(10);
                        let n = x % max;
                        match std::fs::read_dir(&dir).ok().and_then(|d| {
                            d.flatten().find(|e| {
                                e.file_name()
                                    .to_string_lossy()
                                    .starts_with(&format!("{n}-"))
                            })
                        }) {
                            Some(e) => {
                                let name = e.file_name().to_string_lossy().into_owned();
                                let len: usize = name
                                    .split('-')
                                    .nth(1)
                                    .and_then(|v| v.parse().ok())
                                    .unwrap_or(0);
                                match std::fs::read(e.path()) {
                                    Ok(got) => {
                                        bytes.fetch_add(got.len() as u64, Ordering::Relaxed);
                                        let want = soak_bytes(n, len);
                                        // A file still being written reads as what its writer
                                        // has written so far (every descriptor of a file
                                        // shares its state): a correct prefix is expected.
                                        let same = got == want
                                            || (got.len() < want.len() && want.starts_with(&got));
                                        if !same {
                                            // What the kernel believes now, and a second read:
                                            // tells a stale size from wrong bytes.
                                            let size = std::fs::metadata(e.path())
                                                .map(|m| m.len().to_string())
                                                .unwrap_or_else(|e| e.to_string());
                                            let again = std::fs::read(e.path())
                                                .map(|b| {
                                                    format!(
                                                        "{} bytes, {}",
                                                        b.len(),
                                                        if b == soak_bytes(n, len) {
                                                            "right"
                                                        } else {
                                                            "wrong"
                                                        }
                                                    )
                                                })
                                                .unwrap_or_else(|e| e.to_string());
                                            eprintln!(
                                                "soak: read {name}: {} bytes, content differs \
                                                 (stat now: {size}; read again: {again})",
                                                got.len()
                                            );
                                        }
                                        same
                                    }
                                    Err(e) => {
                                        eprintln!("soak: read {name}: {e}");
                                        false
                                    }
                                }
                            }
                            None => true,
                        }
                    };
                    ops.fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let mut peak = 0.0f64;
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(500));
        peak = peak.max(m.peak_rss_mib());
        if kill_every > 0 && last_kill.elapsed() >= Duration::from_secs(kill_every) {
            if let Some(w) = workloads::worker_of(pid) {
                // SAFETY: kill(2) with a pid and a valid signal; no memory is involved.
                unsafe { libc::kill(w as libc::pid_t, libc::SIGKILL) };
                kills += 1;
            }
            last_kill = Instant::now();
        }
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let elapsed = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let (fds1, threads1) = (proc_count(pid, "fds"), proc_count(pid, "threads"));
    let killed = if kill_every > 0 {
        format!(" (the worker killed {kills} times, every {kill_every} s: RSS, fds and threads are the supervisor's)")
    } else {
        String::new()
    };
    println!(
        "soak {secs} s, 64 threads (32 writers, 32 verifying readers): {} ops, {} errors, {:.0} MB/s, peak RSS {:.0} MiB, fds {fds0}->{fds1}, threads {threads0}->{threads1}{killed}",
        ops.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed) as f64 / 1e6 / elapsed,
        peak.max(m.peak_rss_mib())
    );
}
