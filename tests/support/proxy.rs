//! A fault-injecting HTTP/1.1 proxy between s3mount and the test S3 server.
//!
//! Requests pass through unchanged unless a rule matches their request line (method, or `*` for
//! any, and a substring of the line); a matching rule applies its action: answer with an error
//! status, stall, reset the connection, truncate the response body, or flip one byte of the
//! request or response body. [`FaultProxy::down`] makes the proxy refuse everything (as if the
//! server went away) until [`FaultProxy::up`].
//!
//! The proxy parses HTTP/1.1 framing in both directions (Content-Length and chunked transfer
//! encoding, `Expect: 100-continue`, bodiless responses to HEAD and 1xx/204/304), so a client
//! connection is kept alive across requests exactly as with the real server. Each request gets
//! a fresh upstream connection, so an upstream that dropped an idle connection never shows.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// Answer with this status instead of forwarding.
    Fail(u16),
    /// Forward, then stop relaying the response after `after` bytes (head included) for `pause`.
    Stall { after: usize, pause: Duration },
    /// Close the client connection with a RST: before forwarding (`None`), or after this many
    /// bytes of the response body.
    Reset { after: Option<u64> },
    /// Forward, but end the response after this many body bytes and close (a FIN).
    Truncate { after: u64 },
    /// Forward, XOR one byte of the response body at this offset (`None`: the middle).
    FlipResponse { at: Option<u64> },
    /// XOR one byte of the request body at this offset (`None`: the middle) before forwarding.
    FlipRequest { at: Option<u64> },
}

#[derive(Clone, Debug)]
struct Rule {
    method: String,
    contains: String,
    action: Action,
    remaining: u32,
    /// Share of matching requests the rule applies to, in 1/1000.
    per_mille: u32,
}

/// One request the proxy saw, and what became of it.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// The request line, e.g. `PUT /bucket/key?partNumber=1&uploadId=.. HTTP/1.1`.
    pub line: String,
    /// Status the server answered (0: none, the request never reached it or it failed).
    pub status: u16,
    /// The fault injected into this exchange, if any (e.g. "flip_response").
    pub fault: Option<&'static str>,
    /// The response reached the client complete and unmodified.
    pub complete: bool,
    /// The start of the body of an error response (status 400 and up), e.g. the S3 error code.
    pub error: Option<String>,
}

#[derive(Default)]
struct Shared {
    rules: Mutex<Vec<Rule>>,
    hits: Mutex<u32>,
    down: AtomicBool,
    log: Mutex<Vec<Exchange>>,
    connections: std::sync::atomic::AtomicU32,
}

impl Shared {
    fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    /// The action of the first rule that matches `line` (consuming one of its uses). Rules
    /// that flip a request body byte only match requests that have a body.
    fn take_action(&self, line: &str, has_body: bool) -> Option<Action> {
        let mut rules = self.rules.lock().unwrap();
        let pos = rules.iter().position(|r| {
            (has_body || !matches!(r.action, Action::FlipRequest { .. }))
                && (r.method == "*" || line.starts_with(&format!("{} ", r.method)))
                && line.contains(&r.contains)
                && (r.per_mille >= 1000 || next_roll() < r.per_mille)
        });
        let p = pos?;
        let action = rules[p].action;
        if rules[p].remaining != u32::MAX {
            rules[p].remaining -= 1;
        }
        if rules[p].remaining == 0 {
            rules.remove(p);
        }
        *self.hits.lock().unwrap() += 1;
        Some(action)
    }

    fn record(&self, line: &str, status: u16, fault: Option<&'static str>, complete: bool) {
        self.record_error(line, status, fault, complete, None);
    }

    fn record_error(
        &self,
        line: &str,
        status: u16,
        fault: Option<&'static str>,
        complete: bool,
        error: Option<String>,
    ) {
        self.log.lock().unwrap().push(Exchange {
            line: line.to_string(),
            status,
            fault,
            complete,
            error,
        });
    }
}

pub struct FaultProxy {
    pub port: u16,
    shared: Arc<Shared>,
}

/// A deterministic stream of numbers in 0..1000 for fractional rules.
fn next_roll() -> u32 {
    use std::sync::atomic::AtomicU64;
    static STATE: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    let mut x = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x % 1000) as u32
}

