//! A real agent process for the real-kernel tier: its own state directory on
//! the guest's tmpfs, its own device-mapper prefix (so tests run side by
//! side), and a gRPC client over its Unix socket.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use dmclone::{
    api::proto::v1::{node_client::NodeClient, volumes_client::VolumesClient},
    client::connect_unix,
    dm::kernel::DeviceMapper,
};
use tempfile::TempDir;
use tonic::transport::Channel;

use crate::support::remove_all_with_prefix;

/// The agent binary cargo built beside this test binary.
pub fn agent_binary() -> PathBuf {
    if let Ok(path) = std::env::var("DMCLONE_AGENT_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/kernel-<hash> -> target/<profile>/dmclone-agent
    let binary = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .join("dmclone-agent");
    assert!(
        binary.exists(),
        "{} is missing: build it with `cargo build --workspace --bins` (tests/run-all does)",
        binary.display()
    );
    binary
}

/// One running agent. Dropping it kills the process; `destroy` also removes
/// its devices.
pub struct AgentProcess {
    pub prefix: String,
    dir: PathBuf,
    _temp: Option<TempDir>,
    child: Option<Child>,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
}

impl AgentProcess {
    /// Starts an agent on a fresh state directory with a 1 GiB pool file.
    pub async fn start(prefix: &str) -> Self {
        Self::start_with(prefix, &["--pool-file-size", "1G"], &[]).await
    }

    pub async fn start_with(prefix: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let dm = crate::support::kernel();
        remove_all_with_prefix(&dm, prefix).await;
        let temp = tempfile::tempdir().expect("state dir");
        let mut agent = Self {
            prefix: prefix.to_owned(),
            dir: temp.path().to_owned(),
            _temp: Some(temp),
            child: None,
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        agent.spawn();
        agent.wait_ready().await;
        agent
    }

    /// An agent on a given state directory (e.g. a disk that survives a
    /// reboot); nothing is removed first.
    pub async fn start_in(dir: &Path, prefix: &str, args: &[&str]) -> Self {
        fs::create_dir_all(dir).expect("state dir");
        let mut agent = Self {
            prefix: prefix.to_owned(),
            dir: dir.to_owned(),
            _temp: None,
            child: None,
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
        };
        agent.spawn();
        agent.wait_ready().await;
        agent
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    /// The socket `--socket` names, or the one in the state directory.
    pub fn socket(&self) -> PathBuf {
        self.extra_args
            .iter()
            .position(|arg| arg == "--socket")
            .and_then(|at| self.extra_args.get(at + 1))
            .map_or_else(|| self.dir.join("agent.sock"), PathBuf::from)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Arms a failpoint for the next start (`None` disarms).
    pub fn set_failpoint(&mut self, point: Option<&str>) {
        self.env.retain(|(k, _)| k != "DMCLONE_FAILPOINT");
        if let Some(point) = point {
            self.env.push(("DMCLONE_FAILPOINT".into(), point.into()));
        }
    }

    #[allow(clippy::disallowed_types)] // the agent under test is a process
    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("agent log");
        let mut command = std::process::Command::new(agent_binary());
        // An empty config: an agent installed on this host must not lend its
        // /etc/dmclone/agent.toml (its pool device!) to a test.
        command
            .args(["--config", "/dev/null"])
            .arg("--state-dir")
            .arg(&self.dir)
            .arg("--dm-prefix")
            .arg(&self.prefix)
            .args(&self.extra_args)
            .env("RUST_LOG", "dmclone=debug,info")
            .env_remove("DMCLONE_FAILPOINT")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        self.child = Some(command.spawn().expect("start dmclone-agent"));
    }

    /// Waits until the agent answers on its socket (it binds only after
    /// reconciling), failing with its log if it exits first.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("wait"))
            {
                panic!(
                    "dmclone-agent exited with {status} before serving; its log:\n{}",
                    self.log()
                );
            }
            if self.socket().exists()
                && let Ok(channel) = connect_unix(&self.socket()).await
                && NodeClient::new(channel)
                    .get_node_info(dmclone::api::proto::v1::GetNodeInfoRequest {})
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "dmclone-agent did not come up in 120 s; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the process to end on its own (e.g. at a failpoint) and
    /// returns its exit status.
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent running");
        tokio::task::spawn_blocking(move || child.wait().expect("wait for agent"))
            .await
            .expect("wait task")
    }

    /// `kill -9`, as a crash.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
    }

    /// Restarts the agent with `point` armed, runs `call`, which must kill
    /// it there, then restarts it disarmed.
    pub async fn crash_inside(&mut self, point: &str, call: impl AsyncFnOnce(&AgentProcess)) {
        self.arm(point).await;
        call(self).await;
        self.dies_at(point).await;
    }

    /// Restarts the agent with `point` armed.
    pub async fn arm(&mut self, point: &str) {
        self.kill9().await;
        self.set_failpoint(Some(point));
        self.restart().await;
    }

    /// Waits until the agent, armed at `point`, died there; restarts it
    /// disarmed.
    pub async fn dies_at(&mut self, point: &str) {
        use std::os::unix::process::ExitStatusExt;
        let status = self.wait_exit().await;
        assert_eq!(
            status.signal(),
            Some(9),
            "{point}: the agent should have died at the failpoint ({status})\n{}",
            self.log()
        );
        self.set_failpoint(None);
        self.restart().await;
    }

    /// SIGTERM and wait: a clean stop.
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        let child = self.child.as_ref().expect("agent running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        self.wait_exit().await
    }

    /// Starts the agent again on the same state directory.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the agent first");
        self.spawn();
        self.wait_ready().await;
    }

    pub async fn channel(&self) -> Channel {
        connect_unix(&self.socket())
            .await
            .expect("connect to the agent")
    }

    pub async fn volumes(&self) -> VolumesClient<Channel> {
        VolumesClient::new(self.channel().await)
    }

    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }

    /// Kills the agent and removes its devices (the pool's loop device then
    /// detaches by itself).
    pub async fn destroy(mut self) {
        self.kill9().await;
        let dm: DeviceMapper = crate::support::kernel();
        remove_all_with_prefix(&dm, &self.prefix).await;
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            // A panic's backtrace would push its message out of the tail.
            let log = match log.find("panicked at") {
                Some(at) => log[at..].lines().take(12).collect::<Vec<_>>().join("\n"),
                None => log,
            };
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- last lines of {} ({} agent):\n{}",
                self.log_path().display(),
                self.prefix,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
