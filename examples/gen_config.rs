//! Regenerate docs/CONFIGURATION.md from the clap definitions:
//! `cargo run --example gen_config > docs/CONFIGURATION.md` (a test fails when it drifts).

fn main() {
    print!("{}", s3mount::cli::configuration_markdown());
}
