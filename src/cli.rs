//! Command-line definitions and `-o a,b=c` mount-option parsing. Both argv forms (the command
//! line and what mount(8) passes to a helper) go through [`parse_args`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser};

const EXAMPLES: &str = "\
Examples:
  s3mount my-bucket /mnt/data
  s3mount my-bucket:/logs/2026 /mnt/logs --read-only
  s3mount s3://my-bucket/team/ /mnt/team --profile prod --allow-other
  s3mount test /mnt/test --endpoint-url http://127.0.0.1:3900 --region garage --force-path-style
  s3mount my-bucket /mnt/data -o ro,allow_other,uid=1000,gid=1000,metadata_ttl=60

Without -f the command returns once the mount is live (exit 0) and the daemon logs to syslog.
Unmount with `umount DIR` or `fusermount3 -u DIR`.";

const LONG_ABOUT: &str = "\
Mount an S3 bucket, or a prefix of one, as a directory (AWS S3 or any S3-compatible store).

Reads are ranged GETs with read-ahead and a block cache; writes stream to multipart uploads \
and close/fsync return only once the bucket holds the data (or fail with EIO). Directories \
are prefixes and s3fs-style `dir/` markers; modes, owners, times and symlinks are stored as \
s3fs stores them. Rename, in-place writes, truncate and extended attributes work. \
`s3mount status` shows what each mount is doing.";

/// When upload bodies are hashed into the request signature (see `--sign-payload`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignPayload {
    Auto,
    Always,
    Never,
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "s3mount",
    version,
    about = "Mount an S3 bucket, or a prefix of one, as a directory",
    long_about = LONG_ABOUT,
    after_help = EXAMPLES
)]
pub struct Cli {
    /// What to mount: BUCKET, BUCKET:/PREFIX or s3://BUCKET/PREFIX/
    pub source: String,

    /// Existing directory to mount on; it must be empty unless --nonempty is given
    pub mountpoint: PathBuf,

