//! The filesystem against a reference model (the idea of Mountpoint's reftests): random
//! sequences of operations run on [`Fs`] over the mock store and on a plain in-memory model of
//! a directory tree, compared after every step; a failure is shrunk to a minimal sequence.
//!
//! The model is what POSIX promises: files with contents and modes, directories, symlinks and
//! FIFOs under names; descriptors that refer to a file (not a name), so a file renamed or
//! unlinked while open goes on being read and written through them; several descriptors of
//! one file see one content. `Remount` closes every descriptor and starts a new `Fs` on the
//! same bucket, so everything must have reached the store. `S3MOUNT_MODEL_CASES` runs more
//! cases than the fixed-seed default.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::store::mock::MockStore;

const NAMES: [&str; 4] = ["a", "b", "c", "d"];

#[derive(Clone, Debug)]
enum Op {
    Create(usize),
    Open {
        name: usize,
        write: bool,
        trunc: bool,
    },
    Write {
        fd: usize,
        offset: u16,
        len: u16,
        byte: u8,
    },
    Read {
        fd: usize,
        offset: u16,
        len: u16,
    },
    Truncate {
        fd: usize,
        size: u16,
    },
    Fsync(usize),
    Close(usize),
    Unlink(usize),
    Rename(usize, usize),
    Mkdir(usize),
    Rmdir(usize),
    Chmod(usize, u16),
    Symlink(usize),
    Mkfifo(usize),
    Stat(usize),
    Remount,
}

fn op() -> impl Strategy<Value = Op> {
    let name = 0..NAMES.len();
    let fd = 0usize..4;
    prop_oneof![
        3 => name.clone().prop_map(Op::Create),
        3 => (name.clone(), any::<bool>(), prop::bool::weighted(0.2))
            .prop_map(|(name, write, trunc)| Op::Open { name, write, trunc }),
        6 => (fd.clone(), 0u16..20_000, 1u16..6_000, any::<u8>())
            .prop_map(|(fd, offset, len, byte)| Op::Write { fd, offset, len, byte }),
        4 => (fd.clone(), 0u16..20_000, 1u16..8_000)
            .prop_map(|(fd, offset, len)| Op::Read { fd, offset, len }),
        1 => (fd.clone(), 0u16..20_000).prop_map(|(fd, size)| Op::Truncate { fd, size }),
        1 => fd.clone().prop_map(Op::Fsync),
        3 => fd.prop_map(Op::Close),
        2 => name.clone().prop_map(Op::Unlink),
        2 => (name.clone(), name.clone()).prop_map(|(a, b)| Op::Rename(a, b)),
        1 => name.clone().prop_map(Op::Mkdir),
        1 => name.clone().prop_map(Op::Rmdir),
        1 => (name.clone(), 0u16..0o1000).prop_map(|(n, m)| Op::Chmod(n, m)),
        1 => name.clone().prop_map(Op::Symlink),
        1 => name.clone().prop_map(Op::Mkfifo),
        2 => name.prop_map(Op::Stat),
        1 => Just(Op::Remount),
    ]
}

#[derive(Clone, Debug, PartialEq)]
enum Node {
    /// A file: the index of its content in `Model::files`.
    File(usize),
    Dir,
    Symlink(String),
    Fifo,
}

#[derive(Default)]
struct Model {
    names: BTreeMap<&'static str, Node>,
    /// Contents and modes of files, by id (an unlinked file keeps its id while open).
    files: Vec<(Vec<u8>, u32)>,
    /// Open descriptors: (fh, file id, ino, writable).
    fds: Vec<(u64, usize, u64, bool)>,
}

struct Harness {
    store: Arc<MockStore>,
    fs: Fs,
    model: Model,
}

impl Harness {
    fn new() -> Self {
        let store = Arc::new(MockStore::new());
        let fs = Fs::new(store.clone(), super::tests::test_config(""));
        Harness {
            store,
            fs,
            model: Model::default(),
        }
    }

    async fn ino(&self, name: &str) -> FsResult<Attr> {
        self.fs.lookup(ROOT_INO, name.as_bytes()).await
    }

    fn open_fd_of(&self, id: usize) -> bool {
        self.model.fds.iter().any(|f| f.1 == id)
    }

    async fn close_all(&mut self) {
        for (fh, ..) in std::mem::take(&mut self.model.fds) {
            self.fs.flush(fh).await.expect("flush");
            self.fs.release(fh).await.expect("release");
        }
    }

