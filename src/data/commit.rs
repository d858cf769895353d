//! The one way bytes become objects. Every commit route (a streamed upload, a staged file, a
//! copy, a metadata rewrite, a rename) goes through these: S3's part limits and the part
//! schedule ([`UploadConfig`]); what the store turned out to support ([`Capabilities`], learned
//! from typed [`StoreError::Unsupported`] answers); a body sent with its CRC32 and sent again
//! when the server finds it corrupted ([`send_with_checksum`]); single PUTs and multipart
//! completions that fall back when a condition is refused and compare the checksum the store
//! reports with the data ([`put_checked`], [`complete_checked`]); server-side copies of any
//! size ([`copy_any_size`]); aborts retried in the background ([`abort_upload`]). A commit
//! nobody waits for (a `--write-back` upload) runs [`patiently`]: a transient failure is tried
//! again for a while, beyond the SDK's own attempts, before the commit fails for good.
//!
//! `upload.rs` (streaming) and `staging.rs` (in-place changes) build on this module and not on
//! each other.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::store::{
    composite_crc32, crc32_header, ByteRange, CompletedPart, Feature, ObjectStore, PutCondition,
    PutOptions, PutResult, StoreError, StoreResult,
};

pub const MAX_PARTS: i32 = 10_000;
/// S3's smallest non-final part and largest part.
pub const MIN_PART: u64 = 5 << 20;
pub const MAX_PART: u64 = 5 << 30;

#[derive(Clone, Copy, Debug)]
pub struct UploadConfig {
    pub min_part_size: u64,
    pub max_part_size: u64,
    /// Parts of one file uploading at the same time.
    pub concurrency: usize,
    /// A streamed file keeps a local copy of its bytes (in the staging directory) up to this
    /// size, so that an upload that fails for good loses nothing; 0 keeps none.
    pub spool_limit: u64,
    /// Parts larger than this (once the multipart upload exists) are written to a file in the
    /// staging directory as they arrive and uploaded from it, so memory holds for any file size
    /// (parts grow to 512 MiB and more past ~500 GiB into one stream).
    pub spill_above: u64,
}

impl Default for UploadConfig {
    fn default() -> Self {
        UploadConfig {
            min_part_size: 8 << 20,
            max_part_size: 4 << 30,
            concurrency: 4,
            spool_limit: 1 << 30,
            spill_above: 128 << 20,
        }
    }
}

impl UploadConfig {
    /// Size of part `n` (1-based).
    pub fn part_size(&self, n: i32) -> u64 {
        let doublings = ((n.max(1) - 1) / 1000).min(20) as u32;
        (self.min_part_size << doublings)
            .min(self.max_part_size)
            .min(MAX_PART)
    }

    /// The largest object this schedule can write.
    pub fn max_object_size(&self) -> u64 {
        (1..=MAX_PARTS).map(|n| self.part_size(n)).sum()
    }
}

/// Whether the store accepts checksum headers; learned once, shared by every upload.
#[derive(Debug)]
pub struct Capabilities {
    checksums: AtomicBool,
    conditional: AtomicBool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            checksums: AtomicBool::new(true),
            conditional: AtomicBool::new(true),
        }
    }
}

impl Capabilities {
    pub fn checksums(&self) -> bool {
        self.checksums.load(Ordering::Relaxed)
    }

    /// Whether writes carry If-Match / If-None-Match (off by option, or once the store said it
    /// does not implement them). Stores that ignore them silently (Garage) cannot be detected.
    pub fn conditional(&self) -> bool {
        self.conditional.load(Ordering::Relaxed)
    }

    pub fn disable_conditional(&self) {
        self.conditional.store(false, Ordering::Relaxed);
    }

