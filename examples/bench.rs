//! Benchmark: s3mount against a plain S3 client on the same local Garage server, same run.
//!
//! `cargo run --release --example bench -- [--size-mib 2048] [--files 1000]`
//!
//! Starts Garage (with an LD_PRELOAD shim forcing TCP_NODELAY on its sockets), then measures:
//! a plain parallel multipart PUT, `dd bs=1M` into the mount (close included), a plain parallel
//! ranged GET, a cold `dd` read after a remount, a warm re-read, and small-file creation;
//! each mount figure is printed as a ratio to the plain client's, with the daemon's peak RSS.
//! Machines here are noisy: compare ratios, not absolute numbers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use futures::StreamExt;

const KEY: &str = "GK31c2f218a2e44f485b94239e";
const SECRET: &str = "b892c0665f0ada8a4755dae98baa3b133590e11dae3bcc1f9d769d67f16c3835";

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
            .build(),
    )
}

const PART: usize = 8 << 20;
const PARALLEL: usize = 8;

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

async fn plain_get(c: &Client, key: &str, size: usize) -> Duration {
    let t = Instant::now();
    let total: usize = futures::stream::iter((0..size).step_by(PART))
        .map(|start| {
            let c = c.clone();
            async move {
                let end = (start + PART).min(size) - 1;
                let out = c
                    .get_object()
                    .bucket("bench")
                    .key(key)
                    .range(format!("bytes={start}-{end}"))
                    .send()
                    .await
                    .unwrap();
                out.body.collect().await.unwrap().into_bytes().len()
            }
        })
        .buffered(PARALLEL)
        .map(futures::future::ready)
        .fold(0, |a, b| async move { a + b.await })
        .await;
    assert_eq!(total, size);
    t.elapsed()
}

struct Mounted {
    child: Child,
    dir: PathBuf,
}

