//! Runs the gateway in-process on loopback ports for a test, with a routing table and
//! configuration written to a temporary directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::time::Duration;

use imap_gateway::Gateway;
use imap_gateway::config::{AdminConfig, Config, Limits, ListenerConfig, ListenerMode};
use imap_gateway::session::Shared;
use tokio_util::sync::CancellationToken;

pub struct TestGateway {
    /// Plain listener (plaintext auth allowed, as on loopback).
    pub addr: SocketAddr,
    /// Extra listeners by name.
    pub addrs: Vec<(String, SocketAddr)>,
    pub dir: tempfile::TempDir,
    /// The admin HTTP server.
    pub admin: SocketAddr,
    /// What the gateway's sessions share: routing table, metrics, lifecycle.
    pub shared: Arc<Shared>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestGateway {
    pub fn addr_of(&self, name: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no listener {name}"))
            .1
    }

    /// Starts a shutdown without waiting for it (drain tests).
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Stops accepting and waits for every session to end (clients must be gone first): a
    /// session task that outlives its client is a leak.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(super::imap::WAIT, t)
                .await
                .expect("sessions still running after their clients left")
                .unwrap();
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A backend entry for the routing table.
pub fn backend_toml(name: &str, addr: SocketAddr, extra: &str) -> String {
    format!("[[backends]]\nname = \"{name}\"\naddress = \"{addr}\"\ntrusted = true\n{extra}\n")
}

/// A config with one plain listener that allows plaintext auth (loopback), and the routing
/// table text given; `tweak` can change anything else before the gateway binds.
pub fn test_config(dir: &Path, routing: &str) -> Config {
    let table: PathBuf = dir.join("routing.toml");
    std::fs::write(&table, routing).unwrap();
    Config {
        routing_table: table,
        listeners: vec![ListenerConfig {
            name: "plain".into(),
            address: "127.0.0.1:0".parse().unwrap(),
            mode: ListenerMode::Plain,
            tls_cert: None,
            tls_key: None,
            tls_session_tickets: true,
            allow_plaintext_auth: true,
            proxy_protocol: false,
            proxy_trusted_networks: Vec::new(),
        }],
        // Tests log in with wrong passwords from 127.0.0.1 all the time: the auth penalty
        // would only slow them down. The tests of the penalty turn it on.
        limits: Limits {
            auth_penalty_base: Duration::ZERO,
            ..Limits::default()
        },
        // Tests run side by side: the admin server takes a free port too.
        admin: AdminConfig {
            address: "127.0.0.1:0".parse().unwrap(),
            ..AdminConfig::default()
        },
        ..Config::default()
    }
}

pub async fn start(routing: &str) -> TestGateway {
    start_with(routing, |_, _| {}).await
}

pub async fn start_with(routing: &str, tweak: impl FnOnce(&mut Config, &Path)) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), routing);
    tweak(&mut config, dir.path());
    let gateway = Gateway::bind(config).await.expect("gateway binds");
    let addrs = gateway.local_addrs();
    let addr = addrs
        .iter()
        .find(|(n, _)| n == "plain")
        .map(|(_, a)| *a)
        .unwrap_or(addrs[0].1);
    let admin = gateway.admin_addr().expect("admin server enabled");
    let shared = gateway.shared();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(gateway.serve(shutdown.clone()));
    TestGateway {
        addr,
        addrs,
        dir,
        admin,
        shared,
        shutdown,
        task: Some(task),
    }
}

/// A routing table that sends every user to the one backend at `addr` (trusted).
pub fn single_backend(addr: SocketAddr) -> String {
    format!("default_pool = [\"b\"]\n{}", backend_toml("b", addr, ""))
}
