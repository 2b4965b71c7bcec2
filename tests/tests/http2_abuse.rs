//! HTTP/2 abuse on both listeners of the real server process (the gRPC
//! frontend on its Unix socket, the agent port behind mutual TLS): rapid
//! stream resets, CONTINUATION floods, SETTINGS and PING floods, written as
//! raw frames. Each: the server's peak memory stays within a stated bound, a
//! tunnel through a correct agent keeps moving bytes, and the abusive
//! connection is ended, logged with its reason and counted (a flood whose
//! answers are left unread may instead be held back by them).

use std::net::SocketAddr;
use std::time::Duration;

use tests::client::{self, GrpcConn};
use tests::inproc::{Agent, Listen, Server};
use tests::pki::Pki;
use tests::process::{rss_kib, Proc};
use tests::{dest, init_logs};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const CONTINUATION: u8 = 9;
const END_HEADERS: u8 = 4;
/// How much abuse may raise the server's peak memory, in KiB.
const BOUND_KIB: u64 = 32 * 1024;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A gRPC request's header block in HPACK, static-table references and
/// literals only (so every block decodes alone).
fn request_block(path: &str) -> Vec<u8> {
    let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
    let mut literal = |index: u8, value: &str| {
        b.push(index);
        b.push(value.len() as u8);
        b.extend_from_slice(value.as_bytes());
    };
    literal(0x04, path); // :path
    literal(0x01, "localhost"); // :authority
    b.extend_from_slice(&[0x0f, 0x10]); // content-type (static 31)
    b.push(16);
    b.extend_from_slice(b"application/grpc");
    b.extend_from_slice(&[0x00, 0x02]);
    b.extend_from_slice(b"te");
    b.push(8);
    b.extend_from_slice(b"trailers");
    b
}

/// Either listener's connection.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

struct Target {
    proc: Proc,
    agent_addr: SocketAddr,
    health: SocketAddr,
    uds: String,
    _agent: Agent,
    witness: GrpcConn,
}

impl Target {
    async fn start(pki: &Pki) -> Target {
        let uds = pki.path("abuse.sock");
        let proc = Proc::spawn(&[], &Server::args(pki, "grpc", Listen::Uds, &uds, &[]));
        let agent_addr = proc
            .log_field("proxy-server started", "agent")
            .await
            .parse()
            .unwrap();
        let health = proc
            .log_field("proxy-server started", "health")
            .await
            .parse()
            .unwrap();
        let agent = Agent::start(pki, agent_addr, "good", &[]).await;
        let echo = dest::echo().await;
        let witness = tests::eventually(Duration::from_secs(20), "a tunnel", || async {
            let ch = client::grpc_uds(std::path::Path::new(&uds)).await;
            GrpcConn::dial(&ch, &echo.to_string()).await.ok()
        })
        .await;
        Target {
            proc,
            agent_addr,
            health,
            uds,
            _agent: agent,
            witness,
        }
    }

    /// The server ended connections of `listener` for a protocol error
    /// (`times` so far): logged with the reason, counted. Returns the reason
    /// of the first.
    async fn ended_with_goaway(&self, listener: &str, times: f64) -> String {
        let line = self
            .proc
            .wait_log(
                &["HTTP/2 connection ended by the server", listener],
                Duration::from_secs(10),
            )
            .await;
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let reason = v["fields"]["reason"].as_str().unwrap().to_string();
        let text = tests::cluster::http_get(&self.health.to_string(), "/metrics")
            .await
            .unwrap_or_default();
        let n = tests::cluster::metric_sum(
            &text,
            "konnectivity_network_proxy_server_http2_connection_errors_total",
            &[("listener", listener)],
        );
        assert_eq!(n, times, "{text}");
        reason
    }

    /// The server cut a peer of `listener` off for a control frame flood
    /// (`reason`): logged with the peer and the reason, counted.
    async fn cut_off_for(&self, listener: &str, reason: &str) {
        self.proc
            .wait_log(
                &["the peer floods control frames", listener, reason],
                Duration::from_secs(10),
            )
            .await;
        let text = tests::cluster::http_get(&self.health.to_string(), "/metrics")
            .await
            .unwrap_or_default();
        let n = tests::cluster::metric_sum(
            &text,
            "konnectivity_network_proxy_server_http2_connection_errors_total",
            &[("listener", listener), ("reason", reason)],
        );
        assert_eq!(n, 1.0, "{text}");
    }

