//! Faults between s3mount and the store, injected by the test proxy (tests/support/proxy.rs):
//! corrupted bodies in both directions, connection resets, truncated responses, a server that
//! goes away in the middle of a write, and a store that fails often. Every test runs the real
//! binary over FUSE against Garage, and checks what came out with the independent client.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::proxy::FaultProxy;
use support::{garage, pattern, Mount, S3Server};

/// A plain SDK client that talks to `endpoint` (the proxy) with the server's credentials.
fn client_via(server: &S3Server, endpoint: &str) -> aws_sdk_s3::Client {
    let creds = aws_sdk_s3::config::Credentials::new(
        &server.access_key,
        &server.secret_key,
        None,
        None,
        "test",
    );
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new(server.region.clone()))
        .endpoint_url(endpoint)
        .credentials_provider(creds)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

fn log_of(m: &Mount) -> String {
    std::fs::read_to_string(&m.log).unwrap_or_default()
}

/// Poll `cond` every 100 ms until it holds, or fail with `what` after `limit`.
fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Write `data` to `dst` (through the mount) with dd, one process that opens, writes and
/// closes (a descriptor of this test process could be flushed early by other threads' forks).
fn write_with_dd(data: &[u8], dst: &std::path::Path) {
    let src = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(src.path(), data).unwrap();
    let out = Command::new("dd")
        .arg(format!("if={}", src.path().display()))
        .arg(format!("of={}", dst.display()))
        .args(["bs=1M", "status=none"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dd to {} failed: {}",
        dst.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SHA-256 of an object read with the independent client, a chunk at a time.
fn stored_sha256(server: &S3Server, bucket: &str, key: &str) -> String {
    use sha2::Digest;
    let c = server.client();
    support::rt().block_on(async move {
        let mut body = c
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .expect("get")
            .body;
        let mut h = sha2::Sha256::new();
        while let Some(chunk) = body.try_next().await.expect("body") {
            h.update(&chunk);
        }
        format!("{:x}", h.finalize())
    })
}

/// The S3 error code and message of an error response the proxy relayed.
fn s3_code(e: &support::proxy::Exchange) -> String {
    let body = e.error.as_deref().unwrap_or("");
    let tag = |t: &str| {
        body.split_once(&format!("<{t}>"))
            .and_then(|(_, r)| r.split_once(&format!("</{t}>")))
            .map(|(v, _)| v.to_string())
            .unwrap_or_default()
    };
    format!("{}: {}", tag("Code"), tag("Message"))
}

/// The path named by a "kept locally at <path>" log line about `key`, if there is one.
fn kept_locally(log: &str, key: &str) -> Option<std::path::PathBuf> {
    log.lines()
        .filter(|l| l.contains(key))
        .find_map(|l| l.split_once("kept locally at "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .map(|p| p.trim_end_matches([',', '"']).into())
}

/// A python child that opens `path` for writing (O_TRUNC, O_CREAT when `create`), writes the
/// contents of `src`, says "written", waits for a line on stdin, then closes and says
/// "close ok" or "close errno N". One process, so nothing else ever closes the descriptor.
struct HeldWriter {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
    _src: tempfile::NamedTempFile,
}

impl HeldWriter {
    fn start(path: &std::path::Path, data: &[u8], create: bool) -> HeldWriter {
        let src = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(src.path(), data).unwrap();
        let script = r#"
import os, sys
flags = os.O_WRONLY | os.O_TRUNC | (os.O_CREAT if sys.argv[3] == "1" else 0)
fd = os.open(sys.argv[1], flags, 0o644)
data = open(sys.argv[2], 'rb').read()
view = memoryview(data)
while view:
    n = os.write(fd, view)
    view = view[n:]
print("written", flush=True)
sys.stdin.readline()
try:
    os.close(fd)
    print("close ok", flush=True)
except OSError as e:
    print("close errno", e.errno, flush=True)
"#;
        let mut child = Command::new("python3")
            .args([
                "-c",
                script,
                path.to_str().unwrap(),
                src.path().to_str().unwrap(),
                if create { "1" } else { "0" },
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut w = HeldWriter {
            child,
            out,
            _src: src,
        };
        assert_eq!(w.line(), "written", "the writer wrote everything");
        w
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        l.trim().to_string()
    }

    /// Let the child close; returns its report and how long close took.
    fn close(mut self) -> (String, Duration) {
        let t = Instant::now();
        self.child
            .stdin
            .as_mut()
            .unwrap()
            .write_all(b"close\n")
            .unwrap();
        let l = self.line();
        let took = t.elapsed();
        let _ = self.child.wait();
        (l, took)
    }
}

/// The proxy itself: connections stay alive across requests, a flip changes exactly one body
/// byte, a truncated or reset body is an error for the client, and down/up work.
#[test]
fn proxy_keeps_connections_alive_and_injects_exactly_what_it_is_told() {
    let server = garage();
    let bucket = server.new_bucket();
    let proxy = FaultProxy::start(server.port());
    let c = client_via(server, &proxy.endpoint());
    let body = pattern(300_000, 5);
    server.put(&bucket, "obj", body.clone());
    let rt = support::rt();
    let get = |range: &str| {
        let c = c.clone();
        let (b, r) = (bucket.clone(), range.to_string());
        rt.block_on(async move {
            let o = c
                .get_object()
                .bucket(&b)
                .key("obj")
                .range(r)
                .send()
                .await
                .map_err(|e| format!("{e:?}"))?;
            o.body
                .collect()
                .await
                .map(|d| d.into_bytes().to_vec())
                .map_err(|e| format!("{e:?}"))
        })
    };
    for _ in 0..20 {
        assert_eq!(get("bytes=0-999").unwrap(), &body[..1000]);
    }
    // (Not exactly 1: the client's pool may open another connection before the previous one
    // is handed back; without keep-alive it would be 20.)
    assert!(
        proxy.connections() <= 10,
        "20 sequential requests over kept-alive connections: {} connections",
        proxy.connections()
    );
    // A flip at body offset 10 changes that byte and nothing else, headers intact.
    proxy.flip_response("GET", "/obj", Some(10), 1);
    let got = get("bytes=0-999").unwrap();
    let diff: Vec<usize> = (0..1000).filter(|&i| got[i] != body[i]).collect();
    assert_eq!(diff, vec![10], "exactly the one byte flipped");
    assert_eq!(proxy.injected("flip_response", "/obj"), 1);
    // The middle of the body when no offset is given.
    proxy.flip_response("GET", "/obj", None, 1);
    let got = get("bytes=0-199999").unwrap();
    let diff: Vec<usize> = (0..200_000).filter(|&i| got[i] != body[i]).collect();
    assert_eq!(diff, vec![100_000]);
    // Truncated and reset bodies are errors for the client, not short successes.
    proxy.truncate("GET", "/obj", 1000, 1);
    assert!(get("bytes=0-199999").is_err(), "truncated body is an error");
    proxy.reset("GET", "/obj", Some(1000), 1);
    assert!(get("bytes=0-199999").is_err(), "reset mid-body is an error");
    // A reset before forwarding: the SDK retries it on a new connection.
    proxy.reset("GET", "/obj", None, 1);
    assert_eq!(get("bytes=0-999").unwrap(), &body[..1000]);
    assert_eq!(proxy.injected("reset", "/obj"), 2);
    // A flipped request body: what does the store answer?
    proxy.flip_request("PUT", "/flipped", None, 1);
    let data = pattern(100_000, 6);
    let put = {
        let c = c.clone();
        let b = bucket.clone();
        let d = data.clone();
        rt.block_on(async move {
            c.put_object()
                .bucket(&b)
                .key("flipped")
                .body(d.into())
                .send()
                .await
                .map(|_| ())
                .map_err(|e| format!("{e:?}"))
        })
    };
    let flipped = proxy
        .exchanges()
        .into_iter()
        .find(|e| e.fault == Some("flip_request"))
        .expect("the PUT body was flipped");
    eprintln!(
        "plain SDK PUT with a flipped body: store answered {} -> {:?}",
        flipped.status,
        put.as_ref()
            .map_err(|e| e.chars().take(300).collect::<String>())
    );
    assert!(
        (400..500).contains(&flipped.status),
        "the store rejects a corrupted body: {}",
        flipped.status
    );
    if let Some(stored) = server.get(&bucket, "flipped") {
        assert!(stored == data, "never a corrupted object");
    }
    // A stall pauses the response and then delivers it whole.
    proxy.stall("GET", "/obj", 500, Duration::from_millis(1500), 1);
    let t = Instant::now();
    assert_eq!(get("bytes=0-99999").unwrap(), &body[..100_000]);
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    // Down: nothing gets through; up: everything does again.
    proxy.down();
    assert!(get("bytes=0-999").is_err(), "the server is gone");
    proxy.up();
    assert_eq!(get("bytes=0-999").unwrap(), &body[..1000]);
}

/// What a whole-file read returned, against what it should have: `Ok(true)` right bytes,
/// `Ok(false)` EIO, `Err` a description of anything else (wrong bytes, another error).
fn read_outcome(path: &std::path::Path, want: &[u8]) -> Result<bool, String> {
    match std::fs::read(path) {
        Ok(got) if got == want => Ok(true),
        Ok(got) => {
            let diff: Vec<usize> = (0..got.len().min(want.len()))
                .filter(|&i| got[i] != want[i])
                .collect();
            Err(format!(
                "{}: WRONG BYTES returned ({} bytes, want {}; {} differ, first at {:?})",
                path.display(),
                got.len(),
                want.len(),
                diff.len(),
                diff.iter().take(5).collect::<Vec<_>>()
            ))
        }
        Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(false),
        Err(e) => Err(format!("{}: {e} (want the bytes or EIO)", path.display())),
    }
}

/// A corrupted GET body is caught: the read returns the right bytes (a retry) or EIO, never
/// wrong bytes; a large object read with ranged GETs fails at EOF against its stored CRC32.
#[test]
fn flipped_bytes_in_get_bodies_never_reach_the_reader() {
    let server = garage();
    let bucket = server.new_bucket();
    let small = pattern(100 << 10, 11);
    let big = pattern(20 << 20, 12);
    server.put(&bucket, "small.bin", small.clone());
    server.put(&bucket, "big.bin", big.clone());
    let proxy = FaultProxy::start(server.port());
    let args = ["--metadata-ttl", "0"];
    let mut problems = Vec::new();

    // One corrupted response: caught and fetched again, or EIO.
    let m = Mount::via(server, &proxy.endpoint(), &bucket, &args);
    proxy.flip_response("GET", "/small.bin", None, 1);
    match read_outcome(&m.join("small.bin"), &small) {
        Ok(right) => eprintln!(
            "small.bin, one body corrupted: {}",
            if right { "right bytes" } else { "EIO" }
        ),
        Err(e) => problems.push(format!("one body corrupted: {e}")),
    }
    assert_eq!(proxy.injected("flip_response", "/small.bin"), 1);
    drop(m);

    // Every response corrupted: EIO, never wrong bytes.
    proxy.flip_response("GET", "/small.bin", None, 1000);
    let m = Mount::via(server, &proxy.endpoint(), &bucket, &args);
    match read_outcome(&m.join("small.bin"), &small) {
        Ok(true) => problems.push("every body corrupted, yet the right bytes?".into()),
        Ok(false) => {}
        Err(e) => problems.push(format!(
            "every small.bin body corrupted: {e}\nlog:\n{}",
            log_of(&m)
        )),
    }
    proxy.clear();
    drop(m);

    // The big object: ranged GETs carry no checksum, the whole read is checked at EOF.
    let m = Mount::via(server, &proxy.endpoint(), &bucket, &args);
    proxy.flip_response("GET", "/big.bin", None, 1);
    match read_outcome(&m.join("big.bin"), &big) {
        Ok(false) => {
            let log = log_of(&m);
            if !log
                .lines()
                .any(|l| l.contains("big.bin") && l.to_ascii_lowercase().contains("crc32"))
            {
                problems.push(format!(
                    "big.bin: EIO but no CRC32 log line naming the key:\n{log}"
                ));
            }
        }
        Ok(true) => {
            problems.push("big.bin: a corrupted ranged body, yet the read succeeded".into())
        }
        Err(e) => problems.push(format!(
            "big.bin, one ranged body corrupted: {e}\nlog:\n{}",
            log_of(&m)
        )),
    }
    assert_eq!(proxy.injected("flip_response", "/big.bin"), 1);
    proxy.clear();

    // Reopened on the same mount: right bytes or EIO, never the corrupted ones again.
    match read_outcome(&m.join("big.bin"), &big) {
        Ok(right) => eprintln!(
            "big.bin reopened on the same mount after the mismatch: {}",
            if right { "right bytes" } else { "EIO again" }
        ),
        Err(e) => problems.push(format!("big.bin reopened after the mismatch: {e}")),
    }
    // After a remount, the right bytes.
    drop(m);
    let m = Mount::via(server, &proxy.endpoint(), &bucket, &args);
    match read_outcome(&m.join("big.bin"), &big) {
        Ok(true) => {}
        Ok(false) => problems.push("big.bin after remount, no faults: EIO".into()),
        Err(e) => problems.push(format!("big.bin after remount, no faults: {e}")),
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

/// A corrupted upload body is rejected by the store and sent again: the writes succeed and the
/// stored objects are byte-identical.
#[test]
fn flipped_bytes_in_upload_bodies_are_rejected_and_resent() {
    let server = garage();
    let bucket = server.new_bucket();
    let proxy = FaultProxy::start(server.port());
    let m = Mount::via(
        server,
        &proxy.endpoint(),
        &bucket,
        &["--part-size", "8MiB", "--metadata-ttl", "0"],
    );
    let small = pattern(100 << 10, 21);
    proxy.flip_request("PUT", &format!("/{bucket}/small-up.bin"), None, 1);
    write_with_dd(&small, &m.join("small-up.bin"));
    let flipped: Vec<_> = proxy
        .exchanges()
        .into_iter()
        .filter(|e| e.fault == Some("flip_request"))
        .collect();
    assert_eq!(flipped.len(), 1, "the PUT body was flipped: {flipped:?}");
    eprintln!(
        "flipped PutObject body: Garage answered {} {} ({})",
        flipped[0].status,
        s3_code(&flipped[0]),
        flipped[0].line
    );
    assert!(
        (400..500).contains(&flipped[0].status),
        "Garage rejects the corrupted PUT body: {flipped:?}"
    );
    assert!(
        server.get(&bucket, "small-up.bin").as_deref() == Some(&small[..]),
        "small-up.bin stored byte-identical"
    );

    let big = pattern(20 << 20, 22);
    proxy.flip_request("PUT", "partNumber=", None, 1);
    write_with_dd(&big, &m.join("big-up.bin"));
    let flipped: Vec<_> = proxy
        .exchanges()
        .into_iter()
        .filter(|e| e.fault == Some("flip_request") && e.line.contains("partNumber="))
        .collect();
    assert_eq!(flipped.len(), 1, "an UploadPart body was flipped");
    eprintln!(
        "flipped UploadPart body: Garage answered {} {} ({})",
        flipped[0].status,
        s3_code(&flipped[0]),
        flipped[0].line
    );
    assert!(
        (400..500).contains(&flipped[0].status),
        "Garage rejects the corrupted part: {flipped:?}"
    );
    assert!(
        server.get(&bucket, "big-up.bin").as_deref() == Some(&big[..]),
        "big-up.bin stored byte-identical"
    );
    assert!(server.open_uploads(&bucket).is_empty());
    let log = log_of(&m);
    for key in ["small-up.bin", "big-up.bin"] {
        assert!(
            log.lines()
                .any(|l| l.contains(key) && l.contains("InvalidDigest")),
            "the rejected body of {key} is logged"
        );
    }
}

/// Connections reset mid-body and bodies cut short on a fifth of the GETs: the read resumes and
/// returns every byte right.
#[test]
fn resets_and_truncated_get_bodies_are_survived_byte_identical() {
    let server = garage();
    let bucket = server.new_bucket();
    let body = pattern(64 << 20, 31);
    server.put(&bucket, "resets.bin", body.clone());
    let proxy = FaultProxy::start(server.port());
    let m = Mount::via(
        server,
        &proxy.endpoint(),
        &bucket,
        &[
            "--max-attempts",
            "8",
            "--max-prefetch",
            "1MiB",
            "--metadata-ttl",
            "0",
        ],
    );
    // One of each for sure, then a fifth of the GETs at random.
    proxy.reset("GET", "/resets.bin", Some(100_000), 1);
    proxy.truncate("GET", "/resets.bin", 250_000, 1);
    proxy.reset("GET", "/resets.bin", None, 1);
    proxy.reset_some("GET", "/resets.bin", Some(100_000), 80);
    proxy.truncate_some("GET", "/resets.bin", 250_000, 80);
    proxy.reset_some("GET", "/resets.bin", None, 40);
    let t = Instant::now();
    let got = std::fs::read(m.join("resets.bin")).expect("read through resets");
    eprintln!(
        "64 MiB read through resets/truncations in {:?}",
        t.elapsed()
    );
    assert!(got == body, "byte-identical");
    let (resets, cuts) = (
        proxy.injected("reset", "/resets.bin"),
        proxy.injected("truncate", "/resets.bin"),
    );
    eprintln!(
        "{resets} resets, {cuts} truncations, {} GETs",
        proxy
            .exchanges()
            .iter()
            .filter(|e| e.line.starts_with("GET ") && e.line.contains("/resets.bin"))
            .count()
    );
    assert!(resets >= 2 && cuts >= 1, "faults were injected");
    let log = log_of(&m);
    assert!(
        log.contains("resuming where it stopped"),
        "broken bodies were resumed"
    );
}

/// The server goes away while a replacement of an existing object is being written: close()
/// reports EIO, the old object stays intact, and no multipart upload is left open once the
/// server is back. A small new file: EIO too, and its bytes are kept locally.
#[test]
fn server_gone_during_a_write_gives_eio_and_loses_nothing() {
    let server = garage();
    let bucket = server.new_bucket();
    let old = pattern(3 << 20, 41);
    server.put(&bucket, "keep.bin", old.clone());
    let proxy = FaultProxy::start(server.port());
    let m = Mount::via(
        server,
        &proxy.endpoint(),
        &bucket,
        &[
            "--part-size",
            "8MiB",
            "--max-attempts",
            "3",
            "--metadata-ttl",
            "0",
        ],
    );
    let new = pattern(12 << 20, 42);
    let writer = HeldWriter::start(&m.join("keep.bin"), &new, false);
    wait_for(
        Duration::from_secs(60),
        "the first part of keep.bin uploaded",
        || proxy.answered("PUT", "partNumber=", 200) >= 1,
    );
    assert!(!server.open_uploads(&bucket).is_empty());
    proxy.down();
    let (res, took) = writer.close();
    eprintln!("keep.bin: close with the server gone: {res:?} after {took:?}");
    assert_eq!(
        res,
        format!("close errno {}", libc::EIO),
        "close reports the failed upload"
    );
    assert!(
        server.get(&bucket, "keep.bin").as_deref() == Some(&old[..]),
        "the old keep.bin is intact"
    );
    proxy.up();
    // The upload could not be aborted while the server was gone; once it is back, nothing may
    // stay open (checked after the small file, so both variants report).
    let back = Instant::now();
    let mut problems = Vec::new();

    // A small new file: the single PUT at close fails.
    let small = pattern(100 << 10, 43);
    let writer = HeldWriter::start(&m.join("small-new.bin"), &small, true);
    proxy.down();
    let (res, took) = writer.close();
    proxy.up();
    eprintln!("small-new.bin: close with the server gone: {res:?} after {took:?}");
    assert_eq!(res, format!("close errno {}", libc::EIO));
    assert_eq!(
        server.get(&bucket, "small-new.bin"),
        None,
        "no object was made"
    );
    let deadline = back + Duration::from_secs(15);
    let open = loop {
        let open = server.open_uploads(&bucket);
        if open.is_empty() || Instant::now() > deadline {
            break open;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if open.is_empty() {
        eprintln!(
            "keep.bin: open uploads gone {:?} after the server came back",
            back.elapsed()
        );
    } else {
        problems.push(format!(
            "multipart uploads still open {:?} after the server came back: {open:?}",
            back.elapsed()
        ));
    }
    assert!(server.get(&bucket, "keep.bin").as_deref() == Some(&old[..]));
    let log = log_of(&m);
    match kept_locally(&log, "small-new.bin") {
        Some(path) => {
            let kept = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("kept copy {}: {e}", path.display()));
            assert!(kept == small, "the kept copy holds what was written");
            let _ = std::fs::remove_file(&path);
        }
        None => eprintln!(
            "NOTE: the log names no local copy of small-new.bin (no \"kept locally at\" line); \
             that check was skipped"
        ),
    }
    assert!(problems.is_empty(), "{}\nlog:\n{log}", problems.join("\n"));
}

/// A tenth of all requests fail with 503 and 2% of connections are reset: a 1 GiB file written
/// in 4 MiB writes and read back with sha256sum through the mount is byte-identical.
#[test]
fn one_gib_through_a_flaky_store_is_byte_identical() {
    use sha2::Digest;
    let server = garage();
    let bucket = server.new_bucket();
    let proxy = FaultProxy::start(server.port());
    let m = Mount::via(
        server,
        &proxy.endpoint(),
        &bucket,
        &[
            "--part-size",
            "16MiB",
            "--max-attempts",
            "10",
            "--metadata-ttl",
            "0",
        ],
    );
    // Written straight into the mount 4 MiB at a time (like dd bs=4M) from a generated pattern,
    // so the run needs no 1 GiB source file on local disk.
    proxy.fail_some("*", "", 503, 100);
    proxy.reset_some("*", "", None, 10);
    proxy.reset_some("GET", "", Some(1 << 20), 10);
    let t = Instant::now();
    let mut h = sha2::Sha256::new();
    {
        let mut f = std::fs::File::create(m.join("gig.bin")).unwrap();
        for i in 0..64 {
            let chunk = pattern(16 << 20, 1000 + i);
            h.update(&chunk);
            for piece in chunk.chunks(4 << 20) {
                f.write_all(piece).unwrap();
            }
        }
        // close() is where the upload completes; its result is the write's.
        f.sync_all().unwrap();
    }
    let want = format!("{:x}", h.finalize());
    let write_time = t.elapsed();
    let t = Instant::now();
    let out = Command::new("sha256sum")
        .arg(m.join("gig.bin"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sha256sum: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read_time = t.elapsed();
    let through_mount = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    proxy.clear();
    let injected = proxy.hits();
    eprintln!(
        "1 GiB: write {write_time:?}, read {read_time:?}, {injected} faults injected in {} requests",
        proxy.exchanges().len()
    );
    assert_eq!(through_mount, want, "read back through the mount");
    let t = Instant::now();
    assert_eq!(stored_sha256(server, &bucket, "gig.bin"), want, "stored");
    eprintln!("stored object hashed in {:?}", t.elapsed());
    assert!(server.open_uploads(&bucket).is_empty());
    assert!(injected >= 20, "faults were injected: {injected}");
}

/// A large directory is handed to `ls` while its pages arrive; when a later page cannot be had,
/// `ls` gets the entries before it and then EIO, and nothing half-listed is kept: once the store
/// answers again, the whole directory is listed.
#[test]
fn a_listing_that_breaks_half_way_gives_eio_and_is_not_kept() {
    let server = garage();
    let bucket = server.new_bucket();
    server.put_empty_many(&bucket, (0..2_500).map(|i| format!("big/f{i:05}")));
    let proxy = FaultProxy::start(server.port());
    let m = Mount::via(server, &proxy.endpoint(), &bucket, &["--max-attempts", "2"]);
    // Every request for a second or later page of a listing fails.
    proxy.fail_some("GET", "continuation-token", 500, 1000);
    // Entries read one by one until the error (`ls` shows nothing when readdir fails).
    let script = format!(
        "import os\nn = 0\ntry:\n    for e in os.scandir({:?}):\n        n += 1\n    print(n, 0)\nexcept OSError as e:\n    print(n, e.errno)\n",
        m.join("big").display().to_string()
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    let mut words = said
        .split_whitespace()
        .map(|w| w.parse::<usize>().unwrap_or(0));
    let (listed, errno) = (words.next().unwrap_or(0), words.next().unwrap_or(0));
    assert_eq!(
        errno,
        libc::EIO as usize,
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The first page (1,000 keys) was handed out before the second one failed.
    assert!(
        (900..2_500).contains(&listed),
        "{listed} entries before the error: {said}"
    );
    let out = support::sh(&format!("ls -1 '{}'", m.join("big").display()));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && err.contains("Input/output error"),
        "{err}"
    );
    proxy.clear();
    let out = support::sh(&format!("ls -1 '{}' | wc -l", m.join("big").display()));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2500");
}
