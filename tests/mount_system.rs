//! s3mount as a system filesystem: mount(8) with -t and with an fstab file, and signals.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// mount(8) runs /sbin/mount.TYPE; point it at the binary under test.
fn install_helper() {
    let link = std::path::Path::new("/usr/sbin/mount.s3mount");
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(s3mount_bin(), link)
        .expect("install /usr/sbin/mount.s3mount (tests run as root)");
}

fn options(server: &S3Server) -> String {
    format!(
        "endpoint_url={},region={},force_path_style,_netdev,nofail",
        server.endpoint, server.region
    )
}

#[test]
fn mount_t_s3mount_and_fstab() {
    require_fuse();
    install_helper();
    let server = server();
    let bucket = server.new_bucket();
    server.put(&bucket, "logs/today.txt", "from mount(8)");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("mount")
        .args([
            "-t",
            "s3mount",
            &format!("{bucket}:/logs"),
            dir.path().to_str().unwrap(),
            "-o",
        ])
        .arg(format!("{},ro", options(server)))
        .envs(server.env())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read(dir.path().join("today.txt")).unwrap(),
        b"from mount(8)"
    );
    assert!(
        std::fs::write(dir.path().join("x"), "1").is_err(),
        "ro honoured"
    );
    assert!(
        umount_patiently(dir.path()),
        "umount {}",
        dir.path().display()
    );

    // The same through an fstab line and `mount DIR`.
    let fstab = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        fstab.path(),
        format!(
            "# test fstab\n{bucket}:/logs {} s3mount {},allow_other 0 0\n",
            dir.path().display(),
            options(server)
        ),
    )
    .unwrap();
    let out = Command::new("mount")
        .arg("-T")
        .arg(fstab.path())
        .arg(dir.path())
        .envs(server.env())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read(dir.path().join("today.txt")).unwrap(),
        b"from mount(8)"
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        mounts
            .lines()
            .any(|l| l.contains(dir.path().to_str().unwrap()) && l.contains("allow_other")),
        "{mounts}"
    );
    assert!(
        umount_patiently(dir.path()),
        "umount {}",
        dir.path().display()
    );
}

