//! Metrics: what the daemon counts, and the Prometheus/OpenMetrics endpoint that serves them
//! (`--metrics-addr`). Every layer records through the functions and names here (the `metrics`
//! crate's macros underneath); without `--metrics-addr` every function returns after one
//! relaxed load ([`enabled`]), on hot paths too (a cache lookup, a body chunk).
//!
//! Names follow Mountpoint for S3's where it has one (`fuse.request_latency`,
//! `s3.request_count`, ...; Prometheus shows the dots as underscores), latencies in
//! microseconds as there, so dashboards carry over.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

static ENABLED: AtomicBool = AtomicBool::new(false);

pub const FUSE_REQUEST_LATENCY: &str = "fuse.request_latency";
pub const FUSE_REQUEST_ERRORS: &str = "fuse.request_errors";
pub const S3_REQUEST_COUNT: &str = "s3.request_count";
pub const S3_REQUEST_ERRORS: &str = "s3.request_errors";
pub const S3_REQUEST_RETRIES: &str = "s3.request_retries";
pub const S3_FIRST_BYTE_LATENCY: &str = "s3.request_first_byte_latency";
pub const S3_TOTAL_LATENCY: &str = "s3.request_total_latency";
pub const S3_BYTES_FETCHED: &str = "s3.bytes_fetched";
pub const S3_BYTES_UPLOADED: &str = "s3.bytes_uploaded";
pub const CACHE_HITS: &str = "cache.hits";
pub const CACHE_MISSES: &str = "cache.misses";
pub const CACHE_EVICTIONS: &str = "cache.evictions";
pub const CACHE_BYTES: &str = "cache.bytes";
pub const PREFETCH_RESETS: &str = "prefetch.window_resets";
pub const COMMITS: &str = "upload.commits";
pub const COMMIT_FAILURES: &str = "upload.commit_failures";
pub const CONFLICTS: &str = "upload.conflicts";
pub const CHECKSUM_MISMATCHES: &str = "checksum.mismatches";
pub const RECOVERED_FILES: &str = "upload.recovered_files";
pub const MEMORY_USAGE: &str = "process.memory_usage";
pub const BUDGET_USED: &str = "memory.budget_used";
pub const BUDGET_LIMIT: &str = "memory.budget_limit";
pub const UPLOADS_IN_FLIGHT: &str = "upload.files_in_flight";
pub const UPLOAD_BYTES_PENDING: &str = "upload.bytes_pending";
pub const STAGED_FILES: &str = "staging.files";
pub const STAGED_BYTES: &str = "staging.bytes";

/// Are metrics being collected? (Cheap: one relaxed load.)
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Latency buckets in microseconds: 100 µs to 30 s.
const LATENCY_BUCKETS_US: &[f64] = &[
    100.0, 250.0, 500.0, 1e3, 2.5e3, 5e3, 10e3, 25e3, 50e3, 100e3, 250e3, 500e3, 1e6, 2.5e6, 5e6,
    10e6, 30e6,
];

/// Serve `/metrics` on `addr` from now on (on the current tokio runtime).
pub fn install(addr: SocketAddr) -> Result<(), String> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(LATENCY_BUCKETS_US)
        .map_err(|e| format!("metrics: {e}"))?
        .install()
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    ENABLED.store(true, Ordering::Relaxed);
    describe();
    Ok(())
}

fn describe() {
    use metrics::Unit;
    describe_histogram!(
        FUSE_REQUEST_LATENCY,
        Unit::Microseconds,
        "Time to answer a FUSE request, by op"
    );
    describe_counter!(
        FUSE_REQUEST_ERRORS,
        "FUSE requests answered with an error, by op and errno"
    );
    describe_counter!(
        S3_REQUEST_COUNT,
        "S3 requests, by op (GetObject, PutObject, ...)"
    );
    describe_counter!(
        S3_REQUEST_ERRORS,
        "S3 requests that failed, by op and http_status (0: no response)"
    );
    describe_counter!(
        S3_REQUEST_RETRIES,
        "S3 request attempts after the first, by op"
    );
    describe_histogram!(
        S3_FIRST_BYTE_LATENCY,
        Unit::Microseconds,
        "Time to the response headers of an S3 request, by op"
    );
    describe_histogram!(
        S3_TOTAL_LATENCY,
        Unit::Microseconds,
        "Time until an S3 request's response is parsed (bodies of GETs stream after), by op"
    );
    describe_counter!(
        S3_BYTES_FETCHED,
        Unit::Bytes,
        "Bytes of object bodies received"
    );
    describe_counter!(
        S3_BYTES_UPLOADED,
        Unit::Bytes,
        "Bytes of object and part bodies sent"
    );
    describe_counter!(
        CACHE_HITS,
        "Reads answered from the block cache, by cache (memory, disk)"
    );
    describe_counter!(CACHE_MISSES, "Block cache lookups that missed, by cache");
    describe_counter!(CACHE_EVICTIONS, "Blocks removed to make room, by cache");
    describe_counter!(
        CACHE_BYTES,
        Unit::Bytes,
        "Bytes served from the block cache, by cache"
    );
    describe_counter!(
        PREFETCH_RESETS,
        "Read-ahead windows started over (a reader jumped)"
    );
    describe_counter!(COMMITS, "Files committed to the bucket (close, fsync)");
    describe_counter!(
        COMMIT_FAILURES,
        "Commits that failed for good (the data is kept locally)"
    );
    describe_counter!(
        CONFLICTS,
        "Commits refused because another writer changed the object (412)"
    );
    describe_counter!(CHECKSUM_MISMATCHES, "Bodies whose CRC32 did not match");
    describe_counter!(
        RECOVERED_FILES,
        "Files whose data was kept in the recovery folder"
    );
    describe_gauge!(MEMORY_USAGE, Unit::Bytes, "Resident set size of the daemon");
    describe_gauge!(
        BUDGET_USED,
        Unit::Bytes,
        "Memory budget in use by read and write buffers"
    );
    describe_gauge!(
        BUDGET_LIMIT,
        Unit::Bytes,
        "Memory budget (--max-memory less idle buffers)"
    );
    describe_gauge!(
        UPLOADS_IN_FLIGHT,
        "Files open for writing with bytes not yet committed"
    );
    describe_gauge!(
        UPLOAD_BYTES_PENDING,
        Unit::Bytes,
        "Bytes written to open files and not yet in the bucket"
    );
    describe_gauge!(
        STAGED_FILES,
        "Files in the mount's state directory (staged, spooled, recovered)"
    );
    describe_gauge!(
        STAGED_BYTES,
        Unit::Bytes,
        "Bytes in the mount's state directory"
    );
}