    /// S3 endpoint for S3-compatible stores (MinIO, Garage, Ceph, R2, ...)
    #[arg(
        long,
        env = "AWS_ENDPOINT_URL",
        value_name = "URL",
        help_heading = "Bucket and endpoint"
    )]
    pub endpoint_url: Option<String>,

    /// Region of the bucket (default: from the AWS config, else us-east-1)
    #[arg(long, value_name = "REGION", help_heading = "Bucket and endpoint")]
    pub region: Option<String>,

    /// Address buckets as URL paths (http://host/bucket) instead of host names
    #[arg(long, help_heading = "Bucket and endpoint")]
    pub force_path_style: bool,

    /// Named profile from ~/.aws/config and ~/.aws/credentials (incl. SSO and assume-role)
    #[arg(long, value_name = "NAME", help_heading = "Credentials")]
    pub profile: Option<String>,

    /// s3fs-style credentials file: lines `ACCESS_KEY:SECRET` or `BUCKET:ACCESS_KEY:SECRET`;
    /// refused unless only its owner can read it (chmod 600)
    #[arg(long, value_name = "PATH", help_heading = "Credentials")]
    pub passwd_file: Option<PathBuf>,

    /// PEM file of CA certificates to trust besides the system's (private endpoints);
    /// default: $AWS_CA_BUNDLE when set
    #[arg(long, value_name = "PATH", help_heading = "Bucket and endpoint")]
    pub ca_bundle: Option<PathBuf>,

    /// Send unsigned requests (public buckets)
    #[arg(long, help_heading = "Credentials")]
    pub no_sign_request: bool,

    /// Hash upload bodies into the request signature (SHA-256)
    ///
    /// auto: over plain HTTP only; over HTTPS a body that carries a CRC32 the server checks
    /// goes as UNSIGNED-PAYLOAD (TLS guards it). never: also over HTTP (trusted networks)
    #[arg(
        long,
        value_enum,
        value_name = "WHEN",
        default_value = "auto",
        help_heading = "Credentials"
    )]
    pub sign_payload: SignPayload,

    /// Mount read-only: every write fails with EROFS
    #[arg(long, help_heading = "Mount")]
    pub read_only: bool,

    /// Let other users access the mount (root, or user_allow_other in /etc/fuse.conf)
    #[arg(long, help_heading = "Mount")]
    pub allow_other: bool,

    /// Let root access the mount besides the mounting user
    #[arg(long, help_heading = "Mount")]
    pub allow_root: bool,

    /// Owner of objects without s3fs uid metadata (default: the mounting user)
    #[arg(long, value_name = "UID", help_heading = "Mount")]
    pub uid: Option<u32>,

    /// Group of objects without s3fs gid metadata (default: the mounting user's group)
    #[arg(long, value_name = "GID", help_heading = "Mount")]
    pub gid: Option<u32>,

    /// Permission bits of files without s3fs mode metadata, octal
    #[arg(long, value_name = "MODE", value_parser = parse_mode, default_value = "0644", help_heading = "Mount")]
    pub file_mode: u16,

    /// Permission bits of directories without s3fs mode metadata, octal
    #[arg(long, value_name = "MODE", value_parser = parse_mode, default_value = "0755", help_heading = "Mount")]
    pub dir_mode: u16,

    /// Umask applied to the default file and directory modes, octal (mount form: umask=022)
    #[arg(long, value_name = "MASK", value_parser = parse_mode, help_heading = "Mount")]
    pub umask: Option<u16>,

    /// How long listings and attributes are trusted: seconds, or "indefinite"
    #[arg(long, value_name = "SECONDS", value_parser = parse_ttl, default_value = "5", help_heading = "Caching")]
    pub metadata_ttl: Duration,

    /// HEAD each listed file so `ls -l` shows s3fs-stored modes, owners, times and symlinks
    ///
    /// One request per entry, like s3fs; default: listings only, stat/open show stored values
    #[arg(long, help_heading = "Caching")]
    pub list_metadata: bool,

    /// Answer `ls -l`, `stat` and lookups from listings alone (buckets without s3fs metadata)
    ///
    /// No HEAD confirms a listed file's stored mode, owner and times (LastModified shows as
    /// mtime). Default: one HEAD per object version the mount has not seen, run while the
    /// directory is read
    #[arg(long, conflicts_with = "list_metadata", help_heading = "Caching")]
    pub listing_only_metadata: bool,

    /// Store extended attributes (user.*, trusted.*) as s3fs does (x-amz-meta-xattr)
    ///
    /// Like s3fs's use_xattr (`-o use_xattr` works too). Off by default: with it the kernel
    /// asks for security.selinux and POSIX ACLs of every entry `ls -l` shows (answered from
    /// memory, but one request each)
    #[arg(long, alias = "use-xattr", help_heading = "Advanced")]
    pub xattr: bool,

    /// Store new objects without a Content-Type from their extension (default: from
    /// /etc/mime.types, application/octet-stream when unknown, as s3fs and rclone do)
    #[arg(long, help_heading = "Upload")]
    pub no_content_type: bool,

    /// Memory budget for all read and write buffers, e.g. 512MiB, 2GiB
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "512MiB", help_heading = "Caching")]
    pub max_memory: u64,

    /// Largest read-ahead window of one open file
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64MiB", help_heading = "Caching")]
    pub max_prefetch: u64,

    /// Memory for recently read blocks (part of --max-memory; given back under pressure)
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64MiB", help_heading = "Caching")]
    pub memory_cache: u64,

    /// Keep read blocks on local disk here (survives remounts; created 0700, blocks 0600;
    /// one directory per mount)
    #[arg(long, value_name = "DIR", help_heading = "Caching")]
    pub cache_dir: Option<PathBuf>,

    /// Largest size of the disk cache (least recently used blocks are removed first)
    #[arg(long, value_name = "SIZE", value_parser = parse_size, help_heading = "Caching")]
    pub max_cache_size: Option<u64>,

    /// Size of the first 1000 parts of a multipart upload (later parts double every 1000 parts)
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "8MiB", help_heading = "Upload")]
    pub part_size: u64,

    /// Largest part size the schedule may reach (caps the largest object: see README)
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "4GiB", help_heading = "Upload")]
    pub max_part_size: u64,

    /// Parts of one file uploading in parallel (streamed, or committing in-place changes)
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64), help_heading = "Upload")]
    pub upload_concurrency: u32,

    /// Streamed files keep a local copy of their bytes in the staging directory up to this size,
    /// so an upload that fails for good loses nothing (0: keep none)
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "1GiB", help_heading = "Upload")]
    pub spool_limit: u64,

    /// Base directory of the mounts' staged, spooled and recovered data
    ///
    /// One subdirectory per endpoint, bucket and prefix (created 0700; files 0600). Default:
    /// /var/lib/s3mount for root, else $XDG_STATE_HOME/s3mount or ~/.local/state/s3mount
    #[arg(long, value_name = "DIR", help_heading = "Upload")]
    pub staging_dir: Option<PathBuf>,

    /// Return from close once the bytes are on local disk; upload in the background
    ///
    /// Off by default: close and fsync return only once the bucket holds the data. With it,
    /// close returns once the bytes are on local disk and uploads run in the background (up to
    /// 256 files and --spool-limit bytes queued; beyond that close uploads before it returns,
    /// as without the option); fsync waits for its file's upload and reports an earlier background
    /// upload that failed (its data kept in the recovery folder); the daemon uploads
    /// everything before it exits after an unmount or SIGTERM. `sync` cannot wait for it (the
    /// kernel sends FUSE servers no syncfs): use fsync, or `s3mount status` to see what is
    /// pending. chown, chmod and utimens right after close go with the upload
    #[arg(long, help_heading = "Upload")]
    pub write_back: bool,

    /// Do not send If-Match / If-None-Match (for stores that mishandle them); a concurrent
    /// change by another client is then overwritten instead of reported
    #[arg(long, help_heading = "Upload")]
    pub no_conditional_writes: bool,

    /// Kernel read-ahead for the mount (root only; the kernel's FUSE default is 128KiB)
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "4MiB", help_heading = "Caching")]
    pub kernel_read_ahead: u64,

    /// Seconds without a byte before a response counts as stalled and is retried from where it
    /// stopped (also the limit for the first byte)
    #[arg(long, value_name = "SECONDS", value_parser = parse_ttl, default_value = "30", help_heading = "Advanced")]
    pub stall_timeout: Duration,

    /// Longest a lookup, stat, listing, open or read may hang before failing with ETIMEDOUT
    #[arg(long, value_name = "SECONDS", value_parser = parse_ttl, default_value = "60", help_heading = "Advanced")]
    pub op_timeout: Duration,

    /// Attempts per S3 request, including the first (retries use exponential backoff)
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=20), help_heading = "Advanced")]
    pub max_attempts: u32,

    /// Mount over a directory that is not empty, hiding what it holds until unmounted
    #[arg(long, help_heading = "Mount")]
    pub nonempty: bool,

    /// Stay in the foreground and log to stderr
    #[arg(short = 'f', long, help_heading = "Mount")]
    pub foreground: bool,

    /// Serve the mount from one process, with no supervisor: a daemon crash ends the mount
    ///
    /// By default the process that mounts keeps the kernel connection and does nothing else; a
    /// worker (the same binary) serves it. A worker that dies (kill -9, panic, out of memory)
    /// is started again within a second on the same connection: it takes back the kernel's
    /// node ids and open handles from a journal in the state directory, and the kernel sends
    /// it again the requests the dead one had not answered (Linux 6.9 or later; before, a
    /// worker death unmounts, as a crash does with this option). Files open for reading,
    /// directories being listed and files being written go on (a written file's bytes are kept
    /// on local disk before each write returns; one past --spool-limit, or whose start was
    /// copied server side by `cp` within the mount, fails with EIO instead). Five deaths
    /// within a minute end the mount. This option saves the second process and the journal
    /// (up to 6% less CPU on large writes, 3-8% less time for `cp -r` of small files)
    #[arg(long, help_heading = "Mount", conflicts_with = "supervise")]
    pub no_supervise: bool,

    /// The default (a supervisor keeps the mount alive across worker crashes); accepted so
    /// that command lines and fstab entries naming it go on working
    #[arg(long, help_heading = "Mount", hide = true)]
    pub supervise: bool,

    /// Log debug details (S3MOUNT_LOG takes a tracing filter for finer control)
    #[arg(short = 'd', long, help_heading = "Logging and metrics")]
    pub debug: bool,

    /// Log to this file when in the background
    ///
    /// Default: syslog when /dev/log exists, else a file under /var/log/s3mount or
    /// ~/.local/state/s3mount, named on stderr. SIGHUP reopens it (logrotate); SIGUSR2 cycles
    /// the level: default, debug, trace
    #[arg(long, value_name = "PATH", help_heading = "Logging and metrics")]
    pub log_file: Option<PathBuf>,

    /// Serve Prometheus/OpenMetrics metrics at http://ADDR/metrics: PORT (on 127.0.0.1) or
    /// HOST:PORT (off by default)
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_addr, help_heading = "Logging and metrics")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Log as text lines or one JSON object per line
    #[arg(
        long,
        value_enum,
        value_name = "FORMAT",
        default_value = "text",
        help_heading = "Logging and metrics"
    )]
    pub log_format: crate::logging::LogFormat,

    /// Mount options, comma separated (the fstab form)
    ///
    /// Any long option without dashes (endpoint_url=URL, force_path_style, read_only...),
    /// s3fs's names where s3mount has the same thing, plus the standard ro, rw, allow_other,
    /// uid=, gid=, umask=, _netdev, nofail, noauto, user, nosuid, nodev, nonempty, x-systemd.*
    #[arg(short = 'o', value_name = "OPTIONS", help_heading = "Mount")]
    pub options: Vec<String>,
}

