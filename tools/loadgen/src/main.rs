//! loadgen: an IMAP load generator for the imap-gateway benchmarks.
//!
//! Drives N concurrent sessions against any host:port (the gateway, or a backend directly)
//! and prints one JSON object: throughput, latency percentiles, errors, and for the target
//! process(es) given with `--pid` the CPU time per unit of work and the RSS, read from /proc.
//! Its own CPU time is reported too, so that one can see it measures the target, not itself.
//!
//! Scenarios:
//! - `login`: connect, (TLS,) greeting, LOGIN, LOGOUT, close; one op per login.
//! - `fetch`: log in, SELECT, then `FETCH n BODY.PEEK[]` over the mailbox's messages.
//! - `latency`: log in, SELECT, then NOOP and `UID FETCH n FLAGS` round trips, one at a time.
//! - `idle`: ramp up `--clients` sessions into IDLE, hold them, then DONE + LOGOUT, ramped
//!   down at the same rate.

mod imap;
mod net;
mod stats;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::imap::{Conn, exists_count, quote};
use crate::net::Dialer;
use crate::stats::{Errors, Sample, percentiles};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// connect, LOGIN, LOGOUT (a login storm)
    Login,
    /// SELECT, then FETCH n BODY.PEEK[] over the mailbox
    Fetch,
    /// NOOP and UID FETCH n FLAGS round trips, one outstanding per session
    Latency,
    /// hold --clients sessions in IDLE
    Idle,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Command {
    Noop,
    UidFetchFlags,
}

/// IMAP load generator: N concurrent sessions against HOST:PORT; prints one JSON object.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Server to load (the gateway, or a backend directly). Repeat it to spread the sessions
    /// over several servers by user number (the same users on each, as the gateway spreads
    /// them over its backends).
    #[arg(long, required = true)]
    target: Vec<SocketAddr>,
    /// Implicit TLS (port 993 style).
    #[arg(long)]
    tls: bool,
    /// PEM file of the CA that signed the server's certificate (with --tls).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Server name sent and verified (with --tls).
    #[arg(long, default_value = "localhost")]
    sni: String,
    /// Let TLS sessions resume: every user is a client with a TLS session cache of its own,
    /// so a user's next login offers the session (ticket) of its last one. By default every
    /// connection makes a full handshake.
    #[arg(long)]
    tls_resume: bool,
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Concurrent sessions (for idle: the number of sessions to hold).
    #[arg(long, default_value_t = 8)]
    clients: u32,
    /// How long to measure (after the warmup); for idle, how long to hold the sessions.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Stop after this many operations in all instead of after --duration (no warmup).
    #[arg(long, conflicts_with = "duration")]
    count: Option<u64>,
    /// Load before the measurement starts; for idle, the pause between the last session
    /// entering IDLE and the first RSS sample.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    warmup: Duration,
    /// User name pattern; `{n}` is replaced by the user number.
    #[arg(long, default_value = "user{n}")]
    users: String,
    /// Number of users: n runs over user-start .. user-start + user-count - 1.
    #[arg(long, default_value_t = 1)]
    user_count: u32,
    /// First user number.
    #[arg(long, default_value_t = 1)]
    user_start: u32,
    /// Password of every user.
    #[arg(long, conflicts_with = "password_pattern")]
    password: Option<String>,
    /// Password pattern; `{n}` is replaced by the user number.
    #[arg(long)]
    password_pattern: Option<String>,
    /// Target process to sample (CPU time and VmRSS from /proc); repeat to sum several.
    #[arg(long)]
    pid: Vec<u32>,
    /// Target server to sample as a whole process tree, with children that ended (a
    /// proxy that works in child processes, like Dovecot's login processes); its CPU is
    /// added to the target's. Login, fetch, latency.
    #[arg(long)]
    target_tree: Vec<u32>,
    /// Backend server to sample: this process and all its descendants, with children that
    /// ended (a Dovecot master's pid); repeat for several servers. Login, fetch, latency.
    #[arg(long)]
    backend_tree: Vec<u32>,
    /// Mailbox to SELECT (fetch, latency, idle).
    #[arg(long, default_value = "INBOX")]
    mailbox: String,
    /// Commands of the latency scenario, taken in turn.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "noop,uid-fetch-flags"
    )]
    commands: Vec<Command>,
    /// Idle: new sessions per second while ramping up, and sessions ended per second after
    /// the hold.
    #[arg(long, default_value_t = 500.0)]
    idle_ramp: f64,
    /// Idle: at most this many sessions logging in at once while ramping up.
    #[arg(long, default_value_t = 128)]
    idle_inflight: usize,
    /// Spread connections over this many source addresses 127.77.x.y (loopback targets
    /// only; 0 = kernel's choice). Each source address has its own ~28k ephemeral ports.
    #[arg(long, default_value_t = 0)]
    src_ips: u32,
    /// Login, fetch and latency: operations per second over all clients, each client taking
    /// its turn on a fixed schedule (an open loop below saturation, for cost and latency at
    /// a given load). Without it each client starts its next operation at once (closed
    /// loop: the machine's limit).
    #[arg(long)]
    rate: Option<f64>,
    /// Runtime worker threads (1 = a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Free text copied into the JSON output (e.g. "direct" or "gateway").
    #[arg(long)]
    label: Option<String>,
}

