//! POSIX attributes from object metadata, compatible with s3fs's `x-amz-meta-*` headers:
//! `mode` is a decimal st_mode with type bits (0100644 = 33188), `uid`/`gid` decimal,
//! `mtime`/`ctime`/`atime` as `sec` or `sec.nnnnnnnnn`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::store::ObjectMeta;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A FIFO, socket or device node, stored as s3fs stores them: an empty object whose
    /// `mode` carries the type (these bits of st_mode) and whose `rdev` the device number.
    Special(u32),
}

impl Kind {
    /// The S_IFMT bits of this kind.
    pub fn type_bits(self) -> u32 {
        match self {
            Kind::File => S_IFREG,
            Kind::Dir => S_IFDIR,
            Kind::Symlink => S_IFLNK,
            Kind::Special(bits) => bits,
        }
    }

    /// Anything but a directory is a non-directory (rename, unlink and rmdir rules).
    pub fn is_dir(self) -> bool {
        self == Kind::Dir
    }
}

/// The attributes the filesystem reports for one inode (fuse.rs turns them into FileAttr).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    /// Permission bits only (0o7777).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    pub atime: SystemTime,
    pub ctime: SystemTime,
    pub nlink: u32,
    /// Device number of a device node (`x-amz-meta-rdev`), 0 otherwise.
    pub rdev: u32,
}

/// Owner and modes for objects that carry no metadata of their own.
#[derive(Clone, Copy, Debug)]
pub struct AttrDefaults {
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub dir_mode: u16,
    /// Time shown for directories without a marker object.
    pub mount_time: SystemTime,
}

pub const S_IFMT: u32 = 0o170000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFIFO: u32 = 0o010000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFBLK: u32 = 0o060000;
pub const S_IFSOCK: u32 = 0o140000;

/// Parse `sec` or `sec.frac` (s3fs writes nanoseconds; any fraction length is accepted).
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    let (sec, frac) = match s.split_once('.') {
        Some((a, b)) => (a, b),
        None => (s, ""),
    };
    let sec: i64 = sec.parse().ok()?;
    let nanos: u32 = if frac.is_empty() {
        0
    } else {
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let mut digits: String = frac.chars().take(9).collect();
        while digits.len() < 9 {
            digits.push('0');
        }
        digits.parse().ok()?
    };
    if sec >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(sec as u64, nanos))
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(sec.unsigned_abs()))?
            .checked_add(Duration::from_nanos(nanos as u64))
    }
}

pub fn format_time(t: SystemTime) -> String {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) if d.subsec_nanos() == 0 => d.as_secs().to_string(),
        Ok(d) => format!("{}.{:09}", d.as_secs(), d.subsec_nanos()),
        Err(e) => format!("-{}", e.duration().as_secs()),
    }
}

/// The st_mode stored in `x-amz-meta-mode`, if present and sane.
pub fn stored_mode(meta: &ObjectMeta) -> Option<u32> {
    let m: u32 = meta.metadata.get("mode")?.trim().parse().ok()?;
    (m <= 0o177777).then_some(m)
}

/// The kind an object's metadata declares (a symlink is a file whose mode says S_IFLNK).
pub fn kind_from_meta(meta: &ObjectMeta) -> Option<Kind> {
    match stored_mode(meta)? & S_IFMT {
        S_IFLNK => Some(Kind::Symlink),
        S_IFDIR => Some(Kind::Dir),
        S_IFREG | 0 => Some(Kind::File),
        bits @ (S_IFIFO | S_IFCHR | S_IFBLK | S_IFSOCK) => Some(Kind::Special(bits)),
        _ => None,
    }
}

/// Is this object a directory by Content-Type (how s3fs marks `dir` objects without a slash)?
pub fn is_directory_content_type(meta: &ObjectMeta) -> bool {
    meta.content_type
        .as_deref()
        .is_some_and(|c| c.starts_with("application/x-directory"))
}

