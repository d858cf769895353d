//! The S3 implementation of [`ObjectStore`], on the AWS SDK. The only file that imports it.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::config::RequestChecksumCalculation;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::list_objects_v2::builders::ListObjectsV2FluentBuilder;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, ChecksumMode, ChecksumType, CompletedMultipartUpload, MetadataDirective,
};
use aws_sdk_s3::Client;
use bytes::Bytes;

use super::*;

/// Static credentials (from an s3fs-style passwd file). Debug never shows the secret.
#[derive(Clone, Default)]
pub struct StaticCredentials {
    pub access_key: String,
    pub secret_key: String,
}

impl fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .finish()
    }
}

/// How to reach the bucket. Built by `config.rs` from the command line.
#[derive(Clone, Debug, Default)]
pub struct S3Settings {
    pub bucket: String,
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub force_path_style: bool,
    pub profile: Option<String>,
    pub no_sign_request: bool,
    /// Attempts per request, including the first.
    pub max_attempts: u32,
    pub connect_timeout: Duration,
    /// Credentials to use instead of the standard AWS chain.
    pub credentials: Option<StaticCredentials>,
    /// PEM bundle of extra CAs to trust besides the system roots (private endpoints).
    pub ca_bundle: Option<std::path::PathBuf>,
    /// A response that sends no byte for this long is given up and retried from where it
    /// stopped (also the time allowed to the first byte).
    pub stall_timeout: Duration,
    /// When upload bodies are hashed into the signature.
    pub payload_signing: PayloadSigning,
    /// Bytes of idle GET body buffers kept for reuse (a freed buffer would otherwise fault in
    /// every page again when the next GET fills it); config takes them out of --max-memory.
    pub idle_buffers: usize,
}

/// When an upload body is hashed (SHA-256) into the request's SigV4 signature.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PayloadSigning {
    /// Always, except over HTTPS for a body that carries a CRC32 the server checks: TLS guards
    /// it against tampering, the CRC32 against corruption.
    #[default]
    Auto,
    Always,
    /// Never (UNSIGNED-PAYLOAD), also over plain HTTP.
    Never,
}

impl PayloadSigning {
    /// Is a body sent unsigned, over a connection that is `tls` or not, with a CRC32 or not?
    pub fn unsigned(self, tls: bool, has_crc32: bool) -> bool {
        match self {
            PayloadSigning::Auto => tls && has_crc32,
            PayloadSigning::Always => false,
            PayloadSigning::Never => true,
        }
    }
}

pub struct S3Store {
    client: Client,
    bucket: String,
    stall_timeout: Duration,
    max_attempts: u32,
    traffic: Arc<Traffic>,
    payload_signing: PayloadSigning,
    /// The endpoint is HTTPS (AWS's own when no endpoint is given).
    tls: bool,
    buffers: Arc<super::buffers::BufferPool>,
    /// Large GETs in flight at once: each keeps a connection busy whose read buffer (up to
    /// ~400 KiB in hyper) the memory budget does not see.
    large_gets: Arc<tokio::sync::Semaphore>,
}

/// Most GETs of a MiB or more in flight at once, over all files (six full read-ahead windows).
/// Smaller ones (random reads, small files) never wait behind them.
const MAX_LARGE_GETS: usize = 48;

/// Requests sent and bytes moved, for the summary logged at unmount (and the benchmark).
#[derive(Debug, Default)]
pub struct Traffic {
    pub lists: AtomicU64,
    pub heads: AtomicU64,
    pub gets: AtomicU64,
    pub puts: AtomicU64,
    pub other: AtomicU64,
    /// Body bytes received by GETs.
    pub bytes_down: AtomicU64,
    /// Body bytes sent by PUTs and UploadParts.
    pub bytes_up: AtomicU64,
    /// GETs whose body needed a pooled-size buffer, and how many got an idle one.
    pub large_gets: AtomicU64,
    pub reused_buffers: AtomicU64,
}

impl fmt::Display for Traffic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        write!(
            f,
            "{} LIST, {} HEAD, {} GET, {} PUT/part, {} other requests; {} bytes fetched, {} bytes uploaded; {} of {} large GETs had a reused buffer",
            n(&self.lists),
            n(&self.heads),
            n(&self.gets),
            n(&self.puts),
            n(&self.other),
            n(&self.bytes_down),
            n(&self.bytes_up),
            n(&self.reused_buffers),
            n(&self.large_gets)
        )
    }
}

