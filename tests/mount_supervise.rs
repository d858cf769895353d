//! Supervised mounts (the default): the worker serving a mount is killed (kill -9) while tools
//! use the mount, and a new one takes over without them seeing an error; SIGTERM to the supervisor unmounts; a
//! worker that keeps dying ends the mount. Real binary over FUSE, checked against the server.

mod support;

use std::io::{BufRead, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

/// The processes serving the mount on `dir`: (supervisor, worker). The worker is the one whose
/// parent is the other.
fn processes(dir: &Path) -> (Option<u32>, Option<u32>) {
    let ours = mount_processes(dir);
    let worker = ours
        .iter()
        .find(|(_, ppid)| ours.iter().any(|(p, _)| p == ppid))
        .map(|(p, _)| *p);
    let supervisor = ours
        .iter()
        .find(|(p, _)| Some(*p) != worker)
        .map(|(p, _)| *p);
    (supervisor, worker)
}

/// Run `cmd` (a shell command), killing the worker three times 300 ms apart while it runs; it
/// must exit 0.
fn run_while_killing_workers(m: &Mount, cmd: &str) {
    let mut child = Command::new("sh").arg("-c").arg(cmd).spawn().unwrap();
    let kills: u32 = std::env::var("KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(if kills > 3 { 120 } else { 300 }));
        if child.try_wait().unwrap().is_some() {
            break;
        }
        kill_worker(m);
    }
    assert!(child.wait().unwrap().success(), "{cmd} failed");
}

/// `small` normally; `full` with S3MOUNT_TEST_FULL=1: the sizes issue 16 asks of the proofs
/// (a 1 GiB read, 300 MiB of random preads, a 300 MiB stream, a 50 MiB in-place edit, 2,000
/// files), run by hand (`S3MOUNT_TEST_FULL=1 cargo test --release --test mount_supervise`).
fn size(small: usize, full: usize) -> usize {
    if std::env::var_os("S3MOUNT_TEST_FULL").is_some() {
        full
    } else {
        small
    }
}

/// Nothing is left in the state directory `staging` (under --staging-dir) of a mount whose
/// workers died: no staging file, no local copy of a stream, no `.info` (a later mount would
/// report them as data not uploaded).
fn assert_no_local_copies_left(staging: &Path) {
    let state = state_dir(staging);
    let left: Vec<String> = [state.clone(), state.join("spool")]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lock" && n != "mount.info")
        .collect();
    assert!(left.is_empty(), "left in {}: {left:?}", state.display());
}

/// A mount whose workers the test kills at will (up to 100 deaths a minute), its state
/// directory under `staging`.
fn killable_mount(s: &S3Server, bucket: &str, staging: &Path) -> Mount {
    Mount::with_env(
        s,
        &s.endpoint,
        bucket,
        &["--staging-dir", staging.to_str().unwrap()],
        &[("S3MOUNT_MAX_WORKER_DEATHS", Some("100"))],
    )
}

/// Three directories of `per_dir` files each at `root`, of lengths growing by `stride`, modes
/// 0640 and 0600 in turn (for the kill tests of tar and rsync, which restore them).
fn tree_with_modes(root: &Path, per_dir: usize, stride: usize) {
    for d in 0..3u64 {
        let dir = root.join(format!("d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..per_dir as u64 {
            let p = dir.join(format!("f{i}"));
            std::fs::write(&p, pattern(50 + i as usize * stride, d * 1000 + i)).unwrap();
            let mode = if i % 2 == 0 { 0o640 } else { 0o600 };
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .unwrap();
        }
    }
}

/// The permission bits of `path` are `mode`.
fn assert_mode(path: &Path, mode: u32) {
    let perms = std::fs::metadata(path).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&perms) & 0o777,
        mode,
        "{}",
        path.display()
    );
}

/// `diff -r a b` finds nothing.
fn assert_same_tree(a: &Path, b: &Path) {
    let diff = sh(&format!("diff -r {} {}", a.display(), b.display()));
    assert!(
        diff.status.success(),
        "{}",
        String::from_utf8_lossy(&diff.stdout)
    );
}

/// SIGKILL to `pid`, without starting a process: a fork and exec here would close (and so
/// flush, which commits) every descriptor the test holds open on the mount.
fn kill9(pid: u32) {
    // SAFETY: kill(2) with a pid and a valid signal; no memory is involved.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
}

