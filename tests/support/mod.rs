//! Test support: real S3 servers on 127.0.0.1 (Garage, moto), an independent S3 client (the AWS
//! SDK used directly, not s3mount's store), and real FUSE mounts of the real binary.
#![allow(dead_code)]

pub mod proxy;
pub mod tls;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;

pub const ACCESS_KEY: &str = "GK31c2f218a2e44f485b94239e";
pub const SECRET_KEY: &str = "b892c0665f0ada8a4755dae98baa3b133590e11dae3bcc1f9d769d67f16c3835";
pub const REGION: &str = "garage";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Garage,
    Moto,
}

pub struct S3Server {
    pub kind: Kind,
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
    _dir: Option<tempfile::TempDir>,
}

/// Servers and directories to remove when the test process exits. Servers live in statics, which
/// are never dropped, and their data (more than a GiB after the big tests) would otherwise stay in
/// the temporary directory of every run: CI once ran out of disk that way.
static AT_EXIT: Mutex<Vec<(u32, PathBuf)>> = Mutex::new(Vec::new());

extern "C" fn clean_up_at_exit() {
    let items = std::mem::take(&mut *AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()));
    for (pid, dir) in items {
        // SAFETY: kill(2) of children this test process started (they may be gone already).
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
            libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Kill server `pid` and remove its `dir` when the test process exits, whether its tests passed or
/// failed (libtest leaves through `exit`, which runs atexit handlers).
fn clean_up_at_exit_of(pid: u32, dir: &Path) {
    static REGISTER: Once = Once::new();
    // SAFETY: atexit with an extern "C" fn that touches only statics.
    REGISTER.call_once(|| unsafe {
        libc::atexit(clean_up_at_exit);
    });
    AT_EXIT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((pid, dir.to_path_buf()));
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// Kill a child when the test process dies (children would otherwise outlive a crashed run).
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the pre_exec closure only calls prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Start a server from a thread that lives as long as the process, because PR_SET_PDEATHSIG
/// fires when the spawning *thread* exits and test threads come and go.
fn spawn_long_lived(mut cmd: Command) -> Child {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        die_with_parent(&mut cmd);
        let child = cmd.spawn();
        let _ = tx.send(child);
        loop {
            std::thread::park();
        }
    });
    rx.recv()
        .expect("server thread")
        .expect("start server process")
}