fn count(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket)
            .finish()
    }
}

impl S3Store {
    /// Is an upload body with this CRC32 (or none) sent without hashing it into the signature?
    fn unsigned(&self, crc32: Option<u32>) -> bool {
        self.payload_signing.unsigned(self.tls, crc32.is_some())
    }

    /// One UploadPart of `len` bytes, counted; `unsigned` sends it as UNSIGNED-PAYLOAD.
    #[allow(clippy::too_many_arguments)]
    async fn send_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        body: ByteStream,
        len: u64,
        crc32: Option<u32>,
        unsigned: bool,
    ) -> StoreResult<CompletedPart> {
        count(&self.traffic.puts, 1);
        count(&self.traffic.bytes_up, len);
        crate::metrics::bytes_uploaded(len);
        let req = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(part_number)
            .set_checksum_crc32(crc32.map(crc32_header))
            .content_length(len as i64)
            .body(body);
        let out = if unsigned {
            req.customize().disable_payload_signing().send().await
        } else {
            req.send().await
        }
        .map_err(|e| map_err(e, &format!("{key} part {part_number}")))?;
        Ok(CompletedPart {
            part_number,
            etag: out.e_tag().unwrap_or_default().to_string(),
            checksum_crc32: crc32.map(crc32_header),
        })
    }

    /// Requests and bytes so far (shared: keep it to report after the store is handed on).
    pub fn traffic(&self) -> Arc<Traffic> {
        self.traffic.clone()
    }

    pub async fn connect(s: &S3Settings) -> StoreResult<Self> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::standard().with_max_attempts(s.max_attempts.max(1)))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(s.connect_timeout)
                    .read_timeout(if s.stall_timeout.is_zero() {
                        Duration::from_secs(30)
                    } else {
                        s.stall_timeout
                    })
                    .build(),
            );
        if let Some(p) = &s.profile {
            loader = loader.profile_name(p);
        }
        if let Some(r) = &s.region {
            loader = loader.region(Region::new(r.clone()));
        }
        if s.no_sign_request {
            loader = loader.no_credentials();
        } else if let Some(c) = &s.credentials {
            loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                &c.access_key,
                &c.secret_key,
                None,
                None,
                "s3mount-passwd-file",
            ));
        }
        if let Some(path) = &s.ca_bundle {
            let pem = std::fs::read(path).map_err(|e| {
                StoreError::Other(format!("cannot read CA bundle {}: {e}", path.display()))
            })?;
            use aws_smithy_http_client::tls::{
                self, rustls_provider::CryptoMode, TlsContext, TrustStore,
            };
            let ctx = TlsContext::builder()
                .with_trust_store(TrustStore::default().with_pem_certificate(pem))
                .build()
                .map_err(|e| StoreError::Other(format!("CA bundle {}: {e}", path.display())))?;
            let client = aws_smithy_http_client::Builder::new()
                .tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc))
                .tls_context(ctx)
                .build_https();
            loader = loader.http_client(client);
        }
        if let Some(e) = &s.endpoint_url {
            loader = loader.endpoint_url(e);
        }
        let sdk = loader.load().await;
        if !s.no_sign_request {
            check_credentials(&sdk).await?;
        }
        // Checksums are computed by s3mount (crc32fast, where the data enters) and sent
        // explicitly; the SDK adds none of its own, so stores without checksum support work.
        let mut b = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(s.force_path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired);
        if sdk.region().is_none() {
            // S3-compatible stores rarely care; AWS redirects are handled by the SDK.
            b = b.region(Region::new("us-east-1"));
        }
        if crate::metrics::enabled() {
            b = b.interceptor(MetricsInterceptor);
        }
        Ok(S3Store {
            client: Client::from_conf(b.build()),
            bucket: s.bucket.clone(),
            traffic: Arc::default(),
            buffers: super::buffers::BufferPool::new(s.idle_buffers),
            payload_signing: s.payload_signing,
            tls: s
                .endpoint_url
                .as_deref()
                .is_none_or(|u| u.to_ascii_lowercase().starts_with("https://")),
            large_gets: Arc::new(tokio::sync::Semaphore::new(MAX_LARGE_GETS)),
            stall_timeout: if s.stall_timeout.is_zero() {
                Duration::from_secs(30)
            } else {
                s.stall_timeout
            },
            max_attempts: s.max_attempts.max(1),
        })
    }
}

