//! The workloads added for issue 17, beside the original figures in main.rs:
//!
//! - metadata at latency: `tar xpf` of a tree (time to return and until the bucket has every
//!   object), `rsync -a` of the same tree (new, then again after a tenth changed, as a nightly
//!   backup), `stat` of files by name after a remount;
//! - Mountpoint's benchmark workloads (its fio jobs, done here with dd and threads so nothing
//!   else is needed): sequential read with 1 and 4 threads, with and without O_DIRECT, a read
//!   that skips 17 MiB at a time, the latency of a one-byte file write, `ls -f` of 100 up to
//!   `--ls-max` files. Sequential write, random read and time to first byte are in main.rs.
//!
//! Every workload runs the same way on s3fs and rclone (`--daemons`); one a peer cannot do is
//! printed as failed, never skipped silently. "Durable" means the bucket has it (polled with
//! the plain client), because a peer's close may return before its upload ends.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::{
    fmt_mbps, fmt_ms, mbps, percentile, plain_get, plain_get_range, plain_list, plain_put,
    plain_put_many, random_bytes, row, row_mbps, row_times, Bench, PARALLEL,
};

/// `sh -c cmd`, timed; Err(what it said) if it failed.
fn try_sh(cmd: &str) -> Result<(Duration, String), String> {
    let t = Instant::now();
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map_err(|e| e.to_string())?;
    let took = t.elapsed();
    if out.status.success() {
        Ok((took, String::from_utf8_lossy(&out.stdout).into_owned()))
    } else {
        let said = String::from_utf8_lossy(&out.stderr);
        Err(said.lines().next().unwrap_or("failed").to_string())
    }
}

/// A row for a workload the daemon could not do.
fn failed_row(label: &str, plain: &str, why: &str) {
    row(label, plain, "failed", None);
    println!("    ({why})");
}

/// Wait until the bucket holds `key` with `size` bytes (10 minutes at most).
pub fn wait_for_object(b: &Bench, key: &str, size: usize) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let len = b.rt.block_on(async {
            b.c.head_object()
                .bucket("bench")
                .key(key)
                .send()
                .await
                .ok()
                .and_then(|o| o.content_length())
        });
        if len == Some(size as i64) {
            return;
        }
        assert!(Instant::now() < deadline, "{key} never reached the bucket");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until the bucket holds at least `n` objects (not directory markers) under `prefix`.