/// Standard mount(8)/fstab options that only matter to mount(8), systemd or the kernel defaults
/// we always set (nosuid, nodev, default_permissions).
const IGNORED_MOUNT_OPTIONS: &[&str] = &[
    "rw",
    "defaults",
    "auto",
    "noauto",
    "_netdev",
    "nofail",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "nosuid",
    "nodev",
    "suid",
    "dev",
    "exec",
    "noexec",
    "async",
    "atime",
    "noatime",
    "relatime",
    "nodiratime",
    "strictatime",
    "lazytime",
    "default_permissions",
    "bg",
    "fg",
];

fn is_ignored(name: &str) -> bool {
    IGNORED_MOUNT_OPTIONS.contains(&name)
        || name.starts_with("x-")
        || name == "comment"
        || name == "fsname"
        || name == "subtype"
}

/// s3fs's names for options s3mount has under another name: what users paste from an s3fs
/// fstab line. `value` is s3fs's value; the result is the s3mount long option.
fn s3fs_alias(name: &str, value: Option<&str>) -> Option<Result<String, String>> {
    let with = |long: &str| match value {
        Some(v) => Ok(format!("--{long}={v}")),
        None => Err(format!("mount option '{name}' needs a value ({name}=...)")),
    };
    Some(match name {
        "url" => with("endpoint-url"),
        // s3fs's `endpoint` is the region used for signing.
        "endpoint" => with("region"),
        "use_path_request_style" => Ok("--force-path-style".into()),
        "use_cache" => with("cache-dir"),
        "stat_cache_expire" => with("metadata-ttl"),
        "parallel_count" => with("upload-concurrency"),
        "readwrite_timeout" => with("stall-timeout"),
        // s3fs counts megabytes; s3mount takes a size.
        "multipart_size" => value
            .ok_or_else(|| "mount option 'multipart_size' needs a value in MB".to_string())
            .map(|v| format!("--part-size={}MiB", v.trim())),
        // s3fs counts retries after the first attempt; s3mount counts attempts.
        "retries" => match value.map(|v| v.trim().parse::<u32>()) {
            Some(Ok(n)) => Ok(format!("--max-attempts={}", (n + 1).min(20))),
            _ => Err("mount option 'retries' needs a number (retries=5)".into()),
        },
        "public_bucket" => match value.map(str::trim) {
            Some("1") | None => Ok("--no-sign-request".into()),
            Some(_) => return Some(Ok(String::new())),
        },
        _ => return None,
    })
}

