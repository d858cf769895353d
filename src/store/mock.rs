//! An in-memory object store for unit tests: S3 listing semantics (delimiter, pagination),
//! ETags, conditional puts, request counters and fault injection.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

use super::*;

#[derive(Clone, Debug)]
struct MockObject {
    data: Bytes,
    etag: String,
    last_modified: SystemTime,
    metadata: UserMetadata,
    content_type: Option<String>,
    /// Full-object CRC32 (base64) when the object was stored with checksums.
    checksum: Option<String>,
    /// Part sizes of an object completed from a multipart upload.
    parts: Option<Vec<u64>>,
}

/// Which operation a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    List,
    Head,
    Get,
    Put,
    Delete,
    CreateMultipart,
    UploadPart,
    CopyPart,
    Complete,
    Abort,
}

#[derive(Clone, Debug)]
struct MockUpload {
    key: String,
    parts: BTreeMap<i32, (String, Bytes, Option<u32>)>,
    metadata: UserMetadata,
    content_type: Option<String>,
}

#[derive(Clone, Debug)]
struct Fault {
    op: Op,
    key_contains: String,
    error: StoreError,
    remaining: u32,
}

/// Request counters, readable at any time.
#[derive(Debug, Default)]
pub struct Counters {
    pub list: AtomicU64,
    pub head: AtomicU64,
    pub get: AtomicU64,
    pub put: AtomicU64,
    pub delete: AtomicU64,
    pub multipart: AtomicU64,
    pub bytes_fetched: AtomicU64,
    /// Body bytes received by put and upload_part.
    pub bytes_uploaded: AtomicU64,
    /// Bytes copied server side by upload_part_copy.
    pub bytes_copied: AtomicU64,
    /// Requests inside their latency (see `set_latency`) now, and the most at once.
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
}