pub fn wait_for_keys(b: &Bench, prefix: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let found = b.rt.block_on(async {
            let (mut token, mut found) = (None, 0);
            loop {
                let p =
                    b.c.list_objects_v2()
                        .bucket("bench")
                        .prefix(prefix)
                        .set_continuation_token(token)
                        .send()
                        .await
                        .unwrap();
                // Not directory markers, nor temporary files (rsync's `.name.XXXXXX`).
                found += p
                    .contents()
                    .iter()
                    .filter(|o| {
                        let key = o.key().unwrap_or("/");
                        !key.ends_with('/')
                            && !key.rsplit('/').next().unwrap_or("").starts_with('.')
                    })
                    .count();
                token = p.next_continuation_token().map(str::to_string);
                if token.is_none() {
                    return found;
                }
            }
        });
        if found >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{prefix}: {found} of {n} objects reached the bucket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// CPU seconds per GiB of the plain client and of the daemon for the same bytes; the ratio is
/// plain / daemon (higher is better, like every ratio here).
pub fn cpu_row(label: &str, bytes: usize, plain: f64, daemon: f64) {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    row(
        label,
        &format!("{:.2}", plain / gib),
        &format!("{:.2}", daemon / gib),
        Some(plain / daemon.max(1e-3)),
    );
}

/// `tar xpf` of a tree of `2 * files` files of 2 KiB in 20 directories (modes and times to
/// restore, owned by root so tar restores the owner too): time to return and time until the
/// bucket has every object, against PUTs of the same files 8 at a time; then `stat` of
/// `files` files by name on a fresh mount (nothing listed first) against one HEAD after the
/// other, as `xargs stat` asks.
pub fn metadata(b: &Bench, files: usize) {
    const DIRS: usize = 20;
    let n = 2 * files;
    let tree = b.work.join("tartree/t");
    for d in 0..DIRS {
        std::fs::create_dir_all(tree.join(format!("d{d:02}"))).unwrap();
    }
    for i in 0..n {
        let p = tree.join(format!("d{:02}/f{i:05}", i % DIRS));
        std::fs::write(&p, random_bytes(7000 + i as u64, 2048)).unwrap();
    }
    let tarball = b.work.join("tree.tar");
    super::run(Command::new("sh").arg("-c").arg(format!(
        "chmod -R go-w {t} && find {t} -type f -exec chmod 640 {{}} + && \
             touch -d '2020-01-02 03:04:05' {t}/*/* && tar cf {tar} -C {t} .",
        t = tree.display(),
        tar = tarball.display()
    )));
    let keys = (0..n).map(|i| format!("plain-tar/f{i}")).collect();
    let plain =
        b.rt.block_on(plain_put_many(&b.c, keys, &random_bytes(1, 2048), PARALLEL));
    let m = b.mount();
    let mnt = b.mnt.display();
    let label = format!("tar xpf of {n} x 2 KiB in {DIRS} dirs (vs 8 PUTs)");
    let t = Instant::now();
    match try_sh(&format!(
        "mkdir {mnt}/tarx && tar xpf {} -C {mnt}/tarx",
        tarball.display()
    )) {
        Ok(_) => {
            let returned = t.elapsed();
            wait_for_keys(b, "tarx/", n);
            let durable = t.elapsed();
            row_times(&label, plain, returned);
            row_times("  the same, durable in the bucket", plain, durable);
        }
        Err(e) => failed_row(&label, &fmt_ms(plain), &e),
    }
    drop(m);
    rsync(b, &tree, n, plain);

    // stat by name after a remount: the cp -r of main.rs left `files` objects in small/.
    let plain = b.rt.block_on(async {
        let t = Instant::now();
        for i in 0..files {
            b.c.head_object()
                .bucket("bench")
                .key(format!("small/{i}"))
                .send()
                .await
                .unwrap();
        }
        t.elapsed()
    });
    let m = b.mount();
    let label = format!("stat of {files} files after a remount (vs HEADs)");
    match try_sh(&format!(
        "cd {mnt}/small && seq 0 {} | xargs stat -c %s >/dev/null",
        files - 1
    )) {
        Ok((t, _)) => row_times(&label, plain, t),
        Err(e) => failed_row(&label, &fmt_ms(plain), &e),
    }
    drop(m);
}

/// `rsync -a` of the same tree into a new directory of the mount (each file written to a
/// temporary name, then renamed), time to return and until the bucket has every file; then,
/// on a fresh mount as a nightly backup would find it, again after a tenth of the files
/// changed (rsync lists and stats every destination file, sends the changed ones), against
/// PUTs of that tenth 8 at a time.
fn rsync(b: &Bench, tree: &std::path::Path, n: usize, plain_all: Duration) {
    let mnt = b.mnt.display();
    let m = b.mount();
    let label = format!("rsync -a of {n} x 2 KiB in 20 dirs, new (vs 8 PUTs)");
    let t = Instant::now();
    match try_sh(&format!("rsync -a {}/ {mnt}/rsync/", tree.display())) {
        Ok(_) => {
            let returned = t.elapsed();
            wait_for_keys(b, "rsync/", n);
            row_times(&label, plain_all, returned);
            row_times("  rsync, durable in the bucket", plain_all, t.elapsed());
        }
        Err(e) => return failed_row(&label, &fmt_ms(plain_all), &e),
    }
    drop(m);
    let changed = (n / 10).max(1);
    for i in (0..n).step_by(n / changed) {
        let p = tree.join(format!("d{:02}/f{i:05}", i % 20));
        std::fs::write(&p, random_bytes(9000 + i as u64, 2048)).unwrap();
    }
    let keys = (0..changed).map(|i| format!("plain-rsync/f{i}")).collect();
    let plain =
        b.rt.block_on(plain_put_many(&b.c, keys, &random_bytes(2, 2048), PARALLEL));
    let m = b.mount();
    let label = format!("rsync -a again, {changed} of {n} changed, fresh mount (vs 8 PUTs)");
    match try_sh(&format!("rsync -a {}/ {mnt}/rsync/", tree.display())) {
        Ok((t, _)) => row_times(&label, plain, t),
        Err(e) => failed_row(&label, &fmt_ms(plain), &e),
    }
    drop(m);
}

/// Mountpoint's benchmark workloads on the big object `data` (already in the bucket as
/// plain.bin) and on objects made here.
pub fn mountpoint(b: &Bench, data: &[u8], ls_max: usize) {
    let size = data.len();
    let mnt = b.mnt.display().to_string();
    let plain_one = mbps(size, b.rt.block_on(plain_get(&b.c, "plain.bin", size)));

    // Sequential reads: 1 thread with O_DIRECT (1 thread without is "cold sequential read"),
    // 4 threads with and without, each thread its own object of a quarter of the size.
    let quarter = size / 4 / (1 << 20) * (1 << 20);
    let keys: Vec<String> = (0..4).map(|i| format!("seq4/{i}")).collect();
    b.rt.block_on(async {
        for (i, k) in keys.iter().enumerate() {
            plain_put(&b.c, k, &data[i * quarter..(i + 1) * quarter]).await;
        }
    });
    let t = Instant::now();
    let total: usize = b.rt.block_on(
        futures::stream::iter(&keys)
            .map(|k| plain_get(&b.c, k, quarter))
            .buffer_unordered(4)
            .fold(0, |a, _| async move { a + quarter }),
    );
    let plain_four = mbps(total, t.elapsed());
    for (label, plain, files, flag) in [
        (
            "sequential read, O_DIRECT (dd)",
            plain_one,
            &["plain.bin"][..],
            "iflag=direct",
        ),
        (
            "sequential read, 4 threads (dd)",
            plain_four,
            &keys.iter().map(String::as_str).collect::<Vec<_>>()[..],
            "",
        ),
        (
            "sequential read, 4 threads, O_DIRECT",
            plain_four,
            &keys.iter().map(String::as_str).collect::<Vec<_>>()[..],
            "iflag=direct",
        ),
    ] {
        let m = b.mount();
        let cmd: Vec<String> = files
            .iter()
            .map(|f| format!("dd if={mnt}/{f} of=/dev/null bs=1M {flag} 2>/dev/null &"))
            .collect();
        let bytes = if files.len() == 1 { size } else { 4 * quarter };
        match try_sh(&format!("{} wait", cmd.join(" "))) {
            Ok((t, _)) => row_mbps(label, plain, mbps(bytes, t)),
            Err(e) => failed_row(label, &fmt_mbps(plain), &e),
        }
        drop(m);
    }

    // Read 256 KiB, skip 17 MiB, to the end (fio's rw=read:17m), one after the other.
    const CHUNK: usize = 256 << 10;
    let offsets: Vec<usize> = (0..size).step_by(CHUNK + (17 << 20)).collect();
    let plain = b.rt.block_on(async {
        let t = Instant::now();
        for &off in &offsets {
            let end = (off + CHUNK).min(size) - 1;
            plain_get_range(&b.c, "plain.bin", Some(format!("bytes={off}-{end}"))).await;
        }
        t.elapsed()
    });
    let m = b.mount();
    let label = format!("read 256 KiB, skip 17 MiB ({} reads)", offsets.len());
    let read = (|| -> std::io::Result<Duration> {
        let f = File::open(b.mnt.join("plain.bin"))?;
        let mut buf = vec![0u8; CHUNK];
        let t = Instant::now();
        for &off in &offsets {
            let n = CHUNK.min(size - off);
            f.read_exact_at(&mut buf[..n], off as u64)?;
            assert!(buf[..n] == data[off..off + n], "wrong bytes at {off}");
        }
        Ok(t.elapsed())
    })();
    match read {
        Ok(t) => row_times(&label, plain, t),
        Err(e) => failed_row(&label, &fmt_ms(plain), &e.to_string()),
    }
    drop(m);

    // The latency of a one-byte file: create, write one byte, close (durable for s3mount).
    const ONE: usize = 20;
    let mut plain: Vec<Duration> = b.rt.block_on(async {
        let mut v = Vec::new();
        for i in 0..ONE {
            v.push(plain_put_many(&b.c, vec![format!("one-plain/{i}")], b"1", 1).await);
        }
        v
    });
    let m = b.mount();
    std::fs::create_dir_all(b.mnt.join("one")).unwrap();
    let mut mount = Vec::new();
    for i in 0..ONE {
        let t = Instant::now();
        std::fs::write(b.mnt.join(format!("one/{i}")), b"1").unwrap();
        mount.push(t.elapsed());
    }
    drop(m);
    row_times(
        &format!("one-byte file write latency ({ONE} files, median)"),
        percentile(&mut plain, 50.0),
        percentile(&mut mount, 50.0),
    );

    // `ls -f` (no sort, no stat) of directories of 100, 1,000, ... files, each on a fresh mount.
    let mut n = 100;
    while n <= ls_max {
        let keys = (0..n).map(|i| format!("lsf/{n}/f{i:06}")).collect();
        b.rt.block_on(plain_put_many(&b.c, keys, b"x", 64));
        let prefix = format!("lsf/{n}/");
        let (plain, found) = b.rt.block_on(plain_list(&b.c, &prefix, Some("/")));
        assert_eq!(found, n);
        let m = b.mount();
        let label = format!("ls -f of {n} files (vs LIST)");
        match try_sh(&format!("ls -f {mnt}/lsf/{n} | wc -l")) {
            Ok((t, out)) => {
                let listed: usize = out.trim().parse().unwrap_or(0);
                if listed == n + 2 {
                    row_times(&label, plain, t);
                } else {
                    failed_row(&label, &fmt_ms(plain), &format!("listed {listed}"));
                }
            }
            Err(e) => failed_row(&label, &fmt_ms(plain), &e),
        }
        drop(m);
        n *= 10;
    }
}

/// The worker (child of the supervisor `supervisor`), if one serves.
pub fn worker_of(supervisor: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let status = std::fs::read_to_string(e.path().join("status")).ok()?;
        let ppid: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))?
            .trim()
            .parse()
            .ok()?;
        (ppid == supervisor).then_some(pid)
    })
}

