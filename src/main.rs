use s3mount::cli::{helper_args, is_mount_helper, parse_args, ArgsError};
use s3mount::config::Config;
use s3mount::mount;

fn fail(message: &str, code: i32) -> ! {
    eprintln!("s3mount: {message}");
    std::process::exit(code);
}

fn main() {
    let mut args = Vec::new();
    for a in std::env::args_os() {
        match a.into_string() {
            Ok(s) => args.push(s),
            Err(bad) => fail(&format!("argument {bad:?} is not valid UTF-8"), 2),
        }
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
    let cfg = Config::from_cli(cli).unwrap_or_else(|m| fail(&m, 2));
    if fake {
        // mount -f: validate everything, mount nothing.
        std::process::exit(0);
    }
    let mountpoint = mount::check_local(&cfg).unwrap_or_else(|f| fail(&f.message, f.code));
    let ready = if cfg.foreground {
        mount::init_logging(&cfg, true);
        None
    } else {
        let pipe = mount::daemonize().unwrap_or_else(|f| fail(&f.message, f.code));
        mount::init_logging(&cfg, false);
        Some(pipe)
    };
    if let Err(f) = mount::run(cfg, mountpoint, ready) {
        tracing::error!("{}", f.message);
        fail(&f.message, f.code);
    }
}
