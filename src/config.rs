//! Every tunable with its default, validated once, in one place.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::cli::Cli;
use crate::data::cache::{CacheConfig, DiskCacheConfig};
use crate::data::commit::UploadConfig;
use crate::data::prefetch::PrefetchConfig;
use crate::fs::{AttrDefaults, FsConfig};
use crate::store::s3::{PayloadSigning, S3Settings, StaticCredentials};

#[derive(Clone, Debug)]
pub struct Config {
    /// As the user wrote it, shown in `mount` output.
    pub source: String,
    pub bucket: String,
    pub prefix: String,
    pub mountpoint: PathBuf,
    pub s3: S3Settings,
    pub fs: FsConfig,
    pub foreground: bool,
    /// A supervisor keeps the connection, a worker serves it (src/supervisor.rs); off with
    /// `--no-supervise`.
    pub supervise: bool,
    pub debug: bool,
    pub log_file: Option<PathBuf>,
    pub log_format: crate::logging::LogFormat,
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The options given, for `s3mount status` (set by main from the command line).
    pub given_options: Vec<String>,
    /// Base of the per-mount state directories (staging, spool, recovered data).
    pub state_base: PathBuf,
    /// This mount's name among others: names its state directory, socket and log file.
    pub id: crate::paths::MountId,
    pub allow_other: bool,
    pub allow_root: bool,
    pub read_only: bool,
    /// Mount over a directory that holds something (-o nonempty).
    pub nonempty: bool,
    /// Kernel read-ahead for the mount, KiB (set through /sys/class/bdi when root).
    pub kernel_readahead_kb: u32,
}

/// Split `BUCKET`, `BUCKET:/PREFIX`, `BUCKET:PREFIX` or `s3://BUCKET/PREFIX` into a bucket and a
/// prefix that is empty or ends in `/`.
/// Disk cache size when --cache-dir is given without --max-cache-size.
pub const DEFAULT_DISK_CACHE: u64 = 4 << 30;

pub fn parse_source(source: &str) -> Result<(String, String), String> {
    let s = source.trim();
    let (bucket, prefix) = if let Some(rest) = s.strip_prefix("s3://") {
        rest.split_once('/').unwrap_or((rest, ""))
    } else {
        s.split_once(':').unwrap_or((s, ""))
    };
    if bucket.is_empty() {
        return Err(format!(
            "no bucket name in '{source}' (expected BUCKET, BUCKET:/PREFIX or s3://BUCKET/PREFIX)"
        ));
    }
    if bucket.len() > 255
        || !bucket
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    {
        return Err(format!(
            "'{bucket}' is not a valid bucket name (letters, digits, '-', '.', '_')"
        ));
    }
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        return Ok((bucket.to_string(), String::new()));
    }
    for comp in trimmed.split('/') {
        if comp.is_empty() || comp == "." || comp == ".." || comp.contains('\0') {
            return Err(format!(
                "prefix '{prefix}' has an empty, '.' or '..' component"
            ));
        }
    }
    Ok((bucket.to_string(), format!("{trimmed}/")))
}

/// The host and port of an endpoint URL (`http://h:9000/x` -> ("h", 9000)).
pub fn endpoint_host_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?.rsplit('@').next()?;
    let default = if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        80
    };
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = after
            .strip_prefix(':')
            .map_or(Some(default), |p| p.parse().ok())?;
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((authority.to_string(), default)),
    }
}

/// Can this endpoint only be addressed path-style? A bucket cannot be a subdomain of an IP
/// address, and `BUCKET.localhost` resolves on few systems.
pub fn needs_path_style(url: &str) -> bool {
    endpoint_host_port(url).is_some_and(|(host, _)| {
        host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok()
    })
}

