//! The `imap-gateway` binary: command line, logging set-up, signals and exit codes.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use imap_gateway::Gateway;
use imap_gateway::config::{Config, LogFormat};
use imap_gateway::reload::{reload_certificates, reload_routes};
use imap_gateway::route::{Backend, MountTarget, RouteError, RoutingTable, Trigger};
use imap_gateway::session::Shared;
use imap_gateway::tls::ReloadableCert;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Exit code for an invalid configuration.
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(name = "imap-gateway", version, about = "IMAP4 gateway and proxy")]
struct Cli {
    /// Configuration file (TOML). Without it: defaults and IMAP_GATEWAY_* variables.
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run,
    /// Check the configuration and routing table; report every problem; exit 2 on error.
    CheckConfig,
    /// Print the backend a user is routed to.
    Route { user: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command {
        Command::CheckConfig => check_config(&config),
        Command::Route { user } => route(&config, &user),
        Command::Run => run(config),
    }
}

fn check_config(config: &Config) -> ExitCode {
    let mut problems = config.problems();
    match RoutingTable::load(&config.routing_table) {
        Ok(_) => {}
        // One line per problem, so the count below is the number of problems.
        Err(RouteError::Invalid(table_problems)) => {
            let path = config.routing_table.display();
            problems.extend(
                table_problems
                    .iter()
                    .map(|p| format!("routing table {path}: {p}")),
            );
        }
        Err(e) => problems.push(e.to_string()),
    }
    if problems.is_empty() {
        println!("configuration OK");
        ExitCode::SUCCESS
    } else {
        for p in &problems {
            eprintln!("error: {p}");
        }
        eprintln!("{} problem(s) found", problems.len());
        ExitCode::from(EXIT_CONFIG)
    }
}

fn address(b: &Backend) -> String {
    if b.host.contains(':') {
        format!("[{}]:{}", b.host, b.port)
    } else {
        format!("{}:{}", b.host, b.port)
    }
}

fn route(config: &Config, user: &str) -> ExitCode {
    let table = match RoutingTable::load(&config.routing_table) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match table.lookup(user) {
        Some(route) => {
            println!("{} {}", route.home.name, address(&route.home));
            for m in &route.mounts {
                let prefix = m.prefix.join("/");
                match &m.target {
                    MountTarget::Backend { backend, path } => println!(
                        "mount {prefix} -> {} {} {:?} ({:?})",
                        backend.name,
                        address(backend),
                        path.join("/"),
                        m.namespace
                    ),
                    MountTarget::Referral(url) => {
                        println!("mount {prefix} -> referral {url} ({:?})", m.namespace)
                    }
                }
            }
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("no route for {user}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal, not in collected logs.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn run(config: Config) -> ExitCode {
    init_logging(&config);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.performance.worker_threads > 0 {
        builder.worker_threads(config.performance.worker_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Installed first: until then SIGTERM would end the process instead of draining it.
        let (term, interrupt) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(t), Ok(i)) => (t, i),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot handle SIGTERM or SIGINT");
                return ExitCode::FAILURE;
            }
        };
        let gateway = match Gateway::bind(config).await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        // Installed before serving: SIGHUP's default action would end the process.
        match signal(SignalKind::hangup()) {
            Ok(hangup) => {
                tokio::spawn(reload_on_hangup(
                    hangup,
                    gateway.shared(),
                    gateway.certificates(),
                ));
            }
            Err(e) => tracing::error!(error = %e, "cannot handle SIGHUP"),
        }
        let shutdown = CancellationToken::new();
        tokio::spawn(wait_for_signal(term, interrupt, shutdown.clone()));
        gateway.serve(shutdown).await;
        ExitCode::SUCCESS
    })
}

/// On each SIGHUP: the routing table and the listener certificates are read again.
async fn reload_on_hangup(
    mut hangup: Signal,
    shared: Arc<Shared>,
    certs: Vec<Arc<ReloadableCert>>,
) {
    while hangup.recv().await.is_some() {
        let shared = Arc::clone(&shared);
        let certs = certs.clone();
        // Reading and parsing files blocks: off the async workers.
        let done = tokio::task::spawn_blocking(move || {
            // Logged and counted there.
            let _ = reload_routes(&shared, Trigger::Signal);
            reload_certificates(&shared, &certs);
        });
        if let Err(e) = done.await {
            tracing::error!(error = %e, "reload on SIGHUP failed");
        }
    }
}

async fn wait_for_signal(mut term: Signal, mut interrupt: Signal, shutdown: CancellationToken) {
    tokio::select! {
        _ = term.recv() => {}
        _ = interrupt.recv() => {}
    }
    tracing::info!("shutting down; a second signal exits at once");
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = interrupt.recv() => {}
    }
    std::process::exit(1);
}
