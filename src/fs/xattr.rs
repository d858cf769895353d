//! Extended attributes, stored like s3fs: every attribute of an object in one
//! `x-amz-meta-xattr` header holding `{"name":"base64 value",...}`, URL-encoded.
//!
//! The `user.` and `trusted.` namespaces (and names without one, as s3fs stores them) are stored (the kernel checks who may use which,
//! with default_permissions). `system.` (POSIX ACLs, which this filesystem does not enforce)
//! and `security.` (capabilities, LSM labels) are refused when set and absent when read, so the
//! questions the kernel and `ls -l` ask about them (`security.capability` before every write,
//! `system.posix_acl_access` per entry) are answered without a request. Such entries written by
//! another client stay stored untouched.

use std::collections::BTreeMap;
use std::time::SystemTime;

use base64::Engine;

use super::attrs::format_time;
use super::{Errno, Fs, FsResult};
use crate::store::UserMetadata;

/// The user-metadata key (after `x-amz-meta-`) holding the attributes.
pub const XATTR_KEY: &str = "xattr";

/// AWS S3 limits user metadata to 2 KiB: the bytes of every key and value together.
pub const METADATA_LIMIT: usize = 2048;

const XATTR_CREATE: i32 = libc::XATTR_CREATE;
const XATTR_REPLACE: i32 = libc::XATTR_REPLACE;

/// Standard base64 that also takes values without their `=` padding (as s3fs's decoder does).
const LENIENT_BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Attribute names mapped to their values, in name order (the order s3fs writes them in).
pub type Xattrs = BTreeMap<String, Vec<u8>>;

/// Every name but the kernel's own namespaces is stored: `user.`, `trusted.`, and (as s3fs on
/// Linux does, FUSE passing any name through) names without a namespace at all.
fn stored_namespace(name: &str) -> bool {
    !name.is_empty() && !name.starts_with("security.") && !name.starts_with("system.")
}

/// Parse the header value. Lenient where s3fs is (whitespace around quoted tokens, either hex
/// case, missing base64 padding); anything else is an error, so that a header this code does
/// not understand is never rewritten.
pub fn decode(header: &str) -> Result<Xattrs, String> {
    let text = percent_decode(header)?;
    let (Some(open), Some(close)) = (text.find('{'), text.rfind('}')) else {
        return Err("no braces".into());
    };
    if close < open {
        return Err("no braces".into());
    }
    let body = &text[open + 1..close];
    let mut out = Xattrs::new();
    for pair in body.split(',').filter(|p| !p.trim().is_empty()) {
        let (name, value) = pair
            .split_once(':')
            .ok_or_else(|| format!("no ':' in {pair:?}"))?;
        let name = unquote(name)?;
        let value = unquote(value)?;
        if name.is_empty() {
            continue;
        }
        let bytes = LENIENT_BASE64
            .decode(value.trim())
            .map_err(|e| format!("value of {name:?}: {e}"))?;
        out.insert(name.to_string(), bytes);
    }
    Ok(out)
}

/// The header value for `xattrs`, or None when there are none (the header is then dropped).
pub fn encode(xattrs: &Xattrs) -> Option<String> {
    if xattrs.is_empty() {
        return None;
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let body: Vec<String> = xattrs
        .iter()
        .map(|(k, v)| format!("\"{k}\":\"{}\"", b64.encode(v)))
        .collect();
    Some(percent_encode(&format!("{{{}}}", body.join(","))))
}

/// `"token"` with whitespace around it, or a bare token.
fn unquote(s: &str) -> Result<&str, String> {
    let s = s.trim();
    match (s.find('"'), s.rfind('"')) {
        (Some(a), Some(b)) if a < b => {
            let inner = &s[a + 1..b];
            if inner.contains('"') {
                return Err(format!("stray quote in {s:?}"));
            }
            Ok(inner)
        }
        (None, None) => Ok(s),
        _ => Err(format!("unbalanced quotes in {s:?}")),
    }
}

/// Like s3fs's urlEncodePath: `%XX` (upper case) for everything but alphanumerics and `.-_~/`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b".-_~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad escape at byte {i}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8".to_string())
}

