//! Writing through the real binary: what lands in the bucket is checked with an independent client.

mod support;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

use support::proxy::FaultProxy;
use support::*;

const PART: usize = 5 << 20;

#[test]
fn exact_bytes_for_sizes_around_parts() {
    let server = server();
    let bucket = server.new_bucket();
    let m = Mount::new(server, &bucket, &["--part-size", "5MiB"]);
    let sizes = [0, 1, PART - 1, PART, PART + 1, 3 * PART + 17];
    for (i, n) in sizes.iter().enumerate() {
        let body = pattern(*n, i as u64);
        std::fs::write(m.join(&format!("f{n}")), &body).unwrap();
        assert!(
            server.get(&bucket, &format!("f{n}")).unwrap() == body,
            "size {n}"
        );
    }
    assert!(server.open_uploads(&bucket).is_empty());
    let meta = server.metadata(&bucket, "f1");
    assert_eq!(
        meta.get("mode").map(String::as_str),
        Some("33188"),
        "s3fs-compatible mode: {meta:?}"
    );
}

#[test]
fn large_streamed_file_with_dd() {
    let server = server();
    let bucket = server.new_bucket();
    let m = Mount::new(server, &bucket, &[]);
    let src = tempfile::NamedTempFile::new().unwrap();
    let body = pattern(300 << 20, 77);
    std::fs::write(src.path(), &body).unwrap();
    let out = sh(&format!(
        "dd if='{}' of='{}' bs=1M 2>&1",
        src.path().display(),
        m.join("big.bin").display()
    ));
    assert!(out.status.success(), "{out:?}");
    let got = server.get(&bucket, "big.bin").unwrap();
    assert_eq!(got.len(), body.len());
    assert!(sha256(&got) == sha256(&body));
    assert_eq!(
        std::fs::metadata(m.join("big.bin")).unwrap().len(),
        body.len() as u64
    );
}

/// Parts larger than a quarter of the memory budget are written to the staging directory as
/// they arrive and uploaded from there (streamed from the file, CRC32 checked by the server):
/// exact bytes, and nothing left behind.
#[test]
fn parts_larger_than_the_memory_share_go_through_the_disk() {
    let server = server();
    let bucket = server.new_bucket();
    let staging = tempfile::tempdir().unwrap();
    let m = Mount::new(
        server,
        &bucket,
        &[
            "--max-memory",
            "16MiB",
            "--memory-cache",
            "4MiB",
            "--part-size",
            "20MiB",
            "--staging-dir",
            staging.path().to_str().unwrap(),
        ],
    );
    let src = tempfile::NamedTempFile::new().unwrap();
    let body = pattern(70 << 20, 78);
    std::fs::write(src.path(), &body).unwrap();
    let out = sh(&format!(
        "dd if='{}' of='{}' bs=1M 2>&1",
        src.path().display(),
        m.join("spilled.bin").display()
    ));
    assert!(out.status.success(), "{out:?}");
    let got = server.get(&bucket, "spilled.bin").unwrap();
    assert_eq!(got.len(), body.len());
    assert!(sha256(&got) == sha256(&body));
    let log = std::fs::read_to_string(&m.log).unwrap_or_default();
    assert!(
        log.contains("part spilled to disk"),
        "the parts after the first went through the disk: {log}"
    );
    assert_eq!(
        files_in(&state_dir(staging.path()).join("spool")),
        0,
        "spilled parts removed"
    );
}

#[test]
fn overwrite_append_and_truncate() {
    let server = server();
    let bucket = server.new_bucket();
    server.put(&bucket, "f", "old old old");
    let m = Mount::new(server, &bucket, &["--metadata-ttl", "0"]);
    std::fs::write(m.join("f"), "new").unwrap();
    assert_eq!(server.get(&bucket, "f").unwrap(), b"new");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(m.join("f"))
        .unwrap();
    f.write_all(b" and more").unwrap();
    drop(f);
    assert_eq!(server.get(&bucket, "f").unwrap(), b"new and more");
    let out = sh(&format!("echo line >> '{}'", m.join("f").display()));
    assert!(out.status.success());
    assert_eq!(server.get(&bucket, "f").unwrap(), b"new and moreline\n");
    let out = sh(&format!("truncate -s 0 '{}'", m.join("f").display()));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(server.get(&bucket, "f").unwrap(), b"");
}

#[test]
fn mkdir_rmdir_unlink_in_the_bucket() {
    let server = garage();
    let bucket = server.new_bucket();
    let m = Mount::new(server, &bucket, &[]);
    std::fs::create_dir(m.join("d")).unwrap();
    assert_eq!(server.keys(&bucket), vec!["d/"]);
    std::fs::write(m.join("d/a"), "1").unwrap();
    let e = std::fs::remove_dir(m.join("d")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY));
    std::fs::remove_file(m.join("d/a")).unwrap();
    assert_eq!(server.keys(&bucket), vec!["d/"]);
    // A directory without a marker stays visible when its last file is removed.
    server.put(&bucket, "implicit/x", "1");
    std::fs::remove_file(m.join("implicit/x")).unwrap();
    assert!(m.join("implicit").is_dir());
    assert!(server.keys(&bucket).contains(&"implicit/".to_string()));
    std::fs::remove_dir(m.join("d")).unwrap();
    std::fs::remove_dir(m.join("implicit")).unwrap();
    assert!(
        server.keys(&bucket).is_empty(),
        "{:?}",
        server.keys(&bucket)
    );
    let e = std::fs::remove_file(m.join("nothing")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
}