    /// Did this error, the answer to a request that carried a condition, say the store does not
    /// implement conditional writes? Then stop sending them. An answer that does not say what it
    /// refuses counts as this (the condition is what a store is likeliest not to know); one
    /// that names checksums does not.
    pub fn learn_conditional(&self, e: &StoreError) -> bool {
        let unsupported = matches!(
            e,
            StoreError::Unsupported {
                feature: Feature::ConditionalWrites | Feature::Unknown,
                ..
            }
        );
        if unsupported && self.conditional.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %e, "store does not implement conditional writes; writing without If-Match/If-None-Match");
        }
        unsupported
    }

    /// Did this error say the store does not understand checksums? Then stop sending them.
    pub(crate) fn learn(&self, e: &StoreError) -> bool {
        let unsupported = matches!(
            e,
            StoreError::Unsupported {
                feature: Feature::Checksums,
                ..
            }
        );
        if unsupported && self.checksums.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %e, "store rejects checksum headers; uploading without them (integrity then rests on TLS and Content-MD5-less transfer)");
        }
        unsupported
    }
}

tokio::task_local! {
    /// How long the commit running in this task keeps retrying transient failures.
    static PATIENCE: std::time::Duration;
}

/// Run `commit` retrying transient store failures (network, throttling, server errors) for up
/// to `patience`, pausing 1 s, 2 s, 4 s, then 8 s between attempts. For commits that no
/// caller waits on: a close that waits gets the SDK's attempts only, and its error promptly.
pub async fn patiently<F: std::future::Future>(
    patience: std::time::Duration,
    commit: F,
) -> F::Output {
    PATIENCE.scope(patience, commit).await
}

/// `work` under the patience of the task that calls this (for work it spawns: a part upload
/// started by a patient commit is patient too).
pub fn carry_patience<F: std::future::Future>(
    work: F,
) -> impl std::future::Future<Output = F::Output> {
    let patience = PATIENCE.try_with(|p| *p).ok();
    async move {
        match patience {
            Some(p) => PATIENCE.scope(p, work).await,
            None => work.await,
        }
    }
}