/// `s3mount BUCKET DIR -f` against `server`, with `env` added, its log discarded.
fn foreground(
    server: &S3Server,
    bucket: &str,
    dir: &std::path::Path,
    env: &[(&str, &str)],
) -> std::process::Child {
    let mut args: Vec<String> = vec![bucket.to_string(), dir.display().to_string(), "-f".into()];
    args.extend(server.args());
    Command::new(s3mount_bin())
        .args(&args)
        .envs(server.env())
        .envs(env.iter().copied())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// systemd's `Type=notify`: READY=1 only once the mount answers, STOPPING=1 when it ends; the
/// connection goes to systemd's file descriptor store in between (FDSTORE=1) and out of it at
/// the end. Both socket forms systemd uses: a path, and an abstract name (`@...`).
#[test]
fn systemd_is_told_when_the_mount_is_ready_and_when_it_stops() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    require_fuse();
    let server = server();
    let bucket = server.new_bucket();
    server.put(&bucket, "hello.txt", "hi");
    let sockdir = tempfile::tempdir().unwrap();
    let path = sockdir.path().join("notify");
    let abstract_name = format!("s3mount-test-{}", std::process::id());
    let sockets = [
        (
            UnixDatagram::bind(&path).unwrap(),
            path.display().to_string(),
        ),
        (
            UnixDatagram::bind_addr(
                &SocketAddr::from_abstract_name(abstract_name.as_bytes()).unwrap(),
            )
            .unwrap(),
            format!("@{abstract_name}"),
        ),
    ];
    for (sock, env) in sockets {
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut daemon = foreground(server, &bucket, dir.path(), &[("NOTIFY_SOCKET", &env)]);
        let mut buf = [0u8; 256];
        let mut next = || {
            let n = sock.recv(&mut buf).expect("nothing from the daemon");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        assert_eq!(next(), "READY=1", "{env}");
        // Ready means answering: no waiting needed.
        assert!(is_mounted(dir.path()), "{env}");
        assert_eq!(std::fs::read(dir.path().join("hello.txt")).unwrap(), b"hi");
        // Then the supervisor's copy of the connection for systemd's store.
        let stored = next();
        assert!(
            stored.starts_with("FDSTORE=1\nFDNAME=s3mount-fuse"),
            "{stored}"
        );
        assert!(umount_patiently(dir.path()));
        assert_eq!(next(), "STOPPING=1", "{env}");
        // A clean end takes it out of the store.
        assert_eq!(
            next(),
            stored.replace("FDSTORE=1", "FDSTOREREMOVE=1"),
            "{env}"
        );
        assert!(daemon.wait().unwrap().success());
    }
}

/// systemd's side of a `Type=notify` unit with a file descriptor store, for the tests below
/// (systemd is not PID 1 on the test machines): it starts the command with $NOTIFY_SOCKET,
/// keeps the descriptor sent with FDSTORE=1, prints `ready NAME COUNT`; on a line from the
/// test it kills every process of the service and starts it again with the descriptor in
/// $LISTEN_FDS/$LISTEN_FDNAMES/$LISTEN_PID (sd_listen_fds(3); $RESTART_EXTRA appended to the
/// arguments), prints `ready again` at its READY=1; on the next line it sends SIGTERM and
/// prints `stopped STATUS LINE COUNT` with the second line of the FDSTOREREMOVE=1 message and
/// the descriptors left in the store. FDSTOREREMOVE=1 closes a stored descriptor, as systemd
/// does.
const SYSTEMD: &str = r#"
import os, signal, socket, sys, time
path, cmd = sys.argv[1], sys.argv[2:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
s.settimeout(60)
def start(fd=None, name=None, extra=()):
    pid = os.fork()
    if pid == 0:
        # Not the test's pipe: the test reads this program's stdout until it ends.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        env = dict(os.environ, NOTIFY_SOCKET=path)
        if fd is not None:
            os.dup2(fd, 3)
            # Only descriptor 3, as systemd passes it (ours would be inherited too).
            for f in store.values():
                if f != 3:
                    os.close(f)
            env.update(LISTEN_FDS='1', LISTEN_FDNAMES=name, LISTEN_PID=str(os.getpid()))
        os.execvpe(cmd[0], cmd + list(extra), env)
    return pid
store = {}
def wait_for(prefix):
    while True:
        msg, fds, _, _ = socket.recv_fds(s, 4096, 4)
        text = msg.decode()
        fields = dict(l.split('=', 1) for l in text.split('\n') if '=' in l)
        if fields.get('FDSTORE') == '1' and fds:
            old = store.get(fields.get('FDNAME', 'stored'))
            if old is not None:
                os.close(old)
            store[fields.get('FDNAME', 'stored')] = fds.pop(0)
        if fields.get('FDSTOREREMOVE') == '1':
            f = store.pop(fields.get('FDNAME'), None)
            if f is not None:
                os.close(f)
        for f in fds:
            os.close(f)
        if text.startswith(prefix):
            return text
def children(pid):
    out = []
    for p in os.listdir('/proc'):
        try:
            if p.isdigit() and open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[1] == str(pid):
                out.append(int(p))
        except OSError:
            pass
    return out
sup = start()
wait_for('READY=1')
wait_for('FDSTORE=1')
(name, fd), = store.items()
print('ready', name, len(store), flush=True)
sys.stdin.readline()
workers = children(sup)
os.kill(sup, signal.SIGKILL)
for w in workers:
    os.kill(w, signal.SIGKILL)
os.waitpid(sup, 0)
time.sleep(0.3)
sup = start(fd, name, os.environ.get('RESTART_EXTRA', '').split())
wait_for('READY=1')
print('ready again', flush=True)
sys.stdin.readline()
os.kill(sup, signal.SIGTERM)
text = wait_for('FDSTOREREMOVE=1')
_, status = os.waitpid(sup, 0)
print('stopped', os.waitstatus_to_exitcode(status), text.split('\n')[1], len(store), flush=True)
"#;

/// [`SYSTEMD`] running s3mount on `dir`: what the tests tell it and hear from it.
struct FakeSystemd {
    child: std::process::Child,
    tell: std::process::ChildStdin,
    hear: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    log: std::path::PathBuf,
    _sockdir: tempfile::TempDir,
}

impl FakeSystemd {
    /// Start it on `bucket` mounted at `dir`; `restart_extra` is added to the arguments of
    /// the start after the crash.
    fn start(server: &S3Server, bucket: &str, dir: &std::path::Path, restart_extra: &str) -> Self {
        let sockdir = tempfile::tempdir().unwrap();
        let log = sockdir.path().join("log");
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(SYSTEMD)
            .arg(sockdir.path().join("notify"))
            .arg(s3mount_bin())
            .arg(bucket)
            .arg(dir)
            .arg("-f")
            .args(server.args())
            .envs(server.env())
            .env("RESTART_EXTRA", restart_extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let tell = child.stdin.take().unwrap();
        let hear = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
        FakeSystemd {
            child,
            tell,
            hear,
            log,
            _sockdir: sockdir,
        }
    }

    /// Its next line (its log, s3mount's stderr included, if it ended).
    fn next(&mut self) -> String {
        match self.hear.next() {
            Some(line) => line.unwrap(),
            None => panic!(
                "systemd ended: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            ),
        }
    }

    fn say(&mut self, line: &str) {
        std::io::Write::write_all(&mut self.tell, format!("{line}\n").as_bytes()).unwrap();
    }
}

/// The id /proc/self/mountinfo gives the mount on `dir`, if any.
fn mount_id(dir: &std::path::Path) -> Option<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == dir.to_str())
        .map(|l| l.split(' ').next().unwrap().to_string())
}

/// What systemd does with the unit's file descriptor store when the whole service dies (the
/// supervisor too, as an OOM kill of the service), played by a small python program since
/// systemd is not PID 1 here: it keeps the descriptor the supervisor stored (FDSTORE=1), kills
/// every process of the service, and starts s3mount again with the descriptor in
/// $LISTEN_FDS/$LISTEN_FDNAMES (sd_listen_fds(3)). The new one serves the same mount (same
/// mount id, a descriptor opened before the crash reads on, no ENOTCONN), and a stop after
/// that unmounts and takes the descriptor out of the store.
#[test]
fn a_service_restarted_by_systemd_serves_the_same_mount_again() {
    require_fuse();
    let server = server();
    let bucket = server.new_bucket();
    let data = pattern(4 << 20, 77);
    server.put(&bucket, "data.bin", data.clone());
    let dir = tempfile::tempdir().unwrap();
    let mut systemd = FakeSystemd::start(server, &bucket, dir.path(), "");
    let ready = systemd.next();
    assert!(
        ready.starts_with("ready s3mount-fuse") && ready.ends_with(" 1"),
        "{ready}"
    );
    let before = mount_id(dir.path()).expect("mounted");
    let f = std::fs::File::open(dir.path().join("data.bin")).unwrap();
    let mut head = vec![0u8; 1 << 20];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0).unwrap();
    assert!(head == data[..1 << 20]);

    systemd.say("crash");
    assert_eq!(systemd.next(), "ready again");
    assert_eq!(
        mount_id(dir.path()).as_deref(),
        Some(&*before),
        "the same mount, not a new one"
    );
    let mut rest = vec![0u8; data.len() - (1 << 20)];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut rest, 1 << 20).unwrap();
    assert!(
        rest == data[1 << 20..],
        "read on through the descriptor opened before"
    );
    drop(f);
    std::fs::write(dir.path().join("after.txt"), b"written after the restart").unwrap();
    assert_eq!(
        server.get(&bucket, "after.txt").as_deref(),
        Some(&b"written after the restart"[..])
    );

    systemd.say("stop");
    let stopped = systemd.next();
    assert!(
        stopped.starts_with("stopped 0 FDNAME=s3mount-fuse") && stopped.ends_with(" 0"),
        "{stopped}: {}",
        std::fs::read_to_string(&systemd.log).unwrap_or_default()
    );
    assert!(systemd.child.wait().unwrap().success());
    assert!(mount_id(dir.path()).is_none(), "unmounted by the stop");
}