const LOGIN: usize = 0;
const FETCH: usize = 1;
const NOOP: usize = 2;
const UID_FETCH_FLAGS: usize = 3;
const KIND_NAMES: [&str; 4] = ["login", "fetch", "noop", "uid_fetch_flags"];

/// Shared by every session.
struct Ctx {
    args: Args,
    dialer: Dialer,
    errors: Errors,
    /// `LOGIN` command bytes, one per user.
    logins: Vec<Vec<u8>>,
    select: Vec<u8>,
    stop: AtomicBool,
    measure_start: Instant,
    measure_end: Instant,
    /// Count mode: operations handed out so far.
    tickets: AtomicU64,
}

impl Ctx {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// In count mode, whether one more operation may start.
    fn ticket(&self) -> bool {
        match self.args.count {
            Some(n) => self.tickets.fetch_add(1, Ordering::Relaxed) < n,
            None => true,
        }
    }

    fn in_window(&self, t: Instant) -> bool {
        t >= self.measure_start && t <= self.measure_end
    }

    fn login_cmd(&self, i: u64) -> &[u8] {
        &self.logins[(i % self.logins.len() as u64) as usize]
    }

    /// Connects as connection number `conn`, user number `user`, and logs in.
    async fn login(&self, conn: u64, user: u64, buf: usize) -> Result<Conn> {
        let stream = self.dialer.connect(conn, user).await?;
        let mut c = Conn::new(stream, buf);
        c.read_greeting().await?;
        c.send(self.login_cmd(user)).await?;
        c.read_tagged(b"A", |_| {}).await.context("LOGIN")?;
        Ok(c)
    }

    /// Logs in and selects the mailbox; returns the number of messages in it.
    async fn open(&self, client: u64, buf: usize) -> Result<(Conn, u32)> {
        let mut c = self.login(client, client, buf).await?;
        c.send(&self.select).await?;
        let mut exists = 0;
        c.read_tagged(b"S", |line| {
            if let Some(n) = exists_count(line) {
                exists = n;
            }
        })
        .await
        .context("SELECT")?;
        Ok((c, exists))
    }
}

/// What one session loop measured.
#[derive(Default)]
struct Tally {
    ops: u64,
    bytes: u64,
    lat: [Vec<u32>; 4],
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.ops += other.ops;
        self.bytes += other.bytes;
        for (a, b) in self.lat.iter_mut().zip(other.lat) {
            a.extend(b);
        }
    }
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