/// `send()`, and again after a pause while it fails transiently and the task's patience lasts.
async fn retry_transient<T, F, Fut>(send: F) -> StoreResult<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = StoreResult<T>>,
{
    let Ok(patience) = PATIENCE.try_with(|p| *p) else {
        return send().await;
    };
    let started = std::time::Instant::now();
    let mut pause = std::time::Duration::from_secs(1);
    loop {
        match send().await {
            Err(e) if e.is_transient() && started.elapsed() + pause < patience => {
                tracing::warn!(error = %e, retry_in = ?pause, "background upload request failed; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(8));
            }
            other => return other,
        }
    }
}

/// Attempts at one body when the server reports a checksum mismatch (corruption in transit).
const CHECKSUM_ATTEMPTS: u32 = 3;

/// One PUT of a whole object with its CRC32: sent again when the server finds the body
/// corrupted, without checksum headers once the store refused them, without its condition
/// once the store refused that; the checksum the store reports is compared with ours (a
/// mismatch is logged: the bytes the server checked are the ones sent). A refused condition
/// that the store *did* check (412) is returned as it is: the caller keeps the data.
pub async fn put_checked(
    store: &Arc<dyn ObjectStore>,
    caps: &Capabilities,
    key: &str,
    body: Bytes,
    crc: u32,
    opts: &PutOptions,
) -> StoreResult<PutResult> {
    let mut opts = opts.clone();
    if !caps.conditional() {
        opts.condition = PutCondition::Overwrite;
    }
    let attempt = |opts: PutOptions| {
        let body = body.clone();
        async move {
            send_with_checksum(caps, |c| {
                let (opts, body) = (opts.clone(), body.clone());
                async move { store.put(key, body, &opts, c.then_some(crc)).await }
            })
            .await
        }
    };
    let res = match attempt(opts.clone()).await {
        Err(e) if opts.condition != PutCondition::Overwrite && caps.learn_conditional(&e) => {
            opts.condition = PutCondition::Overwrite;
            attempt(opts).await
        }
        other => other,
    }?;
    verify_checksum(key, res.checksum_crc32.as_deref(), &[crc], Some(crc));
    Ok(res)
}

/// One part with its CRC32, sent again when the server finds it corrupted.
pub async fn upload_part_checked(
    store: &Arc<dyn ObjectStore>,
    caps: &Capabilities,
    key: &str,
    id: &str,
    number: i32,
    body: Bytes,
    crc: u32,
) -> StoreResult<CompletedPart> {
    send_with_checksum(caps, |c| {
        let body = body.clone();
        async move {
            store
                .upload_part(key, id, number, body, c.then_some(crc))
                .await
        }
    })
    .await
}

/// What the parts of a multipart upload hold, to check the completed object against: the
/// CRC32 and length of every part, in order (None when some part was copied server side and
/// has no local CRC32: then only the store's own part checksums vouch).
pub type PartCrcs = Option<Vec<(u32, u64)>>;

/// Complete a multipart upload under `condition` (dropped once the store refused conditions;
/// a 412 is returned as it is), then compare the checksum the store reports with the parts'.
pub async fn complete_checked(
    store: &Arc<dyn ObjectStore>,
    caps: &Capabilities,
    key: &str,
    id: &str,
    parts: Vec<CompletedPart>,
    condition: &PutCondition,
    crcs: PartCrcs,
) -> StoreResult<PutResult> {
    let condition = if caps.conditional() {
        condition.clone()
    } else {
        PutCondition::Overwrite
    };
    let complete = |condition: PutCondition| {
        let parts = parts.clone();
        retry_transient(move || {
            let (parts, condition) = (parts.clone(), condition.clone());
            async move { store.complete_multipart(key, id, parts, &condition).await }
        })
    };
    let res = match complete(condition.clone()).await {
        Err(e) if condition != PutCondition::Overwrite && caps.learn_conditional(&e) => {
            complete(PutCondition::Overwrite).await
        }
        other => other,
    }?;
    if let Some(crcs) = crcs {
        let part_crcs: Vec<u32> = crcs.iter().map(|(c, _)| *c).collect();
        let mut whole = crc32fast::Hasher::new();
        for (c, len) in &crcs {
            whole.combine(&crc32fast::Hasher::new_with_initial_len(*c, *len));
        }
        let whole = whole.finalize();
        if !verify_checksum(key, res.checksum_crc32.as_deref(), &part_crcs, Some(whole)) {
            crate::metrics::count(crate::metrics::CHECKSUM_MISMATCHES);
            return Err(StoreError::Checksum(format!(
                "{key}: object checksum {} after completion differs from the data written",
                res.checksum_crc32.as_deref().unwrap_or("?")
            )));
        }
    }
    Ok(res)
}

/// How long a failed abort keeps being retried in the background.
const ABORT_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// The first `size` bytes of an object in equal pieces of at most 5 GiB (what one
/// UploadPartCopy may copy).
pub(crate) fn copy_pieces(size: u64) -> impl Iterator<Item = ByteRange> {
    let each = size.div_ceil(size.div_ceil(MAX_PART).max(1));
    (0..size)
        .step_by(each.max(1) as usize)
        .map(move |start| ByteRange::new(start, (start + each).min(size)))
}

/// Server-side copy of the first `size` bytes of `src_key` at `src_etag` (the whole object) to
/// `dst` under `opts`: one CopyObject up to 5 GiB, UploadPartCopy pieces above.
pub async fn copy_any_size(
    store: &Arc<dyn ObjectStore>,
    src_key: &str,
    src_etag: &str,
    size: u64,
    dst: &str,
    opts: &PutOptions,
) -> StoreResult<PutResult> {
    use futures::StreamExt;
    if size <= MAX_PART {
        return store.copy_object(src_key, src_etag, dst, opts).await;
    }
    let id = store.create_multipart(dst, opts, false).await?;
    let results: Vec<StoreResult<CompletedPart>> =
        futures::stream::iter((1..).zip(copy_pieces(size)))
            .map(|(n, r)| {
                let id = id.clone();
                async move {
                    store
                        .upload_part_copy(dst, &id, n, src_key, src_etag, r)
                        .await
                }
            })
            .buffered(4)
            .collect()
            .await;
    let parts: StoreResult<Vec<CompletedPart>> = results.into_iter().collect();
    let res = match parts {
        Ok(parts) => {
            store
                .complete_multipart(dst, &id, parts, &PutCondition::Overwrite)
                .await
        }
        Err(e) => Err(e),
    };
    if res.is_err() {
        abort_upload(store, dst, &id).await;
    }
    res
}

/// Abort a multipart upload. When the store cannot be reached (the reason uploads fail), keep
/// trying in the background, backing off up to 5 s, so the upload is not left open (and
/// billed) once the store is back; a mount started later reports any that remain.
pub async fn abort_upload(store: &Arc<dyn ObjectStore>, key: &str, id: &str) {
    match store.abort_multipart(key, id).await {
        Ok(()) | Err(StoreError::NotFound(_)) => {
            tracing::info!(key, upload_id = %id, "multipart upload aborted");
            return;
        }
        Err(e) => {
            tracing::warn!(key, upload_id = %id, error = %e, "could not abort multipart upload; retrying in the background")
        }
    }
    let (store, key, id) = (store.clone(), key.to_string(), id.to_string());
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(250);
        while started.elapsed() < ABORT_RETRY_FOR {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_secs(5));
            match store.abort_multipart(&key, &id).await {
                Ok(()) | Err(StoreError::NotFound(_)) => {
                    tracing::info!(key, upload_id = %id, "multipart upload aborted");
                    return;
                }
                Err(e) => tracing::debug!(key, upload_id = %id, error = %e, "abort still failing"),
            }
        }
        tracing::error!(key, upload_id = %id, "could not abort multipart upload; it stays open until aborted (reported at the next mount)");
    });
}

