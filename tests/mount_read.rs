//! The real binary mounted on a temp dir against a real S3 server (Garage), used through
//! std::fs and ordinary tools, and checked against what an independent client put in the bucket.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use support::*;

/// Every file under `root`, relative path -> content.
fn walk(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read_dir {}: {e}", d.display())) {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn tree_reads_back_exactly() {
    let server = server();
    let bucket = server.new_bucket();
    let mut expected = BTreeMap::new();
    let files: Vec<(&str, usize)> = vec![
        ("empty", 0),
        ("one", 1),
        ("docs/readme.txt", 1234),
        ("docs/deep/er/file.bin", (1 << 20) + 1),
        ("data/a.bin", 5 << 20),
        ("name with spaces.txt", 10),
        ("ünïcödé.txt", 11),
    ];
    for (i, (k, n)) in files.iter().enumerate() {
        let body = pattern(*n, i as u64);
        server.put(&bucket, k, body.clone());
        expected.insert(k.to_string(), body);
    }
    server.put(&bucket, "emptydir/", "");
    let m = Mount::new(server, &bucket, &[]);
    assert_eq!(walk(m.path()), expected);
    assert!(m.join("emptydir").is_dir());
    assert_eq!(std::fs::read_dir(m.join("emptydir")).unwrap().count(), 0);

    // Real tools agree with the bucket.
    let want = sha256(&expected["data/a.bin"]);
    let out = sh(&format!("sha256sum '{}'", m.join("data/a.bin").display()));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&want),
        "{out:?}"
    );
    let out = sh(&format!("cd '{}' && find . | sort", m.path().display()));
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    for k in expected.keys() {
        assert!(
            listed.contains(&format!("./{k}\n")),
            "find misses {k}: {listed}"
        );
    }
    let out = sh(&format!("ls -l '{}/docs'", m.path().display()));
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("readme.txt"),
        "{out:?}"
    );
    let copy = tempfile::tempdir().unwrap();
    let out = sh(&format!(
        "cp -r '{}/.' '{}'",
        m.path().display(),
        copy.path().display()
    ));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(walk(copy.path()), expected);
    let size = std::fs::metadata(m.join("docs/readme.txt")).unwrap().len();
    assert_eq!(size, 1234);
    // df works.
    let out = sh(&format!("df '{}'", m.path().display()));
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn large_object_reads_back_in_every_pattern() {
    let server = server();
    let bucket = server.new_bucket();
    let body = pattern(300 << 20, 9);
    server.put(&bucket, "big.bin", body.clone());
    let m = Mount::new(server, &bucket, &[]);
    let out = sh(&format!("sha256sum '{}'", m.join("big.bin").display()));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&sha256(&body)),
        "{out:?}"
    );
    // Reverse and scattered reads on one handle.
    let mut f = std::fs::File::open(m.join("big.bin")).unwrap();
    let chunk = 3 << 20;
    let mut off = body.len();
    while off > 0 {
        let start = off.saturating_sub(chunk);
        let mut buf = vec![0u8; off - start];
        f.seek(SeekFrom::Start(start as u64)).unwrap();
        f.read_exact(&mut buf).unwrap();
        assert!(buf == body[start..off], "reverse read at {start}");
        off = start;
    }
    let mut x: u64 = 12345;
    for _ in 0..200 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        let start = (x >> 11) as usize % body.len();
        let len = ((x >> 3) as usize % 70_000).min(body.len() - start);
        let mut buf = vec![0u8; len];
        f.seek(SeekFrom::Start(start as u64)).unwrap();
        f.read_exact(&mut buf).unwrap();
        assert!(
            buf == body[start..start + len],
            "random read at {start}+{len}"
        );
    }
}

