//! A token service for the registry's bearer-token auth: it checks basic credentials and
//! hands out ES256 JWTs (signed with the `openssl` CLI) that carry the requested access.
//! The registry itself verifies every token against the service's certificate, so a test
//! that pulls through it exercises the real challenge, token and verification path.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;

const SERVICE: &str = "nanobox-test";
const ISSUER: &str = "nanobox-test-issuer";

#[derive(Debug)]
pub(super) struct TokenServer {
    addr: SocketAddr,
    certificate: PathBuf,
    issued: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Clone)]
struct Signer {
    key: PathBuf,
    /// The certificate in DER, base64 (the JWT's `x5c`).
    x5c: String,
    user: String,
    password: String,
}

impl TokenServer {
    pub(super) fn start(dir: &Path, user: &str, password: &str) -> Result<Self, String> {
        let key = dir.join("token.key");
        let certificate = dir.join("token.pem");
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=nanobox-token-issuer",
                "-keyout",
                "token.key",
                "-out",
                "token.pem",
            ],
            None,
        )?;
        let der = openssl(dir, &["x509", "-in", "token.pem", "-outform", "DER"], None)?;
        let signer = Signer {
            key,
            x5c: STANDARD.encode(der),
            user: user.to_owned(),
            password: password.to_owned(),
        };
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(|e| format!("token service: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("token service: {e}"))?;
        let issued = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (issued, stop) = (issued.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        if let Ok(true) = serve(stream, &signer) {
                            issued.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        };
        Ok(Self {
            addr,
            certificate,
            issued,
            stop,
            thread: Some(thread),
        })
    }

    /// The registry's `auth:` section.
    pub(super) fn registry_config(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: http://{}/token\n    service: {SERVICE}\n    \
             issuer: {ISSUER}\n    rootcertbundle: {}\n",
            self.addr,
            self.certificate.display()
        )
    }

    pub(super) fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers one request; true when a token was issued.
fn serve(mut stream: TcpStream, signer: &Signer) -> std::io::Result<bool> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 << 10 {
        if stream.read(&mut byte)? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let target = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or_default();
    let authorized = head.lines().any(|line| {
        let Some((name, value)) = line.split_once(':') else {
            return false;
        };
        let expected = STANDARD.encode(format!("{}:{}", signer.user, signer.password));
        name.trim().eq_ignore_ascii_case("authorization")
            && value.trim() == format!("Basic {expected}")
    });
    if !authorized {
        let body = r#"{"details":"incorrect username or password"}"#;
        write!(
            stream,
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(false);
    }
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or_default();
    let access: Vec<serde_json::Value> = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(k, _)| *k == "scope")
        .filter_map(|(_, v)| {
            let scope = percent_decode(v);
            let mut parts = scope.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(serde_json::json!({
                "type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>(),
            }))
        })
        .collect();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [signer.x5c]});
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": signer.user, "aud": SERVICE,
        "exp": now + 600, "nbf": now - 60, "iat": now,
        "jti": format!("{now}-{}", rand::random::<u64>()), "access": access,
    });
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let dir = signer.key.parent().unwrap_or(Path::new("."));
    let der = openssl(
        dir,
        &["dgst", "-sha256", "-sign", "token.key"],
        Some(input.as_bytes()),
    )
    .map_err(std::io::Error::other)?;
    let raw = der_signature_to_raw(&der).ok_or_else(|| std::io::Error::other("bad signature"))?;
    let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(raw));
    let body = serde_json::json!({"token": token, "expires_in": 600}).to_string();
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(true)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => out.push(b),
                    Err(_) => out.extend_from_slice(&bytes[i..i + 3]),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// ECDSA `SEQUENCE { INTEGER r, INTEGER s }` to JWS's fixed 64-byte `r || s`.
fn der_signature_to_raw(der: &[u8]) -> Option<Vec<u8>> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x30 {
        return None;
    }
    let (&len, mut rest) = rest.split_first()?;
    if len & 0x80 != 0 {
        rest = rest.get(usize::from(len & 0x7f)..)?;
    }
    let mut raw = Vec::with_capacity(64);
    for _ in 0..2 {
        let (&tag, after) = rest.split_first()?;
        let (&len, after) = after.split_first()?;
        if tag != 0x02 {
            return None;
        }
        let value = after.get(..usize::from(len))?;
        rest = &after[usize::from(len)..];
        let value: Vec<u8> = value.iter().copied().skip_while(|&b| b == 0).collect();
        if value.len() > 32 {
            return None;
        }
        raw.extend(std::iter::repeat_n(0, 32 - value.len()));
        raw.extend(value);
    }
    Some(raw)
}

fn openssl(dir: &Path, args: &[&str], input: Option<&[u8]>) -> Result<Vec<u8>, String> {
    let mut child = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("openssl: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.unwrap_or_default())
            .map_err(|e| format!("openssl stdin: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("openssl: {e}"))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