/// The size S3 counts for user metadata: every key and value in bytes.
fn metadata_size(md: &UserMetadata) -> usize {
    md.iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// A name the filesystem can store: UTF-8, in a stored namespace, and free of the characters
/// s3fs's format cannot carry in a name (it writes names unescaped between quotes, split by
/// `,` and `:`).
fn checked_name(name: &[u8]) -> FsResult<&str> {
    let name = std::str::from_utf8(name).map_err(|_| Errno::EINVAL)?;
    if !stored_namespace(name) {
        return Err(Errno::ENOTSUP);
    }
    if name.contains(['"', ',', ':', '{', '}']) {
        return Err(Errno::EINVAL);
    }
    Ok(name)
}

impl Fs {
    /// The attributes stored on `ino`. A header this code cannot parse reads as none (logged).
    async fn xattrs_of(&self, ino: u64) -> FsResult<Xattrs> {
        let md = self.current_metadata(ino).await?;
        Ok(match md.get(XATTR_KEY) {
            None => Xattrs::new(),
            Some(h) => decode(h).unwrap_or_else(|e| {
                tracing::warn!(ino, error = %e, "extended attributes header not understood; shown as none");
                Xattrs::new()
            }),
        })
    }

    /// getxattr: the value of `name`; ENODATA when it has none.
    pub async fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        let Ok(name) = checked_name(name) else {
            self.inode(ino)?;
            return Err(Errno::ENODATA);
        };
        self.xattrs_of(ino)
            .await?
            .remove(name)
            .ok_or(Errno::ENODATA)
    }

    /// listxattr: the names, each followed by a NUL.
    pub async fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let mut out = Vec::new();
        for name in self.xattrs_of(ino).await?.keys() {
            if stored_namespace(name) {
                out.extend_from_slice(name.as_bytes());
                out.push(0);
            }
        }
        Ok(out)
    }

    /// setxattr (`value` Some) or removexattr (None). `flags`: XATTR_CREATE fails with EEXIST
    /// if `name` exists, XATTR_REPLACE with ENODATA if it does not.
    pub async fn set_or_remove_xattr(
        &self,
        ino: u64,
        name: &[u8],
        value: Option<&[u8]>,
        flags: i32,
    ) -> FsResult<()> {
        let name = match checked_name(name) {
            Ok(n) => n,
            Err(e) if value.is_none() && e == Errno::ENOTSUP => return Err(Errno::ENODATA),
            Err(e) => return Err(e),
        };
        self.edit_metadata(ino, |md| {
            let mut xattrs = match md.get(XATTR_KEY) {
                None => Xattrs::new(),
                Some(h) => decode(h).map_err(|e| {
                    tracing::error!(ino, error = %e, "extended attributes header not understood; not rewriting it");
                    Errno::EIO
                })?,
            };
            let exists = xattrs.contains_key(name);
            match value {
                Some(_) if exists && flags & XATTR_CREATE != 0 => return Err(Errno::EEXIST),
                Some(_) if !exists && flags & XATTR_REPLACE != 0 => return Err(Errno::ENODATA),
                None if !exists => return Err(Errno::ENODATA),
                Some(v) => {
                    xattrs.insert(name.to_string(), v.to_vec());
                }
                None => {
                    xattrs.remove(name);
                }
            }
            let mut changed = md.clone();
            match encode(&xattrs) {
                Some(h) => changed.insert(XATTR_KEY.into(), h),
                None => changed.remove(XATTR_KEY),
            };
            changed.insert("ctime".into(), format_time(SystemTime::now()));
            if metadata_size(&changed) > METADATA_LIMIT {
                return Err(Errno::ENOSPC);
            }
            *md = changed;
            Ok(())
        })
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_what_s3fs_writes() {
        let mut x = Xattrs::new();
        x.insert("user.a".into(), b"a".to_vec());
        assert_eq!(
            encode(&x).unwrap(),
            "%7B%22user.a%22%3A%22YQ%3D%3D%22%7D",
            "s3fs's urlEncodePath of {{\"user.a\":\"YQ==\"}}"
        );
        x.insert("trusted.b".into(), vec![0, 255, 10]);
        x.insert("user.empty".into(), vec![]);
        let h = encode(&x).unwrap();
        assert_eq!(decode(&h).unwrap(), x);
        // Sorted by name, no spaces, like std::map in s3fs.
        assert_eq!(
            percent_decode(&h).unwrap(),
            "{\"trusted.b\":\"AP8K\",\"user.a\":\"YQ==\",\"user.empty\":\"\"}"
        );
        assert_eq!(encode(&Xattrs::new()), None);
    }

    #[test]
    fn headers_from_other_writers_parse_leniently() {
        // Lower-case hex, spaces around tokens, missing padding, an empty header.
        let d = decode("%7b \"user.x\" : \"YWI\" , \"user.y\":\"\" %7d").unwrap();
        assert_eq!(d.get("user.x").unwrap(), b"ab");
        assert_eq!(d.get("user.y").unwrap(), b"");
        assert!(decode("%7B%7D").unwrap().is_empty());
        assert!(decode("{}").unwrap().is_empty());
    }

    #[test]
    fn headers_that_cannot_be_understood_are_errors() {
        for bad in [
            "",
            "user.x",
            "%7B%22user.x%22%7D",
            "{\"user.x\":\"!!!\"}",
            "%ZZ",
            "{\"a\"b\":\"YQ==\"}",
            "}{",
        ] {
            assert!(decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_names_the_format_can_hold_are_accepted() {
        assert_eq!(checked_name(b"user.ok-name_1"), Ok("user.ok-name_1"));
        assert_eq!(checked_name(b"trusted.x"), Ok("trusted.x"));
        assert_eq!(
            checked_name(b"key1"),
            Ok("key1"),
            "s3fs accepts names without a namespace"
        );
        assert_eq!(checked_name(b"security.capability"), Err(Errno::ENOTSUP));
        assert_eq!(
            checked_name(b"system.posix_acl_access"),
            Err(Errno::ENOTSUP)
        );
        assert_eq!(checked_name(b"user.a,b"), Err(Errno::EINVAL));
        assert_eq!(checked_name(b"user.a:b"), Err(Errno::EINVAL));
        assert_eq!(checked_name(b"user.\"q\""), Err(Errno::EINVAL));
        assert_eq!(checked_name(b"user.\xff"), Err(Errno::EINVAL));
    }
}