#[test]
fn directory_semantics_on_garage() {
    let server = garage();
    let bucket = server.new_bucket();
    server.put(&bucket, "both", "hidden");
    server.put(&bucket, "both/child", "visible");
    server.put(&bucket, "marker-only/", "");
    server.put(&bucket, "legacy_$folder$", "");
    server.put(&bucket, "implicit/a/b/c.txt", "deep");
    server.put(&bucket, "a//double", "skipped");
    server.put(&bucket, "dots/../escape", "skipped");
    server.put(&bucket, &format!("long/{}", "n".repeat(300)), "skipped");
    server.put(&bucket, "ctl/tab\there", "shown");
    server.put(&bucket, "withdata/", "a marker that carries bytes");
    server.put(&bucket, "withdata/inside", "in");
    server.put(&bucket, "case/Name", "upper");
    server.put(&bucket, "case/name", "lower");
    let m = Mount::new(server, &bucket, &[]);
    assert!(m.join("both").is_dir());
    assert_eq!(std::fs::read(m.join("both/child")).unwrap(), b"visible");
    assert!(m.join("marker-only").is_dir());
    assert!(m.join("legacy").is_dir());
    assert_eq!(
        std::fs::read(m.join("implicit/a/b/c.txt")).unwrap(),
        b"deep"
    );
    assert_eq!(std::fs::read_dir(m.join("a")).unwrap().count(), 0);
    let dots: Vec<_> = std::fs::read_dir(m.join("dots"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(dots.is_empty(), "'..' must not be shown: {dots:?}");
    assert_eq!(std::fs::read_dir(m.join("long")).unwrap().count(), 0);
    assert_eq!(std::fs::read(m.join("ctl/tab\there")).unwrap(), b"shown");
    // A `dir/` key with data is a directory; names differing only in case are two files.
    assert!(m.join("withdata").is_dir());
    assert_eq!(std::fs::read(m.join("withdata/inside")).unwrap(), b"in");
    assert_eq!(std::fs::read(m.join("case/Name")).unwrap(), b"upper");
    assert_eq!(std::fs::read(m.join("case/name")).unwrap(), b"lower");
    // Walking everything works and stays inside the mount.
    let out = sh(&format!("find '{}' | wc -l", m.path().display()));
    assert!(out.status.success(), "{out:?}");
    // Removing the last file of a directory is a writer's business; here: emptied prefixes vanish
    // only if they had no marker, and a marker keeps an empty directory.
    assert!(std::fs::read_dir(m.path()).unwrap().all(|e| e.is_ok()));
}

#[test]
fn prefix_mount_and_s3fs_metadata() {
    let server = server();
    let bucket = server.new_bucket();
    server.put(&bucket, "outside.txt", "no");
    server.put(&bucket, "team/data/report.txt", "yes");
    server.put_with_meta(
        &bucket,
        "team/data/tool.sh",
        "#!/bin/sh\n",
        &[
            ("mode", "33261"),
            ("uid", "4321"),
            ("gid", "8765"),
            ("mtime", "1600000000"),
        ],
    );
    let m = Mount::new(
        server,
        &format!("{bucket}:/team/data"),
        &["--metadata-ttl", "0"],
    );
    let names: Vec<String> = std::fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, vec!["report.txt", "tool.sh"]);
    let meta = std::fs::metadata(m.join("tool.sh")).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o755);
    assert_eq!((meta.uid(), meta.gid()), (4321, 8765));
    assert_eq!(meta.mtime(), 1_600_000_000);
    let plain = std::fs::metadata(m.join("report.txt")).unwrap();
    assert_eq!(plain.mode() & 0o7777, 0o644);
    // s3://bucket/prefix form mounts the same thing.
    let m2 = Mount::new(server, &format!("s3://{bucket}/team/"), &[]);
    assert_eq!(std::fs::read(m2.join("data/report.txt")).unwrap(), b"yes");
}

#[test]
fn big_directory_lists_completely() {
    let server = server();
    let bucket = server.new_bucket();
    server.put_empty_many(&bucket, (0..25_000).map(|i| format!("many/k{i:05}")));
    let m = Mount::new(server, &bucket, &[]);
    let n = std::fs::read_dir(m.join("many")).unwrap().count();
    assert_eq!(n, 25_000);
    let out = sh(&format!("ls -l '{}' | wc -l", m.join("many").display()));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "25001",
        "{out:?}"
    );
}

