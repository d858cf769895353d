//! What `s3mount status` and the metrics gauges report about the filesystem: files open for
//! writing and how far their uploads are, commits that failed since the mount, memory and
//! cache use, the store capabilities detected. A snapshot: it waits for no lock a write holds
//! (a file busy at that moment is reported as such).

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::write::Body;
use super::Fs;

/// A commit that failed for good (its data is kept locally, as the log said).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailedCommit {
    pub key: String,
    pub error: String,
    /// Where the bytes written are kept, when that is known here.
    pub kept: Option<String>,
    /// When, in seconds since the epoch.
    pub at: u64,
}

impl FailedCommit {
    pub fn now(key: &str, error: String, kept: Option<String>) -> FailedCommit {
        FailedCommit {
            key: key.to_string(),
            error,
            kept,
            at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}

/// One file open for writing.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OpenFileStatus {
    pub key: String,
    /// clean, streaming, staged, orphan, failed, or busy (a write or commit held it).
    pub state: String,
    pub descriptors: usize,
    /// Bytes written through the mount and not yet committed (streaming and staged files).
    pub pending_bytes: u64,
    /// Of those, bytes whose parts the store has acknowledged (streaming files).
    pub uploaded_bytes: u64,
    /// Upload rate since the first byte, bytes a second (streaming files).
    pub upload_rate: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FsStatus {
    pub open_files: Vec<OpenFileStatus>,
    pub failed_commits: Vec<FailedCommit>,
    pub budget_used: u64,
    pub budget_limit: u64,
    pub memory_cache_bytes: u64,
    pub disk_cache_blocks: Option<usize>,
    pub disk_cache_bytes: Option<u64>,
    pub checksums: bool,
    pub conditional_writes: bool,
    pub staging_dir: String,
    pub staged_files: u64,
    pub staged_bytes: u64,
    /// Uploads `--write-back` queued after close that have not finished.
    pub write_back_pending: usize,
}

impl Fs {
    /// A snapshot for `s3mount status` (see the module doc).
    pub fn status(&self) -> FsStatus {
        let mut open_files: Vec<OpenFileStatus> = self
            .open_files
            .all()
            .into_iter()
            .map(|(file, descriptors)| {
                let key = self
                    .inodes
                    .lock()
                    .get(file.ino)
                    .map(|i| i.key.clone())
                    .unwrap_or_default();
                let Ok(st) = file.state.try_lock() else {
                    return OpenFileStatus {
                        key,
                        state: "busy".into(),
                        descriptors,
                        pending_bytes: 0,
                        uploaded_bytes: 0,
                        upload_rate: 0,
                    };
                };
                let (state, pending_bytes, uploaded_bytes, upload_rate) = match &st.body {
                    Body::Clean => ("clean", 0, 0, 0),
                    Body::Streaming(u) => {
                        let (written, uploaded, secs) = u.progress();
                        let rate = if secs > 0.0 {
                            (uploaded as f64 / secs) as u64
                        } else {
                            0
                        };
                        ("streaming", written, uploaded, rate)
                    }
                    Body::Staged(f) => ("staged", f.changed_bytes(), 0, 0),
                    Body::Orphan(_) => ("orphan", 0, 0, 0),
                    Body::Failed(_) => ("failed", 0, 0, 0),
                };
                OpenFileStatus {
                    key: st.key.clone(),
                    state: state.into(),
                    descriptors,
                    pending_bytes,
                    uploaded_bytes,
                    upload_rate,
                }
            })
            .collect();
        open_files.sort_by(|a, b| a.key.cmp(&b.key));
        let (staged_files, staged_bytes) = dir_usage(&self.cfg.staging_dir);
        let disk = self.cache.disk_usage();
        FsStatus {
            open_files,
            failed_commits: self.failures.lock().clone(),
            budget_used: self.budget.used(),
            budget_limit: self.cfg.max_memory,
            memory_cache_bytes: self.cache.memory_used(),
            disk_cache_blocks: disk.map(|(n, _)| n),
            disk_cache_bytes: disk.map(|(_, b)| b),
            checksums: self.caps.checksums(),
            conditional_writes: self.caps.conditional(),
            staging_dir: self.cfg.staging_dir.display().to_string(),
            staged_files,
            staged_bytes,
            write_back_pending: self.write_back_pending(),
        }
    }

    /// The gauges the metrics sampler sets every second.
    pub fn gauges(&self) -> crate::metrics::Gauges {
        let s = self.status();
        crate::metrics::Gauges {
            budget_used: s.budget_used,
            budget_limit: s.budget_limit,
            uploads_in_flight: s.open_files.iter().filter(|f| f.pending_bytes > 0).count() as u64,
            upload_bytes_pending: s
                .open_files
                .iter()
                .map(|f| f.pending_bytes.saturating_sub(f.uploaded_bytes))
                .sum(),
            staged_files: s.staged_files,
            staged_bytes: s.staged_bytes,
        }
    }

    /// Keys of the files open for writing (the "mount busy" message names them).
    pub fn open_keys(&self) -> Vec<String> {
        self.status()
            .open_files
            .into_iter()
            .map(|f| f.key)
            .collect()
    }
}

/// Files and bytes under `dir` (one level of subdirectories: recovered/, spool/), leaving out
/// the state directory's own lock and mount.info.
fn dir_usage(dir: &std::path::Path) -> (u64, u64) {
    let mut files = 0;
    let mut bytes = 0;
    for d in [dir.to_path_buf(), dir.join("recovered"), dir.join("spool")] {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            if name == "lock" || name == "mount.info" {
                continue;
            }
            if let Ok(m) = e.metadata() {
                if m.is_file() {
                    files += 1;
                    bytes += m.len();
                }
            }
        }
    }
    (files, bytes)
}