/// A client's schedule under `--rate`: its share of the rate, the clients' turns spread
/// evenly over one period. A client that falls behind starts late rather than bunching
/// its missed turns (`Delay`), so an overloaded server is not hit by bursts.
fn pace(ctx: &Ctx, client: u32) -> Option<tokio::time::Interval> {
    let rate = ctx.args.rate.filter(|r| *r > 0.0)?;
    let period = Duration::from_secs_f64(f64::from(ctx.args.clients) / rate);
    let offset = period.mul_f64(f64::from(client) / f64::from(ctx.args.clients));
    let mut i = tokio::time::interval_at(Instant::now() + offset, period);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Some(i)
}

/// Login storm: one connection per login.
async fn login_client(ctx: Arc<Ctx>, client: u32) -> Tally {
    let mut t = Tally::default();
    let clients = u64::from(ctx.args.clients);
    let mut iter = 0u64;
    let mut pace = pace(&ctx, client);
    while !ctx.stopped() && ctx.ticket() {
        if let Some(p) = pace.as_mut() {
            p.tick().await;
        }
        let i = u64::from(client) + iter * clients;
        iter += 1;
        let began = Instant::now();
        let result = async {
            let mut c = ctx.login(i, i, 4096).await?;
            c.logout().await
        }
        .await;
        let now = Instant::now();
        match result {
            Ok(()) if ctx.in_window(now) => {
                t.ops += 1;
                t.lat[LOGIN].push(micros(now - began));
            }
            Ok(()) => {}
            Err(e) => ctx.errors.record("login", &e),
        }
    }
    t
}