/// s3fs options s3mount refuses, with what to do instead.
fn s3fs_refused(name: &str) -> Option<&'static str> {
    Some(match name {
        "iam_role" | "ibm_iam_auth" | "ecs" => {
            "s3mount finds instance and container credentials by itself; drop it (or use --profile)"
        }
        "ssl_verify_hostname" | "no_check_certificate" => {
            "s3mount always verifies TLS; trust a private CA with --ca-bundle PATH"
        }
        "sigv2" | "sigv4" => "s3mount always signs with SigV4; drop it",
        "default_acl" | "storage_class" | "sse" | "sse_c" | "sse_kms" => {
            "not supported yet: s3mount stores objects with the bucket's defaults"
        }
        "max_stat_cache_size" | "enable_noobj_cache" | "disable_noobj_cache" => {
            "s3mount sizes its metadata cache by itself; use --metadata-ttl for how long it is trusted"
        }
        "dbglevel" | "curldbg" => "use -d (--debug) or S3MOUNT_LOG=debug",
        "mp_umask" => "use umask=MASK for files and directories",
        "complement_stat" | "notsup_compat_dir" | "compat_dir" => {
            "s3mount always shows directories that exist only as prefixes; drop it"
        }
        _ => return None,
    })
}

/// The known name closest to `name`, if one is close enough to be a typo of it.
fn closest<'a>(name: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    known
        .map(|k| (strsim::jaro_winkler(name, k), k))
        .filter(|(score, _)| *score > 0.85)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