fn wait_port(port: u16, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "server exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "server did not open port {port}: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn garage_bin() -> PathBuf {
    if let Ok(p) = std::env::var("GARAGE_BIN") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/root/.cargo/bin"])
    {
        let p = Path::new(dir).join("garage");
        if p.is_file() {
            return p;
        }
    }
    if let Ok(home) = std::env::var("HOME") {
        let p = Path::new(&home).join(".cargo/bin/garage");
        if p.is_file() {
            return p;
        }
    }
    panic!("garage binary not found: run `cargo install garage --locked` (or .ci/run), or set GARAGE_BIN");
}

fn garage_cli(bin: &Path, config: &Path, args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new(bin)
            .arg("-c")
            .arg(config)
            .args(args)
            .output()
            .expect("run garage cli");
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        // The node needs a moment before it answers its own CLI.
        if Instant::now() > deadline {
            panic!(
                "garage {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn start_garage() -> S3Server {
    let bin = garage_bin();
    let dir = tempfile::tempdir().expect("tempdir");
    let (s3, rpc, admin) = (free_port(), free_port(), free_port());
    let config = dir.path().join("garage.toml");
    std::fs::write(
        &config,
        format!(
            r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "4425f5c26c5e11581d3223904324dcb5b5d5dfb14e5e7f35e38c595424f5f1e6"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "s3mount-test-admin-token"
"#,
            d = dir.path().display()
        ),
    )
    .expect("write garage config");
    let log = dir.path().join("garage.log");
    let logf = std::fs::File::create(&log).expect("log file");
    let mut cmd = Command::new(&bin);
    cmd.arg("-c")
        .arg(&config)
        .arg("server")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(logf);
    let mut child = spawn_long_lived(cmd);
    wait_port(rpc, &mut child, &log);
    let node = garage_cli(&bin, &config, &["node", "id", "-q"]);
    let node = node.trim().split('@').next().unwrap_or("").to_string();
    garage_cli(
        &bin,
        &config,
        &["layout", "assign", "-z", "dc1", "-c", "1G", &node],
    );
    garage_cli(&bin, &config, &["layout", "apply", "--version", "1"]);
    garage_cli(
        &bin,
        &config,
        &[
            "key",
            "import",
            "--yes",
            "-n",
            "s3mount-test",
            ACCESS_KEY,
            SECRET_KEY,
        ],
    );
    garage_cli(
        &bin,
        &config,
        &["key", "allow", "--create-bucket", "s3mount-test"],
    );
    wait_port(s3, &mut child, &log);
    clean_up_at_exit_of(child.id(), dir.path());
    std::mem::forget(child);
    S3Server {
        kind: Kind::Garage,
        endpoint: format!("http://127.0.0.1:{s3}"),
        access_key: ACCESS_KEY.into(),
        secret_key: SECRET_KEY.into(),
        region: REGION.into(),
        _dir: Some(dir),
    }
}

fn start_moto() -> S3Server {
    let port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("moto.log");
    let logf = std::fs::File::create(&log).expect("log file");
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "moto.server",
        "-H",
        "127.0.0.1",
        "-p",
        &port.to_string(),
    ])
    .stdout(Stdio::null())
    .stderr(logf);
    let mut child = spawn_long_lived(cmd);
    wait_port(port, &mut child, &log);
    clean_up_at_exit_of(child.id(), dir.path());
    std::mem::forget(child);
    S3Server {
        kind: Kind::Moto,
        endpoint: format!("http://127.0.0.1:{port}"),
        access_key: "testing".into(),
        secret_key: "testing".into(),
        region: "us-east-1".into(),
        _dir: Some(dir),
    }
}

/// The Garage server of this test process (started on first use).
pub fn garage() -> &'static S3Server {
    static S: OnceLock<S3Server> = OnceLock::new();
    S.get_or_init(start_garage)
}

/// The moto server of this test process (started on first use).
pub fn moto() -> &'static S3Server {
    static S: OnceLock<S3Server> = OnceLock::new();
    S.get_or_init(start_moto)
}

/// The server most tests use: Garage, or the one named by S3MOUNT_TEST_SERVER (garage|moto), so
/// the same suite can run against a second S3 implementation. Directory-semantics tests call
/// [`garage`] directly: only a store that keeps keys as strings can hold their layouts.
pub fn server() -> &'static S3Server {
    match std::env::var("S3MOUNT_TEST_SERVER").as_deref() {
        Ok("moto") => moto(),
        Ok("garage") | Err(_) => garage(),
        Ok(other) => panic!("S3MOUNT_TEST_SERVER={other}: expected garage or moto"),
    }
}

/// A runtime for the independent client, shared by the tests of one process.
pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
}