/// When a request started and how many attempts it has made (kept in the request's config bag).
#[derive(Clone, Debug)]
struct RequestClock {
    start: std::time::Instant,
    attempts: u32,
    first_byte: Option<Duration>,
}

impl aws_smithy_types::config_bag::Storable for RequestClock {
    type Storer = aws_smithy_types::config_bag::StoreReplace<Self>;
}

/// Counts and times every S3 request for the metrics (installed only when they are on):
/// attempts, time to the response headers, time to the parsed response, final status.
#[derive(Debug)]
struct MetricsInterceptor;

impl aws_smithy_runtime_api::client::interceptors::Intercept for MetricsInterceptor {
    fn name(&self) -> &'static str {
        "s3mount-metrics"
    }

    fn read_before_execution(
        &self,
        _ctx: &aws_smithy_runtime_api::client::interceptors::context::BeforeSerializationInterceptorContextRef<'_>,
        cfg: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        cfg.interceptor_state().store_put(RequestClock {
            start: std::time::Instant::now(),
            attempts: 0,
            first_byte: None,
        });
        Ok(())
    }

    fn read_before_attempt(
        &self,
        _ctx: &aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef<'_>,
        _rc: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
        cfg: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        if let Some(mut clock) = cfg.load::<RequestClock>().cloned() {
            clock.attempts += 1;
            cfg.interceptor_state().store_put(clock);
        }
        Ok(())
    }

    fn read_before_deserialization(
        &self,
        _ctx: &aws_smithy_runtime_api::client::interceptors::context::BeforeDeserializationInterceptorContextRef<'_>,
        _rc: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
        cfg: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        if let Some(mut clock) = cfg.load::<RequestClock>().cloned() {
            clock.first_byte = Some(clock.start.elapsed());
            cfg.interceptor_state().store_put(clock);
        }
        Ok(())
    }

    fn read_after_execution(
        &self,
        ctx: &aws_smithy_runtime_api::client::interceptors::context::FinalizerInterceptorContextRef<
            '_,
        >,
        _rc: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
        cfg: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        let Some(clock) = cfg.load::<RequestClock>() else {
            return Ok(());
        };
        let op = cfg
            .load::<aws_smithy_runtime_api::client::orchestrator::Metadata>()
            .map_or("unknown", |m| m.name());
        let status = ctx.response().map(|r| r.status().as_u16());
        let failed = matches!(ctx.output_or_error(), Some(Err(_)) | None);
        crate::metrics::s3_request(
            op,
            clock.attempts,
            clock.first_byte,
            clock.start.elapsed(),
            status,
            failed,
        );
        Ok(())
    }
}

/// Load the credentials once before the first request, so that having none is said as such
/// (the SDK would report it as a failure to send the request, after trying every source).
async fn check_credentials(sdk: &aws_config::SdkConfig) -> StoreResult<()> {
    use aws_credential_types::provider::ProvideCredentials;
    let Some(provider) = sdk.credentials_provider() else {
        return Err(StoreError::NoCredentials("no credentials provider".into()));
    };
    match tokio::time::timeout(Duration::from_secs(15), provider.provide_credentials()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(StoreError::NoCredentials(error_chain(&e))),
        Err(_) => Err(StoreError::NoCredentials(
            "looking for credentials took more than 15 s (instance metadata unreachable?)".into(),
        )),
    }
}

fn to_system_time(t: Option<&aws_sdk_s3::primitives::DateTime>) -> Option<SystemTime> {
    t.and_then(|d| SystemTime::try_from(*d).ok())
}

/// Which feature an error's text names: checksum headers or conditional-write headers.
fn unsupported_feature(detail: &str) -> Option<Feature> {
    let m = detail.to_ascii_lowercase();
    if m.contains("checksum") {
        Some(Feature::Checksums)
    } else if m.contains("if-match") || m.contains("if-none-match") || m.contains("conditional") {
        Some(Feature::ConditionalWrites)
    } else {
        None
    }
}

/// Does an error's text say the named thing is refused (rather than, say, a wrong value)?
fn refuses(detail: &str) -> bool {
    let m = detail.to_ascii_lowercase();
    m.contains("not implemented")
        || m.contains("not supported")
        || m.contains("unsupported")
        || m.contains("invalid")
}