impl Counters {
    pub fn total(&self) -> u64 {
        self.list.load(Ordering::Relaxed)
            + self.head.load(Ordering::Relaxed)
            + self.get.load(Ordering::Relaxed)
            + self.put.load(Ordering::Relaxed)
            + self.delete.load(Ordering::Relaxed)
            + self.multipart.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct MockStore {
    objects: Mutex<BTreeMap<String, MockObject>>,
    faults: Mutex<Vec<Fault>>,
    etag_seq: AtomicU64,
    latency: Mutex<Option<Duration>>,
    /// Largest page a listing returns (S3: 1000).
    page_size: Mutex<Option<usize>>,
    pub counters: Counters,
    uploads: Mutex<std::collections::HashMap<String, MockUpload>>,
    upload_seq: AtomicU64,
    /// GET bodies still to be corrupted (one byte flipped), as a bad network path would.
    corrupt_gets: AtomicU64,
}

impl MockStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Store an object directly (not counted as a request).
    pub fn insert(&self, key: &str, data: impl Into<Bytes>) -> String {
        self.insert_with(key, data, UserMetadata::new(), None)
    }

    pub fn insert_with(
        &self,
        key: &str,
        data: impl Into<Bytes>,
        metadata: UserMetadata,
        content_type: Option<String>,
    ) -> String {
        let data = data.into();
        let checksum = Some(crc32_header(crc32fast::hash(&data)));
        self.insert_stored(key, data, metadata, content_type, checksum)
    }

    /// Store an object as a write would, with the checksum the write declared (if any).
    fn insert_stored(
        &self,
        key: &str,
        data: Bytes,
        metadata: UserMetadata,
        content_type: Option<String>,
        checksum: Option<String>,
    ) -> String {
        let etag = format!("\"mock-{}\"", self.etag_seq.fetch_add(1, Ordering::Relaxed));
        self.objects.lock().insert(
            key.to_string(),
            MockObject {
                data,
                etag: etag.clone(),
                last_modified: SystemTime::now(),
                metadata,
                content_type,
                checksum,
                parts: None,
            },
        );
        etag
    }

    pub fn remove(&self, key: &str) {
        self.objects.lock().remove(key);
    }

    pub fn get_bytes(&self, key: &str) -> Option<Bytes> {
        self.objects.lock().get(key).map(|o| o.data.clone())
    }

    /// The stored user metadata of `key` (not counted as a request).
    pub fn metadata_of(&self, key: &str) -> Option<UserMetadata> {
        self.objects.lock().get(key).map(|o| o.metadata.clone())
    }

    pub fn keys(&self) -> Vec<String> {
        self.objects.lock().keys().cloned().collect()
    }

    /// Fail the next `times` requests of `op` whose key (or prefix) contains `key_contains`.
    pub fn inject_fault(&self, op: Op, key_contains: &str, error: StoreError, times: u32) {
        self.faults.lock().push(Fault {
            op,
            key_contains: key_contains.to_string(),
            error,
            remaining: times,
        });
    }

    /// Multipart uploads not yet completed or aborted.
    pub fn open_uploads(&self) -> usize {
        self.uploads.lock().len()
    }

    fn check_condition(&self, key: &str, condition: &PutCondition) -> StoreResult<()> {
        let objects = self.objects.lock();
        match (condition, objects.get(key)) {
            (PutCondition::IfNoneMatch, Some(_)) => {
                Err(StoreError::PreconditionFailed(key.to_string()))
            }
            (PutCondition::IfMatch(tag), Some(o)) if *tag != o.etag => {
                Err(StoreError::PreconditionFailed(key.to_string()))
            }
            (PutCondition::IfMatch(_), None) => Err(StoreError::NotFound(key.to_string())),
            _ => Ok(()),
        }
    }

    /// Store `data` as a multipart object of `part_size` parts with a COMPOSITE CRC32, as other
    /// tools write them.
    pub fn insert_composite(&self, key: &str, data: Vec<u8>, part_size: usize) -> String {
        let crcs: Vec<u32> = data.chunks(part_size).map(crc32fast::hash).collect();
        let sizes = data.chunks(part_size).map(|c| c.len() as u64).collect();
        let etag = self.insert_stored(
            key,
            data.into(),
            UserMetadata::new(),
            None,
            Some(composite_crc32(&crcs)),
        );
        if let Some(o) = self.objects.lock().get_mut(key) {
            o.parts = Some(sizes);
        }
        etag
    }

    /// Flip one byte in each of the next `n` GET bodies.
    pub fn corrupt_next_gets(&self, n: u64) {
        self.corrupt_gets.store(n, Ordering::Relaxed);
    }

    fn maybe_corrupt(&self, body: Bytes) -> Bytes {
        let take = self
            .corrupt_gets
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if !take || body.is_empty() {
            return body;
        }
        let mut v = body.to_vec();
        let i = v.len() / 2;
        v[i] ^= 0x20;
        v.into()
    }

    pub fn set_latency(&self, latency: Option<Duration>) {
        *self.latency.lock() = latency;
    }

    pub fn set_page_size(&self, n: usize) {
        *self.page_size.lock() = Some(n);
    }

    pub fn reset_counters(&self) {
        for c in [
            &self.counters.list,
            &self.counters.head,
            &self.counters.get,
            &self.counters.put,
            &self.counters.delete,
            &self.counters.multipart,
            &self.counters.bytes_fetched,
            &self.counters.bytes_uploaded,
            &self.counters.bytes_copied,
            &self.counters.max_in_flight,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }

    async fn enter(&self, op: Op, key: &str) -> StoreResult<()> {
        let counter = match op {
            Op::List => &self.counters.list,
            Op::Head => &self.counters.head,
            Op::Get => &self.counters.get,
            Op::Put => &self.counters.put,
            Op::Delete => &self.counters.delete,
            _ => &self.counters.multipart,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let latency = *self.latency.lock();
        if let Some(d) = latency {
            let now = self.counters.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
            self.counters.max_in_flight.fetch_max(now, Ordering::AcqRel);
            tokio::time::sleep(d).await;
            self.counters.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        let mut faults = self.faults.lock();
        if let Some(pos) = faults
            .iter()
            .position(|f| f.op == op && key.contains(&f.key_contains))
        {
            let f = &mut faults[pos];
            let err = f.error.clone();
            f.remaining -= 1;
            if f.remaining == 0 {
                faults.remove(pos);
            }
            return Err(err);
        }
        Ok(())
    }

    fn meta_of(key: &str, o: &MockObject, with_metadata: bool) -> ObjectMeta {
        ObjectMeta {
            key: key.to_string(),
            size: o.data.len() as u64,
            etag: Some(o.etag.clone()),
            last_modified: Some(o.last_modified),
            content_type: if with_metadata {
                o.content_type.clone()
            } else {
                None
            },
            metadata: if with_metadata {
                o.metadata.clone()
            } else {
                UserMetadata::new()
            },
            has_metadata: with_metadata,
            checksum_crc32: if with_metadata {
                o.checksum.clone()
            } else {
                None
            },
        }
    }
}

#[async_trait]
impl ObjectStore for MockStore {
    async fn list_page(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<String>,
        max_keys: Option<i32>,
    ) -> StoreResult<ListPage> {
        self.enter(Op::List, prefix).await?;
        let limit = max_keys
            .map(|m| m.max(1) as usize)
            .unwrap_or(1000)
            .min(self.page_size.lock().unwrap_or(1000));
        let objects = self.objects.lock();
        let mut page = ListPage::default();
        let mut count = 0usize;
        let mut last_returned: Option<String> = None;
        let start = continuation.unwrap_or_default();
        for (key, o) in objects.range(prefix.to_string()..) {
            if !key.starts_with(prefix) {
                break;
            }
            // A common prefix is returned once; the token is the prefix itself.
            let rest = &key[prefix.len()..];
            let grouped = delimiter.and_then(|d| {
                rest.find(d)
                    .map(|i| format!("{prefix}{}", &rest[..i + d.len()]))
            });
            let item = grouped.clone().unwrap_or_else(|| key.clone());
            if !start.is_empty() && item.as_str() <= start.as_str() {
                continue;
            }
            if last_returned.as_deref() == Some(item.as_str()) {
                continue;
            }
            if count == limit {
                page.next_token = last_returned.clone();
                return Ok(page);
            }
            match grouped {
                Some(p) => page.common_prefixes.push(p),
                None => page.objects.push(Self::meta_of(key, o, false)),
            }
            count += 1;
            last_returned = Some(item);
        }
        Ok(page)
    }

    async fn list_page_after(&self, prefix: &str, start_after: &str) -> StoreResult<ListPage> {
        // The mock's continuation token is the last key returned, which is what StartAfter is.
        self.list_page(prefix, None, Some(start_after.to_string()), None)
            .await
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        self.enter(Op::Head, key).await?;
        let objects = self.objects.lock();
        objects
            .get(key)
            .map(|o| Self::meta_of(key, o, true))
            .ok_or_else(|| StoreError::NotFound(key.to_string()))
    }

    async fn get_range(
        &self,
        key: &str,
        range: ByteRange,
        if_match: Option<&str>,
    ) -> StoreResult<Bytes> {
        self.enter(Op::Get, key).await?;
        let objects = self.objects.lock();
        let o = objects
            .get(key)
            .ok_or_else(|| StoreError::NotFound(key.to_string()))?;
        if let Some(tag) = if_match {
            if tag != o.etag {
                return Err(StoreError::PreconditionFailed(key.to_string()));
            }
        }
        let len = o.data.len() as u64;
        if range.start >= len && !(len == 0 && range.start == 0) {
            return Err(StoreError::InvalidRange(format!(
                "{key} bytes={}-",
                range.start
            )));
        }
        let end = range.end.min(len);
        let out = o.data.slice(range.start as usize..end as usize);
        self.counters
            .bytes_fetched
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(self.maybe_corrupt(out))
    }

    async fn part_size(&self, key: &str, part_number: i32) -> StoreResult<u64> {
        self.enter(Op::Head, key).await?;
        let objects = self.objects.lock();
        let o = objects
            .get(key)
            .ok_or_else(|| StoreError::NotFound(key.to_string()))?;
        match (&o.parts, part_number) {
            (Some(p), n) => p
                .get(n as usize - 1)
                .copied()
                .ok_or_else(|| StoreError::InvalidRange(format!("{key} part {n}"))),
            (None, 1) => Ok(o.data.len() as u64),
            (None, n) => Err(StoreError::InvalidRange(format!("{key} part {n}"))),
        }
    }

    async fn get_whole(
        &self,
        key: &str,
        _size_hint: u64,
        if_match: Option<&str>,
    ) -> StoreResult<(Bytes, Option<String>)> {
        self.enter(Op::Get, key).await?;
        let (data, checksum) = {
            let objects = self.objects.lock();
            let o = objects
                .get(key)
                .ok_or_else(|| StoreError::NotFound(key.to_string()))?;
            if if_match.is_some_and(|tag| tag != o.etag) {
                return Err(StoreError::PreconditionFailed(key.to_string()));
            }
            (o.data.clone(), o.checksum.clone())
        };
        self.counters
            .bytes_fetched
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok((self.maybe_corrupt(data), checksum))
    }

    async fn put(
        &self,
        key: &str,
        body: Bytes,
        opts: &PutOptions,
        crc32: Option<u32>,
    ) -> StoreResult<PutResult> {
        self.enter(Op::Put, key).await?;
        self.counters
            .bytes_uploaded
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        if let Some(c) = crc32 {
            if crc32fast::hash(&body) != c {
                return Err(StoreError::Checksum(format!(
                    "{key}: body does not match its CRC32"
                )));
            }
        }
        self.check_condition(key, &opts.condition)?;
        let checksum = crc32.map(crc32_header);
        let etag = self.insert_stored(
            key,
            body,
            opts.metadata.clone(),
            opts.content_type.clone(),
            checksum.clone(),
        );
        Ok(PutResult {
            etag: Some(etag),
            checksum_crc32: checksum,
        })
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.enter(Op::Delete, key).await?;
        self.objects.lock().remove(key);
        Ok(())
    }

    async fn copy_object(
        &self,
        source_key: &str,
        source_etag: &str,
        key: &str,
        opts: &PutOptions,
    ) -> StoreResult<PutResult> {
        self.enter(Op::Put, key).await?;
        let data = {
            let objects = self.objects.lock();
            let o = objects
                .get(source_key)
                .ok_or_else(|| StoreError::NotFound(source_key.to_string()))?;
            if o.etag != source_etag {
                return Err(StoreError::PreconditionFailed(source_key.to_string()));
            }
            (o.data.clone(), o.checksum.clone())
        };
        let (data, checksum) = data;
        self.counters
            .bytes_copied
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let etag = self.insert_stored(
            key,
            data,
            opts.metadata.clone(),
            opts.content_type.clone(),
            checksum,
        );
        Ok(PutResult {
            etag: Some(etag),
            checksum_crc32: None,
        })
    }

    async fn create_multipart(
        &self,
        key: &str,
        opts: &PutOptions,
        checksum: bool,
    ) -> StoreResult<String> {
        self.enter(Op::CreateMultipart, key).await?;
        let _ = checksum;
        let id = format!("upload-{}", self.upload_seq.fetch_add(1, Ordering::Relaxed));
        self.uploads.lock().insert(
            id.clone(),
            MockUpload {
                key: key.to_string(),
                parts: BTreeMap::new(),
                metadata: opts.metadata.clone(),
                content_type: opts.content_type.clone(),
            },
        );
        Ok(id)
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        body: Bytes,
        crc32: Option<u32>,
    ) -> StoreResult<CompletedPart> {
        self.enter(Op::UploadPart, key).await?;
        self.counters
            .bytes_uploaded
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        if !(1..=10_000).contains(&part_number) {
            return Err(StoreError::Other(format!(
                "part number {part_number} out of range"
            )));
        }
        if let Some(c) = crc32 {
            if crc32fast::hash(&body) != c {
                return Err(StoreError::Checksum(format!(
                    "{key} part {part_number}: CRC32 mismatch"
                )));
            }
        }
        let etag = format!("\"part-{}\"", self.etag_seq.fetch_add(1, Ordering::Relaxed));
        let mut uploads = self.uploads.lock();
        let u = uploads
            .get_mut(upload_id)
            .ok_or_else(|| StoreError::NotFound(format!("upload {upload_id}")))?;
        u.parts.insert(part_number, (etag.clone(), body, crc32));
        Ok(CompletedPart {
            part_number,
            etag,
            checksum_crc32: crc32.map(crc32_header),
        })
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        source_key: &str,
        source_etag: &str,
        range: ByteRange,
    ) -> StoreResult<CompletedPart> {
        self.enter(Op::CopyPart, key).await?;
        let data = {
            let objects = self.objects.lock();
            let o = objects
                .get(source_key)
                .ok_or_else(|| StoreError::NotFound(source_key.to_string()))?;
            if o.etag != source_etag {
                return Err(StoreError::PreconditionFailed(source_key.to_string()));
            }
            if range.end > o.data.len() as u64 || range.is_empty() {
                return Err(StoreError::InvalidRange(source_key.to_string()));
            }
            o.data.slice(range.start as usize..range.end as usize)
        };
        self.counters
            .bytes_copied
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let crc = crc32fast::hash(&data);
        let etag = format!("\"part-{}\"", self.etag_seq.fetch_add(1, Ordering::Relaxed));
        let mut uploads = self.uploads.lock();
        let u = uploads
            .get_mut(upload_id)
            .ok_or_else(|| StoreError::NotFound(format!("upload {upload_id}")))?;
        u.parts.insert(part_number, (etag.clone(), data, Some(crc)));
        Ok(CompletedPart {
            part_number,
            etag,
            checksum_crc32: Some(crc32_header(crc)),
        })
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
        condition: &PutCondition,
    ) -> StoreResult<PutResult> {
        self.enter(Op::Complete, key).await?;
        self.check_condition(key, condition)?;
        let upload = self
            .uploads
            .lock()
            .get(upload_id)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("upload {upload_id}")))?;
        let mut body = Vec::new();
        let mut crcs = Vec::new();
        let mut sizes = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let (etag, data, crc) = upload
                .parts
                .get(&p.part_number)
                .ok_or_else(|| StoreError::Other(format!("part {} missing", p.part_number)))?;
            if *etag != p.etag {
                return Err(StoreError::Other(format!(
                    "part {} etag mismatch",
                    p.part_number
                )));
            }
            if i + 1 < parts.len() && data.len() < 5 << 20 {
                return Err(StoreError::Other(format!(
                    "part {} smaller than 5 MiB",
                    p.part_number
                )));
            }
            body.extend_from_slice(data);
            sizes.push(data.len() as u64);
            crcs.extend(*crc);
        }
        // Like S3 with ChecksumType FULL_OBJECT: the CRC32 of the whole object.
        let checksum = (crcs.len() == parts.len() && !parts.is_empty())
            .then(|| crc32_header(crc32fast::hash(&body)));
        self.uploads.lock().remove(upload_id);
        let etag = self.insert_stored(
            key,
            body.into(),
            upload.metadata,
            upload.content_type,
            checksum.clone(),
        );
        if let Some(o) = self.objects.lock().get_mut(key) {
            o.parts = Some(sizes);
        }
        Ok(PutResult {
            etag: Some(etag),
            checksum_crc32: checksum,
        })
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        self.enter(Op::Abort, key).await?;
        self.uploads.lock().remove(upload_id);
        Ok(())
    }

    async fn list_multipart_uploads(&self, prefix: &str) -> StoreResult<Vec<OpenUpload>> {
        self.enter(Op::List, prefix).await?;
        Ok(self
            .uploads
            .lock()
            .iter()
            .filter(|(_, u)| u.key.starts_with(prefix))
            .map(|(id, u)| OpenUpload {
                key: u.key.clone(),
                upload_id: id.clone(),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listing_groups_and_paginates() {
        let s = MockStore::new();
        for k in ["a/1", "a/2", "a/b/x", "a/b/y", "a/c/", "a/d", "b"] {
            s.insert(k, "x");
        }
        let mut names = Vec::new();
        let mut token = None;
        loop {
            let p = s.list_page("a/", Some("/"), token, Some(2)).await.unwrap();
            names.extend(p.objects.iter().map(|o| o.key.clone()));
            names.extend(p.common_prefixes.iter().cloned());
            token = p.next_token;
            if token.is_none() {
                break;
            }
        }
        names.sort();
        assert_eq!(names, vec!["a/1", "a/2", "a/b/", "a/c/", "a/d"]);
    }

    #[tokio::test]
    async fn faults_fire_then_clear() {
        let s = MockStore::new();
        s.insert("k", "v");
        s.inject_fault(Op::Get, "k", StoreError::Other("boom".into()), 1);
        assert!(s.get_range("k", ByteRange::new(0, 1), None).await.is_err());
        assert_eq!(
            &s.get_range("k", ByteRange::new(0, 1), None).await.unwrap()[..],
            b"v"
        );
    }
}