/// Send with a checksum while the store takes them; retry a body the server found corrupted.
pub async fn send_with_checksum<T, F, Fut>(caps: &Capabilities, send: F) -> StoreResult<T>
where
    F: Fn(bool) -> Fut,
    Fut: std::future::Future<Output = StoreResult<T>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let with = caps.checksums();
        match retry_transient(|| send(with)).await {
            Ok(v) => return Ok(v),
            Err(e) if with && caps.learn(&e) => continue,
            Err(StoreError::Checksum(m)) if attempt < CHECKSUM_ATTEMPTS => {
                tracing::warn!(error = %m, attempt, "server rejected a body as corrupted; sending it again");
            }
            Err(e) => return Err(e),
        }
    }
}

/// Compare the checksum the server reports with ours. Returns false only on a real mismatch;
/// a store that reports none is accepted (it was told the part checksums).
pub fn verify_checksum(
    key: &str,
    reported: Option<&str>,
    part_crcs: &[u32],
    whole: Option<u32>,
) -> bool {
    let Some(reported) = reported else {
        tracing::debug!(key, "store reported no object checksum");
        return true;
    };
    if reported.contains('-') {
        return reported == composite_crc32(part_crcs);
    }
    whole.is_some_and(|w| reported == crc32_header(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_pieces_cover_the_object_in_parts_of_at_most_5_gib() {
        for size in [
            1,
            5 << 20,
            MAX_PART,
            MAX_PART + 1,
            3 * MAX_PART - 7,
            100 << 30,
        ] {
            let pieces: Vec<ByteRange> = copy_pieces(size).collect();
            assert_eq!(pieces.len() as u64, size.div_ceil(MAX_PART), "{size}");
            let mut at = 0;
            for p in &pieces {
                assert_eq!(p.start, at, "{size}");
                assert!(!p.is_empty() && p.len() <= MAX_PART, "{size}");
                at = p.end;
            }
            assert_eq!(at, size);
        }
        assert_eq!(copy_pieces(0).count(), 0);
    }
}