impl FaultProxy {
    pub fn start(upstream_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let shared: Arc<Shared> = Arc::default();
        let sh = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                sh.connections.fetch_add(1, Ordering::SeqCst);
                if sh.is_down() {
                    // The server is gone: the connection is accepted and reset at once.
                    reset(&client);
                    continue;
                }
                let sh = sh.clone();
                std::thread::spawn(move || {
                    let _ = serve(client, upstream_port, &sh);
                });
            }
        });
        FaultProxy { port, shared }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Answer the next `times` requests with `method` whose request line contains `contains`
    /// with `status`.
    pub fn fail(&self, method: &str, contains: &str, status: u16, times: u32) {
        self.add(method, contains, Action::Fail(status), times, 1000);
    }

    /// Fail a share (per mille) of matching requests with `status`, indefinitely.
    pub fn fail_some(&self, method: &str, contains: &str, status: u16, per_mille: u32) {
        self.add(method, contains, Action::Fail(status), u32::MAX, per_mille);
    }

    /// Let the next `times` matching responses stop after `after` bytes for `pause`.
    pub fn stall(
        &self,
        method: &str,
        contains: &str,
        after: usize,
        pause: std::time::Duration,
        times: u32,
    ) {
        self.add(
            method,
            contains,
            Action::Stall { after, pause },
            times,
            1000,
        );
    }

    /// Reset (RST) the connection of the next `times` matching requests: before forwarding them
    /// (`after: None`) or after `after` bytes of the response body.
    pub fn reset(&self, method: &str, contains: &str, after: Option<u64>, times: u32) {
        self.add(method, contains, Action::Reset { after }, times, 1000);
    }

    /// Reset a share (per mille) of matching requests, indefinitely (see [`FaultProxy::reset`]).
    pub fn reset_some(&self, method: &str, contains: &str, after: Option<u64>, per_mille: u32) {
        self.add(
            method,
            contains,
            Action::Reset { after },
            u32::MAX,
            per_mille,
        );
    }

    /// Cut the body of the next `times` matching responses after `after` bytes and close the
    /// connection (the client sees fewer bytes than Content-Length announced).
    pub fn truncate(&self, method: &str, contains: &str, after: u64, times: u32) {
        self.add(method, contains, Action::Truncate { after }, times, 1000);
    }

    /// Truncate a share (per mille) of matching responses, indefinitely.
    pub fn truncate_some(&self, method: &str, contains: &str, after: u64, per_mille: u32) {
        self.add(
            method,
            contains,
            Action::Truncate { after },
            u32::MAX,
            per_mille,
        );
    }

    /// XOR one byte of the body of the next `times` matching responses, at body offset `at`
    /// (`None`: the middle of the body; the first chunk's middle for a chunked body).
    pub fn flip_response(&self, method: &str, contains: &str, at: Option<u64>, times: u32) {
        self.add(method, contains, Action::FlipResponse { at }, times, 1000);
    }

    /// XOR one byte of the body of the next `times` matching requests before forwarding them,
    /// at body offset `at` (`None`: the middle). aws-chunked bodies are flipped as they are.
    /// Only requests with a body count (an empty PUT does not use the rule up).
    pub fn flip_request(&self, method: &str, contains: &str, at: Option<u64>, times: u32) {
        self.add(method, contains, Action::FlipRequest { at }, times, 1000);
    }

    /// The server goes away: new connections are reset as soon as they are accepted, and every
    /// open connection is reset at its next request or while relaying.
    pub fn down(&self) {
        self.shared.down.store(true, Ordering::SeqCst);
    }

    /// The server is back.
    pub fn up(&self) {
        self.shared.down.store(false, Ordering::SeqCst);
    }

    fn add(&self, method: &str, contains: &str, action: Action, times: u32, per_mille: u32) {
        if times == 0 {
            return;
        }
        self.shared.rules.lock().unwrap().push(Rule {
            method: method.into(),
            contains: contains.into(),
            action,
            remaining: times,
            per_mille,
        });
    }

    pub fn clear(&self) {
        self.shared.rules.lock().unwrap().clear();
    }

    /// Requests a fault was injected into so far.
    pub fn hits(&self) -> u32 {
        *self.shared.hits.lock().unwrap()
    }

    /// Client connections accepted so far.
    pub fn connections(&self) -> u32 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Every request seen so far.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.settled_log()
    }

    /// The exchange log once it stops growing: an exchange is logged when the proxy finishes
    /// relaying it, which can be just after the client already has its answer.
    fn settled_log(&self) -> Vec<Exchange> {
        let len = || self.shared.log.lock().unwrap().len();
        let mut last = len();
        loop {
            std::thread::sleep(std::time::Duration::from_millis(150));
            let now = len();
            if now == last {
                return self.shared.log.lock().unwrap().clone();
            }
            last = now;
        }
    }

    /// Requests with `method` (`*`: any) whose line contains `contains` that the server answered
    /// with `status` and whose response reached the client complete and unmodified.
    pub fn answered(&self, method: &str, contains: &str, status: u16) -> usize {
        self.shared
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|e| {
                (method == "*" || e.line.starts_with(&format!("{method} ")))
                    && e.line.contains(contains)
                    && e.status == status
                    && e.complete
            })
            .count()
    }

    /// Injected faults of this kind ("fail", "stall", "reset", "truncate", "flip_response",
    /// "flip_request") into requests whose line contains `contains`.
    /// Requests whose request line contains `contains` that got `fault` (once the log settled).
    pub fn injected(&self, fault: &str, contains: &str) -> usize {
        self.settled_log()
            .iter()
            .filter(|e| e.fault == Some(fault) && e.line.contains(contains))
            .count()
    }
}

