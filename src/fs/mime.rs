//! Content-Type of new objects from the file name's extension, as s3fs and rclone set it:
//! `/etc/mime.types` when the system has one, a small built-in table otherwise, and
//! `application/octet-stream` for anything unknown (directories keep `application/x-directory`).

use std::collections::HashMap;
use std::sync::OnceLock;

const DEFAULT: &str = "application/octet-stream";

/// Used when /etc/mime.types is missing (containers, minimal installs).
const BUILT_IN: &[(&str, &str)] = &[
    ("txt", "text/plain"),
    ("log", "text/plain"),
    ("md", "text/markdown"),
    ("csv", "text/csv"),
    ("html", "text/html"),
    ("htm", "text/html"),
    ("css", "text/css"),
    ("js", "text/javascript"),
    ("json", "application/json"),
    ("xml", "application/xml"),
    ("yaml", "application/yaml"),
    ("yml", "application/yaml"),
    ("pdf", "application/pdf"),
    ("zip", "application/zip"),
    ("gz", "application/gzip"),
    ("tgz", "application/gzip"),
    ("tar", "application/x-tar"),
    ("bz2", "application/x-bzip2"),
    ("xz", "application/x-xz"),
    ("zst", "application/zstd"),
    ("jpg", "image/jpeg"),
    ("jpeg", "image/jpeg"),
    ("png", "image/png"),
    ("gif", "image/gif"),
    ("webp", "image/webp"),
    ("svg", "image/svg+xml"),
    ("mp3", "audio/mpeg"),
    ("mp4", "video/mp4"),
    ("webm", "video/webm"),
    ("wasm", "application/wasm"),
    ("parquet", "application/vnd.apache.parquet"),
];

fn table() -> &'static HashMap<String, String> {
    static TABLE: OnceLock<HashMap<String, String>> = OnceLock::new();
    TABLE.get_or_init(|| match std::fs::read_to_string("/etc/mime.types") {
        Ok(text) => parse(&text),
        Err(_) => BUILT_IN
            .iter()
            .map(|(e, t)| (e.to_string(), t.to_string()))
            .collect(),
    })
}

/// `type ext ext ...` lines; `#` starts a comment.
fn parse(text: &str) -> HashMap<String, String> {
    let mut map = HashMap::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        let Some(mime) = words.next() else { continue };
        for ext in words {
            map.entry(ext.to_ascii_lowercase())
                .or_insert_with(|| mime.to_string());
        }
    }
    map
}

/// The Content-Type for an object named `key`.
pub fn guess(key: &str) -> String {
    let name = key.rsplit('/').next().unwrap_or(key);
    let ext = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() && !ext.is_empty() => ext.to_ascii_lowercase(),
        _ => return DEFAULT.to_string(),
    };
    table()
        .get(&ext)
        .cloned()
        .unwrap_or_else(|| DEFAULT.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_map_to_types() {
        assert_eq!(guess("dir/test.txt"), "text/plain");
        assert_eq!(guess("a/b/Photo.JPG"), "image/jpeg");
        assert_eq!(guess("test.bin"), "application/octet-stream");
        assert_eq!(guess("noext"), "application/octet-stream");
        assert_eq!(guess(".bashrc"), "application/octet-stream");
        let t = parse("# comment\ntext/plain txt text\nimage/jpeg jpeg jpg jpe\n\n");
        assert_eq!(t.get("jpe").map(String::as_str), Some("image/jpeg"));
        assert_eq!(t.get("text").map(String::as_str), Some("text/plain"));
    }
}
