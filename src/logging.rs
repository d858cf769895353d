//! The daemon's log: where it goes (stderr in the foreground; `--log-file`, else syslog when
//! `/dev/log` exists, else a file under [`crate::paths::log_base`] in the background), in which
//! format (text, or one JSON object per line), and at which level. The level filter sits behind
//! a reload handle: SIGUSR2 cycles default -> debug -> trace -> default without a restart, and
//! SIGHUP reopens the log file (after logrotate moved it).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// Text for people, JSON for log collectors.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Where the log goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogTarget {
    Stderr,
    File(PathBuf),
    Syslog,
}

impl LogTarget {
    /// The background default: syslog where a syslog daemon listens, else a file (named on
    /// stderr by the caller, before it detaches).
    pub fn background(log_file: Option<&Path>, fallback_name: &str) -> LogTarget {
        match log_file {
            Some(p) => LogTarget::File(p.to_path_buf()),
            None if Path::new("/dev/log").exists() => LogTarget::Syslog,
            None => LogTarget::File(crate::paths::log_base().join(format!("{fallback_name}.log"))),
        }
    }
}

/// The three levels SIGUSR2 steps through.
const LEVELS: [&str; 3] = [
    "",
    "s3mount=debug,fuser::mnt=off,info",
    "s3mount=trace,debug",
];

struct Control {
    filter: reload::Handle<EnvFilter, Registry>,
    default: String,
    step: Mutex<usize>,
    file: Option<Arc<ReopenFile>>,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

/// A log file that can be reopened at its path (SIGHUP).
struct ReopenFile {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl ReopenFile {
    fn open(path: &Path) -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)
    }
}

struct FileWriter(Arc<ReopenFile>);

impl std::io::Write for FileWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut f = self.0.file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(b)?;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Clone)]
struct FileSink(Arc<ReopenFile>);

impl<'a> MakeWriter<'a> for FileSink {
    type Writer = FileWriter;
    fn make_writer(&'a self) -> FileWriter {
        FileWriter(self.0.clone())
    }
}

/// Set up logging. `debug` (-d) starts at the debug level; `S3MOUNT_LOG` (a tracing filter)
/// overrides both. Returns an error only when a log file cannot be opened.
pub fn init(target: &LogTarget, format: LogFormat, debug: bool) -> Result<(), String> {
    // fuser's own "unmount failed" after an external umount is noise, not an error; so is
    // the SDK's warning that instance metadata had no region (us-east-1 is used then).
    let default = std::env::var("S3MOUNT_LOG")
        .ok()
        .filter(|v| EnvFilter::try_new(v).is_ok())
        .unwrap_or_else(|| {
            if debug {
                LEVELS[1].to_string()
            } else {
                "s3mount=info,fuser::mnt=off,aws_config=error,warn".to_string()
            }
        });
    let (filter, handle) = reload::Layer::new(EnvFilter::new(&default));
    let mut file = None;
    let fmt = tracing_subscriber::fmt::layer().with_target(true);
    let layer: Box<dyn Layer<Registry> + Send + Sync> = match target {
        LogTarget::Stderr => {
            let ansi = std::io::stderr().is_terminal()
                && format == LogFormat::Text
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            let l = fmt.with_ansi(ansi).with_writer(std::io::stderr);
            match format {
                LogFormat::Text => Box::new(l),
                LogFormat::Json => Box::new(l.json()),
            }
        }
        LogTarget::File(path) => {
            let f = ReopenFile::open(path)
                .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
            let sink = Arc::new(ReopenFile {
                path: path.clone(),
                file: Mutex::new(f),
            });
            file = Some(sink.clone());
            let l = fmt.with_ansi(false).with_writer(FileSink(sink));
            match format {
                LogFormat::Text => Box::new(l),
                LogFormat::Json => Box::new(l.json()),
            }
        }
        LogTarget::Syslog => {
            // syslog stamps the time itself.
            let l = fmt.with_ansi(false).with_writer(syslog::Syslog::open());
            match format {
                LogFormat::Text => Box::new(l.without_time()),
                LogFormat::Json => Box::new(l.json()),
            }
        }
    };
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .try_init();
    let _ = CONTROL.set(Control {
        filter: handle,
        default,
        step: Mutex::new(0),
        file,
    });
    Ok(())
}

/// SIGUSR2: the next level of default -> debug -> trace -> default. Returns the filter now set.
pub fn cycle_level() -> Option<String> {
    let c = CONTROL.get()?;
    let mut step = c.step.lock().unwrap_or_else(|p| p.into_inner());
    *step = (*step + 1) % LEVELS.len();
    let directive = if *step == 0 {
        c.default.clone()
    } else {
        LEVELS[*step].to_string()
    };
    c.filter.reload(EnvFilter::new(&directive)).ok()?;
    Some(directive)
}

/// SIGHUP: reopen the log file at its path (logrotate moved the old one away).
pub fn reopen() -> Option<std::io::Result<PathBuf>> {
    let f = CONTROL.get()?.file.as_ref()?;
    Some(ReopenFile::open(&f.path).map(|new| {
        *f.file.lock().unwrap_or_else(|p| p.into_inner()) = new;
        f.path.clone()
    }))
}

mod syslog {
    //! A tracing writer that hands each line to syslog(3) with the event's level.
    use std::ffi::CString;
    use tracing_subscriber::fmt::MakeWriter;

    pub struct Syslog;

    impl Syslog {
        pub fn open() -> Self {
            static IDENT: &[u8] = b"s3mount\0";
            // SAFETY: IDENT is NUL-terminated and static, as openlog keeps the pointer.
            unsafe { libc::openlog(IDENT.as_ptr().cast(), libc::LOG_PID, libc::LOG_DAEMON) };
            Syslog
        }
    }

    pub struct Line {
        priority: libc::c_int,
        buf: Vec<u8>,
    }

    impl std::io::Write for Line {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.buf.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Drop for Line {
        fn drop(&mut self) {
            let text: Vec<u8> = self.buf.iter().copied().filter(|b| *b != 0).collect();
            if let Ok(c) = CString::new(text) {
                // SAFETY: a constant "%s" format with one NUL-terminated string argument.
                unsafe { libc::syslog(self.priority, c"%s".as_ptr(), c.as_ptr()) };
            }
        }
    }

    impl<'a> MakeWriter<'a> for Syslog {
        type Writer = Line;
        fn make_writer(&'a self) -> Line {
            Line {
                priority: libc::LOG_INFO,
                buf: Vec::new(),
            }
        }
        fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Line {
            let priority = match *meta.level() {
                tracing::Level::ERROR => libc::LOG_ERR,
                tracing::Level::WARN => libc::LOG_WARNING,
                tracing::Level::INFO => libc::LOG_INFO,
                _ => libc::LOG_DEBUG,
            };
            Line {
                priority,
                buf: Vec::new(),
            }
        }
    }
}