#[test]
fn fsync_makes_the_object_visible_before_close() {
    let server = server();
    let bucket = server.new_bucket();
    let m = Mount::new(server, &bucket, &[]);
    let mut f = std::fs::File::create(m.join("synced")).unwrap();
    f.write_all(b"durable").unwrap();
    assert_eq!(
        std::fs::metadata(m.join("synced")).unwrap().len(),
        7,
        "size visible while writing"
    );
    // (Not asserted absent here: any fork+exec in another test thread closes an inherited copy
    // of this descriptor, and every close flushes, as FUSE defines it.)
    f.sync_all().unwrap();
    assert_eq!(server.get(&bucket, "synced").unwrap(), b"durable");
    f.write_all(b" and then some").unwrap();
    drop(f);
    assert_eq!(
        server.get(&bucket, "synced").unwrap(),
        b"durable and then some"
    );
}

#[test]
fn many_writers_in_parallel() {
    let server = server();
    let bucket = server.new_bucket();
    let m = Mount::new(server, &bucket, &[]);
    let root = m.path().to_path_buf();
    std::thread::scope(|s| {
        for t in 0..8 {
            let root = root.clone();
            s.spawn(move || {
                std::fs::create_dir_all(root.join(format!("t{t}"))).unwrap();
                for i in 0..20 {
                    std::fs::write(
                        root.join(format!("t{t}/f{i}")),
                        pattern(1000 + i * 4096, (t * 100 + i) as u64),
                    )
                    .unwrap();
                }
            });
        }
    });
    for t in 0..8 {
        for i in 0..20 {
            let got = server
                .get(&bucket, &format!("t{t}/f{i}"))
                .unwrap_or_default();
            assert!(
                got == pattern(1000 + i * 4096, (t * 100 + i) as u64),
                "t{t}/f{i}"
            );
        }
    }
}

#[test]
fn metadata_round_trips_through_a_remount() {
    let server = server();
    let bucket = server.new_bucket();
    {
        let m = Mount::new(server, &bucket, &[]);
        std::fs::write(m.join("f"), "x").unwrap();
        let out = sh(&format!(
            "chmod 600 '{0}' && chown 1234:5678 '{0}' && touch -d @1500000000 '{0}'",
            m.join("f").display()
        ));
        assert!(out.status.success(), "{out:?}");
    }
    let m = Mount::new(server, &bucket, &["--metadata-ttl", "0"]);
    let meta = std::fs::metadata(m.join("f")).unwrap();
    assert_eq!((meta.mode() & 0o7777, meta.mtime()), (0o600, 1_500_000_000));
    assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
}

#[test]
fn failed_part_upload_gives_eio_and_keeps_the_old_object() {
    let server = server();
    let bucket = server.new_bucket();
    server.put(&bucket, "victim", "previous contents");
    let proxy = FaultProxy::start(server.port());
    let m = Mount::via(
        server,
        &proxy.endpoint(),
        &bucket,
        &["--part-size", "5MiB", "--max-attempts", "2"],
    );
    proxy.fail("PUT", "partNumber=2", 500, 1000);
    // The writer is one child process that neither forks nor dups: descriptors held by this
    // (multi-threaded) test process would be closed, and so flushed (committed), by any fork+exec
    // in another test thread, and `dd` dups then closes its output (another flush).
    let src = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(src.path(), pattern(12 << 20, 5)).unwrap();
    let script = "import os,sys\n\
fd=os.open(sys.argv[2], os.O_WRONLY|os.O_TRUNC)\n\
try:\n    os.write(fd, open(sys.argv[1],'rb').read())\n    os.fsync(fd)\n    print('ok')\nexcept OSError as e:\n    print('errno', e.errno)\n";
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            src.path().to_str().unwrap(),
            m.join("victim").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("errno {}", libc::EIO),
        "{out:?}"
    );
    assert!(proxy.hits() >= 1);
    proxy.clear();
    assert_eq!(server.get(&bucket, "victim").unwrap(), b"previous contents");
    assert!(
        server.open_uploads(&bucket).is_empty(),
        "no dangling multipart upload"
    );
}

#[test]
fn read_only_mount_gives_erofs_for_writes() {
    let server = server();
    let bucket = server.new_bucket();
    let m = Mount::new(server, &bucket, &["-o", "ro"]);
    for r in [
        std::fs::write(m.join("x"), "1").map(|_| ()),
        std::fs::create_dir(m.join("d")),
    ] {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EROFS));
    }
    assert!(server.keys(&bucket).is_empty());
}

