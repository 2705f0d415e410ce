//! Real Dovecot 2.3 backends for integration tests.
//!
//! [`Dovecot::start`] writes a self-contained configuration into a fresh
//! temporary directory (its own `base_dir`, `state_dir`, `instance_name`, log
//! file, Maildir homes and loopback ports), starts `dovecot -F -c <conf>` as a
//! child process leading its own process group, and waits for the IMAP
//! greeting. Dropping the value (or [`Dovecot::stop`]) stops that process
//! group and removes the directory, so instances can run side by side in
//! parallel tests.
//!
//! Needs `/usr/sbin/dovecot` (`apt-get install dovecot-imapd`) and root: the
//! mail processes run as the system user `imapgwtest`, made on first use.
#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::tls::TestCa;

const DOVECOT_BIN: &str = "/usr/sbin/dovecot";
const MAIL_USER: &str = "imapgwtest";
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const START_ATTEMPTS: usize = 5;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// What a test Dovecot instance offers.
#[derive(Clone, Debug)]
pub struct DovecotOptions {
    /// Hierarchy separator of the inbox namespace: `'/'` (Maildir with
    /// `LAYOUT=fs`) or `'.'` (Maildir++).
    pub separator: char,
    /// Implicit-TLS listener ([`Dovecot::tls_addr`]) and STARTTLS on the plain one.
    pub ssl: bool,
    /// `quota` + `imap_quota` plugins with `quota_rule = *:storage=1G`.
    pub quota: bool,
    /// `(name, password)` of a master user; log in as `user*name`.
    pub master_user: Option<(String, String)>,
    /// `acl` + `imap_acl` plugins and a shared namespace
    /// `Shared<sep>%%u<sep>` (Dovecot needs one separator for all listed namespaces).
    pub shared_namespace: bool,
    /// `acl` + `imap_acl` plugins and a public namespace `Public<sep>` (`type = public`,
    /// `list = yes`, subscriptions kept in each user's personal namespace) stored under
    /// [`Dovecot::public_dir`], with a global ACL file that gives `anyone` every right on
    /// `Public` and below, so every user can CREATE, SELECT, APPEND, ... there.
    pub public_namespace: bool,
    /// The `listescape` plugin: mailbox names may hold characters the Maildir layout cannot
    /// store, `/` in particular (kept as `\2f` on disk), e.g. a mailbox `a/b` on a `'.'`
    /// server, which Dovecot refuses without it ("Name must not have '/' characters").
    pub listescape: bool,
    /// `(user, password)` pairs of the passwd-file.
    pub users: Vec<(String, String)>,
    /// `login_trusted_networks = 127.0.0.0/8` (accepts `ID x-originating-ip`).
    pub trusted_networks: bool,
    /// A third listener ([`Dovecot::haproxy_addr`]) with `haproxy = yes`: every connection
    /// must start with a PROXY header, from `127.0.0.0/8` (`haproxy_trusted_networks`).
    pub haproxy: bool,
    /// Settings appended to the generated configuration (later settings win).
    pub extra_config: String,
}

impl Default for DovecotOptions {
    fn default() -> Self {
        DovecotOptions {
            separator: '/',
            ssl: false,
            quota: true,
            master_user: None,
            shared_namespace: false,
            public_namespace: false,
            listescape: false,
            users: vec![
                ("alice".into(), "alicepw".into()),
                ("bob".into(), "bobpw".into()),
                ("carol@example.org".into(), "carolpw".into()),
            ],
            trusted_networks: true,
            haproxy: false,
            extra_config: String::new(),
        }
    }
}

/// A running Dovecot instance; stopped and cleaned up on drop.
pub struct Dovecot {
    opts: DovecotOptions,
    dir: tempfile::TempDir,
    conf_path: PathBuf,
    log_path: PathBuf,
    addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    haproxy_addr: Option<SocketAddr>,
    ca_path: Option<PathBuf>,
    uid: u32,
    gid: u32,
    instance: String,
    master: Option<Child>,
}