impl S3Server {
    /// A plain AWS SDK client: the independent check on what s3mount did.
    pub fn client(&self) -> Client {
        let creds = aws_sdk_s3::config::Credentials::new(
            &self.access_key,
            &self.secret_key,
            None,
            None,
            "test",
        );
        let conf = aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new(self.region.clone()))
            .endpoint_url(&self.endpoint)
            .credentials_provider(creds)
            .force_path_style(true)
            // Garage has been seen, rarely, to stop answering one connection mid-upload (the
            // client had sent every byte): an attempt that hangs is retried on a new one.
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(std::time::Duration::from_secs(120))
                    .build(),
            )
            .build();
        Client::from_conf(conf)
    }

    /// A fresh, empty bucket.
    pub fn new_bucket(&self) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            rand_suffix()
        );
        let c = self.client();
        let n = name.clone();
        rt().block_on(async move { c.create_bucket().bucket(&n).send().await })
            .expect("create bucket");
        name
    }

    /// Empty objects under `keys`, 64 PUTs at a time (directories at scale).
    pub fn put_empty_many(&self, bucket: &str, keys: impl Iterator<Item = String>) {
        use futures::StreamExt;
        let c = self.client();
        rt().block_on(
            futures::stream::iter(keys)
                .map(|key| {
                    let c = c.clone();
                    async move {
                        c.put_object()
                            .bucket(bucket)
                            .key(&key)
                            .body(ByteStream::from(Vec::new()))
                            .send()
                            .await
                            .unwrap_or_else(|e| panic!("put {key}: {e:?}"))
                    }
                })
                .buffer_unordered(64)
                .collect::<Vec<_>>(),
        );
    }

    pub fn put(&self, bucket: &str, key: &str, body: impl Into<Vec<u8>>) {
        self.put_with_meta(bucket, key, body, &[]);
    }

    pub fn put_with_meta(
        &self,
        bucket: &str,
        key: &str,
        body: impl Into<Vec<u8>>,
        meta: &[(&str, &str)],
    ) {
        let c = self.client();
        let mut req = c
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from(body.into()));
        for (k, v) in meta {
            req = req.metadata(*k, *v);
        }
        rt().block_on(req.send())
            .unwrap_or_else(|e| panic!("put {key}: {e:?}"));
    }

    /// Multipart uploads left open in the bucket.
    pub fn open_uploads(&self, bucket: &str) -> Vec<String> {
        let c = self.client();
        rt().block_on(async move {
            let out = c
                .list_multipart_uploads()
                .bucket(bucket)
                .send()
                .await
                .expect("list uploads");
            out.uploads()
                .iter()
                .filter_map(|u| u.key().map(str::to_string))
                .collect()
        })
    }

    /// User metadata of an object.
    pub fn metadata(&self, bucket: &str, key: &str) -> std::collections::HashMap<String, String> {
        let c = self.client();
        rt().block_on(async move {
            c.head_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .expect("head")
                .metadata()
                .cloned()
                .unwrap_or_default()
        })
    }

    pub fn port(&self) -> u16 {
        self.endpoint
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("endpoint port")
    }

    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let c = self.client();
        rt().block_on(async move {
            match c.get_object().bucket(bucket).key(key).send().await {
                Ok(o) => Some(o.body.collect().await.expect("body").into_bytes().to_vec()),
                Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => None,
                Err(e) => panic!("get {key}: {e:?}"),
            }
        })
    }

    /// Every key in the bucket.
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        let c = self.client();
        rt().block_on(async move {
            let mut out = Vec::new();
            let mut token = None;
            loop {
                let page = c
                    .list_objects_v2()
                    .bucket(bucket)
                    .set_continuation_token(token)
                    .send()
                    .await
                    .expect("list");
                out.extend(
                    page.contents()
                        .iter()
                        .filter_map(|o| o.key().map(str::to_string)),
                );
                token = page.next_continuation_token().map(str::to_string);
                if token.is_none() {
                    break;
                }
            }
            out
        })
    }

    /// Environment for an s3mount child process talking to this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
            ("AWS_CONFIG_FILE".into(), "/nonexistent".into()),
            ("AWS_SHARED_CREDENTIALS_FILE".into(), "/nonexistent".into()),
        ]
    }

    /// The endpoint/region arguments for s3mount.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--endpoint-url".into(),
            self.endpoint.clone(),
            "--region".into(),
            self.region.clone(),
            "--force-path-style".into(),
        ]
    }
}

pub fn rand_suffix() -> String {
    use rand::Rng;
    let mut r = rand::thread_rng();
    (0..6)
        .map(|_| (b'a' + r.gen_range(0..26)) as char)
        .collect()
}

pub fn s3mount_bin() -> &'static str {
    env!("CARGO_BIN_EXE_s3mount")
}