/// The same restart with `--no-supervise` added: such a daemon cannot serve the kept
/// connection, so it gives it up (out of the store, unmounted) and mounts afresh, instead of
/// hanging on the mount point nobody serves.
#[test]
fn a_restart_with_no_supervise_gives_the_kept_mount_up_and_mounts_again() {
    require_fuse();
    let server = server();
    let bucket = server.new_bucket();
    server.put(&bucket, "f.txt", "still here");
    let dir = tempfile::tempdir().unwrap();
    let mut systemd = FakeSystemd::start(server, &bucket, dir.path(), "--no-supervise");
    assert!(systemd.next().starts_with("ready s3mount-fuse"));
    let old = std::fs::File::open(dir.path().join("f.txt")).unwrap();
    systemd.say("crash");
    assert_eq!(systemd.next(), "ready again");
    assert!(mount_id(dir.path()).is_some(), "mounted again");
    // A descriptor of the old mount is dead (its connection is gone); the new mount serves.
    let mut buf = [0u8; 4];
    assert!(std::os::unix::fs::FileExt::read_at(&old, &mut buf, 0).is_err());
    assert_eq!(
        std::fs::read(dir.path().join("f.txt")).unwrap(),
        b"still here"
    );
    assert!(umount_patiently(dir.path()));
    let _ = systemd.child.kill();
    let _ = systemd.child.wait();
}