/// Kill the worker with SIGKILL and wait (10 s at most) until another one serves.
fn kill_worker(m: &Mount) -> u32 {
    let restarts = |m: &Mount| {
        std::fs::read_to_string(&m.log)
            .unwrap_or_default()
            .matches("worker restarted")
            .count()
    };
    let before = restarts(m);
    let (_, worker) = processes(m.path());
    let old = worker.expect("a worker process");
    kill9(old);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let (_, Some(new)) = processes(m.path()) {
            if new != old && restarts(m) > before {
                return new;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no new worker after killing {old}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_killed_worker_is_replaced_while_listings_and_reads_go_on() {
    let s = server();
    let bucket = s.new_bucket();
    for d in 0..4 {
        for f in 0..10 {
            s.put(&bucket, &format!("tree/d{d}/f{f}"), format!("{d}-{f}"));
        }
    }
    let big = pattern(size(48 << 20, 1 << 30), 16);
    s.put(&bucket, "big.bin", big.clone());
    let runtime = tempfile::tempdir().unwrap();
    let rt = runtime.path().to_str().unwrap();
    let m = Mount::with_env(
        s,
        &s.endpoint,
        &bucket,
        &["--supervise"],
        &[("S3MOUNT_RUNTIME_DIR", Some(rt))],
    );
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        // `ls -lR` over and over: every run lists everything, none fails.
        let lister = scope.spawn(|| {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = sh(&format!("ls -lR {}", m.join("tree").display()));
                assert!(
                    out.status.success(),
                    "ls -lR failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let listed = String::from_utf8_lossy(&out.stdout);
                assert_eq!(listed.matches(" f").count(), 40, "{listed}");
                runs += 1;
            }
            runs
        });
        // One descriptor reads the big file slowly from start to end, across the deaths.
        let reader = scope.spawn(|| {
            let f = std::fs::File::open(m.join("big.bin")).unwrap();
            let mut got = vec![0u8; big.len()];
            for (i, chunk) in got.chunks_mut(1 << 20).enumerate() {
                f.read_exact_at(chunk, (i << 20) as u64)
                    .unwrap_or_else(|e| panic!("read at {} MiB: {e}", i));
                // About 3 s in all, across the three deaths.
                std::thread::sleep(Duration::from_micros(3_000_000 / (big.len() >> 20) as u64));
            }
            sha256(&got)
        });
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(700));
            kill_worker(&m);
        }
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let runs = lister.join().expect("lister");
        assert!(runs >= 3, "{runs} listings");
        assert_eq!(reader.join().expect("reader"), sha256(&big));
    });
    // The new worker serves writes, and the bucket has them.
    std::fs::write(m.join("after.txt"), b"written after the restarts").unwrap();
    assert_eq!(
        s.get(&bucket, "after.txt").as_deref(),
        Some(&b"written after the restarts"[..])
    );
    let log = std::fs::read_to_string(&m.log).unwrap_or_default();
    assert_eq!(log.matches("worker restarted").count(), 3, "{log}");
    assert!(log.contains("SIGKILL"), "the cause is logged");
    // `s3mount status` tells the restarts, their cause and the pause.
    let out = Command::new(s3mount_bin())
        .args(["status", m.path().to_str().unwrap()])
        .env("S3MOUNT_RUNTIME_DIR", rt)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("restarted 3 times"), "{text}");
    assert!(text.contains("SIGKILL"), "{text}");
}

