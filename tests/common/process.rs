//! Runs the gateway binary as its own process (for signals, exit codes, logs and memory read
//! from /proc), on a free loopback port, with its output captured in a file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::dovecot::free_port;
use super::imap::WAIT;

pub struct GatewayProcess {
    child: Child,
    /// The plain listener (plaintext auth allowed, as on loopback).
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    /// stdout and stderr of the process.
    pub log: PathBuf,
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl GatewayProcess {
    /// Starts `imap-gateway run` with `routing` as its table and `extra` appended to its
    /// configuration (tables such as `[log]` or `[timeouts]`; not `[admin]`, which is set to
    /// a free port here), and waits until the listener accepts.
    pub async fn start(routing: &str, extra: &str) -> GatewayProcess {
        Self::start_with(routing, extra, |_| {}).await
    }

    /// As [`GatewayProcess::start`], with `prepare` run on the configuration's directory
    /// first (to put certificates there, say).
    pub async fn start_with(
        routing: &str,
        extra: &str,
        prepare: impl FnOnce(&std::path::Path),
    ) -> GatewayProcess {
        Self::start_with_env(routing, extra, &[], prepare).await
    }

    /// As [`GatewayProcess::start_with`], with `env` added to the process's environment
    /// (`RUST_LOG`, or `IMAP_GATEWAY_ADMIN__TOKEN` since `[admin]` is taken).
    pub async fn start_with_env(
        routing: &str,
        extra: &str,
        env: &[(&str, &str)],
        prepare: impl FnOnce(&std::path::Path),
    ) -> GatewayProcess {
        let dir = tempfile::tempdir().unwrap();
        prepare(dir.path());
        let port = free_port().port();
        std::fs::write(dir.path().join("routing.toml"), routing).unwrap();
        let config = dir.path().join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                "routing_table = \"routing.toml\"\n\
                 [admin]\naddress = \"127.0.0.1:0\"\n\
                 [[listeners]]\nname = \"plain\"\naddress = \"127.0.0.1:{port}\"\n\
                 allow_plaintext_auth = true\n{extra}\n"
            ),
        )
        .unwrap();
        let log = dir.path().join("gateway.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_imap-gateway"))
            .args(["run", "--config"])
            .arg(&config)
            .envs(env.iter().copied())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap();
        let gw = GatewayProcess {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            dir,
            log,
        };
        let deadline = std::time::Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(gw.addr).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "gateway did not start: {}",
                gw.log_contents()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        gw
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `HUP`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} failed");
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits (bounded) for the process to exit.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "gateway did not exit: {}",
                self.log_contents()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_contents(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