    async fn step(&mut self, op: &Op) {
        let ctx = format!("{op:?}");
        match *op {
            Op::Create(n) => {
                let name = NAMES[n];
                if self.model.names.contains_key(name) {
                    return;
                }
                let (attr, fh) = self
                    .fs
                    .create(ROOT_INO, name.as_bytes(), 0o644, libc::O_RDWR, tests::ME)
                    .await
                    .expect(&ctx);
                self.model.files.push((Vec::new(), 0o644));
                let id = self.model.files.len() - 1;
                self.model.names.insert(name, Node::File(id));
                self.model.fds.push((fh, id, attr.ino, true));
            }
            Op::Open { name, write, trunc } => {
                let name = NAMES[name];
                let Some(Node::File(id)) = self.model.names.get(name).cloned() else {
                    return;
                };
                if self.model.fds.len() >= 4 {
                    return;
                }
                let attr = self.ino(name).await.expect(&ctx);
                let mut flags = if write { libc::O_RDWR } else { libc::O_RDONLY };
                if trunc && write {
                    flags |= libc::O_TRUNC;
                    self.model.files[id].0.clear();
                }
                let (fh, _) = self.fs.open(attr.ino, flags).await.expect(&ctx);
                self.model.fds.push((fh, id, attr.ino, write));
            }
            Op::Write {
                fd,
                offset,
                len,
                byte,
            } => {
                let Some(&(fh, id, _, true)) = self.model.fds.get(fd) else {
                    return;
                };
                let data = vec![byte; len as usize];
                let n = self.fs.write(fh, offset as i64, &data).await.expect(&ctx);
                assert_eq!(n as usize, data.len(), "{ctx}");
                let content = &mut self.model.files[id].0;
                let end = offset as usize + data.len();
                if content.len() < end {
                    content.resize(end, 0);
                }
                content[offset as usize..end].copy_from_slice(&data);
            }
            Op::Read { fd, offset, len } => {
                let Some(&(fh, id, ..)) = self.model.fds.get(fd) else {
                    return;
                };
                let got = self
                    .fs
                    .read(fh, offset as i64, len as u32)
                    .await
                    .expect(&ctx);
                let content = &self.model.files[id].0;
                let start = (offset as usize).min(content.len());
                let end = (offset as usize + len as usize).min(content.len());
                assert!(got[..] == content[start..end], "{ctx}: read differs");
            }
            Op::Truncate { fd, size } => {
                let Some(&(fh, id, ino, true)) = self.model.fds.get(fd) else {
                    return;
                };
                let req = SetAttr {
                    size: Some(size as u64),
                    ..Default::default()
                };
                let attr = self.fs.setattr(ino, Some(fh), req).await.expect(&ctx);
                assert_eq!(attr.size, size as u64, "{ctx}");
                self.model.files[id].0.resize(size as usize, 0);
            }
            Op::Fsync(fd) => {
                if let Some(&(fh, ..)) = self.model.fds.get(fd) {
                    self.fs.fsync(fh).await.expect(&ctx);
                }
            }
            Op::Close(fd) => {
                if fd < self.model.fds.len() {
                    let (fh, ..) = self.model.fds.remove(fd);
                    self.fs.flush(fh).await.expect(&ctx);
                    self.fs.release(fh).await.expect(&ctx);
                }
            }
            Op::Unlink(n) => {
                let name = NAMES[n];
                let r = self.fs.unlink(ROOT_INO, name.as_bytes()).await;
                match self.model.names.get(name) {
                    None => assert_eq!(r, Err(Errno::ENOENT), "{ctx}"),
                    Some(Node::Dir) => assert_eq!(r, Err(Errno::EISDIR), "{ctx}"),
                    Some(_) => {
                        r.expect(&ctx);
                        self.model.names.remove(name);
                    }
                }
            }
            Op::Rename(a, b) => {
                let (from, to) = (NAMES[a], NAMES[b]);
                let (Some(src), target) = (
                    self.model.names.get(from).cloned(),
                    self.model.names.get(to).cloned(),
                ) else {
                    return;
                };
                // A directory only onto nothing; nothing onto a file that is open (its
                // descriptors would go on with the replaced file: not modelled).
                match (&src, &target) {
                    (Node::Dir, Some(_)) | (_, Some(Node::Dir)) => return,
                    (_, Some(Node::File(id))) if self.open_fd_of(*id) => return,
                    _ => {}
                }
                self.fs
                    .rename(ROOT_INO, from.as_bytes(), ROOT_INO, to.as_bytes(), 0)
                    .await
                    .expect(&ctx);
                if from != to {
                    self.model.names.remove(from);
                    self.model.names.insert(to, src);
                }
            }
            Op::Mkdir(n) => {
                let name = NAMES[n];
                // The kernel answers EEXIST itself (it looked the name up first).
                if self.model.names.contains_key(name) {
                    return;
                }
                self.fs
                    .mkdir(ROOT_INO, name.as_bytes(), 0o755, tests::ME)
                    .await
                    .expect(&ctx);
                self.model.names.insert(name, Node::Dir);
            }
            Op::Rmdir(n) => {
                let name = NAMES[n];
                let r = self.fs.rmdir(ROOT_INO, name.as_bytes()).await;
                match self.model.names.get(name) {
                    Some(Node::Dir) => {
                        r.expect(&ctx);
                        self.model.names.remove(name);
                    }
                    None => assert_eq!(r, Err(Errno::ENOENT), "{ctx}"),
                    Some(_) => assert_eq!(r, Err(Errno::ENOTDIR), "{ctx}"),
                }
            }
            Op::Chmod(n, mode) => {
                let name = NAMES[n];
                let Some(Node::File(id)) = self.model.names.get(name).cloned() else {
                    return;
                };
                let attr = self.ino(name).await.expect(&ctx);
                let req = SetAttr {
                    mode: Some(mode as u32),
                    ..Default::default()
                };
                let a = self.fs.setattr(attr.ino, None, req).await.expect(&ctx);
                assert_eq!(a.perm as u32, mode as u32, "{ctx}");
                self.model.files[id].1 = mode as u32;
            }
            Op::Symlink(n) => {
                let name = NAMES[n];
                if self.model.names.contains_key(name) {
                    return;
                }
                let target = format!("target-of-{name}");
                self.fs
                    .symlink(ROOT_INO, name.as_bytes(), target.as_bytes(), tests::ME)
                    .await
                    .expect(&ctx);
                self.model.names.insert(name, Node::Symlink(target));
            }
            Op::Mkfifo(n) => {
                let name = NAMES[n];
                if self.model.names.contains_key(name) {
                    return;
                }
                self.fs
                    .mknod(
                        ROOT_INO,
                        name.as_bytes(),
                        attrs::S_IFIFO | 0o600,
                        0,
                        tests::ME,
                    )
                    .await
                    .expect(&ctx);
                self.model.names.insert(name, Node::Fifo);
            }
            Op::Stat(n) => self.check_name(NAMES[n], &ctx).await,
            Op::Remount => {
                self.close_all().await;
                self.fs = Fs::new(self.store.clone(), super::tests::test_config(""));
                for name in NAMES {
                    self.check_name(name, &ctx).await;
                }
            }
        }
    }

