//! POSIX corners that legacy tools hit, through the real binary: several descriptors of one
//! file, a file unlinked while open, times moved by writes, symlinks under chown/touch -h,
//! special files, directory attributes after a remount, EFBIG. What lands in the bucket is
//! checked with the independent client.

mod support;

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use support::*;

fn ok(cmd: &str) -> String {
    let out = sh(cmd);
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn parallel_notrunc_writers_of_one_file_all_land() {
    let server = server();
    let bucket = server.new_bucket();
    let m = Mount::new(server, &bucket, &[]);
    let f = m.join("cw");
    std::fs::write(&f, vec![b'.'; 1 << 20]).unwrap();
    let f = f.display();
    ok(&format!(
        "for i in 1 2 3 4; do dd if=/dev/zero of='{f}' seek=$((i*100)) bs=1k count=16 conv=notrunc status=none & done; wait"
    ));
    // Each dd's own exit status too.
    ok(&format!(
        "pids=; for i in 1 2 3 4; do (head -c 16384 /dev/zero | tr '\\0' \"$i\" | dd of='{f}' seek=$((i*100+500)) bs=1k conv=notrunc status=none) & pids=\"$pids $!\"; done; for p in $pids; do wait $p || exit 1; done"
    ));
    let got = server.get(&bucket, "cw").unwrap();
    assert_eq!(got.len(), 1 << 20);
    for i in 1..=4usize {
        let at = i * 100 * 1024;
        assert!(
            got[at..at + 16384].iter().all(|b| *b == 0),
            "zeros of dd {i}"
        );
        let at = (i * 100 + 500) * 1024;
        let digit = b'0' + i as u8;
        assert!(
            got[at..at + 16384].iter().all(|b| *b == digit),
            "bytes of writer {i}"
        );
    }
    assert_eq!(got[0], b'.');
    assert!(server.open_uploads(&bucket).is_empty());
}

#[test]
fn two_shell_appenders_and_a_tail_lose_nothing() {
    let server = server();
    let bucket = server.new_bucket();
    let m = Mount::new(server, &bucket, &[]);
    let log = m.join("log");
    std::fs::write(&log, "").unwrap();
    let l = log.display();
    ok(&format!(
        "(for i in $(seq 1 20); do echo a$i >> '{l}'; done) & (for i in $(seq 1 20); do echo b$i >> '{l}'; done) & wait"
    ));
    let got = String::from_utf8(server.get(&bucket, "log").unwrap()).unwrap();
    let mut lines: Vec<&str> = got.lines().collect();
    lines.sort();
    let mut want: Vec<String> = (1..=20)
        .flat_map(|i| [format!("a{i}"), format!("b{i}")])
        .collect();
    want.sort();
    assert_eq!(lines, want, "every line once, no NUL runs: {got:?}");
    // A reader holding the file open (tail -f) while lines are appended reads each new line.
    let script = format!(
        r#"
import os, subprocess
p = '{l}'
r = os.open(p, os.O_RDONLY)
pos = os.fstat(r).st_size
for i in range(12):
    subprocess.run(['sh', '-c', 'echo line%d >> %s' % (i, p)], check=True)
    data = os.pread(r, 4096, pos)
    assert data == b'line%d\n' % i, (i, data, pos, os.fstat(r).st_size)
    pos += len(data)
os.close(r)
"#
    );
    ok(&format!("python3 -c \"{}\"", script.replace('"', "\\\"")));
    let got = String::from_utf8(server.get(&bucket, "log").unwrap()).unwrap();
    let tail: Vec<&str> = got.lines().skip(40).collect();
    let want: Vec<String> = (0..12).map(|i| format!("line{i}")).collect();
    assert_eq!(tail, want);
}

#[test]
fn a_file_unlinked_while_open_reads_back_and_is_not_recreated() {
    let server = server();
    let bucket = server.new_bucket();
    let m = Mount::new(server, &bucket, &[]);
    std::fs::write(m.join("ro"), "committed").unwrap();
    let script = format!(
        r#"
import os
g = '{g}'
fd = os.open(g, os.O_CREAT | os.O_RDWR, 0o644)
os.write(fd, b'Hello')
ro = os.open('{ro}', os.O_RDONLY)
os.unlink(g)
os.unlink('{ro}')
assert os.pread(fd, 5, 0) == b'Hello'
assert os.fstat(fd).st_nlink == 0, os.fstat(fd).st_nlink
os.write(fd, b', world')
assert os.pread(fd, 100, 0) == b'Hello, world'
assert os.pread(ro, 100, 0) == b'committed'
os.close(fd)
os.close(ro)
assert not os.path.exists(g)
"#,
        g = m.join("g").display(),
        ro = m.join("ro").display()
    );
    ok(&format!("python3 -c \"{}\"", script.replace('"', "\\\"")));
    assert!(
        server.keys(&bucket).is_empty(),
        "{:?}",
        server.keys(&bucket)
    );
    assert!(server.open_uploads(&bucket).is_empty());
}

#[test]
fn writes_move_mtime_in_the_mount_and_in_the_bucket() {
    let server = server();
    let bucket = server.new_bucket();
    let m = Mount::new(server, &bucket, &[]);
    let f = m.join("f");
    ok(&format!(
        "echo a > '{0}' && touch -d @1500000000 '{0}'",
        f.display()
    ));
    assert_eq!(std::fs::metadata(&f).unwrap().mtime(), 1_500_000_000);
    for (i, cmd) in [
        "echo b >> '{f}'",
        "echo c > '{f}'",
        "printf X | dd of='{f}' conv=notrunc status=none",
    ]
    .iter()
    .enumerate()
    {
        ok(&format!("touch -d @1500000000 '{0}'", f.display()));
        ok(&cmd.replace("{f}", &f.display().to_string()));
        let mtime = std::fs::metadata(&f).unwrap().mtime();
        assert!(mtime > 1_600_000_000, "write {i} moved mtime: {mtime}");
        let stored: f64 = server.metadata(&bucket, "f")["mtime"].parse().unwrap();
        assert!(stored > 1.6e9, "write {i} stored mtime {stored}");
    }
    assert_eq!(server.get(&bucket, "f").unwrap(), b"X\n");
}

#[test]
fn symlinks_take_chown_and_touch_h_and_tar_extracts_them() {
    let server = server();
    let bucket = server.new_bucket();
    let m = Mount::new(server, &bucket, &[]);
    let l = m.join("lnk");
    ok(&format!(
        "ln -s target.txt '{0}' && chown -h 1000:1000 '{0}' && touch -h -d @1500000000 '{0}'",
        l.display()
    ));
    let meta = std::fs::symlink_metadata(&l).unwrap();
    assert!(meta.file_type().is_symlink());
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mtime()),
        (1000, 1000, 1_500_000_000)
    );
    assert_eq!(std::fs::read_link(&l).unwrap().to_str(), Some("target.txt"));
    let stored = server.metadata(&bucket, "lnk");
    assert_eq!(stored.get("mode").map(String::as_str), Some("41471"));
    assert_eq!(server.get(&bucket, "lnk").unwrap(), b"target.txt");
    // tar x of a tree with a symlink, and rsync -a of it, exit 0.
    let src = tempfile::tempdir().unwrap();
    ok(&format!(
        "cd '{0}' && mkdir t && echo hi > t/file && ln -s file t/link && tar cf t.tar t",
        src.path().display()
    ));
    ok(&format!(
        "tar xf '{}/t.tar' -C '{}'",
        src.path().display(),
        m.path().display()
    ));
    assert!(std::fs::symlink_metadata(m.join("t/link"))
        .unwrap()
        .file_type()
        .is_symlink());
    ok(&format!(
        "rsync -a '{}/t/' '{}/r/'",
        src.path().display(),
        m.path().display()
    ));
    ok(&format!(
        "rsync -a '{}/t/' '{}/r/'",
        src.path().display(),
        m.path().display()
    ));
}

