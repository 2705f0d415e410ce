//! The PROXY protocol on client listeners (`proxy_protocol = true`) against real Dovecot: a
//! v1 or v2 header from a trusted load balancer gives the client's address, which Dovecot
//! then logs (the gateway forwards it in ID); LOCAL keeps the socket's address; untrusted
//! peers, garbage and slow headers are closed without a word and counted; the client's bytes
//! behind the header (a command, a TLS ClientHello) are never lost; and the configuration
//! checks.

mod common;

use std::pin::Pin;
use std::process::Command;
use std::task::{Context, Poll};
use std::time::Duration;

use common::dovecot::{Dovecot, DovecotOptions, login_lines, wait_for_log};
use common::fake;
use common::gateway::{self, TestGateway};
use common::imap::{Client, WAIT, tagged_ok, tcp_from};
use common::tls::{TestCa, client_config};
use common::wait::until;
use imap_gateway::config::{ListenerConfig, ListenerMode};
use imap_gateway::proto::proxy::ProxyHeader;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_imap-gateway");

/// The forged client addresses: documentation ranges, so they can only come from a header.
const CLIENT_V4: &str = "203.0.113.7";
const CLIENT_V6: &str = "2001:db8::7";
/// The load balancer's front address the client connected to, as the header says.
const FRONT_V4: &str = "198.51.100.1";

/// A plain listener named `lb` that expects a PROXY header from `trusted` networks.
fn proxy_listener(trusted: &[&str]) -> ListenerConfig {
    ListenerConfig {
        name: "lb".into(),
        address: "127.0.0.1:0".parse().unwrap(),
        allow_plaintext_auth: true,
        proxy_protocol: true,
        proxy_trusted_networks: trusted.iter().map(|s| s.to_string()).collect(),
        ..ListenerConfig::default()
    }
}

/// Dovecot and a gateway in front of it with the `lb` listener beside the usual plain one.
async fn start(trusted: &[&str]) -> (Dovecot, TestGateway) {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let listener = proxy_listener(trusted);
    let gw = gateway::start_with(&gateway::single_backend(dovecot.addr()), |config, _| {
        config.listeners.push(listener)
    })
    .await;
    (dovecot, gw)
}

fn rejected(gw: &TestGateway, reason: &str) -> u64 {
    gw.shared
        .metrics
        .proxy_protocol_rejected
        .with_label_values(&["lb", reason])
        .get()
}