impl Mounted {
    fn new(endpoint: &str, dir: &Path) -> Mounted {
        let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/s3mount");
        assert!(
            bin.exists(),
            "build the release binary first: cargo build --release"
        );
        let child = Command::new(bin)
            .args([
                "bench",
                dir.to_str().unwrap(),
                "-f",
                "--endpoint-url",
                endpoint,
                "--region",
                "garage",
                "--force-path-style",
            ])
            .env("AWS_ACCESS_KEY_ID", KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(dir.to_str().unwrap())
        {
            assert!(Instant::now() < deadline, "mount did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        Mounted {
            child,
            dir: dir.to_path_buf(),
        }
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
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = self.child.wait();
    }
}

fn timed_sh(cmd: &str) -> Duration {
    let t = Instant::now();
    run(Command::new("sh").arg("-c").arg(cmd));
    t.elapsed()
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
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

fn main() {
    let mut size_mib = 2048usize;
    let mut files = 1000usize;
    let mut soak_secs = 30u64;
    let args: Vec<String> = std::env::args().collect();
    for w in args.windows(2) {
        match w[0].as_str() {
            "--size-mib" => size_mib = w[1].parse().expect("--size-mib N"),
            "--files" => files = w[1].parse().expect("--files N"),
            "--soak-seconds" => soak_secs = w[1].parse().expect("--soak-seconds N"),
            _ => {}
        }
    }
    let work = tempfile::tempdir().unwrap();
    let shim = work.path().join("nodelay.so");
    run(Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&shim)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nodelay_shim.c"))
        .arg("-ldl"));
    let garage = start_garage(&shim);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = client(&garage.endpoint);

    let size = size_mib << 20;
    let data: Vec<u8> = (0..size)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let src = Path::new("/dev/shm").join(format!("s3mount-bench-{}", std::process::id()));
    std::fs::write(&src, &data).unwrap();

    println!(
        "s3mount benchmark: {size_mib} MiB object, {files} small files, Garage on {}",
        garage.endpoint
    );
    println!(
        "{:<34} {:>12} {:>12} {:>8}",
        "", "plain S3", "s3mount", "ratio"
    );
    let plain_w = rt.block_on(plain_put(&c, "plain.bin", &data));
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let m = Mounted::new(&garage.endpoint, &mnt);
    let mount_w = timed_sh(&format!(
        "dd if={} of={}/mount.bin bs=1M 2>/dev/null",
        src.display(),
        mnt.display()
    ));
    let (pw, mw) = (mbps(size, plain_w), mbps(size, mount_w));
    println!(
        "{:<34} {:>9.0} MB/s {:>7.0} MB/s {:>7.2}x",
        "sequential write (dd bs=1M)",
        pw,
        mw,
        mw / pw
    );
    let rss_write = m.peak_rss_mib();
    drop(m);

    let plain_r = rt.block_on(plain_get(&c, "plain.bin", size));
    let m = Mounted::new(&garage.endpoint, &mnt);
    let (d0, g0) = (cpu_seconds(m.child.id()), cpu_seconds(garage.child.id()));
    let cold = timed_sh(&format!(
        "dd if={}/plain.bin of=/dev/null bs=1M 2>/dev/null",
        mnt.display()
    ));
    let (d1, g1) = (cpu_seconds(m.child.id()), cpu_seconds(garage.child.id()));
    let warm = timed_sh(&format!(
        "dd if={}/plain.bin of=/dev/null bs=1M 2>/dev/null",
        mnt.display()
    ));
    let (pr, cr, wr) = (mbps(size, plain_r), mbps(size, cold), mbps(size, warm));
    println!(
        "{:<34} {:>9.0} MB/s {:>7.0} MB/s {:>7.2}x",
        "cold sequential read (dd)",
        pr,
        cr,
        cr / pr
    );
    println!(
        "{:<34} {:>9.0} MB/s {:>7.0} MB/s {:>7.2}x",
        "warm re-read (page cache)",
        pr,
        wr,
        wr / pr
    );
    println!(
        "  (cold read: {:.1} s wall, daemon {:.1} CPU-s, garage {:.1} CPU-s, on {} cores)",
        cold.as_secs_f64(),
        d1 - d0,
        g1 - g0,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    let small = vec![7u8; 4096];
    let t = Instant::now();
    rt.block_on(
        futures::stream::iter(0..files)
            .map(|i| {
                let c = c.clone();
                let body = small.clone();
                async move {
                    c.put_object()
                        .bucket("bench")
                        .key(format!("plain-small/{i}"))
                        .body(ByteStream::from(body))
                        .send()
                        .await
                        .unwrap();
                }
            })
            .buffer_unordered(8)
            .collect::<Vec<_>>(),
    );
    let plain_small = t.elapsed();
    let local = work.path().join("small");
    std::fs::create_dir(&local).unwrap();
    for i in 0..files {
        std::fs::write(local.join(i.to_string()), &small).unwrap();
    }
    let mount_small = timed_sh(&format!(
        "cp -r {} {}/small",
        local.display(),
        mnt.display()
    ));
    let (ps, ms) = (
        files as f64 / plain_small.as_secs_f64(),
        files as f64 / mount_small.as_secs_f64(),
    );
    println!(
        "{:<34} {:>10.0} /s {:>10.0} /s {:>7.2}x",
        "create 4 KiB files (cp -r vs 8 PUTs)",
        ps,
        ms,
        ms / ps
    );
    let t = Instant::now();
    rt.block_on(async {
        let mut token = None;
        loop {
            let p = c
                .list_objects_v2()
                .bucket("bench")
                .prefix("plain-small/")
                .set_continuation_token(token)
                .send()
                .await
                .unwrap();
            token = p.next_continuation_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
    });
    let plain_list = t.elapsed();
    let mount_list = timed_sh(&format!("ls -l {}/small >/dev/null", mnt.display()));
    println!(
        "{:<34} {:>10.1} ms {:>10.1} ms {:>7.2}x",
        format!("ls -l of {files} files (vs LIST)"),
        plain_list.as_secs_f64() * 1e3,
        mount_list.as_secs_f64() * 1e3,
        plain_list.as_secs_f64() / mount_list.as_secs_f64()
    );
    println!("peak RSS of the daemon: write run {:.0} MiB, read run {:.0} MiB (budget --max-memory 512 MiB)", rss_write, m.peak_rss_mib());
    drop(m);
    if soak_secs > 0 {
        soak(&garage.endpoint, &mnt, soak_secs);
    }
    let _ = std::fs::remove_file(&src);
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
fn soak(endpoint: &str, mnt: &Path, secs: u64) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let m = Mounted::new(endpoint, mnt);
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
                                        let same = got == soak_bytes(n, len);
                                        if !same {
                                            eprintln!(
                                                "soak: read {name}: {} bytes, content differs",
                                                got.len()
                                            );
                                        }
                                        same
                                    }
                                    // A file still being written by its writer is EBUSY: expected.
                                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => true,
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
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let elapsed = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let (fds1, threads1) = (proc_count(pid, "fds"), proc_count(pid, "threads"));
    println!(
        "soak {secs} s, 64 threads (32 writers, 32 verifying readers): {} ops, {} errors, {:.0} MB/s, peak RSS {:.0} MiB, fds {fds0}->{fds1}, threads {threads0}->{threads1}",
        ops.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed) as f64 / 1e6 / elapsed,
        peak.max(m.peak_rss_mib())
    );
}