impl Dovecot {
    /// Starts a fresh instance and waits until it greets on [`Dovecot::addr`].
    ///
    /// Panics (never skips) when Dovecot is missing or does not come up.
    pub fn start(opts: DovecotOptions) -> Dovecot {
        assert!(
            Path::new(DOVECOT_BIN).exists(),
            "{DOVECOT_BIN} not found: these tests need a real Dovecot 2.3; \
             install it with `apt-get install -y dovecot-imapd`"
        );
        assert!(
            opts.separator == '/' || opts.separator == '.',
            "DovecotOptions::separator must be '/' or '.', not {:?}",
            opts.separator
        );
        let (uid, gid) = mail_user_ids();

        let dir = tempfile::Builder::new()
            .prefix("dcv-")
            .tempdir()
            .expect("creating the Dovecot temp dir");
        let root = dir.path().to_path_buf();
        // The mail processes (uid imapgwtest) and auth (dovecot) must traverse it.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755))
            .expect("chmod Dovecot temp dir");
        for sub in ["run", "state", "mail", "public"] {
            fs::create_dir_all(root.join(sub)).expect("creating Dovecot dirs");
        }

        let ca_path = if opts.ssl {
            let ca = TestCa::new(&root);
            ca.issue(&root, "server", &["localhost", "127.0.0.1"]);
            Some(ca.ca_path)
        } else {
            None
        };

        write_passwd(&root.join("users.passwd"), &opts.users);
        if let Some((name, pass)) = &opts.master_user {
            write_passwd(&root.join("master.passwd"), &[(name.clone(), pass.clone())]);
        }
        // Written by the imap processes (the acl plugin's shared-mailboxes dict).
        fs::create_dir_all(root.join("acl")).expect("creating the acl dir");
        chown(&root.join("acl"), uid, gid);
        // The public namespace's mailboxes, written by the imap processes of every user.
        chown(&root.join("public"), uid, gid);
        if opts.public_namespace {
            let sep = opts.separator;
            fs::write(
                root.join("acl").join("global-acl"),
                format!("Public anyone lrwstipekxa\nPublic{sep}* anyone lrwstipekxa\n"),
            )
            .expect("writing the global ACL file");
        }
        for (user, _) in &opts.users {
            let home = root.join("mail").join(user);
            fs::create_dir_all(&home).expect("creating a user home");
            chown(&home, uid, gid);
        }

        let mut dovecot = Dovecot {
            conf_path: root.join("dovecot.conf"),
            log_path: root.join("dovecot.log"),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls_addr: None,
            haproxy_addr: None,
            ca_path,
            uid,
            gid,
            instance: format!(
                "imapgw-test-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ),
            master: None,
            opts,
            dir,
        };
        dovecot.launch(false);
        dovecot
    }

    /// Stops the instance and starts it again on the same ports, with the same mail, and
    /// waits for its greeting (a backend restart as clients see it).
    pub fn restart(&mut self) {
        self.stop();
        self.launch(true);
    }

    /// The plain IMAP listener (STARTTLS available when `ssl`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The implicit-TLS IMAP listener, when `ssl`.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The listener that expects a PROXY protocol header, when `haproxy`.
    pub fn haproxy_addr(&self) -> Option<SocketAddr> {
        self.haproxy_addr
    }

    /// PEM file of the CA that signed the server certificate (valid for
    /// `localhost` and `127.0.0.1`), when `ssl`.
    pub fn ca_pem_path(&self) -> Option<PathBuf> {
        self.ca_path.clone()
    }

    /// The text of the Dovecot log (all levels), empty if not yet written.
    pub fn log_contents(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The configuration file this instance runs with.
    pub fn config_path(&self) -> &Path {
        &self.conf_path
    }

    /// The options this instance was started with.
    pub fn options(&self) -> &DovecotOptions {
        &self.opts
    }

    /// A user's home directory (`<tmp>/mail/<user>`).
    pub fn home(&self, user: &str) -> PathBuf {
        self.dir.path().join("mail").join(user)
    }

    /// The root of the public namespace's mail (when `public_namespace`).
    pub fn public_dir(&self) -> PathBuf {
        self.dir.path().join("public")
    }

    /// A user's Maildir root (`<home>/Maildir`), which is also where INBOX's
    /// `cur/`, `new/` and `tmp/` live.
    pub fn maildir(&self, user: &str) -> PathBuf {
        self.home(user).join("Maildir")
    }

    /// Writes `raw` as a new Maildir message of `user` in `mailbox` (`INBOX` or
    /// an ASCII folder name using the configured separator), creating the
    /// folder if needed. Works before or after the user's first login.
    pub fn seed_message(&self, user: &str, mailbox: &str, raw: &[u8]) {
        assert!(
            mailbox.is_ascii() && !mailbox.is_empty(),
            "seed_message: mailbox name must be non-empty ASCII, got {mailbox:?}"
        );
        let home = self.home(user);
        assert!(
            home.is_dir(),
            "seed_message: unknown user {user:?} (no home {})",
            home.display()
        );
        let sep = self.opts.separator;
        let maildir = self.maildir(user);
        let mut dirs = vec![home.clone(), maildir.clone()];
        let folder = if mailbox.eq_ignore_ascii_case("INBOX") {
            maildir.clone()
        } else if sep == '.' {
            // Maildir++: every folder is a dot-directory right under the root.
            let folder = maildir.join(format!(".{mailbox}"));
            dirs.push(folder.clone());
            folder
        } else {
            // LAYOUT=fs: one directory level per hierarchy level.
            let mut folder = maildir.clone();
            for part in mailbox.split(sep) {
                assert!(
                    !part.is_empty() && part != "." && part != "..",
                    "seed_message: bad mailbox name {mailbox:?}"
                );
                folder.push(part);
                dirs.push(folder.clone());
            }
            folder
        };
        for sub in ["cur", "new", "tmp"] {
            dirs.push(folder.join(sub));
        }
        for d in &dirs {
            fs::create_dir_all(d)
                .unwrap_or_else(|e| panic!("seed_message: mkdir {}: {e}", d.display()));
            chown(d, self.uid, self.gid);
        }
        if sep == '.' && folder != maildir {
            let marker = folder.join("maildirfolder");
            if !marker.exists() {
                fs::write(&marker, b"").expect("seed_message: writing maildirfolder");
                chown(&marker, self.uid, self.gid);
            }
        }

        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}.M{}P{}Q{}.imapgwtest,S={}",
            now.as_secs(),
            now.subsec_micros(),
            std::process::id(),
            n,
            raw.len()
        );
        let tmp = folder.join("tmp").join(&name);
        fs::write(&tmp, raw)
            .unwrap_or_else(|e| panic!("seed_message: writing {}: {e}", tmp.display()));
        chown(&tmp, self.uid, self.gid);
        let dest = folder.join("new").join(&name);
        fs::rename(&tmp, &dest)
            .unwrap_or_else(|e| panic!("seed_message: moving to {}: {e}", dest.display()));
    }