/// Read an s3fs passwd file: the line for `bucket` (`BUCKET:ACCESS:SECRET`) wins over a default
/// line (`ACCESS:SECRET`). Like s3fs, a file others can read is refused.
pub fn read_passwd_file(path: &std::path::Path, bucket: &str) -> Result<StaticCredentials, String> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read passwd file {shown}: {e}"))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "passwd file {shown} has mode {mode:04o}; it holds secrets, so only its owner may read it: chmod 600 {shown}"
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read passwd file {shown}: {e}"))?;
    let mut default = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(':').collect();
        let creds = |a: &str, s: &str| StaticCredentials {
            access_key: a.trim().to_string(),
            secret_key: s.trim().to_string(),
        };
        match fields.as_slice() {
            [b, a, s] if *b == bucket && !a.is_empty() && !s.is_empty() => return Ok(creds(a, s)),
            [_, _, _] => {}
            [a, s] if !a.is_empty() && !s.is_empty() => default = default.or(Some(creds(a, s))),
            _ => return Err(format!("passwd file {shown}, line {}: expected ACCESS_KEY:SECRET or BUCKET:ACCESS_KEY:SECRET", n + 1)),
        }
    }
    default.ok_or_else(|| format!("passwd file {shown} has no line for bucket '{bucket}' and no default ACCESS_KEY:SECRET line"))
}