/// `--supervise`: kill -9 the worker `kills` times while a thread lists a directory of 100
/// files over and over (every listing goes to the filesystem); the pause an application sees
/// is the longest listing around each kill. Prints p50 and p99 (the worst of 20), the errors
/// the listings saw (none expected), and the supervisor's own count of the pause.
pub fn restarts(b: &Bench, kills: usize) {
    use std::sync::atomic::{AtomicBool, Ordering};
    if kills == 0 || !b.daemon.is_s3mount() {
        return;
    }
    // The supervisor gives up after five deaths a minute; this kills more on purpose.
    std::env::set_var("S3MOUNT_MAX_WORKER_DEATHS", "100000");
    let keys = (0..100).map(|i| format!("restarts/f{i:03}")).collect();
    b.rt.block_on(plain_put_many(&b.c, keys, b"x", 64));
    let m = match b.try_mount(&["--supervise"]) {
        Ok(m) => m,
        Err(e) => return failed_row("worker restart", "", &e),
    };
    let supervisor = m.child.id();
    let dir = b.mnt.join("restarts");
    let stop = AtomicBool::new(false);
    let calls: std::sync::Mutex<Vec<(Instant, Duration)>> = Default::default();
    let errors = std::sync::atomic::AtomicUsize::new(0);
    let mut killed_at = Vec::new();
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match std::fs::read_dir(&dir).map(|d| d.count()) {
                    Ok(100) => {}
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                calls.lock().unwrap().push((t, t.elapsed()));
            }
        });
        for _ in 0..kills {
            std::thread::sleep(Duration::from_millis(300));
            let Some(w) = worker_of(supervisor) else {
                break;
            };
            killed_at.push(Instant::now());
            // SAFETY: kill(2) with a pid and a valid signal; no memory is involved.
            unsafe { libc::kill(w as libc::pid_t, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while worker_of(supervisor).is_none_or(|n| n == w) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
    });
    let calls = calls.into_inner().unwrap();
    let mut pauses: Vec<Duration> = killed_at
        .iter()
        .map(|&k| {
            calls
                .iter()
                .filter(|(t, d)| *t + *d >= k && *t <= k + Duration::from_secs(2))
                .map(|(_, d)| *d)
                .max()
                .unwrap_or_default()
        })
        .collect();
    let log = m.finish();
    let logged: Vec<u64> = log
        .lines()
        .filter_map(|l| {
            l.split("pause_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let n = pauses.len();
    row(
        &format!("worker killed {n} times: pause seen by ls, p50"),
        "",
        &fmt_ms(percentile(&mut pauses, 50.0)),
        None,
    );
    row(
        "  p99 (the worst)",
        "",
        &fmt_ms(percentile(&mut pauses, 99.0)),
        None,
    );
    println!(
        "    ({} listings, {} failed; the supervisor counted {}-{} ms from death to a serving worker)",
        calls.len(),
        errors.into_inner(),
        logged.iter().min().unwrap_or(&0),
        logged.iter().max().unwrap_or(&0)
    );
}