    /// Stops Dovecot and waits until its master process is gone. Idempotent.
    ///
    /// Sends SIGTERM to the instance's whole process group rather than running
    /// `dovecot stop`: the master alone lingers about a second waiting for its
    /// log process (`dovecot stop` takes 2-3 s here). Log lines the children
    /// would write while shutting down may be lost.
    pub fn stop(&mut self) {
        let Some(mut child) = self.master.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        // The master was started as the leader of its own process group, which
        // all its service processes share.
        let pid = child.id();
        signal_group(pid, "-TERM");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    signal_group(pid, "-KILL");
                    let _ = child.wait();
                    return;
                }
                _ => return,
            }
        }
    }

    /// Picks ports, writes the configuration, starts `dovecot -F` (foreground,
    /// so that this process reaps it; PID 1 here is slow to reap orphaned
    /// daemons) and waits for its greeting, retrying with new ports when one
    /// was taken meanwhile.
    fn launch(&mut self, keep_ports: bool) {
        let root = self.dir.path().to_path_buf();
        let mut last_failure = String::new();
        for attempt in 1..=START_ATTEMPTS {
            if !keep_ports {
                self.addr = free_port();
                self.tls_addr = self.opts.ssl.then(free_port);
                self.haproxy_addr = self.opts.haproxy.then(free_port);
            }
            let conf = self.config_text();
            fs::write(&self.conf_path, conf).expect("writing dovecot.conf");

            let out_path = root.join(format!("start-{attempt}.out"));
            let stdout = fs::File::create(&out_path).expect("creating start output file");
            let stderr = stdout.try_clone().expect("cloning start output file");
            let child = Command::new(DOVECOT_BIN)
                .arg("-F")
                .arg("-c")
                .arg(&self.conf_path)
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr)
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("running {DOVECOT_BIN}: {e}"));
            self.master = Some(child);
            let result = self.wait_ready();
            let Err(err) = result else { return };
            self.stop();
            let output = fs::read_to_string(&out_path).unwrap_or_default();
            let log = self.log_contents();
            // stderr of this attempt only: the log file is shared by all attempts.
            // A port taken meanwhile is the usual reason; any other early exit is retried
            // as well (under a full parallel suite a start can fail for reasons of the
            // moment), and a failure that repeats ends in the panic below with each
            // attempt's output.
            if output.contains("Address already in use") || err.contains("exited early") {
                last_failure.push_str(&format!("--- attempt {attempt}: {err}\n{output}\n{log}\n"));
                continue;
            }
            panic!(
                "Dovecot (`{DOVECOT_BIN} -F -c {}`) did not become ready on {}: {err}\n\
                 --- output ---\n{output}\n--- log {} ---\n{log}",
                self.conf_path.display(),
                self.addr,
                self.log_path.display()
            );
        }
        panic!("Dovecot did not start in {START_ATTEMPTS} attempts:\n{last_failure}");
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::from("no attempt");
        while Instant::now() < deadline {
            if let Some(child) = self.master.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("dovecot exited early ({status})"));
            }
            match read_greeting(self.addr) {
                Ok(line) if line.starts_with("* OK") && line.contains(&self.instance) => {
                    return Ok(());
                }
                Ok(line) => last = format!("unexpected greeting {line:?}"),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "no `* OK` greeting within {READY_TIMEOUT:?} (last: {last})"
        ))
    }

    fn config_text(&self) -> String {
        let o = &self.opts;
        let root = self.dir.path().display().to_string();
        let sep = o.separator;
        let instance = &self.instance;
        let layout = if sep == '/' { ":LAYOUT=fs" } else { "" };
        let mut c = String::new();
        let mut line = |s: &str| {
            c.push_str(s);
            c.push('\n');
        };
        line("# Generated by tests/common/dovecot.rs");
        line(&format!("base_dir = {root}/run"));
        line(&format!("state_dir = {root}/state"));
        line(&format!("instance_name = {instance}"));
        // Unique, so readiness never mistakes another instance that grabbed
        // the port first for this one.
        line(&format!("login_greeting = Dovecot ready ({instance})"));
        line("protocols = imap");
        line("listen = 127.0.0.1");
        line("shutdown_clients = yes");
        line(&format!("log_path = {root}/dovecot.log"));
        line(&format!("info_log_path = {root}/dovecot.log"));
        line(&format!("debug_log_path = {root}/dovecot.log"));
        line("auth_verbose = yes");
        line(
            "login_log_format_elements = user=<%u> method=%m rip=%r lip=%l mpid=%e %c \
             session=<%{session}>",
        );
        line("default_internal_user = dovecot");
        line("default_login_user = dovenull");
        line("first_valid_uid = 1");
        line("first_valid_gid = 1");
        line(&format!("mail_uid = {}", self.uid));
        line(&format!("mail_gid = {}", self.gid));
        line(&format!("mail_location = maildir:~/Maildir{layout}"));
        line("mail_fsync = never");
        line("disable_plaintext_auth = no");
        line("auth_mechanisms = plain login");
        // Answer failed logins at once instead of after the default 2 s.
        line("auth_failure_delay = 0");
        if o.trusted_networks {
            line("login_trusted_networks = 127.0.0.0/8");
        }
        if o.haproxy {
            line("haproxy_trusted_networks = 127.0.0.0/8");
        }
        if o.ssl {
            line("ssl = yes");
            line(&format!("ssl_cert = <{root}/server.pem"));
            line(&format!("ssl_key = <{root}/server-key.pem"));
        } else {
            line("ssl = no");
        }

        let mut plugins = Vec::new();
        let mut imap_plugins = Vec::new();
        if o.quota {
            plugins.push("quota");
            imap_plugins.push("imap_quota");
        }
        if o.shared_namespace || o.public_namespace {
            plugins.push("acl");
            imap_plugins.push("imap_acl");
        }
        if o.listescape {
            plugins.push("listescape");
        }
        line(&format!(
            "mail_plugins = $mail_plugins {}",
            plugins.join(" ")
        ));

        if o.master_user.is_some() {
            line("auth_master_user_separator = *");
            line("passdb {");
            line("  driver = passwd-file");
            line("  master = yes");
            line("  pass = yes");
            line(&format!(
                "  args = scheme=PLAIN username_format=%u {root}/master.passwd"
            ));
            line("}");
        }
        line("passdb {");
        line("  driver = passwd-file");
        line(&format!(
            "  args = scheme=PLAIN username_format=%u {root}/users.passwd"
        ));
        line("}");
        line("userdb {");
        line("  driver = static");
        // uid/gid in the reply let imap processes (running as that uid) look
        // up other users, which the shared namespace needs.
        line(&format!(
            "  args = uid={} gid={} home={root}/mail/%u",
            self.uid, self.gid
        ));
        line("}");

        line("namespace inbox {");
        line("  inbox = yes");
        line(&format!("  separator = {sep}"));
        line("  prefix =");
        line("}");
        if o.shared_namespace {
            line("namespace shared {");
            line("  type = shared");
            line(&format!("  separator = {sep}"));
            line(&format!("  prefix = Shared{sep}%%u{sep}"));
            line(&format!(
                "  location = maildir:%%h/Maildir{layout}:INDEXPVT=~/Maildir/shared/%%u"
            ));
            line("  subscriptions = no");
            line("  list = children");
            line("}");
        }
        if o.public_namespace {
            line("namespace public {");
            line("  type = public");
            line(&format!("  separator = {sep}"));
            line(&format!("  prefix = Public{sep}"));
            line(&format!("  location = maildir:{root}/public{layout}"));
            // Subscriptions go to the user's own (inbox) namespace, not a file all share.
            line("  subscriptions = no");
            line("  list = yes");
            line("}");
        }

        line("plugin {");
        if o.quota {
            line("  quota = count:User quota");
            line("  quota_vsizes = yes");
            line("  quota_rule = *:storage=1G");
        }
        if o.public_namespace {
            // A global ACL file (per-mailbox `dovecot-acl` files still apply on top).
            line(&format!("  acl = vfile:{root}/acl/global-acl"));
        } else if o.shared_namespace {
            line("  acl = vfile");
        }
        if o.shared_namespace {
            line(&format!(
                "  acl_shared_dict = file:{root}/acl/shared-mailboxes.db"
            ));
        }
        if o.shared_namespace || o.public_namespace {
            line("  acl_user = %u");
        }
        line("}");

        line("protocol imap {");
        line(&format!(
            "  mail_plugins = $mail_plugins {}",
            imap_plugins.join(" ")
        ));
        line("  mail_max_userip_connections = 1000");
        line("}");

        line("service imap-login {");
        line("  inet_listener imap {");
        line("    address = 127.0.0.1");
        line(&format!("    port = {}", self.addr.port()));
        line("  }");
        line("  inet_listener imaps {");
        line("    address = 127.0.0.1");
        match self.tls_addr {
            Some(a) => {
                line(&format!("    port = {}", a.port()));
                line("    ssl = yes");
            }
            None => line("    port = 0"),
        }
        line("  }");
        if let Some(a) = self.haproxy_addr {
            line("  inet_listener imap_haproxy {");
            line("    address = 127.0.0.1");
            line(&format!("    port = {}", a.port()));
            line("    haproxy = yes");
            line("  }");
        }
        line("  service_count = 0");
        line("  process_min_avail = 1");
        line("}");
        line("service imap {");
        line("  service_count = 1000");
        line("}");
        // Above imap + imap-login + imap-urlauth-login process limits (1224),
        // else the master warns at every start.
        line("service auth {");
        line("  client_limit = 2048");
        line("}");
        if !o.extra_config.is_empty() {
            line("# extra_config");
            line(&o.extra_config);
        }
        c
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
    }
}