pub fn fuse_request(op: &'static str, took: Duration) {
    histogram!(FUSE_REQUEST_LATENCY, "op" => op).record(took.as_micros() as f64);
}

pub fn fuse_error(op: &'static str, errno: i32) {
    counter!(FUSE_REQUEST_ERRORS, "op" => op, "errno" => errno_name(errno)).increment(1);
}

/// One S3 request: its op, how many attempts, the final HTTP status (None: no response).
pub fn s3_request(
    op: &str,
    attempts: u32,
    first_byte: Option<Duration>,
    total: Duration,
    status: Option<u16>,
    failed: bool,
) {
    let op = op.to_string();
    counter!(S3_REQUEST_COUNT, "op" => op.clone()).increment(1);
    if attempts > 1 {
        counter!(S3_REQUEST_RETRIES, "op" => op.clone()).increment(u64::from(attempts - 1));
    }
    if failed {
        let status = status.unwrap_or(0).to_string();
        counter!(S3_REQUEST_ERRORS, "op" => op.clone(), "http_status" => status).increment(1);
    }
    if let Some(fb) = first_byte {
        histogram!(S3_FIRST_BYTE_LATENCY, "op" => op.clone()).record(fb.as_micros() as f64);
    }
    histogram!(S3_TOTAL_LATENCY, "op" => op).record(total.as_micros() as f64);
}

pub fn bytes_fetched(n: u64) {
    if !enabled() {
        return;
    }
    counter!(S3_BYTES_FETCHED).increment(n);
}

pub fn bytes_uploaded(n: u64) {
    if !enabled() {
        return;
    }
    counter!(S3_BYTES_UPLOADED).increment(n);
}

/// A block cache lookup: `cache` is "memory" or "disk"; `bytes` served on a hit.
pub fn cache_lookup(cache: &'static str, hit: bool, bytes: u64) {
    if !enabled() {
        return;
    }
    if hit {
        counter!(CACHE_HITS, "cache" => cache).increment(1);
        counter!(CACHE_BYTES, "cache" => cache).increment(bytes);
    } else {
        counter!(CACHE_MISSES, "cache" => cache).increment(1);
    }
}

pub fn cache_evicted(cache: &'static str, blocks: u64) {
    if !enabled() {
        return;
    }
    counter!(CACHE_EVICTIONS, "cache" => cache).increment(blocks);
}

pub fn prefetch_reset() {
    if !enabled() {
        return;
    }
    counter!(PREFETCH_RESETS).increment(1);
}

pub fn count(name: &'static str) {
    if !enabled() {
        return;
    }
    counter!(name).increment(1);
}

/// The gauges that describe a moment: set by the sampler every second.
pub struct Gauges {
    pub budget_used: u64,
    pub budget_limit: u64,
    pub uploads_in_flight: u64,
    pub upload_bytes_pending: u64,
    pub staged_files: u64,
    pub staged_bytes: u64,
}

pub fn set_gauges(g: &Gauges) {
    gauge!(MEMORY_USAGE).set(rss_bytes() as f64);
    gauge!(BUDGET_USED).set(g.budget_used as f64);
    gauge!(BUDGET_LIMIT).set(g.budget_limit as f64);
    gauge!(UPLOADS_IN_FLIGHT).set(g.uploads_in_flight as f64);
    gauge!(UPLOAD_BYTES_PENDING).set(g.upload_bytes_pending as f64);
    gauge!(STAGED_FILES).set(g.staged_files as f64);
    gauge!(STAGED_BYTES).set(g.staged_bytes as f64);
}

/// Resident set size of this process, from /proc/self/statm.
pub fn rss_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(4096) as u64
}

/// `ENOENT` for 2; `other` for errnos without a name here.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ENODATA => "ENODATA",
        libc::ENOTSUP => "ENOTSUP",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ESTALE => "ESTALE",
        libc::EINTR => "EINTR",
        _ => "other",
    }
}