/// A v2 header: PROXY or LOCAL, family/transport byte, address block and TLVs.
fn v2(command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.push(0x20 | command);
    out.push(family);
    out.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn v1(client: &str, front: &str) -> Vec<u8> {
    format!("PROXY TCP4 {client} {front} 51234 143\r\n").into_bytes()
}

/// Logs in as alice after the greeting, selects INBOX and logs out.
async fn alice_session(client: &mut Client) {
    client.login("alice", "alicepw").await;
    assert!(tagged_ok(&client.cmd("SELECT INBOX").await));
    assert!(tagged_ok(&client.cmd("LOGOUT").await));
}

/// alice's Dovecot login line, once there is one.
async fn alice_login_line(dovecot: &Dovecot) -> String {
    let log = wait_for_log(dovecot, "alice's login", |log| {
        !login_lines(log, "alice").is_empty()
    })
    .await;
    login_lines(&log, "alice").remove(0)
}

#[tokio::test]
async fn v1_header_from_trusted_peer_gives_dovecot_the_client_address() {
    let (dovecot, gw) = start(&["127.0.0.1"]).await;
    let mut client = Client::connect(gw.addr_of("lb")).await;
    client.write(&v1(CLIENT_V4, FRONT_V4)).await;
    alice_session(&mut client).await;
    let line = alice_login_line(&dovecot).await;
    assert!(line.contains(&format!("rip={CLIENT_V4},")), "{line}");
    assert!(line.contains(&format!("lip={FRONT_V4},")), "{line}");
    assert_eq!(rejected(&gw, "malformed") + rejected(&gw, "untrusted"), 0);
    drop(client);
    gw.stop().await;
}

#[tokio::test]
async fn v2_tcp6_header_with_tlvs_gives_dovecot_the_client_address() {
    let (dovecot, gw) = start(&["127.0.0.0/8", "::1"]).await;
    let mut payload = CLIENT_V6
        .parse::<std::net::Ipv6Addr>()
        .unwrap()
        .octets()
        .to_vec();
    payload.extend_from_slice(&"fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    payload.extend_from_slice(&40000u16.to_be_bytes());
    payload.extend_from_slice(&143u16.to_be_bytes());
    // TLVs as load balancers send them: ALPN, AUTHORITY, a unique id, an AWS VPC endpoint.
    for (kind, value) in [
        (0x01u8, &b"imap"[..]),
        (0x02, b"imap.example.org"),
        (0x05, b"0123456789abcdef"),
        (0xea, b"\x01vpce-0123456789abcdef"),
    ] {
        payload.push(kind);
        payload.extend_from_slice(&u16::try_from(value.len()).unwrap().to_be_bytes());
        payload.extend_from_slice(value);
    }
    let mut client = Client::connect(gw.addr_of("lb")).await;
    client.write(&v2(0x1, 0x21, &payload)).await;
    alice_session(&mut client).await;
    let line = alice_login_line(&dovecot).await;
    assert!(line.contains(&format!("rip={CLIENT_V6},")), "{line}");
    assert!(line.contains("lip=fd00::1,"), "{line}");
    drop(client);
    gw.stop().await;
}

#[tokio::test]
async fn v2_local_keeps_the_socket_address() {
    let (dovecot, gw) = start(&["127.0.0.0/8"]).await;
    // LOCAL ignores any address block: the forged one here must not be used.
    let mut forged = vec![203, 0, 113, 7, 198, 51, 100, 1];
    forged.extend_from_slice(&[0xc8, 0x22, 0, 143]);
    let tcp = tcp_from([127, 0, 0, 9], gw.addr_of("lb")).await;
    let mut client = Client::from_io(Box::new(tcp));
    client.write(&v2(0x0, 0x11, &forged)).await;
    alice_session(&mut client).await;
    let line = alice_login_line(&dovecot).await;
    assert!(line.contains("rip=127.0.0.9,"), "{line}");
    drop(client);
    gw.stop().await;
}

#[tokio::test]
async fn untrusted_peer_is_closed_unread_and_counted() {
    let (_dovecot, gw) = start(&["10.0.0.0/8"]).await;
    // Without sending anything: closed, no greeting.
    let mut client = Client::connect(gw.addr_of("lb")).await;
    assert_eq!(client.read_to_end().await, b"");
    assert_eq!(rejected(&gw, "untrusted"), 1);
    // With a well-formed header: the same; the header of an untrusted peer is not read.
    let mut client = Client::connect(gw.addr_of("lb")).await;
    client.write(&v1(CLIENT_V4, FRONT_V4)).await;
    assert_eq!(client.read_to_end().await, b"");
    assert_eq!(rejected(&gw, "untrusted"), 2);
    assert_eq!(rejected(&gw, "malformed"), 0);
    // Other listeners are not concerned.
    let mut plain = Client::connect(gw.addr).await;
    plain.login("alice", "alicepw").await;
    drop((client, plain));
    gw.stop().await;
}

#[tokio::test]
async fn garbage_instead_of_a_header_is_closed_and_counted() {
    let (_dovecot, gw) = start(&["127.0.0.0/8"]).await;
    let mut oversized = b"\r\n\r\n\0\r\nQUIT\n\x21\x11".to_vec();
    oversized.extend_from_slice(&u16::MAX.to_be_bytes());
    let bad: [&[u8]; 4] = [
        b"a1 LOGIN alice alicepw\r\n",
        b"PROXY TCP4 203.0.113.7 nonsense 1 2\r\n",
        &[b'P'; 200],
        &oversized,
    ];
    for (n, bytes) in (1..).zip(bad) {
        let mut client = Client::connect(gw.addr_of("lb")).await;
        client.write(bytes).await;
        assert_eq!(client.read_to_end().await, b"", "no greeting for garbage");
        until("the rejection to be counted", || {
            rejected(&gw, "malformed") == n
        })
        .await;
    }
    assert_eq!(rejected(&gw, "untrusted"), 0);
    assert_eq!(rejected(&gw, "timeout"), 0);
    gw.stop().await;
}

#[tokio::test]
async fn slow_header_times_out_and_a_silent_health_check_is_not_counted() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let listener = proxy_listener(&["127.0.0.0/8"]);
    let gw = gateway::start_with(&gateway::single_backend(dovecot.addr()), |config, _| {
        config.listeners.push(listener);
        config.timeouts.preauth = Duration::from_secs(1);
    })
    .await;
    let counters = gw.shared.metrics.listener("lb");
    // A TCP health check: connect, close. Not a bad header.
    drop(Client::connect(gw.addr_of("lb")).await);
    until("the health check to be over", || {
        counters.accepted.get() == 1 && counters.active.get() == 0
    })
    .await;
    assert_eq!(rejected(&gw, "malformed"), 0);
    // Half a header, then nothing: closed when the pre-auth time is up.
    let mut client = Client::connect(gw.addr_of("lb")).await;
    client.write(b"PROXY TCP4 203.0.113.7 ").await;
    assert_eq!(client.read_to_end().await, b"");
    assert_eq!(rejected(&gw, "timeout"), 1);
    assert_eq!(rejected(&gw, "malformed"), 0);
    drop(client);
    gw.stop().await;
}

/// A stream whose first write carries `prefix` in front of it, in one system call: the
/// header and the client's first bytes leave in the same TCP segment, the hardest case for
/// a reader that must stop exactly at the header's end.
struct PrefixFirstWrite {
    prefix: Vec<u8>,
    inner: TcpStream,
}

impl AsyncRead for PrefixFirstWrite {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PrefixFirstWrite {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_write(cx, buf);
        }
        let mut all = self.prefix.clone();
        all.extend_from_slice(buf);
        let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &all))?;
        let of_prefix = n.min(self.prefix.len());
        self.prefix.drain(..of_prefix);
        if n > of_prefix {
            Poll::Ready(Ok(n - of_prefix))
        } else {
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn implicit_tls_listener_reads_the_header_then_handshakes() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start_with(&gateway::single_backend(dovecot.addr()), |config, dir| {
        let ca = TestCa::new(dir);
        let (cert, key) = ca.issue(dir, "imaps-lb", &["localhost"]);
        let mut listener = common::tls::listener("lb", ListenerMode::Tls, cert, key);
        listener.proxy_protocol = true;
        listener.proxy_trusted_networks = vec!["127.0.0.0/8".into()];
        config.listeners.push(listener);
    })
    .await;
    let tcp = TcpStream::connect(gw.addr_of("lb")).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    // The header and the ClientHello in one write.
    let io = PrefixFirstWrite {
        prefix: v1(CLIENT_V4, FRONT_V4),
        inner: tcp,
    };
    let tls = tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(client_config(&gw.dir.path().join("ca.pem")))
            .connect("localhost".try_into().unwrap(), io),
    )
    .await
    .unwrap()
    .expect("TLS handshake after the PROXY header");
    let mut client = Client::from_io(Box::new(tls));
    alice_session(&mut client).await;
    let line = alice_login_line(&dovecot).await;
    assert!(line.contains(&format!("rip={CLIENT_V4},")), "{line}");
    assert_eq!(
        gw.shared
            .metrics
            .tls_handshakes
            .with_label_values(&["lb", "implicit", "ok"])
            .get(),
        1
    );
    drop(client);
    gw.stop().await;
}

