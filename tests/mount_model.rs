//! The reference-model test through a real mount (the unit-level one is src/fs/model_tests.rs):
//! a seeded random sequence of file operations runs on the mounted binary and on a plain
//! in-memory model, compared after every read and stat, and the bucket is checked with the
//! independent client after every remount. Several descriptors of one file, unlink and rename
//! while open, truncation, symlinks, directories and remounts are all in the mix.
//! `S3MOUNT_MODEL_SEED=N` replays another sequence; `S3MOUNT_MODEL_STEPS=N` makes it longer.

mod support;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};

use rand::{Rng, SeedableRng};
use support::*;

const NAMES: [&str; 4] = ["a", "b", "c", "d"];

#[derive(Clone, Debug, PartialEq)]
enum Node {
    File(usize),
    Dir,
    Symlink(String),
}

struct Model {
    names: BTreeMap<&'static str, Node>,
    /// Contents and permission bits of files by id (an unlinked file keeps its id while open).
    files: Vec<(Vec<u8>, u32)>,
    /// Open descriptors: (file, file id, writable).
    fds: Vec<(File, usize, bool)>,
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Every name of the model shows as the model says, in the mount.
fn check_mount(m: &Mount, model: &Model, step: &str) {
    for name in NAMES {
        let path = m.join(name);
        let meta = std::fs::symlink_metadata(&path);
        match model.names.get(name) {
            None => assert!(meta.is_err(), "{step}: {name} should not exist"),
            Some(Node::Dir) => assert!(meta.unwrap().is_dir(), "{step}: {name} a directory"),
            Some(Node::Symlink(t)) => {
                assert!(
                    meta.unwrap().file_type().is_symlink(),
                    "{step}: {name} a symlink"
                );
                assert_eq!(
                    std::fs::read_link(&path).unwrap().to_str(),
                    Some(t.as_str())
                );
            }
            Some(Node::File(id)) => {
                let meta = meta.unwrap_or_else(|e| panic!("{step}: stat {name}: {e}"));
                let (content, mode) = &model.files[*id];
                assert_eq!(meta.len(), content.len() as u64, "{step}: size of {name}");
                assert_eq!(meta.mode() & 0o777, *mode, "{step}: mode of {name}");
                let got = std::fs::read(&path).unwrap();
                assert!(got == *content, "{step}: content of {name}");
            }
        }
    }
}

/// What the bucket holds is the model (every descriptor closed).
fn check_bucket(server: &S3Server, bucket: &str, model: &Model, step: &str) {
    for name in NAMES {
        match model.names.get(name) {
            Some(Node::File(id)) => {
                let got = server.get(bucket, name);
                assert!(
                    got.as_deref() == Some(&model.files[*id].0[..]),
                    "{step}: bucket copy of {name}"
                );
            }
            Some(Node::Symlink(t)) => {
                assert_eq!(server.get(bucket, name).as_deref(), Some(t.as_bytes()));
            }
            Some(Node::Dir) | None => {
                assert!(
                    server.get(bucket, name).is_none(),
                    "{step}: no object {name}"
                );
            }
        }
    }
}

#[test]
fn random_operations_match_the_model_through_a_mount() {
    let server = server();
    let bucket = server.new_bucket();
    let seed = env_num("S3MOUNT_MODEL_SEED", 14);
    let steps = env_num("S3MOUNT_MODEL_STEPS", 160);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut m = Mount::new(server, &bucket, &["--metadata-ttl", "1"]);
    let mut model = Model {
        names: BTreeMap::new(),
        files: Vec::new(),
        fds: Vec::new(),
    };
    for i in 0..steps {
        let name = NAMES[rng.gen_range(0..NAMES.len())];
        let path = m.join(name);
        let op = rng.gen_range(0..14);
        let step = format!("seed {seed} step {i} op {op} on {name}");
        match op {
            // Create or replace through a new descriptor that stays open.
            0 | 1 => {
                if matches!(model.names.get(name), Some(Node::Dir | Node::Symlink(_)))
                    || model.fds.len() >= 3
                {
                    continue;
                }
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .unwrap_or_else(|e| panic!("{step}: {e}"));
                let id = match model.names.get(name) {
                    Some(Node::File(id)) => {
                        model.files[*id].0.clear();
                        *id
                    }
                    _ => {
                        // The mode create gave it (0666 less the umask of this process).
                        let mode = f.metadata().map(|m| m.mode() & 0o777).unwrap_or(0o644);
                        model.files.push((Vec::new(), mode));
                        model.files.len() - 1
                    }
                };
                model.names.insert(name, Node::File(id));
                model.fds.push((f, id, true));
            }
            // Open an existing file again (read-only or read-write).
            2 => {
                let Some(Node::File(id)) = model.names.get(name).cloned() else {
                    continue;
                };
                if model.fds.len() >= 3 {
                    continue;
                }
                let writable = rng.gen_bool(0.5);
                let f = OpenOptions::new()
                    .read(true)
                    .write(writable)
                    .open(&path)
                    .unwrap_or_else(|e| panic!("{step}: {e}"));
                model.fds.push((f, id, writable));
            }
            // pwrite through a writable descriptor.
            3 | 4 => {
                let Some(k) = (0..model.fds.len()).find(|k| model.fds[*k].2) else {
                    continue;
                };
                let (off, len) = (rng.gen_range(0..20_000u64), rng.gen_range(1..5_000usize));
                let byte = rng.gen::<u8>();
                let data = vec![byte; len];
                let (f, id, _) = &model.fds[k];
                f.write_all_at(&data, off)
                    .unwrap_or_else(|e| panic!("{step}: {e}"));
                let content = &mut model.files[*id].0;
                let end = off as usize + len;
                if content.len() < end {
                    content.resize(end, 0);
                }
                content[off as usize..end].copy_from_slice(&data);
            }
            // pread through any descriptor.
            5 => {
                if model.fds.is_empty() {
                    continue;
                }
                let k = rng.gen_range(0..model.fds.len());
                let (f, id, _) = &model.fds[k];
                let (off, len) = (rng.gen_range(0..20_000u64), rng.gen_range(1..8_000usize));
                let mut buf = vec![0u8; len];
                let n = f
                    .read_at(&mut buf, off)
                    .unwrap_or_else(|e| panic!("{step}: {e}"));
                let content = &model.files[*id].0;
                let start = (off as usize).min(content.len());
                let end = (off as usize + len).min(content.len());
                assert!(buf[..n] == content[start..end], "{step}: pread differs");
            }
            // ftruncate.
            6 => {
                let Some(k) = (0..model.fds.len()).find(|k| model.fds[*k].2) else {
                    continue;
                };
                let size = rng.gen_range(0..20_000u64);
                let (f, id, _) = &model.fds[k];
                f.set_len(size).unwrap_or_else(|e| panic!("{step}: {e}"));
                model.files[*id].0.resize(size as usize, 0);
            }
            // close one descriptor (durable at close).
            7 => {
                if model.fds.is_empty() {
                    continue;
                }
                let k = rng.gen_range(0..model.fds.len());
                let (mut f, _, writable) = model.fds.remove(k);
                if writable {
                    f.flush().unwrap();
                    f.sync_all()
                        .unwrap_or_else(|e| panic!("{step}: fsync: {e}"));
                }
                drop(f);
            }
            // unlink (also of an open file).
            8 => match model.names.get(name) {
                Some(Node::File(_) | Node::Symlink(_)) => {
                    std::fs::remove_file(&path).unwrap_or_else(|e| panic!("{step}: {e}"));
                    model.names.remove(name);
                }
                _ => continue,
            },
            // rename (also of an open file), never over an open file or a directory.
            9 => {
                let to = NAMES[rng.gen_range(0..NAMES.len())];
                let (Some(src), dst) = (model.names.get(name).cloned(), model.names.get(to)) else {
                    continue;
                };
                let open_target =
                    matches!(dst, Some(Node::File(id)) if model.fds.iter().any(|f| f.1 == *id));
                if src == Node::Dir || matches!(dst, Some(Node::Dir)) || open_target || to == name {
                    continue;
                }
                std::fs::rename(&path, m.join(to)).unwrap_or_else(|e| panic!("{step}: {e}"));
                model.names.remove(name);
                model.names.insert(to, src);
            }
            // mkdir / rmdir.
            10 => match model.names.get(name) {
                None => {
                    std::fs::create_dir(&path).unwrap_or_else(|e| panic!("{step}: {e}"));
                    model.names.insert(name, Node::Dir);
                }
                Some(Node::Dir) => {
                    std::fs::remove_dir(&path).unwrap_or_else(|e| panic!("{step}: {e}"));
                    model.names.remove(name);
                }
                _ => continue,
            },
            // chmod.
            11 => {
                let Some(Node::File(id)) = model.names.get(name).cloned() else {
                    continue;
                };
                let mode = rng.gen_range(0o400..0o777u32) | 0o600;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    .unwrap_or_else(|e| panic!("{step}: {e}"));
                model.files[id].1 = mode;
            }
            // symlink.
            12 => {
                if model.names.contains_key(name) {
                    continue;
                }
                let target = format!("target-{i}");
                std::os::unix::fs::symlink(&target, &path)
                    .unwrap_or_else(|e| panic!("{step}: {e}"));
                model.names.insert(name, Node::Symlink(target));
            }
            // remount: every descriptor closed, the bucket holds the model, a new mount sees it.
            _ => {
                for (f, _, _) in model.fds.drain(..) {
                    drop(f);
                }
                check_mount(&m, &model, &step);
                drop(m);
                check_bucket(server, &bucket, &model, &step);
                m = Mount::new(server, &bucket, &["--metadata-ttl", "1"]);
            }
        }
        // Names are checked when no descriptor is open (reads through stat and a new open).
        if model.fds.is_empty() {
            check_mount(&m, &model, &step);
        }
    }
    for (f, _, _) in model.fds.drain(..) {
        drop(f);
    }
    check_mount(&m, &model, "end");
    drop(m);
    check_bucket(server, &bucket, &model, "end");
    assert!(server.open_uploads(&bucket).is_empty());
}