    fn peak_kib(&self) -> u64 {
        rss_kib(self.proc.child.id()).expect("server memory").1
    }

    async fn still_moving(&mut self, i: usize) {
        let msg = format!("still moving {i}");
        self.witness
            .send(msg.clone().into_bytes())
            .await
            .expect("send");
        let got = tokio::time::timeout(Duration::from_secs(10), self.witness.recv())
            .await
            .expect("echo within 10 s")
            .expect("echo");
        assert_eq!(&got[..], msg.as_bytes());
    }

    /// A new connection to `listener`: the frontend's Unix socket, or the
    /// agent port with the agent's certificate.
    async fn open(&self, listener: &str, pki: &Pki) -> Box<dyn Io> {
        if listener == "frontend" {
            return Box::new(
                UnixStream::connect(&self.uds)
                    .await
                    .expect("frontend socket"),
            );
        }
        let tls = tokio_rustls::TlsConnector::from(client::frontend_tls(
            pki,
            Some((pki.agent.cert.as_path(), pki.agent.key.as_path())),
            &[b"h2"],
        ));
        let tcp = TcpStream::connect(self.agent_addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        Box::new(tls.connect(name, tcp).await.expect("TLS to the agent port"))
    }
}

/// What became of an abusive connection.
#[derive(Debug)]
struct Abused {
    /// Bytes the server took.
    written: usize,
    /// Every frame was written.
    all_written: bool,
    /// The server ended the connection.
    ended: bool,
}

/// Writes frames (produced lazily) until the server ends the connection or
/// stops taking them for 5 s. With `read`, what the server answers is
/// drained; without, it is left unread (the flood variants that need
/// answers).
async fn abuse<S>(sock: S, read: bool, mut next: impl FnMut(u32) -> Option<Vec<u8>>) -> Abused
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut r, mut w) = tokio::io::split(sock);
    let mut reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if !read {
                // Only notice the end: a one-byte read now and then keeps
                // the answers piling up on the server's side.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            match r.read(&mut buf[..if read { 64 * 1024 } else { 1 }]).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    let mut written = 0;
    let mut all_written = true;
    let mut batch = PREFACE.to_vec();
    batch.extend(frame(SETTINGS, 0, 0, &[]));
    for i in 0.. {
        let last = match next(i) {
            Some(f) => {
                batch.extend(f);
                false
            }
            None => true,
        };
        if batch.len() >= 16 * 1024 || (last && !batch.is_empty()) {
            let sent = tokio::time::timeout(Duration::from_secs(5), w.write_all(&batch)).await;
            match sent {
                Ok(Ok(())) => written += batch.len(),
                _ => {
                    all_written = false;
                    break;
                }
            }
            batch.clear();
            if reader.is_finished() {
                all_written = last;
                break;
            }
        }
        if last {
            break;
        }
    }
    let wait = Duration::from_secs(if read { 10 } else { 2 });
    let ended = tokio::time::timeout(wait, &mut reader).await.is_ok();
    reader.abort();
    Abused {
        written,
        all_written,
        ended,
    }
}

/// Rapid reset: open a stream, reset it, again and again.
fn rapid_resets(block: Vec<u8>, pairs: u32) -> impl FnMut(u32) -> Option<Vec<u8>> {
    move |i| {
        if i >= pairs {
            return None;
        }
        let sid = 1 + 2 * i;
        let mut f = frame(HEADERS, END_HEADERS, sid, &block);
        f.extend(frame(RST_STREAM, 0, sid, &8u32.to_be_bytes()));
        Some(f)
    }
}

/// One header block that never ends: HEADERS without END_HEADERS, then
/// CONTINUATION frames of header bytes.
fn continuation_flood(block: Vec<u8>, frames: u32) -> impl FnMut(u32) -> Option<Vec<u8>> {
    move |i| match i {
        0 => Some(frame(HEADERS, 0, 1, &block)),
        _ if i < frames => {
            // A literal header with a new name, 16 KiB of value at a time.
            let mut chunk = vec![0x00, 0x01, b'x', 0x7f, 0x81, 0x7f];
            chunk.resize(16 * 1024, b'a');
            Some(frame(CONTINUATION, 0, 1, &chunk))
        }
        _ => None,
    }
}