#[tokio::test]
async fn commands_in_the_same_write_as_the_header_are_not_lost() {
    let (dovecot, gw) = start(&["127.0.0.0/8"]).await;
    for header in [v1(CLIENT_V4, FRONT_V4), {
        let mut p = vec![203, 0, 113, 7, 198, 51, 100, 1];
        p.extend_from_slice(&[0xc8, 0x22, 0, 143]);
        v2(0x1, 0x11, &p)
    }] {
        let mut client = Client::connect(gw.addr_of("lb")).await;
        let mut bytes = header;
        bytes.extend_from_slice(
            b"a1 CAPABILITY\r\na2 LOGIN alice alicepw\r\na3 SELECT INBOX\r\na4 LOGOUT\r\n",
        );
        client.write(&bytes).await;
        // The greeting comes first; then every command is answered, in order.
        let greeting = client.read_response().await;
        assert!(greeting.starts_with(b"* OK"), "{greeting:?}");
        for tag in ["a1", "a2", "a3", "a4"] {
            let answer = client.until_tagged(tag).await;
            assert!(tagged_ok(&answer), "{tag}: {answer}");
        }
    }
    let log = wait_for_log(&dovecot, "two logins of alice", |log| {
        login_lines(log, "alice").len() == 2
    })
    .await;
    for line in login_lines(&log, "alice") {
        assert!(line.contains(&format!("rip={CLIENT_V4},")), "{line}");
    }
    gw.stop().await;
}