/// The s3mount processes with `dir` among their arguments: (pid, parent pid) each.
pub fn mount_processes(dir: &Path) -> Vec<(u32, u32)> {
    let dir = dir.display().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let ours = args.first()?.ends_with(b"s3mount") && args.contains(&dir.as_bytes());
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // "pid (comm) state ppid ...": the comm may hold spaces, the ")" ends it.
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            ours.then_some((pid, ppid))
        })
        .collect()
}

/// Run s3mount to completion with this server's credentials (for failure cases).
pub fn run_s3mount(server: &S3Server, args: &[&str]) -> Output {
    let mut cmd = Command::new(s3mount_bin());
    cmd.args(args)
        .envs(server.env())
        .env_remove("AWS_ENDPOINT_URL")
        .stdin(Stdio::null());
    cmd.output().expect("run s3mount")
}

/// Fail loudly, never skip, when FUSE is unavailable: CI must have it.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: mount tests need FUSE (modprobe fuse)"
    );
}

/// A live mount of the real binary; unmounted on drop.
pub struct Mount {
    pub dir: tempfile::TempDir,
    pub bucket: String,
    /// The daemon's log file (removed on drop unless the test failed).
    pub log: PathBuf,
    /// The staging directory, unless the test names its own with --staging-dir.
    staging: Option<tempfile::TempDir>,
}

impl Mount {
    pub fn new(server: &S3Server, source: &str, extra: &[&str]) -> Mount {
        Self::via(server, &server.endpoint, source, extra)
    }

    /// Mount through another endpoint (a fault-injecting proxy in front of `server`).
    pub fn via(server: &S3Server, endpoint: &str, source: &str, extra: &[&str]) -> Mount {
        Self::with_env(server, endpoint, source, extra, &[])
    }

