//! The object store interface: the only contract between the filesystem and S3.
//!
//! Everything above this module speaks in these plain types; `s3.rs` maps them to the AWS SDK and
//! `mock.rs` keeps them in memory (with counters and fault injection) for unit tests.

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

pub mod buffers;
pub mod mock;
pub mod s3;

/// User metadata of an object, keys lower-case and without the `x-amz-meta-` prefix.
pub type UserMetadata = BTreeMap<String, String>;

/// What a HEAD (or a listing, with less detail) tells about one object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    /// Quoted as the server sent it; used verbatim in If-Match.
    pub etag: Option<String>,
    pub last_modified: Option<SystemTime>,
    pub content_type: Option<String>,
    /// Only HEAD returns user metadata; listings leave it empty and set `has_metadata = false`.
    pub metadata: UserMetadata,
    pub has_metadata: bool,
    /// The object's stored CRC32 (base64; `-N` suffix for a multipart COMPOSITE checksum), when
    /// the store keeps one and was asked for it (HEAD with checksum mode; listings have none).
    pub checksum_crc32: Option<String>,
}

/// One page of a ListObjectsV2 with a delimiter.
#[derive(Clone, Debug, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectMeta>,
    /// Full prefixes, ending in the delimiter.
    pub common_prefixes: Vec<String>,
    pub next_token: Option<String>,
}

/// A half-open byte range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    pub fn new(start: u64, end: u64) -> Self {
        debug_assert!(start <= end);
        ByteRange { start, end }
    }
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// When a write may replace what is at the key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PutCondition {
    /// Unconditional.
    #[default]
    Overwrite,
    /// Only if no object exists (If-None-Match: *).
    IfNoneMatch,
    /// Only if the current object has this ETag (If-Match).
    IfMatch(String),
}

#[derive(Clone, Debug, Default)]
pub struct PutOptions {
    pub condition: PutCondition,
    pub metadata: UserMetadata,
    pub content_type: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct PutResult {
    pub etag: Option<String>,
    /// The object's CRC32 checksum as the server reports it (base64, `-N` suffix for a
    /// multipart object), when it keeps one.
    pub checksum_crc32: Option<String>,
}

/// A part that has been uploaded, as CompleteMultipartUpload needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompletedPart {
    pub part_number: i32,
    pub etag: String,
    /// Base64 CRC32 of the part, when checksums are in use.
    pub checksum_crc32: Option<String>,
}

/// A multipart upload left open on the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenUpload {
    pub key: String,
    pub upload_id: String,
}

/// Base64 of a CRC32 as S3's `x-amz-checksum-crc32` header carries it (big-endian bytes).
pub fn crc32_header(crc: u32) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes())
}

/// The checksum S3 reports for a multipart object with CRC32 part checksums (COMPOSITE type):
/// the CRC32 of the concatenated binary part checksums, then `-<number of parts>`.
pub fn composite_crc32(part_crcs: &[u32]) -> String {
    let mut h = crc32fast::Hasher::new();
    for c in part_crcs {
        h.update(&c.to_be_bytes());
    }
    format!("{}-{}", crc32_header(h.finalize()), part_crcs.len())
}

/// CRC32s of consecutive pieces of a body that starts at object offset `start`, one per stretch
/// between multiples of `block` (object offsets): the first piece runs to the first multiple
/// after `start`, the last one ends with the body. Fed as the bytes arrive, so each piece is
/// hashed while it is still in the CPU cache (about four times faster than a later pass).
#[derive(Clone, Debug)]
pub struct PieceCrcs {
    pos: u64,
    block: u64,
    hasher: crc32fast::Hasher,
    /// The current piece has bytes in `hasher`.
    open: bool,
    done: Vec<u32>,
}

impl PieceCrcs {
    pub fn new(start: u64, block: u64) -> Self {
        PieceCrcs {
            pos: start,
            block: block.max(1),
            hasher: crc32fast::Hasher::new(),
            open: false,
            done: Vec::new(),
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let n = ((self.block - self.pos % self.block) as usize).min(data.len());
            self.hasher.update(&data[..n]);
            self.open = true;
            self.pos += n as u64;
            data = &data[n..];
            if self.pos % self.block == 0 {
                self.done.push(std::mem::take(&mut self.hasher).finalize());
                self.open = false;
            }
        }
    }