fn fault_name(a: Action) -> &'static str {
    match a {
        Action::Fail(_) => "fail",
        Action::Stall { .. } => "stall",
        Action::Reset { .. } => "reset",
        Action::Truncate { .. } => "truncate",
        Action::FlipResponse { .. } => "flip_response",
        Action::FlipRequest { .. } => "flip_request",
    }
}

/// Close `s` so the peer sees a RST, not a FIN (SO_LINGER with a zero timeout). The RST goes out
/// when the last descriptor of the socket is closed.
fn reset(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket this function owns, with a pointer to a linger value and its size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn interrupted(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, what.to_string())
}

/// Read a message head (up to and including the empty line); `None` at a clean EOF.
fn read_head(r: &mut impl BufRead) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let n = r.read_until(b'\n', &mut head)?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        if head.ends_with(b"\r\n\r\n") || head == b"\r\n" || head.ends_with(b"\n\n") {
            // A stray CRLF between messages is allowed before a request line.
            if head == b"\r\n" {
                head.clear();
                continue;
            }
            return Ok(Some(head));
        }
        if head.len() > 1 << 20 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too long"));
        }
    }
}

/// A parsed message head.
struct Head {
    text: String,
}

impl Head {
    fn new(raw: &[u8]) -> Head {
        Head {
            text: String::from_utf8_lossy(raw).into_owned(),
        }
    }

    fn first_line(&self) -> &str {
        self.text.lines().next().unwrap_or("")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.text.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.text.lines().skip(1).any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case(name)
                    && v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
            })
        })
    }

    fn framing(&self) -> Framing {
        if self.has_token("transfer-encoding", "chunked") {
            Framing::Chunked
        } else if let Some(n) = self.header("content-length").and_then(|v| v.parse().ok()) {
            Framing::Length(n)
        } else {
            Framing::None
        }
    }

    /// The head without the named headers.
    fn without(&self, names: &[&str]) -> Vec<u8> {
        let mut out = String::new();
        for (i, l) in self.text.split_inclusive("\r\n").enumerate() {
            let drop = i > 0
                && l.split_once(':')
                    .is_some_and(|(k, _)| names.iter().any(|n| k.trim().eq_ignore_ascii_case(n)));
            if !drop {
                out.push_str(l);
            }
        }
        out.into_bytes()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// No body.
    None,
    Length(u64),
    Chunked,
    /// Until the server closes the connection.
    UntilClose,
}

/// What to do to a body on its way.
#[derive(Default)]
struct BodyFault {
    /// XOR this body byte (offset in the decoded body; `u64::MAX`: the middle).
    flip_at: Option<u64>,
    /// End the body after this many bytes.
    cut_at: Option<u64>,
}

const MIDDLE: u64 = u64::MAX;

/// Writes to the client, pausing once after `stall.0` bytes for `stall.1`; keeps the first
/// bytes written when `capture` is set.
struct Out<'a> {
    w: &'a mut TcpStream,
    written: u64,
    stall: Option<(u64, Duration)>,
    capture: Option<Vec<u8>>,
}

impl Out<'_> {
    fn put(&mut self, mut buf: &[u8]) -> io::Result<()> {
        if let Some(c) = self.capture.as_mut() {
            let room = 1024usize.saturating_sub(c.len());
            c.extend_from_slice(&buf[..room.min(buf.len())]);
        }
        if let Some((at, pause)) = self.stall {
            if self.written + buf.len() as u64 >= at {
                let first = (at - self.written) as usize;
                self.w.write_all(&buf[..first])?;
                self.w.flush()?;
                self.written += first as u64;
                buf = &buf[first..];
                self.stall = None;
                std::thread::sleep(pause);
            }
        }
        self.w.write_all(buf)?;
        self.written += buf.len() as u64;
        Ok(())
    }
}