/// Bulk fetch and command latency: one session, commands one at a time; reconnects after
/// an error.
async fn session_client(ctx: Arc<Ctx>, client: u32) -> Tally {
    let mut t = Tally::default();
    let fetch = ctx.args.scenario == Scenario::Fetch;
    let buf = if fetch { 256 * 1024 } else { 16 * 1024 };
    while !ctx.stopped() {
        let (mut c, exists) = match ctx.open(u64::from(client), buf).await {
            Ok(x) => x,
            Err(e) => {
                ctx.errors.record("login/select", &e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if exists == 0 {
            ctx.errors
                .record("select", &anyhow::anyhow!("{} is empty", ctx.args.mailbox));
            ctx.stop.store(true, Ordering::Relaxed);
            break;
        }
        // Pre-built commands: one per message, or per (kind, message) for latency.
        let mut cmds: Vec<(usize, Vec<u8>)> = Vec::new();
        for n in 1..=exists.min(1000) {
            if fetch {
                cmds.push((FETCH, format!("F FETCH {n} BODY.PEEK[]\r\n").into_bytes()));
            } else {
                for cmd in &ctx.args.commands {
                    cmds.push(match cmd {
                        Command::Noop => (NOOP, b"F NOOP\r\n".to_vec()),
                        Command::UidFetchFlags => (
                            UID_FETCH_FLAGS,
                            format!("F UID FETCH {n} FLAGS\r\n").into_bytes(),
                        ),
                    });
                }
            }
        }
        // Clients start at different messages.
        let mut next = client as usize % cmds.len();
        let mut pace = pace(&ctx, client);
        let result: Result<()> = async {
            while !ctx.stopped() && ctx.ticket() {
                if let Some(p) = pace.as_mut() {
                    p.tick().await;
                }
                let (kind, cmd) = &cmds[next];
                next = (next + 1) % cmds.len();
                let began = Instant::now();
                c.send(cmd).await?;
                let done = c.read_tagged(b"F", |_| {}).await?;
                let now = Instant::now();
                if ctx.in_window(now) {
                    t.ops += 1;
                    t.bytes += done.literal_bytes;
                    t.lat[*kind].push(micros(now - began));
                }
            }
            c.logout().await
        }
        .await;
        if let Err(e) = result {
            ctx.errors.record(KIND_NAMES[cmds[next].0], &e);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if ctx.args.count.is_some() {
            break;
        }
    }
    t
}

fn raise_nofile(want: u64) -> u64 {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 0;
        }
        if rl.rlim_max < want {
            // Root may raise the hard limit up to fs.nr_open.
            let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(rl.rlim_max);
            let raised = libc::rlimit {
                rlim_cur: want.min(nr_open),
                rlim_max: want.min(nr_open),
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
        rl.rlim_cur = rl.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
        rl.rlim_cur
    }
}

fn opt_sub(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? - b?)
}

fn per(x: Option<f64>, n: f64, scale: f64) -> Option<f64> {
    let x = x?;
    (n > 0.0).then(|| round3(x * scale / n))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn base_json(ctx: &Ctx, nofile: u64) -> serde_json::Map<String, Value> {
    let a = &ctx.args;
    let mut m = serde_json::Map::new();
    m.insert(
        "scenario".into(),
        json!(format!("{:?}", a.scenario).to_lowercase()),
    );
    if let Some(l) = &a.label {
        m.insert("label".into(), json!(l));
    }
    let targets: Vec<String> = a.target.iter().map(ToString::to_string).collect();
    m.insert("target".into(), json!(targets.join(",")));
    m.insert("tls".into(), json!(a.tls));
    m.insert("tls_resume".into(), json!(a.tls_resume));
    // Over the whole run, warm-up included.
    if let Some((handshakes, resumed)) = ctx.dialer.tls_counts() {
        m.insert("tls_handshakes".into(), json!(handshakes));
        m.insert("tls_resumed".into(), json!(resumed));
    }
    m.insert("clients".into(), json!(a.clients));
    m.insert("rate".into(), json!(a.rate));
    m.insert("pids".into(), json!(a.pid));
    m.insert("target_trees".into(), json!(a.target_tree));
    m.insert("nofile_limit".into(), json!(nofile));
    m
}

/// Runs login, fetch or latency.
async fn run_load(ctx: Arc<Ctx>, nofile: u64) -> Result<Value> {
    let pids = ctx.args.pid.clone();
    let trees = ctx.args.backend_tree.clone();
    let ttrees = ctx.args.target_tree.clone();
    let before = Sample::take(&pids, &ttrees, &trees)?;
    let mut set = JoinSet::new();
    for client in 0..ctx.args.clients {
        let ctx = ctx.clone();
        if ctx.args.scenario == Scenario::Login {
            set.spawn(login_client(ctx, client));
        } else {
            set.spawn(session_client(ctx, client));
        }
    }
    let (s1, t1, s2, t2);
    if ctx.args.count.is_some() {
        (s1, t1) = (before, ctx.measure_start);
    } else {
        tokio::time::sleep_until(ctx.measure_start).await;
        (s1, t1) = (Sample::take(&pids, &ttrees, &trees)?, Instant::now());
        tokio::time::sleep_until(ctx.measure_end).await;
    }
    let mut tally = Tally::default();
    if ctx.args.count.is_none() {
        (s2, t2) = (Sample::take(&pids, &ttrees, &trees)?, Instant::now());
        ctx.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Ok(Some(r)) = tokio::time::timeout_at(deadline, set.join_next()).await {
            if let Ok(t) = r {
                tally.add(t);
            }
        }
        set.abort_all();
    } else {
        while let Some(r) = set.join_next().await {
            if let Ok(t) = r {
                tally.add(t);
            }
        }
        (s2, t2) = (Sample::take(&pids, &ttrees, &trees)?, Instant::now());
    }

    let secs = (t2 - t1).as_secs_f64();
    let ops = tally.ops as f64;
    let mb = tally.bytes as f64 / 1e6;
    let target_cpu = opt_sub(s2.target_cpu_s, s1.target_cpu_s);
    let self_cpu = s2.self_cpu_s - s1.self_cpu_s;
    let mut m = base_json(&ctx, nofile);
    m.insert("duration_s".into(), json!(round3(secs)));
    m.insert("ops".into(), json!(tally.ops));
    m.insert("ops_per_s".into(), json!(round3(ops / secs)));
    m.insert("errors".into(), ctx.errors.to_json());
    if ctx.args.scenario == Scenario::Fetch {
        m.insert("bytes".into(), json!(tally.bytes));
        m.insert("mb_per_s".into(), json!(round3(mb / secs)));
    }
    let mut lat = serde_json::Map::new();
    for (kind, samples) in tally.lat.iter_mut().enumerate() {
        if !samples.is_empty() {
            lat.insert(KIND_NAMES[kind].into(), percentiles(samples));
        }
    }
    m.insert("latency_us".into(), Value::Object(lat));
    m.insert("target_cpu_s".into(), json!(target_cpu.map(round3)));
    m.insert(
        "target_cpu_util".into(),
        json!(target_cpu.map(|c| round3(c / secs))),
    );
    m.insert(
        "target_cpu_ms_per_op".into(),
        json!(per(target_cpu, ops, 1000.0)),
    );
    if ctx.args.scenario == Scenario::Fetch {
        m.insert(
            "target_cpu_ms_per_mb".into(),
            json!(per(target_cpu, mb, 1000.0)),
        );
    }
    let backend_cpu = opt_sub(s2.backend_cpu_s, s1.backend_cpu_s);
    m.insert("backend_cpu_s".into(), json!(backend_cpu.map(round3)));
    m.insert(
        "backend_cpu_ms_per_op".into(),
        json!(per(backend_cpu, ops, 1000.0)),
    );
    if ctx.args.scenario == Scenario::Fetch {
        m.insert(
            "backend_cpu_ms_per_mb".into(),
            json!(per(backend_cpu, mb, 1000.0)),
        );
    }
    m.insert("target_rss_kb_before".into(), json!(before.target_rss_kb));
    m.insert("target_rss_kb_after".into(), json!(s2.target_rss_kb));
    m.insert("self_cpu_s".into(), json!(round3(self_cpu)));
    m.insert("self_cpu_util".into(), json!(round3(self_cpu / secs)));
    // Machine-wide busy CPUs during the window, and the niced part (other people's builds).
    m.insert(
        "host_busy_cpus".into(),
        json!(round3((s2.host_busy_s - s1.host_busy_s) / secs)),
    );
    m.insert(
        "host_nice_cpus".into(),
        json!(round3((s2.host_nice_s - s1.host_nice_s) / secs)),
    );
    m.insert(
        "self_cpu_ms_per_op".into(),
        json!(per(Some(self_cpu), ops, 1000.0)),
    );
    if ctx.args.scenario == Scenario::Fetch {
        m.insert(
            "self_cpu_ms_per_mb".into(),
            json!(per(Some(self_cpu), mb, 1000.0)),
        );
    }
    Ok(Value::Object(m))
}

/// Idle hold: ramp up, hold in IDLE, then DONE + LOGOUT, ramped down at the rate of the ramp
/// up. Ending every session at the same instant would measure the backend's worst burst
/// (Dovecot, which hibernates idle sessions, fails to wake thousands at once and closes
/// some), not the holding.
async fn run_idle(ctx: Arc<Ctx>, nofile: u64) -> Result<Value> {
    let pids = ctx.args.pid.clone();
    let n = ctx.args.clients;
    let hold = ctx.args.duration.unwrap_or(Duration::from_secs(10));
    let before = Sample::take(&pids, &[], &[])?;
    let self_rss_before = stats::proc_rss_kb(std::process::id()).unwrap_or(0);
    let idling = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let closed_ok = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    // Connect to "+ idling", per session, in microseconds.
    let setup_us = Arc::new(std::sync::Mutex::new(Vec::with_capacity(n as usize)));
    // When the ramp down began; session i ends i / rate after it.
    let (stop_tx, stop_rx) = watch::channel(None::<Instant>);
    let gate = Arc::new(Semaphore::new(ctx.args.idle_inflight.max(1)));
    let mut set = JoinSet::new();

    let ramp_start = Instant::now();
    let rate = ctx.args.idle_ramp.max(1.0);
    for i in 0..n {
        tokio::time::sleep_until(ramp_start + Duration::from_secs_f64(f64::from(i) / rate)).await;
        let setup_us = setup_us.clone();
        let (ctx, idling, failed, closed_ok, dropped, gate) = (
            ctx.clone(),
            idling.clone(),
            failed.clone(),
            closed_ok.clone(),
            dropped.clone(),
            gate.clone(),
        );
        let mut stop = stop_rx.clone();
        set.spawn(async move {
            let mut stage = "login/select";
            let result: Result<()> = async {
                let permit = gate.acquire().await?;
                let began = Instant::now();
                let (mut c, _) = ctx.open(u64::from(i), 2048).await?;
                stage = "IDLE";
                c.send(b"I IDLE\r\n").await?;
                c.read_continuation(b"I").await?;
                drop(permit);
                if let Ok(mut v) = setup_us.lock() {
                    v.push(micros(began.elapsed()));
                }
                idling.fetch_add(1, Ordering::Relaxed);
                stage = "hold";
                let my_turn = async {
                    let began = stop.wait_for(Option::is_some).await.ok().and_then(|s| *s);
                    if let Some(began) = began {
                        let offset = Duration::from_secs_f64(f64::from(i) / rate);
                        tokio::time::sleep_until(began + offset).await;
                    }
                };
                tokio::select! {
                    () = my_turn => {}
                    r = c.watch_idle() => {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        r?;
                    }
                }
                let _permit = gate.acquire().await?;
                stage = "DONE";
                c.send(b"DONE\r\n").await?;
                c.read_tagged(b"I", |_| {}).await?;
                stage = "LOGOUT";
                c.logout().await
            }
            .await;
            match result {
                Ok(()) => {
                    closed_ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    ctx.errors.record(stage, &e);
                }
            }
        });
    }
    // Wait until every session is idling or has failed.
    let ramp_deadline = Instant::now() + Duration::from_secs(120);
    while idling.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < u64::from(n)
        && Instant::now() < ramp_deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ramp_s = (Instant::now() - ramp_start).as_secs_f64();
    let after_ramp = Sample::take(&pids, &[], &[])?;
    tokio::time::sleep(ctx.args.warmup).await;
    let hold_start = Sample::take(&pids, &[], &[])?;
    let self_rss_idle = stats::proc_rss_kb(std::process::id()).unwrap_or(0);
    let idle_now = idling.load(Ordering::Relaxed);
    tokio::time::sleep(hold).await;
    let hold_end = Sample::take(&pids, &[], &[])?;
    let idle_at_end = idling.load(Ordering::Relaxed) - dropped.load(Ordering::Relaxed);
    let ramp_down = Duration::from_secs_f64(f64::from(n) / rate);
    let _ = stop_tx.send(Some(Instant::now()));
    let deadline = Instant::now() + ramp_down + Duration::from_secs(120);
    while let Ok(Some(_)) = tokio::time::timeout_at(deadline, set.join_next()).await {}
    set.abort_all();
    let end = Sample::take(&pids, &[], &[])?;

    let sessions = idle_now as f64;
    let mut m = base_json(&ctx, nofile);
    m.insert("duration_s".into(), json!(round3(hold.as_secs_f64())));
    m.insert("sessions_requested".into(), json!(n));
    m.insert("sessions_idling".into(), json!(idle_now));
    m.insert("sessions_idling_at_hold_end".into(), json!(idle_at_end));
    m.insert(
        "sessions_closed_ok".into(),
        json!(closed_ok.load(Ordering::Relaxed)),
    );
    m.insert("ops".into(), json!(idle_now));
    m.insert("ramp_s".into(), json!(round3(ramp_s)));
    if let Ok(mut v) = setup_us.lock() {
        m.insert(
            "latency_us".into(),
            json!({ "session_setup": percentiles(&mut v) }),
        );
    }
    m.insert("errors".into(), ctx.errors.to_json());
    m.insert("target_rss_kb_before".into(), json!(before.target_rss_kb));
    m.insert("target_rss_kb_idle".into(), json!(hold_start.target_rss_kb));
    m.insert(
        "target_rss_kb_hold_end".into(),
        json!(hold_end.target_rss_kb),
    );
    m.insert("target_rss_kb_after".into(), json!(end.target_rss_kb));
    let grown = match (hold_start.target_rss_kb, before.target_rss_kb) {
        (Some(a), Some(b)) => Some(a as f64 - b as f64),
        _ => None,
    };
    m.insert(
        "rss_kb_per_session".into(),
        json!(per(grown, sessions, 1.0)),
    );
    let setup_cpu = opt_sub(after_ramp.target_cpu_s, before.target_cpu_s);
    m.insert("target_cpu_s_ramp".into(), json!(setup_cpu.map(round3)));
    m.insert(
        "target_cpu_ms_per_session_setup".into(),
        json!(per(setup_cpu, sessions, 1000.0)),
    );
    let hold_s = hold.as_secs_f64();
    m.insert(
        "host_busy_cpus_hold".into(),
        json!(round3(
            (hold_end.host_busy_s - hold_start.host_busy_s) / hold_s
        )),
    );
    m.insert(
        "host_nice_cpus_ramp".into(),
        json!(round3(
            (after_ramp.host_nice_s - before.host_nice_s) / ramp_s.max(0.001)
        )),
    );
    m.insert(
        "target_cpu_s_hold".into(),
        json!(opt_sub(hold_end.target_cpu_s, hold_start.target_cpu_s).map(round3)),
    );
    let self_setup = after_ramp.self_cpu_s - before.self_cpu_s;
    m.insert(
        "self_cpu_s".into(),
        json!(round3(end.self_cpu_s - before.self_cpu_s)),
    );
    m.insert(
        "self_cpu_ms_per_session_setup".into(),
        json!(per(Some(self_setup), sessions, 1000.0)),
    );
    m.insert(
        "self_rss_kb_per_session".into(),
        json!(per(
            Some(self_rss_idle as f64 - self_rss_before as f64),
            sessions,
            1.0
        )),
    );
    Ok(Value::Object(m))
}

fn build_ctx(args: Args) -> Result<Ctx> {
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    if args.user_count == 0 {
        bail!("--user-count must be at least 1");
    }
    if args.commands.is_empty() {
        bail!("--commands is empty");
    }
    let dialer = Dialer::new(
        args.target.clone(),
        args.src_ips,
        args.tls,
        args.ca.as_deref(),
        &args.sni,
        args.tls_resume,
        args.user_count,
    )?;
    let mut logins = Vec::with_capacity(args.user_count as usize);
    for k in 0..args.user_count {
        let n = (args.user_start + k).to_string();
        let user = args.users.replace("{n}", &n);
        let pass = match (&args.password, &args.password_pattern) {
            (Some(p), _) => p.clone(),
            (None, Some(p)) => p.replace("{n}", &n),
            (None, None) => bail!("give --password or --password-pattern"),
        };
        logins.push(format!("A LOGIN {} {}\r\n", quote(&user), quote(&pass)).into_bytes());
    }
    let select = format!("S SELECT {}\r\n", quote(&args.mailbox)).into_bytes();
    let now = Instant::now();
    let (measure_start, measure_end) = if args.count.is_some() || args.scenario == Scenario::Idle {
        (now, now + Duration::from_secs(100 * 365 * 24 * 3600))
    } else {
        let start = now + args.warmup;
        (
            start,
            start + args.duration.unwrap_or(Duration::from_secs(10)),
        )
    };
    Ok(Ctx {
        args,
        dialer,
        errors: Errors::default(),
        logins,
        select,
        stop: AtomicBool::new(false),
        measure_start,
        measure_end,
        tickets: AtomicU64::new(0),
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    for &pid in &args.pid {
        stats::proc_cpu_s(pid).with_context(|| format!("--pid {pid}"))?;
    }
    let nofile = raise_nofile(u64::from(args.clients) * 2 + 1024);
    let threads = args.threads.max(1);
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    let out = runtime.block_on(async move {
        // Built inside the runtime: the measurement window is on its clock.
        let ctx = Arc::new(build_ctx(args)?);
        if ctx.args.scenario == Scenario::Idle {
            run_idle(ctx, nofile).await
        } else {
            run_load(ctx, nofile).await
        }
    })?;
    println!("{}", serde_json::to_string(&out)?);
    // Sessions still open (a stuck server) must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}