#[test]
fn fifos_and_device_nodes_are_stored_as_s3fs_stores_them() {
    let server = server();
    let bucket = server.new_bucket();
    {
        let m = Mount::new(server, &bucket, &[]);
        ok(&format!(
            "mkfifo -m 640 '{0}/fifo' && mknod '{0}/chr' c 1 3 && mknod '{0}/reg' p && rm '{0}/reg'",
            m.path().display()
        ));
        let meta = std::fs::metadata(m.join("fifo")).unwrap();
        assert!(meta.file_type().is_fifo());
        assert_eq!(meta.mode() & 0o7777, 0o640);
    }
    assert_eq!(
        server
            .metadata(&bucket, "fifo")
            .get("mode")
            .map(String::as_str),
        Some("4512")
    );
    // Remounted: found again by their stored mode.
    let m = Mount::new(server, &bucket, &[]);
    assert!(std::fs::metadata(m.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    let chr = std::fs::metadata(m.join("chr")).unwrap();
    assert!(chr.file_type().is_char_device());
    assert_eq!(chr.rdev(), libc::makedev(1, 3));
}

#[test]
fn directory_mode_and_owner_survive_a_remount() {
    let server = server();
    let bucket = server.new_bucket();
    {
        let m = Mount::new(server, &bucket, &[]);
        ok(&format!(
            "mkdir -m 700 '{0}/d' && chown 1000:1000 '{0}/d'",
            m.path().display()
        ));
    }
    let m = Mount::new(server, &bucket, &[]);
    let meta = std::fs::metadata(m.join("d")).unwrap();
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid()),
        (0o700, 1000, 1000)
    );
}

