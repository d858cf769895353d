//! Filesystem rules against the in-memory store, with request counters and injected faults.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::*;
use crate::store::mock::{MockStore, Op};
use crate::store::UserMetadata;

/// The configuration of a test filesystem: what failed uploads keep goes to a staging
/// directory of this test process, removed when it exits, not to the shared default.
pub(super) fn test_config(prefix: &str) -> FsConfig {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    extern "C" fn remove_staging() {
        if let Some(dir) = DIR.get() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    let dir = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("staging dir").keep();
        // SAFETY: atexit with an extern "C" fn that touches only a static.
        unsafe { libc::atexit(remove_staging) };
        dir
    });
    let mut cfg = FsConfig::new(prefix);
    cfg.staging_dir = dir.clone();
    cfg
}

fn setup(prefix: &str) -> (Arc<MockStore>, Fs) {
    let store = Arc::new(MockStore::new());
    let fs = Fs::new(store.clone(), test_config(prefix));
    (store, fs)
}

/// [`setup`] of a whole bucket with `--metadata-ttl` set to `ttl`.
fn setup_with_ttl(ttl: std::time::Duration) -> (Arc<MockStore>, Fs) {
    let store = Arc::new(MockStore::new());
    let mut cfg = test_config("");
    cfg.metadata_ttl = ttl;
    let fs = Fs::new(store.clone(), cfg);
    (store, fs)
}

async fn list_names(fs: &Fs, ino: u64) -> Vec<(String, Kind)> {
    let fh = fs.opendir(ino).await.unwrap();
    let items = fs.readdir(fh, 0, usize::MAX, true).await.unwrap();
    fs.releasedir(fh);
    items.into_iter().map(|i| (i.name, i.kind)).collect()
}

async fn read_all(fs: &Fs, ino: u64) -> Vec<u8> {
    let (fh, _) = fs.open(ino, libc::O_RDONLY).await.unwrap();
    let mut out = Vec::new();
    loop {
        let b = fs.read(fh, out.len() as i64, 128 << 10).await.unwrap();
        if b.is_empty() {
            break;
        }
        out.extend_from_slice(&b);
    }
    fs.release(fh).await.unwrap();
    out
}

#[tokio::test]
async fn implicit_and_explicit_directories_and_shadowing() {
    let (store, fs) = setup("");
    store.insert("implicit/file", "1");
    store.insert("explicit/", "");
    store.insert("legacy_$folder$", "");
    store.insert("both", "hidden file");
    store.insert("both/inner", "2");
    store.insert("plain", "3");
    let names = list_names(&fs, ROOT_INO).await;
    assert_eq!(
        names,
        vec![
            (".".into(), Kind::Dir),
            ("..".into(), Kind::Dir),
            ("both".into(), Kind::Dir),
            ("explicit".into(), Kind::Dir),
            ("implicit".into(), Kind::Dir),
            ("legacy".into(), Kind::Dir),
            ("plain".into(), Kind::File),
        ]
    );
    // Lookup without a cached listing gives the same answers.
    let fs = Fs::new(store.clone(), test_config(""));
    for (name, kind) in [
        ("both", Kind::Dir),
        ("explicit", Kind::Dir),
        ("implicit", Kind::Dir),
        ("legacy", Kind::Dir),
        ("plain", Kind::File),
    ] {
        let a = fs.lookup(ROOT_INO, name.as_bytes()).await.unwrap();
        assert_eq!(a.kind, kind, "{name}");
    }
    assert_eq!(fs.lookup(ROOT_INO, b"missing").await, Err(Errno::ENOENT));
    let both = fs.lookup(ROOT_INO, b"both").await.unwrap();
    let inner = list_names(&fs, both.ino).await;
    assert_eq!(inner[2], ("inner".into(), Kind::File));
}

#[tokio::test]
async fn bad_names_are_skipped_not_fatal() {
    let (store, fs) = setup("");
    let long = "x".repeat(300);
    for k in ["ok", "a//b", "./c", "../d", "e/./f", &long, "trail/"] {
        store.insert(k, "v");
    }
    store.insert("data-with-slash/", "not empty");
    let names: Vec<String> = list_names(&fs, ROOT_INO)
        .await
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        vec![".", "..", "a", "data-with-slash", "e", "ok", "trail"]
    );
    let a = fs.lookup(ROOT_INO, b"a").await.unwrap();
    // "a//b" has an empty component: the listing of a/ shows nothing valid.
    assert_eq!(list_names(&fs, a.ino).await.len(), 2);
    assert_eq!(
        fs.lookup(ROOT_INO, long.as_bytes()).await,
        Err(Errno::ENAMETOOLONG)
    );
    assert_eq!(fs.lookup(ROOT_INO, b"..").await, Err(Errno::ENOENT));
}

#[tokio::test]
async fn prefix_mount_without_marker() {
    let (store, fs) = setup("team/data/");
    store.insert("team/data/x.txt", "hello");
    store.insert("team/data/sub/y", "world");
    store.insert("team/other", "not visible");
    let names: Vec<String> = list_names(&fs, ROOT_INO)
        .await
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, vec![".", "..", "sub", "x.txt"]);
    let x = fs.lookup(ROOT_INO, b"x.txt").await.unwrap();
    assert_eq!(read_all(&fs, x.ino).await, b"hello");
    assert_eq!(fs.lookup(ROOT_INO, b"other").await, Err(Errno::ENOENT));
}

#[tokio::test]
async fn pagination_lists_everything() {
    let (store, fs) = setup("");
    store.set_page_size(100);
    for i in 0..2_500 {
        store.insert(&format!("big/{i:05}"), "");
    }
    let big = fs.lookup(ROOT_INO, b"big").await.unwrap();
    store.reset_counters();
    assert_eq!(list_names(&fs, big.ino).await.len(), 2_502);
    assert_eq!(store.counters.list.load(Ordering::Relaxed), 25);
}

#[tokio::test]
async fn readdirplus_costs_listing_requests_plus_one_head_per_new_version() {
    // (confirm listed entries, objects carry s3fs metadata)
    for (confirm, with_metadata) in [(false, true), (true, false), (true, true)] {
        let store = Arc::new(MockStore::new());
        let mut cfg = test_config("");
        cfg.confirm_listed = confirm;
        let fs = Fs::new(store.clone(), cfg);
        for i in 0..1_000 {
            let mut md = UserMetadata::new();
            if with_metadata {
                md.insert("mtime".into(), "1400000000".into());
            }
            store.insert_with(&format!("d/f{i}"), vec![0u8; i], md, None);
        }
        let d = fs.lookup(ROOT_INO, b"d").await.unwrap();
        for pass in 0..2 {
            store.reset_counters();
            fs.listings.lock().clear();
            let fh = fs.opendir(d.ino).await.unwrap();
            let items = fs.readdir(fh, 0, usize::MAX, true).await.unwrap();
            for item in &items {
                if item.entry.is_some() {
                    let a = fs.lookup_listed(d.ino, item).unwrap().0;
                    let want: u64 = item.name[1..].parse().unwrap();
                    assert_eq!(a.size, want);
                }
            }
            // ls -l then stats each entry: from the listing cache, confirmed once.
            for i in 0..1_000 {
                let a = fs.lookup(d.ino, format!("f{i}").as_bytes()).await.unwrap();
                let a = fs.getattr(a.ino).await.unwrap();
                if confirm && with_metadata {
                    assert_eq!(
                        a.mtime,
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_400_000_000)
                    );
                }
            }
            fs.releasedir(fh);
            let heads = store.counters.head.load(Ordering::Relaxed);
            assert_eq!(store.counters.list.load(Ordering::Relaxed), 1);
            let case = format!("confirm {confirm}, metadata {with_metadata}, pass {pass}");
            match (confirm, with_metadata, pass) {
                // Every version once.
                (true, true, 0) => assert_eq!(heads, 1_000, "{case}"),
                // A sample, then the directory's listings are trusted (plus the empty f0).
                (true, false, 0) => assert!(heads <= 17 + 16, "{case}: {heads}"),
                // Only the empty object (f0: a FIFO? a directory?) is looked at.
                (false, _, 0) => assert_eq!(heads, 1, "{case}"),
                _ => assert_eq!(heads, 0, "{case}"),
            }
        }
    }
}

#[tokio::test]
async fn s3fs_metadata_is_shown() {
    let (store, fs) = setup("");
    let mut md = UserMetadata::new();
    md.insert("mode".into(), "33261".into());
    md.insert("uid".into(), "1234".into());
    md.insert("gid".into(), "5678".into());
    md.insert("mtime".into(), "1600000000".into());
    store.insert_with("script.sh", "#!/bin/sh\n", md, None);
    let a = fs.lookup(ROOT_INO, b"script.sh").await.unwrap();
    assert_eq!((a.perm, a.uid, a.gid), (0o755, 1234, 5678));
    assert_eq!(
        a.mtime,
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000)
    );
}

#[tokio::test]
async fn negative_lookups_are_cached() {
    let (store, fs) = setup("");
    assert_eq!(fs.lookup(ROOT_INO, b"nope").await, Err(Errno::ENOENT));
    let n = store.counters.total();
    assert_eq!(fs.lookup(ROOT_INO, b"nope").await, Err(Errno::ENOENT));
    assert_eq!(store.counters.total(), n);
}

#[tokio::test]
async fn zero_ttl_sees_changes_immediately() {
    let store = Arc::new(MockStore::new());
    let mut cfg = test_config("");
    cfg.metadata_ttl = std::time::Duration::ZERO;
    let fs = Fs::new(store.clone(), cfg);
    assert_eq!(fs.lookup(ROOT_INO, b"late").await, Err(Errno::ENOENT));
    store.insert("late", "now here");
    let a = fs.lookup(ROOT_INO, b"late").await.unwrap();
    assert_eq!(read_all(&fs, a.ino).await, b"now here");
}

#[tokio::test]
async fn writes_are_refused_and_errors_map() {
    let store = Arc::new(MockStore::new());
    let mut cfg = test_config("");
    cfg.read_only = true;
    let fs = Fs::new(store.clone(), cfg);
    store.insert("f", "data");
    let a = fs.lookup(ROOT_INO, b"f").await.unwrap();
    assert_eq!(fs.open(a.ino, libc::O_WRONLY).await, Err(Errno::EROFS));
    assert_eq!(
        fs.open(a.ino, libc::O_RDONLY | libc::O_TRUNC).await,
        Err(Errno::EROFS)
    );
    assert_eq!(fs.open(ROOT_INO, libc::O_RDONLY).await, Err(Errno::EISDIR));
    store.inject_fault(Op::Head, "g", StoreError::AccessDenied("g".into()), 1);
    store.inject_fault(Op::List, "g", StoreError::AccessDenied("g".into()), 1);
    assert_eq!(fs.lookup(ROOT_INO, b"g").await, Err(Errno::EACCES));
    store.inject_fault(Op::Get, "f", StoreError::Unreachable("down".into()), 1);
    let (fh, _) = fs.open(a.ino, libc::O_RDONLY).await.unwrap();
    assert_eq!(fs.read(fh, 0, 4).await, Err(Errno::EIO));
    assert_eq!(&fs.read(fh, 0, 4).await.unwrap()[..], b"data");
    assert_eq!(fs.read(999, 0, 4).await, Err(Errno::EBADF));
}

#[tokio::test]
async fn replaced_object_gives_estale_then_new_content_after_reopen() {
    let store = Arc::new(MockStore::new());
    let mut cfg = test_config("");
    cfg.metadata_ttl = std::time::Duration::ZERO;
    cfg.prefetch.initial_window = 128 << 10;
    let fs = Fs::new(store.clone(), cfg);
    store.insert("f", vec![1u8; 4 << 20]);
    let a = fs.lookup(ROOT_INO, b"f").await.unwrap();
    let (fh, keep) = fs.open(a.ino, libc::O_RDONLY).await.unwrap();
    assert!(!keep);
    assert!(fs.read(fh, 0, 4096).await.unwrap().iter().all(|b| *b == 1));
    store.insert("f", vec![2u8; 4 << 20]);
    assert_eq!(fs.read(fh, 3 << 20, 4096).await, Err(Errno::ESTALE));
    fs.release(fh).await.unwrap();
    assert!(read_all(&fs, a.ino).await.iter().all(|b| *b == 2));
}

#[tokio::test]
async fn page_cache_kept_only_while_etag_unchanged() {
    let store = Arc::new(MockStore::new());
    let mut cfg = test_config("");
    cfg.metadata_ttl = std::time::Duration::ZERO;
    let fs = Fs::new(store.clone(), cfg);
    store.insert("f", "one");
    let a = fs.lookup(ROOT_INO, b"f").await.unwrap();
    let (h1, k1) = fs.open(a.ino, libc::O_RDONLY).await.unwrap();
    let (h2, k2) = fs.open(a.ino, libc::O_RDONLY).await.unwrap();
    store.insert("f", "two");
    let (h3, k3) = fs.open(a.ino, libc::O_RDONLY).await.unwrap();
    assert_eq!((k1, k2, k3), (false, true, false));
    for h in [h1, h2, h3] {
        fs.release(h).await.unwrap();
    }
}

#[tokio::test]
async fn forget_drops_inodes() {
    let (store, fs) = setup("");
    store.insert("f", "x");
    let before = fs.inode_count();
    let a = fs.lookup(ROOT_INO, b"f").await.unwrap();
    let b = fs.lookup(ROOT_INO, b"f").await.unwrap();
    assert_eq!(a.ino, b.ino);
    assert_eq!(fs.inode_count(), before + 1);
    fs.forget(a.ino, 1);
    assert_eq!(fs.inode_count(), before + 1);
    fs.forget(a.ino, 1);
    assert_eq!(fs.inode_count(), before);
    assert_eq!(fs.getattr(a.ino).await, Err(Errno::ENOENT));
}

#[tokio::test]
async fn symlink_written_by_s3fs_reads_its_target() {
    let (store, fs) = setup("");
    let mut md = UserMetadata::new();
    md.insert("mode".into(), "41471".into()); // 0120777
    store.insert_with("link", "target/file", md, None);
    let a = fs.lookup(ROOT_INO, b"link").await.unwrap();
    assert_eq!(a.kind, Kind::Symlink);
    assert_eq!(&fs.readlink(a.ino).await.unwrap()[..], b"target/file");
}

pub(super) const ME: Caller = Caller {
    uid: 1000,
    gid: 1000,
};

async fn write_file(fs: &Fs, parent: u64, name: &str, body: &[u8]) -> Attr {
    let (attr, fh) = fs
        .create(parent, name.as_bytes(), 0o644, libc::O_WRONLY, ME)
        .await
        .unwrap();
    for (i, chunk) in body.chunks(1 << 20).enumerate() {
        fs.write(fh, (i << 20) as i64, chunk).await.unwrap();
    }
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    attr
}

#[tokio::test]
async fn a_file_written_here_is_verified_with_the_checksum_its_upload_reported() {
    let (store, fs) = setup("");
    let body: Vec<u8> = (0..(20 << 20)).map(|i| (i % 251) as u8).collect();
    let attr = write_file(&fs, ROOT_INO, "big", &body).await;
    let heads = store.counters.head.load(Ordering::Relaxed);
    assert!(read_all(&fs, attr.ino).await == body);
    assert_eq!(
        store.counters.head.load(Ordering::Relaxed),
        heads,
        "verified at EOF without asking the store for the checksum"
    );
    // The checksum is really used: a corrupted body fails the read.
    let attr = write_file(&fs, ROOT_INO, "big2", &body).await;
    store.corrupt_next_gets(1);
    let (fh, _) = fs.open(attr.ino, libc::O_RDONLY).await.unwrap();
    let mut failed = false;
    let mut off = 0i64;
    while off < body.len() as i64 {
        match fs.read(fh, off, 1 << 20).await {
            Ok(b) if b.is_empty() => break,
            Ok(b) => off += b.len() as i64,
            Err(e) => {
                assert_eq!(e, Errno::EIO);
                failed = true;
                break;
            }
        }
    }
    let _ = fs.release(fh).await;
    assert!(failed, "a corrupted body is never returned whole");
    assert_eq!(store.counters.head.load(Ordering::Relaxed), heads);
}

#[tokio::test]
async fn create_write_close_lands_with_s3fs_metadata() {
    let (store, fs) = setup("p/");
    let body: Vec<u8> = (0..(20 << 20)).map(|i| (i % 253) as u8).collect();
    write_file(&fs, ROOT_INO, "big", &body).await;
    assert!(store.get_bytes("p/big").unwrap() == body);
    write_file(&fs, ROOT_INO, "empty", b"").await;
    assert_eq!(store.get_bytes("p/empty").unwrap().len(), 0);
    let meta = store.head("p/big").await.unwrap();
    assert_eq!(meta.metadata.get("mode").map(String::as_str), Some("33188"));
    assert_eq!(meta.metadata.get("uid").map(String::as_str), Some("1000"));
    assert_eq!(store.open_uploads(), 0);
}

#[tokio::test]
async fn file_being_written_is_listed_with_its_size_and_readable_by_another_fd() {
    let (store, fs) = setup("");
    let (attr, fh) = fs
        .create(ROOT_INO, b"growing", 0o644, libc::O_WRONLY, ME)
        .await
        .unwrap();
    fs.write(fh, 0, &[7u8; 1000]).await.unwrap();
    let names = list_names(&fs, ROOT_INO).await;
    assert!(names.contains(&("growing".into(), Kind::File)));
    assert_eq!(fs.getattr(attr.ino).await.unwrap().size, 1000);
    assert!(
        store.get_bytes("growing").is_none(),
        "nothing visible before close"
    );
    // A second descriptor, for reading, reads what the first one wrote.
    let (rd, _) = fs.open(attr.ino, libc::O_RDONLY).await.unwrap();
    assert_eq!(&fs.read(rd, 0, 4096).await.unwrap()[..], &[7u8; 1000][..]);
    fs.release(rd).await.unwrap();
    fs.fsync(fh).await.unwrap();
    assert_eq!(
        store.get_bytes("growing").unwrap().len(),
        1000,
        "fsync makes it durable"
    );
    // Writes after fsync continue the same file.
    fs.write(fh, 1000, &[8u8; 10]).await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    let got = store.get_bytes("growing").unwrap();
    assert_eq!(got.len(), 1010);
    assert!(got[..1000].iter().all(|b| *b == 7) && got[1000..].iter().all(|b| *b == 8));
}