#[test]
fn rename_files_and_directories() {
    let server = garage();
    let bucket = server.new_bucket();
    for i in 0..50 {
        server.put(&bucket, &format!("dir/f{i}"), format!("file {i}"));
    }
    server.put(&bucket, "a", "alpha");
    server.put(&bucket, "b", "beta");
    let m = Mount::new(server, &bucket, &[]);
    std::fs::rename(m.join("a"), m.join("a2")).unwrap();
    assert_eq!(server.get(&bucket, "a2").unwrap(), b"alpha");
    assert!(server.get(&bucket, "a").is_none());
    std::fs::rename(m.join("a2"), m.join("b")).unwrap();
    assert_eq!(
        server.get(&bucket, "b").unwrap(),
        b"alpha",
        "rename over an existing file replaces it"
    );
    std::fs::rename(m.join("dir"), m.join("moved")).unwrap();
    let keys = server.keys(&bucket);
    assert_eq!(
        keys.iter().filter(|k| k.starts_with("moved/")).count(),
        50,
        "{keys:?}"
    );
    assert!(!keys.iter().any(|k| k.starts_with("dir/")), "{keys:?}");
    assert_eq!(std::fs::read(m.join("moved/f7")).unwrap(), b"file 7");
    // The write-then-rename pattern of editors and rsync.
    std::fs::write(m.join(".tmp-save"), "saved").unwrap();
    std::fs::rename(m.join(".tmp-save"), m.join("doc.txt")).unwrap();
    assert_eq!(server.get(&bucket, "doc.txt").unwrap(), b"saved");
    let out = sh(&format!(
        "mv '{}' '{}'",
        m.join("doc.txt").display(),
        m.join("moved/doc.txt").display()
    ));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(server.get(&bucket, "moved/doc.txt").unwrap(), b"saved");
}

#[test]
fn rsync_and_tar_round_trip() {
    let server = garage();
    let bucket = server.new_bucket();
    let src = tempfile::tempdir().unwrap();
    for d in ["a", "a/b", "c"] {
        std::fs::create_dir_all(src.path().join(d)).unwrap();
    }
    for (i, f) in ["a/1.txt", "a/b/2.bin", "c/3", "top"].iter().enumerate() {
        std::fs::write(
            src.path().join(f),
            pattern(1000 * (i + 1) * (i + 1), i as u64),
        )
        .unwrap();
    }
    let out = sh(&format!(
        "chmod 600 '{0}/top' && touch -d @1400000000 '{0}/a/1.txt'",
        src.path().display()
    ));
    assert!(out.status.success());
    let m = Mount::new(server, &bucket, &[]);
    assert!(
        which("rsync"),
        "rsync is needed (apt-get install rsync; .ci/run installs it)"
    );
    {
        let out = sh(&format!(
            "rsync -a '{}/' '{}/r/'",
            src.path().display(),
            m.path().display()
        ));
        assert!(out.status.success(), "{out:?}");
        let changes = rsync_changes(src.path(), &m.join("r"));
        assert!(
            changes.trim().is_empty(),
            "second rsync -c changes nothing: {changes}"
        );
        assert_eq!(
            server.get(&bucket, "r/a/b/2.bin").unwrap(),
            pattern(4000, 1)
        );
    }
    let out = sh(&format!(
        "tar -C '{}' -cf - . | tar -C '{}' -xpf - && mkdir -p '{}/t' ",
        src.path().display(),
        m.path().display(),
        m.path().display()
    ));
    assert!(out.status.success(), "{out:?}");
    let meta = std::fs::metadata(m.join("top")).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(m.join("a/1.txt")).unwrap().mtime(),
        1_400_000_000
    );
    let back = tempfile::tempdir().unwrap();
    let out = sh(&format!(
        "tar -C '{}' -cf - a c top | tar -C '{}' -xpf -",
        m.path().display(),
        back.path().display()
    ));
    assert!(out.status.success(), "{out:?}");
    let out = sh(&format!(
        "diff -r '{}/a' '{}/a' && cmp '{}/top' '{}/top'",
        src.path().display(),
        back.path().display(),
        src.path().display(),
        back.path().display()
    ));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::metadata(back.path().join("a/1.txt"))
            .unwrap()
            .mtime(),
        1_400_000_000
    );
}

fn which(tool: &str) -> bool {
    sh(&format!("command -v {tool}")).status.success()
}