/// Relay a body from `r` to `out` per `framing`, applying `fault`. Returns whether the whole
/// body was relayed (false: cut by `fault.cut_at`). Checks `down` as it goes.
fn relay_body(
    r: &mut impl BufRead,
    out: &mut Out<'_>,
    framing: Framing,
    fault: &mut BodyFault,
    down: &AtomicBool,
) -> io::Result<bool> {
    let mut offset = 0u64;
    // Copy `n` body bytes (or until EOF when `n` is None); false when cut.
    let mut data = |r: &mut dyn BufRead, n: Option<u64>, out: &mut Out<'_>| -> io::Result<bool> {
        let mut left = n;
        if fault.flip_at == Some(MIDDLE) {
            fault.flip_at = Some(offset + n.unwrap_or(0) / 2);
        }
        loop {
            if left == Some(0) {
                return Ok(true);
            }
            if down.load(Ordering::SeqCst) {
                return Err(interrupted("proxy down"));
            }
            let buf = r.fill_buf()?;
            if buf.is_empty() {
                return if left.is_none() {
                    Ok(true)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
            let mut take = buf.len().min(64 << 10);
            if let Some(l) = left {
                take = take.min(l as usize);
            }
            let mut chunk = buf[..take].to_vec();
            r.consume(take);
            let mut cut = false;
            if let Some(c) = fault.cut_at {
                if offset + chunk.len() as u64 >= c {
                    chunk.truncate((c - offset) as usize);
                    cut = true;
                }
            }
            if let Some(f) = fault.flip_at {
                if f >= offset && f < offset + chunk.len() as u64 {
                    chunk[(f - offset) as usize] ^= 0xFF;
                    fault.flip_at = None;
                }
            }
            out.put(&chunk)?;
            offset += chunk.len() as u64;
            if cut {
                out.w.flush()?;
                return Ok(false);
            }
            if let Some(l) = left.as_mut() {
                *l -= take as u64;
            }
        }
    };
    let done = match framing {
        Framing::None => true,
        Framing::Length(n) => data(r, Some(n), out)?,
        Framing::UntilClose => data(r, None, out)?,
        Framing::Chunked => loop {
            let mut line = Vec::new();
            if r.read_until(b'\n', &mut line)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let text = String::from_utf8_lossy(&line);
            let size = u64::from_str_radix(text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            out.put(&line)?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    let mut t = Vec::new();
                    if r.read_until(b'\n', &mut t)? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    out.put(&t)?;
                    if t == b"\r\n" || t == b"\n" {
                        break;
                    }
                }
                break true;
            }
            if !data(r, Some(size), out)? {
                break false;
            }
            let mut crlf = Vec::new();
            r.read_until(b'\n', &mut crlf)?;
            out.put(&crlf)?;
        },
    };
    out.w.flush()?;
    Ok(done)
}

