//! A murder session (`relay::murder::run`) in-process over scripted backends on loopback,
//! for the LIST merge's allocation test and its criterion benchmark: the routing table's
//! backends are "logged in" as soon as they are connected, and the caller talks to the
//! session through the returned client socket. Included with `#[path]` by both.

use std::path::Path;
use std::time::Duration;

use imap_gateway::metrics::Metrics;
use imap_gateway::proto::capability::Capabilities;
use imap_gateway::relay::murder::{self, ConnectFuture, Connected, Connector};
use imap_gateway::relay::{RelayContext, RelayOptions};
use imap_gateway::route::{Backend, RoutingTable};
use imap_gateway::shutdown::Stop;
use imap_gateway::stream::Stream;
use tokio::net::{TcpListener, TcpStream};

/// Connections to the scripted backends are "logged in" as soon as they are open.
struct Direct;

async fn connect(backend: &Backend) -> Result<Connected, String> {
    let tcp = TcpStream::connect((backend.host.as_str(), backend.port))
        .await
        .map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(Connected {
        stream: Stream::Plain(tcp),
        leftover: Vec::new(),
        capabilities: Capabilities::parse("IMAP4rev1 LITERAL+"),
    })
}

impl Connector for Direct {
    fn connect<'a>(&'a self, backend: &'a Backend) -> ConnectFuture<'a> {
        Box::pin(connect(backend))
    }
}

/// Starts a session of `user` routed by the routing table `table`; returns the client's
/// socket to it.
pub async fn start(table: &str, user: &str) -> TcpStream {
    let table = RoutingTable::parse(table, Path::new(".")).expect("valid table");
    let route = table.lookup(user).expect("routed");
    let home = connect(&route.home).await.expect("home backend");

    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(front.local_addr().unwrap())
        .await
        .unwrap();
    client.set_nodelay(true).unwrap();
    let (gw_side, _) = front.accept().await.unwrap();
    gw_side.set_nodelay(true).unwrap();
    let opts = RelayOptions {
        max_command_line: 64 * 1024,
        max_literal: 1 << 30,
        max_backend_line: 16 * 1024 * 1024,
        backend_logout: Duration::from_secs(1),
        rewrite_referrals: false,
        splice: true,
        autologout: imap_gateway::config::MIN_AUTOLOGOUT,
        client_send: Duration::from_secs(60),
    };
    let ctx = RelayContext {
        stop: Stop::never(),
        counters: Metrics::new(&prometheus::Registry::new())
            .expect("metrics")
            .relay,
    };
    tokio::spawn(async move {
        murder::run(
            Stream::Plain(gw_side),
            Vec::new(),
            route,
            home,
            &Direct,
            &opts,
            &ctx,
        )
        .await
    });
    client
}
