#![deny(clippy::undocumented_unsafe_blocks)]

use s3mount::cli::{helper_args, is_mount_helper, parse_args, ArgsError};
use s3mount::config::Config;
use s3mount::logging::{self, LogTarget};
use s3mount::mount;

fn fail(message: &str, code: i32) -> ! {
    eprintln!("s3mount: {message}");
    std::process::exit(code);
}

/// glibc gives each thread that allocates a malloc arena of its own (up to 8 per core), and
/// memory freed in one arena cannot serve another: with many uploads and readers at once the
/// daemon's RSS grew 60-100 MiB past what its buffers held. Two arenas keep RSS under the memory
/// budget (soak: 515-547 MiB -> 438-451 MiB) at no measurable cost. MALLOC_ARENA_MAX, when
/// set, still wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: called before any other thread exists; mallopt only sets a tunable.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

fn main() {
    limit_malloc_arenas();
    let mut args = Vec::new();
    for a in std::env::args_os() {
        match a.into_string() {
            Ok(s) => args.push(s),
            Err(bad) => fail(&format!("argument {bad:?} is not valid UTF-8"), 2),
        }
    }
    if args.get(1).map(String::as_str) == Some("status") {
        std::process::exit(s3mount::control::status_command(&args[1..]));
    }
    if args.get(1).map(String::as_str) == Some("upgrade") {
        std::process::exit(s3mount::control::upgrade_command(&args[1..]));
    }
    let mut fake = false;
    if args.first().is_some_and(|a| is_mount_helper(a)) {
        let (a, f) = helper_args(&args);
        args = a;
        fake = f;
    }
    let cli = match parse_args(&args) {
        Ok(c) => c,
        Err(ArgsError::Clap(e)) => e.exit(),
        Err(ArgsError::Invalid(m)) => fail(&m, 2),
    };
    let mut cfg = Config::from_cli(cli).unwrap_or_else(|m| fail(&m, 2));
    cfg.given_options = s3mount::cli::explicit_options(&args);
    if fake {
        // mount -f: validate everything, mount nothing.
        std::process::exit(0);
    }
    // A worker of a supervised mount (`--supervise`): serve what the supervisor mounted.
    if let Some(worker) = s3mount::supervisor::WorkerEnv::from_env() {
        let worker = worker.unwrap_or_else(|m| fail(&m, 2));
        let target = if cfg.foreground {
            LogTarget::Stderr
        } else {
            LogTarget::background(cfg.log_file.as_deref(), &cfg.id.0)
        };
        logging::init(&target, cfg.log_format, cfg.debug).unwrap_or_else(|m| fail(&m, 2));
        let report = worker.report().ok();
        let mountpoint = worker
            .mountpoint
            .clone()
            .unwrap_or_else(|| cfg.mountpoint.clone());
        if let Err(f) = mount::run(cfg, mountpoint, None, Some(worker)) {
            tracing::error!("{}", f.message);
            match report {
                // The supervisor says it, once, where the user sees it.
                Some(r) => {
                    r.failed(&f.message, f.code);
                    std::process::exit(f.code);
                }
                None => fail(&f.message, f.code),
            }
        }
        return;
    }
    // A mount systemd kept alive across a restart of the service: not checked (a stat of a
    // mount nobody serves yet would wait forever), served again.
    let stored = match s3mount::supervisor::stored_connection(&cfg.mountpoint) {
        Some(c) if !cfg.supervise => {
            // Only a supervisor can serve it: given up, so the mount point can be checked.
            c.discard(&cfg.mountpoint);
            None
        }
        stored => stored,
    };
    let mountpoint = match stored {
        Some(_) => cfg.mountpoint.clone(),
        None => mount::check_local(&cfg).unwrap_or_else(|f| fail(&f.message, f.code)),
    };
    let ready = if cfg.foreground {
        logging::init(&LogTarget::Stderr, cfg.log_format, cfg.debug)
            .unwrap_or_else(|m| fail(&m, 2));
        None
    } else {
        let target = LogTarget::background(cfg.log_file.as_deref(), &cfg.id.0);
        // Said once the mount is live (a failure before that is the one line printed).
        let note = match (&target, &cfg.log_file) {
            (LogTarget::File(path), None) => Some(format!(
                "s3mount: no syslog here (/dev/log is missing): the daemon logs to {}",
                path.display()
            )),
            _ => None,
        };
        let pipe = mount::daemonize(note).unwrap_or_else(|f| fail(&f.message, f.code));
        logging::init(&target, cfg.log_format, cfg.debug).unwrap_or_else(|m| fail(&m, 2));
        Some(pipe)
    };
    let served = if cfg.supervise {
        s3mount::supervisor::run(&cfg, &mountpoint, ready, &args, stored)
    } else {
        mount::run(cfg, mountpoint, ready, None)
    };
    if let Err(f) = served {
        tracing::error!("{}", f.message);
        fail(&f.message, f.code);
    }
}