/// An error and its sources as one line (`a: b: c`), each source only where it adds words:
/// what a user reads, without the SDK's `Debug` dump of the same chain.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = e.source();
    }
    // Some errors (the credential chain's) list their attempts one per line.
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Is any error in the chain an I/O error of this kind (a refused connection, say)?
fn chain_has_io(err: &(dyn std::error::Error + 'static), kind: std::io::ErrorKind) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == kind)
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// One place that turns SDK errors into [`StoreError`]s.
fn map_err<E>(err: SdkError<E, aws_smithy_runtime_api::http::Response>, what: &str) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let detail = || format!("{what}: {}", error_chain(&err));
    let status = match &err {
        SdkError::DispatchFailure(d) => {
            let text = detail();
            if text.contains("loading credentials") || text.contains("credentials provider") {
                return StoreError::NoCredentials(text);
            }
            if chain_has_io(&err, std::io::ErrorKind::ConnectionRefused) {
                return StoreError::Unreachable(format!("{what}: connection refused"));
            }
            return if d.is_timeout() {
                StoreError::Timeout(detail())
            } else {
                StoreError::Unreachable(detail())
            };
        }
        SdkError::TimeoutError(_) => return StoreError::Timeout(detail()),
        SdkError::ServiceError(se) => se.raw().status().as_u16(),
        SdkError::ResponseError(re) => re.raw().status().as_u16(),
        _ => return StoreError::Other(detail()),
    };
    let code = err.code().unwrap_or("");
    match (status, code) {
        (_, "NoSuchBucket") => StoreError::NoSuchBucket(what.to_string()),
        (404, _) | (_, "NoSuchKey") => StoreError::NotFound(what.to_string()),
        (403, _) | (_, "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch") => {
            StoreError::AccessDenied(format!(
                "{what}: {}",
                if code.is_empty() {
                    "403 Forbidden"
                } else {
                    code
                }
            ))
        }
        (412, _) | (_, "PreconditionFailed") => StoreError::PreconditionFailed(what.to_string()),
        (416, _) | (_, "InvalidRange") => StoreError::InvalidRange(what.to_string()),
        (501, _) | (_, "NotImplemented") => StoreError::Unsupported {
            feature: unsupported_feature(&detail()).unwrap_or(Feature::Unknown),
            detail: detail(),
        },
        (400, "InvalidRequest" | "InvalidArgument" | "") => {
            // Some stores refuse a header they do not implement with a 400 that names it.
            let detail = detail();
            match unsupported_feature(&detail) {
                Some(feature) if refuses(&detail) => StoreError::Unsupported { feature, detail },
                _ => StoreError::Other(detail),
            }
        }
        (
            _,
            "BadDigest"
            | "InvalidDigest"
            | "XAmzContentChecksumMismatch"
            | "InvalidChecksum"
            | "XAmzContentSHA256Mismatch",
        ) => {
            crate::metrics::count(crate::metrics::CHECKSUM_MISMATCHES);
            StoreError::Checksum(detail())
        }
        _ => StoreError::Other(detail()),
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn list_page(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<String>,
        max_keys: Option<i32>,
    ) -> StoreResult<ListPage> {
        self.list(
            self.client
                .list_objects_v2()
                .prefix(prefix)
                .set_delimiter(delimiter.map(str::to_string))
                .set_continuation_token(continuation)
                .set_max_keys(max_keys),
            prefix,
        )
        .await
    }

    async fn list_page_after(&self, prefix: &str, start_after: &str) -> StoreResult<ListPage> {
        self.list(
            self.client
                .list_objects_v2()
                .prefix(prefix)
                .start_after(start_after),
            prefix,
        )
        .await
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        count(&self.traffic.heads, 1);
        let out = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await
            .map_err(|e| map_err(e, key))?;
        let metadata = out
            .metadata()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        Ok(ObjectMeta {
            key: key.to_string(),
            size: out.content_length().unwrap_or(0).max(0) as u64,
            etag: out.e_tag().map(str::to_string),
            last_modified: to_system_time(out.last_modified()),
            content_type: out.content_type().map(str::to_string),
            metadata,
            has_metadata: true,
            checksum_crc32: out.checksum_crc32().map(str::to_string),
        })
    }

    async fn get_range(
        &self,
        key: &str,
        range: ByteRange,
        if_match: Option<&str>,
    ) -> StoreResult<Bytes> {
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        Ok(self
            .get_resuming(key, Some(range), range.len(), if_match, None)
            .await?
            .body)
    }

    async fn get_range_crcs(
        &self,
        key: &str,
        range: ByteRange,
        if_match: Option<&str>,
        block: u64,
    ) -> StoreResult<(Bytes, Vec<u32>)> {
        if range.is_empty() {
            return Ok((Bytes::new(), Vec::new()));
        }
        let got = self
            .get_resuming(key, Some(range), range.len(), if_match, Some(block))
            .await?;
        Ok((got.body, got.crcs))
    }

    async fn get_whole(
        &self,
        key: &str,
        size_hint: u64,
        if_match: Option<&str>,
    ) -> StoreResult<(Bytes, Option<String>)> {
        let got = self
            .get_resuming(key, None, size_hint, if_match, None)
            .await?;
        Ok((got.body, got.checksum))
    }

    async fn part_size(&self, key: &str, part_number: i32) -> StoreResult<u64> {
        count(&self.traffic.heads, 1);
        let out = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .part_number(part_number)
            .send()
            .await
            .map_err(|e| map_err(e, key))?;
        Ok(out.content_length().unwrap_or(0).max(0) as u64)
    }

    async fn put(
        &self,
        key: &str,
        body: Bytes,
        opts: &PutOptions,
        crc32: Option<u32>,
    ) -> StoreResult<PutResult> {
        count(&self.traffic.puts, 1);
        count(&self.traffic.bytes_up, body.len() as u64);
        crate::metrics::bytes_uploaded(body.len() as u64);
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .set_checksum_crc32(crc32.map(crc32_header))
            .set_content_type(opts.content_type.clone())
            .body(ByteStream::from(body));
        for (k, v) in &opts.metadata {
            req = req.metadata(k, v);
        }
        req = match &opts.condition {
            PutCondition::Overwrite => req,
            PutCondition::IfNoneMatch => req.if_none_match("*"),
            PutCondition::IfMatch(tag) => req.if_match(tag),
        };
        let out = if self.unsigned(crc32) {
            req.customize().disable_payload_signing().send().await
        } else {
            req.send().await
        }
        .map_err(|e| map_err(e, key))?;
        Ok(PutResult {
            etag: out.e_tag().map(str::to_string),
            checksum_crc32: out.checksum_crc32().map(str::to_string),
        })
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        count(&self.traffic.other, 1);
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| map_err(e, key))?;
        Ok(())
    }

    async fn copy_object(
        &self,
        source_key: &str,
        source_etag: &str,
        key: &str,
        opts: &PutOptions,
    ) -> StoreResult<PutResult> {
        count(&self.traffic.other, 1);
        let mut req = self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(key)
            .copy_source(format!("{}/{}", self.bucket, encode_key(source_key)))
            .copy_source_if_match(source_etag)
            .metadata_directive(MetadataDirective::Replace)
            .set_content_type(opts.content_type.clone());
        for (k, v) in &opts.metadata {
            req = req.metadata(k, v);
        }
        let out = req
            .send()
            .await
            .map_err(|e| map_err(e, &format!("copy {source_key} to {key}")))?;
        let result = out.copy_object_result();
        Ok(PutResult {
            etag: result.and_then(|r| r.e_tag()).map(str::to_string),
            checksum_crc32: result.and_then(|r| r.checksum_crc32()).map(str::to_string),
        })
    }

    async fn create_multipart(
        &self,
        key: &str,
        opts: &PutOptions,
        checksum: bool,
    ) -> StoreResult<String> {
        count(&self.traffic.other, 1);
        let mut req = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .set_checksum_algorithm(checksum.then_some(ChecksumAlgorithm::Crc32))
            .set_checksum_type(checksum.then_some(ChecksumType::FullObject))
            .set_content_type(opts.content_type.clone());
        for (k, v) in &opts.metadata {
            req = req.metadata(k, v);
        }
        let out = req.send().await.map_err(|e| map_err(e, key))?;
        out.upload_id().map(str::to_string).ok_or_else(|| {
            StoreError::Other(format!(
                "{key}: CreateMultipartUpload returned no upload id"
            ))
        })
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        body: Bytes,
        crc32: Option<u32>,
    ) -> StoreResult<CompletedPart> {
        let (len, unsigned) = (body.len() as u64, self.unsigned(crc32));
        let body = ByteStream::from(body);
        self.send_part(key, upload_id, part_number, body, len, crc32, unsigned)
            .await
    }

    async fn upload_part_file(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        path: &std::path::Path,
        len: u64,
        crc32: Option<u32>,
    ) -> StoreResult<CompletedPart> {
        // Read from the file as it is sent (and again on a retry): the part never sits in
        // memory. A body that is not in memory goes as UNSIGNED-PAYLOAD; its CRC32 guards it.
        let body = ByteStream::read_from()
            .path(path)
            .length(aws_smithy_types::byte_stream::Length::Exact(len))
            .build()
            .await
            .map_err(|e| StoreError::Other(format!("{}: {e}", path.display())))?;
        self.send_part(key, upload_id, part_number, body, len, crc32, true)
            .await
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
        count(&self.traffic.other, 1);
        let out = self
            .client
            .upload_part_copy()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(part_number)
            .copy_source(format!("{}/{}", self.bucket, encode_key(source_key)))
            .copy_source_range(format!("bytes={}-{}", range.start, range.end - 1))
            .copy_source_if_match(source_etag)
            .send()
            .await
            .map_err(|e| {
                map_err(
                    e,
                    &format!("{key} part {part_number} (copy of {source_key})"),
                )
            })?;
        let result = out.copy_part_result();
        Ok(CompletedPart {
            part_number,
            etag: result
                .and_then(|r| r.e_tag())
                .unwrap_or_default()
                .to_string(),
            checksum_crc32: result.and_then(|r| r.checksum_crc32()).map(str::to_string),
        })
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
        condition: &PutCondition,
    ) -> StoreResult<PutResult> {
        count(&self.traffic.other, 1);
        let parts_len = parts.len();
        let parts = parts
            .into_iter()
            .map(|p| {
                aws_sdk_s3::types::CompletedPart::builder()
                    .part_number(p.part_number)
                    .e_tag(p.etag)
                    .set_checksum_crc32(p.checksum_crc32)
                    .build()
            })
            .collect();
        let mut req = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            );
        req = match condition {
            PutCondition::Overwrite => req,
            PutCondition::IfNoneMatch => req.if_none_match("*"),
            PutCondition::IfMatch(tag) => req.if_match(tag),
        };
        let nparts = parts_len;
        let out = match req.send().await {
            Ok(out) => out,
            Err(e) if is_unparseable_success(&e) => {
                // Some stores (moto) answer 200 with a body the SDK cannot parse; the upload did
                // complete. Confirm with a HEAD: a multipart ETag ends in -<number of parts>.
                let head = self.head(key).await?;
                let tag = head.etag.clone().unwrap_or_default();
                if tag.trim_matches('"').ends_with(&format!("-{nparts}")) {
                    tracing::debug!(
                        key,
                        "CompleteMultipartUpload answer unparseable; HEAD confirms the object"
                    );
                    return Ok(PutResult {
                        etag: head.etag,
                        checksum_crc32: None,
                    });
                }
                return Err(map_err(e, key));
            }
            Err(e) => return Err(map_err(e, key)),
        };
        Ok(PutResult {
            etag: out.e_tag().map(str::to_string),
            checksum_crc32: out.checksum_crc32().map(str::to_string),
        })
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        count(&self.traffic.other, 1);
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| map_err(e, key))?;
        Ok(())
    }

    async fn list_multipart_uploads(&self, prefix: &str) -> StoreResult<Vec<OpenUpload>> {
        count(&self.traffic.other, 1);
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker) = (None, None);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_key_marker(key_marker)
                .set_upload_id_marker(id_marker)
                .send()
                .await
                .map_err(|e| map_err(e, &format!("list uploads s3://{}/{prefix}", self.bucket)))?;
            out.extend(page.uploads().iter().filter_map(|u| {
                Some(OpenUpload {
                    key: u.key()?.to_string(),
                    upload_id: u.upload_id()?.to_string(),
                })
            }));
            if !page.is_truncated().unwrap_or(false) {
                return Ok(out);
            }
            key_marker = page.next_key_marker().map(str::to_string);
            id_marker = page.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() {
                return Ok(out);
            }
        }
    }
}