/// Files open for writing when the worker dies go on in the next one: a streamed write (40
/// MiB, killed after three fifths; 300 MiB at full size) and an object modified in place both end byte-exact in the bucket,
/// and no multipart upload is left open. The writer is a process of its own: a fork by any
/// other test of this process would close (flush, which commits) the descriptors it holds.
#[test]
fn files_being_written_when_the_worker_dies_go_on_byte_exact() {
    let s = server();
    let bucket = s.new_bucket();
    let original = pattern(size(3 << 20, 50 << 20), 7);
    s.put(&bucket, "doc.bin", original.clone());
    let m = Mount::new(s, &bucket, &[]);
    let data = pattern(size(40 << 20, 300 << 20), 8);
    let src = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(src.path(), &data).unwrap();
    let script = r#"
import os, sys
data = open(sys.argv[1], 'rb').read()
out = os.open(sys.argv[2] + '/stream.bin', os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
edit = os.open(sys.argv[2] + '/doc.bin', os.O_RDWR)
def write_all(fd, b):
    while b:
        b = b[os.write(fd, b):]
write_all(out, data[:len(data) * 3 // 5])
os.pwrite(edit, b'before the death', 100000)
print('half', flush=True)
sys.stdin.readline()
write_all(out, data[len(data) * 3 // 5:])
os.fsync(out)
os.close(out)
os.pwrite(edit, b'after it', 2000000)
assert os.pread(edit, 16, 100000) == b'before the death'
os.close(edit)
print('done', flush=True)
"#;
    let mut child = Command::new("python3")
        .args([
            "-c",
            script,
            src.path().to_str().unwrap(),
            m.path().to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut said, &mut line).unwrap();
    assert_eq!(line.trim(), "half");
    kill_worker(&m);
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "the writer failed: {status}");
    assert_eq!(
        s.get(&bucket, "stream.bin").map(|b| sha256(&b)),
        Some(sha256(&data))
    );
    let mut want = original;
    want[100_000..100_016].copy_from_slice(b"before the death");
    want[2_000_000..2_000_008].copy_from_slice(b"after it");
    assert!(
        s.get(&bucket, "doc.bin").as_deref() == Some(&want[..]),
        "doc.bin"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        s.open_uploads(&bucket).is_empty(),
        "{:?}",
        s.open_uploads(&bucket)
    );
}

/// SIGTERM to the supervisor unmounts (the worker finishes), and both processes end.
#[test]
fn sigterm_to_the_supervisor_unmounts_and_both_processes_end() {
    let s = server();
    let bucket = s.new_bucket();
    let m = Mount::new(s, &bucket, &[]);
    std::fs::write(m.join("kept.txt"), b"kept").unwrap();
    let (supervisor, worker) = processes(m.path());
    let (supervisor, worker) = (supervisor.unwrap(), worker.unwrap());
    Command::new("kill")
        .args(["-TERM", &supervisor.to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Path::new(&format!("/proc/{supervisor}")).exists()
        || Path::new(&format!("/proc/{worker}")).exists()
    {
        assert!(Instant::now() < deadline, "processes still running");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!is_mounted(m.path()));
    assert_eq!(s.get(&bucket, "kept.txt").as_deref(), Some(&b"kept"[..]));
}

/// Five deaths within a minute: the supervisor gives up, says why, and unmounts.
#[test]
fn a_worker_that_keeps_dying_ends_the_mount() {
    let s = server();
    let bucket = s.new_bucket();
    let m = Mount::new(s, &bucket, &[]);
    for _ in 0..4 {
        kill_worker(&m);
    }
    let (supervisor, worker) = processes(m.path());
    kill9(worker.unwrap());
    let supervisor = supervisor.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{supervisor}")).exists() || is_mounted(m.path()) {
        assert!(Instant::now() < deadline, "still mounted");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(&m.log).unwrap_or_default();
    assert!(log.contains("5 workers died within a minute"), "{log}");
}

/// `s3mount upgrade` with files open: the worker hands the mount over at once for a file being
/// written whose bytes are all local (it goes on in the new worker, byte-exact), waits for one
/// past --spool-limit to close, and a descriptor open for reading reads on.
#[test]
fn upgrade_hands_over_files_being_written_and_waits_for_ones_not_local() {
    let s = server();
    let bucket = s.new_bucket();
    s.put(&bucket, "read.txt", "read before and after");
    let runtime = tempfile::tempdir().unwrap();
    let rt = runtime.path().to_str().unwrap();
    let m = Mount::with_env(
        s,
        &s.endpoint,
        &bucket,
        &["--spool-limit", "1MiB"],
        &[("S3MOUNT_RUNTIME_DIR", Some(rt))],
    );
    let reader = std::fs::File::open(m.join("read.txt")).unwrap();
    let mut head = [0u8; 4];
    reader.read_exact_at(&mut head, 0).unwrap();
    // One process holds both files (a descriptor of this test would be flushed, so committed,
    // by the fork of `s3mount upgrade`) and writes on command.
    let script = r#"import os,sys
new=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT|os.O_TRUNC)
big=os.open(sys.argv[2], os.O_WRONLY|os.O_CREAT|os.O_TRUNC)
os.write(new, b'written before the upgrade, ')
os.write(big, bytes(range(256))*(3*4096))
print('ready', flush=True)
for line in sys.stdin:
    if line.strip()=='close big':
        os.close(big); print('closed', flush=True)
    else:
        os.write(new, b'and after it'); os.close(new); print('done', flush=True); break
"#;
    let mut writer = Command::new("python3")
        .args([
            "-c",
            script,
            m.join("new.txt").to_str().unwrap(),
            m.join("big.bin").to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_writer = writer.stdin.take().unwrap();
    let mut from_writer = std::io::BufReader::new(writer.stdout.take().unwrap()).lines();
    let mut said = |what: &str| {
        let line = from_writer.next().expect("writer output").unwrap();
        assert_eq!(line, what);
    };
    said("ready");
    let (_, before) = processes(m.path());
    let mut upgrade = Command::new(s3mount_bin())
        .args(["upgrade", m.path().to_str().unwrap(), "--timeout", "30"])
        .env("S3MOUNT_RUNTIME_DIR", rt)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // big.bin is past --spool-limit: not all local, so the upgrade waits for it.
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        upgrade.try_wait().unwrap().is_none(),
        "handed over with a file that cannot go on"
    );
    assert_eq!(processes(m.path()).1, before);
    writeln!(to_writer, "close big").unwrap();
    said("closed");
    let out = upgrade.wait_with_output().unwrap();
    let told = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{told}");
    assert!(told.contains("handed over"), "{told}");
    assert_ne!(processes(m.path()).1, before, "a new worker serves");
    // new.txt was still open: it goes on in the new worker.
    assert_eq!(
        s.get(&bucket, "new.txt"),
        None,
        "not committed before its close"
    );
    writeln!(to_writer, "finish").unwrap();
    said("done");
    assert!(writer.wait().unwrap().success());
    assert_eq!(
        s.get(&bucket, "new.txt").as_deref(),
        Some(&b"written before the upgrade, and after it"[..])
    );
    assert_eq!(s.get(&bucket, "big.bin").map(|b| b.len()), Some(3 << 20));
    let mut rest = [0u8; 17];
    reader.read_exact_at(&mut rest, 4).unwrap();
    assert_eq!(&rest, b" before and after");
    assert!(s.open_uploads(&bucket).is_empty());
}

/// With --no-supervise there is nothing to hand over to: `s3mount upgrade` says so (exit 2)
/// and the mount (which ignores the signal) goes on.
#[test]
fn upgrade_of_an_unsupervised_mount_says_how_to_get_the_new_binary() {
    let s = server();
    let bucket = s.new_bucket();
    let runtime = tempfile::tempdir().unwrap();
    let rt = runtime.path().to_str().unwrap();
    let m = Mount::with_env(
        s,
        &s.endpoint,
        &bucket,
        &["--no-supervise"],
        &[("S3MOUNT_RUNTIME_DIR", Some(rt))],
    );
    let out = Command::new(s3mount_bin())
        .args(["upgrade", m.path().to_str().unwrap()])
        .env("S3MOUNT_RUNTIME_DIR", rt)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("with --no-supervise"));
    std::fs::write(m.join("still.txt"), b"here").unwrap();
    assert_eq!(s.get(&bucket, "still.txt").as_deref(), Some(&b"here"[..]));
}

/// Random-offset preads of one descriptor across three worker deaths, every byte checked.
#[test]
fn random_preads_go_on_across_worker_deaths_byte_exact() {
    let s = server();
    let bucket = s.new_bucket();
    let data = pattern(size(32 << 20, 300 << 20), 31);
    s.put(&bucket, "random.bin", data.clone());
    let m = Mount::new(s, &bucket, &[]);
    let f = std::fs::File::open(m.join("random.bin")).unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            let mut reads = 0u32;
            let mut buf = vec![0u8; 64 << 10];
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = 1 + (x % (64 << 10)) as usize;
                let off = (x >> 20) as usize % (data.len() - len);
                f.read_exact_at(&mut buf[..len], off as u64)
                    .unwrap_or_else(|e| panic!("pread of {len} at {off}: {e}"));
                assert!(buf[..len] == data[off..off + len], "bytes at {off}");
                reads += 1;
            }
            reads
        });
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(500));
            kill_worker(&m);
        }
        std::thread::sleep(Duration::from_millis(300));
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let reads = reader.join().expect("reader");
        // Reads went on across the deaths (moto serves a range of a 300 MiB object slowly:
        // 10 in the window at full size).
        assert!(reads > size(20, 5) as u32, "{reads} reads");
    });
}