/// Turn one `-o` item into long options, or say why it can't be.
fn translate_option(item: &str, known: &[String]) -> Result<Vec<String>, String> {
    let (name, value) = match item.split_once('=') {
        Some((n, v)) => (n.trim(), Some(v)),
        None => (item.trim(), None),
    };
    if is_ignored(name) {
        return Ok(vec![]);
    }
    if name == "ro" {
        return Ok(vec!["--read-only".into()]);
    }
    if let Some(alias) = s3fs_alias(name, value) {
        return alias.map(|a| if a.is_empty() { vec![] } else { vec![a] });
    }
    if let Some(instead) = s3fs_refused(name) {
        return Err(format!(
            "s3fs option '{name}' is not an s3mount option: {instead}"
        ));
    }
    let long = name.replace('_', "-");
    if matches!(long.as_str(), "help" | "version" | "options" | "o") || !known.contains(&long) {
        let names: Vec<String> = known
            .iter()
            .map(|k| k.replace('-', "_"))
            .chain(["ro".to_string()])
            .collect();
        let hint = closest(name, names.iter().map(String::as_str))
            .map(|k| format!("; did you mean '{k}'?"))
            .unwrap_or_else(|| " (see s3mount --help for the options)".into());
        return Err(format!("unknown mount option '{name}'{hint}"));
    }
    Ok(vec![match value {
        Some(v) => format!("--{long}={v}"),
        None => format!("--{long}"),
    }])
}

/// Expand every `-o a,b=c` (also `-oa,b`) into the equivalent long options.
pub fn expand_mount_options(args: &[String]) -> Result<Vec<String>, String> {
    let known: Vec<String> = Cli::command()
        .get_arguments()
        .flat_map(|a| {
            a.get_long()
                .into_iter()
                .chain(a.get_all_aliases().unwrap_or_default())
                .map(str::to_string)
        })
        .collect();
    let mut out = Vec::with_capacity(args.len());
    let mut iter = args.iter();
    if let Some(first) = iter.next() {
        out.push(first.clone());
    }
    while let Some(a) = iter.next() {
        let list = if a == "-o" {
            iter.next()
                .ok_or("option -o needs a value, e.g. -o ro,allow_other")?
                .clone()
        } else if let Some(rest) = a.strip_prefix("-o").filter(|r| !r.is_empty()) {
            rest.to_string()
        } else if a == "--" {
            out.push(a.clone());
            out.extend(iter.cloned());
            break;
        } else {
            out.push(a.clone());
            continue;
        };
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            out.extend(translate_option(item, &known)?);
        }
    }
    Ok(out)
}

/// Is this binary running as a mount(8) helper (`mount.s3mount`, `mount.fuse.s3mount`)?
pub fn is_mount_helper(argv0: &str) -> bool {
    let name = argv0.rsplit('/').next().unwrap_or(argv0);
    name.starts_with("mount.")
}

/// What mount(8) passes a helper: `SOURCE DIR [-sfnv] [-o opts]`. Its `-f` means "fake" (do
/// everything but mount), `-s` sloppy, `-n` no mtab, `-v` verbose; none of them are ours.
/// Returns the arguments for [`parse_args`] and whether this is a fake mount.
pub fn helper_args(args: &[String]) -> (Vec<String>, bool) {
    let mut out = Vec::with_capacity(args.len());
    let mut fake = false;
    let mut iter = args.iter();
    if let Some(first) = iter.next() {
        out.push(first.clone());
    }
    while let Some(a) = iter.next() {
        if a == "-o" {
            out.push(a.clone());
            if let Some(v) = iter.next() {
                out.push(v.clone());
            }
        } else if a.len() > 1
            && a.starts_with('-')
            && !a.starts_with("--")
            && !a.starts_with("-o")
            && a[1..].chars().all(|c| "sfnvi".contains(c))
        {
            fake |= a.contains('f');
        } else {
            out.push(a.clone());
        }
    }
    (out, fake)
}

#[derive(Debug)]
pub enum ArgsError {
    /// clap's own error (usage, --help, --version): print it its way.
    Clap(clap::Error),
    Invalid(String),
}