#[test]
fn sizes_past_five_tib_are_efbig() {
    let server = server();
    let bucket = server.new_bucket();
    let m = Mount::new(server, &bucket, &[]);
    let f = m.join("f");
    std::fs::write(&f, "x").unwrap();
    let out = sh(&format!("truncate -s 999999999999999 '{}'", f.display()));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("File too large"), "{err}");
    assert_eq!(server.get(&bucket, "f").unwrap(), b"x");
}

/// HEAD requests the daemon made, from the traffic line it logs at unmount.
fn heads_at_unmount(m: &Mount) -> u64 {
    m.unmount_traffic();
    let log = std::fs::read_to_string(&m.log).unwrap();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("store traffic:"))
        .unwrap();
    let i = line.find(" HEAD").unwrap();
    line[..i]
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn stored_times_and_kinds_show_in_listings_and_stay_known_across_remounts_with_a_cache_dir() {
    let server = server();
    let bucket = server.new_bucket();
    // Written by s3fs (or another client): stored mtime, mode; a symlink.
    for i in 0..20 {
        let key = format!("d/f{i:02}");
        let meta = [("mtime", "1400000000"), ("mode", "33152")]; // 0100600
        server.put_with_meta(&bucket, &key, "x", &meta);
    }
    server.put_with_meta(&bucket, "d/lnk", "f00", &[("mode", "41471")]);
    let cache = tempfile::tempdir().unwrap();
    let cache_arg = cache.path().display().to_string();
    for round in 0..2 {
        let m = Mount::new(server, &bucket, &["--cache-dir", &cache_arg]);
        let out = ok(&format!(
            "ls -l --time-style=+%s '{}'",
            m.join("d").display()
        ));
        let files: Vec<&str> = out.lines().filter(|l| l.starts_with('-')).collect();
        assert_eq!(files.len(), 20, "{out}");
        for l in files {
            assert!(
                l.starts_with("-rw-------") && l.contains(" 1400000000 "),
                "{l}"
            );
        }
        let lnk = std::fs::symlink_metadata(m.join("d/lnk")).unwrap();
        assert!(lnk.file_type().is_symlink(), "round {round}");
        let heads = heads_at_unmount(&m);
        if round == 0 {
            assert!(heads >= 21, "each version confirmed once: {heads}");
        } else {
            assert!(heads <= 2, "known from the cache directory: {heads} HEADs");
        }
    }
}
