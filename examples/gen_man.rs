//! Regenerate the man page from the clap definitions:
//! `cargo run --example gen_man > packaging/s3mount.1` (a test fails when it drifts).

fn main() -> std::io::Result<()> {
    use clap::CommandFactory;
    let cmd = s3mount::cli::Cli::command();
    clap_mangen::Man::new(cmd).render(&mut std::io::stdout())
}
