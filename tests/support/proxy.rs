//! A fault-injecting HTTP proxy between s3mount and the test S3 server: requests pass through
//! unchanged unless a rule matches their request line, in which case the proxy answers with an
//! error status itself and closes the connection.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug)]
struct Rule {
    method: String,
    contains: String,
    status: u16,
    remaining: u32,
}

pub struct FaultProxy {
    pub port: u16,
    rules: Arc<Mutex<Vec<Rule>>>,
    hits: Arc<Mutex<u32>>,
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
        self.rules.lock().unwrap().push(Rule { method: method.into(), contains: contains.into(), status, remaining: times });
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

fn serve(mut client: TcpStream, upstream_port: u16, rules: Arc<Mutex<Vec<Rule>>>, hits: Arc<Mutex<u32>>) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let mut upstream = TcpStream::connect(("127.0.0.1", upstream_port))?;
    upstream.set_nodelay(true)?;
    let mut up_read = upstream.try_clone()?;
    let mut client_write = client.try_clone()?;
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut up_read, &mut client_write);
        let _ = client_write.shutdown(std::net::Shutdown::Both);
    });
    loop {
        let Some(head) = read_head(&mut client)? else { break };
        let text = String::from_utf8_lossy(&head).into_owned();
        let line = text.lines().next().unwrap_or("").to_string();
        let header = |name: &str| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
        };
        let len: u64 = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let expects_continue = header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        let matched = {
            let mut rules = rules.lock().unwrap();
            let pos = rules.iter().position(|r| line.starts_with(&format!("{} ", r.method)) && line.contains(&r.contains));
            pos.map(|p| {
                let status = rules[p].status;
                rules[p].remaining -= 1;
                if rules[p].remaining == 0 {
                    rules.remove(p);
                }
                status
            })
        };
        if let Some(status) = matched {
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
