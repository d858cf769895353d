//! Every tunable with its default, validated once, in one place.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::cli::Cli;
use crate::data::prefetch::PrefetchConfig;
use crate::data::upload::UploadConfig;
use crate::fs::{AttrDefaults, FsConfig};
use crate::store::s3::S3Settings;

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
    pub debug: bool,
    pub log_file: Option<PathBuf>,
    pub allow_other: bool,
    pub allow_root: bool,
    pub read_only: bool,
}

/// Split `BUCKET`, `BUCKET:/PREFIX`, `BUCKET:PREFIX` or `s3://BUCKET/PREFIX` into a bucket and a
/// prefix that is empty or ends in `/`.
pub fn parse_source(source: &str) -> Result<(String, String), String> {
    let s = source.trim();
    let (bucket, prefix) = if let Some(rest) = s.strip_prefix("s3://") {
        rest.split_once('/').unwrap_or((rest, ""))
    } else {
        s.split_once(':').unwrap_or((s, ""))
    };
    if bucket.is_empty() {
        return Err(format!("no bucket name in '{source}' (expected BUCKET, BUCKET:/PREFIX or s3://BUCKET/PREFIX)"));
    }
    if bucket.len() > 255 || !bucket.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')) {
        return Err(format!("'{bucket}' is not a valid bucket name (letters, digits, '-', '.', '_')"));
    }
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        return Ok((bucket.to_string(), String::new()));
    }
    for comp in trimmed.split('/') {
        if comp.is_empty() || comp == "." || comp == ".." || comp.contains('\0') {
            return Err(format!("prefix '{prefix}' has an empty, '.' or '..' component"));
        }
    }
    Ok((bucket.to_string(), format!("{trimmed}/")))
}

impl Config {
    pub fn from_cli(cli: Cli) -> Result<Config, String> {
        let (bucket, prefix) = parse_source(&cli.source)?;
        if let Some(url) = &cli.endpoint_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("--endpoint-url '{url}' must start with http:// or https://"));
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
        if cli.part_size < crate::data::upload::MIN_PART || cli.part_size > crate::data::upload::MAX_PART {
            return Err("--part-size must be between 5MiB and 5GiB (S3's part size limits)".into());
        }
        if cli.max_part_size < cli.part_size || cli.max_part_size > crate::data::upload::MAX_PART {
            return Err("--max-part-size must be at least --part-size and at most 5GiB".into());
        }
        let umask = cli.umask.unwrap_or(0);
        let mut fs = FsConfig::new(&prefix);
        fs.read_only = cli.read_only;
        fs.metadata_ttl = cli.metadata_ttl;
        fs.max_memory = cli.max_memory;
        fs.upload = UploadConfig {
            min_part_size: cli.part_size,
            max_part_size: cli.max_part_size,
            concurrency: cli.upload_concurrency as usize,
        };
        fs.prefetch = PrefetchConfig { max_window: cli.max_prefetch, ..PrefetchConfig::default() };
        fs.defaults = AttrDefaults {
            uid: cli.uid.unwrap_or_else(|| unsafe { libc::getuid() }),
            gid: cli.gid.unwrap_or_else(|| unsafe { libc::getgid() }),
            file_mode: cli.file_mode & !umask,
            dir_mode: cli.dir_mode & !umask,
            mount_time: SystemTime::now(),
        };
        let s3 = S3Settings {
            bucket: bucket.clone(),
            endpoint_url: cli.endpoint_url.clone(),
            region: cli.region.clone(),
            force_path_style: cli.force_path_style,
            profile: cli.profile.clone(),
            no_sign_request: cli.no_sign_request,
            max_attempts: cli.max_attempts,
            connect_timeout: Duration::from_secs(5),
        };
        Ok(Config {
            source: cli.source.clone(),
            bucket,
            prefix,
            mountpoint: cli.mountpoint.clone(),
            s3,
            fs,
            foreground: cli.foreground,
            debug: cli.debug,
            log_file: cli.log_file.clone(),
            allow_other: cli.allow_other,
            allow_root: cli.allow_root,
            read_only: cli.read_only,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
