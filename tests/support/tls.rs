//! A TLS front for the test S3 server: HTTPS on 127.0.0.1 with a certificate from a private CA
//! made for the test (what `--ca-bundle` is for), relaying to the plain-HTTP server behind it.
//! It also counts the requests it relayed that went with an unsigned payload.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;

pub struct TlsFront {
    /// `https://127.0.0.1:PORT`
    pub endpoint: String,
    /// PEM of the CA that signed the front's certificate.
    pub ca_pem: PathBuf,
    unsigned: Arc<AtomicU64>,
    _dir: tempfile::TempDir,
}

/// The header of a request whose body is not hashed into its signature (lower case).
const UNSIGNED: &[u8] = b"x-amz-content-sha256: unsigned-payload";

impl TlsFront {
    /// Start a front relaying to `upstream` (`http://host:port`) on the tests' runtime.
    pub fn start(upstream: &str) -> TlsFront {
        let upstream = upstream
            .strip_prefix("http://")
            .expect("plain HTTP upstream")
            .trim_end_matches('/')
            .to_string();
        let dir = tempfile::tempdir().expect("tls dir");
        // A CA, and a server certificate for 127.0.0.1 signed by it.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "s3mount test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
                .unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let ca_pem = dir.path().join("ca.pem");
        std::fs::write(&ca_pem, ca.pem()).unwrap();

        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = super::rt()
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let port = listener.local_addr().unwrap().port();
        let unsigned = Arc::new(AtomicU64::new(0));
        let counter = unsigned.clone();
        super::rt().spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
                let unsigned = counter.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(client).await else {
                        return; // a client that does not trust the CA gives up here
                    };
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = server.set_nodelay(true);
                    let (mut cr, mut cw) = tokio::io::split(tls);
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        // Relay requests, counting those sent with an unsigned payload.
                        let mut buf = vec![0u8; 64 << 10];
                        let mut tail: Vec<u8> = Vec::new();
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let mut seen = std::mem::take(&mut tail);
                            seen.extend_from_slice(&buf[..n]);
                            let seen = seen.to_ascii_lowercase();
                            let mut at = 0;
                            while let Some(i) = find(&seen[at..], UNSIGNED) {
                                unsigned.fetch_add(1, Ordering::Relaxed);
                                at += i + UNSIGNED.len();
                            }
                            // A header split between two reads is found with the next one.
                            let keep = seen.len().saturating_sub(UNSIGNED.len() - 1).max(at);
                            tail = seen[keep..].to_vec();
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        TlsFront {
            endpoint: format!("https://127.0.0.1:{port}"),
            ca_pem,
            unsigned,
            _dir: dir,
        }
    }

    /// Requests relayed so far that were sent with an unsigned payload.
    pub fn unsigned_payloads(&self) -> u64 {
        self.unsigned.load(Ordering::Relaxed)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