#[test]
fn sigterm_during_a_large_write_leaves_the_object_complete_or_absent() {
    require_fuse();
    let server = server();
    let bucket = server.new_bucket();
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = foreground(server, &bucket, dir.path(), &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !is_mounted(dir.path()) {
        assert!(Instant::now() < deadline, "mount did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let body = pattern(64 << 20, 3);
    let src = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(src.path(), &body).unwrap();
    // A slow writer: 64 chunks of 1 MiB, 20 ms apart.
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "for i in $(seq 0 63); do dd if='{}' bs=1M skip=$i count=1 2>/dev/null; sleep 0.02; done > '{}/big'",
            src.path().display(),
            dir.path().display()
        ))
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    // SAFETY: kill(2) of the child this test started.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let _ = writer.wait();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            assert!(status.success(), "daemon exit status {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "daemon did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!is_mounted(dir.path()));
    match server.get(&bucket, "big") {
        None => {}
        Some(got) => assert!(
            got == body,
            "object is complete or absent, never partial ({} bytes)",
            got.len()
        ),
    }
    assert!(
        server.open_uploads(&bucket).is_empty(),
        "no multipart upload left open"
    );
}

#[test]
fn kill_9_keeps_the_old_object_and_reports_staged_changes_at_next_mount() {
    require_fuse();
    let server = garage();
    let bucket = server.new_bucket();
    let old = pattern(12 << 20, 8);
    server.put(&bucket, "big", old.clone());
    server.put(&bucket, "doc", "0123456789");
    let staging = tempfile::tempdir().unwrap();
    let st = staging.path().to_str().unwrap();
    let m = Mount::new(
        server,
        &bucket,
        &["--staging-dir", st, "--part-size", "5MiB"],
    );
    // Find the daemon first: a fork+exec while files are open would close inherited copies of
    // their descriptors, and every close flushes (commits) a FUSE file.
    // Every process of the mount (supervisor and worker): the crash here is one no supervisor
    // survives (both killed, as an OOM kill of the whole service).
    let pids = m.daemon_pids();
    assert!(!pids.is_empty(), "no daemon");
    // A replacement streaming in, and an in-place edit, both unfinished, held open by child
    // processes (descriptors of this test process would be flushed by other threads' forks).
    let src = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(src.path(), pattern(11 << 20, 9)).unwrap();
    // One process (a shell would fork `cat`, whose exit closes, and so flushes, the file).
    let mut writer = Command::new("python3")
        .args([
            "-c",
            "import os,sys,time\nfd=os.open(sys.argv[2], os.O_WRONLY|os.O_TRUNC)\nos.write(fd, open(sys.argv[1],'rb').read())\ntime.sleep(60)\n",
            src.path().to_str().unwrap(),
            m.join("big").to_str().unwrap(),
        ])
        .spawn()
        .unwrap();
    let mut editor = Command::new("python3")
        .args(["-c", "import os,sys,time\nfd=os.open(sys.argv[1], os.O_WRONLY)\nos.pwrite(fd, b'XY', 3)\ntime.sleep(60)\n", m.join("doc").to_str().unwrap()])
        .spawn()
        .unwrap();
    // Wait until both are under way: the edit staged, the replacement's first part uploaded.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while files_in(&state_dir(staging.path())) < 2 || server.open_uploads(&bucket).is_empty() {
        assert!(std::time::Instant::now() < deadline, "writes did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    for pid in pids {
        // SAFETY: kill(2) of a process this test started.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    std::thread::sleep(Duration::from_millis(200));
    let _ = writer.kill();
    let _ = editor.kill();
    let _ = writer.wait();
    let _ = editor.wait();
    let _ = Command::new("umount").arg("-l").arg(m.path()).status();
    // The replaced object is intact (the new one was never completed), the edit not applied.
    assert!(server.get(&bucket, "big").unwrap() == old);
    assert_eq!(server.get(&bucket, "doc").unwrap(), b"0123456789");
    // The next mount reports the staged edit (with the key it belongs to) and deletes nothing.
    let m2 = Mount::new(server, &bucket, &["--staging-dir", st]);
    let log = std::fs::read_to_string(&m2.log).unwrap();
    assert!(
        log.contains("found data not uploaded by an earlier run") && log.contains("key: doc"),
        "{log}"
    );
    // The streamed replacement's local copy (its shipped parts) is reported too.
    assert!(log.contains("key: big"), "{log}");
    assert!(
        log.contains("multipart upload left open") || server.open_uploads(&bucket).is_empty(),
        "{log}"
    );
    assert!(
        files_in(&state_dir(staging.path())) >= 2,
        "staged file and its sidecar kept"
    );
}

#[test]
fn secrets_never_reach_the_log_even_at_trace_level() {
    require_fuse();
    let server = garage();
    let bucket = server.new_bucket();
    server.put(&bucket, "f", "x");
    let m = Mount::with_env(
        server,
        &server.endpoint,
        &bucket,
        &[],
        &[("S3MOUNT_LOG", Some("trace"))],
    );
    std::fs::write(m.join("g"), "y").unwrap();
    assert_eq!(std::fs::read(m.join("f")).unwrap(), b"x");
    let _ = std::fs::read_dir(m.path()).unwrap().count();
    drop(std::fs::metadata(m.join("missing")));
    let log = std::fs::read_to_string(&m.log).unwrap();
    assert!(
        log.len() > 1000,
        "trace logging was on: {} bytes",
        log.len()
    );
    assert!(
        !log.contains(&server.secret_key),
        "the secret key appears in the log"
    );
    assert!(
        !log.to_ascii_lowercase().contains("x-amz-signature="),
        "a presigned URL appears in the log"
    );
    assert!(
        !log.contains("Signature="),
        "a request signature appears in the log"
    );
}

/// Run `script` with sh as uid/gid 65534 (nobody); returns (exit code, stderr).
fn as_nobody(script: &str) -> (i32, String) {
    use std::os::unix::process::CommandExt;
    let out = Command::new("sh")
        .args(["-c", script])
        .uid(65534)
        .gid(65534)
        .current_dir("/")
        .output()
        .expect("run sh as nobody");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Security defaults through the real binary: without --allow-other nobody but the mounting
/// user gets in; with it, the kernel enforces each file's mode bits (default_permissions); the
/// data a write stages locally is 0600 under 0700 directories.
#[test]
fn other_users_are_kept_out_and_mode_bits_are_enforced() {
    use std::os::unix::fs::PermissionsExt;
    require_fuse();
    let server = server();
    let bucket = server.new_bucket();
    server.put(&bucket, "public.txt", "for everyone");
    server.put_with_meta(&bucket, "private.txt", "root only", &[("mode", "33152")]); // 0100600
    server.put(&bucket, "open/inside.txt", "x");

    // Default: another user cannot even look at the mount point.
    let m = Mount::new(server, &bucket, &["--metadata-ttl", "0"]);
    let root = m.path().display().to_string();
    assert_eq!(
        std::fs::read(m.join("public.txt")).unwrap(),
        b"for everyone"
    );
    let (code, err) = as_nobody(&format!("stat '{root}/public.txt'"));
    assert_ne!(
        code, 0,
        "nobody could stat a file of a mount without --allow-other"
    );
    assert!(err.contains("Permission denied"), "{err}");
    let (code, _) = as_nobody(&format!("ls '{root}'"));
    assert_ne!(code, 0, "nobody could list a mount without --allow-other");
    drop(m);

    // --allow-other: in, but mode bits hold.
    let staging = tempfile::tempdir().unwrap();
    let staging_dir = staging.path().join("stage");
    let m = Mount::new(
        server,
        &bucket,
        &[
            "--allow-other",
            "--metadata-ttl",
            "0",
            "--staging-dir",
            staging_dir.to_str().unwrap(),
        ],
    );
    let root = m.path().display().to_string();
    let (code, err) = as_nobody(&format!("cat '{root}/public.txt'"));
    assert_eq!(
        (code, err.as_str()),
        (0, ""),
        "a 0644 file is readable by others"
    );
    let (code, err) = as_nobody(&format!("cat '{root}/private.txt'"));
    assert_ne!(code, 0, "nobody read a 0600 file of root");
    assert!(err.contains("Permission denied"), "{err}");
    let (code, err) = as_nobody(&format!("echo overwritten > '{root}/public.txt'"));
    assert_ne!(code, 0, "nobody wrote to a 0644 file of root");
    assert!(err.contains("Permission denied"), "{err}");
    let (code, err) = as_nobody(&format!("echo new > '{root}/open/created.txt'"));
    assert_ne!(code, 0, "nobody created a file in root's 0755 directory");
    assert!(err.contains("Permission denied"), "{err}");
    let (code, _) = as_nobody(&format!("rm -f '{root}/public.txt'"));
    assert_eq!(code, 1, "nobody removed a file from root's 0755 directory");
    // The owner may give the file away; then its new mode bits count.
    std::fs::set_permissions(
        m.join("private.txt"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (code, err) = as_nobody(&format!("cat '{root}/private.txt'"));
    assert_eq!(
        (code, err.as_str()),
        (0, ""),
        "after chmod 644 the file is readable"
    );
    assert_eq!(server.get(&bucket, "public.txt").unwrap(), b"for everyone");
    assert_eq!(server.get(&bucket, "open/created.txt"), None);

    // An in-place edit stages its bytes locally: 0600 files in 0700 directories.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.join("public.txt"))
        .unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"F", 0).unwrap();
    let mut seen = Vec::new();
    let mut stack = vec![staging_dir.clone()];
    while let Some(d) = stack.pop() {
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "staging directory {} is {mode:o}", d.display());
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let mode = e.metadata().unwrap().permissions().mode() & 0o777;
                assert_eq!(
                    mode,
                    0o600,
                    "staged file {} is {mode:o}",
                    e.path().display()
                );
                seen.push(e.path());
            }
        }
    }
    assert!(
        !seen.is_empty(),
        "the in-place edit staged nothing under {staging_dir:?}"
    );
    drop(f);
    assert_eq!(server.get(&bucket, "public.txt").unwrap(), b"For everyone");
}

/// The kernel leaves clearing set-user-ID/set-group-ID to s3mount (FUSE_HANDLE_KILLPRIV_V2, so
/// that it stops asking for `security.capability` before every write): a write by an
/// unprivileged user, an unprivileged truncate and any chown clear them, as on ext4; root's
/// writes keep them.
#[test]
fn writes_truncates_and_chown_clear_set_id_bits_like_a_local_filesystem() {
    use std::os::unix::fs::PermissionsExt;
    require_fuse();
    let server = server();
    let bucket = server.new_bucket();
    let m = Mount::new(server, &bucket, &["--allow-other", "--metadata-ttl", "0"]);
    let root = m.path().display().to_string();
    let mode_of = |name: &str| {
        std::fs::metadata(m.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    for (name, mode) in [
        ("by_nobody", 0o6777),
        ("truncated", 0o6777),
        ("by_root", 0o6777),
        ("chowned", 0o4755),
        ("no_gx", 0o2766),
    ] {
        std::fs::write(m.join(name), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(m.join(name), std::fs::Permissions::from_mode(mode)).unwrap();
        assert_eq!(mode_of(name), mode, "{name}");
    }
    for (command, name, want, why) in [
        (
            "echo more >>",
            "by_nobody",
            0o0777,
            "an unprivileged write clears both",
        ),
        (
            "truncate -s 3",
            "truncated",
            0o0777,
            "an unprivileged truncate clears both",
        ),
        (
            "echo more >>",
            "no_gx",
            0o2766,
            "set-group-ID without group execute stays",
        ),
    ] {
        let (code, err) = as_nobody(&format!("{command} '{root}/{name}'"));
        assert_eq!((code, err.as_str()), (0, ""), "{command} {name}");
        assert_eq!(mode_of(name), want, "{why}");
    }
    let out = sh(&format!("echo more >> '{root}/by_root'"));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mode_of("by_root"), 0o6777, "root (CAP_FSETID) keeps them");
    let out = sh(&format!("chown 1234 '{root}/chowned'"));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        mode_of("chowned"),
        0o0755,
        "chown clears set-user-ID, even by root"
    );
    // What the bucket holds (s3fs's decimal st_mode), seen by an independent client.
    let stored = |key: &str| server.metadata(&bucket, key).get("mode").cloned();
    assert_eq!(stored("by_nobody").as_deref(), Some("33279")); // 0100777
    assert_eq!(stored("chowned").as_deref(), Some("33261")); // 0100755
    assert_eq!(
        server.get(&bucket, "by_nobody").unwrap(),
        b"#!/bin/sh\nmore\n"
    );
}

#[test]
fn an_https_endpoint_with_a_private_ca() {
    let server = server();
    let bucket = server.new_bucket();
    server.put(&bucket, "old", "through tls");
    let front = support::tls::TlsFront::start(&server.endpoint);
    let no_ca_env = [("AWS_CA_BUNDLE", None), ("SSL_CERT_FILE", None)];

    // Without the CA the certificate is not trusted: the mount is refused in one clear line.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let args = [
        bucket.as_str(),
        d,
        "--endpoint-url",
        &front.endpoint,
        "--region",
        &server.region,
        "--force-path-style",
        "--max-attempts",
        "1",
    ];
    let out = Command::new(s3mount_bin())
        .args(args)
        .envs(server.env())
        .env_remove("AWS_CA_BUNDLE")
        .env_remove("SSL_CERT_FILE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "mounted without trusting the CA: {err}"
    );
    assert!(
        err.to_ascii_lowercase().contains("certificate") || err.contains("TLS"),
        "{err}"
    );

    // With --ca-bundle: reads and writes, checked with the independent client.
    let ca = front.ca_pem.to_str().unwrap();
    let m = Mount::with_env(
        server,
        &front.endpoint,
        &bucket,
        &["--ca-bundle", ca, "--part-size", "5MiB"],
        &no_ca_env,
    );
    assert_eq!(std::fs::read(m.join("old")).unwrap(), b"through tls");
    let big = pattern(12 << 20, 4);
    std::fs::write(m.join("small"), "written over tls").unwrap();
    std::fs::write(m.join("big"), &big).unwrap();
    assert_eq!(server.get(&bucket, "small").unwrap(), b"written over tls");
    assert!(server.get(&bucket, "big").unwrap() == big);
    assert!(std::fs::read(m.join("big")).unwrap() == big);
    drop(m);
    // Over HTTPS, bodies that carry a CRC32 go unsigned (one PUT, three parts), unless
    // --sign-payload always; moto is sent no CRC32 when it does not keep them.
    let unsigned = front.unsigned_payloads();
    if server.kind == Kind::Garage {
        assert!(unsigned >= 4, "{unsigned} unsigned uploads");
    }
    let m = Mount::with_env(
        server,
        &front.endpoint,
        &bucket,
        &["--ca-bundle", ca, "--sign-payload", "always"],
        &no_ca_env,
    );
    std::fs::write(m.join("signed"), "signed").unwrap();
    drop(m);
    assert_eq!(server.get(&bucket, "signed").unwrap(), b"signed");
    assert_eq!(front.unsigned_payloads(), unsigned);
}