#[test]
fn modify_in_place_append_and_truncate_both_ways() {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    let server = server();
    let bucket = server.new_bucket();
    let body = pattern(20 << 20, 42);
    server.put(&bucket, "obj", body.clone());
    let staging = tempfile::tempdir().unwrap();
    let m = Mount::new(
        server,
        &bucket,
        &["--staging-dir", staging.path().to_str().unwrap()],
    );
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.join("obj"))
        .unwrap();
    f.write_all_at(b"MIDDLE", 10 << 20).unwrap();
    let mut back = vec![0u8; 6];
    f.read_exact_at(&mut back, 10 << 20).unwrap();
    assert_eq!(&back, b"MIDDLE", "read back through the same descriptor");
    drop(f);
    let mut want = body.clone();
    want[10 << 20..(10 << 20) + 6].copy_from_slice(b"MIDDLE");
    assert!(server.get(&bucket, "obj").unwrap() == want);
    // Truncate down, then up (zeros), through the mount.
    let out = sh(&format!(
        "truncate -s 1000 '{0}' && truncate -s 1500 '{0}'",
        m.join("obj").display()
    ));
    assert!(out.status.success(), "{out:?}");
    let got = server.get(&bucket, "obj").unwrap();
    assert_eq!(got.len(), 1500);
    assert!(got[..1000] == want[..1000] && got[1000..].iter().all(|b| *b == 0));
    // A format that patches its header after writing the body.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.join("archive"))
        .unwrap();
    f.write_all(&[0u8; 16]).unwrap();
    f.write_all(&pattern(9 << 20, 1)).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(b"HEADER-WRITTEN-!").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut head = [0u8; 16];
    f.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HEADER-WRITTEN-!");
    drop(f);
    let got = server.get(&bucket, "archive").unwrap();
    assert_eq!(&got[..16], b"HEADER-WRITTEN-!");
    assert!(got[16..] == pattern(9 << 20, 1)[..]);
    assert_eq!(
        files_in(&state_dir(staging.path())),
        0,
        "staging files removed after upload"
    );
}

#[test]
fn git_clone_status_and_log_on_the_mount() {
    let server = garage();
    let bucket = server.new_bucket();
    let src = tempfile::tempdir().unwrap();
    let setup = format!(
        "cd '{0}' && git init -q -b main repo && cd repo && git config user.email t@t && git config user.name t && \
         echo one > a.txt && mkdir sub && echo two > sub/b.txt && git add . && git commit -qm first && \
         echo three >> a.txt && git commit -qam second",
        src.path().display()
    );
    let out = sh(&setup);
    assert!(out.status.success(), "{out:?}");
    let m = Mount::new(server, &bucket, &[]);
    let out = sh(&format!(
        "git clone -q '{}/repo' '{}/clone'",
        src.path().display(),
        m.path().display()
    ));
    assert!(out.status.success(), "{out:?}");
    let out = sh(&format!(
        "cd '{}/clone' && git status --porcelain && git log --oneline | wc -l",
        m.path().display()
    ));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "2",
        "clean tree, two commits: {out:?}"
    );
    let out = sh(&format!(
        "cd '{}/clone' && echo four >> a.txt && git commit -qam third && git log --oneline | wc -l",
        m.path().display()
    ));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");
}

#[test]
fn symlinks_survive_a_remount() {
    let server = server();
    let bucket = server.new_bucket();
    {
        let m = Mount::new(server, &bucket, &[]);
        std::fs::write(m.join("target.txt"), "pointed at").unwrap();
        std::os::unix::fs::symlink("target.txt", m.join("link")).unwrap();
        assert_eq!(
            std::fs::read_link(m.join("link")).unwrap().to_str(),
            Some("target.txt")
        );
        assert_eq!(std::fs::read(m.join("link")).unwrap(), b"pointed at");
        let e = std::fs::hard_link(m.join("target.txt"), m.join("hard")).unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EPERM),
            "hard links are refused clearly"
        );
    }
    assert_eq!(
        server
            .metadata(&bucket, "link")
            .get("mode")
            .map(String::as_str),
        Some("41471")
    );
    let m = Mount::new(server, &bucket, &["--list-metadata"]);
    let out = sh(&format!("ls -l '{}'", m.path().display()));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("link -> target.txt"),
        "{out:?}"
    );
    assert_eq!(std::fs::read(m.join("link")).unwrap(), b"pointed at");
}

