//! Directory listings: merge common prefixes, objects, `dir/` markers and legacy `dir_$folder$`
//! markers into one set of POSIX entries.

use std::collections::{BTreeMap, HashSet};

use parking_lot::Mutex;

use super::attrs::Kind;
use crate::store::{ListPage, ObjectMeta, LEGACY_FOLDER_SUFFIX};

#[derive(Clone, Debug)]
pub struct DirEntry {
    pub kind: Kind,
    /// The object (or the `dir/` marker) behind the entry, when the listing showed one.
    pub meta: Option<ObjectMeta>,
}

#[derive(Clone, Debug, Default)]
pub struct Listing {
    pub entries: BTreeMap<String, DirEntry>,
    /// Started empty by this mount's `mkdir` and kept up to date with what it created since:
    /// a name it lacks is absent (another client filling a directory this mount has just made,
    /// within the metadata TTL, is the one thing it misses). A listing fetched from the store
    /// says what was there when it was taken, so a later lookup of a name it lacks asks the
    /// store (an object `aws s3 cp` just put shows at once, as with s3fs).
    pub made_here: bool,
}

/// Why a key cannot be shown as a POSIX name, if it can't.
pub fn invalid_name_reason(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty path component")
    } else if name == "." || name == ".." {
        Some("'.' or '..' component")
    } else if name.len() > 255 {
        Some("component longer than 255 bytes")
    } else if name.contains('\0') {
        Some("NUL byte in name")
    } else if name.contains('/') {
        Some("'/' in name")
    } else {
        None
    }
}

/// Logs each distinct message once (bounded, so a hostile bucket cannot grow it without limit).
#[derive(Debug, Default)]
pub struct WarnOnce {
    seen: Mutex<HashSet<String>>,
}

impl WarnOnce {
    const MAX: usize = 10_000;

    pub fn warn(&self, key: &str, msg: &str) {
        let mut seen = self.seen.lock();
        if seen.len() < Self::MAX && seen.insert(key.to_string()) {
            tracing::warn!(key = %key.escape_debug(), "{msg}");
        }
    }
}

impl Listing {
    /// Add one page of a delimiter listing of `prefix`.
    pub fn add_page(&mut self, prefix: &str, page: ListPage, warn: &WarnOnce) {
        for cp in page.common_prefixes {
            let Some(rest) = cp.strip_prefix(prefix) else {
                continue;
            };
            let name = rest.strip_suffix('/').unwrap_or(rest);
            if let Some(why) = invalid_name_reason(name) {
                warn.warn(
                    &cp,
                    &format!("skipping prefix that is not a valid directory name ({why})"),
                );
                continue;
            }
            // A directory wins over a file of the same name; keep a marker's metadata if seen.
            let meta = match self.entries.remove(name) {
                Some(DirEntry {
                    kind: Kind::Dir,
                    meta,
                }) => meta,
                Some(_file) => {
                    warn.warn(&format!("{prefix}{name}"), "key is both a file and a directory prefix; showing the directory, hiding the file");
                    None
                }
                None => None,
            };
            self.entries.insert(
                name.to_string(),
                DirEntry {
                    kind: Kind::Dir,
                    meta,
                },
            );
        }
        for obj in page.objects {
            let Some(rest) = obj.key.strip_prefix(prefix) else {
                continue;
            };
            if rest.is_empty() {
                continue; // the marker of this directory itself
            }
            if let Some(dir) = rest.strip_suffix(LEGACY_FOLDER_SUFFIX) {
                if invalid_name_reason(dir).is_none() {
                    self.entries.entry(dir.to_string()).or_insert(DirEntry {
                        kind: Kind::Dir,
                        meta: None,
                    });
                    continue;
                }
            }
            if let Some(why) = invalid_name_reason(rest) {
                warn.warn(
                    &obj.key,
                    &format!("skipping key that is not a valid file name ({why})"),
                );
                continue;
            }
            match self.entries.get(rest) {
                Some(e) if e.kind == Kind::Dir => {
                    warn.warn(&obj.key, "key is both a file and a directory prefix; showing the directory, hiding the file");
                }
                _ => {
                    self.entries.insert(
                        rest.to_string(),
                        DirEntry {
                            kind: Kind::File,
                            meta: Some(obj),
                        },
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(key: &str, size: u64) -> ObjectMeta {
        ObjectMeta {
            key: key.into(),
            size,
            ..Default::default()
        }
    }

    #[test]
    fn merges_prefixes_markers_and_shadowed_files() {
        let w = WarnOnce::default();
        let mut l = Listing::default();
        l.add_page(
            "p/",
            ListPage {
                objects: vec![
                    obj("p/", 0),
                    obj("p/a", 1),
                    obj("p/x", 3),
                    obj("p/old_$folder$", 0),
                ],
                common_prefixes: vec!["p/d/".into()],
                next_token: Some("t".into()),
            },
            &w,
        );
        l.add_page(
            "p/",
            ListPage {
                objects: vec![],
                common_prefixes: vec!["p/x/".into(), "p//".into()],
                next_token: None,
            },
            &w,
        );
        let got: Vec<_> = l
            .entries
            .iter()
            .map(|(n, e)| (n.as_str(), e.kind))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", Kind::File),
                ("d", Kind::Dir),
                ("old", Kind::Dir),
                ("x", Kind::Dir)
            ]
        );
    }

    #[test]
    fn bad_names_are_rejected() {
        for bad in ["", ".", "..", "a\0b", &"n".repeat(256)] {
            assert!(invalid_name_reason(bad).is_some(), "{bad:?}");
        }
        assert!(invalid_name_reason("ok name").is_none());
        assert!(invalid_name_reason(&"n".repeat(255)).is_none());
    }
}
