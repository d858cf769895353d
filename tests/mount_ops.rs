//! What an operator sees of a running mount: the metrics endpoint (counters move by what was
//! read and written), `s3mount status` (a file being written, a failed commit, exit statuses),
//! the log (JSON lines, SIGUSR2 levels, the file used when there is no syslog) and the mount's
//! type in the mount table. Real binary over FUSE, checked against the server.

mod support;

use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::proxy::FaultProxy;
use support::*;

/// GET /metrics from the daemon.
fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics listener");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The sum of the samples of `name` whose labels contain `labels` (all of them for "").
fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && rest.contains(labels)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

fn status(env: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    let out = Command::new(s3mount_bin())
        .arg("status")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn metrics_move_by_what_was_read_and_written() {
    let server = server();
    let bucket = server.new_bucket();
    let body = pattern(3 << 20, 7);
    server.put(&bucket, "read-me", body.clone());
    let port = free_port();
    let m = Mount::new(server, &bucket, &["--metrics-addr", &port.to_string()]);
    let before = scrape(port);
    assert!(std::fs::read(m.join("read-me")).unwrap() == body);
    let after_read = scrape(port);
    let fetched =
        metric(&after_read, "s3_bytes_fetched", "") - metric(&before, "s3_bytes_fetched", "");
    assert!(
        fetched >= (3 << 20) as f64 && fetched < (4 << 20) as f64,
        "fetched {fetched}"
    );
    assert!(
        metric(&after_read, "s3_request_count", "op=\"GetObject\"")
            > metric(&before, "s3_request_count", "op=\"GetObject\""),
        "{after_read}"
    );
    assert!(metric(&after_read, "fuse_request_latency_count", "op=\"read\"") >= 1.0);

    // Written by a process of its own: a descriptor this test process held could be copied
    // into a child another test thread forks, whose close would commit half the file.
    let written = pattern(2 << 20, 9);
    let src = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(src.path(), &written).unwrap();
    let out = Command::new("dd")
        .arg(format!("if={}", src.path().display()))
        .arg(format!("of={}", m.join("written").display()))
        .args(["bs=4M", "status=none"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(server.get(&bucket, "written").unwrap() == written);
    let after_write = scrape(port);
    assert_eq!(
        metric(&after_write, "s3_bytes_uploaded", "")
            - metric(&after_read, "s3_bytes_uploaded", ""),
        (2 << 20) as f64
    );
    // One commit at close; a child another test thread forks may hold a copy of the
    // descriptor and close it first (every close commits: an empty object, no bytes).
    let commits =
        metric(&after_write, "upload_commits", "") - metric(&after_read, "upload_commits", "");
    assert!((1.0..=2.0).contains(&commits), "{commits} commits");

    // The page cache dropped, a re-read comes from the daemon's memory cache, not the store.
    std::fs::write("/proc/sys/vm/drop_caches", "1").unwrap();
    assert!(std::fs::read(m.join("read-me")).unwrap() == body);
    let reread = scrape(port);
    assert!(
        metric(&reread, "cache_hits", "cache=\"memory\"")
            > metric(&after_write, "cache_hits", "cache=\"memory\""),
        "{reread}"
    );
    assert_eq!(
        metric(&reread, "s3_bytes_fetched", ""),
        metric(&after_write, "s3_bytes_fetched", ""),
        "nothing fetched again"
    );
    // Errors are counted by op and errno; gauges are there.
    assert!(std::fs::metadata(m.join("no-such-file")).is_err());
    let last = scrape(port);
    assert!(metric(&last, "memory_budget_limit", "") > 0.0, "{last}");
    assert!(metric(&last, "process_memory_usage", "") > 0.0, "{last}");
}

#[test]
fn status_shows_files_being_written_and_failed_commits() {
    let server = garage();
    let bucket = server.new_bucket();
    let runtime = tempfile::tempdir().unwrap();
    let rt = runtime.path().to_str().unwrap();
    let env = [("S3MOUNT_RUNTIME_DIR", rt)];
    let proxy = FaultProxy::start(server.port());
    let m = Mount::with_env(
        server,
        &proxy.endpoint(),
        &bucket,
        &["--part-size", "5MiB"],
        &[("S3MOUNT_RUNTIME_DIR", Some(rt))],
    );
    let mp = m.path().to_str().unwrap().to_string();

    // A file open for writing, 1 MiB in: pending, named by its key. The writer is a process
    // of its own that starts nothing: every close of a copy of the descriptor (a child of
    // this test, forked by another thread, closing it at exec) would commit the file.
    let target = m.join("in-progress.bin");
    let mut writer = Command::new("python3")
        .args([
            "-c",
            "import os,sys,time; fd=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT|os.O_TRUNC); \
             os.write(fd, b'x' * (12 << 20)); print('ok', flush=True); time.sleep(60)",
            target.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ok = [0u8; 3];
    writer.stdout.as_mut().unwrap().read_exact(&mut ok).unwrap();
    // Two 5 MiB parts go out while the file is open; the rest waits for more bytes or close.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (code, out) = loop {
        let (code, out) = status(&env, &[&mp, "--json"]);
        if out.contains(&format!("\"uploaded_bytes\": {}", 10 << 20)) || Instant::now() > deadline {
            break (code, out);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let mount = &v["mounts"][0];
    assert_eq!(mount["bucket"], bucket.as_str(), "{out}");
    assert_eq!(mount["mountpoint"], mp.as_str(), "{out}");
    let open = mount["fs"]["open_files"].as_array().unwrap();
    assert!(
        open.iter().any(|f| f["key"] == "in-progress.bin"
            && f["state"] == "streaming"
            && f["pending_bytes"] == 12 << 20
            && f["uploaded_bytes"] == 10 << 20
            && f["upload_rate"].as_u64().is_some_and(|r| r > 0)),
        "{out}"
    );
    // Without a mount point, status lists every s3mount mount on the machine: a dead one of
    // another test (or another user) may make it exit non-zero, but ours is listed, healthy.
    let (code, text) = status(&env, &[]);
    let others_dead = text
        .lines()
        .any(|l| l.starts_with("DEAD ") && !l.contains(&format!("DEAD {mp} ")));
    assert!(code == 0 || others_dead, "{text}");
    assert!(!text.contains(&format!("DEAD {mp} ")), "{text}");
    assert!(
        text.contains("in-progress.bin") && text.contains(&mp),
        "{text}"
    );
    let _ = writer.kill();
    let _ = writer.wait();

    // A commit the store refuses for good: status exits 1 and names the key.
    proxy.fail("PUT", "refused.txt", 403, 100);
    let mut f = std::fs::File::create(m.join("refused.txt")).unwrap();
    f.write_all(b"x").unwrap();
    assert!(f.sync_all().is_err(), "the refused commit reaches fsync");
    drop(f);
    let (code, text) = status(&env, &[&mp]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("FAILED") && text.contains("refused.txt"),
        "{text}"
    );

    // Not an s3mount mount point, and a dead mount: exit 2.
    let (code, text) = status(&env, &["/"]);
    assert_eq!(code, 2, "{text}");
    assert!(m.kill_daemon() > 0, "no daemon");
    std::thread::sleep(Duration::from_millis(300));
    let (code, text) = status(&env, &[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("DEAD"), "{text}");
    let _ = Command::new("umount").arg("-l").arg(m.path()).status();
}

/// Start s3mount in the background with `args`, no -d; returns its output.
fn mount_bg(server: &S3Server, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(s3mount_bin());
    cmd.args(args)
        .args(server.args())
        .envs(server.env())
        .envs(env.iter().copied())
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("S3MOUNT_LOG")
        .stdin(Stdio::null());
    cmd.output().unwrap()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn logs_are_json_lines_and_sigusr2_raises_the_level() {
    let server = server();
    let bucket = server.new_bucket();
    server.put(&bucket, "f", "x");
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let log = dir.path().join("s3mount.log");
    let out = mount_bg(
        server,
        &[
            &bucket,
            mnt.to_str().unwrap(),
            "--log-file",
            log.to_str().unwrap(),
            "--log-format",
            "json",
        ],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"x");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let debug_lines = |t: &str| t.lines().filter(|l| l.contains("\"DEBUG\"")).count();
    wait_for("the mounted line", || read().contains("mounted"));
    assert_eq!(debug_lines(&read()), 0, "{}", read());

    let pid = String::from_utf8_lossy(
        &Command::new("pgrep")
            .args(["-f", &format!("s3mount {bucket} {}", mnt.display())])
            .output()
            .unwrap()
            .stdout,
    )
    .lines()
    .next()
    .unwrap_or("")
    .to_string();
    // The first is the process that mounted (the supervisor): it passes signals on.
    assert!(Command::new("kill")
        .args(["-USR2", &pid])
        .status()
        .unwrap()
        .success());
    wait_for("the level change", || read().contains("log level changed"));
    let _ = std::fs::read_dir(&mnt).unwrap().count();
    let _ = std::fs::metadata(mnt.join("g"));
    wait_for("a debug line", || debug_lines(&read()) > 0);
    // SIGHUP reopens the file and leaves the mount up.
    std::fs::rename(&log, dir.path().join("s3mount.log.1")).unwrap();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    wait_for("the reopened log", || read().contains("reopened"));
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"x", "still mounted");
    assert!(umount_patiently(&mnt));
    for l in std::fs::read_to_string(dir.path().join("s3mount.log.1"))
        .unwrap()
        .lines()
        .chain(read().lines())
    {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
    }
}

#[test]
fn without_syslog_the_log_file_is_named_on_stderr() {
    if std::path::Path::new("/dev/log").exists() {
        eprintln!("this host has /dev/log: the daemon logs to syslog, nothing to check here");
        return;
    }
    let server = server();
    let bucket = server.new_bucket();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let logs = dir.path().join("logs");
    let out = mount_bg(
        server,
        &[&bucket, mnt.to_str().unwrap()],
        &[("S3MOUNT_LOG_DIR", logs.to_str().unwrap())],
    );
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let named = err
        .split("logs to ")
        .nth(1)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| panic!("no log file named: {err}"));
    assert!(named.starts_with(logs.to_str().unwrap()), "{err}");
    // The type shows in the mount table as fuse.s3mount.
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        table
            .lines()
            .any(|l| l.contains(mnt.to_str().unwrap()) && l.contains(" - fuse.s3mount ")),
        "{table}"
    );
    assert!(umount_patiently(&mnt));
    wait_for("the log lines", || {
        std::fs::read_to_string(&named)
            .is_ok_and(|t| t.contains("mounted") && t.contains("unmounted"))
    });
}

#[test]
fn two_live_mounts_of_one_source_keep_their_state_and_sockets_apart() {
    let server = server();
    let bucket = server.new_bucket();
    let runtime = tempfile::tempdir().unwrap();
    let rt = runtime.path().to_str().unwrap();
    let staging = tempfile::tempdir().unwrap();
    let st = staging.path().to_str().unwrap();
    let env = [("S3MOUNT_RUNTIME_DIR", Some(rt))];
    let a = Mount::with_env(
        server,
        &server.endpoint,
        &bucket,
        &["--staging-dir", st],
        &env,
    );
    let b = Mount::with_env(
        server,
        &server.endpoint,
        &bucket,
        &["--staging-dir", st],
        &env,
    );
    // Asked by mount point: another test's dead mount is none of these answers' business.
    let mut dirs = std::collections::HashSet::new();
    for m in [&a, &b] {
        let (code, out) = status(
            &[("S3MOUNT_RUNTIME_DIR", rt)],
            &[m.path().to_str().unwrap(), "--json"],
        );
        assert_eq!(code, 0, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        dirs.insert(
            v["mounts"][0]["fs"]["staging_dir"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(dirs.len(), 2, "{dirs:?}");
    drop(a);
    drop(b);
}