#[test]
fn external_overwrite_between_open_and_close_keeps_both_versions() {
    // moto enforces If-Match / If-None-Match (Garage accepts and ignores them).
    let server = moto();
    let bucket = server.new_bucket();
    server.put(&bucket, "shared.txt", "original");
    let staging = tempfile::tempdir().unwrap();
    let m = Mount::new(
        server,
        &bucket,
        &["--staging-dir", staging.path().to_str().unwrap()],
    );
    // A child process writes, waits while the object is replaced, then fsyncs (see above on
    // why not this process).
    let script = "import os,sys\n\
fd=os.open(sys.argv[1], os.O_WRONLY|os.O_TRUNC)\n\
os.write(fd, b'written through the mount')\n\
print('ready', flush=True)\n\
sys.stdin.readline()\n\
try:\n    os.fsync(fd)\n    print('fsync ok')\nexcept OSError as e:\n    print('fsync errno', e.errno)\n";
    let mut child = std::process::Command::new("python3")
        .args(["-c", script, m.join("shared.txt").to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    server.put(&bucket, "shared.txt", "written by someone else");
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    let _ = child.wait();
    assert_eq!(
        line.trim(),
        format!("fsync errno {}", libc::EIO),
        "the conflict must reach the application"
    );
    assert_eq!(
        server.get(&bucket, "shared.txt").unwrap(),
        b"written by someone else"
    );
    let recovered: Vec<Vec<u8>> = std::fs::read_dir(state_dir(staging.path()).join("recovered"))
        .expect("recovery folder")
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(
        recovered.iter().any(|b| b == b"written through the mount"),
        "{recovered:?}"
    );
}

#[test]
fn transient_failures_and_stalls_are_survived_byte_identical() {
    use support::proxy::FaultProxy;
    let server = garage();
    let bucket = server.new_bucket();
    let proxy = FaultProxy::start(server.port());
    let m = Mount::via(
        server,
        &proxy.endpoint(),
        &bucket,
        &[
            "--part-size",
            "5MiB",
            "--max-attempts",
            "8",
            "--stall-timeout",
            "2",
            "--metadata-ttl",
            "0",
        ],
    );
    // 10% of uploads and downloads fail with 503 SlowDown; two GET bodies stall mid-way.
    proxy.fail_some("PUT", "", 503, 100);
    proxy.fail_some("GET", "", 503, 100);
    let body = pattern(100 << 20, 99);
    std::fs::write(m.join("survivor.bin"), &body).unwrap();
    proxy.stall(
        "GET",
        "survivor.bin",
        100_000,
        std::time::Duration::from_secs(6),
        2,
    );
    let back = std::fs::read(m.join("survivor.bin")).unwrap();
    assert!(back == body, "read back byte-identical");
    proxy.clear();
    assert!(
        server.get(&bucket, "survivor.bin").unwrap() == body,
        "stored byte-identical"
    );
    assert!(proxy.hits() >= 5, "faults were injected: {}", proxy.hits());
    let log = std::fs::read_to_string(&m.log).unwrap_or_default();
    assert!(
        log.contains("resuming where it stopped"),
        "a stalled body was detected and resumed"
    );
}

#[test]
fn a_hung_store_gives_etimedout_within_the_bound() {
    use support::proxy::FaultProxy;
    let server = garage();
    let bucket = server.new_bucket();
    server.put(&bucket, "sub/file", "x");
    let proxy = FaultProxy::start(server.port());
    let m = Mount::via(
        server,
        &proxy.endpoint(),
        &bucket,
        &["--op-timeout", "2", "--metadata-ttl", "0"],
    );
    // Every listing and HEAD now hangs for 20 s after the headers.
    proxy.stall("GET", "", 0, std::time::Duration::from_secs(20), 50);
    proxy.stall("HEAD", "", 0, std::time::Duration::from_secs(20), 50);
    let t = std::time::Instant::now();
    let err = std::fs::read_dir(m.join("sub")).map(|_| ()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT), "{err}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(8),
        "{:?}",
        t.elapsed()
    );
    proxy.clear();
    let log = std::fs::read_to_string(&m.log).unwrap_or_default();
    assert!(log.contains("operation timed out"), "logged with its key");
}

#[test]
fn a_missing_name_is_remembered_for_the_ttl_only_and_never_hides_what_this_mount_creates() {
    let server = server();
    let bucket = server.new_bucket();
    let m = Mount::new(server, &bucket, &["--metadata-ttl", "1"]);
    let missing = |name: &str| {
        std::fs::metadata(m.join(name))
            .map(|_| false)
            .unwrap_or_else(|e| e.raw_os_error() == Some(libc::ENOENT))
    };
    // Looked up while absent (the kernel may now keep a negative entry), then created here:
    // visible at once, with its content, whichever way it is created.
    for name in ["f", "d", "l", "r", "e"] {
        assert!(missing(name), "{name}");
        assert!(missing(name), "{name}");
    }
    std::fs::write(m.join("f"), "file").unwrap();
    assert_eq!(std::fs::read(m.join("f")).unwrap(), b"file");
    std::fs::create_dir(m.join("d")).unwrap();
    assert!(m.join("d").is_dir());
    std::os::unix::fs::symlink("f", m.join("l")).unwrap();
    assert_eq!(std::fs::read(m.join("l")).unwrap(), b"file");
    std::fs::rename(m.join("f"), m.join("r")).unwrap();
    assert_eq!(std::fs::read(m.join("r")).unwrap(), b"file");
    assert!(missing("f"), "renamed away");
    // Created by another client: seen once the TTL has passed.
    server.put(&bucket, "f", "elsewhere");
    server.put(&bucket, "e/x", "elsewhere");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(std::fs::read(m.join("f")).unwrap(), b"elsewhere");
    assert_eq!(std::fs::read(m.join("e/x")).unwrap(), b"elsewhere");
}

#[test]
fn extended_attributes_are_stored_like_s3fs_and_survive_rename_and_remount() {
    let server = server();
    let bucket = server.new_bucket();
    // As s3fs stores {"user.origin":"s3fs"}.
    server.put_with_meta(
        &bucket,
        "from_s3fs",
        "x",
        &[("xattr", "%7B%22user.origin%22%3A%22czNmcw%3D%3D%22%7D")],
    );
    {
        // Off by default: the kernel is told they are not implemented (no request per entry
        // for `ls -l`), and applications get EOPNOTSUPP.
        let off = Mount::new(server, &bucket, &[]);
        let out = Command::new("python3")
            .arg("-c")
            .arg(
                r#"
import errno, os, sys
for f, args in [(os.getxattr, ("user.origin",)), (os.setxattr, ("user.x", b"1")), (os.listxattr, ())]:
    try:
        f(sys.argv[1], *args)
    except OSError as e:
        assert e.errno == errno.EOPNOTSUPP, (f.__name__, e)
    else:
        raise AssertionError(f.__name__)
"#,
            )
            .arg(off.join("from_s3fs"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        drop(off);
        let m = Mount::new(server, &bucket, &["--xattr"]);
        let script = r#"
import errno, os, sys
root = sys.argv[1]
def expect_error(code, f, *args):
    try:
        f(*args)
    except OSError as e:
        assert e.errno == code, (f.__name__, args, e)
    else:
        raise AssertionError(("no error", f.__name__, args))
assert os.getxattr(f"{root}/from_s3fs", "user.origin") == b"s3fs"
f = f"{root}/f"
with open(f, "wb") as fh:
    fh.write(b"body")
    os.setxattr(f, "user.during", b"written with the data")
os.setxattr(f, "user.k", b"v1")
expect_error(errno.EEXIST, os.setxattr, f, "user.k", b"v2", os.XATTR_CREATE)
expect_error(errno.ENODATA, os.setxattr, f, "user.none", b"v2", os.XATTR_REPLACE)
expect_error(errno.EOPNOTSUPP, os.setxattr, f, "security.test", b"v")
expect_error(errno.ENODATA, os.getxattr, f, "user.none")
expect_error(errno.ENODATA, os.getxattr, f, "security.capability")
os.setxattr(f, "user.gone", b"soon")
os.removexattr(f, "user.gone")
expect_error(errno.ENODATA, os.removexattr, f, "user.gone")
assert sorted(os.listxattr(f)) == ["user.during", "user.k"], os.listxattr(f)
os.mkdir(f"{root}/d")
os.setxattr(f"{root}/d", "user.dir", b"on the marker")
with open(f"{root}/d/inner", "wb") as fh:
    fh.write(b"i")
os.rename(f"{root}/d/inner", f"{root}/d/moved")
os.setxattr(f"{root}/d/moved", "user.m", bytes(range(256)))
os.rename(f, f"{root}/g")
"#;
        let out = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(m.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    // What an independent client sees: s3fs's header, sorted by name, on the renamed object.
    let meta = server.metadata(&bucket, "g");
    assert_eq!(
        meta.get("xattr").map(String::as_str),
        Some(
            "%7B%22user.during%22%3A%22d3JpdHRlbiB3aXRoIHRoZSBkYXRh%22%2C\
             %22user.k%22%3A%22djE%3D%22%7D"
        ),
        "{meta:?}"
    );
    assert_eq!(server.get(&bucket, "g").unwrap(), b"body");
    assert!(server.get(&bucket, "f").is_none());
    assert!(server.metadata(&bucket, "d/").contains_key("xattr"));

    let m = Mount::new(server, &bucket, &["--metadata-ttl", "0", "-o", "use_xattr"]);
    // cp -a and rsync -X carry them from a local tree (tmpfs keeps user.* attributes).
    let src = tempfile::tempdir_in("/dev/shm").unwrap();
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            r#"
import os, subprocess, sys
root, src = sys.argv[1], sys.argv[2]
assert os.getxattr(f"{root}/g", "user.k") == b"v1"
assert os.getxattr(f"{root}/d", "user.dir") == b"on the marker"
assert os.getxattr(f"{root}/d/moved", "user.m") == bytes(range(256))
assert os.listxattr(f"{root}/from_s3fs") == ["user.origin"]
os.mkdir(f"{src}/sub")
with open(f"{src}/sub/a", "w") as fh:
    fh.write("a")
os.setxattr(f"{src}/sub/a", "user.tag", b"blue")
os.setxattr(f"{src}/sub", "user.d", b"dir")
subprocess.run(["cp", "-a", src, f"{root}/cp"], check=True)
subprocess.run(["rsync", "-aX", f"{src}/", f"{root}/rs/"], check=True)
for top in ["cp", "rs"]:
    assert os.getxattr(f"{root}/{top}/sub/a", "user.tag") == b"blue", top
    assert os.getxattr(f"{root}/{top}/sub", "user.d") == b"dir", top
again = subprocess.run(["rsync", "-aXc", "-i", f"{src}/", f"{root}/rs/"], check=True,
                       capture_output=True, text=True).stdout
assert again.strip() == "", again
"#,
        )
        .arg(m.path())
        .arg(src.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn cp_within_the_mount_copies_server_side() {
    let server = server();
    let bucket = server.new_bucket();
    let body = pattern(24 << 20, 11);
    server.put(&bucket, "src.bin", body.clone());
    server.put(&bucket, "small.txt", "small");
    let m = Mount::new(server, &bucket, &[]);
    // Also over an existing object (opened with O_TRUNC: the commit is If-Match on it).
    server.put(&bucket, "d/src.bin", "an older version");
    let out = sh(&format!(
        "cp '{0}/src.bin' '{0}/copy.bin' && cp '{0}/small.txt' '{0}/small copy.txt' && \
         cp '{0}/src.bin' '{0}/d/' && stat -c %s '{0}/copy.bin'",
        m.path().display()
    ));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (24 << 20).to_string()
    );
    let (gets, fetched) = m.unmount_traffic();
    assert!(
        fetched < (1 << 20),
        "cp fetched {fetched} bytes in {gets} GETs: the 24 MiB copies should be server side"
    );
    for key in ["copy.bin", "d/src.bin"] {
        assert!(server.get(&bucket, key).unwrap() == body, "{key}");
    }
    assert_eq!(server.get(&bucket, "small copy.txt").unwrap(), b"small");

    // With no condition to check, a whole object is one CopyObject (small ones too).
    let m = Mount::new(server, &bucket, &["--no-conditional-writes"]);
    let out = sh(&format!(
        "cp '{0}/src.bin' '{0}/copy2.bin' && cp '{0}/small.txt' '{0}/small2.txt'",
        m.path().display()
    ));
    assert!(out.status.success(), "{out:?}");
    let (gets, fetched) = m.unmount_traffic();
    assert_eq!((gets, fetched), (0, 0), "nothing read through the mount");
    assert!(server.get(&bucket, "copy2.bin").unwrap() == body);
    assert_eq!(server.get(&bucket, "small2.txt").unwrap(), b"small");
}

#[test]
fn posix_fallocate_extends_a_new_file_with_zeros() {
    let server = server();
    let bucket = server.new_bucket();
    let m = Mount::new(server, &bucket, &[]);
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            r#"
import errno, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
os.posix_fallocate(fd, 0, 3 << 20)
assert os.fstat(fd).st_size == 3 << 20
os.pwrite(fd, b"head", 0)
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
# FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
assert libc.fallocate(fd, 0x02 | 0x01, 0, 4096) == -1, "punching a hole succeeded"
assert ctypes.get_errno() == errno.EOPNOTSUPP, ctypes.get_errno()
os.close(fd)
"#,
        )
        .arg(m.join("pre"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut want = b"head".to_vec();
    want.resize(3 << 20, 0);
    assert!(server.get(&bucket, "pre").unwrap() == want);
}

/// cp -p sets mode, times and attributes on the open file after writing it: for a file large
/// enough to stream as a multipart upload, they still reach the bucket.
#[test]
fn cp_p_of_a_large_file_keeps_its_mode_times_and_attributes() {
    let server = server();
    let bucket = server.new_bucket();
    let src = tempfile::tempdir_in("/dev/shm").unwrap();
    let f = src.path().join("big.bin");
    let body = pattern(20 << 20, 5);
    std::fs::write(&f, &body).unwrap();
    let out = Command::new("python3")
        .arg("-c")
        .arg("import os, sys; os.setxattr(sys.argv[1], 'user.kept', b'yes')")
        .arg(&f)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = sh(&format!(
        "chmod 640 '{0}' && touch -d @1400000000 '{0}'",
        f.display()
    ));
    assert!(out.status.success(), "{out:?}");
    let m = Mount::new(server, &bucket, &["--xattr"]);
    let out = sh(&format!(
        "cp -p --preserve=xattr '{}' '{}/'",
        f.display(),
        m.path().display()
    ));
    assert!(out.status.success(), "{out:?}");
    drop(m);
    let meta = server.metadata(&bucket, "big.bin");
    assert_eq!(
        meta.get("mode").map(String::as_str),
        Some("33184"),
        "{meta:?}"
    ); // 0100640
    assert_eq!(meta.get("mtime").map(String::as_str), Some("1400000000"));
    assert_eq!(
        meta.get("xattr").map(String::as_str),
        Some("%7B%22user.kept%22%3A%22eWVz%22%7D")
    );
    assert!(server.get(&bucket, "big.bin").unwrap() == body);
}

/// `--write-back`: `tar x` returns before the uploads; once the daemon has exited after the
/// unmount, every file is in the bucket with its bytes and its mode (chmod after close went
/// with the upload); fsync makes one file durable while the mount stays.
#[test]
fn write_back_uploads_after_close_and_before_the_daemon_exits() {
    let server = server();
    let bucket = server.new_bucket();
    let src = tempfile::tempdir().unwrap();
    for i in 0..60 {
        let p = src.path().join(format!("t/f{i:02}"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, format!("file {i}\n").repeat(i + 1)).unwrap();
        let mode = if i % 2 == 0 { 0o600 } else { 0o755 };
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    }
    let tar = src.path().join("t.tar");
    assert!(sh(&format!(
        "cd '{}' && tar cf '{}' t",
        src.path().display(),
        tar.display()
    ))
    .status
    .success());
    let m = Mount::new(server, &bucket, &["--write-back"]);
    let out = sh(&format!(
        "cd '{}' && tar xpf '{}'",
        m.path().display(),
        tar.display()
    ));
    assert!(out.status.success(), "{out:?}");

    // fsync of one file: in the bucket at once, the mount still up.
    let out = sh(&format!(
        "python3 -c \"import os; fd=os.open('{}', os.O_WRONLY|os.O_CREAT); os.write(fd, b'durable'); os.fsync(fd); os.close(fd)\"",
        m.join("synced.txt").display()
    ));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(server.get(&bucket, "synced.txt").unwrap(), b"durable");

    let pids = m.daemon_pids();
    assert!(!pids.is_empty(), "no daemon");
    m.unmount();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while pids
        .iter()
        .any(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
    {
        assert!(std::time::Instant::now() < deadline, "daemon still running");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for i in 0..60 {
        let key = format!("t/f{i:02}");
        assert_eq!(
            server.get(&bucket, &key).unwrap(),
            format!("file {i}\n").repeat(i + 1).into_bytes(),
            "{key}"
        );
        let mode: u32 = server.metadata(&bucket, &key)["mode"].parse().unwrap();
        assert_eq!(
            mode & 0o777,
            if i % 2 == 0 { 0o600 } else { 0o755 },
            "{key}"
        );
    }
    let log = std::fs::read_to_string(&m.log).unwrap_or_default();
    assert!(
        !log.contains("background upload (--write-back) failed"),
        "{log}"
    );
}

/// `--write-back` queues a closed file with its bytes on local disk: a daemon killed before the
/// upload leaves them there, and the next mount of the source reports them with their key.
#[test]
fn write_back_bytes_survive_a_killed_daemon_for_recovery() {
    let server = garage();
    let bucket = server.new_bucket();
    let proxy = FaultProxy::start(server.port());
    let staging = tempfile::tempdir().unwrap();
    let st = staging.path().to_str().unwrap();
    let m = Mount::via(
        server,
        &proxy.endpoint(),
        &bucket,
        &["--write-back", "--staging-dir", st],
    );
    let mut f = std::fs::File::create(m.join("queued.txt")).unwrap();
    f.write_all(b"only here until uploaded").unwrap();
    // The store goes away: the queued upload keeps retrying while the daemon is killed.
    proxy.down();
    drop(f);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(m.kill_daemon() > 0, "no daemon");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = Command::new("umount").arg("-l").arg(m.path()).status();
    assert_eq!(server.get(&bucket, "queued.txt"), None, "never uploaded");
    // The same source (endpoint, bucket) finds its state directory again.
    proxy.up();
    let m2 = Mount::via(server, &proxy.endpoint(), &bucket, &["--staging-dir", st]);
    let log = std::fs::read_to_string(&m2.log).unwrap();
    assert!(
        log.contains("found data not uploaded by an earlier run")
            && log.contains("key: queued.txt"),
        "{log}"
    );
    let kept = std::fs::read_dir(state_dir(staging.path()).join("spool"))
        .unwrap()
        .flatten()
        .any(|e| std::fs::read(e.path()).is_ok_and(|b| b == b"only here until uploaded"));
    assert!(kept, "the bytes are in the spool");
}

/// rsync into a `--write-back` mount: each file is written to a temporary name and renamed
/// while its upload is still queued, so it is uploaded once, at its name. After the unmount
/// (which waits for the uploads) the bucket holds every file exactly and no temporary name,
/// and a checksum rsync from a new mount finds nothing to change (bytes, modes, times).
#[test]
fn rsync_into_a_write_back_mount_leaves_no_temporary_names() {
    let server = garage();
    let bucket = server.new_bucket();
    let src = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for d in 0..3 {
        std::fs::create_dir_all(src.path().join(format!("d{d}"))).unwrap();
        for f in 0..10 {
            let rel = format!("d{d}/f{f}");
            let body = pattern(100 + 997 * f, (d * 10 + f) as u64);
            std::fs::write(src.path().join(&rel), &body).unwrap();
            files.push((rel, body));
        }
    }
    let out = sh(&format!(
        "chmod 640 '{0}'/d1/* && touch -d @1500000000 '{0}'/d2/*",
        src.path().display()
    ));
    assert!(out.status.success(), "{out:?}");
    {
        let m = Mount::new(server, &bucket, &["--write-back"]);
        let out = sh(&format!(
            "rsync -a '{}/' '{}/r/'",
            src.path().display(),
            m.path().display()
        ));
        assert!(out.status.success(), "{out:?}");
        m.unmount();
    }
    assert_no_temporary_names(&server.keys(&bucket));
    for (rel, body) in &files {
        assert_eq!(
            server.get(&bucket, &format!("r/{rel}")).as_deref(),
            Some(&body[..]),
            "{rel}"
        );
    }
    let m = Mount::new(server, &bucket, &[]);
    let changes = rsync_changes(src.path(), &m.join("r"));
    assert!(changes.trim().is_empty(), "rsync -c changes: {changes}");
}

/// What `rsync -a -c -i` of `src` onto `dst` reports it changed (checksums, not times).
fn rsync_changes(src: &std::path::Path, dst: &std::path::Path) -> String {
    let out = sh(&format!(
        "rsync -a -c -i '{}/' '{}/'",
        src.display(),
        dst.display()
    ));
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