#[tokio::test]
async fn append_to_existing_object_copies_instead_of_reuploading() {
    let (store, fs) = setup("");
    let old: Vec<u8> = vec![1u8; 16 << 20];
    store.insert("log", old.clone());
    let a = fs.lookup(ROOT_INO, b"log").await.unwrap();
    let (fh, _) = fs
        .open(a.ino, libc::O_WRONLY | libc::O_APPEND)
        .await
        .unwrap();
    store.reset_counters();
    fs.write(fh, old.len() as i64, b"appended").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    let got = store.get_bytes("log").unwrap();
    assert_eq!(got.len(), old.len() + 8);
    assert_eq!(&got[old.len()..], b"appended");
    assert_eq!(store.counters.bytes_uploaded.load(Ordering::Relaxed), 8);
    // Writing inside existing bytes goes through staging.
    let (fh, _) = fs.open(a.ino, libc::O_WRONLY).await.unwrap();
    fs.write(fh, 10, b"x").await.unwrap();
    fs.release(fh).await.unwrap();
    let got = store.get_bytes("log").unwrap();
    assert_eq!(got[10], b'x');
    assert_eq!(got.len(), old.len() + 8);
}

#[tokio::test]
async fn truncate_then_stream_replaces_the_object() {
    let (store, fs) = setup("");
    store.insert("f", "old contents");
    let a = fs.lookup(ROOT_INO, b"f").await.unwrap();
    // dd: open without O_TRUNC, ftruncate(0), then write.
    let (fh, _) = fs.open(a.ino, libc::O_WRONLY).await.unwrap();
    fs.setattr(
        a.ino,
        Some(fh),
        SetAttr {
            size: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    fs.write(fh, 0, b"new").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(&store.get_bytes("f").unwrap()[..], b"new");
}

#[tokio::test]
async fn failed_upload_reports_eio_and_keeps_the_old_object() {
    let (store, fs) = setup("");
    store.insert("f", "precious");
    store.inject_fault(
        Op::UploadPart,
        "f",
        StoreError::Other("HTTP 500".into()),
        1000,
    );
    let a = fs.lookup(ROOT_INO, b"f").await.unwrap();
    let (fh, _) = fs
        .open(a.ino, libc::O_WRONLY | libc::O_TRUNC)
        .await
        .unwrap();
    let mut err = None;
    for i in 0..30 {
        if let Err(e) = fs.write(fh, i << 20, &[0u8; 1 << 20]).await {
            err = Some(e);
            break;
        }
    }
    let closed = fs.flush(fh).await;
    assert!(
        err == Some(Errno::EIO) || closed == Err(Errno::EIO),
        "{err:?} {closed:?}"
    );
    assert_eq!(fs.flush(fh).await, Err(Errno::EIO), "the error sticks");
    let _ = fs.release(fh).await;
    assert_eq!(&store.get_bytes("f").unwrap()[..], b"precious");
    assert_eq!(store.open_uploads(), 0);
}

#[tokio::test]
async fn mkdir_rmdir_unlink_keep_directories_right() {
    let (store, fs) = setup("");
    let d = fs.mkdir(ROOT_INO, b"d", 0o750, ME).await.unwrap();
    assert_eq!(d.kind, Kind::Dir);
    let marker = store.head("d/").await.unwrap();
    assert_eq!(
        marker.metadata.get("mode").map(String::as_str),
        Some("16872")
    ); // 040750
    write_file(&fs, d.ino, "f", b"x").await;
    assert_eq!(fs.rmdir(ROOT_INO, b"d").await, Err(Errno::ENOTEMPTY));
    assert_eq!(fs.unlink(ROOT_INO, b"d").await, Err(Errno::EISDIR));
    fs.unlink(d.ino, b"f").await.unwrap();
    assert!(store.get_bytes("d/f").is_none());
    // The directory is still there after its last file went.
    store.remove("d/");
    write_file(&fs, d.ino, "g", b"y").await;
    fs.unlink(d.ino, b"g").await.unwrap();
    assert!(
        store.keys().contains(&"d/".to_string()),
        "marker written to keep the directory: {:?}",
        store.keys()
    );
    fs.rmdir(ROOT_INO, b"d").await.unwrap();
    assert!(store.keys().is_empty(), "{:?}", store.keys());
    assert_eq!(fs.lookup(ROOT_INO, b"d").await, Err(Errno::ENOENT));
}

#[tokio::test]
async fn chmod_and_touch_rewrite_metadata_without_data() {
    let (store, fs) = setup("");
    write_file(&fs, ROOT_INO, "f", &[5u8; 4096]).await;
    let a = fs.lookup(ROOT_INO, b"f").await.unwrap();
    store.reset_counters();
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_500_000_000);
    let attr = fs
        .setattr(
            a.ino,
            None,
            SetAttr {
                mode: Some(0o600),
                mtime: Some(t),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((attr.perm, attr.mtime), (0o600, t));
    let meta = store.head("f").await.unwrap();
    assert_eq!(meta.metadata.get("mode").map(String::as_str), Some("33152"));
    assert_eq!(
        meta.metadata.get("mtime").map(String::as_str),
        Some("1500000000")
    );
    assert_eq!(store.counters.bytes_uploaded.load(Ordering::Relaxed), 0);
    assert_eq!(store.get_bytes("f").unwrap().len(), 4096);
}

#[tokio::test]
async fn read_only_mount_refuses_every_write() {
    let store = Arc::new(MockStore::new());
    let mut cfg = test_config("");
    cfg.read_only = true;
    let fs = Fs::new(store.clone(), cfg);
    store.insert("f", "x");
    assert_eq!(
        fs.create(ROOT_INO, b"n", 0o644, 0, ME).await.err(),
        Some(Errno::EROFS)
    );
    assert_eq!(
        fs.mkdir(ROOT_INO, b"d", 0o755, ME).await.err(),
        Some(Errno::EROFS)
    );
    assert_eq!(fs.unlink(ROOT_INO, b"f").await, Err(Errno::EROFS));
    let a = fs.lookup(ROOT_INO, b"f").await.unwrap();
    assert_eq!(
        fs.setattr(
            a.ino,
            None,
            SetAttr {
                size: Some(0),
                ..Default::default()
            }
        )
        .await
        .err(),
        Some(Errno::EROFS)
    );
    assert_eq!(store.keys(), vec!["f"]);
}

#[tokio::test]
async fn rename_file_keeps_metadata_and_replaces_target() {
    let (store, fs) = setup("");
    write_file(&fs, ROOT_INO, "a", b"alpha").await;
    write_file(&fs, ROOT_INO, "b", b"beta").await;
    let a = fs.lookup(ROOT_INO, b"a").await.unwrap();
    fs.setattr(
        a.ino,
        None,
        SetAttr {
            mode: Some(0o640),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0).await.unwrap();
    assert_eq!(store.keys(), vec!["b"]);
    assert_eq!(&store.get_bytes("b").unwrap()[..], b"alpha");
    assert_eq!(
        store
            .head("b")
            .await
            .unwrap()
            .metadata
            .get("mode")
            .map(String::as_str),
        Some("33184")
    );
    // Same inode, new name, readable.
    let b = fs.lookup(ROOT_INO, b"b").await.unwrap();
    assert_eq!(b.ino, a.ino);
    assert_eq!(read_all(&fs, b.ino).await, b"alpha");
    assert_eq!(fs.lookup(ROOT_INO, b"a").await, Err(Errno::ENOENT));
    write_file(&fs, ROOT_INO, "c", b"c").await;
    assert_eq!(
        fs.rename(ROOT_INO, b"c", ROOT_INO, b"b", 1).await,
        Err(Errno::EEXIST)
    );
}

#[tokio::test]
async fn rename_directory_moves_every_key() {
    let (store, fs) = setup("");
    for i in 0..50 {
        store.insert(&format!("src/f{i}"), format!("{i}"));
    }
    store.insert("src/sub/deep", "d");
    store.insert("src/", "");
    let src = fs.lookup(ROOT_INO, b"src").await.unwrap();
    let deep_dir = fs.lookup(src.ino, b"sub").await.unwrap();
    fs.rename(ROOT_INO, b"src", ROOT_INO, b"dst", 0)
        .await
        .unwrap();
    let keys = store.keys();
    assert_eq!(keys.len(), 52, "{keys:?}");
    assert!(keys.iter().all(|k| k.starts_with("dst/")), "{keys:?}");
    assert_eq!(&store.get_bytes("dst/f7").unwrap()[..], b"7");
    // Inodes below follow the move.
    let deep = fs.lookup(deep_dir.ino, b"deep").await.unwrap();
    assert_eq!(read_all(&fs, deep.ino).await, b"d");
    // Into itself, and over a non-empty directory, are refused.
    let dst = fs.lookup(ROOT_INO, b"dst").await.unwrap();
    assert_eq!(
        fs.rename(ROOT_INO, b"dst", dst.ino, b"inner", 0).await,
        Err(Errno::EINVAL)
    );
    store.insert("other/x", "x");
    assert_eq!(
        fs.rename(ROOT_INO, b"dst", ROOT_INO, b"other", 0).await,
        Err(Errno::ENOTEMPTY)
    );
}

#[tokio::test]
async fn rename_open_file_being_written() {
    let (store, fs) = setup("");
    let (_attr, fh) = fs
        .create(ROOT_INO, b"tmp.part", 0o644, libc::O_WRONLY, ME)
        .await
        .unwrap();
    fs.write(fh, 0, b"first ").await.unwrap();
    fs.rename(ROOT_INO, b"tmp.part", ROOT_INO, b"final", 0)
        .await
        .unwrap();
    fs.write(fh, 6, b"second").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(store.keys(), vec!["final"]);
    assert_eq!(&store.get_bytes("final").unwrap()[..], b"first second");
}

#[tokio::test]
async fn rename_failure_part_way_loses_nothing() {
    let (store, fs) = setup("");
    for i in 0..20 {
        store.insert(&format!("d/f{i:02}"), format!("{i}"));
    }
    store.inject_fault(
        Op::Delete,
        "d/f13",
        StoreError::Other("HTTP 500".into()),
        100,
    );
    fs.lookup(ROOT_INO, b"d").await.unwrap();
    assert_eq!(
        fs.rename(ROOT_INO, b"d", ROOT_INO, b"e", 0).await,
        Err(Errno::EIO)
    );
    for i in 0..20 {
        let old = store.get_bytes(&format!("d/f{i:02}"));
        let new = store.get_bytes(&format!("e/f{i:02}"));
        assert!(old.is_some() || new.is_some(), "f{i:02} lost");
    }
}

#[tokio::test]
async fn pwrite_in_the_middle_uploads_one_part() {
    let (store, fs) = setup("");
    let body: Vec<u8> = (0..(20u32 << 20)).map(|i| (i % 241) as u8).collect();
    store.insert("obj", body.clone());
    let a = fs.lookup(ROOT_INO, b"obj").await.unwrap();
    let (fh, _) = fs.open(a.ino, libc::O_RDWR).await.unwrap();
    store.reset_counters();
    fs.write(fh, 10 << 20, b"PATCHED").await.unwrap();
    // Read back through the same descriptor before close.
    assert_eq!(
        &fs.read(fh, (10 << 20) - 2, 11).await.unwrap()[..],
        &[
            body[(10 << 20) - 2],
            body[(10 << 20) - 1],
            b'P',
            b'A',
            b'T',
            b'C',
            b'H',
            b'E',
            b'D',
            body[(10 << 20) + 7],
            body[(10 << 20) + 8]
        ]
    );
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    let mut want = body.clone();
    want[10 << 20..(10 << 20) + 7].copy_from_slice(b"PATCHED");
    assert!(store.get_bytes("obj").unwrap() == want);
    let up = store.counters.bytes_uploaded.load(Ordering::Relaxed);
    assert_eq!(
        up,
        8 << 20,
        "one part re-uploaded, the rest copied server side"
    );
}

#[tokio::test]
async fn rdwr_new_file_reads_back_what_it_wrote() {
    let (store, fs) = setup("");
    let (_a, fh) = fs
        .create(ROOT_INO, b"db", 0o644, libc::O_RDWR, ME)
        .await
        .unwrap();
    fs.write(fh, 0, b"header--").await.unwrap();
    fs.write(fh, 8, b"payload").await.unwrap();
    assert_eq!(&fs.read(fh, 0, 100).await.unwrap()[..], b"header--payload");
    fs.write(fh, 0, b"HEADER").await.unwrap();
    assert_eq!(&fs.read(fh, 0, 100).await.unwrap()[..], b"HEADER--payload");
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(&store.get_bytes("db").unwrap()[..], b"HEADER--payload");
}

#[tokio::test]
async fn truncate_to_a_smaller_size_keeps_the_head() {
    let (store, fs) = setup("");
    store.insert("t", "0123456789");
    let a = fs.lookup(ROOT_INO, b"t").await.unwrap();
    let attr = fs
        .setattr(
            a.ino,
            None,
            SetAttr {
                size: Some(4),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(attr.size, 4);
    assert_eq!(&store.get_bytes("t").unwrap()[..], b"0123");
    let (fh, _) = fs.open(a.ino, libc::O_WRONLY).await.unwrap();
    fs.setattr(
        a.ino,
        Some(fh),
        SetAttr {
            size: Some(2),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    fs.write(fh, 6, b"Z").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(&store.get_bytes("t").unwrap()[..], b"01\0\0\0\0Z");
}

#[tokio::test]
async fn failed_staged_upload_keeps_the_changes_on_disk() {
    let store = Arc::new(MockStore::new());
    let staging = tempfile::tempdir().unwrap();
    let mut cfg = test_config("");
    cfg.staging_dir = staging.path().to_path_buf();
    let fs = Fs::new(store.clone(), cfg);
    store.insert("keep", "original");
    let a = fs.lookup(ROOT_INO, b"keep").await.unwrap();
    let (fh, _) = fs.open(a.ino, libc::O_WRONLY).await.unwrap();
    fs.write(fh, 0, b"CHANGED!").await.unwrap();
    store.inject_fault(Op::Put, "keep", StoreError::Other("HTTP 500".into()), 100);
    assert_eq!(fs.flush(fh).await, Err(Errno::EIO));
    let _ = fs.release(fh).await;
    assert_eq!(&store.get_bytes("keep").unwrap()[..], b"original");
    let kept: Vec<_> = std::fs::read_dir(&fs.config().staging_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read(e.path())
                .map(|b| b.starts_with(b"CHANGED!"))
                .unwrap_or(false)
        })
        .collect();
    assert!(
        !kept.is_empty(),
        "changed bytes kept in the staging directory"
    );
}

#[tokio::test]
async fn symlinks_are_stored_like_s3fs_and_listed_with_list_metadata() {
    let (store, fs) = setup("");
    let a = fs
        .symlink(ROOT_INO, b"link", b"../target/file", ME)
        .await
        .unwrap();
    assert_eq!(a.kind, Kind::Symlink);
    assert_eq!(&store.get_bytes("link").unwrap()[..], b"../target/file");
    assert_eq!(
        store
            .head("link")
            .await
            .unwrap()
            .metadata
            .get("mode")
            .map(String::as_str),
        Some("41471")
    );
    assert_eq!(&fs.readlink(a.ino).await.unwrap()[..], b"../target/file");
    // A fresh mount with --list-metadata sees it as a symlink straight from the listing.
    let mut cfg = test_config("");
    cfg.list_metadata = true;
    let fs2 = Fs::new(store.clone(), cfg);
    let names = list_names(&fs2, ROOT_INO).await;
    assert!(names.contains(&("link".into(), Kind::Symlink)), "{names:?}");
    // Without it, a lookup by name (a HEAD) still finds the symlink.
    let fs3 = Fs::new(store.clone(), test_config(""));
    assert_eq!(
        fs3.lookup(ROOT_INO, b"link").await.unwrap().kind,
        Kind::Symlink
    );
}

#[tokio::test]
async fn concurrent_change_is_detected_and_both_sides_kept() {
    let store = Arc::new(MockStore::new());
    let staging = tempfile::tempdir().unwrap();
    let mut cfg = test_config("");
    cfg.staging_dir = staging.path().to_path_buf();
    let fs = Fs::new(store.clone(), cfg);
    // Replace (O_TRUNC) while someone else replaces the object.
    store.insert("shared", "original");
    let a = fs.lookup(ROOT_INO, b"shared").await.unwrap();
    let (fh, _) = fs
        .open(a.ino, libc::O_WRONLY | libc::O_TRUNC)
        .await
        .unwrap();
    fs.write(fh, 0, b"mine").await.unwrap();
    store.insert("shared", "theirs");
    assert_eq!(fs.flush(fh).await, Err(Errno::EIO));
    let _ = fs.release(fh).await;
    assert_eq!(
        &store.get_bytes("shared").unwrap()[..],
        b"theirs",
        "the other writer's object is untouched"
    );
    let recovered: Vec<Vec<u8>> = std::fs::read_dir(fs.recovery_dir())
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(
        recovered.iter().any(|b| b == b"mine"),
        "our bytes are in the recovery folder"
    );
    // Creating a file that someone else created meanwhile.
    let (_a, fh) = fs
        .create(ROOT_INO, b"new", 0o644, libc::O_WRONLY, ME)
        .await
        .unwrap();
    fs.write(fh, 0, b"first?").await.unwrap();
    store.insert("new", "no, me");
    assert_eq!(fs.flush(fh).await, Err(Errno::EIO));
    let _ = fs.release(fh).await;
    assert_eq!(&store.get_bytes("new").unwrap()[..], b"no, me");
    // In-place modification against a changed object: changes kept, object untouched.
    store.insert("doc", "0123456789");
    let d = fs.lookup(ROOT_INO, b"doc").await.unwrap();
    let (fh, _) = fs.open(d.ino, libc::O_WRONLY).await.unwrap();
    fs.write(fh, 2, b"XY").await.unwrap();
    store.insert("doc", "changed elsewhere");
    assert_eq!(fs.flush(fh).await, Err(Errno::EIO));
    let _ = fs.release(fh).await;
    assert_eq!(&store.get_bytes("doc").unwrap()[..], b"changed elsewhere");
    // Our own successive commits never conflict with themselves.
    let (_b, fh) = fs
        .create(ROOT_INO, b"mine", 0o644, libc::O_WRONLY, ME)
        .await
        .unwrap();
    fs.write(fh, 0, b"a").await.unwrap();
    fs.fsync(fh).await.unwrap();
    fs.write(fh, 1, b"b").await.unwrap();
    fs.write(fh, 0, b"A").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(&store.get_bytes("mine").unwrap()[..], b"Ab");
}

#[tokio::test]
async fn hung_store_gives_etimedout_within_the_bound() {
    let store = Arc::new(MockStore::new());
    store.insert("f", "x");
    let mut cfg = test_config("");
    cfg.op_timeout = std::time::Duration::from_millis(300);
    let fs = Fs::new(store.clone(), cfg);
    store.set_latency(Some(std::time::Duration::from_secs(30)));
    let t = std::time::Instant::now();
    assert_eq!(fs.lookup(ROOT_INO, b"f").await, Err(Errno::ETIMEDOUT));
    assert_eq!(fs.opendir(ROOT_INO).await.err(), Some(Errno::ETIMEDOUT));
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
    store.set_latency(None);
    let a = fs.lookup(ROOT_INO, b"f").await.unwrap();
    let (fh, _) = fs.open(a.ino, libc::O_RDONLY).await.unwrap();
    store.set_latency(Some(std::time::Duration::from_secs(30)));
    assert_eq!(fs.read(fh, 0, 1).await, Err(Errno::ETIMEDOUT));
}

#[tokio::test]
async fn subdirectory_listings_are_fetched_ahead_and_shared() {
    let (store, fs) = setup("");
    for d in 0..5 {
        for f in 0..3 {
            store.insert(&format!("top/d{d}/f{f}"), "x");
        }
    }
    let top = fs.lookup(ROOT_INO, b"top").await.unwrap();
    list_names(&fs, top.ino).await;
    // A plain `ls` of a directory lists nothing more.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let after_ls = store.counters.list.load(Ordering::Relaxed);
    list_names(&fs, top.ino).await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(store.counters.list.load(Ordering::Relaxed), after_ls);
    // Descending into one subdirectory starts listing the rest ahead.
    let d0 = fs.lookup(top.ino, b"d0").await.unwrap();
    list_names(&fs, d0.ino).await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let before = store.counters.list.load(Ordering::Relaxed);
    for d in 0..5 {
        let sub = fs
            .lookup(top.ino, format!("d{d}").as_bytes())
            .await
            .unwrap();
        assert_eq!(list_names(&fs, sub.ino).await.len(), 2 + 3);
    }
    assert_eq!(
        store.counters.list.load(Ordering::Relaxed),
        before,
        "a `find` step listed a directory already fetched ahead"
    );
}

/// Every directory of `fs` below `ino`, by path, with its entries (names and kinds).
async fn tree_of(fs: &Fs, ino: u64, path: &str, out: &mut Vec<(String, Vec<(String, Kind)>)>) {
    // Sorted: a directory listed while its pages arrive comes in key order, not name order.
    let mut names = list_names(fs, ino).await;
    names.sort_by(|a, b| a.0.cmp(&b.0));
    out.push((path.to_string(), names.clone()));
    for (name, kind) in names {
        if kind == Kind::Dir && name != "." && name != ".." {
            let sub = fs.lookup(ino, name.as_bytes()).await.unwrap();
            Box::pin(tree_of(fs, sub.ino, &format!("{path}{name}/"), out)).await;
        }
    }
}

#[tokio::test]
async fn listings_walked_ahead_match_listings_asked_for() {
    walked_tree_matches(7, true).await;
    // Pages too small for the walk to finish: what it cached is still exactly right.
    walked_tree_matches(2, false).await;
}

async fn walked_tree_matches(page_size: usize, all_ahead: bool) {
    let store = Arc::new(MockStore::new());
    store.set_page_size(page_size);
    for key in [
        "t/a/1",
        "t/a/2",
        "t/a/b/c/deep",
        "t/a/b/x",
        "t/a.txt",
        "t/a-b/f",
        "t/x",
        "t/x/inside",
        "t/marker/",
        "t/old_$folder$",
        "t/old/f",
        "t/m/",
        "t/m/n/",
        "t/z/last",
        "t/zz",
        // Between `t/x` and `t/x/`: before a walk's bound, so the walk before it covers them.
        "t/x-y/f",
        "t/x.z",
    ] {
        store.insert(key, "v");
    }
    for i in 0..30 {
        store.insert(&format!("t/many/f{i:02}"), "v");
    }
    let ahead = Fs::new(store.clone(), test_config(""));
    let top = ahead.lookup(ROOT_INO, b"t").await.unwrap();
    list_names(&ahead, top.ino).await;
    // The first step down starts the walk of the rest.
    let a = ahead.lookup(top.ino, b"a").await.unwrap();
    list_names(&ahead, a.ino).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let lists_before = store.counters.list.load(Ordering::Relaxed);
    let mut walked = Vec::new();
    tree_of(&ahead, top.ino, "t/", &mut walked).await;
    if all_ahead {
        assert_eq!(
            store.counters.list.load(Ordering::Relaxed),
            lists_before,
            "every listing of the tree was cached ahead"
        );
    }

    let mut cfg = test_config("");
    cfg.metadata_ttl = std::time::Duration::ZERO;
    let direct = Fs::new(store.clone(), cfg);
    let top = direct.lookup(ROOT_INO, b"t").await.unwrap();
    let mut asked = Vec::new();
    tree_of(&direct, top.ino, "t/", &mut asked).await;
    assert_eq!(walked, asked);
}

#[tokio::test]
async fn the_walk_ahead_runs_in_parallel_key_ranges() {
    let store = Arc::new(MockStore::new());
    for d in 0..8 {
        for f in 0..3 {
            store.insert(&format!("t/d{d}/f{f}"), "v");
        }
    }
    let fs = Fs::new(store.clone(), test_config(""));
    let top = fs.lookup(ROOT_INO, b"t").await.unwrap();
    list_names(&fs, top.ino).await;
    let d0 = fs.lookup(top.ino, b"d0").await.unwrap();
    list_names(&fs, d0.ino).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // The lookup of `t` (a one-key LIST beside its HEAD), `t/`, `t/d0/`, then one page for
    // each of the four walks, and nothing per directory.
    assert_eq!(store.counters.list.load(Ordering::Relaxed), 3 + 4);
    for d in 1..8 {
        let sub = fs
            .lookup(top.ino, format!("d{d}").as_bytes())
            .await
            .unwrap();
        assert_eq!(list_names(&fs, sub.ino).await.len(), 3 + 2, "d{d}");
    }
    assert_eq!(store.counters.list.load(Ordering::Relaxed), 3 + 4);
}

/// A reader that runs ahead of the walk (as `find` does) waits for the walk to reach the
/// directory instead of listing its keys a second time.
#[tokio::test]
async fn a_reader_ahead_of_the_walk_waits_for_it() {
    let store = Arc::new(MockStore::new());
    for d in 0..8 {
        for f in 0..30 {
            store.insert(&format!("t/d{d}/f{f:02}"), "v");
        }
    }
    store.set_page_size(20);
    let fs = Fs::new(store.clone(), test_config(""));
    let top = fs.lookup(ROOT_INO, b"t").await.unwrap();
    list_names(&fs, top.ino).await;
    let d0 = fs.lookup(top.ino, b"d0").await.unwrap();
    store.set_latency(Some(std::time::Duration::from_millis(20)));
    let before = store.counters.list.load(Ordering::Relaxed);
    // Listing d0 starts the walks: four ranges of two directories (60 keys) each.
    assert_eq!(list_names(&fs, d0.ino).await.len(), 30 + 2);
    // d1 is the second directory of the first range: the walk finishes it on its fourth page.
    let d1 = fs.lookup(top.ino, b"d1").await.unwrap();
    assert_eq!(list_names(&fs, d1.ino).await.len(), 30 + 2);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    store.set_latency(None);
    for d in 0..8 {
        let sub = fs
            .lookup(top.ino, format!("d{d}").as_bytes())
            .await
            .unwrap();
        assert_eq!(list_names(&fs, sub.ino).await.len(), 30 + 2, "d{d}");
    }
    // d0 itself (two pages), then the walks' pages (a range learns that its last directory
    // is complete from the page after it: four pages, three for the last range); nothing for
    // d1 or any other directory (listing d1 itself would be two more).
    assert_eq!(
        store.counters.list.load(Ordering::Relaxed) - before,
        2 + 3 * 4 + 3
    );
}

/// All of a directory through readdir, `limit` entries per call (like the kernel's slices).
async fn readdir_all(fs: &Fs, fh: u64, limit: usize) -> FsResult<Vec<(String, Kind)>> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let items = fs.readdir(fh, offset, limit, true).await?;
        let Some(last) = items.last() else {
            return Ok(out);
        };
        offset = last.next_offset;
        out.extend(items.into_iter().map(|i| (i.name, i.kind)));
    }
}

#[tokio::test]
async fn a_directory_streamed_page_by_page_lists_exactly_its_entries() {
    let store = Arc::new(MockStore::new());
    store.set_page_size(3);
    let keys = [
        "d/a",
        "d/a!x",
        "d/a-b/f",
        "d/a.txt",
        "d/a/inner",
        "d/a_$folder$",
        "d/b",
        "d/b/",
        "d/c_$folder$",
        "d/with space",
        "d/x",
        "d/x/y",
        "d/y/",
        "d/y/z",
        "d/z",
    ];
    for k in keys {
        store.insert(k, "v");
    }
    for i in 0..20 {
        store.insert(&format!("d/f{i:02}"), "v");
    }
    let fs = Fs::new(store.clone(), test_config(""));
    let d = fs.lookup(ROOT_INO, b"d").await.unwrap();
    let fh = fs.opendir(d.ino).await.unwrap();
    let mut streamed = readdir_all(&fs, fh, 4).await.unwrap();
    fs.releasedir(fh);
    let n = streamed.len();
    streamed.sort_by(|a, b| a.0.cmp(&b.0));
    streamed.dedup_by(|a, b| a.0 == b.0);
    assert_eq!(streamed.len(), n, "no entry twice");
    let mut want: Vec<(String, Kind)> = [
        (".", Kind::Dir),
        ("..", Kind::Dir),
        ("a", Kind::Dir),
        ("a!x", Kind::File),
        ("a-b", Kind::Dir),
        ("a.txt", Kind::File),
        ("b", Kind::Dir),
        ("c", Kind::Dir),
        ("with space", Kind::File),
        ("x", Kind::Dir),
        ("y", Kind::Dir),
        ("z", Kind::File),
    ]
    .into_iter()
    .map(|(n, k)| (n.to_string(), k))
    .chain((0..20).map(|i| (format!("f{i:02}"), Kind::File)))
    .collect();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(streamed, want);
    // The listing was cached at the end: the same entries, without a request.
    let lists = store.counters.list.load(Ordering::Relaxed);
    let mut cached = list_names(&fs, d.ino).await;
    cached.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(cached, want);
    assert_eq!(store.counters.list.load(Ordering::Relaxed), lists);
}

#[tokio::test]
async fn readdir_hands_out_entries_before_the_last_page_arrives() {
    let store = Arc::new(MockStore::new());
    store.set_page_size(10);
    for i in 0..100 {
        store.insert(&format!("big/f{i:03}"), "v");
    }
    store.set_latency(Some(std::time::Duration::from_millis(20)));
    let fs = Fs::new(store.clone(), test_config(""));
    let d = fs.lookup(ROOT_INO, b"big").await.unwrap();
    let before = store.counters.list.load(Ordering::Relaxed);
    let fh = fs.opendir(d.ino).await.unwrap();
    let first = fs.readdir(fh, 0, 12, true).await.unwrap();
    assert_eq!(first.len(), 12);
    let pages = store.counters.list.load(Ordering::Relaxed) - before;
    assert!(pages < 10, "12 entries came after {pages} of 10 pages");
    // Without waiting: what has come so far, at once.
    let now = fs.readdir(fh, 0, 1000, false).await.unwrap();
    assert!((12..102).contains(&now.len()), "{}", now.len());
    let rest = readdir_all(&fs, fh, 64).await.unwrap();
    assert_eq!(rest.len(), 102, "all 100 files and . and ..");
    fs.releasedir(fh);
}

#[tokio::test]
async fn a_listing_that_fails_half_way_gives_what_came_then_the_error() {
    let store = Arc::new(MockStore::new());
    store.set_page_size(10);
    for i in 0..50 {
        store.insert(&format!("big/f{i:03}"), "v");
    }
    let fs = Fs::new(store.clone(), test_config(""));
    let d = fs.lookup(ROOT_INO, b"big").await.unwrap();
    // The first page fails: opendir fails.
    store.inject_fault(Op::List, "big/", StoreError::Other("HTTP 500".into()), 1);
    assert_eq!(fs.opendir(d.ino).await, Err(Errno::EIO));
    // A later page fails: the entries before it, then EIO.
    store.set_latency(Some(std::time::Duration::from_millis(20)));
    let fh = fs.opendir(d.ino).await.unwrap();
    store.inject_fault(Op::List, "big/", StoreError::Other("HTTP 500".into()), 1);
    let mut offset = 0;
    let mut seen = 0;
    let err = loop {
        match fs.readdir(fh, offset, 8, true).await {
            Ok(items) if items.is_empty() => panic!("the listing cannot have ended"),
            Ok(items) => {
                seen += items.len();
                offset = items.last().unwrap().next_offset;
            }
            Err(e) => break e,
        }
    };
    assert_eq!(err, Errno::EIO);
    assert!(seen < 52, "{seen} entries before the error");
    fs.releasedir(fh);
    // Nothing half-listed was cached: the next listing is complete.
    store.set_latency(None);
    assert_eq!(list_names(&fs, d.ino).await.len(), 52);
}

#[tokio::test]
async fn a_listing_older_than_a_local_write_does_not_shrink_the_file() {
    let (store, fs) = setup("");
    store.set_page_size(2);
    for k in ["d/a", "d/b", "d/c"] {
        store.insert(k, "v");
    }
    let d = fs.lookup(ROOT_INO, b"d").await.unwrap();
    let (attr, fh) = fs
        .create(d.ino, b"new", 0o644, libc::O_WRONLY, ME)
        .await
        .unwrap();
    fs.write(fh, 0, b"abc").await.unwrap();
    // Opened while `new` has 3 bytes; it is finished (10 bytes) before the entries are read.
    let dh = fs.opendir(d.ino).await.unwrap();
    fs.write(fh, 3, b"defghij").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    let items = fs.readdir(dh, 0, usize::MAX, true).await.unwrap();
    fs.releasedir(dh);
    let item = items.iter().find(|i| i.name == "new").expect("listed");
    assert_eq!(fs.lookup_listed(d.ino, item).unwrap().0.size, 10);
    assert_eq!(fs.getattr(attr.ino).await.unwrap().size, 10);
    assert_eq!(read_all(&fs, attr.ino).await, b"abcdefghij");
}

/// A lookup answered from a cached listing does not undo what this mount learnt since the
/// listing was taken: the soak once read 0 bytes of a 64 KiB file whose lookup, between the
/// file's commit and the listing's update, took the entry noted at create (size 0).
#[tokio::test]
async fn a_lookup_from_an_older_listing_keeps_a_newer_commit() {
    let (_store, fs) = setup("");
    let d = fs.mkdir(ROOT_INO, b"d", 0o755, ME).await.unwrap();
    list_names(&fs, d.ino).await;
    let (attr, fh) = fs
        .create(d.ino, b"f", 0o644, libc::O_WRONLY, ME)
        .await
        .unwrap();
    // The listing as it was while `f` was being written: the entry noted at create.
    let stale = fs
        .listings
        .lock()
        .peek("d/")
        .cloned()
        .expect("listing cached");
    assert_eq!(
        stale
            .1
            .entries
            .get("f")
            .and_then(|e| e.meta.as_ref())
            .map(|m| m.size),
        Some(0)
    );
    fs.write(fh, 0, &[7u8; 65536]).await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    fs.listings.lock().put("d/".to_string(), stale);
    let found = fs.lookup(d.ino, b"f").await.unwrap();
    assert_eq!((found.ino, found.size), (attr.ino, 65536));
    assert_eq!(fs.getattr(attr.ino).await.unwrap().size, 65536);
    assert_eq!(read_all(&fs, attr.ino).await, vec![7u8; 65536]);
}

#[test]
fn parent_prefixes() {
    assert_eq!(parent_prefix("a/b/"), Some("a/"));
    assert_eq!(parent_prefix("a/"), Some(""));
    assert_eq!(parent_prefix(""), None);
}

async fn xattr_header(store: &MockStore, key: &str) -> Option<String> {
    let meta = store.head(key).await.ok()?;
    meta.metadata.get("xattr").cloned()
}

#[tokio::test]
async fn extended_attributes_are_stored_like_s3fs_and_read_back_without_requests() {
    let (store, fs) = setup("");
    write_file(&fs, ROOT_INO, "f", b"data").await;
    let a = fs.lookup(ROOT_INO, b"f").await.unwrap();
    store.reset_counters();
    fs.set_or_remove_xattr(a.ino, b"user.a", Some(b"a"), 0)
        .await
        .unwrap();
    assert_eq!(
        xattr_header(&store, "f").await.as_deref(),
        Some("%7B%22user.a%22%3A%22YQ%3D%3D%22%7D")
    );
    assert_eq!(store.counters.bytes_uploaded.load(Ordering::Relaxed), 0);
    assert_eq!(store.get_bytes("f").unwrap().as_ref(), b"data");
    let meta = store.head("f").await.unwrap();
    assert_eq!(meta.metadata.get("mode").map(String::as_str), Some("33188"));
    fs.set_or_remove_xattr(a.ino, b"trusted.bin", Some(&[0, 255, b'"', b',']), 0)
        .await
        .unwrap();
    store.reset_counters();
    assert_eq!(fs.getxattr(a.ino, b"user.a").await.unwrap(), b"a");
    assert_eq!(
        fs.getxattr(a.ino, b"trusted.bin").await.unwrap(),
        [0, 255, b'"', b',']
    );
    assert_eq!(
        fs.listxattr(a.ino).await.unwrap(),
        b"trusted.bin\0user.a\0".to_vec()
    );
    assert_eq!(fs.getxattr(a.ino, b"user.none").await, Err(Errno::ENODATA));
    // What the kernel asks before every write, and ls -l per entry: no request.
    assert_eq!(
        fs.getxattr(a.ino, b"security.capability").await,
        Err(Errno::ENODATA)
    );
    assert_eq!(
        fs.getxattr(a.ino, b"system.posix_acl_access").await,
        Err(Errno::ENODATA)
    );
    assert_eq!(
        store.counters.total(),
        0,
        "answered from what the copy stored"
    );

    // Another mount (no cache) sees them; create/replace flags; removal.
    let fs2 = Fs::new(store.clone(), test_config(""));
    let b = fs2.lookup(ROOT_INO, b"f").await.unwrap();
    assert_eq!(fs2.getxattr(b.ino, b"user.a").await.unwrap(), b"a");
    assert_eq!(
        fs2.set_or_remove_xattr(b.ino, b"user.a", Some(b"x"), libc::XATTR_CREATE)
            .await,
        Err(Errno::EEXIST)
    );
    assert_eq!(
        fs2.set_or_remove_xattr(b.ino, b"user.new", Some(b"x"), libc::XATTR_REPLACE)
            .await,
        Err(Errno::ENODATA)
    );
    fs2.set_or_remove_xattr(b.ino, b"user.a", Some(b"b"), libc::XATTR_REPLACE)
        .await
        .unwrap();
    assert_eq!(
        fs2.set_or_remove_xattr(b.ino, b"security.selinux", Some(b"x"), 0)
            .await,
        Err(Errno::ENOTSUP)
    );
    assert_eq!(
        fs2.set_or_remove_xattr(b.ino, b"user.a:b", Some(b"x"), 0)
            .await,
        Err(Errno::EINVAL)
    );
    fs2.set_or_remove_xattr(b.ino, b"user.a", None, 0)
        .await
        .unwrap();
    assert_eq!(
        fs2.set_or_remove_xattr(b.ino, b"user.a", None, 0).await,
        Err(Errno::ENODATA)
    );
    fs2.set_or_remove_xattr(b.ino, b"trusted.bin", None, 0)
        .await
        .unwrap();
    assert_eq!(
        xattr_header(&store, "f").await,
        None,
        "the last one drops the header"
    );
    assert!(fs2.listxattr(b.ino).await.unwrap().is_empty());
    assert_eq!(store.get_bytes("f").unwrap().as_ref(), b"data");
}

#[tokio::test]
async fn extended_attributes_follow_the_file_being_written_and_the_directory() {
    let (store, fs) = setup("p/");
    let (attr, fh) = fs
        .create(ROOT_INO, b"new", 0o644, libc::O_WRONLY, ME)
        .await
        .unwrap();
    fs.write(fh, 0, b"hello").await.unwrap();
    store.reset_counters();
    fs.set_or_remove_xattr(attr.ino, b"user.k", Some(b"v"), 0)
        .await
        .unwrap();
    assert_eq!(store.counters.total(), 0, "kept for the commit");
    assert_eq!(fs.getxattr(attr.ino, b"user.k").await.unwrap(), b"v");
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(store.counters.put.load(Ordering::Relaxed), 1, "one PUT");
    let h = xattr_header(&store, "p/new")
        .await
        .expect("stored with the object");
    assert_eq!(super::xattr::decode(&h).unwrap()["user.k"], b"v");

    // An implicit directory gets a marker holding them; a prefix mount's root is p/.
    store.insert("p/d/inner", "x");
    let d = fs.lookup(ROOT_INO, b"d").await.unwrap();
    fs.set_or_remove_xattr(d.ino, b"user.dir", Some(b"1"), 0)
        .await
        .unwrap();
    assert!(xattr_header(&store, "p/d/").await.is_some());
    let marker = store.head("p/d/").await.unwrap();
    assert_eq!(
        marker.content_type.as_deref(),
        Some("application/x-directory")
    );
    assert_eq!(
        marker.metadata.get("mode").map(String::as_str),
        Some("16877")
    );
    assert_eq!(fs.getxattr(d.ino, b"user.dir").await.unwrap(), b"1");
    fs.set_or_remove_xattr(ROOT_INO, b"user.root", Some(b"r"), 0)
        .await
        .unwrap();
    assert!(xattr_header(&store, "p/").await.is_some());
    let fs2 = Fs::new(store.clone(), test_config("p/"));
    assert_eq!(fs2.getxattr(ROOT_INO, b"user.root").await.unwrap(), b"r");
    let d2 = fs2.lookup(ROOT_INO, b"d").await.unwrap();
    assert_eq!(fs2.listxattr(d2.ino).await.unwrap(), b"user.dir\0".to_vec());

    // The root of a whole bucket has no key to hold them.
    let (_, whole) = setup("");
    assert_eq!(
        whole
            .set_or_remove_xattr(ROOT_INO, b"user.x", Some(b"1"), 0)
            .await,
        Err(Errno::ENOTSUP)
    );
    assert!(whole.listxattr(ROOT_INO).await.unwrap().is_empty());
}

#[tokio::test]
async fn extended_attributes_that_do_not_fit_or_cannot_be_read_lose_nothing() {
    let (store, fs) = setup("");
    // Written by s3fs (lower-case escapes) next to a header this code cannot parse.
    let mut md = UserMetadata::new();
    md.insert(
        "xattr".into(),
        "%7b%22user.s3fs%22%3a%22b2s%3d%22%7d".into(),
    );
    store.insert_with("s3fs", "1", md, None);
    let mut md = UserMetadata::new();
    md.insert("xattr".into(), "not json".into());
    store.insert_with("odd", "2", md, None);
    let s = fs.lookup(ROOT_INO, b"s3fs").await.unwrap();
    assert_eq!(fs.getxattr(s.ino, b"user.s3fs").await.unwrap(), b"ok");
    let o = fs.lookup(ROOT_INO, b"odd").await.unwrap();
    assert!(fs.listxattr(o.ino).await.unwrap().is_empty());
    assert_eq!(
        fs.set_or_remove_xattr(o.ino, b"user.x", Some(b"1"), 0)
            .await,
        Err(Errno::EIO)
    );
    assert_eq!(
        xattr_header(&store, "odd").await.as_deref(),
        Some("not json")
    );

    // S3 keeps 2 KiB of user metadata per object.
    let before = xattr_header(&store, "s3fs").await;
    assert_eq!(
        fs.set_or_remove_xattr(s.ino, b"user.big", Some(&[7u8; 1600]), 0)
            .await,
        Err(Errno::ENOSPC)
    );
    assert_eq!(xattr_header(&store, "s3fs").await, before);
    fs.set_or_remove_xattr(s.ino, b"user.fits", Some(&[7u8; 600]), 0)
        .await
        .unwrap();
    assert_eq!(fs.getxattr(s.ino, b"user.fits").await.unwrap(), [7u8; 600]);

    // A read-only mount refuses changes but reads.
    let mut cfg = test_config("");
    cfg.read_only = true;
    let ro = Fs::new(store.clone(), cfg);
    let r = ro.lookup(ROOT_INO, b"s3fs").await.unwrap();
    assert_eq!(ro.getxattr(r.ino, b"user.s3fs").await.unwrap(), b"ok");
    assert_eq!(
        ro.set_or_remove_xattr(r.ino, b"user.x", Some(b"1"), 0)
            .await,
        Err(Errno::EROFS)
    );
}

#[tokio::test]
async fn set_id_bits_are_cleared_by_chown_unprivileged_truncate_and_writes() {
    assert_eq!(setattr::without_suid_sgid(0o106777), 0o100777);
    assert_eq!(
        setattr::without_suid_sgid(0o102766),
        0o102766,
        "no group execute"
    );
    let (store, fs) = setup("");
    let mut md = UserMetadata::new();
    md.insert("mode".into(), "36333".into()); // 0106755
    store.insert_with("f", "1234", md.clone(), None);
    store.insert_with("g", "1234", md, None);
    let f = fs.lookup(ROOT_INO, b"f").await.unwrap();
    assert_eq!(f.perm, 0o6755);
    // Truncate to the same size by root: nothing to do, no request.
    store.reset_counters();
    let same = SetAttr {
        size: Some(4),
        ..Default::default()
    };
    assert_eq!(fs.setattr(f.ino, None, same).await.unwrap().perm, 0o6755);
    assert_eq!(store.counters.total(), 0);
    // The same by an unprivileged caller clears the bits (a copy onto itself, no data).
    let a = fs
        .setattr(
            f.ino,
            None,
            SetAttr {
                kill_suid_sgid: true,
                ..same
            },
        )
        .await
        .unwrap();
    assert_eq!(a.perm, 0o755);
    assert_eq!(store.counters.bytes_uploaded.load(Ordering::Relaxed), 0);
    let meta = store.head("f").await.unwrap();
    assert_eq!(meta.metadata.get("mode").map(String::as_str), Some("33261"));
    // A write by an unprivileged process: cleared in the commit of the handle.
    let g = fs.lookup(ROOT_INO, b"g").await.unwrap();
    let (fh, _) = fs.open(g.ino, libc::O_WRONLY).await.unwrap();
    fs.write(fh, 4, b"5").await.unwrap();
    fs.kill_suid_sgid(g.ino, fh).await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    let meta = store.head("g").await.unwrap();
    assert_eq!(meta.metadata.get("mode").map(String::as_str), Some("33261"));
    assert_eq!(store.get_bytes("g").unwrap().as_ref(), b"12345");
}

/// A new empty file, open for writing (what `cp` creates before copying into it).
async fn new_file(fs: &Fs, name: &str) -> u64 {
    fs.create(ROOT_INO, name.as_bytes(), 0o644, libc::O_WRONLY, ME)
        .await
        .unwrap()
        .1
}

/// An existing object, open for reading.
async fn open_object(fs: &Fs, name: &str) -> u64 {
    let a = fs.lookup(ROOT_INO, name.as_bytes()).await.unwrap();
    fs.open(a.ino, libc::O_RDONLY).await.unwrap().0
}

/// copy_file_range from where the last call stopped, asking for more than there is, until
/// it returns 0: what coreutils' cp does. Returns the bytes copied.
async fn copy_like_cp(fs: &Fs, fh_in: u64, fh_out: u64) -> u64 {
    let mut done = 0u64;
    loop {
        let n = fs
            .copy_file_range(fh_in, done as i64, fh_out, done as i64, u64::MAX >> 1)
            .await
            .unwrap();
        if n == 0 {
            return done;
        }
        assert!(n as u64 <= write::COPY_CHUNK);
        done += n as u64;
    }
}

#[tokio::test]
async fn copy_file_range_copies_a_whole_object_server_side_into_an_empty_file() {
    let (store, fs) = setup("");
    let big: Vec<u8> = (0..(20 << 20)).map(|i| (i % 249) as u8).collect();
    let mut md = UserMetadata::new();
    md.insert("mode".into(), "33216".into()); // 0100700: the copy keeps its own mode
    store.insert_with("src", big.clone(), md, None);
    store.insert("small", "small object");
    let fh_in = open_object(&fs, "src").await;
    let (dst, fh_out) = fs
        .create(ROOT_INO, b"dst", 0o640, libc::O_WRONLY, ME)
        .await
        .unwrap();
    store.reset_counters();
    // What cp asks: everything from where it got to, more than there is, until 0. A reply
    // counts at most COPY_CHUNK bytes (4 GiB; 6 MiB in unit tests), so this takes 4 calls.
    assert_eq!(copy_like_cp(&fs, fh_in, fh_out).await, big.len() as u64);
    assert_eq!(fs.getattr(dst.ino).await.unwrap().size, big.len() as u64);
    assert_eq!(store.counters.total(), 0, "nothing sent before the commit");
    fs.flush(fh_out).await.unwrap();
    fs.release(fh_out).await.unwrap();
    assert!(store.get_bytes("dst").unwrap() == big);
    assert_eq!(store.counters.get.load(Ordering::Relaxed), 0);
    assert_eq!(store.counters.bytes_uploaded.load(Ordering::Relaxed), 0);
    assert_eq!(
        store.counters.bytes_copied.load(Ordering::Relaxed),
        big.len() as u64
    );
    assert_eq!(
        store.counters.multipart.load(Ordering::Relaxed),
        3,
        "create, UploadPartCopy, complete (If-None-Match checked at completion)"
    );
    let meta = store.head("dst").await.unwrap();
    assert_eq!(meta.metadata.get("mode").map(String::as_str), Some("33184")); // 0100640

    // Under 5 MiB: one ranged GET of the source and one PUT.
    let fh_small = open_object(&fs, "small").await;
    let fh2 = new_file(&fs, "dst2").await;
    store.reset_counters();
    assert_eq!(
        fs.copy_file_range(fh_small, 0, fh2, 0, 1 << 20).await,
        Ok(12)
    );
    fs.flush(fh2).await.unwrap();
    fs.release(fh2).await.unwrap();
    assert_eq!(store.get_bytes("dst2").unwrap().as_ref(), b"small object");
    assert_eq!(store.counters.get.load(Ordering::Relaxed), 1);
    assert_eq!(store.counters.put.load(Ordering::Relaxed), 1);
    fs.release(fh_in).await.unwrap();
    fs.release(fh_small).await.unwrap();

    // Without conditional writes a whole object is one CopyObject, small or not (on Garage
    // that copies no data); written to after the copy, a small one is re-read and PUT.
    let mut cfg = test_config("");
    cfg.conditional_writes = false;
    let fs = Fs::new(store.clone(), cfg);
    for (src, want) in [("src", &big[..]), ("small", &b"small object"[..])] {
        let a = fs.lookup(ROOT_INO, src.as_bytes()).await.unwrap();
        let (fh_in, _) = fs.open(a.ino, libc::O_RDONLY).await.unwrap();
        let dst = format!("{src}-copy");
        let (_, fh) = fs
            .create(ROOT_INO, dst.as_bytes(), 0o644, libc::O_WRONLY, ME)
            .await
            .unwrap();
        store.reset_counters();
        assert_eq!(copy_like_cp(&fs, fh_in, fh).await, want.len() as u64);
        fs.flush(fh).await.unwrap();
        fs.release(fh).await.unwrap();
        fs.release(fh_in).await.unwrap();
        assert!(store.get_bytes(&dst).unwrap() == want);
        assert_eq!(
            (
                store.counters.put.load(Ordering::Relaxed),
                store.counters.multipart.load(Ordering::Relaxed),
                store.counters.get.load(Ordering::Relaxed),
            ),
            (1, 0, 0),
            "{src}: one CopyObject"
        );
    }
    let fh_small = open_object(&fs, "small").await;
    let fh2 = new_file(&fs, "dst2b").await;
    store.reset_counters();
    assert_eq!(
        fs.copy_file_range(fh_small, 0, fh2, 0, 1 << 20).await,
        Ok(12)
    );
    fs.write(fh2, 12, b", appended").await.unwrap();
    fs.flush(fh2).await.unwrap();
    fs.release(fh2).await.unwrap();
    assert_eq!(
        store.get_bytes("dst2b").unwrap().as_ref(),
        b"small object, appended"
    );
    assert_eq!(store.counters.get.load(Ordering::Relaxed), 1);
    assert_eq!(store.counters.put.load(Ordering::Relaxed), 1);
    let fh_in = open_object(&fs, "src").await;

    // Anything but a whole object into an empty file: EOPNOTSUPP, and the file is untouched.
    let fh3 = new_file(&fs, "dst3").await;
    for (off_in, off_out, len) in [(1, 0, 1 << 30), (0, 1, 1 << 30), (0, 0, 1000)] {
        assert_eq!(
            fs.copy_file_range(fh_in, off_in, fh3, off_out, len).await,
            Err(Errno::ENOTSUP),
            "{off_in} {off_out} {len}"
        );
    }
    fs.write(fh3, 0, b"x").await.unwrap();
    assert_eq!(
        fs.copy_file_range(fh_in, 0, fh3, 0, 1 << 30).await,
        Err(Errno::ENOTSUP),
        "not empty"
    );
    fs.flush(fh3).await.unwrap();
    fs.release(fh3).await.unwrap();
    assert_eq!(store.get_bytes("dst3").unwrap().as_ref(), b"x");
    fs.release(fh_in).await.unwrap();
    fs.release(fh_small).await.unwrap();
    assert_eq!(store.open_uploads(), 0);
}

#[tokio::test]
async fn copy_file_range_of_a_source_changed_meanwhile_fails_and_loses_nothing() {
    let (store, fs) = setup("");
    let big: Vec<u8> = (0..(8 << 20)).map(|i| (i % 247) as u8).collect();
    store.insert("src", big.clone());
    let fh_in = open_object(&fs, "src").await;
    let fh_out = new_file(&fs, "dst").await;
    fs.copy_file_range(fh_in, 0, fh_out, 0, 1 << 30)
        .await
        .unwrap();
    // Replaced behind the mount's back before the copy is committed: the copy is pinned to
    // the ETag that was read, so the commit fails instead of mixing two versions.
    store.insert("src", vec![1u8; 8 << 20]);
    assert_eq!(fs.flush(fh_out).await, Err(Errno::EIO));
    let _ = fs.release(fh_out).await;
    assert!(store.get_bytes("dst").is_none());
    assert_eq!(
        store.get_bytes("src").unwrap().as_ref(),
        &[1u8; 8 << 20][..]
    );
    assert_eq!(store.open_uploads(), 0);
    fs.release(fh_in).await.unwrap();

    // The target created by another client meanwhile: the copy is conditional like any
    // commit (If-None-Match), so theirs stays.
    let fh_in = open_object(&fs, "src").await;
    let fh_out = new_file(&fs, "dst2").await;
    fs.copy_file_range(fh_in, 0, fh_out, 0, 1 << 30)
        .await
        .unwrap();
    store.insert("dst2", "theirs");
    assert_eq!(fs.flush(fh_out).await, Err(Errno::EIO));
    let _ = fs.release(fh_out).await;
    assert_eq!(store.get_bytes("dst2").unwrap().as_ref(), b"theirs");
    fs.release(fh_in).await.unwrap();
}

#[tokio::test]
async fn fallocate_extends_with_zeros_and_reserves_nothing() {
    let (store, fs) = setup("");
    let (attr, fh) = fs
        .create(ROOT_INO, b"f", 0o644, libc::O_WRONLY, ME)
        .await
        .unwrap();
    fs.write(fh, 0, b"0123456789").await.unwrap();
    fs.fallocate(attr.ino, fh, 0, 100, 0).await.unwrap();
    assert_eq!(fs.getattr(attr.ino).await.unwrap().size, 100);
    fs.fallocate(attr.ino, fh, 50, 1 << 20, libc::FALLOC_FL_KEEP_SIZE)
        .await
        .unwrap();
    fs.fallocate(attr.ino, fh, 0, 10, 0).await.unwrap();
    assert_eq!(
        fs.getattr(attr.ino).await.unwrap().size,
        100,
        "inside: nothing to do"
    );
    assert_eq!(
        fs.fallocate(
            attr.ino,
            fh,
            0,
            10,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        )
        .await,
        Err(Errno::ENOTSUP)
    );
    assert_eq!(
        fs.fallocate(attr.ino, fh, -1, 10, 0).await,
        Err(Errno::EINVAL)
    );
    assert_eq!(
        fs.fallocate(attr.ino, fh, 0, 0, 0).await,
        Err(Errno::EINVAL)
    );
    fs.write(fh, 100, b"end").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    let mut want = b"0123456789".to_vec();
    want.resize(100, 0);
    want.extend_from_slice(b"end");
    assert_eq!(store.get_bytes("f").unwrap().as_ref(), &want[..]);
}

#[tokio::test]
async fn copy_file_range_in_several_calls_stops_where_the_caller_stops() {
    let (store, fs) = setup("");
    let big: Vec<u8> = (0..(20 << 20)).map(|i| (i % 239) as u8).collect();
    store.insert("src", big.clone());
    let fh_in = open_object(&fs, "src").await;
    // Two chunks, then the caller stops: the file is exactly the first 12 MiB.
    let a = new_file(&fs, "a").await;
    assert_eq!(
        fs.copy_file_range(fh_in, 0, a, 0, 1 << 40).await,
        Ok(6 << 20)
    );
    assert_eq!(
        fs.copy_file_range(fh_in, 6 << 20, a, 6 << 20, 1 << 40)
            .await,
        Ok(6 << 20)
    );
    fs.flush(a).await.unwrap();
    fs.release(a).await.unwrap();
    assert!(store.get_bytes("a").unwrap() == big[..12 << 20]);
    // A write between two calls: the copy cannot go on (the caller falls back or fails).
    let b = new_file(&fs, "b").await;
    assert_eq!(
        fs.copy_file_range(fh_in, 0, b, 0, 1 << 40).await,
        Ok(6 << 20)
    );
    fs.write(b, 6 << 20, b"written").await.unwrap();
    assert_eq!(
        fs.copy_file_range(fh_in, 6 << 20, b, 6 << 20, 1 << 40)
            .await,
        Err(Errno::ENOTSUP)
    );
    fs.flush(b).await.unwrap();
    fs.release(b).await.unwrap();
    let mut want = big[..6 << 20].to_vec();
    want.extend_from_slice(b"written");
    assert!(store.get_bytes("b").unwrap() == want);
    fs.release(fh_in).await.unwrap();
    assert_eq!(store.open_uploads(), 0);
}

#[tokio::test]
async fn metadata_changed_after_a_multipart_upload_started_is_applied_at_close() {
    let (store, fs) = setup("");
    let (attr, fh) = fs
        .create(ROOT_INO, b"big", 0o644, libc::O_WRONLY, ME)
        .await
        .unwrap();
    let body: Vec<u8> = (0..(20 << 20)).map(|i| (i % 233) as u8).collect();
    for (i, chunk) in body.chunks(1 << 20).enumerate() {
        fs.write(fh, (i << 20) as i64, chunk).await.unwrap();
    }
    assert!(
        store.counters.multipart.load(Ordering::Relaxed) > 0,
        "started"
    );
    // What cp -p does on the open file before closing it.
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_400_000_000);
    fs.setattr(
        attr.ino,
        Some(fh),
        SetAttr {
            mode: Some(0o600),
            mtime: Some(t),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    fs.set_or_remove_xattr(attr.ino, b"user.late", Some(b"1"), 0)
        .await
        .unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    let meta = store.head("big").await.unwrap();
    assert_eq!(meta.metadata.get("mode").map(String::as_str), Some("33152"));
    assert_eq!(
        meta.metadata.get("mtime").map(String::as_str),
        Some("1400000000")
    );
    assert!(meta.metadata.contains_key("xattr"));
    assert!(store.get_bytes("big").unwrap() == body);
    assert_eq!(
        store.counters.bytes_uploaded.load(Ordering::Relaxed),
        20 << 20
    );
    // What this mount now knows agrees with the bucket, and reads are still verified.
    let a = fs.getattr(attr.ino).await.unwrap();
    assert_eq!((a.perm, a.mtime), (0o600, t));
    assert!(read_all(&fs, attr.ino).await == body);
}

// ---- One open-file state per inode, times, special files (issue 14) ----

async fn read_fh(fs: &Fs, fh: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = fs.read(fh, out.len() as i64, 128 << 10).await.unwrap();
        if b.is_empty() {
            break;
        }
        out.extend_from_slice(&b);
    }
    out
}

#[tokio::test]
async fn descriptors_of_one_file_write_into_one_state() {
    let (store, fs) = setup("");
    let body = vec![b'.'; 1 << 20];
    let attr = write_file(&fs, ROOT_INO, "cw", &body).await;
    // Four `dd conv=notrunc` at once: each opens, writes its slot, closes.
    let mut fhs = Vec::new();
    for _ in 0..4 {
        fhs.push(fs.open(attr.ino, libc::O_WRONLY).await.unwrap().0);
    }
    for (i, fh) in fhs.iter().enumerate() {
        let at = ((i + 1) * 100) << 10;
        fs.write(*fh, at as i64, &[b'0' + i as u8; 16 << 10])
            .await
            .unwrap();
    }
    for fh in fhs {
        fs.flush(fh).await.unwrap();
        fs.release(fh).await.unwrap();
    }
    let got = store.get_bytes("cw").unwrap();
    assert_eq!(got.len(), 1 << 20);
    for i in 0..4 {
        let at = ((i + 1) * 100) << 10;
        assert!(
            got[at..at + (16 << 10)]
                .iter()
                .all(|b| *b == b'0' + i as u8),
            "slot {i}"
        );
    }
    assert_eq!(got[0], b'.');
    assert_eq!(store.open_uploads(), 0);
}

#[tokio::test]
async fn two_appenders_and_a_tail_see_every_line() {
    let (store, fs) = setup("");
    let attr = write_file(&fs, ROOT_INO, "log", b"start\n").await;
    // `tail -f` holds the file open for reading before the appends.
    let (tail, _) = fs.open(attr.ino, libc::O_RDONLY).await.unwrap();
    assert_eq!(read_fh(&fs, tail).await, b"start\n");
    let mut expect = b"start\n".to_vec();
    for i in 0..6 {
        // `echo line >> log` from two shells: open O_APPEND (the kernel writes at the size it
        // knows), write, close.
        let (fh, _) = fs
            .open(attr.ino, libc::O_WRONLY | libc::O_APPEND)
            .await
            .unwrap();
        let line = format!("line {i}\n");
        let size = fs.getattr(attr.ino).await.unwrap().size;
        fs.write(fh, size as i64, line.as_bytes()).await.unwrap();
        fs.flush(fh).await.unwrap();
        fs.release(fh).await.unwrap();
        expect.extend_from_slice(line.as_bytes());
        // The reader's next read at its old end finds the new line.
        let at = expect.len() - line.len();
        let got = fs.read(tail, at as i64, 4096).await.unwrap();
        assert_eq!(&got[..], line.as_bytes(), "tail after append {i}");
    }
    fs.release(tail).await.unwrap();
    assert_eq!(store.get_bytes("log").unwrap(), expect);
}

#[tokio::test]
async fn interleaved_appends_through_two_open_descriptors_keep_both() {
    let (store, fs) = setup("");
    let attr = write_file(&fs, ROOT_INO, "log", b"").await;
    let (a, _) = fs
        .open(attr.ino, libc::O_WRONLY | libc::O_APPEND)
        .await
        .unwrap();
    let (b, _) = fs
        .open(attr.ino, libc::O_WRONLY | libc::O_APPEND)
        .await
        .unwrap();
    let mut expect = Vec::new();
    for i in 0..10 {
        let fh = if i % 2 == 0 { a } else { b };
        let line = format!("writer {} line {i}\n", i % 2);
        fs.write(fh, expect.len() as i64, line.as_bytes())
            .await
            .unwrap();
        expect.extend_from_slice(line.as_bytes());
    }
    fs.flush(a).await.unwrap();
    fs.release(a).await.unwrap();
    fs.flush(b).await.unwrap();
    fs.release(b).await.unwrap();
    assert_eq!(store.get_bytes("log").unwrap(), expect);
}

#[tokio::test]
async fn a_reader_sees_a_truncation_by_a_writer_as_zeros() {
    let (_store, fs) = setup("");
    let attr = write_file(&fs, ROOT_INO, "t", &[9u8; 8000]).await;
    let (w, _) = fs.open(attr.ino, libc::O_RDWR).await.unwrap();
    let (r, _) = fs.open(attr.ino, libc::O_RDONLY).await.unwrap();
    let truncate = |n| SetAttr {
        size: Some(n),
        ..Default::default()
    };
    fs.setattr(attr.ino, Some(w), truncate(1000)).await.unwrap();
    fs.setattr(attr.ino, Some(w), truncate(5000)).await.unwrap();
    let got = read_fh(&fs, r).await;
    assert_eq!(got.len(), 5000);
    assert!(got[..1000].iter().all(|b| *b == 9));
    assert!(
        got[1000..].iter().all(|b| *b == 0),
        "zeros after the truncation"
    );
    fs.release(r).await.unwrap();
    fs.flush(w).await.unwrap();
    fs.release(w).await.unwrap();
}

#[tokio::test]
async fn an_unlinked_open_file_lives_on_locally_until_its_last_close() {
    let (store, fs) = setup("");
    let (attr, fh) = fs
        .create(ROOT_INO, b"g", 0o644, libc::O_RDWR, ME)
        .await
        .unwrap();
    fs.write(fh, 0, b"Hello").await.unwrap();
    // A reader opened before the unlink, of another file that is committed.
    let other = write_file(&fs, ROOT_INO, "h", b"committed bytes").await;
    let (r, _) = fs.open(other.ino, libc::O_RDONLY).await.unwrap();
    fs.unlink(ROOT_INO, b"g").await.unwrap();
    fs.unlink(ROOT_INO, b"h").await.unwrap();
    assert_eq!(&fs.read(fh, 0, 5).await.unwrap()[..], b"Hello");
    assert_eq!(fs.getattr(attr.ino).await.unwrap().nlink, 0);
    fs.write(fh, 5, b", world").await.unwrap();
    assert_eq!(&fs.read(fh, 0, 100).await.unwrap()[..], b"Hello, world");
    assert_eq!(read_fh(&fs, r).await, b"committed bytes");
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    fs.release(r).await.unwrap();
    assert_eq!(fs.lookup(ROOT_INO, b"g").await, Err(Errno::ENOENT));
    assert!(
        store.keys().is_empty(),
        "nothing re-created: {:?}",
        store.keys()
    );
    assert_eq!(store.open_uploads(), 0);
    let staged: Vec<_> = std::fs::read_dir(&fs.config().staging_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".staged"))
        .collect();
    let _ = staged; // shared by the tests of this process: not checked here
}

fn stored(store: &MockStore, key: &str, name: &str) -> Option<String> {
    store.metadata_of(key).and_then(|m| m.get(name).cloned())
}

#[tokio::test]
async fn writes_set_mtime_and_ctime() {
    let (store, fs) = setup("");
    let attr = write_file(&fs, ROOT_INO, "f", b"a\n").await;
    let old = attrs::parse_time(&stored(&store, "f", "mtime").unwrap()).unwrap();
    let past = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    fs.setattr(
        attr.ino,
        None,
        SetAttr {
            mtime: Some(past),
            atime: Some(past),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(stored(&store, "f", "mtime").as_deref(), Some("1000000"));
    assert_eq!(stored(&store, "f", "atime").as_deref(), Some("1000000"));
    let ctime = attrs::parse_time(&stored(&store, "f", "ctime").unwrap()).unwrap();
    assert!(ctime >= old, "chmod/utimens set ctime");
    // `echo b >> f`
    let (fh, _) = fs
        .open(attr.ino, libc::O_WRONLY | libc::O_APPEND)
        .await
        .unwrap();
    fs.write(fh, 2, b"b\n").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    let mtime = attrs::parse_time(&stored(&store, "f", "mtime").unwrap()).unwrap();
    assert!(mtime >= old, "append moved mtime: {mtime:?} < {old:?}");
    assert_eq!(fs.getattr(attr.ino).await.unwrap().mtime, mtime);
    // pwrite inside the file (staged)
    let (fh, _) = fs.open(attr.ino, libc::O_WRONLY).await.unwrap();
    fs.setattr(
        attr.ino,
        None,
        SetAttr {
            mtime: Some(past),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    fs.write(fh, 0, b"X").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    let mtime = attrs::parse_time(&stored(&store, "f", "mtime").unwrap()).unwrap();
    assert!(mtime > past, "a write after utimens moves mtime again");
    assert_eq!(store.get_bytes("f").unwrap(), &b"X\nb\n"[..]);
}

#[tokio::test]
async fn symlinks_keep_their_kind_through_chown_and_utimens() {
    let (store, fs) = setup("");
    let link = fs
        .symlink(ROOT_INO, b"lnk", b"target.txt", ME)
        .await
        .unwrap();
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_500_000_000);
    let attr = fs
        .setattr(
            link.ino,
            None,
            SetAttr {
                uid: Some(7),
                gid: Some(8),
                mtime: Some(t),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(attr.kind, Kind::Symlink);
    assert_eq!((attr.uid, attr.gid, attr.mtime), (7, 8, t));
    assert_eq!(stored(&store, "lnk", "mode").as_deref(), Some("41471"));
    assert_eq!(store.get_bytes("lnk").unwrap(), &b"target.txt"[..]);
    // A listing after the TTL does not turn it into a regular file.
    let fs2 = Fs::new(store.clone(), {
        let mut c = test_config("");
        c.metadata_ttl = std::time::Duration::ZERO;
        c
    });
    let a = fs2.lookup(ROOT_INO, b"lnk").await.unwrap();
    assert_eq!(a.kind, Kind::Symlink);
    assert_eq!(&fs2.readlink(a.ino).await.unwrap()[..], b"target.txt");
}

#[tokio::test]
async fn special_files_are_stored_as_s3fs_stores_them() {
    let (store, fs) = setup("");
    let fifo = fs
        .mknod(ROOT_INO, b"fifo", attrs::S_IFIFO | 0o640, 0, ME)
        .await
        .unwrap();
    assert_eq!(fifo.kind, Kind::Special(attrs::S_IFIFO));
    assert_eq!(fifo.perm, 0o640);
    let dev = fs
        .mknod(ROOT_INO, b"dev", attrs::S_IFCHR | 0o600, 0x0103, ME)
        .await
        .unwrap();
    assert_eq!(dev.rdev, 0x0103);
    let reg = fs
        .mknod(ROOT_INO, b"reg", attrs::S_IFREG | 0o600, 0, ME)
        .await
        .unwrap();
    assert_eq!(reg.kind, Kind::File);
    assert_eq!(stored(&store, "fifo", "mode").as_deref(), Some("4512")); // 010640
    assert_eq!(stored(&store, "dev", "rdev").as_deref(), Some("259"));
    assert_eq!(store.get_bytes("reg").unwrap().len(), 0);
    // Another mount finds them by HEAD.
    let fs2 = Fs::new(store.clone(), test_config(""));
    let a = fs2.lookup(ROOT_INO, b"fifo").await.unwrap();
    assert_eq!((a.kind, a.perm), (Kind::Special(attrs::S_IFIFO), 0o640));
    assert_eq!(fs2.open(a.ino, libc::O_RDONLY).await, Err(Errno::ENXIO));
    let a = fs2.lookup(ROOT_INO, b"dev").await.unwrap();
    assert_eq!((a.kind, a.rdev), (Kind::Special(attrs::S_IFCHR), 0x0103));
    // chmod keeps the type.
    let a = fs
        .setattr(
            fifo.ino,
            None,
            SetAttr {
                mode: Some(0o600),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(a.kind, Kind::Special(attrs::S_IFIFO));
    assert_eq!(stored(&store, "fifo", "mode").as_deref(), Some("4480")); // 010600
}

#[tokio::test]
async fn directory_modes_survive_later_listings() {
    let (_store, fs) = setup("");
    let d = fs.mkdir(ROOT_INO, b"d", 0o700, ME).await.unwrap();
    let before = fs.getattr(ROOT_INO).await.unwrap().mtime;
    // The parent's listing (as readdirplus would give it) keeps the mode mkdir stored.
    let fh = fs.opendir(ROOT_INO).await.unwrap();
    let items = fs.readdir(fh, 0, usize::MAX, true).await.unwrap();
    fs.releasedir(fh);
    let item = items.iter().find(|i| i.name == "d").unwrap();
    let a = fs.lookup_listed(ROOT_INO, item).unwrap().0;
    assert_eq!((a.ino, a.perm), (d.ino, 0o700));
    std::thread::sleep(std::time::Duration::from_millis(5));
    write_file(&fs, d.ino, "x", b"1").await;
    assert!(
        fs.getattr(d.ino).await.unwrap().mtime > before,
        "entries change a directory's mtime"
    );
}

#[tokio::test]
async fn sizes_past_the_s3_object_limit_are_efbig() {
    let (_store, fs) = setup("");
    let attr = write_file(&fs, ROOT_INO, "f", b"x").await;
    let r = fs
        .setattr(
            attr.ino,
            None,
            SetAttr {
                size: Some(999_999_999_999_999),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(r, Err(Errno::EFBIG));
}

#[tokio::test]
async fn rmdir_removes_an_s3fs_old_style_directory_object() {
    let (store, fs) = setup("");
    store.insert_with(
        "olddir",
        "",
        UserMetadata::new(),
        Some("application/x-directory".into()),
    );
    let a = fs.lookup(ROOT_INO, b"olddir").await.unwrap();
    assert_eq!(a.kind, Kind::Dir);
    fs.rmdir(ROOT_INO, b"olddir").await.unwrap();
    assert!(store.keys().is_empty(), "left: {:?}", store.keys());
}

/// Directory `d` at the root, mode 0700, chowned to 1234:1234 (written to its marker).
async fn mkdir_owned_by_1234(fs: &Fs) -> Attr {
    let d = fs.mkdir(ROOT_INO, b"d", 0o700, ME).await.unwrap();
    fs.setattr(
        d.ino,
        None,
        SetAttr {
            uid: Some(1234),
            gid: Some(1234),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn directory_attributes_come_from_the_marker_after_a_remount() {
    let (store, fs) = setup("");
    mkdir_owned_by_1234(&fs).await;
    // A marker written by s3fs, with its metadata.
    let mut md = UserMetadata::new();
    md.insert("mode".into(), "16832".into()); // 040700
    md.insert("uid".into(), "42".into());
    md.insert("mtime".into(), "1600000000".into());
    store.insert_with("s3fsdir/", "", md, Some("application/x-directory".into()));
    let fs2 = Fs::new(store.clone(), test_config(""));
    let a = fs2.lookup(ROOT_INO, b"d").await.unwrap();
    assert_eq!(
        (a.kind, a.perm, a.uid, a.gid),
        (Kind::Dir, 0o700, 1234, 1234)
    );
    let a = fs2.lookup(ROOT_INO, b"s3fsdir").await.unwrap();
    assert_eq!((a.perm, a.uid), (0o700, 42));
    assert_eq!(
        a.mtime,
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000)
    );
}

#[tokio::test]
async fn a_truncating_open_moves_mtime_before_and_after_close() {
    let (_store, fs) = setup("");
    let attr = write_file(&fs, ROOT_INO, "f", b"test\n").await;
    let past = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    let req = SetAttr {
        mtime: Some(past),
        ..Default::default()
    };
    fs.setattr(attr.ino, None, req).await.unwrap();
    // open(O_WRONLY|O_TRUNC) as the kernel sends it: open, then a setattr of the size.
    let (fh, _) = fs.open(attr.ino, libc::O_WRONLY).await.unwrap();
    let req = SetAttr {
        size: Some(0),
        ..Default::default()
    };
    let a = fs.setattr(attr.ino, Some(fh), req).await.unwrap();
    assert!(a.mtime > past && a.ctime > past, "{a:?}");
    assert!(fs.getattr(attr.ino).await.unwrap().mtime > past);
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    let a = fs.getattr(attr.ino).await.unwrap();
    assert!(a.mtime > past && a.size == 0, "{a:?}");
}

#[tokio::test]
async fn what_a_head_told_survives_listings_of_the_same_version() {
    let (store, fs) = setup("");
    let mut md = UserMetadata::new();
    md.insert("mode".into(), "41471".into()); // an s3fs symlink
    md.insert("mtime".into(), "1500000000".into());
    store.insert_with("lnk", "target", md, None);
    let mut md = UserMetadata::new();
    md.insert("mode".into(), "33152".into()); // 0100600
    md.insert("mtime".into(), "1400000000".into());
    store.insert_with("f", "data", md, None);
    let a = fs.lookup(ROOT_INO, b"lnk").await.unwrap();
    assert_eq!(a.kind, Kind::Symlink);
    let f = fs.lookup(ROOT_INO, b"f").await.unwrap();
    fs.forget(a.ino, 1);
    fs.forget(f.ino, 1);
    // A listing (readdirplus) of the directory later: kinds, modes and times stay.
    let heads = store.counters.head.load(Ordering::Relaxed);
    let fh = fs.opendir(ROOT_INO).await.unwrap();
    let items = fs.readdir(fh, 0, usize::MAX, true).await.unwrap();
    fs.releasedir(fh);
    let lnk = items.iter().find(|i| i.name == "lnk").unwrap();
    assert_eq!(lnk.kind, Kind::Symlink);
    let a = fs.lookup_listed(ROOT_INO, lnk).unwrap().0;
    assert_eq!(a.kind, Kind::Symlink);
    let f = items.iter().find(|i| i.name == "f").unwrap();
    let a = fs.lookup_listed(ROOT_INO, f).unwrap().0;
    assert_eq!(a.perm, 0o600);
    assert_eq!(
        a.mtime,
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_400_000_000)
    );
    assert_eq!(
        store.counters.head.load(Ordering::Relaxed),
        heads,
        "no HEAD"
    );
    // Another version of the object: the listing's word counts again.
    store.insert("f", "new data");
    let fs_items = {
        let fs2 = &fs;
        fs2.listings_changed(None);
        fs2.listings.lock().clear();
        let fh = fs2.opendir(ROOT_INO).await.unwrap();
        let items = fs2.readdir(fh, 0, usize::MAX, true).await.unwrap();
        fs2.releasedir(fh);
        items
    };
    let f = fs_items.iter().find(|i| i.name == "f").unwrap();
    fs.forget(a.ino, 2);
    let a = fs.lookup_listed(ROOT_INO, f).unwrap().0;
    assert_eq!((a.perm, a.size), (0o644, 8));
}

#[tokio::test]
async fn a_directory_counts_its_subdirectories_as_links() {
    let (_store, fs) = setup("");
    let p = fs.mkdir(ROOT_INO, b"p", 0o755, ME).await.unwrap();
    assert_eq!(fs.getattr(p.ino).await.unwrap().nlink, 2);
    fs.mkdir(p.ino, b"a", 0o755, ME).await.unwrap();
    fs.mkdir(p.ino, b"b", 0o755, ME).await.unwrap();
    write_file(&fs, p.ino, "f", b"x").await;
    assert_eq!(fs.getattr(p.ino).await.unwrap().nlink, 4);
    fs.rmdir(p.ino, b"a").await.unwrap();
    assert_eq!(fs.getattr(p.ino).await.unwrap().nlink, 3);
    let q = fs.mkdir(ROOT_INO, b"q", 0o755, ME).await.unwrap();
    fs.rename(p.ino, b"b", q.ino, b"b", 0).await.unwrap();
    assert_eq!(fs.getattr(p.ino).await.unwrap().nlink, 2);
    assert_eq!(fs.getattr(q.ino).await.unwrap().nlink, 3);
}

#[tokio::test]
async fn empty_objects_in_a_listing_are_looked_at_once_for_their_kind() {
    let (store, fs) = setup("");
    let mut md = UserMetadata::new();
    md.insert("mode".into(), "4516".into()); // 010644: a FIFO written by s3fs
    store.insert_with("fifo", "", md, None);
    store.insert_with(
        "olddir",
        "",
        UserMetadata::new(),
        Some("application/x-directory".into()),
    );
    store.insert("empty", "");
    list_names(&fs, ROOT_INO).await;
    let heads = store.counters.head.load(Ordering::Relaxed);
    let a = fs.lookup(ROOT_INO, b"fifo").await.unwrap();
    assert_eq!(a.kind, Kind::Special(attrs::S_IFIFO));
    assert_eq!(
        fs.lookup(ROOT_INO, b"olddir").await.unwrap().kind,
        Kind::Dir
    );
    assert_eq!(
        fs.lookup(ROOT_INO, b"empty").await.unwrap().kind,
        Kind::File
    );
    let after = store.counters.head.load(Ordering::Relaxed);
    assert!(after > heads);
    // Known now: looked up again, no more HEADs for the FIFO.
    fs.lookup(ROOT_INO, b"fifo").await.unwrap();
    assert_eq!(store.counters.head.load(Ordering::Relaxed), after);
}

#[tokio::test]
async fn listed_files_are_confirmed_once_per_version_before_their_times_are_trusted() {
    for confirm in [true, false] {
        let store = Arc::new(MockStore::new());
        let mut cfg = test_config("");
        cfg.confirm_listed = confirm;
        let fs = Fs::new(store.clone(), cfg);
        let mut md = UserMetadata::new();
        md.insert("mtime".into(), "1400000000".into());
        md.insert("mode".into(), "33216".into()); // 0100700
        store.insert_with("f", "data", md, None);
        let fh = fs.opendir(ROOT_INO).await.unwrap();
        let items = fs.readdir(fh, 0, usize::MAX, true).await.unwrap();
        fs.releasedir(fh);
        let item = items.iter().find(|i| i.name == "f").unwrap();
        let (_, confirmed) = fs.lookup_listed(ROOT_INO, item).unwrap();
        assert_eq!(confirmed, !confirm, "readdirplus hands it out unconfirmed");
        let a = fs.lookup(ROOT_INO, b"f").await.unwrap();
        let stored = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_400_000_000);
        if confirm {
            assert_eq!(
                (a.mtime, a.perm),
                (stored, 0o700),
                "the stored times and mode"
            );
        } else {
            assert_ne!(a.mtime, stored, "listing only: LastModified");
        }
        let heads = store.counters.head.load(Ordering::Relaxed);
        assert!(heads <= 1, "at most the one HEAD: {heads}");
        // Confirmed once per version: a new lookup after forget costs nothing more.
        fs.forget(a.ino, 10);
        let fh = fs.opendir(ROOT_INO).await.unwrap();
        let items = fs.readdir(fh, 0, usize::MAX, true).await.unwrap();
        fs.releasedir(fh);
        let item = items.iter().find(|i| i.name == "f").unwrap();
        let (a, confirmed) = fs.lookup_listed(ROOT_INO, item).unwrap();
        if confirm {
            assert!(confirmed);
            assert_eq!(a.mtime, stored);
        }
        assert_eq!(store.counters.head.load(Ordering::Relaxed), heads);
    }
}

#[tokio::test]
async fn a_tree_of_plain_objects_is_sampled_once_not_per_directory() {
    let (store, fs) = setup("");
    for d in 0..20 {
        for f in 0..20 {
            store.insert(&format!("t/d{d:02}/f{f:02}"), "x");
        }
    }
    let t = fs.lookup(ROOT_INO, b"t").await.unwrap();
    store.reset_counters();
    // `du`: list each directory, stat each file.
    for d in 0..20 {
        let dir = fs
            .lookup(t.ino, format!("d{d:02}").as_bytes())
            .await
            .unwrap();
        let fh = fs.opendir(dir.ino).await.unwrap();
        let items = fs.readdir(fh, 0, usize::MAX, true).await.unwrap();
        for item in items.iter().filter(|i| i.entry.is_some()) {
            let (a, _) = fs.lookup_listed(dir.ino, item).unwrap();
            fs.lookup(dir.ino, item.name.as_bytes()).await.unwrap();
            fs.forget(a.ino, 2);
        }
        fs.releasedir(fh);
    }
    let heads = store.counters.head.load(Ordering::Relaxed);
    assert!(heads <= 40, "a sample, not 16 per directory: {heads} HEADs");
}

#[tokio::test]
async fn a_sample_before_the_first_reply_lets_plain_entries_go_out_trusted() {
    let (store, fs) = setup("");
    for i in 0..100 {
        store.insert(&format!("d/f{i:03}"), "x");
    }
    let d = fs.lookup(ROOT_INO, b"d").await.unwrap();
    store.reset_counters();
    let fh = fs.opendir(d.ino).await.unwrap();
    fs.sample_before_listing(fh).await;
    let items = fs.readdir(fh, 0, usize::MAX, true).await.unwrap();
    let unconfirmed = items
        .iter()
        .filter(|i| i.entry.is_some())
        .filter(|i| !fs.lookup_listed(d.ino, i).unwrap().1)
        .count();
    fs.releasedir(fh);
    assert_eq!(
        unconfirmed, 0,
        "every entry trusted once the sample found no metadata"
    );
    assert!(store.counters.head.load(Ordering::Relaxed) <= 16);
}

/// After the metadata TTL, `stat` of every file of a directory listed before costs one shared
/// listing, not a HEAD and a LIST per name; versions already confirmed need no HEAD again, and
/// a name gone from the bucket is gone.
#[tokio::test]
async fn lookups_after_the_ttl_share_one_listing_of_the_directory() {
    let (store, fs) = setup_with_ttl(std::time::Duration::from_millis(200));
    let mut meta = UserMetadata::new();
    meta.insert("mode".into(), "33188".into()); // 0100644
    for i in 0..1000 {
        store.insert_with(&format!("src/f{i:04}.c"), "int x;", meta.clone(), None);
    }
    let dir = fs.lookup(ROOT_INO, b"src").await.unwrap();
    assert_eq!(list_names(&fs, dir.ino).await.len(), 1002);
    for i in 0..1000 {
        fs.lookup(dir.ino, format!("f{i:04}.c").as_bytes())
            .await
            .unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    store.remove("src/f0999.c");
    store.reset_counters();
    for i in 0..999 {
        let a = fs
            .lookup(dir.ino, format!("f{i:04}.c").as_bytes())
            .await
            .unwrap();
        assert_eq!(a.perm, 0o644);
    }
    let (lists, heads) = (
        store.counters.list.load(Ordering::Relaxed),
        store.counters.head.load(Ordering::Relaxed),
    );
    assert!(lists <= 2, "{lists} LIST requests for 999 lookups");
    assert_eq!(heads, 0, "versions confirmed before need no HEAD");
    // A name the new listing lacks is asked for (once): another client may have put it since.
    assert_eq!(
        fs.lookup(dir.ino, b"f0999.c").await.unwrap_err(),
        Errno::ENOENT
    );
    let probed = store.counters.head.load(Ordering::Relaxed);
    assert!(
        (1..=2).contains(&probed),
        "{probed} HEAD (the name, s3fs's name_$folder$)"
    );
    assert_eq!(
        fs.lookup(dir.ino, b"f0999.c").await.unwrap_err(),
        Errno::ENOENT
    );
    assert_eq!(
        store.counters.head.load(Ordering::Relaxed),
        probed,
        "negative cached"
    );
}

/// An object another client puts into a directory whose listing this mount holds (fresh, within
/// the metadata TTL) is found by the next lookup of its name: a fetched listing tells what was
/// there when it was taken, not what is missing now (s3fs's suite: `aws s3 cp` then `stat`).
/// A directory this mount made knows its names: new names cost no request.
#[tokio::test]
async fn a_name_put_by_another_client_after_a_listing_is_found_at_once() {
    let (store, fs) = setup_with_ttl(std::time::Duration::from_secs(60));
    store.insert("d/a.txt", "a");
    let dir = fs.lookup(ROOT_INO, b"d").await.unwrap();
    assert_eq!(list_names(&fs, dir.ino).await.len(), 3);
    store.insert("d/b.txt", "bb");
    let b = fs.lookup(dir.ino, b"b.txt").await.unwrap();
    assert_eq!(b.size, 2);

    let made = fs.mkdir(ROOT_INO, b"new", 0o755, ME).await.unwrap();
    store.reset_counters();
    for i in 0..100 {
        let name = format!("f{i}");
        assert_eq!(
            fs.lookup(made.ino, name.as_bytes()).await.unwrap_err(),
            Errno::ENOENT
        );
    }
    let (lists, heads) = (
        store.counters.list.load(Ordering::Relaxed),
        store.counters.head.load(Ordering::Relaxed),
    );
    assert_eq!((lists, heads), (0, 0), "new names in a directory made here");
}

/// `stat` of many files of a directory this mount never listed (after a remount): a few names
/// are probed, then the directory is listed once and the rest answered from the listing.
#[tokio::test]
async fn a_storm_of_lookups_in_an_unlisted_directory_lists_it_once() {
    let (store, fs) = setup_with_ttl(std::time::Duration::from_secs(60));
    for i in 0..1000 {
        store.insert(&format!("src/f{i:04}.c"), "int x;");
    }
    let dir = fs.lookup(ROOT_INO, b"src").await.unwrap();
    store.reset_counters();
    for i in 0..1000 {
        fs.lookup(dir.ino, format!("f{i:04}.c").as_bytes())
            .await
            .unwrap();
    }
    assert_eq!(
        fs.lookup(dir.ino, b"missing.c").await.unwrap_err(),
        Errno::ENOENT
    );
    let lists = store.counters.list.load(Ordering::Relaxed);
    let heads = store.counters.head.load(Ordering::Relaxed);
    // Probes before the storm is seen: a HEAD and a LIST each (plus the s3fs legacy-folder
    // HEAD of none); then one listing; listed plain objects are confirmed (16 sampled).
    assert!(lists <= 12, "{lists} LIST requests for 1,000 lookups");
    assert!(heads <= 40, "{heads} HEAD requests for 1,000 lookups");
}

/// The same storm in a directory of objects that carry stored metadata (written by this or
/// another mount, s3fs too): each name needs its HEAD, but once the storm is seen the names
/// behind are confirmed 16 at a time, so `xargs stat` does not pay one round trip per file.
#[tokio::test]
async fn a_storm_of_lookups_confirms_the_names_behind_it_in_parallel() {
    let (store, fs) = setup_with_ttl(std::time::Duration::from_secs(60));
    const N: usize = 200;
    for i in 0..N {
        let mut meta = UserMetadata::new();
        meta.insert("mode".into(), "33184".into());
        meta.insert("mtime".into(), "1600000000".into());
        store.insert_with(&format!("small/{i}"), "data", meta, None);
    }
    let dir = fs.lookup(ROOT_INO, b"small").await.unwrap();
    store.set_latency(Some(std::time::Duration::from_millis(10)));
    store.reset_counters();
    let t = std::time::Instant::now();
    for i in 0..N {
        let a = fs.lookup(dir.ino, i.to_string().as_bytes()).await.unwrap();
        assert_eq!(a.perm, 0o640, "stored mode of {i}");
    }
    let took = t.elapsed();
    let heads = store.counters.head.load(Ordering::Relaxed);
    assert!(
        heads <= N as u64 + 20,
        "{heads} HEAD requests for {N} lookups"
    );
    // One HEAD after the other would take N x 10 ms = 2 s.
    assert!(
        took < std::time::Duration::from_millis(800),
        "{N} lookups took {took:?}"
    );
}

/// `--write-back`: close returns before the upload, which runs by itself after a moment; the
/// file is there for lookups and reads meanwhile; a chmod right after close goes with the
/// upload (one PUT, no copy); draining waits for it; a failed background upload is reported
/// by the next fsync, once.
#[tokio::test]
async fn write_back_uploads_after_close_and_fsync_reports_failures() {
    let store = Arc::new(MockStore::new());
    let mut cfg = test_config("");
    cfg.write_back = true;
    let fs = Arc::new(Fs::new(store.clone(), cfg));
    fs.attach();
    store.set_latency(Some(std::time::Duration::from_millis(30)));
    let fh = new_file(&fs, "wb.txt").await;
    fs.write(fh, 0, b"written back").await.unwrap();
    let t = std::time::Instant::now();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    assert!(
        t.elapsed() < std::time::Duration::from_millis(25),
        "close waited for the store"
    );
    assert!(store.get_bytes("wb.txt").is_none(), "not uploaded yet");
    assert_eq!(fs.write_back_pending(), 1);
    // Queued with its bytes on local disk (the spool), where a crash would leave them.
    let spooled = std::fs::read_dir(fs.cfg.staging_dir.join("spool"))
        .unwrap()
        .flatten()
        .any(|e| std::fs::read(e.path()).is_ok_and(|b| b == b"written back"));
    assert!(spooled, "the queued bytes are in the spool");
    let a = fs.lookup(ROOT_INO, b"wb.txt").await.unwrap();
    assert_eq!(a.size, 12);
    fs.setattr(
        a.ino,
        None,
        SetAttr {
            mode: Some(0o600),
            uid: None,
            gid: None,
            size: None,
            mtime: None,
            atime: None,
            kill_suid_sgid: false,
        },
    )
    .await
    .unwrap();
    fs.drain_write_back().await;
    assert_eq!(fs.write_back_pending(), 0);
    assert_eq!(store.get_bytes("wb.txt").unwrap().as_ref(), b"written back");
    let meta = store.head("wb.txt").await.unwrap();
    assert_eq!(meta.metadata.get("mode").map(String::as_str), Some("33152"));
    assert_eq!(
        store.counters.put.load(Ordering::Relaxed),
        1,
        "the chmod went with the upload, not as a copy"
    );
    assert_eq!(read_all(&fs, a.ino).await, b"written back");

    // Read back while still queued: from memory, no upload first, one PUT in the end.
    store.reset_counters();
    let fh = new_file(&fs, "queued.o").await;
    fs.write(fh, 0, b"object code").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    let q = fs.lookup(ROOT_INO, b"queued.o").await.unwrap();
    assert_eq!(read_all(&fs, q.ino).await, b"object code");
    assert_eq!(
        store.counters.put.load(Ordering::Relaxed),
        0,
        "nothing uploaded to read it"
    );
    fs.drain_write_back().await;
    assert_eq!(store.counters.put.load(Ordering::Relaxed), 1);
    assert_eq!(
        store.get_bytes("queued.o").unwrap().as_ref(),
        b"object code"
    );

    // A background upload the store refuses: the next fsync (of any file) says EIO, once.
    store.set_latency(None);
    store.inject_fault(
        Op::Put,
        "refused",
        StoreError::AccessDenied("no".into()),
        10,
    );
    let fh = new_file(&fs, "refused.txt").await;
    fs.write(fh, 0, b"x").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    fs.drain_write_back().await;
    assert!(store.get_bytes("refused.txt").is_none());
    let other = new_file(&fs, "other.txt").await;
    assert_eq!(fs.fsync(other).await.unwrap_err(), Errno::EIO);
    fs.write(other, 0, b"y").await.unwrap();
    fs.fsync(other).await.unwrap();
    assert_eq!(store.get_bytes("other.txt").unwrap().as_ref(), b"y");
    fs.release(other).await.unwrap();
}

/// `--write-back`: a background upload that fails transiently (the store unreachable twice) is
/// tried again after a pause and lands; nothing is reported to fsync. A refusal (403) is not
/// retried.
#[tokio::test]
async fn write_back_retries_transient_failures() {
    let store = Arc::new(MockStore::new());
    let mut cfg = test_config("");
    cfg.write_back = true;
    let fs = Arc::new(Fs::new(store.clone(), cfg));
    fs.attach();
    store.inject_fault(
        Op::Put,
        "flaky",
        StoreError::Unreachable("connection reset".into()),
        2,
    );
    let fh = new_file(&fs, "flaky.txt").await;
    fs.write(fh, 0, b"eventually").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    let t = std::time::Instant::now();
    fs.drain_write_back().await;
    assert!(
        t.elapsed() >= std::time::Duration::from_secs(3),
        "paused 1 s, then 2 s"
    );
    assert_eq!(
        store.get_bytes("flaky.txt").unwrap().as_ref(),
        b"eventually"
    );
    assert_eq!(store.counters.put.load(Ordering::Relaxed), 3);
    let other = new_file(&fs, "other.txt").await;
    fs.fsync(other).await.unwrap();
    fs.release(other).await.unwrap();

    store.reset_counters();
    store.inject_fault(Op::Put, "denied", StoreError::AccessDenied("no".into()), 1);
    let fh = new_file(&fs, "denied.txt").await;
    fs.write(fh, 0, b"x").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    fs.drain_write_back().await;
    assert_eq!(
        store.counters.put.load(Ordering::Relaxed),
        1,
        "a refusal is final"
    );
    assert!(store.get_bytes("denied.txt").is_none());
}

/// `--write-back` queues at most --spool-limit bytes: a close that would pass it uploads
/// before it returns.
#[tokio::test]
async fn write_back_queues_at_most_the_spool_limit_in_bytes() {
    let store = Arc::new(MockStore::new());
    let mut cfg = test_config("");
    cfg.write_back = true;
    cfg.upload.spool_limit = 1 << 20;
    let fs = Arc::new(Fs::new(store.clone(), cfg));
    fs.attach();
    store.set_latency(Some(std::time::Duration::from_millis(20)));
    let body = vec![7u8; 400 << 10];
    for name in ["a", "b", "c"] {
        let fh = new_file(&fs, name).await;
        fs.write(fh, 0, &body).await.unwrap();
        fs.flush(fh).await.unwrap();
        fs.release(fh).await.unwrap();
    }
    // a and b (800 KiB) wait; c would pass 1 MiB: it was uploaded by its close.
    assert_eq!(fs.write_back_pending(), 2);
    assert!(store.get_bytes("c").is_some());
    assert!(store.get_bytes("a").is_none());
    fs.drain_write_back().await;
    for name in ["a", "b", "c"] {
        assert_eq!(store.get_bytes(name).unwrap().len(), 400 << 10, "{name}");
    }
}

/// tar sets a directory's owner, mode and times in three calls: the marker this mount just
/// wrote is not read back before each copy.
#[tokio::test]
async fn directory_attribute_changes_in_a_row_need_no_head_each() {
    let (store, fs) = setup("");
    let d = fs.mkdir(ROOT_INO, b"d", 0o755, ME).await.unwrap();
    store.reset_counters();
    let set = |mode: Option<u32>, uid: Option<u32>, mtime: Option<std::time::SystemTime>| SetAttr {
        mode,
        uid,
        gid: None,
        size: None,
        mtime,
        atime: None,
        kill_suid_sgid: false,
    };
    fs.setattr(d.ino, None, set(None, Some(1000), None))
        .await
        .unwrap();
    fs.setattr(d.ino, None, set(Some(0o700), None, None))
        .await
        .unwrap();
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
    let a = fs
        .setattr(d.ino, None, set(None, None, Some(t)))
        .await
        .unwrap();
    assert_eq!((a.perm, a.uid, a.mtime), (0o700, 1000, t));
    assert!(
        store.counters.head.load(Ordering::Relaxed) <= 1,
        "HEADs: {}",
        store.counters.head.load(Ordering::Relaxed)
    );
    let meta = store.head("d/").await.unwrap();
    assert_eq!(meta.metadata.get("uid").map(String::as_str), Some("1000"));
    assert_eq!(
        meta.metadata.get("mode").map(String::as_str),
        Some(&*(0o40700u32).to_string())
    );
}

/// A worker of a supervised mount over `store`: an `Fs` journaling in `journal`, the first
/// (`restart` 0) or one started after `restart` deaths (it replays the journal first).
fn worker(store: &Arc<MockStore>, cfg: FsConfig, journal: &std::path::Path, restart: u32) -> Fs {
    let fs = Fs::new(store.clone(), cfg);
    fs.start_journal(journal, restart).unwrap();
    fs
}

/// `--supervise`: a worker started again on a live mount takes back, from the journal the dead
/// one wrote, the node ids and handles the kernel holds: getattr and lookups under restored
/// inodes work, a read handle and a directory handle go on, a write handle fails with EIO, new
/// handles are numbered above the old ones, and renames and unlinks before the death count.
#[tokio::test]
async fn a_restarted_worker_answers_the_node_ids_and_handles_of_the_dead_one() {
    let store = Arc::new(MockStore::new());
    store.insert("src/a.c", "int a;");
    store.insert("src/b.c", "int b;");
    store.insert("src/sub/c.c", "int c;");
    store.insert("top.txt", "top");
    let state = tempfile::tempdir().unwrap();
    let path = state.path().join("inodes.journal");
    let old = worker(&store, test_config(""), &path, 0);
    let src = old.lookup(ROOT_INO, b"src").await.unwrap();
    let a = old.lookup(src.ino, b"a.c").await.unwrap();
    let sub = old.lookup(src.ino, b"sub").await.unwrap();
    let top = old.lookup(ROOT_INO, b"top.txt").await.unwrap();
    let (read_fh, _) = old.open(a.ino, libc::O_RDONLY).await.unwrap();
    let b = old.lookup(src.ino, b"b.c").await.unwrap();
    let (b_fh, _) = old.open(b.ino, libc::O_RDONLY).await.unwrap();
    let dir_fh = old.opendir(src.ino).await.unwrap();
    let first = old.readdir(dir_fh, 0, 3, true).await.unwrap();
    let names: Vec<String> = first.iter().map(|i| i.name.clone()).collect();
    let write_fh = new_file(&old, "new.txt").await;
    old.write(write_fh, 0, b"lost").await.unwrap();
    old.rename(ROOT_INO, b"top.txt", src.ino, b"moved.txt", 0)
        .await
        .unwrap();
    // The worker dies here: nothing is released or flushed. Another client then replaces b.c.
    drop(old);
    store.insert("src/b.c", "int b = 2;");

    let new = Fs::new(store.clone(), test_config(""));
    assert!(new.start_journal(&path, 1).unwrap() >= 5);
    assert_eq!(new.getattr(a.ino).await.unwrap().size, 6);
    assert_eq!(new.getattr(sub.ino).await.unwrap().kind, Kind::Dir);
    let c = new.lookup(sub.ino, b"c.c").await.unwrap();
    assert!(
        c.ino > top.ino,
        "new inodes are numbered after the old ones"
    );
    assert_eq!(
        new.lookup(src.ino, b"moved.txt").await.unwrap().ino,
        top.ino
    );
    assert_eq!(store.get_bytes("src/moved.txt").unwrap().as_ref(), b"top");
    // The read handle goes on (a close that comes before any read is fine too).
    new.flush(read_fh).await.unwrap();
    new.adopt_file(a.ino, read_fh);
    store.reset_counters();
    assert_eq!(new.read(read_fh, 0, 100).await.unwrap().as_ref(), b"int a;");
    assert_eq!(
        store.counters.head.load(Ordering::Relaxed),
        0,
        "the version read is in the journal"
    );
    // A descriptor of a version replaced since fails, rather than mix two versions.
    new.adopt_file(b.ino, b_fh);
    assert_eq!(new.read(b_fh, 0, 100).await.unwrap_err(), Errno::ESTALE);
    // The directory handle goes on from where the kernel is.
    new.adopt_dir(src.ino, dir_fh).await.unwrap();
    let rest = new.readdir(dir_fh, 3, 100, true).await.unwrap();
    let mut all: Vec<String> = names;
    all.extend(rest.iter().map(|i| i.name.clone()));
    all.sort();
    assert_eq!(all, [".", "..", "a.c", "b.c", "moved.txt", "sub"]);
    // A write handle whose local bytes are gone (the dead worker's files were removed here,
    // as a crash would not) cannot go on.
    assert_eq!(new.write(write_fh, 4, b"x").await.unwrap_err(), Errno::EIO);
    assert_eq!(new.flush(write_fh).await.unwrap_err(), Errno::EIO);
    new.release(write_fh).await.unwrap();
    assert_eq!(new.flush(write_fh).await.unwrap_err(), Errno::EBADF);
    // Handles made now are numbered above every old one.
    let (fh, _) = new.open(a.ino, libc::O_RDONLY).await.unwrap();
    assert!(fh > write_fh.max(dir_fh).max(read_fh));
}

/// `--supervise`: files open for writing when the worker dies go on in the next one, from
/// their local bytes: a streamed new file (every byte in its local copy before each write
/// returns) and an object modified in place (its staging file and the journaled changes). Both
/// end byte-exact at close; the dead worker's multipart upload is aborted.
#[tokio::test]
async fn a_restarted_worker_goes_on_with_files_being_written() {
    let store = Arc::new(MockStore::new());
    let original: Vec<u8> = (0..(2 << 20)).map(|i| (i % 251) as u8).collect();
    store.insert("doc.bin", original.clone());
    let state = tempfile::tempdir().unwrap();
    let path = state.path().join("inodes");
    let mut cfg = test_config("");
    cfg.upload.min_part_size = 5 << 20;
    let old = worker(&store, cfg.clone(), &path, 0);
    // A stream: 7 MiB in 1 MiB writes (a multipart upload has started).
    let chunk = |i: usize| vec![i as u8 + 1; 1 << 20];
    let s_fh = new_file(&old, "stream.bin").await;
    for i in 0..7 {
        old.write(s_fh, (i << 20) as i64, &chunk(i)).await.unwrap();
    }
    let s_ino = old.lookup(ROOT_INO, b"stream.bin").await.unwrap().ino;
    // An object modified in place.
    let d = old.lookup(ROOT_INO, b"doc.bin").await.unwrap();
    let (d_fh, _) = old.open(d.ino, libc::O_RDWR).await.unwrap();
    old.write(d_fh, 1000, b"XXXX").await.unwrap();
    old.setattr(
        d.ino,
        Some(d_fh),
        SetAttr {
            mode: None,
            uid: None,
            gid: None,
            size: Some(1_800_000),
            mtime: None,
            atime: None,
            kill_suid_sgid: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(store.open_uploads(), 1, "the stream's multipart upload");
    // The worker dies: no destructor runs (its local files stay, as after kill -9).
    std::mem::forget(old);

    let new = worker(&store, cfg, &path, 1);
    new.adopt_writer(s_ino, s_fh).await.unwrap();
    new.write(s_fh, 7 << 20, &chunk(7)).await.unwrap();
    new.flush(s_fh).await.unwrap();
    new.release(s_fh).await.unwrap();
    let want: Vec<u8> = (0..8).flat_map(chunk).collect();
    assert!(store.get_bytes("stream.bin").unwrap() == want, "stream.bin");

    new.adopt_writer(d.ino, d_fh).await.unwrap();
    new.write(d_fh, 1_500_000, b"YY").await.unwrap();
    new.flush(d_fh).await.unwrap();
    new.release(d_fh).await.unwrap();
    let mut want = original.clone();
    want[1000..1004].copy_from_slice(b"XXXX");
    want.truncate(1_800_000);
    want[1_500_000..1_500_002].copy_from_slice(b"YY");
    assert!(store.get_bytes("doc.bin").unwrap() == want, "doc.bin");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(
        store.open_uploads(),
        0,
        "the dead worker's upload is aborted"
    );
}

/// Requests the kernel resends after a worker death, which the dead worker had carried out
/// before it died: the new worker finds them done (a resent mkdir or unlink is not carried out
/// twice) and hands a resent create or open the handle the dead one opened for it, taken over,
/// so that the kernel's close of it commits the file (a second handle would never be released).
#[tokio::test]
async fn a_restarted_worker_finds_the_resent_requests_the_dead_one_carried_out() {
    let store = Arc::new(MockStore::new());
    store.insert("old.txt", "old");
    let state = tempfile::tempdir().unwrap();
    let path = state.path().join("inodes");
    let old = worker(&store, test_config(""), &path, 0);
    // Request 7: create (the answer never left); 8: mkdir; 9: unlink; 10: an open.
    let (made, fh) = Fs::serving(
        7,
        old.create(ROOT_INO, b"new.txt", 0o644, libc::O_WRONLY, ME),
    )
    .await
    .unwrap();
    old.write(fh, 0, b"written by the dead worker")
        .await
        .unwrap();
    old.mkdir(ROOT_INO, b"dir", 0o755, ME).await.unwrap();
    old.request_done(8);
    old.unlink(ROOT_INO, b"old.txt").await.unwrap();
    old.request_done(9);
    let dir = old.lookup(ROOT_INO, b"dir").await.unwrap();
    let dir_fh = Fs::serving(10, old.opendir(dir.ino)).await.unwrap();
    std::mem::forget(old);

    let new = worker(&store, test_config(""), &path, 1);
    assert_eq!(new.take_over_handles().await, 1);
    assert!(new.was_done(8) && new.was_done(9));
    assert!(
        !new.was_done(7) && !new.was_done(11),
        "not journaled as done"
    );
    assert_eq!(new.resent_open(7), Some((fh, made.ino)));
    assert_eq!(new.resent_open(7), None, "handed out once");
    assert_eq!(new.resent_open(10), Some((dir_fh, dir.ino)));
    // The kernel goes on with the handle it now knows: its close commits.
    new.write(fh, 26, b", and by the new one").await.unwrap();
    new.flush(fh).await.unwrap();
    new.release(fh).await.unwrap();
    assert_eq!(
        store.get_bytes("new.txt").unwrap().as_ref(),
        b"written by the dead worker, and by the new one"
    );
    assert!(store.get_bytes("old.txt").is_none());
    // A worker that dies again before the resend is answered: the third one knows too.
    drop(new);
    let third = worker(&store, test_config(""), &path, 2);
    assert!(third.was_done(8) && third.was_done(9));
}

/// A supervised mount appends to a committed object through a staging file: an appender that
/// fsyncs (commits) and writes on, as a logger does, goes on after a worker death, and the
/// object ends with every line (before, the append continued a stream whose start was copied
/// server side, never local, and failed with EIO in the new worker).
#[tokio::test]
async fn an_append_after_fsync_goes_on_after_a_worker_death() {
    let store = Arc::new(MockStore::new());
    let state = tempfile::tempdir().unwrap();
    let path = state.path().join("inodes");
    let mut cfg = test_config("");
    cfg.upload.min_part_size = 5 << 20;
    let old = worker(&store, cfg.clone(), &path, 0);
    let fh = new_file(&old, "app.log").await;
    // Large enough that a stream continuing it copies its start server side.
    let mut want = vec![b'.'; 6 << 20];
    old.write(fh, 0, &want).await.unwrap();
    old.fsync(fh).await.unwrap();
    assert_eq!(store.get_bytes("app.log").unwrap().len(), 6 << 20);
    old.write(fh, want.len() as i64, b"line 2\n").await.unwrap();
    want.extend_from_slice(b"line 2\n");
    let ino = old.lookup(ROOT_INO, b"app.log").await.unwrap().ino;
    std::mem::forget(old);

    let new = worker(&store, cfg, &path, 1);
    assert_eq!(new.take_over_handles().await, 1);
    new.write(fh, want.len() as i64, b"line 3\n").await.unwrap();
    want.extend_from_slice(b"line 3\n");
    new.flush(fh).await.unwrap();
    new.release(fh).await.unwrap();
    assert!(store.get_bytes("app.log").unwrap() == want, "app.log");
    assert_eq!(new.getattr(ino).await.unwrap().size, want.len() as u64);
}

/// A directory the kernel holds across a worker death answers getattr with the attributes on
/// its marker (mode, owner), not the defaults the journal's names restore it with.
#[tokio::test]
async fn a_restored_directory_has_its_marker_attributes() {
    let store = Arc::new(MockStore::new());
    let state = tempfile::tempdir().unwrap();
    let path = state.path().join("inodes");
    let old = worker(&store, test_config(""), &path, 0);
    let d = mkdir_owned_by_1234(&old).await;
    std::mem::forget(old);

    let new = worker(&store, test_config(""), &path, 1);
    let a = new.getattr(d.ino).await.unwrap();
    assert_eq!(
        (a.kind, a.perm, a.uid, a.gid),
        (Kind::Dir, 0o700, 1234, 1234)
    );
    // Read once: later getattrs are answered from memory.
    store.reset_counters();
    new.getattr(d.ino).await.unwrap();
    assert_eq!(store.counters.head.load(Ordering::Relaxed), 0);
}

/// A worker that dies after its commit of a stream landed, before it journaled the commit and
/// removed the stream's local copy: the next worker finds the bucket holding those bytes,
/// goes on with the file as committed, and removes the copy (else every later mount reports
/// it as data left over). Both for a descriptor still open and for one already released.
#[tokio::test]
async fn a_local_copy_committed_before_the_death_is_removed_by_the_next_worker() {
    // (descriptor still open, the copy itself still there: else only its `.info`, the death
    // having come between removing the two)
    for (still_open, copy_left) in [(true, true), (false, true), (true, false)] {
        let store = Arc::new(MockStore::new());
        let state = tempfile::tempdir().unwrap();
        let path = state.path().join("inodes");
        let mut cfg = test_config("");
        cfg.staging_dir = state.path().join("staging");
        std::fs::create_dir_all(&cfg.staging_dir).unwrap();
        let old = worker(&store, cfg.clone(), &path, 0);
        let fh = new_file(&old, "f.bin").await;
        old.write(fh, 0, b"the stream's bytes").await.unwrap();
        // Its local copy, as the journal names it.
        let journal = std::fs::read_to_string(&path).unwrap();
        let copy = journal
            .lines()
            .find_map(|l| {
                l.strip_prefix("G\t")?
                    .split('\t')
                    .nth(2)
                    .map(str::to_string)
            })
            .expect("a G record with the local copy");
        let kept = std::fs::read(&copy).unwrap();
        let info = std::fs::read(crate::data::staging::sidecar(std::path::Path::new(&copy)));
        old.flush(fh).await.unwrap();
        if !still_open {
            old.release(fh).await.unwrap();
        }
        std::mem::forget(old);
        // As if it died after the PUT: no E record, the copy and its .info still there.
        let cut: String = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("E\t"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&path, cut).unwrap();
        if copy_left {
            std::fs::write(&copy, &kept).unwrap();
        }
        if let Ok(info) = info {
            std::fs::write(
                crate::data::staging::sidecar(std::path::Path::new(&copy)),
                info,
            )
            .unwrap();
        }

        let new = worker(&store, cfg.clone(), &path, 1);
        new.take_over_handles().await;
        assert!(
            !std::path::Path::new(&copy).exists(),
            "copy left (still open: {still_open})"
        );
        assert!(crate::data::staging::leftovers(&cfg.staging_dir).is_empty());
        assert!(
            !crate::data::staging::sidecar(std::path::Path::new(&copy)).exists(),
            ".info left (still open: {still_open}, copy left: {copy_left})"
        );
        if still_open {
            new.release(fh).await.unwrap();
        }
        assert_eq!(
            store.get_bytes("f.bin").unwrap().as_ref(),
            b"the stream's bytes"
        );
    }
}

/// Local files the dead worker made and never journaled (it died between making the file and
/// journaling it; the write never returned and comes again) are removed by the next worker;
/// a journaled one is taken over, and files of earlier runs (another pid) are kept for the
/// leftover report.
#[tokio::test]
async fn local_files_the_dead_worker_never_journaled_are_removed() {
    let store = Arc::new(MockStore::new());
    let state = tempfile::tempdir().unwrap();
    let path = state.path().join("inodes");
    let mut cfg = test_config("");
    cfg.staging_dir = state.path().join("staging");
    let spool = cfg.staging_dir.join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let old = worker(&store, cfg.clone(), &path, 0);
    let fh = new_file(&old, "kept.bin").await;
    old.write(fh, 0, b"journaled").await.unwrap();
    std::mem::forget(old);
    let me = std::process::id();
    let unjournaled = spool.join(format!("half_made.{me}.999"));
    let earlier = spool.join("from_an_earlier_run.1.7");
    let staged = cfg.staging_dir.join(format!("{me}-123.staged"));
    for f in [&unjournaled, &earlier, &staged] {
        std::fs::write(f, b"x").unwrap();
        std::fs::write(crate::data::staging::sidecar(f), b"key: k\n").unwrap();
    }
    // Killed between writing the `.info` and making the file it describes.
    let lone = crate::data::staging::sidecar(&spool.join(format!("lone.{me}.5")));
    std::fs::write(&lone, b"key: lone\n").unwrap();

    let new = worker(&store, cfg.clone(), &path, 1);
    assert_eq!(new.take_over_handles().await, 1);
    assert!(!unjournaled.exists() && !crate::data::staging::sidecar(&unjournaled).exists());
    assert!(!staged.exists());
    assert!(!lone.exists(), "a lone .info");
    assert!(earlier.exists() && crate::data::staging::sidecar(&earlier).exists());
    new.write(fh, 9, b", then more").await.unwrap();
    new.release(fh).await.unwrap();
    assert_eq!(
        store.get_bytes("kept.bin").unwrap().as_ref(),
        b"journaled, then more"
    );
}

/// rsync's way of writing each file into a directory it made: look the name up, create a
/// temporary name, write, close, set times and mode, rename over the name. With the names of
/// the directory known (it was made here, and every rename keeps its listing exact) and the
/// temporary file's stored state at hand, that costs the PUT, the two metadata copies and the
/// rename's copy and delete: no HEAD and no LIST per file.
#[tokio::test]
async fn write_then_rename_into_a_directory_made_here_asks_nothing() {
    let (store, fs) = setup("");
    let d = fs.mkdir(ROOT_INO, b"d", 0o755, ME).await.unwrap();
    store.reset_counters();
    let mtime = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000);
    for i in 0..10 {
        let name = format!("f{i}");
        let tmp = format!(".f{i}.XyZ12");
        assert_eq!(
            fs.lookup(d.ino, name.as_bytes()).await.unwrap_err(),
            Errno::ENOENT
        );
        assert_eq!(
            fs.lookup(d.ino, tmp.as_bytes()).await.unwrap_err(),
            Errno::ENOENT
        );
        let a = write_file(&fs, d.ino, &tmp, format!("body {i}").as_bytes()).await;
        let times = SetAttr {
            mtime: Some(mtime),
            atime: Some(mtime),
            ..Default::default()
        };
        fs.setattr(a.ino, None, times).await.unwrap();
        let mode = SetAttr {
            mode: Some(0o640),
            ..Default::default()
        };
        fs.setattr(a.ino, None, mode).await.unwrap();
        fs.rename(d.ino, tmp.as_bytes(), d.ino, name.as_bytes(), 0)
            .await
            .unwrap();
    }
    let c = &store.counters;
    let (lists, heads) = (
        c.list.load(Ordering::Relaxed),
        c.head.load(Ordering::Relaxed),
    );
    assert_eq!(
        (lists, heads),
        (0, 0),
        "LIST and HEAD requests for 10 files"
    );
    assert_eq!(
        c.put.load(Ordering::Relaxed),
        40,
        "PUT, 2 copies, rename copy"
    );
    assert_eq!(c.delete.load(Ordering::Relaxed), 10);
    assert_renamed_bodies(&store, 11).await; // the marker and f0..f9
    for i in 0..10 {
        let a = fs.lookup(d.ino, format!("f{i}").as_bytes()).await.unwrap();
        assert_eq!((a.perm, a.size), (0o640, 6));
    }
}

/// The bucket holds `keys` keys under d/, and d/f0..d/f9 hold "body N" with mode 0640 and
/// mtime 1600000000 (the rsync-like tests' files).
async fn assert_renamed_bodies(store: &MockStore, keys: usize) {
    let mut all = store.keys();
    all.retain(|k| k.starts_with("d/"));
    assert_eq!(all.len(), keys, "{all:?}");
    for i in 0..10 {
        let key = format!("d/f{i}");
        assert_eq!(
            store.get_bytes(&key).unwrap(),
            format!("body {i}").as_bytes()
        );
        let meta = store.head(&key).await.unwrap();
        assert_eq!(meta.metadata.get("mode").map(String::as_str), Some("33184")); // 0100640
        assert_eq!(
            meta.metadata.get("mtime").map(String::as_str),
            Some("1600000000")
        );
    }
}

/// A file this mount wrote and another client replaced since: the rename does not move the
/// version this mount remembers (its copy is conditional on that ETag) but asks, and moves
/// what the bucket holds.
#[tokio::test]
async fn a_rename_moves_what_the_bucket_holds_when_another_client_changed_it() {
    let (store, fs) = setup("");
    let d = fs.mkdir(ROOT_INO, b"d", 0o755, ME).await.unwrap();
    write_file(&fs, d.ino, "a", b"ours").await;
    store.insert("d/a", "theirs, newer");
    fs.rename(d.ino, b"a", d.ino, b"b", 0).await.unwrap();
    assert_eq!(store.get_bytes("d/b").unwrap(), &b"theirs, newer"[..]);
    assert!(store.get_bytes("d/a").is_none());
    let b = fs.lookup(d.ino, b"b").await.unwrap();
    assert_eq!(b.size, 13);
}

/// A directory this mount made and filled, listed again after the metadata TTL: holding only
/// the names this mount put there, it still answers for absent names (rsync's next file costs
/// no request); once another client has put a name there, absent names are asked for.
#[tokio::test]
async fn a_directory_made_here_stays_known_after_the_ttl_until_another_client_writes_there() {
    let (store, fs) = setup_with_ttl(std::time::Duration::from_millis(200));
    let d = fs.mkdir(ROOT_INO, b"d", 0o755, ME).await.unwrap();
    for i in 0..5 {
        write_file(&fs, d.ino, &format!("f{i}"), b"x").await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    store.reset_counters();
    // The first lookup after the TTL lists the directory again (and trusts it: it began after
    // the lookup); the names behind it cost nothing.
    for i in 5..25 {
        let name = format!("f{i}");
        assert_eq!(
            fs.lookup(d.ino, name.as_bytes()).await.unwrap_err(),
            Errno::ENOENT
        );
    }
    let c = &store.counters;
    assert_eq!(c.list.load(Ordering::Relaxed), 1);
    assert_eq!(c.head.load(Ordering::Relaxed), 0);

    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    store.insert("d/theirs", "t");
    store.reset_counters();
    assert_eq!(fs.lookup(d.ino, b"g0").await.unwrap_err(), Errno::ENOENT);
    assert_eq!(c.list.load(Ordering::Relaxed), 1, "listed again");
    fs.lookup(d.ino, b"theirs").await.unwrap();
    assert_eq!(fs.lookup(d.ino, b"g1").await.unwrap_err(), Errno::ENOENT);
    assert!(
        c.head.load(Ordering::Relaxed) >= 1,
        "a name absent from a directory another client writes to is asked for"
    );
}

/// A change this mount makes in one directory does not keep a listing of another directory,
/// fetched meanwhile, from being cached.
#[tokio::test]
async fn a_change_in_one_directory_leaves_listings_of_others_cached() {
    let (store, fs) = setup("");
    store.insert("a/x", "1");
    store.insert("b/y", "2");
    let a = fs.lookup(ROOT_INO, b"a").await.unwrap();
    let b = fs.lookup(ROOT_INO, b"b").await.unwrap();
    store.set_latency(Some(std::time::Duration::from_millis(50)));
    let listing = {
        let fs = &fs;
        async move {
            // Starts while the mkdir's PUT is under way, ends after it.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let fh = fs.opendir(a.ino).await.unwrap();
            fs.releasedir(fh);
        }
    };
    let change = async {
        fs.mkdir(b.ino, b"new", 0o755, ME).await.unwrap();
    };
    tokio::join!(listing, change);
    store.set_latency(None);
    store.reset_counters();
    let fh = fs.opendir(a.ino).await.unwrap();
    fs.releasedir(fh);
    assert_eq!(
        store.counters.list.load(Ordering::Relaxed),
        0,
        "the listing of a/ was cached"
    );
}

/// rsync's generator on a fresh mount stats every destination name, directory after
/// directory, without listing any. The storm in the top directory lists it, and lists its
/// subdirectories ahead, whose names are then confirmed 16 at a time: not a HEAD and a LIST
/// per name until each directory's own storm is seen.
#[tokio::test]
async fn a_storm_of_lookups_walking_a_tree_lists_the_tree_ahead() {
    let (store, fs) = setup_with_ttl(std::time::Duration::from_secs(60));
    let mut meta = UserMetadata::new();
    meta.insert("mode".into(), "33184".into()); // 0100640
    meta.insert("mtime".into(), "1600000000".into());
    for d in 0..20 {
        for f in 0..10 {
            store.insert_with(&format!("t/d{d:02}/f{f}"), "x", meta.clone(), None);
        }
    }
    let t = fs.lookup(ROOT_INO, b"t").await.unwrap();
    store.set_latency(Some(std::time::Duration::from_millis(5)));
    store.reset_counters();
    let started = std::time::Instant::now();
    let mut dirs = Vec::new();
    for d in 0..20 {
        dirs.push(
            fs.lookup(t.ino, format!("d{d:02}").as_bytes())
                .await
                .unwrap(),
        );
    }
    for (d, dir) in dirs.iter().enumerate() {
        for f in 0..10 {
            let a = fs
                .lookup(dir.ino, format!("f{f}").as_bytes())
                .await
                .unwrap();
            assert_eq!(a.perm, 0o640, "d{d:02}/f{f}");
        }
    }
    let took = started.elapsed();
    let lists = store.counters.list.load(Ordering::Relaxed);
    let heads = store.counters.head.load(Ordering::Relaxed);
    // 220 lookups: one probe per name would be 220 round trips (1.1 s at 5 ms).
    assert!(lists <= 30, "{lists} LIST requests");
    assert!(heads <= 230, "{heads} HEAD requests");
    assert!(took < std::time::Duration::from_millis(700), "{took:?}");
}

/// `--write-back` and rsync's temporary names: a file renamed while its upload is queued (or
/// while it is still being written) is uploaded once, to its new name: no copy, no delete,
/// never an object under the temporary name. Its times and mode set before the rename go with
/// it; its `.info` names the new key.
#[tokio::test]
async fn write_back_renamed_before_its_upload_is_uploaded_once_to_the_new_name() {
    let store = Arc::new(MockStore::new());
    let mut cfg = test_config("");
    cfg.write_back = true;
    let fs = Arc::new(Fs::new(store.clone(), cfg));
    fs.attach();
    let d = fs.mkdir(ROOT_INO, b"d", 0o755, ME).await.unwrap();
    store.reset_counters();
    let mtime = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000);
    for i in 0..10 {
        let tmp = format!(".f{i}.XyZ12");
        let a = write_file(&fs, d.ino, &tmp, format!("body {i}").as_bytes()).await;
        let set = SetAttr {
            mtime: Some(mtime),
            mode: Some(0o640),
            ..Default::default()
        };
        fs.setattr(a.ino, None, set).await.unwrap();
        fs.rename(d.ino, tmp.as_bytes(), d.ino, format!("f{i}").as_bytes(), 0)
            .await
            .unwrap();
        // Seen at its new name at once, gone from the old one.
        let b = fs.lookup(d.ino, format!("f{i}").as_bytes()).await.unwrap();
        assert_eq!((b.ino, b.size, b.perm), (a.ino, 6, 0o640));
        assert_eq!(
            fs.lookup(d.ino, tmp.as_bytes()).await.unwrap_err(),
            Errno::ENOENT
        );
    }
    // A file still open for writing, renamed, then written on: one upload, at the new name.
    let (_, fh) = fs
        .create(d.ino, b".open.tmp", 0o644, libc::O_WRONLY, ME)
        .await
        .unwrap();
    fs.write(fh, 0, b"first ").await.unwrap();
    fs.rename(d.ino, b".open.tmp", d.ino, b"open", 0)
        .await
        .unwrap();
    fs.write(fh, 6, b"second").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    // What waits on local disk is described by the new names (a crash reports those).
    for e in std::fs::read_dir(fs.cfg.staging_dir.join("spool"))
        .unwrap()
        .flatten()
    {
        if e.path().extension().is_some_and(|x| x == "info") {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            assert!(!text.contains(".tmp") && !text.contains("XyZ12"), "{text}");
        }
    }
    fs.drain_write_back().await;
    let c = &store.counters;
    assert_eq!(c.put.load(Ordering::Relaxed), 11, "one PUT a file, no copy");
    assert_eq!(c.delete.load(Ordering::Relaxed), 0);
    assert_renamed_bodies(&store, 12).await; // the marker, f0..f9, open
    assert_eq!(store.get_bytes("d/open").unwrap(), &b"first second"[..]);
}

/// `--supervise` with `--write-back`: a new file renamed while still open (its upload moved to
/// the new name, nothing sent) goes on in a restarted worker under the new name: one object,
/// at the new name, byte-exact.
#[tokio::test]
async fn a_restarted_worker_goes_on_with_a_file_whose_upload_moved_by_a_rename() {
    let store = Arc::new(MockStore::new());
    let state = tempfile::tempdir().unwrap();
    let path = state.path().join("inodes");
    let mut cfg = test_config("");
    cfg.write_back = true;
    let old = Arc::new(worker(&store, cfg.clone(), &path, 0));
    old.attach();
    let fh = new_file(&old, ".t.tmp").await;
    old.write(fh, 0, b"first ").await.unwrap();
    let ino = old.lookup(ROOT_INO, b".t.tmp").await.unwrap().ino;
    old.rename(ROOT_INO, b".t.tmp", ROOT_INO, b"t", 0)
        .await
        .unwrap();
    std::mem::forget(old);

    let new = Arc::new(worker(&store, cfg, &path, 1));
    new.attach();
    new.adopt_writer(ino, fh).await.unwrap();
    new.write(fh, 6, b"second").await.unwrap();
    new.flush(fh).await.unwrap();
    new.release(fh).await.unwrap();
    new.drain_write_back().await;
    assert_eq!(
        store.get_bytes("t").as_deref(),
        Some(&b"first second"[..]),
        "{:?}",
        store.keys()
    );
    assert_eq!(store.keys(), vec!["t".to_string()]);
}
