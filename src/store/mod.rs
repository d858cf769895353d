//! The object store interface: the only contract between the filesystem and S3.
//!
//! Everything above this module speaks in these plain types; `s3.rs` maps them to the AWS SDK and
//! `mock.rs` keeps them in memory (with counters and fault injection) for unit tests.

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

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
    #[error("cannot reach the endpoint: {0}")]
    Unreachable(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("checksum mismatch: {0}")]
    Checksum(String),
    #[error("not supported by this store: {0}")]
    Unsupported(String),
    #[error("{0}")]
    Other(String),
}

impl StoreError {
    /// Worth trying again (network trouble, throttling, server errors)?
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unreachable(_) | StoreError::Timeout(_) | StoreError::Other(_))
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

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta>;

    /// Bytes `range` of `key`; with `if_match`, fails with `PreconditionFailed` when the object
    /// has been replaced. A range past the end is clipped by the server (a start past the end is
    /// `InvalidRange`).
    async fn get_range(&self, key: &str, range: ByteRange, if_match: Option<&str>) -> StoreResult<Bytes>;

    async fn put(&self, key: &str, body: Bytes, opts: &PutOptions) -> StoreResult<PutResult>;

    async fn delete(&self, key: &str) -> StoreResult<()>;
}

/// The directory-marker name used by old tools (s3fox, s3fs with an option): `dir_$folder$`.
pub const LEGACY_FOLDER_SUFFIX: &str = "_$folder$";