impl Config {
    pub fn from_cli(cli: Cli) -> Result<Config, String> {
        let (bucket, prefix) = parse_source(&cli.source)?;
        if let Some(url) = &cli.endpoint_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!(
                    "--endpoint-url '{url}' must start with http:// or https://"
                ));
            }
        }
        if cli.allow_other && cli.allow_root {
            return Err("--allow-other and --allow-root exclude each other; pick one".into());
        }
        if cli.max_memory < 16 << 20 {
            return Err("--max-memory must be at least 16MiB".into());
        }
        if cli.max_prefetch < 1 << 20 {
            return Err("--max-prefetch must be at least 1MiB".into());
        }
        if cli.part_size < crate::data::commit::MIN_PART
            || cli.part_size > crate::data::commit::MAX_PART
        {
            return Err("--part-size must be between 5MiB and 5GiB (S3's part size limits)".into());
        }
        if cli.max_part_size < cli.part_size || cli.max_part_size > crate::data::commit::MAX_PART {
            return Err("--max-part-size must be at least --part-size and at most 5GiB".into());
        }
        if cli.memory_cache > cli.max_memory / 2 {
            return Err("--memory-cache must be at most half of --max-memory".into());
        }
        if cli.max_cache_size.is_some() && cli.cache_dir.is_none() {
            return Err("--max-cache-size needs --cache-dir (where the disk cache lives)".into());
        }
        let umask = cli.umask.unwrap_or(0);
        let mut fs = FsConfig::new(&prefix);
        fs.read_only = cli.read_only;
        fs.metadata_ttl = cli.metadata_ttl;
        fs.list_metadata = cli.list_metadata;
        fs.confirm_listed = !cli.listing_only_metadata;
        fs.xattrs = cli.xattr;
        fs.infer_content_type = !cli.no_content_type;
        fs.op_timeout = cli.op_timeout.max(Duration::from_millis(100));
        fs.conditional_writes = !cli.no_conditional_writes;
        fs.write_back = cli.write_back;
        // Idle GET buffers kept for reuse: a sequential reader's GETs finish in bursts, and an
        // eighth of the budget (64 MiB at the default) lets nearly every body reuse a buffer
        // whose pages are already there. They are memory too: the buffer budget is the rest.
        let idle_buffers = (cli.max_memory / 8).min(256 << 20);
        fs.max_memory = cli.max_memory - idle_buffers;
        if let Some(dir) = &cli.staging_dir {
            if !dir.is_absolute() {
                return Err(format!(
                    "--staging-dir {} must be an absolute path",
                    dir.display()
                ));
            }
        }
        fs.cache = CacheConfig {
            memory_bytes: cli.memory_cache,
            disk: match &cli.cache_dir {
                None => None,
                Some(dir) if !dir.is_absolute() => {
                    return Err(format!(
                        "--cache-dir {} must be an absolute path",
                        dir.display()
                    ))
                }
                Some(dir) => Some(DiskCacheConfig {
                    dir: dir.clone(),
                    max_bytes: match cli.max_cache_size {
                        Some(n) if n < 16 << 20 => {
                            return Err("--max-cache-size must be at least 16MiB".into())
                        }
                        Some(n) => n,
                        None => DEFAULT_DISK_CACHE,
                    },
                    // Buckets of different endpoints never share blocks.
                    namespace: format!("{}|{bucket}", cli.endpoint_url.as_deref().unwrap_or("aws")),
                }),
            },
        };
        fs.upload = UploadConfig {
            min_part_size: cli.part_size,
            max_part_size: cli.max_part_size,
            concurrency: cli.upload_concurrency as usize,
            spool_limit: cli.spool_limit,
            // A quarter of the budget: parts of a few streams in flight still fit.
            spill_above: (fs.max_memory / 4).max(16 << 20),
        };
        fs.prefetch = PrefetchConfig {
            max_window: cli.max_prefetch,
            // The kernel keeps up to about two read-ahead windows of requests in flight.
            reorder: cli.kernel_read_ahead.saturating_mul(2).max(1 << 20),
            ..PrefetchConfig::default()
        };
        fs.defaults = AttrDefaults {
            // SAFETY: getuid/getgid have no preconditions and cannot fail.
            uid: cli.uid.unwrap_or_else(|| unsafe { libc::getuid() }),
            // SAFETY: getgid has no preconditions and cannot fail.
            gid: cli.gid.unwrap_or_else(|| unsafe { libc::getgid() }),
            file_mode: cli.file_mode & !umask,
            dir_mode: cli.dir_mode & !umask,
            mount_time: SystemTime::now(),
        };
        let s3 = S3Settings {
            bucket: bucket.clone(),
            endpoint_url: cli.endpoint_url.clone(),
            region: cli.region.clone(),
            force_path_style: cli.force_path_style
                || cli.endpoint_url.as_deref().is_some_and(needs_path_style),
            profile: cli.profile.clone(),
            no_sign_request: cli.no_sign_request,
            max_attempts: cli.max_attempts,
            connect_timeout: Duration::from_secs(5),
            stall_timeout: cli.stall_timeout.max(Duration::from_secs(1)),
            credentials: match &cli.passwd_file {
                Some(p) => Some(read_passwd_file(p, &bucket)?),
                None => None,
            },
            ca_bundle: cli.ca_bundle.clone().or_else(|| {
                std::env::var_os("AWS_CA_BUNDLE")
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            }),
            idle_buffers: idle_buffers as usize,
            payload_signing: match cli.sign_payload {
                crate::cli::SignPayload::Auto => PayloadSigning::Auto,
                crate::cli::SignPayload::Always => PayloadSigning::Always,
                crate::cli::SignPayload::Never => PayloadSigning::Never,
            },
        };
        if let Some(ca) = &s3.ca_bundle {
            if !ca.is_file() {
                return Err(format!(
                    "CA bundle {} does not exist or is not a file",
                    ca.display()
                ));
            }
        }
        let id = crate::paths::MountId::new(cli.endpoint_url.as_deref(), &bucket, &prefix);
        Ok(Config {
            id,
            source: cli.source.clone(),
            bucket,
            prefix,
            mountpoint: cli.mountpoint.clone(),
            s3,
            fs,
            foreground: cli.foreground,
            supervise: !cli.no_supervise,
            debug: cli.debug,
            log_file: cli.log_file.clone(),
            log_format: cli.log_format,
            metrics_addr: cli.metrics_addr,
            given_options: Vec::new(),
            state_base: cli
                .staging_dir
                .clone()
                .unwrap_or_else(crate::paths::state_base),
            allow_other: cli.allow_other,
            allow_root: cli.allow_root,
            read_only: cli.read_only,
            nonempty: cli.nonempty,
            kernel_readahead_kb: (cli.kernel_read_ahead / 1024).clamp(4, 1 << 20) as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_file_rules() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("passwd");
        std::fs::write(&p, "# comment\nDEFKEY:defsecret\nmybucket:BKEY:bsecret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_passwd_file(&p, "mybucket").unwrap_err();
        assert!(e.contains("chmod 600") && e.contains("0644"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_passwd_file(&p, "mybucket").unwrap().access_key, "BKEY");
        assert_eq!(
            read_passwd_file(&p, "other").unwrap().secret_key,
            "defsecret"
        );
        assert!(!format!("{:?}", read_passwd_file(&p, "other").unwrap()).contains("defsecret"));
        std::fs::write(&p, "garbage line without colon\n").unwrap();
        assert!(read_passwd_file(&p, "b").unwrap_err().contains("line 1"));
    }

    #[test]
    fn idle_get_buffers_are_part_of_the_memory_budget() {
        for (args, budget, idle) in [
            (&[][..], 512u64 << 20, 64u64 << 20),
            (
                &["--max-memory", "16MiB", "--memory-cache", "4MiB"][..],
                16 << 20,
                2 << 20,
            ),
            (&["--max-memory", "8GiB"][..], 8 << 30, 256 << 20),
        ] {
            let argv: Vec<String> = ["s3mount", "b", "/mnt"]
                .iter()
                .chain(args)
                .map(|s| s.to_string())
                .collect();
            let c = Config::from_cli(crate::cli::parse_args(&argv).unwrap()).unwrap();
            assert_eq!(c.s3.idle_buffers as u64, idle, "{args:?}");
            assert_eq!(c.fs.max_memory, budget - idle, "{args:?}");
        }
    }

    #[test]
    fn localhost_and_ip_endpoints_are_addressed_path_style() {
        assert_eq!(
            endpoint_host_port("http://127.0.0.1:3900"),
            Some(("127.0.0.1".into(), 3900))
        );
        assert_eq!(
            endpoint_host_port("https://s3.example.com/base"),
            Some(("s3.example.com".into(), 443))
        );
        assert_eq!(
            endpoint_host_port("http://[::1]:9000"),
            Some(("::1".into(), 9000))
        );
        assert_eq!(endpoint_host_port("http://[::1]"), Some(("::1".into(), 80)));
        for (url, path) in [
            ("http://localhost:9000", true),
            ("http://127.0.0.1:3900", true),
            ("http://[::1]:3900", true),
            ("https://s3.eu-west-1.amazonaws.com", false),
            ("http://minio.internal:9000", false),
        ] {
            let argv: Vec<String> = ["s3mount", "b", "/mnt", "--endpoint-url", url]
                .iter()
                .map(|s| s.to_string())
                .collect();
            let c = Config::from_cli(crate::cli::parse_args(&argv).unwrap()).unwrap();
            assert_eq!(c.s3.force_path_style, path, "{url}");
        }
    }

    #[test]
    fn sources_parse() {
        assert_eq!(parse_source("b"), Ok(("b".into(), "".into())));
        assert_eq!(parse_source("b:/a/b"), Ok(("b".into(), "a/b/".into())));
        assert_eq!(parse_source("b:a/b/"), Ok(("b".into(), "a/b/".into())));
        assert_eq!(parse_source("s3://b/a/"), Ok(("b".into(), "a/".into())));
        assert_eq!(parse_source("s3://b"), Ok(("b".into(), "".into())));
        assert_eq!(parse_source("b:/"), Ok(("b".into(), "".into())));
        assert!(parse_source("").is_err());
        assert!(parse_source("s3://").is_err());
        assert!(parse_source("b:/a//c").is_err());
        assert!(parse_source("b:/a/../c").is_err());
        assert!(parse_source("bad bucket").is_err());
    }
}