    /// What a lookup of `name` says matches the model (for a file: size, mode and, when no
    /// descriptor has it open, its bytes read through a new descriptor).
    async fn check_name(&self, name: &str, ctx: &str) {
        let got = self.ino(name).await;
        let Some(node) = self.model.names.get(name) else {
            assert_eq!(
                got.map(|a| a.kind),
                Err(Errno::ENOENT),
                "{ctx}: {name} should not exist"
            );
            return;
        };
        let attr = got.unwrap_or_else(|e| panic!("{ctx}: lookup {name}: {e:?}"));
        let attr = self.fs.getattr(attr.ino).await.expect(ctx);
        match node {
            Node::Dir => assert_eq!(attr.kind, Kind::Dir, "{ctx}: {name}"),
            Node::Fifo => assert_eq!(attr.kind, Kind::Special(attrs::S_IFIFO), "{ctx}: {name}"),
            Node::Symlink(target) => {
                assert_eq!(attr.kind, Kind::Symlink, "{ctx}: {name}");
                let t = self.fs.readlink(attr.ino).await.expect(ctx);
                assert_eq!(&t[..], target.as_bytes(), "{ctx}: {name}");
            }
            Node::File(id) => {
                let (content, mode) = &self.model.files[*id];
                assert_eq!(attr.kind, Kind::File, "{ctx}: {name}");
                assert_eq!(attr.size, content.len() as u64, "{ctx}: size of {name}");
                assert_eq!(attr.perm as u32, *mode, "{ctx}: mode of {name}");
                let (fh, _) = self.fs.open(attr.ino, libc::O_RDONLY).await.expect(ctx);
                let got = self.fs.read(fh, 0, 1 << 20).await.expect(ctx);
                self.fs.release(fh).await.expect(ctx);
                assert!(got[..] == content[..], "{ctx}: content of {name}");
            }
        }
    }
}

fn run(ops: &[Op]) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut h = Harness::new();
        for op in ops {
            h.step(op).await;
        }
        h.step(&Op::Remount).await;
        assert_eq!(h.store.open_uploads(), 0, "multipart uploads left open");
    });
}

/// `S3MOUNT_MODEL_CASES=N` runs N cases from a random seed; by default a fixed number from a
/// fixed seed, so CI runs the same sequences every time.
fn cases() -> u32 {
    std::env::var("S3MOUNT_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn seed() -> proptest::test_runner::RngSeed {
    match std::env::var("S3MOUNT_MODEL_CASES") {
        Ok(_) => proptest::test_runner::RngSeed::Random,
        Err(_) => proptest::test_runner::RngSeed::Fixed(0x0053_336d_6f75_6e74),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        rng_algorithm: proptest::test_runner::RngAlgorithm::ChaCha,
        rng_seed: seed(),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_filesystem_behaves_like_the_model(ops in prop::collection::vec(op(), 1..40)) {
        run(&ops);
    }
}