/// `send_proxy_protocol = true` on a backend: the first bytes of each connection to it are a
/// v2 header with the client's address as the session knows it (from the listener's own
/// PROXY header when there is one) and the address the client connected to; on the home
/// connection and on a mounted backend's, opened later in the session.
#[tokio::test]
async fn backend_with_send_proxy_protocol_gets_the_client_address_first() {
    let caps = "IMAP4rev1 LITERAL+ SASL-IR AUTH=PLAIN ID";
    let (home, home_headers) = fake::start_expecting_proxy(caps).await;
    let (mounted, mount_headers) = fake::start_expecting_proxy(caps).await;
    let routing = format!(
        "default_pool = [\"home\"]\n\
         [[backends]]\nname = \"home\"\naddress = \"{home}\"\nsend_proxy_protocol = true\n\
         [[backends]]\nname = \"shared\"\naddress = \"{mounted}\"\nsend_proxy_protocol = true\n\
         [[mounts]]\nusers = \"alice\"\nprefix = \"Shared\"\nbackend = \"shared\"\n"
    );
    let listener = proxy_listener(&["127.0.0.0/8"]);
    let gw = gateway::start_with(&routing, |config, _| config.listeners.push(listener)).await;

    // Behind a load balancer: the header the gateway got is what the backend gets.
    let mut client = Client::connect(gw.addr_of("lb")).await;
    client.write(&v1(CLIENT_V4, FRONT_V4)).await;
    client.login("alice", "pw").await;
    // The mounted backend is connected when a command first needs it.
    let r = client.cmd("STATUS Shared/Team (MESSAGES)").await;
    assert!(tagged_ok(&r), "{r}");
    let expected = ProxyHeader::Proxied {
        source: format!("{CLIENT_V4}:51234").parse().unwrap(),
        destination: format!("{FRONT_V4}:143").parse().unwrap(),
    };
    assert_eq!(*home_headers.lock().unwrap(), [expected]);
    assert_eq!(*mount_headers.lock().unwrap(), [expected]);

    // Straight from a client: its socket address and the gateway's listener address.
    let tcp = tcp_from([127, 0, 0, 9], gw.addr).await;
    let source = tcp.local_addr().unwrap();
    let mut direct = Client::from_io(Box::new(tcp));
    direct.login("bob", "pw").await;
    let expected = ProxyHeader::Proxied {
        source,
        destination: gw.addr,
    };
    assert_eq!(home_headers.lock().unwrap().last(), Some(&expected));
    drop((client, direct));
    gw.stop().await;
}