pub fn parse_args(args: &[String]) -> Result<Cli, ArgsError> {
    let expanded = expand_mount_options(args).map_err(ArgsError::Invalid)?;
    Cli::try_parse_from(expanded).map_err(ArgsError::Clap)
}

/// docs/CONFIGURATION.md: every option with its `-o` form, default and help, generated from
/// the definitions above (`cargo run --example gen_config > docs/CONFIGURATION.md`; a test
/// fails when the file drifts).
pub fn configuration_markdown() -> String {
    let cmd = Cli::command();
    let mut out = String::from(
        "# Configuration\n\n\
         <!-- Generated from src/cli.rs by `cargo run --example gen_config > docs/CONFIGURATION.md`; \
         tests/man_page.rs fails when it drifts. -->\n\n\
         Every option of `s3mount SOURCE MOUNTPOINT [OPTIONS]`. Each long option also has a mount \
         form for `-o` and fstab: the name without dashes, `_` for `-` (`--metadata-ttl 30` is \
         `-o metadata_ttl=30`). s3fs's option names are accepted where s3mount has the same thing \
         (see [USAGE.md](USAGE.md)). `s3mount status` has its own `--help`.\n\n\
         | Option | `-o` form | Default | Environment |\n|---|---|---|---|\n",
    );
    let mut details = String::new();
    // Grouped as --help groups them: by heading, in the order the headings first appear.
    let mut headings: Vec<&str> = Vec::new();
    for a in cmd.get_arguments() {
        let h = a.get_help_heading().unwrap_or("Options");
        if !headings.contains(&h) {
            headings.push(h);
        }
    }
    let mut args: Vec<&clap::Arg> = cmd.get_arguments().collect();
    args.sort_by_key(|a| {
        let h = a.get_help_heading().unwrap_or("Options");
        headings.iter().position(|x| *x == h)
    });
    let mut current = "";
    for arg in args {
        let id = arg.get_id().as_str();
        if matches!(id, "help" | "version") || arg.is_positional() {
            continue;
        }
        let heading = arg.get_help_heading().unwrap_or("Options");
        if heading != current {
            details.push_str(&format!("## {heading}\n\n"));
            current = heading;
        }
        let value = arg
            .get_value_names()
            .map(|v| format!(" {}", v.join(" ")))
            .unwrap_or_default();
        let takes = arg.get_action().takes_values();
        let name = match (arg.get_short(), arg.get_long()) {
            (Some(s), Some(l)) => format!("-{s}, --{l}{}", if takes { &value } else { "" }),
            (None, Some(l)) => format!("--{l}{}", if takes { &value } else { "" }),
            (Some(s), None) => format!("-{s}{value}"),
            (None, None) => continue,
        };
        let o_form = match arg.get_long() {
            Some("options") | None => "".to_string(),
            Some(l) => format!("`{}{}`", l.replace('-', "_"), if takes { "=…" } else { "" }),
        };
        let default: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let env = arg
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_default();
        out.push_str(&format!(
            "| [`{name}`](#{}) | {o_form} | {} | {env} |\n",
            arg.get_long().unwrap_or(id),
            if default.is_empty() {
                String::new()
            } else {
                format!("`{}`", default.join(","))
            }
        ));
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        let mut possible: Vec<String> = arg
            .get_possible_values()
            .iter()
            .map(|p| format!("`{}`", p.get_name()))
            .collect();
        if !takes {
            possible.clear();
        }
        details.push_str(&format!(
            "### {}\n\n`{name}`\n\n{}{}\n\n",
            arg.get_long().unwrap_or(id),
            help.replace('\n', " "),
            if possible.is_empty() {
                String::new()
            } else {
                format!(" One of {}.", possible.join(", "))
            }
        ));
    }
    out.push('\n');
    out.push_str(&details);
    out
}

/// `9464` (loopback) or `HOST:PORT`.
pub fn parse_metrics_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let t = s.trim();
    if let Ok(port) = t.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    t.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("'{s}' is not PORT or HOST:PORT"))
}

