//! Appending large amounts of bytes to a local file without the page cache.
//!
//! A streamed upload keeps a local copy of what it ships (the spool, up to `--spool-limit`) and
//! writes parts larger than a quarter of the budget to disk (the spill). Through the page
//! cache, every GiB of that cost the daemon about 2 CPU-seconds (new page-cache pages and the
//! filesystem's block allocation; measured with `dd` here: 2.2 s of system time for 1 GiB
//! into a new ext4 file, 0.24 s with `oflag=direct`), more than the upload itself. A
//! [`DirectAppender`] writes whole 4 KiB blocks with `O_DIRECT` from an aligned bounce buffer,
//! keeps the last partial block in memory, and writes it through the page cache when asked
//! ([`DirectAppender::flush_tail`]); the first MiB of a file goes through the page cache too
//! (for a small file, waiting for the device on every write costs more than the copy). The
//! file only ever holds bytes that were appended, so a process killed at any point leaves a
//! prefix of them. A filesystem that refuses `O_DIRECT`
//! (at open or at the first write) gets ordinary writes, with the same results.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Alignment of offsets, lengths and buffer addresses for `O_DIRECT` (every common device's
/// logical block size divides it).
const BLOCK: usize = 4096;
/// Bytes copied into the bounce buffer per write at most.
const CHUNK: usize = 1 << 20;
/// The first bytes of a file go through the page cache: an `O_DIRECT` write waits for the
/// device, which for small files (a supervised mount keeps each write local before it
/// returns; `cp -r` of 4 KiB files) costs more than the copy it saves (measured: `cp -r` of
/// 1,000 files of 4 KiB, 3.98-4.13 s all direct against 3.54-3.60 s unsupervised).
const BUFFERED_UP_TO: u64 = 1 << 20;

pub struct DirectAppender {
    file: File,
    path: PathBuf,
    /// `file` was opened with `O_DIRECT` (until a write refuses it).
    direct: bool,
    /// Bytes appended so far (the file's length once the tail is flushed).
    len: u64,
    /// The bytes after the last block boundary, not written yet when `direct`.
    tail: Vec<u8>,
    /// The tail as it is in the file: written since it last changed.
    tail_flushed: bool,
    /// Room for an aligned bounce buffer, kept from one append to the next.
    bounce: Vec<u8>,
    /// The same file without `O_DIRECT`, for the tail (opened at the first flush).
    plain: Option<File>,
}

impl DirectAppender {
    /// Create `path` (it must not exist), mode 0600.
    pub fn create(path: &Path) -> io::Result<DirectAppender> {
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        let (file, direct) = match direct {
            Ok(f) => (f, true),
            // tmpfs before Linux 6.6 and some FUSE filesystems refuse O_DIRECT at open (the
            // file may have been made before the refusal).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(path)?;
                (f, false)
            }
            Err(e) => return Err(e),
        };
        Ok(DirectAppender {
            file,
            path: path.to_path_buf(),
            direct,
            len: 0,
            tail: Vec::new(),
            tail_flushed: true,
            bounce: Vec::new(),
            plain: None,
        })
    }

    /// Bytes appended so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append `data`. Every whole block is in the file on return; the last partial block is
    /// only after [`Self::flush_tail`].
    pub fn append(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if !self.direct {
            self.file.write_all_at(data, self.len)?;
            self.len += data.len() as u64;
            return Ok(());
        }
        if self.len + data.len() as u64 <= BUFFERED_UP_TO {
            let at = self.len;
            self.plain()?.write_all_at(data, at)?;
            // The partial last block stays known: the first direct write rewrites it whole.
            let total = self.tail.len() + data.len();
            self.tail = self.joined(data, total / BLOCK * BLOCK);
            self.len += data.len() as u64;
            self.tail_flushed = true;
            return Ok(());
        }
        let start = self.len - self.tail.len() as u64;
        let total = self.tail.len() + data.len();
        let whole = total / BLOCK * BLOCK;
        // An aligned bounce buffer, grown to what this call needs and kept for the next.
        let want = whole.clamp(BLOCK, CHUNK) + BLOCK;
        if self.bounce.len() < want {
            self.bounce = vec![0u8; want];
        }
        let mut raw = std::mem::take(&mut self.bounce);
        let off = raw.as_ptr().align_offset(BLOCK);
        let bounce = &mut raw[off..off + whole.clamp(BLOCK, CHUNK)];
        let mut done = 0;
        while done < whole {
            let n = (whole - done).min(CHUNK);
            // Bytes [done, done + n) of tail ++ data.
            for (i, slot) in bounce[..n].chunks_mut(BLOCK).enumerate() {
                fill(slot, &self.tail, data, done + i * BLOCK);
            }
            if let Err(e) = self.file.write_all_at(&bounce[..n], start + done as u64) {
                if e.raw_os_error() == Some(libc::EINVAL) {
                    let rest = self.joined(data, done);
                    return self.without_direct(start + done as u64, &rest);
                }
                return Err(e);
            }
            done += n;
        }
        self.bounce = raw;
        let rest = self.joined(data, whole);
        self.tail = rest;
        self.len = start + total as u64;
        self.tail_flushed = self.tail.is_empty();
        Ok(())
    }

    /// Write the last partial block, so the file holds every byte appended. It goes through
    /// the page cache (a second descriptor without `O_DIRECT`), exactly its bytes: the file is
    /// never longer than what was appended, even for a process killed in the middle (a padded
    /// `O_DIRECT` block cut back afterwards would leave zeros past the end to whoever takes the
    /// file over, as a restarted `--supervise` worker does). The next append that completes
    /// the block writes it again with `O_DIRECT` (the kernel writes the cached page back first).
    pub fn flush_tail(&mut self) -> io::Result<()> {
        if self.tail_flushed || !self.direct {
            return Ok(());
        }
        let at = self.len - self.tail.len() as u64;
        let tail = std::mem::take(&mut self.tail);
        let written = self.plain().and_then(|f| f.write_all_at(&tail, at));
        self.tail = tail;
        written?;
        self.tail_flushed = true;
        Ok(())
    }

    /// The file without `O_DIRECT` (opened at first use).
    fn plain(&mut self) -> io::Result<&File> {
        if self.plain.is_none() {
            self.plain = Some(std::fs::OpenOptions::new().write(true).open(&self.path)?);
        }
        Ok(self.plain.as_ref().expect("opened above"))
    }

    /// Bytes from `from` on of tail ++ data.
    fn joined(&self, data: &[u8], from: usize) -> Vec<u8> {
        let t = self.tail.len();
        let mut v = Vec::with_capacity(t + data.len() - from.min(t + data.len()));
        if from < t {
            v.extend_from_slice(&self.tail[from..]);
            v.extend_from_slice(data);
        } else {
            v.extend_from_slice(&data[from - t..]);
        }
        v
    }

    /// The filesystem took O_DIRECT at open but refuses its writes: reopen without it and
    /// write `rest` at `at` (everything before `at` is in the file).
    fn without_direct(&mut self, at: u64, rest: &[u8]) -> io::Result<()> {
        self.file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)?;
        self.direct = false;
        self.tail.clear();
        self.tail_flushed = true;
        self.file.write_all_at(rest, at)?;
        self.len = at + rest.len() as u64;
        self.file.set_len(self.len)
    }
}