/// uid/gid of the mail user, creating the system user on first use.
fn mail_user_ids() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        if lookup_ids(MAIL_USER).is_none() {
            let out = Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--user-group",
                    MAIL_USER,
                ])
                .output();
            // Another test process may have created it meanwhile: look again.
            if lookup_ids(MAIL_USER).is_none() {
                panic!(
                    "could not create the system user {MAIL_USER} for Dovecot's mail \
                     processes (these tests must run as root): {out:?}"
                );
            }
        }
        lookup_ids(MAIL_USER).expect("mail user lookup")
    })
}

fn lookup_ids(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, user]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e} (tests must run as root)", path.display()));
}

fn write_passwd(path: &Path, entries: &[(String, String)]) {
    let mut text = String::new();
    for (user, pass) in entries {
        assert!(
            !user.contains([':', '\n']) && !pass.contains([':', '\n']),
            "passwd-file entries cannot contain ':' or newlines: {user:?}"
        );
        text.push_str(&format!("{user}:{{PLAIN}}{pass}\n"));
    }
    fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// A loopback address whose port was free a moment ago.
pub fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    listener.local_addr().expect("local_addr")
}

fn read_greeting(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before greeting",
            ));
        }
        buf.push(byte[0]);
    }
    let _ = stream.write_all(b"x LOGOUT\r\n");
    Ok(String::from_utf8_lossy(&buf).trim_end().to_string())
}

/// Sends `signal` (e.g. `-TERM`) to process group `pgid`, and to `pgid` itself.
fn signal_group(pgid: u32, signal: &str) {
    for target in [format!("-{pgid}"), pgid.to_string()] {
        let _ = Command::new("kill")
            .args([signal, "--", &target])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Waits until Dovecot's log satisfies `pred` (its log process writes asynchronously) and
/// returns the log; fails the test after a bound.
pub async fn wait_for_log(dovecot: &Dovecot, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = dovecot.log_contents();
        if pred(&log) {
            return log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Dovecot log never showed {what}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `Login:` lines of the Dovecot log for `user`.
pub fn login_lines(log: &str, user: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(&format!(" Login: user=<{user}>,")))
        .map(str::to_owned)
        .collect()
}