impl S3Store {
    /// Send a ListObjectsV2 request built by the caller and convert its page.
    async fn list(&self, req: ListObjectsV2FluentBuilder, prefix: &str) -> StoreResult<ListPage> {
        count(&self.traffic.lists, 1);
        let started = std::time::Instant::now();
        let out = req
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| map_err(e, &format!("list s3://{}/{prefix}", self.bucket)))?;
        tracing::debug!(
            prefix,
            start_after = out.start_after().unwrap_or(""),
            keys = out.key_count().unwrap_or(0),
            ms = started.elapsed().as_secs_f64() * 1000.0,
            "LIST"
        );
        let objects = out
            .contents()
            .iter()
            .filter_map(|o| {
                Some(ObjectMeta {
                    key: o.key()?.to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    etag: o.e_tag().map(str::to_string),
                    last_modified: to_system_time(o.last_modified()),
                    ..Default::default()
                })
            })
            .collect();
        let common_prefixes = out
            .common_prefixes()
            .iter()
            .filter_map(|p| p.prefix().map(str::to_string))
            .collect();
        let next_token = if out.is_truncated().unwrap_or(false) {
            out.next_continuation_token().map(str::to_string)
        } else {
            None
        };
        Ok(ListPage {
            objects,
            common_prefixes,
            next_token,
        })
    }

    /// GET `range` (or the whole object, with its stored checksum), with the piece CRC32s for
    /// `crc_block` when asked; a body that breaks or stalls half way is resumed from the byte
    /// where it stopped (still pinned to the same ETag). The SDK itself retries failed requests.
    async fn get_resuming(
        &self,
        key: &str,
        range: Option<ByteRange>,
        size_hint: u64,
        if_match: Option<&str>,
        crc_block: Option<u64>,
    ) -> StoreResult<Got> {
        let large = size_hint >= super::buffers::MIN_POOLED as u64;
        let _permit = if large {
            Some(self.large_gets.acquire().await.expect("never closed"))
        } else {
            None
        };
        let (buf, reused) = self.buffers.take(size_hint as usize);
        if large {
            count(&self.traffic.large_gets, 1);
            count(&self.traffic.reused_buffers, reused as u64);
        }
        let start = range.map_or(0, |r| r.start);
        let new_crcs = || crc_block.map(|b| PieceCrcs::new(start, b));
        let mut sink = Sink {
            buf,
            crcs: new_crcs(),
        };
        let mut failures = 0;
        let mut resumed = false;
        loop {
            let received = sink.buf.len() as u64;
            let part = match (range, received) {
                (None, 0) => None,
                // Everything arrived before the body broke: done (unverified by the GET).
                (None, _) if received >= size_hint && size_hint > 0 => {
                    return Ok(sink.finish(&self.buffers, None))
                }
                (None, _) => Some(ByteRange::new(received, u64::MAX)),
                (Some(r), _) => Some(ByteRange::new(r.start + received, r.end)),
            };
            match self.get_body_into(key, part, if_match, &mut sink).await {
                // A resumed whole-object read has no checksum for the whole.
                Ok(c) => {
                    let sum = c.filter(|_| range.is_none() && !resumed);
                    return Ok(sink.finish(&self.buffers, sum));
                }
                Err(StoreError::Checksum(e)) if failures + 1 < self.max_attempts => {
                    // Corrupted on the way: nothing of it can be trusted, start over.
                    failures += 1;
                    tracing::warn!(key, error = %e, attempt = failures, "GET body failed its checksum; fetching it again");
                    sink.buf.clear();
                    sink.crcs = new_crcs();
                    resumed = false;
                }
                Err(e)
                    if matches!(e, StoreError::Timeout(_) | StoreError::Unreachable(_))
                        && failures + 1 < self.max_attempts =>
                {
                    failures += 1;
                    resumed |= !sink.buf.is_empty();
                    tracing::warn!(key, error = %e, received = sink.buf.len(), attempt = failures, "GET body interrupted; resuming where it stopped");
                    tokio::time::sleep(Duration::from_millis(100 << failures.min(6))).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One GET of `range` (None: the whole object, asking for its checksum) appended to `out`.
    async fn get_body_into(
        &self,
        key: &str,
        range: Option<ByteRange>,
        if_match: Option<&str>,
        out: &mut Sink,
    ) -> StoreResult<Option<String>> {
        count(&self.traffic.gets, 1);
        let resp = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .set_range(range.map(|r| {
                if r.end == u64::MAX {
                    format!("bytes={}-", r.start)
                } else {
                    format!("bytes={}-{}", r.start, r.end - 1)
                }
            }))
            .set_checksum_mode(range.is_none().then_some(ChecksumMode::Enabled))
            .set_if_match(if_match.map(str::to_string))
            .send()
            .await
            .map_err(|e| map_err(e, key))?;
        let checksum = resp.checksum_crc32().map(str::to_string);
        let expected = resp.content_length().map(|n| n.max(0) as u64);
        let mut body = resp.body;
        let mut received = 0u64;
        loop {
            match tokio::time::timeout(self.stall_timeout, body.next()).await {
                Err(_) => {
                    return Err(StoreError::Timeout(format!(
                        "{key}: no data for {} s after {received} bytes of the body",
                        self.stall_timeout.as_secs()
                    )))
                }
                Ok(None) => break,
                Ok(Some(Ok(chunk))) => {
                    received += chunk.len() as u64;
                    count(&self.traffic.bytes_down, chunk.len() as u64);
                    crate::metrics::bytes_fetched(chunk.len() as u64);
                    out.extend(&chunk);
                }
                Ok(Some(Err(e))) => {
                    let what = format!(
                        "{key}: reading body after {received} bytes: {}",
                        error_chain(&e)
                    );
                    // The SDK checks a whole-object body against the checksum the store sent.
                    return Err(if what.to_ascii_lowercase().contains("checksum") {
                        crate::metrics::count(crate::metrics::CHECKSUM_MISMATCHES);
                        StoreError::Checksum(what)
                    } else {
                        StoreError::Unreachable(what)
                    });
                }
            }
        }
        match expected {
            Some(n) if received < n => Err(StoreError::Unreachable(format!(
                "{key}: body ended after {received} of {n} bytes"
            ))),
            _ => Ok(checksum),
        }
    }
}

/// What [`S3Store::get_resuming`] received.
struct Got {
    body: Bytes,
    /// The object's stored CRC32 (whole-object GETs that were not resumed).
    checksum: Option<String>,
    /// The body's piece CRC32s, when asked for.
    crcs: Vec<u32>,
}

/// A GET body being received: each chunk is copied in and, when piece CRCs are wanted, hashed
/// right away from the copy, while it is still in the CPU cache.
struct Sink {
    buf: Vec<u8>,
    crcs: Option<PieceCrcs>,
}

impl Sink {
    fn extend(&mut self, chunk: &[u8]) {
        let from = self.buf.len();
        self.buf.extend_from_slice(chunk);
        if let Some(c) = &mut self.crcs {
            c.update(&self.buf[from..]);
        }
    }

    fn finish(self, pool: &Arc<super::buffers::BufferPool>, checksum: Option<String>) -> Got {
        Got {
            body: pool.freeze(self.buf),
            checksum,
            crcs: self.crcs.map(PieceCrcs::finish).unwrap_or_default(),
        }
    }
}

/// A 200 answer whose body the SDK could not parse.
fn is_unparseable_success<E>(err: &SdkError<E, aws_smithy_runtime_api::http::Response>) -> bool {
    match err {
        SdkError::ServiceError(se) => se.raw().status().as_u16() == 200,
        SdkError::ResponseError(re) => re.raw().status().as_u16() == 200,
        _ => false,
    }
}

/// Percent-encode a key for x-amz-copy-source (everything but unreserved characters and `/`).
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod classify_tests {
    use super::*;

    #[test]
    fn refusals_name_the_feature_they_refuse() {
        let cases = [
            ("put k: NotImplemented: x-amz-checksum-crc32 header is not implemented", Some(Feature::Checksums)),
            ("put k: InvalidRequest: Unsupported checksum algorithm", Some(Feature::Checksums)),
            ("put k: NotImplemented: If-None-Match not supported", Some(Feature::ConditionalWrites)),
            ("put k: NotImplemented: A header you provided implies functionality that is not implemented", None),
        ];
        for (text, want) in cases {
            assert_eq!(unsupported_feature(text), want, "{text}");
        }
        assert!(refuses("x-amz-checksum-crc32 header is not implemented"));
        assert!(!refuses("BadDigest: the CRC32 you specified did not match"));
    }
}
