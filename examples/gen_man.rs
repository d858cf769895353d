//! Regenerate the man page from the clap definitions:
//! `cargo run --example gen_man > packaging/s3mount.1` (a test fails when it drifts).

#[path = "support/man_text.rs"]
mod man_text;

fn main() -> std::io::Result<()> {
    use std::io::Write;
    std::io::stdout().write_all(&man_text::render())
}