/// Build attributes for an object (or a directory marker) using stored metadata where present.
pub fn attr_from_meta(ino: u64, kind: Kind, meta: Option<&ObjectMeta>, d: &AttrDefaults) -> Attr {
    let default_perm = if kind == Kind::Dir {
        d.dir_mode
    } else {
        d.file_mode
    };
    let (mut perm, mut uid, mut gid) = (default_perm, d.uid, d.gid);
    let mut mtime = d.mount_time;
    let mut ctime = None;
    let mut atime = None;
    let mut size = 0;
    let mut rdev = 0;
    if let Some(m) = meta {
        if let Some(mode) = stored_mode(m) {
            perm = (mode & 0o7777) as u16;
        }
        if let Some(u) = m.metadata.get("uid").and_then(|v| v.trim().parse().ok()) {
            uid = u;
        }
        if let Some(g) = m.metadata.get("gid").and_then(|v| v.trim().parse().ok()) {
            gid = g;
        }
        if let Some(t) = m
            .metadata
            .get("mtime")
            .and_then(|v| parse_time(v))
            .or(m.last_modified)
        {
            mtime = t;
        }
        ctime = m.metadata.get("ctime").and_then(|v| parse_time(v));
        atime = m.metadata.get("atime").and_then(|v| parse_time(v));
        if matches!(kind, Kind::File | Kind::Symlink) {
            size = m.size;
        }
        if let Kind::Special(S_IFCHR | S_IFBLK) = kind {
            rdev = m
                .metadata
                .get("rdev")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
        }
    }
    Attr {
        ino,
        kind,
        size,
        perm,
        uid,
        gid,
        mtime,
        atime: atime.unwrap_or(mtime),
        ctime: ctime.unwrap_or(mtime),
        nlink: if kind == Kind::Dir { 2 } else { 1 },
        rdev,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::UserMetadata;

    fn defaults() -> AttrDefaults {
        AttrDefaults {
            uid: 1000,
            gid: 1000,
            file_mode: 0o644,
            dir_mode: 0o755,
            mount_time: UNIX_EPOCH,
        }
    }

    #[test]
    fn times_parse_both_forms() {
        assert_eq!(
            parse_time("1700000000"),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(
            parse_time("1700000000.5"),
            Some(UNIX_EPOCH + Duration::new(1_700_000_000, 500_000_000))
        );
        assert_eq!(
            parse_time("1.000000001"),
            Some(UNIX_EPOCH + Duration::new(1, 1))
        );
        assert_eq!(parse_time("abc"), None);
        assert_eq!(parse_time("1.x"), None);
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123);
        assert_eq!(parse_time(&format_time(t)), Some(t));
    }

    #[test]
    fn s3fs_metadata_wins_over_defaults() {
        let mut md = UserMetadata::new();
        md.insert("mode".into(), "33261".into()); // 0100755
        md.insert("uid".into(), "42".into());
        md.insert("gid".into(), "43".into());
        md.insert("mtime".into(), "1600000000".into());
        let meta = ObjectMeta {
            key: "k".into(),
            size: 7,
            metadata: md,
            has_metadata: true,
            ..Default::default()
        };
        let a = attr_from_meta(5, Kind::File, Some(&meta), &defaults());
        assert_eq!((a.perm, a.uid, a.gid, a.size), (0o755, 42, 43, 7));
        assert_eq!(a.mtime, UNIX_EPOCH + Duration::from_secs(1_600_000_000));
        assert_eq!(kind_from_meta(&meta), Some(Kind::File));
    }

    #[test]
    fn garbage_metadata_falls_back() {
        let mut md = UserMetadata::new();
        md.insert("mode".into(), "rwxr-xr-x".into());
        md.insert("uid".into(), "-1".into());
        md.insert("mtime".into(), "yesterday".into());
        let lm = UNIX_EPOCH + Duration::from_secs(99);
        let meta = ObjectMeta {
            key: "k".into(),
            metadata: md,
            last_modified: Some(lm),
            ..Default::default()
        };
        let a = attr_from_meta(5, Kind::File, Some(&meta), &defaults());
        assert_eq!((a.perm, a.uid, a.mtime), (0o644, 1000, lm));
    }
}
