//! A fault-injecting HTTP proxy between s3mount and the test S3 server: requests pass through
//! unchanged unless a rule matches their request line, in which case the proxy answers with an
//! error status itself and closes the connection.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, Debug)]
enum Action {
    /// Answer with this status instead of forwarding.
    Fail(u16),
    /// Forward, then stop relaying the response after `after` bytes for `pause`.
    Stall {
        after: usize,
        pause: std::time::Duration,
    },
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

pub struct FaultProxy {
    pub port: u16,
    rules: Arc<Mutex<Vec<Rule>>>,
    hits: Arc<Mutex<u32>>,
}

/// A deterministic stream of numbers in 0..1000 for fractional rules.
fn next_roll() -> u32 {
    use std::sync::atomic::{AtomicU64, Ordering};
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
        let rules: Arc<Mutex<Vec<Rule>>> = Arc::default();
        let hits: Arc<Mutex<u32>> = Arc::default();
        let (r, h) = (rules.clone(), hits.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (r, h) = (r.clone(), h.clone());
                std::thread::spawn(move || {
                    let _ = serve(client, upstream_port, r, h);
                });
            }
        });
        FaultProxy { port, rules, hits }
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

    fn add(&self, method: &str, contains: &str, action: Action, times: u32, per_mille: u32) {
        self.rules.lock().unwrap().push(Rule {
            method: method.into(),
            contains: contains.into(),
            action,
            remaining: times,
            per_mille,
        });
    }

    pub fn clear(&self) {
        self.rules.lock().unwrap().clear();
    }

    /// Requests answered with an injected error so far.
    pub fn hits(&self) -> u32 {
        *self.hits.lock().unwrap()
    }
}

fn read_head(s: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Ok(None);
        }
        head.push(byte[0]);
    }
    Ok(Some(head))
}

fn serve(
    mut client: TcpStream,
    upstream_port: u16,
    rules: Arc<Mutex<Vec<Rule>>>,
    hits: Arc<Mutex<u32>>,
) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let mut upstream = TcpStream::connect(("127.0.0.1", upstream_port))?;
    upstream.set_nodelay(true)?;
    let mut up_read = upstream.try_clone()?;
    let mut client_write = client.try_clone()?;
    let stall: Arc<Mutex<Option<(usize, std::time::Duration)>>> = Arc::default();
    let stall_relay = stall.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match up_read.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let pending = stall_relay.lock().unwrap().take();
            let ok = match pending {
                Some((after, pause)) => {
                    let first = after.min(n);
                    let r = client_write
                        .write_all(&buf[..first])
                        .and_then(|_| client_write.flush());
                    std::thread::sleep(pause);
                    r.and_then(|_| client_write.write_all(&buf[first..n]))
                }
                None => client_write.write_all(&buf[..n]),
            };
            if ok.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown(std::net::Shutdown::Both);
    });
    loop {
        let Some(head) = read_head(&mut client)? else {
            break;
        };
        let text = String::from_utf8_lossy(&head).into_owned();
        let line = text.lines().next().unwrap_or("").to_string();
        let header = |name: &str| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let len: u64 = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let expects_continue =
            header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        let matched = {
            let mut rules = rules.lock().unwrap();
            let pos = rules.iter().position(|r| {
                line.starts_with(&format!("{} ", r.method))
                    && line.contains(&r.contains)
                    && (r.per_mille >= 1000 || next_roll() < r.per_mille)
            });
            pos.map(|p| {
                let action = rules[p].action;
                rules[p].remaining -= 1;
                if rules[p].remaining == 0 {
                    rules.remove(p);
                }
                action
            })
        };
        if let Some(Action::Stall { after, pause }) = matched {
            *hits.lock().unwrap() += 1;
            *stall.lock().unwrap() = Some((after, pause));
        } else if let Some(Action::Fail(status)) = matched {
            *hits.lock().unwrap() += 1;
            if !expects_continue {
                std::io::copy(&mut (&mut client).take(len), &mut std::io::sink())?;
            }
            let body = format!("<?xml version=\"1.0\"?><Error><Code>InternalError</Code><Message>injected by test proxy</Message></Error>");
            let resp = format!(
                "HTTP/1.1 {status} Injected\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = upstream.shutdown(std::net::Shutdown::Both);
            client.write_all(resp.as_bytes())?;
            client.flush()?;
            let _ = client.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
        upstream.write_all(&head)?;
        std::io::copy(&mut (&mut client).take(len), &mut upstream)?;
    }
    let _ = upstream.shutdown(std::net::Shutdown::Both);
    Ok(())
}
