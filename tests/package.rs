//! The Debian package (cargo-deb, from the test build of the binary): what it ships and what
//! its maintainer scripts do. .ci/run installs cargo-deb and sets S3MOUNT_REQUIRE_DEB=1; without
//! cargo-deb elsewhere the test says so and checks nothing.

use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn debian_package_ships_the_helper_link_units_docs_and_careful_scripts() {
    let have = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        assert!(
            std::env::var_os("S3MOUNT_REQUIRE_DEB").is_none(),
            "cargo-deb is required here (cargo install cargo-deb --locked)"
        );
        eprintln!("cargo-deb is not installed: the package is not checked");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let deb = dir.path().join("s3mount.deb");
    // The test build stands in for the release build (the contents are the same files).
    run(Command::new("cargo")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["deb", "--no-build", "--profile", "dev", "--no-strip", "-o"])
        .arg(&deb));
    let list = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for want in [
        "./sbin/mount.s3mount -> /usr/bin/s3mount",
        "./usr/bin/s3mount",
        "./lib/systemd/system/s3mount@.service",
        "./usr/share/man/man1/s3mount.1.gz",
        "./usr/share/man/man8/mount.s3mount.8.gz",
        "./usr/share/doc/s3mount/README.md",
        "./usr/share/doc/s3mount/docs/OPERATIONS.md",
        "./usr/share/doc/s3mount/docs/CONFIGURATION.md",
    ] {
        assert!(list.contains(want), "{want} missing from:\n{list}");
    }
    let control = dir.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    let script = |name: &str| std::fs::read_to_string(control.join(name)).unwrap();
    for name in ["preinst", "postinst", "prerm", "postrm"] {
        run(Command::new("sh").arg("-n").arg(control.join(name)));
    }
    assert!(
        !script("postinst").contains("ln -s"),
        "the link is a file of the package"
    );
    assert!(script("postinst").contains("daemon-reload"));
    assert!(
        script("postinst").contains("s3mount upgrade"),
        "supervised mounts move to the new binary on an upgrade"
    );
    assert!(
        script("preinst").contains("dpkg-divert"),
        "an administrator's own link is kept"
    );
    assert!(
        script("prerm").contains("fuse.s3mount"),
        "live mounts are named"
    );
    assert!(Path::new(&deb).metadata().unwrap().len() > 1 << 20);
}
