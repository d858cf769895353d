//! The shipped man page is generated from the clap definitions and must not drift from them.

#[path = "../examples/support/man_text.rs"]
mod man_text;

#[test]
fn man_page_matches_the_cli() {
    let fresh = man_text::render();
    let shipped = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/s3mount.1"))
        .unwrap_or_default();
    assert!(
        shipped == fresh,
        "packaging/s3mount.1 is out of date: run `cargo run --example gen_man > packaging/s3mount.1`"
    );
}

#[test]
fn configuration_doc_matches_the_cli() {
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/CONFIGURATION.md"
    ))
    .unwrap_or_default();
    assert!(
        shipped == s3mount::cli::configuration_markdown(),
        "docs/CONFIGURATION.md is out of date: run `cargo run --example gen_config > docs/CONFIGURATION.md`"
    );
}