    /// The object offset where the bytes taken in so far end.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// Take in the next `len` bytes by the CRC32s of their pieces (as another `PieceCrcs` with
    /// the same block made them from the same offset) instead of by their bytes.
    pub fn update_from(&mut self, crcs: &[u32], len: u64) {
        let end = self.pos + len;
        for crc in crcs {
            let n = (self.block - self.pos % self.block).min(end - self.pos);
            if self.open || n < self.block {
                self.hasher
                    .combine(&crc32fast::Hasher::new_with_initial_len(*crc, n));
                self.open = true;
            } else {
                self.done.push(*crc); // a whole piece: its CRC32 as it is
            }
            self.pos += n;
            if self.pos % self.block == 0 && self.open {
                self.done.push(std::mem::take(&mut self.hasher).finalize());
                self.open = false;
            }
        }
        debug_assert_eq!(self.pos, end, "piece CRC32s for {len} bytes");
    }

    pub fn finish(mut self) -> Vec<u32> {
        if self.open {
            self.done.push(self.hasher.finalize());
        }
        self.done
    }
}

/// [`PieceCrcs`] of a whole body at once.
pub fn piece_crcs(data: &[u8], start: u64, block: u64) -> Vec<u32> {
    let mut p = PieceCrcs::new(start, block);
    p.update(data);
    p.finish()
}

/// Errors, classified by what the layers above do about them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("no such key: {0}")]
    NotFound(String),
    #[error("bucket does not exist: {0}")]
    NoSuchBucket(String),
    #[error("access denied: {0}")]
    AccessDenied(String),
    #[error("precondition failed (object changed): {0}")]
    PreconditionFailed(String),
    #[error("requested range not satisfiable: {0}")]
    InvalidRange(String),
    /// No credentials could be found (or loaded) to sign requests with.
    #[error("no AWS credentials: {0}")]
    NoCredentials(String),
    #[error("cannot reach the endpoint: {0}")]
    Unreachable(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("checksum mismatch: {0}")]
    Checksum(String),
    /// The store does not implement something the request used (a 501, or a 400 that names
    /// the header); `feature` says what, as far as the answer tells.
    #[error("not supported by this store ({feature}): {detail}")]
    Unsupported { feature: Feature, detail: String },
    #[error("{0}")]
    Other(String),
}

/// What a store said it does not implement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// `x-amz-checksum-*` headers.
    Checksums,
    /// `If-Match` / `If-None-Match` on writes.
    ConditionalWrites,
    /// The answer did not say which part of the request.
    Unknown,
}

impl std::fmt::Display for Feature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Feature::Checksums => "checksums",
            Feature::ConditionalWrites => "conditional writes",
            Feature::Unknown => "a header of the request",
        })
    }
}