/// Answer `status` ourselves and close (the request body, if already coming, is drained).
fn answer_error(
    cr: &mut impl BufRead,
    cw: &mut TcpStream,
    req: &Head,
    status: u16,
) -> io::Result<()> {
    if !req.has_token("expect", "100-continue") {
        let mut out_sink = io::sink();
        match req.framing() {
            Framing::Length(n) => {
                io::copy(&mut cr.take(n), &mut out_sink)?;
            }
            Framing::Chunked => {
                // Drain the chunked body.
                loop {
                    let mut line = Vec::new();
                    if cr.read_until(b'\n', &mut line)? == 0 {
                        break;
                    }
                    let size = u64::from_str_radix(
                        String::from_utf8_lossy(&line)
                            .split(';')
                            .next()
                            .unwrap_or("")
                            .trim(),
                        16,
                    )
                    .unwrap_or(0);
                    if size == 0 {
                        break;
                    }
                    io::copy(&mut cr.take(size + 2), &mut out_sink)?;
                }
            }
            _ => {}
        }
    }
    let body = "<?xml version=\"1.0\"?><Error><Code>InternalError</Code><Message>injected by test proxy</Message></Error>";
    let resp = format!(
        "HTTP/1.1 {status} Injected\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    cw.write_all(resp.as_bytes())?;
    cw.flush()?;
    let _ = cw.shutdown(Shutdown::Both);
    Ok(())
}

fn serve(client: TcpStream, upstream_port: u16, sh: &Shared) -> io::Result<()> {
    client.set_nodelay(true)?;
    let mut cw = client.try_clone()?;
    let mut cr = BufReader::with_capacity(64 << 10, client);
    while let Some(raw) = read_head(&mut cr)? {
        let req = Head::new(&raw);
        let line = req.first_line().to_string();
        if sh.is_down() {
            sh.record(&line, 0, None, false);
            reset(&cw);
            return Ok(());
        }
        let has_body = match req.framing() {
            Framing::Length(n) => n > 0,
            Framing::Chunked => true,
            _ => false,
        };
        let action = sh.take_action(&line, has_body);
        let fault = action.map(fault_name);
        match action {
            Some(Action::Fail(status)) => {
                sh.record(&line, status, fault, false);
                return answer_error(&mut cr, &mut cw, &req, status);
            }
            Some(Action::Reset { after: None }) => {
                sh.record(&line, 0, fault, false);
                reset(&cw);
                return Ok(());
            }
            _ => {}
        }
        let upstream = match TcpStream::connect(("127.0.0.1", upstream_port)) {
            Ok(u) => u,
            Err(_) => {
                // The server itself is gone: so is this connection.
                sh.record(&line, 0, fault, false);
                reset(&cw);
                return Ok(());
            }
        };
        upstream.set_nodelay(true)?;
        let mut uw = upstream.try_clone()?;
        let mut ur = BufReader::with_capacity(64 << 10, upstream);
        // Answer `Expect: 100-continue` here and forward the request without it.
        if req.has_token("expect", "100-continue") {
            cw.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            cw.flush()?;
        }
        uw.write_all(&req.without(&["expect"]))?;
        let req_framing = req.framing();
        let mut req_fault = BodyFault::default();
        if let Some(Action::FlipRequest { at }) = action {
            req_fault.flip_at = Some(at.unwrap_or(MIDDLE));
        }
        let mut up_out = Out {
            w: &mut uw,
            written: 0,
            stall: None,
            capture: None,
        };
        let sent = relay_body(&mut cr, &mut up_out, req_framing, &mut req_fault, &sh.down);
        if sent.is_err() {
            sh.record(&line, 0, fault, false);
            reset(&cw);
            return Ok(());
        }
        // The response (skipping interim 1xx answers, which are relayed).
        let (resp_raw, resp) = loop {
            let Some(raw) = read_head(&mut ur).ok().flatten() else {
                sh.record(&line, 0, fault, false);
                reset(&cw);
                return Ok(());
            };
            let h = Head::new(&raw);
            let status: u16 = h
                .first_line()
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if (100..200).contains(&status) && status != 101 {
                if status != 100 {
                    cw.write_all(&raw)?;
                }
                continue;
            }
            break (raw, h);
        };
        let status: u16 = resp
            .first_line()
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let bodiless = line.starts_with("HEAD ") || status == 204 || status == 304 || status < 200;
        let framing = match resp.framing() {
            _ if bodiless => Framing::None,
            Framing::None => Framing::UntilClose,
            f => f,
        };
        let mut body_fault = BodyFault::default();
        let mut stall = None;
        let mut rst_on_cut = false;
        match action {
            Some(Action::Stall { after, pause }) => stall = Some((after as u64, pause)),
            Some(Action::Reset { after: Some(n) }) => {
                body_fault.cut_at = Some(n);
                rst_on_cut = true;
            }
            Some(Action::Truncate { after }) => body_fault.cut_at = Some(after),
            Some(Action::FlipResponse { at }) => body_fault.flip_at = Some(at.unwrap_or(MIDDLE)),
            _ => {}
        }
        let mut out = Out {
            w: &mut cw,
            written: 0,
            stall,
            capture: None,
        };
        let relayed = out.put(&resp_raw).and_then(|_| {
            if status >= 400 {
                out.capture = Some(Vec::new());
            }
            relay_body(&mut ur, &mut out, framing, &mut body_fault, &sh.down)
        });
        let error = out
            .capture
            .take()
            .map(|c| String::from_utf8_lossy(&c).into_owned());
        let modified = matches!(action, Some(Action::FlipResponse { .. }));
        match relayed {
            Ok(true) => {
                sh.record_error(&line, status, fault, !modified, error);
            }
            Ok(false) => {
                // Cut short on purpose.
                sh.record(&line, status, fault, false);
                if rst_on_cut {
                    reset(&cw);
                } else {
                    let _ = cw.shutdown(Shutdown::Both);
                }
                return Ok(());
            }
            Err(_) => {
                sh.record(&line, status, fault, false);
                reset(&cw);
                return Ok(());
            }
        }
        let close = framing == Framing::UntilClose
            || resp.has_token("connection", "close")
            || req.has_token("connection", "close");
        if close {
            let _ = cw.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
    Ok(())
}