    /// Mount with environment changes (`None` removes the variable).
    pub fn with_env(
        server: &S3Server,
        endpoint: &str,
        source: &str,
        extra: &[&str],
        env: &[(&str, Option<&str>)],
    ) -> Mount {
        require_fuse();
        let dir = tempfile::tempdir().expect("mount dir");
        let mut args: Vec<String> = vec![source.to_string(), dir.path().display().to_string()];
        args.extend([
            "--endpoint-url".into(),
            endpoint.to_string(),
            "--region".into(),
            server.region.clone(),
            "--force-path-style".into(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        // Each mount stages into its own directory, removed with the mount, so what a test leaves
        // there (data kept after a failed upload) does not pile up in /tmp/s3mount-staging-0.
        let staging = (!extra.contains(&"--staging-dir")).then(|| {
            let staging = tempfile::tempdir().expect("staging dir");
            args.extend(["--staging-dir".into(), staging.path().display().to_string()]);
            staging
        });
        let log = std::env::temp_dir().join(format!("s3mount-test-{}.log", rand_suffix()));
        args.extend(["--log-file".into(), log.display().to_string(), "-d".into()]);
        let mut cmd = Command::new(s3mount_bin());
        cmd.args(&args)
            .envs(server.env())
            .env_remove("AWS_ENDPOINT_URL")
            .stdin(Stdio::null());
        for (k, v) in env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let out = cmd.output().expect("run s3mount");
        assert!(
            out.status.success(),
            "s3mount {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let bucket = source.split(':').next().unwrap_or(source).to_string();
        Mount {
            dir,
            bucket,
            log,
            staging,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Process ids of this mount's s3mount processes, the supervisor (if any) first.
    pub fn daemon_pids(&self) -> Vec<u32> {
        let mut found = mount_processes(self.dir.path());
        let pids: Vec<u32> = found.iter().map(|(p, _)| *p).collect();
        // A worker's parent is its supervisor: parents first.
        found.sort_by_key(|(_, ppid)| pids.contains(ppid));
        found.into_iter().map(|(p, _)| p).collect()
    }

    /// Process id of the process serving this mount: the worker of a supervised mount, else
    /// the one daemon.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon_pids().last().copied()
    }

    /// A daemon crash beyond what a supervisor survives (both processes killed, as an OOM
    /// kill of the whole service or a `--no-supervise` daemon's crash): SIGKILL to every
    /// s3mount process of this mount, the supervisor first. Returns how many were killed.
    pub fn kill_daemon(&self) -> usize {
        let pids = self.daemon_pids();
        for pid in &pids {
            // SAFETY: kill(2) of a process this test started; no memory is involved.
            unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
        }
        pids.len()
    }

    /// Peak resident memory of the daemon so far, in bytes.
    pub fn daemon_peak_rss(&self) -> u64 {
        let pid = self.daemon_pid().expect("daemon process");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    }

    /// Unmount, then wait for the daemon's summary line and return what it says it fetched:
    /// (GET requests, bytes fetched).
    pub fn unmount_traffic(&self) -> (u64, u64) {
        self.unmount();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(line) = log.lines().rev().find(|l| l.contains("store traffic:")) {
                let num_before = |what: &str| -> u64 {
                    let i = line.find(what).expect(what);
                    line[..i]
                        .trim_end()
                        .rsplit(|c: char| !c.is_ascii_digit())
                        .next()
                        .and_then(|n| n.parse().ok())
                        .expect(what)
                };
                return (num_before(" GET"), num_before(" bytes fetched"));
            }
            assert!(
                Instant::now() < deadline,
                "no traffic summary in {}",
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Unmount and wait until the daemon let go of the directory.
    pub fn unmount(&self) {
        let p = self.dir.path();
        if !umount_patiently(p) {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.unmount();
        if std::thread::panicking() {
            eprintln!("s3mount log: {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// No key's last component starts with `.`: rsync's temporary names (`.name.XXXXXX`) did not
/// reach the bucket, or were removed.
pub fn assert_no_temporary_names(keys: &[String]) {
    let left: Vec<&String> = keys
        .iter()
        .filter(|k| k.rsplit('/').next().unwrap_or("").starts_with('.'))
        .collect();
    assert!(left.is_empty(), "temporary names in the bucket: {left:?}");
}

/// Whether `p` is a mount point now. Only its parent is resolved: a stat of a mount whose
/// daemon died fails (ENOTCONN), and such a mount must still count, or it is never unmounted
/// and shows as DEAD to every later `s3mount status` on the machine.
pub fn is_mounted(p: &Path) -> bool {
    let canon = match (p.parent().map(std::fs::canonicalize), p.file_name()) {
        (Some(Ok(parent)), Some(name)) => parent.join(name),
        _ => p.to_path_buf(),
    };
    let want = canon.display().to_string().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// umount(8) `p`, retrying for up to 30 s while it is busy; true once it is no longer mounted.
/// A plain umount right after a file on the mount was closed has found it busy once in CI
/// (mount_system, tests running in parallel); one way: a child that another test thread
/// forked while the file was open holds a copy of it until it execs.
pub fn umount_patiently(p: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while is_mounted(p) {
        let _ = Command::new("umount").arg(p).stderr(Stdio::null()).status();
        if !is_mounted(p) {
            break;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// Bytes that differ at every offset, so a misplaced range shows.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(data))
}

pub fn sh(cmd: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("run sh")
}

/// Regular files directly in `dir` (subdirectories such as `spool/` not counted).
/// The state directory a mount made under the `--staging-dir` base it was given (the one
/// subdirectory there; `base/none` before the mount made it).
pub fn state_dir(base: &Path) -> PathBuf {
    std::fs::read_dir(base)
        .ok()
        .and_then(|d| d.flatten().map(|e| e.path()).find(|p| p.is_dir()))
        .unwrap_or_else(|| base.join("none"))
}

/// Data files in `dir`: not the state directory's own `lock` and `mount.info`.
pub fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name() != "lock" && e.file_name() != "mount.info")
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .count()
        })
        .unwrap_or(0)
}