/// Fill `slot` with bytes `[from, from + slot.len())` of `a` followed by `b`.
fn fill(slot: &mut [u8], a: &[u8], b: &[u8], from: usize) {
    let mut filled = 0;
    if from < a.len() {
        let n = (a.len() - from).min(slot.len());
        slot[..n].copy_from_slice(&a[from..from + n]);
        filled = n;
    }
    if filled < slot.len() {
        let bfrom = from + filled - a.len();
        let n = slot.len() - filled;
        slot[filled..].copy_from_slice(&b[bfrom..bfrom + n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends of awkward sizes, the tail flushed at some points and not others: the file is
    /// always the bytes appended (after a flush), on a filesystem with O_DIRECT and without.
    #[test]
    fn appends_of_any_size_make_the_same_file() {
        let dirs = [
            tempfile::tempdir().unwrap(),
            tempfile::tempdir_in("/dev/shm").unwrap(),
        ];
        for dir in &dirs {
            let path = dir.path().join("spool");
            let mut a = DirectAppender::create(&path).unwrap();
            let mut want = Vec::new();
            let mut x = 7u64;
            for (i, size) in [1, 4095, 1, 4096, 10_000, 3 << 20, 5, 0, 8191, 1 << 20]
                .into_iter()
                .enumerate()
            {
                let chunk: Vec<u8> = (0..size)
                    .map(|_| {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                        (x >> 33) as u8
                    })
                    .collect();
                a.append(&chunk).unwrap();
                want.extend_from_slice(&chunk);
                assert_eq!(a.len(), want.len() as u64);
                // Never a padded block: at every point the file is a prefix of the bytes.
                let on_disk = std::fs::read(&path).unwrap();
                assert!(want.starts_with(&on_disk), "prefix after append {i}");
                if i % 2 == 0 {
                    a.flush_tail().unwrap();
                    assert!(std::fs::read(&path).unwrap() == want, "after append {i}");
                    // The next append rewrites the flushed tail's block with O_DIRECT.
                    a.append(&[0xA5]).unwrap();
                    want.push(0xA5);
                    assert!(want.starts_with(&std::fs::read(&path).unwrap()));
                }
            }
            a.flush_tail().unwrap();
            assert!(std::fs::read(&path).unwrap() == want);
            // Flushing twice changes nothing.
            a.flush_tail().unwrap();
            assert_eq!(std::fs::metadata(&path).unwrap().len(), want.len() as u64);
        }
    }

    #[test]
    fn create_refuses_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        std::fs::write(&path, b"keep").unwrap();
        assert!(DirectAppender::create(&path).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
    }
}