fn settings_flood(frames: u32) -> impl FnMut(u32) -> Option<Vec<u8>> {
    move |i| (i < frames).then(|| frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]))
}

fn ping_flood(frames: u32) -> impl FnMut(u32) -> Option<Vec<u8>> {
    move |i| (i < frames).then(|| frame(PING, 0, 0, &(i as u64).to_be_bytes()))
}

async fn check(t: &mut Target, what: &str, peak_before: u64, i: usize) {
    t.still_moving(i).await;
    let grown = t.peak_kib().saturating_sub(peak_before);
    eprintln!("{what}: peak memory +{grown} KiB");
    assert!(grown < BOUND_KIB, "{what}: peak memory grew by {grown} KiB");
}

/// Every kind of abuse in turn on one listener (`frontend` or `agent`),
/// each on a new connection, with the checks after each.
async fn abuse_listener(listener: &'static str, method: &str) {
    init_logs();
    let pki = Pki::new();
    let mut t = Target::start(&pki).await;
    let peak = t.peak_kib();
    let block = request_block(method);

    let a = abuse(
        t.open(listener, &pki).await,
        true,
        rapid_resets(block.clone(), 100_000),
    )
    .await;
    eprintln!("{listener} rapid reset: {a:?}");
    assert!(
        a.ended && !a.all_written,
        "rapid resets were never cut off: {a:?}"
    );
    eprintln!("reason: {}", t.ended_with_goaway(listener, 1.0).await);
    check(&mut t, &format!("{listener} rapid reset"), peak, 1).await;

    let flood = continuation_flood(block.clone(), 100_000);
    let a = abuse(t.open(listener, &pki).await, true, flood).await;
    eprintln!("{listener} CONTINUATION flood: {a:?}");
    assert!(
        a.ended && !a.all_written,
        "an endless header block was never cut off: {a:?}"
    );
    if listener == "frontend" {
        // The `:authority` rewriter sees the block first on the Unix socket.
        t.proc
            .wait_log(&["invalid header block", listener], Duration::from_secs(10))
            .await;
    }
    t.ended_with_goaway(listener, 2.0).await;
    check(&mut t, &format!("{listener} CONTINUATION flood"), peak, 2).await;

    // The control floods read every answer, so the HTTP/2 library would
    // keep answering for as long as the peer likes: the watcher cuts them off.
    type Flood = Box<dyn FnMut(u32) -> Option<Vec<u8>> + Send>;
    let floods: [(&str, Flood, &str); 2] = [
        (
            "SETTINGS",
            Box::new(settings_flood(1_000_000)),
            "SETTINGS_FLOOD",
        ),
        ("PING", Box::new(ping_flood(1_000_000)), "PING_FLOOD"),
    ];
    for (i, (kind, flood, reason)) in floods.into_iter().enumerate() {
        let a = abuse(t.open(listener, &pki).await, true, flood).await;
        eprintln!("{listener} {kind} flood: {a:?}");
        assert!(
            a.ended && !a.all_written,
            "a {kind} flood was never cut off: {a:?}"
        );
        t.cut_off_for(listener, reason).await;
        check(&mut t, &format!("{listener} {kind} flood"), peak, 3 + i).await;
    }

    // A peer that floods without reading the answers is held back by them
    // (the server stops reading) or cut off, whichever comes first; the
    // server takes nowhere near all of it.
    let a = abuse(t.open(listener, &pki).await, false, ping_flood(1_000_000)).await;
    eprintln!("{listener} PING flood, answers unread: {a:?}");
    assert!(
        !a.all_written,
        "PINGs without reading the answers were all taken ({} bytes)",
        a.written
    );
    check(
        &mut t,
        &format!("{listener} PING flood, answers unread"),
        peak,
        5,
    )
    .await;
}

#[tokio::test]
async fn http2_abuse_on_the_frontend_socket_is_ended_and_costs_others_nothing() {
    abuse_listener("frontend", konnectivity_proto::PROXY_METHOD).await;
}

#[tokio::test]
async fn http2_abuse_on_the_agent_port_is_ended_and_costs_others_nothing() {
    abuse_listener("agent", konnectivity_proto::CONNECT_METHOD).await;
}
