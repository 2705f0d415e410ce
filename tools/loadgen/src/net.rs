//! Connections: TCP from a chosen loopback source address, optionally wrapped in TLS.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, Result, bail};
use rustls::client::{ClientSessionMemoryCache, Resumption};
use rustls::{ClientConfig, HandshakeKind};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;

/// A plain or TLS connection: the gateway's own stream type, so both sides of a benchmark
/// read and write through the same code.
pub use imap_gateway::stream::Stream;

/// How to reach the target.
pub struct Dialer {
    /// Servers to spread sessions over, by user number.
    targets: Vec<SocketAddr>,
    /// Number of loopback source addresses to spread connections over (0: let the kernel
    /// choose, i.e. 127.0.0.1 for a loopback target).
    src_ips: u32,
    tls: Option<Tls>,
}

/// TLS towards the target, and what the handshakes did.
struct Tls {
    /// One per user with `--tls-resume` (each user a client with a session cache of its
    /// own, as real clients are), else one for all (no resumption).
    connectors: Vec<TlsConnector>,
    name: ServerName<'static>,
    handshakes: AtomicU64,
    resumed: AtomicU64,
}

/// Sessions a user's cache keeps: a login needs one ticket, and the server sends more.
const TICKETS_PER_USER: usize = 4;

impl Dialer {
    pub fn new(
        targets: Vec<SocketAddr>,
        src_ips: u32,
        tls: bool,
        ca: Option<&Path>,
        sni: &str,
        resume: bool,
        users: u32,
    ) -> Result<Dialer> {
        if targets.is_empty() {
            bail!("no --target");
        }
        if src_ips > 0 && targets.iter().any(|t| !t.ip().is_loopback()) {
            bail!("--src-ips spreads over 127.0.0.0/8 and needs a loopback target");
        }
        if src_ips > 64_000 {
            bail!("--src-ips is at most 64000");
        }
        let tls = if tls {
            let ca = ca.context("--tls needs --ca FILE (PEM) to verify the server")?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("reading {}", ca.display()))?
            {
                roots
                    .add(cert.with_context(|| format!("parsing {}", ca.display()))?)
                    .context("adding a CA certificate")?;
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .context("TLS versions")?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let connectors = if resume {
                (0..users.max(1))
                    .map(|_| {
                        let mut c = config.clone();
                        c.resumption = Resumption::store(Arc::new(ClientSessionMemoryCache::new(
                            TICKETS_PER_USER,
                        )));
                        TlsConnector::from(Arc::new(c))
                    })
                    .collect()
            } else {
                config.resumption = Resumption::disabled();
                vec![TlsConnector::from(Arc::new(config))]
            };
            let name = ServerName::try_from(sni.to_owned()).context("--sni")?;
            Some(Tls {
                connectors,
                name,
                handshakes: AtomicU64::new(0),
                resumed: AtomicU64::new(0),
            })
        } else {
            None
        };
        Ok(Dialer {
            targets,
            src_ips,
            tls,
        })
    }

    /// TLS handshakes made so far, and how many of them resumed a session.
    pub fn tls_counts(&self) -> Option<(u64, u64)> {
        self.tls.as_ref().map(|t| {
            (
                t.handshakes.load(Ordering::Relaxed),
                t.resumed.load(Ordering::Relaxed),
            )
        })
    }

    /// The source address of connection number `i`: 127.77.x.y, never .0.
    fn source(&self, i: u64) -> Option<IpAddr> {
        if self.src_ips == 0 {
            return None;
        }
        let idx = (i % u64::from(self.src_ips)) as u32;
        let (x, y) = (idx / 250, idx % 250 + 1);
        Some(IpAddr::V4(Ipv4Addr::new(127, 77, x as u8, y as u8)))
    }

    /// Connects (connection number `i` picks the source address, user number `user` the
    /// target) and does the TLS handshake when asked to.
    pub async fn connect(&self, i: u64, user: u64) -> Result<Stream> {
        let target = self.targets[(user % self.targets.len() as u64) as usize];
        let socket = if target.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = self.source(i) {
            // Pick the port at connect time, per 4-tuple, not at bind time per address.
            let one: libc::c_int = 1;
            // SAFETY: a valid socket descriptor and a c_int option of the right size.
            let rc = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error()).context("IP_BIND_ADDRESS_NO_PORT");
            }
            socket
                .bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("bind {ip}"))?;
        }
        let tcp = socket
            .connect(target)
            .await
            .with_context(|| format!("connect {target}"))?;
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => Ok(Stream::Plain(tcp)),
            Some(t) => {
                let connector = &t.connectors[(user % t.connectors.len() as u64) as usize];
                let tls = connector
                    .connect(t.name.clone(), tcp)
                    .await
                    .context("TLS handshake")?;
                t.handshakes.fetch_add(1, Ordering::Relaxed);
                if tls.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed) {
                    t.resumed.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(tls))))
            }
        }
    }
}