#[test]
fn writes_are_refused_with_erofs() {
    let server = server();
    let bucket = server.new_bucket();
    server.put(&bucket, "f", "data");
    let m = Mount::new(server, &bucket, &["--read-only"]);
    let e = std::fs::write(m.join("new"), "x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    let e = std::fs::OpenOptions::new()
        .append(true)
        .open(m.join("f"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    let e = std::fs::create_dir(m.join("d")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    assert_eq!(std::fs::read(m.join("f")).unwrap(), b"data");
    assert_eq!(server.keys(&bucket), vec!["f"]);
}

#[test]
fn replaced_object_is_never_read_mixed() {
    let server = server();
    let bucket = server.new_bucket();
    let old = vec![b'o'; 32 << 20];
    server.put(&bucket, "f", old.clone());
    let m = Mount::new(server, &bucket, &["--metadata-ttl", "1"]);
    let mut f = std::fs::File::open(m.join("f")).unwrap();
    let mut first = vec![0u8; 1 << 20];
    f.read_exact(&mut first).unwrap();
    server.put(&bucket, "f", vec![b'n'; 32 << 20]);
    let mut rest = Vec::new();
    match f.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.iter().all(|b| *b == b'o'), "mixed old and new bytes"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{e}"),
    }
    drop(f);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let now = std::fs::read(m.join("f")).unwrap();
    assert!(
        now.len() == 32 << 20 && now.iter().all(|b| *b == b'n'),
        "new content after the TTL"
    );
}

#[test]
fn mount_helper_argv_form() {
    // What mount(8) runs for `mount -t s3mount SOURCE DIR -o ...`: mount.s3mount SOURCE DIR -o opts.
    let server = server();
    let bucket = server.new_bucket();
    server.put(&bucket, "p/f", "via helper");
    let bin_dir = tempfile::tempdir().unwrap();
    let helper = bin_dir.path().join("mount.s3mount");
    std::os::unix::fs::symlink(s3mount_bin(), &helper).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = format!(
        "endpoint_url={},region={},force_path_style,ro,_netdev,nofail,x-systemd.automount",
        server.endpoint, server.region
    );
    let source = format!("{bucket}:/p");
    let run = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(&helper);
        cmd.arg(&source)
            .arg(dir.path())
            .args(extra)
            .args(["-o", &opts])
            .envs(server.env());
        cmd.output().unwrap()
    };
    let fake = run(&["-f"]);
    assert!(fake.status.success(), "{fake:?}");
    assert!(!is_mounted(dir.path()), "-f (fake) must not mount");
    let out = run(&["-n", "-v"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"via helper");
    assert_eq!(
        std::fs::write(dir.path().join("g"), "x")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
    assert!(
        umount_patiently(dir.path()),
        "umount {}",
        dir.path().display()
    );
}

#[test]
fn works_with_and_without_ca_bundle_variables() {
    let server = server();
    let bucket = server.new_bucket();
    server.put(&bucket, "f", "tls-agnostic");
    for env in [
        vec![("AWS_CA_BUNDLE", None), ("SSL_CERT_FILE", None)],
        vec![
            ("AWS_CA_BUNDLE", Some("/etc/ssl/certs/ca-certificates.crt")),
            ("SSL_CERT_FILE", Some("/etc/ssl/certs/ca-certificates.crt")),
        ],
    ] {
        let m = Mount::with_env(server, &server.endpoint, &bucket, &[], &env);
        assert_eq!(
            std::fs::read(m.join("f")).unwrap(),
            b"tls-agnostic",
            "{env:?}"
        );
    }
}

/// Every file and directory under `root` with its permission bits.
fn modes(root: &Path) -> Vec<(std::path::PathBuf, u32, bool)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).unwrap().flatten() {
        let m = e.metadata().unwrap();
        out.push((e.path(), m.mode() & 0o777, m.is_dir()));
        if m.is_dir() {
            out.extend(modes(&e.path()));
        }
    }
    out
}

#[test]
fn disk_cache_survives_remount_and_rejects_damaged_blocks() {
    let server = server();
    let bucket = server.new_bucket();
    let body = pattern((5 << 20) + 7, 21);
    server.put(&bucket, "c.bin", body.clone());
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let opts = [
        "--cache-dir",
        cache.to_str().unwrap(),
        "--max-cache-size",
        "64MiB",
    ];

    let m = Mount::new(server, &bucket, &opts);
    assert!(std::fs::read(m.join("c.bin")).unwrap() == body);
    let (_, fetched) = m.unmount_traffic();
    assert_eq!(fetched, body.len() as u64);

    // Blocks are 0600, directories 0700; six 1 MiB blocks for 5 MiB + 7 bytes (besides the
    // lock and the known-versions file).
    let entries = modes(&cache);
    let blocks: Vec<_> = entries
        .iter()
        .filter(|(p, _, dir)| !dir && !p.ends_with("lock") && !p.ends_with("known-versions"))
        .collect();
    assert_eq!(blocks.len(), 6, "{entries:?}");
    for (p, mode, dir) in &entries {
        assert_eq!(*mode, if *dir { 0o700 } else { 0o600 }, "{}", p.display());
    }
    assert_eq!(std::fs::metadata(&cache).unwrap().mode() & 0o777, 0o700);

    // Damage block 2 (one flipped byte); a remount reads every other block from disk.
    let damaged = blocks
        .iter()
        .find(|(p, _, _)| p.to_string_lossy().ends_with("-2"))
        .unwrap()
        .0
        .clone();
    let mut raw = std::fs::read(&damaged).unwrap();
    let n = raw.len();
    raw[n - 100] ^= 0x01;
    std::fs::write(&damaged, raw).unwrap();

    let m = Mount::new(server, &bucket, &opts);
    assert!(
        std::fs::read(m.join("c.bin")).unwrap() == body,
        "damaged block returned"
    );
    let (_, fetched) = m.unmount_traffic();
    assert_eq!(fetched, 1 << 20, "only the damaged block is fetched again");
    let log = std::fs::read_to_string(&m.log).unwrap();
    assert!(log.contains("disk cache block rejected"), "{log}");
}

#[test]
fn random_reads_fetch_what_they_return() {
    let server = server();
    let bucket = server.new_bucket();
    let body = pattern(64 << 20, 22);
    server.put(&bucket, "r.bin", body.clone());
    let m = Mount::new(server, &bucket, &[]);
    let f = std::fs::File::open(m.join("r.bin")).unwrap();
    use std::os::unix::fs::FileExt;
    let mut x: u64 = 99;
    let reads = 300u64;
    for _ in 0..reads {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        let off = ((x >> 20) % ((64 << 20) / 4096)) * 4096;
        let mut buf = [0u8; 4096];
        f.read_exact_at(&mut buf, off).unwrap();
        assert!(
            buf[..] == body[off as usize..off as usize + 4096],
            "at {off}"
        );
    }
    drop(f);
    let (_, fetched) = m.unmount_traffic();
    assert!(
        fetched <= 2 * reads * 4096,
        "{fetched} bytes fetched for {} returned",
        reads * 4096
    );
}

#[test]
fn concurrent_readers_stay_within_the_memory_budget() {
    let server = server();
    let bucket = server.new_bucket();
    let files = 32;
    let bodies: Vec<Vec<u8>> = (0..files).map(|i| pattern(12 << 20, 100 + i)).collect();
    std::thread::scope(|s| {
        for (i, b) in bodies.iter().enumerate() {
            let bucket = &bucket;
            s.spawn(move || server.put(bucket, &format!("f{i}"), b.clone()));
        }
    });
    let m = Mount::new(server, &bucket, &[]);
    std::thread::scope(|s| {
        for (i, b) in bodies.iter().enumerate() {
            let path = m.join(&format!("f{i}"));
            s.spawn(move || {
                let got = std::fs::read(&path).unwrap();
                assert!(got == *b, "f{i} differs");
            });
        }
    });
    let peak = m.daemon_peak_rss();
    assert!(
        peak < 512 << 20,
        "daemon peak RSS {} MiB over the 512 MiB budget",
        peak >> 20
    );
    eprintln!("32 concurrent readers: daemon peak RSS {} MiB", peak >> 20);
}