/// With `tls = "implicit"` the header goes first, in clear, and the TLS handshake after it:
/// a backend reading the header before the ClientHello (as Dovecot and HAProxy do) logs in.
#[tokio::test]
async fn send_proxy_protocol_comes_before_the_backends_tls_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let (cert, key) = ca.issue(dir.path(), "backend", &["localhost", "127.0.0.1"]);
    let (backend, headers) = fake::start_tls(&cert, &key, true).await;
    let routing = format!(
        "default_pool = [\"b\"]\n[[backends]]\nname = \"b\"\naddress = \"{backend}\"\n\
         tls = \"implicit\"\nca_file = \"{}\"\nsend_proxy_protocol = true\n",
        ca.ca_path.display()
    );
    let gw = gateway::start(&routing).await;
    let tcp = tcp_from([127, 0, 0, 9], gw.addr).await;
    let source = tcp.local_addr().unwrap();
    let mut client = Client::from_io(Box::new(tcp));
    client.login("alice", "pw").await;
    assert!(tagged_ok(&client.cmd("LOGOUT").await));
    let expected = ProxyHeader::Proxied {
        source,
        destination: gw.addr,
    };
    assert_eq!(*headers.lock().unwrap(), [expected]);
    drop(client);
    gw.stop().await;
}

/// Against Dovecot with `haproxy = yes` on its listener: the login works only because the
/// header comes first, and Dovecot logs the address the header gave. The backend is not
/// `trusted`, so no ID is sent: the address can only have come from the header.
#[tokio::test]
async fn dovecot_with_haproxy_logs_the_address_from_the_gateways_header() {
    let dovecot = Dovecot::start(DovecotOptions {
        haproxy: true,
        ..DovecotOptions::default()
    });
    let haproxy = dovecot.haproxy_addr().unwrap();
    let routing = format!(
        "default_pool = [\"b\"]\n[[backends]]\nname = \"b\"\naddress = \"{haproxy}\"\n\
         send_proxy_protocol = true\ntrusted = false\n"
    );
    let listener = proxy_listener(&["127.0.0.1"]);
    let gw = gateway::start_with(&routing, |config, _| config.listeners.push(listener)).await;
    let mut client = Client::connect(gw.addr_of("lb")).await;
    client.write(&v1(CLIENT_V4, FRONT_V4)).await;
    alice_session(&mut client).await;
    let line = alice_login_line(&dovecot).await;
    assert!(line.contains(&format!("rip={CLIENT_V4},")), "{line}");
    assert!(line.contains(&format!("lip={FRONT_V4},")), "{line}");
    drop(client);
    gw.stop().await;
}

#[test]
fn check_config_reports_proxy_protocol_problems() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("routing.toml"),
        "default_pool = [\"a\"]\n[[backends]]\nname = \"a\"\naddress = \"127.0.0.1:1143\"\n",
    )
    .unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        "routing_table = \"routing.toml\"\n[admin]\naddress = \"127.0.0.1:0\"\n\
         [[listeners]]\nname = \"a\"\naddress = \"127.0.0.1:0\"\nproxy_protocol = true\n\
         [[listeners]]\nname = \"b\"\naddress = \"127.0.0.1:0\"\nproxy_protocol = true\n\
         proxy_trusted_networks = [\"10.0.0.0/8\", \"10.0.0.0/33\", \"lb.internal\"]\n",
    )
    .unwrap();
    let check = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(GATEWAY_BIN);
        cmd.args(["check-config", "--config"]).arg(&config);
        for (key, _) in std::env::vars() {
            if key.starts_with("IMAP_GATEWAY_") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(env.iter().copied());
        cmd.output().unwrap()
    };
    let out = check(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    for problem in [
        "listener \"a\" (127.0.0.1:0): proxy_protocol = true needs proxy_trusted_networks",
        "listener \"b\" (127.0.0.1:0): proxy_trusted_networks: \"10.0.0.0/33\"",
        "listener \"b\" (127.0.0.1:0): proxy_trusted_networks: \"lb.internal\"",
    ] {
        assert!(
            stderr.lines().any(|l| l.contains(problem)),
            "check-config should report {problem:?}:\n{stderr}"
        );
    }
    assert!(stderr.contains("3 problem(s) found"), "{stderr}");

    // The listeners given whole in the environment, as a Helm chart does, replace the file's.
    let out = check(&[(
        "IMAP_GATEWAY_LISTENERS",
        "[{name=\"imap\", address=\"127.0.0.1:0\", proxy_protocol=true, \
          proxy_trusted_networks=[\"10.0.0.0/8\", \"fd00::/8\"]}]",
    )]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
}