impl StoreError {
    /// Worth trying again (network trouble, throttling, server errors)?
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Unreachable(_) | StoreError::Timeout(_) | StoreError::Other(_)
        )
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The operations s3mount needs from an object store.
#[async_trait]
pub trait ObjectStore: Send + Sync + fmt::Debug + 'static {
    /// One page of keys under `prefix`, grouped by `delimiter` when given.
    async fn list_page(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<String>,
        max_keys: Option<i32>,
    ) -> StoreResult<ListPage>;

    /// The first page of keys under `prefix` that sort after `start_after`, without a
    /// delimiter; later pages come from [`ObjectStore::list_page`] with its token.
    async fn list_page_after(&self, prefix: &str, start_after: &str) -> StoreResult<ListPage>;

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta>;

    /// Bytes `range` of `key`; with `if_match`, fails with `PreconditionFailed` when the object
    /// has been replaced. A range past the end is clipped by the server (a start past the end is
    /// `InvalidRange`).
    async fn get_range(
        &self,
        key: &str,
        range: ByteRange,
        if_match: Option<&str>,
    ) -> StoreResult<Bytes>;

    /// [`ObjectStore::get_range`] plus the [`PieceCrcs`] of the body for `block`, which a
    /// store computes where the bytes arrive (this default hashes the finished body).
    async fn get_range_crcs(
        &self,
        key: &str,
        range: ByteRange,
        if_match: Option<&str>,
        block: u64,
    ) -> StoreResult<(Bytes, Vec<u32>)> {
        let body = self.get_range(key, range, if_match).await?;
        let crcs = piece_crcs(&body, range.start, block);
        Ok((body, crcs))
    }

    /// The whole object, with the CRC32 the store keeps for it (if any), pinned by `if_match`.
    async fn get_whole(
        &self,
        key: &str,
        size_hint: u64,
        if_match: Option<&str>,
    ) -> StoreResult<(Bytes, Option<String>)>;

    /// Size of part `part_number` of a multipart object (HEAD with partNumber; for an object
    /// stored in one piece, part 1 is the whole object). Not pinned to an ETag: moto answers
    /// If-Match on a part with 412.
    async fn part_size(&self, key: &str, part_number: i32) -> StoreResult<u64>;

    /// Store `body` as `key` in one request. `crc32` is sent as the body's checksum when given,
    /// so the server rejects a corrupted body.
    async fn put(
        &self,
        key: &str,
        body: Bytes,
        opts: &PutOptions,
        crc32: Option<u32>,
    ) -> StoreResult<PutResult>;

    async fn delete(&self, key: &str) -> StoreResult<()>;

    /// Server-side copy of a whole object (at most 5 GiB) onto `key`, with `opts.metadata`
    /// replacing the source's, only while the source still has `source_etag`.
    async fn copy_object(
        &self,
        source_key: &str,
        source_etag: &str,
        key: &str,
        opts: &PutOptions,
    ) -> StoreResult<PutResult>;

    /// Start a multipart upload; returns its id. With `checksum`, parts carry CRC32s and the
    /// object gets a FULL_OBJECT CRC32 (stores that only know COMPOSITE report that instead).
    async fn create_multipart(
        &self,
        key: &str,
        opts: &PutOptions,
        checksum: bool,
    ) -> StoreResult<String>;

    /// Upload one part (numbers 1..=10000). `crc32` is sent as the part's checksum when given.
    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        body: Bytes,
        crc32: Option<u32>,
    ) -> StoreResult<CompletedPart>;

    /// Upload part `part_number` from `len` bytes of a local file (a part spilled to disk).
    /// The default reads the file and sends it as [`ObjectStore::upload_part`] does; the S3
    /// store streams it from the file.
    async fn upload_part_file(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        path: &std::path::Path,
        len: u64,
        crc32: Option<u32>,
    ) -> StoreResult<CompletedPart> {
        let body = tokio::fs::read(path)
            .await
            .map_err(|e| StoreError::Other(format!("{}: {e}", path.display())))?;
        if body.len() as u64 != len {
            return Err(StoreError::Other(format!(
                "{}: {} bytes, expected {len}",
                path.display(),
                body.len()
            )));
        }
        self.upload_part(key, upload_id, part_number, Bytes::from(body), crc32)
            .await
    }

    /// Make `range` of the existing object `source_key` (which must still have `source_etag`)
    /// a part of the upload, server side.
    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        source_key: &str,
        source_etag: &str,
        range: ByteRange,
    ) -> StoreResult<CompletedPart>;

    /// Complete the upload; the object appears only now (subject to `condition`).
    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
        condition: &PutCondition,
    ) -> StoreResult<PutResult>;

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()>;

    /// Multipart uploads open under `prefix`.
    async fn list_multipart_uploads(&self, prefix: &str) -> StoreResult<Vec<OpenUpload>>;
}

/// The directory-marker name used by old tools (s3fox, s3fs with an option): `dir_$folder$`.
pub const LEGACY_FOLDER_SUFFIX: &str = "_$folder$";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_crcs_split_at_block_multiples_of_the_object() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 253) as u8).collect();
        // A body of 10,000 bytes at offset 2,500 with blocks of 4,096: pieces end at 4,096,
        // 8,192, 12,288 and 12,500.
        let want = vec![
            crc32fast::hash(&data[..1_596]),
            crc32fast::hash(&data[1_596..5_692]),
            crc32fast::hash(&data[5_692..9_788]),
            crc32fast::hash(&data[9_788..]),
        ];
        assert_eq!(piece_crcs(&data, 2_500, 4_096), want);
        // Fed in arbitrary slices, the result is the same.
        let mut p = PieceCrcs::new(2_500, 4_096);
        for c in data.chunks(777) {
            p.update(c);
        }
        assert_eq!(p.finish(), want);
        // A body ending on a multiple has no empty last piece; an empty body has no piece.
        assert_eq!(piece_crcs(&data[..1_596], 2_500, 4_096).len(), 1);
        assert!(piece_crcs(&[], 4_096, 4_096).is_empty());
    }
}
