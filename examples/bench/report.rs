//! Every figure the benchmark prints is also kept here, under the daemon whose pass printed it,
//! so that a run over several daemons (`--daemons s3mount,s3fs,rclone`) ends with one table:
//! each workload a row, each daemon a column with its figure and its ratio to the plain client
//! of the same pass, and, for each s3mount variant, its figure against the best peer's
//! ("higher is better": speed over speed, time of the peer over time of s3mount; a figure in
//! ms or CPU-s is better lower, one in MB/s or /s better higher).

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
        // The best peer's figure, and how each s3mount variant compares with it.
        let value = |d: Daemon| find(d, label).and_then(|f| figure_value(label, &f.mount));
        let best_peer = daemons
            .iter()
            .filter(|d| !d.is_s3mount())
            .filter_map(|&d| value(d))
            .fold(None, |best: Option<(f64, bool)>, (v, higher)| {
                Some(match best {
                    Some((b, _)) if (higher && b >= v) || (!higher && b <= v) => (b, higher),
                    _ => (v, higher),
                })
            });
        for &d in ours.iter() {
            match (value(d), best_peer) {
                (Some((o, true)), Some((p, _))) if p > 0.0 => {
                    out += &format!(" **{:.2}x** |", o / p)
                }
                (Some((o, false)), Some((p, _))) if o > 0.0 => {
                    out += &format!(" **{:.2}x** |", p / o)
                }
                _ => out += " |",
            }
        }
        out += "\n";
    }
    out
}

/// The number a figure starts with, and whether more is better: times ("12.3 ms"), CPU
/// seconds and bytes fetched per byte are better lower; speeds ("MB/s", "/s") higher.
fn figure_value(label: &str, figure: &str) -> Option<(f64, bool)> {
    let v: f64 = figure.split_whitespace().next()?.parse().ok()?;
    let lower =
        figure.ends_with(" ms") || label.contains("CPU-s") || label.contains("bytes fetched");
    Some((v, !lower))
}
