//! Where a mount keeps its local state. Each mount has an identity derived from its endpoint,
//! bucket and prefix ([`MountId`]); its staging, spool and recovered data live in a state
//! directory of that name (persistent: `/var/lib/s3mount` for root, `$XDG_STATE_HOME/s3mount`
//! or `~/.local/state/s3mount` otherwise), its control socket in the runtime directory
//! (`/run/s3mount`, `$XDG_RUNTIME_DIR/s3mount`), both created 0700. A lock file in the state
//! directory keeps two live mounts of the same source apart: the second one takes the next
//! free `NAME.2`, `NAME.3`, ... so no mount ever reports another one's live files as left over.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A mount's name among the others on this machine: readable, and unique per source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountId(pub String);

impl MountId {
    /// `HOST_PORT-BUCKET-PREFIX-HASH` with everything but `[A-Za-z0-9._]` turned into `_`; the
    /// hash (of the exact endpoint, bucket and prefix) keeps sources that read alike apart.
    pub fn new(endpoint: Option<&str>, bucket: &str, prefix: &str) -> MountId {
        let host = endpoint
            .map(|e| e.split_once("://").map_or(e, |(_, rest)| rest))
            .map(|e| e.split('/').next().unwrap_or(e))
            .unwrap_or("aws");
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '.' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        let mut name = format!("{}-{}", clean(host), clean(bucket));
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty() {
            name.push('-');
            name.push_str(&clean(prefix));
        }
        name.truncate(100);
        let hash =
            crc32fast::hash(format!("{}\n{bucket}\n{prefix}", endpoint.unwrap_or("")).as_bytes());
        MountId(format!("{name}-{hash:08x}"))
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn env_dir(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
}

fn home() -> PathBuf {
    env_dir("HOME").unwrap_or_else(std::env::temp_dir)
}

/// Persistent per-user state: where staged and recovered data of every mount live.
pub fn state_base() -> PathBuf {
    if let Some(dir) = env_dir("S3MOUNT_STATE_DIR") {
        return dir;
    }
    if is_root() {
        return PathBuf::from("/var/lib/s3mount");
    }
    env_dir("XDG_STATE_HOME")
        .unwrap_or_else(|| home().join(".local/state"))
        .join("s3mount")
}

/// Per-user runtime directory: control sockets of live mounts.
pub fn runtime_base() -> PathBuf {
    if let Some(dir) = env_dir("S3MOUNT_RUNTIME_DIR") {
        return dir;
    }
    if is_root() {
        return PathBuf::from("/run/s3mount");
    }
    match env_dir("XDG_RUNTIME_DIR") {
        Some(d) => d.join("s3mount"),
        // SAFETY: getuid has no preconditions and cannot fail.
        None => std::env::temp_dir().join(format!("s3mount-{}", unsafe { libc::getuid() })),
    }
}

/// Where a background mount logs when there is no syslog and no --log-file.
pub fn log_base() -> PathBuf {
    if let Some(dir) = env_dir("S3MOUNT_LOG_DIR") {
        return dir;
    }
    if is_root() {
        PathBuf::from("/var/log/s3mount")
    } else {
        state_base()
    }
}

/// Create `dir` (and its parents) 0700, or make an existing one 0700 when it is ours.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// A mount's state directory, held (flock) for as long as this value lives.
#[derive(Debug)]
pub struct StateDir {
    pub path: PathBuf,
    _lock: std::fs::File,
}

impl StateDir {
    /// Take `base/ID`, or the first of `base/ID.2`, `.3`, ... no live mount holds, and write
    /// down which source it belongs to (`mount.info`, read back by recovery messages).
    pub fn claim(base: &Path, id: &MountId, about: &str) -> std::io::Result<StateDir> {
        for n in 1..=64 {
            let path = if n == 1 {
                base.join(&id.0)
            } else {
                base.join(format!("{}.{n}", id.0))
            };
            private_dir(&path)?;
            let Some(lock) = crate::data::staging::lock_dir(&path)? else {
                continue;
            };
            let mut info = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(path.join("mount.info"))?;
            std::io::Write::write_all(&mut info, about.as_bytes())?;
            return Ok(StateDir { path, _lock: lock });
        }
        Err(std::io::Error::other(format!(
            "64 live mounts of the same source hold every state directory under {}",
            base.display()
        )))
    }
}

impl StateDir {
    /// Take exactly `path` (a worker started again after a death takes its predecessor's
    /// directory), waiting up to five seconds for the dead process's lock to go.
    pub fn reclaim(path: &Path, about: &str) -> std::io::Result<StateDir> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            private_dir(path)?;
            if let Some(lock) = crate::data::staging::lock_dir(path)? {
                std::fs::write(path.join("mount.info"), about)?;
                return Ok(StateDir {
                    path: path.to_path_buf(),
                    _lock: lock,
                });
            }
            if std::time::Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "{} is held by another live process",
                    path.display()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_readable_and_tell_sources_apart() {
        let a = MountId::new(Some("http://127.0.0.1:3900"), "demo", "logs/2026/");
        assert!(a.0.starts_with("127.0.0.1_3900-demo-logs_2026-"), "{}", a.0);
        assert_eq!(
            a,
            MountId::new(Some("http://127.0.0.1:3900"), "demo", "logs/2026/")
        );
        let b = MountId::new(Some("http://127.0.0.1:3900"), "demo", "logs_2026/");
        assert_ne!(a, b, "same reading, other source");
        assert!(MountId::new(None, "b", "").0.starts_with("aws-b-"));
    }

    #[test]
    fn a_second_live_mount_of_one_source_gets_its_own_state_dir() {
        let base = tempfile::tempdir().unwrap();
        let id = MountId::new(None, "b", "");
        let first = StateDir::claim(base.path(), &id, "one").unwrap();
        let second = StateDir::claim(base.path(), &id, "two").unwrap();
        assert_ne!(first.path, second.path);
        assert_eq!(
            std::fs::metadata(&first.path).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let first_path = first.path.clone();
        drop(first);
        let again = StateDir::claim(base.path(), &id, "three").unwrap();
        assert_eq!(again.path, first_path, "freed by the first mount's end");
        assert_eq!(
            std::fs::read_to_string(again.path.join("mount.info")).unwrap(),
            "three"
        );
    }
}