/// kill -9 of the supervisor itself is not recovered, but nothing is worse than a crash: the
/// worker goes on serving until it ends, then the mount is dead and `s3mount status` says so.
#[test]
fn a_killed_supervisor_leaves_the_worker_serving_then_a_dead_mount() {
    let s = server();
    let bucket = s.new_bucket();
    let runtime = tempfile::tempdir().unwrap();
    let rt = runtime.path().to_str().unwrap();
    let m = Mount::with_env(
        s,
        &s.endpoint,
        &bucket,
        &[],
        &[("S3MOUNT_RUNTIME_DIR", Some(rt))],
    );
    let (supervisor, worker) = processes(m.path());
    kill9(supervisor.unwrap());
    std::thread::sleep(Duration::from_millis(200));
    std::fs::write(m.join("still.txt"), b"served by the worker").unwrap();
    assert_eq!(
        s.get(&bucket, "still.txt").as_deref(),
        Some(&b"served by the worker"[..])
    );
    kill9(worker.unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let err = std::fs::metadata(m.join("still.txt")).err();
        if err.as_ref().and_then(|e| e.raw_os_error()) == Some(libc::ENOTCONN) {
            break;
        }
        assert!(Instant::now() < deadline, "mount not dead: {err:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = Command::new(s3mount_bin())
        .args(["status", m.path().to_str().unwrap()])
        .env("S3MOUNT_RUNTIME_DIR", rt)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{:?}", out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("DEAD"));
}

/// `cp -r` of 500 small files into the mount, the worker killed three times meanwhile: `cp`
/// exits 0, and the mount (read back through a new worker) and the bucket hold exactly what
/// was copied, with no upload left open.
#[test]
fn cp_into_the_mount_survives_worker_deaths() {
    let s = server();
    let bucket = s.new_bucket();
    let staging = tempfile::tempdir().unwrap();
    let m = killable_mount(s, &bucket, staging.path());
    let src = tempfile::tempdir().unwrap();
    let files = src.path().join("files");
    std::fs::create_dir(&files).unwrap();
    let count = size(500, 2000) as u64;
    for i in 0..count {
        std::fs::write(
            files.join(format!("f{i}")),
            pattern(100 + (i as usize % 500) * 13, i),
        )
        .unwrap();
    }
    let cmd = format!("cp -r {} {}", files.display(), m.join("copied").display());
    run_while_killing_workers(&m, &cmd);
    assert_same_tree(&files, &m.join("copied"));
    // Every file is in the bucket too (a file whose close never reached the worker would be
    // served from memory by the mount and missing there).
    for i in 0..count {
        assert_eq!(
            s.get(&bucket, &format!("copied/f{i}")).map(|b| b.len()),
            Some(100 + (i as usize % 500) * 13),
            "copied/f{i}"
        );
    }
    assert!(s.open_uploads(&bucket).is_empty());
    // No local copy is left behind (a later mount would report it as data not uploaded).
    assert_no_local_copies_left(staging.path());
}

/// `rsync -a` into the mount while the worker is killed: every file is written to a temporary
/// name and renamed, so deaths land between writes, closes, attribute changes and renames.
/// rsync exits 0, the tree arrives exact with its modes, no temporary name is left in the
/// bucket, and nothing is left in the state directory.
#[test]
fn rsync_into_the_mount_survives_worker_deaths() {
    let s = server();
    let bucket = s.new_bucket();
    let staging = tempfile::tempdir().unwrap();
    let m = killable_mount(s, &bucket, staging.path());
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("tree");
    tree_with_modes(&tree, size(100, 700), 31);
    let cmd = format!("rsync -a {}/ {}/", tree.display(), m.join("r").display());
    run_while_killing_workers(&m, &cmd);
    assert_same_tree(&tree, &m.join("r"));
    assert_mode(&m.join("r/d1/f5"), 0o600);
    assert_no_temporary_names(&s.keys(&bucket));
    assert_no_local_copies_left(staging.path());
}

/// `tar xpf` of a tree of 600 files (modes restored) into the mount, the worker killed three
/// times meanwhile: tar exits 0 (its chmod, chown and utime of the file being written at each
/// death find it) and the mount holds exactly the tree, modes included.
#[test]
fn tar_into_the_mount_survives_worker_deaths() {
    let s = server();
    let bucket = s.new_bucket();
    let staging = tempfile::tempdir().unwrap();
    let m = killable_mount(s, &bucket, staging.path());
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("tree");
    tree_with_modes(&tree, size(200, 700), 29);
    let tarball = src.path().join("tree.tar");
    assert!(sh(&format!(
        "tar cf {} -C {} .",
        tarball.display(),
        tree.display()
    ))
    .status
    .success());
    std::fs::create_dir(m.join("untar")).unwrap();
    let cmd = format!(
        "tar xpf {} -C {}",
        tarball.display(),
        m.join("untar").display()
    );
    run_while_killing_workers(&m, &cmd);
    assert_same_tree(&tree, &m.join("untar"));
    assert_mode(&m.join("untar/d2/f7"), 0o600);
    assert_no_local_copies_left(staging.path());
}
