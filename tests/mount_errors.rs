//! Every way a mount can fail gives one clear line, a non-zero exit within 15 seconds, and leaves
//! the mount point untouched.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

fn fails_with(server: &S3Server, args: &[&str], code: i32, needle: &str) {
    let start = Instant::now();
    let out = run_s3mount(server, args);
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "args {args:?}: stderr {err}");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
    let lines = err
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("For more information"))
        .count();
    assert_eq!(lines, 1, "one clear line, got: {err}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

fn args_for<'a>(server: &'a S3Server, source: &'a str, dir: &'a str) -> Vec<String> {
    let mut v = vec![source.to_string(), dir.to_string()];
    v.extend(server.args());
    v
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn missing_bucket() {
    let server = server();
    let dir = tempfile::tempdir().unwrap();
    let a = args_for(
        server,
        "no-such-bucket-s3mount",
        dir.path().to_str().unwrap(),
    );
    fails_with(server, &refs(&a), 1, "does not exist");
    assert!(!is_mounted(dir.path()));
}

#[test]
fn wrong_keys() {
    // Garage checks signatures (moto does not).
    let server = garage();
    let bucket = server.new_bucket();
    let dir = tempfile::tempdir().unwrap();
    let a = args_for(server, &bucket, dir.path().to_str().unwrap());
    let start = Instant::now();
    let out = Command::new(s3mount_bin())
        .args(&a)
        .envs(server.env())
        .env(
            "AWS_SECRET_ACCESS_KEY",
            "0000000000000000000000000000000000000000000000000000000000000000",
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("access denied"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(15));
    assert!(!is_mounted(dir.path()));
}

#[test]
fn unreachable_endpoint() {
    let server = server();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let a = [
        "b",
        dir.path().to_str().unwrap(),
        "--endpoint-url",
        &url,
        "--region",
        "garage",
        "--force-path-style",
    ];
    fails_with(
        server,
        &a,
        1,
        &format!("cannot connect to 127.0.0.1:{port}: connection refused"),
    );
    assert!(!is_mounted(dir.path()));
}

#[test]
fn missing_credentials_are_named_as_such() {
    let server = server();
    let bucket = server.new_bucket();
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let a = args_for(server, &bucket, dir.path().to_str().unwrap());
    let out = Command::new(s3mount_bin())
        .args(&a)
        .envs(server.env())
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .env("HOME", home.path())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no AWS credentials found") && err.contains("AWS_ACCESS_KEY_ID"),
        "{err}"
    );
    assert!(
        !err.contains("DispatchFailure") && !err.contains("{"),
        "no Debug dump: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn a_bucket_host_name_that_does_not_resolve_names_force_path_style() {
    let server = server();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let a = [
        "b",
        d,
        "--endpoint-url",
        "http://s3mount-test.invalid:9000",
        "--region",
        "x",
    ];
    fails_with(server, &a, 1, "cannot resolve b.s3mount-test.invalid");
    fails_with(server, &a, 1, "--force-path-style");
}

#[test]
fn localhost_endpoints_work_without_force_path_style() {
    let server = server();
    let bucket = server.new_bucket();
    server.put(&bucket, "f", "via localhost");
    let port = server
        .endpoint
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/');
    let url = format!("http://localhost:{port}");
    let dir = tempfile::tempdir().unwrap();
    let out = run_s3mount(
        server,
        &[
            &bucket,
            dir.path().to_str().unwrap(),
            "--endpoint-url",
            &url,
            "--region",
            &server.region,
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let got = std::fs::read(dir.path().join("f"));
    assert!(umount_patiently(dir.path()));
    assert_eq!(got.unwrap(), b"via localhost");
}

#[test]
fn a_mount_point_that_is_not_empty_needs_nonempty() {
    let server = server();
    let bucket = server.new_bucket();
    server.put(&bucket, "f", "x");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("local"), "hidden").unwrap();
    let a = args_for(server, &bucket, dir.path().to_str().unwrap());
    fails_with(server, &refs(&a), 1, "not empty");
    fails_with(server, &refs(&a), 1, "-o nonempty");
    let mut with = a.clone();
    with.extend(["-o".to_string(), "nonempty".to_string()]);
    let out = run_s3mount(server, &refs(&with));
    assert!(out.status.success(), "{out:?}");
    let got = std::fs::read(dir.path().join("f"));
    assert!(umount_patiently(dir.path()));
    assert_eq!(got.unwrap(), b"x");
    assert_eq!(std::fs::read(dir.path().join("local")).unwrap(), b"hidden");
}

#[test]
fn missing_mountpoint_and_not_a_directory() {
    let server = server();
    let bucket = server.new_bucket();
    let a = args_for(server, &bucket, "/nonexistent/s3mount/dir");
    fails_with(server, &refs(&a), 1, "does not exist");
    let file = tempfile::NamedTempFile::new().unwrap();
    let a = args_for(server, &bucket, file.path().to_str().unwrap());
    fails_with(server, &refs(&a), 1, "not a directory");
}

#[test]
fn already_mounted_and_stale_mounts() {
    let server = server();
    let bucket = server.new_bucket();
    server.put(&bucket, "f", "x");
    let m = Mount::new(server, &bucket, &[]);
    let a = args_for(server, &bucket, m.path().to_str().unwrap());
    fails_with(server, &refs(&a), 1, "already mounted");
    assert_eq!(
        std::fs::read(m.join("f")).unwrap(),
        b"x",
        "first mount still serves"
    );

    // Kill the daemon (supervisor and worker): the mount goes stale, and the next attempt says
    // how to clean it.
    assert!(m.kill_daemon() > 0, "no daemon");
    std::thread::sleep(Duration::from_millis(300));
    fails_with(server, &refs(&a), 1, "fusermount3 -u");
    let _ = Command::new("umount").arg("-l").arg(m.path()).status();
}

#[test]
fn invalid_option_values() {
    let server = server();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    fails_with(server, &["b", d, "--metadata-ttl", "soon"], 2, "soon");
    fails_with(server, &["b", d, "-o", "bogus_option"], 2, "bogus_option");
    fails_with(
        server,
        &["b", d, "-o", "force_path_styl"],
        2,
        "did you mean 'force_path_style'?",
    );
    fails_with(
        server,
        &["b", d, "-o", "iam_role=auto"],
        2,
        "s3fs option 'iam_role'",
    );
    fails_with(server, &["b", d, "--file-mode", "999"], 2, "octal");
    fails_with(server, &["bad bucket!", d], 2, "not a valid bucket name");
    fails_with(
        server,
        &["b", d, "--endpoint-url", "localhost:9000"],
        2,
        "http://",
    );
    fails_with(
        server,
        &["b", d, "--ca-bundle", "/nonexistent/ca.pem"],
        2,
        "CA bundle",
    );
    assert!(!is_mounted(dir.path()));
}

#[test]
fn dev_fuse_missing() {
    let server = server();
    let bucket = server.new_bucket();
    let dir = tempfile::tempdir().unwrap();
    // A private mount namespace whose /dev lacks fuse.
    let mut cmd = format!("mount -t tmpfs none /dev && exec {}", s3mount_bin());
    for a in args_for(server, &bucket, dir.path().to_str().unwrap()) {
        cmd.push_str(&format!(" '{a}'"));
    }
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &cmd])
        .envs(server.env())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("/dev/fuse"), "{err}");
}

#[test]
fn help_and_version() {
    let out = Command::new(s3mount_bin()).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("Examples:") && text.contains("--endpoint-url"),
        "{text}"
    );
    let out = Command::new(s3mount_bin())
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn passwd_file_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let server = server();
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("passwd-s3fs");
    std::fs::write(
        &pw,
        format!("{}:{}\n", server.access_key, server.secret_key),
    )
    .unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let a = [
        "b",
        mnt.to_str().unwrap(),
        "-o",
        &format!("passwd_file={}", pw.display()),
    ];
    fails_with(server, &a, 2, "chmod 600");
    // With mode 0600 it is used instead of the environment's keys.
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let bucket = server.new_bucket();
    server.put(&bucket, "k", "from passwd file");
    let m = Mount::with_env(
        server,
        &server.endpoint,
        &bucket,
        &["--passwd-file", pw.to_str().unwrap()],
        &[("AWS_ACCESS_KEY_ID", None), ("AWS_SECRET_ACCESS_KEY", None)],
    );
    assert_eq!(std::fs::read(m.join("k")).unwrap(), b"from passwd file");
}
