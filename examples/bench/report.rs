//! Every figure the benchmark prints is also kept here, under the daemon whose pass printed it,
//! so that a run over several daemons (`--daemons s3mount,s3fs,rclone`) ends with one table:
//! each workload a row, each daemon a column with its figure and its ratio to the plain client
//! of the same pass, and each s3mount variant's ratio over the best peer's. Ratios are always "higher is
//! better" (speed over plain speed, or plain time over time), so they compare across passes
//! on a noisy machine better than raw figures do.

use std::sync::Mutex;

use super::Daemon;

struct Figure {
    daemon: Daemon,
    label: String,
    plain: String,
    mount: String,
    ratio: Option<f64>,
}

static FIGURES: Mutex<Vec<Figure>> = Mutex::new(Vec::new());
static CURRENT: Mutex<Daemon> = Mutex::new(Daemon::S3mount);

/// The daemon whose figures are printed from now on.
pub fn set_daemon(d: Daemon) {
    *CURRENT.lock().unwrap() = d;
}

/// Keep one printed figure for the comparison table.
pub fn record(label: &str, plain: &str, mount: &str, ratio: Option<f64>) {
    let daemon = *CURRENT.lock().unwrap();
    FIGURES.lock().unwrap().push(Figure {
        daemon,
        label: label.trim().to_string(),
        plain: plain.to_string(),
        mount: mount.to_string(),
        ratio,
    });
}

/// The comparison of every daemon's figures, as a Markdown table (for docs/BENCHMARKS.md and
/// the README): one row per workload in the order first printed.
pub fn comparison(daemons: &[Daemon]) -> String {
    let figures = FIGURES.lock().unwrap();
    let mut labels: Vec<&str> = Vec::new();
    for f in figures.iter() {
        if !labels.contains(&f.label.as_str()) {
            labels.push(&f.label);
        }
    }
    let find = |d: Daemon, label: &str| figures.iter().find(|f| f.daemon == d && f.label == label);
    // One "over the best peer" column for each s3mount variant in the run.
    let ours: Vec<Daemon> = daemons.iter().copied().filter(|d| d.is_s3mount()).collect();
    let mut out = String::from("| workload | plain S3 |");
    for d in daemons {
        out += &format!(" {} |", d.name());
    }
    for d in &ours {
        out += &format!(" {} / best peer |", d.name());
    }
    out += "\n|---|---|";
    for _ in daemons.iter().chain(&ours) {
        out += "---|";
    }
    out += "\n";
    for label in labels {
        // The plain client's figure of the first pass that has the row.
        let plain = daemons
            .iter()
            .find_map(|&d| find(d, label))
            .map(|f| f.plain.as_str())
            .unwrap_or("");
        out += &format!("| {label} | {plain} |");
        for &d in daemons {
            match find(d, label) {
                Some(f) => match f.ratio {
                    Some(r) => out += &format!(" {} ({r:.2}x) |", f.mount),
                    None => out += &format!(" {} |", f.mount),
                },
                None => out += " — |",
            }
        }
        let best_peer = daemons
            .iter()
            .filter(|d| !d.is_s3mount())
            .filter_map(|&d| find(d, label).and_then(|f| f.ratio))
            .filter(|r| r.is_finite() && *r > 0.0)
            .fold(None, |best: Option<f64>, r| {
                Some(best.map_or(r, |b| b.max(r)))
            });
        for &d in ours.iter() {
            match (find(d, label).and_then(|f| f.ratio), best_peer) {
                (Some(o), Some(p)) => out += &format!(" **{:.2}x** |", o / p),
                _ => out += " |",
            }
        }
        out += "\n";
    }
    out
}