/// The options of a command line that were given (on it or through the environment), as
/// `--name=value`: what `s3mount status` shows as differing from the defaults.
pub fn explicit_options(args: &[String]) -> Vec<String> {
    let Ok(expanded) = expand_mount_options(args) else {
        return vec![];
    };
    let Ok(m) = Cli::command().try_get_matches_from(expanded) else {
        return vec![];
    };
    let mut out = Vec::new();
    for arg in Cli::command().get_arguments() {
        let id = arg.get_id().as_str();
        let Some(long) = arg.get_long() else {
            continue;
        };
        if !matches!(
            m.value_source(id),
            Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
        ) || long == "options"
        {
            continue;
        }
        let values: Vec<String> = m
            .get_raw(id)
            .map(|v| v.map(|x| x.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        if arg.get_action().takes_values() && !values.is_empty() {
            out.push(format!("--{long}={}", values.join(",")));
        } else {
            out.push(format!("--{long}"));
        }
    }
    out
}

pub fn parse_mode(s: &str) -> Result<u16, String> {
    let t = s.trim();
    let digits = t.strip_prefix("0o").unwrap_or(t);
    let v = u16::from_str_radix(digits, 8)
        .map_err(|_| format!("'{s}' is not an octal mode like 0644"))?;
    if v > 0o7777 {
        return Err(format!("'{s}' is larger than 07777"));
    }
    Ok(v)
}

pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("indefinite") {
        return Ok(Duration::from_secs(100 * 365 * 24 * 3600));
    }
    let secs: f64 = t
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds or 'indefinite'"))?;
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("'{s}' is out of range (0 to 1e9 seconds)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Sizes like `4096`, `64KiB`, `8MiB`, `2GiB`, `1G` (K/M/G/T are powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 512MiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "'{s}' has an unknown unit (use KiB, MiB, GiB or TiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn mount_options_equal_long_options() {
        let a = parse_args(&args(&[
            "s3mount",
            "b:/p",
            "/mnt",
            "-o",
            "endpoint_url=http://h:1,force_path_style,region=r,ro,_netdev,x-systemd.automount",
        ]))
        .unwrap();
        let b = parse_args(&args(&[
            "s3mount",
            "b:/p",
            "/mnt",
            "--endpoint-url",
            "http://h:1",
            "--force-path-style",
            "--region",
            "r",
            "--read-only",
        ]))
        .unwrap();
        assert_eq!(a.endpoint_url, b.endpoint_url);
        assert_eq!(
            (a.force_path_style, a.read_only, a.region.clone()),
            (true, true, Some("r".into()))
        );
        assert_eq!((b.force_path_style, b.read_only), (true, true));
    }

    #[test]
    fn metadata_and_content_type_options_have_o_forms() {
        let a = parse_args(&args(&[
            "s3mount",
            "b",
            "/mnt",
            "-o",
            "listing_only_metadata,no_content_type",
        ]))
        .unwrap();
        assert!(a.listing_only_metadata && a.no_content_type);
        let both = parse_args(&args(&[
            "s3mount",
            "b",
            "/mnt",
            "-o",
            "listing_only_metadata,list_metadata",
        ]));
        assert!(both.is_err(), "the two metadata modes exclude each other");
    }

    #[test]
    fn xattr_has_its_s3fs_name_too() {
        for o in ["xattr", "use_xattr"] {
            let a = parse_args(&args(&["s3mount", "b", "/mnt", "-o", o])).unwrap();
            assert!(a.xattr, "{o}");
        }
        let a = parse_args(&args(&["s3mount", "b", "/mnt"])).unwrap();
        assert!(!a.xattr, "off by default");
    }

    #[test]
    fn o_can_come_anywhere_and_glued() {
        let a = parse_args(&args(&[
            "s3mount",
            "-oallow_other,uid=5",
            "b",
            "/mnt",
            "-o",
            "gid=6,umask=027",
        ]))
        .unwrap();
        assert!(a.allow_other);
        assert_eq!((a.uid, a.gid, a.umask), (Some(5), Some(6), Some(0o027)));
    }

    #[test]
    fn s3fs_option_names_are_aliases_or_refused_with_the_s3mount_spelling() {
        let a = parse_args(&args(&[
            "s3mount",
            "b",
            "/mnt",
            "-o",
            "url=http://h:9000,use_path_request_style,endpoint=eu-west-3,allow_other,umask=022",
            "-o",
            "passwd_file=/etc/passwd-s3fs,stat_cache_expire=30,multipart_size=64,parallel_count=8",
            "-o",
            "retries=5,use_cache=/var/cache/s3,nonempty,public_bucket=1",
        ]))
        .unwrap();
        assert_eq!(a.endpoint_url.as_deref(), Some("http://h:9000"));
        assert!(a.force_path_style && a.allow_other && a.nonempty && a.no_sign_request);
        assert_eq!(a.region.as_deref(), Some("eu-west-3"));
        assert_eq!(a.umask, Some(0o022));
        assert_eq!(a.metadata_ttl, Duration::from_secs(30));
        assert_eq!((a.part_size, a.upload_concurrency), (64 << 20, 8));
        assert_eq!(a.max_attempts, 6);
        assert_eq!(
            a.cache_dir.as_deref(),
            Some(std::path::Path::new("/var/cache/s3"))
        );
        assert_eq!(
            a.passwd_file.as_deref(),
            Some(std::path::Path::new("/etc/passwd-s3fs"))
        );
        for (o, says) in [
            ("iam_role=auto", "credentials"),
            ("ssl_verify_hostname=0", "--ca-bundle"),
            ("dbglevel=info", "--debug"),
            ("url", "needs a value"),
        ] {
            match parse_args(&args(&["s3mount", "b", "/mnt", "-o", o])) {
                Err(ArgsError::Invalid(m)) => {
                    assert!(
                        m.contains(says) && m.contains(o.split('=').next().unwrap()),
                        "{o}: {m}"
                    )
                }
                other => panic!("{o}: {other:?}"),
            }
        }
    }

    #[test]
    fn option_typos_get_a_suggestion() {
        for (typo, meant) in [
            ("endpoint_ur=http://h", "endpoint_url"),
            ("forse_path_style", "force_path_style"),
            ("allow_othre", "allow_other"),
            ("metadata_tll=5", "metadata_ttl"),
        ] {
            match parse_args(&args(&["s3mount", "b", "/mnt", "-o", typo])) {
                Err(ArgsError::Invalid(m)) => {
                    assert!(
                        m.contains(&format!("did you mean '{meant}'")),
                        "{typo}: {m}"
                    )
                }
                other => panic!("{typo}: {other:?}"),
            }
        }
        match parse_args(&args(&["s3mount", "b", "/mnt", "-o", "zzzz"])) {
            Err(ArgsError::Invalid(m)) => assert!(m.contains("s3mount --help"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_options_are_named() {
        match parse_args(&args(&["s3mount", "b", "/mnt", "-o", "ro,bogus=1"])) {
            Err(ArgsError::Invalid(m)) => assert!(m.contains("bogus"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(parse_args(&args(&["s3mount", "b", "/mnt", "-o"])).is_err());
    }

    /// Every line of fstab.example goes through the same parser mount(8) would reach.
    #[test]
    fn fstab_example_lines_parse() {
        let text = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/fstab.example"));
        let mut n = 0;
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f.len(), 6, "six fields: {line}");
            assert_eq!(f[2], "s3mount", "{line}");
            let (argv, fake) = helper_args(&args(&["/sbin/mount.s3mount", f[0], f[1], "-o", f[3]]));
            assert!(!fake);
            let cli = parse_args(&argv).unwrap_or_else(|e| panic!("{line}: {e:?}"));
            if cli.passwd_file.is_none() {
                crate::config::Config::from_cli(cli).unwrap_or_else(|e| panic!("{line}: {e}"));
            }
            n += 1;
        }
        assert!(n >= 5, "{n} lines");
    }

    #[test]
    fn mount_helper_form() {
        assert!(is_mount_helper("/sbin/mount.s3mount"));
        assert!(!is_mount_helper("/usr/bin/s3mount"));
        let (a, fake) = helper_args(&args(&[
            "mount.s3mount",
            "b:/p",
            "/mnt",
            "-sn",
            "-o",
            "ro,allow_other,_netdev",
            "-v",
        ]));
        assert!(!fake);
        let cli = parse_args(&a).unwrap();
        assert!(cli.read_only && cli.allow_other && !cli.foreground);
        let (_, fake) = helper_args(&args(&["mount.s3mount", "b", "/mnt", "-f", "-o", "rw"]));
        assert!(fake);
    }

    #[test]
    fn values_are_validated() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("12parsecs").is_err());
        assert!(parse_size("99999999999999999999T").is_err());
        assert_eq!(parse_mode("0750"), Ok(0o750));
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("77777").is_err());
        assert_eq!(parse_ttl("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_ttl("-1").is_err());
        assert!(parse_ttl("soon").is_err());
        assert!(parse_args(&args(&["s3mount", "b", "/mnt", "--file-mode", "rw-r--r--"])).is_err());
        assert!(parse_args(&args(&["s3mount", "b", "/mnt", "-o", "max_memory=lots"])).is_err());
    }
}
