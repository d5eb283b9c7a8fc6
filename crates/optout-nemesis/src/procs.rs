//! The real processes of a run: redis-server nodes and `optout serve` replicas, each on its own
//! loopback port and directory, started, killed, stopped and continued by PID.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::NemesisError;

/// A loopback port nobody listens on now.
pub fn free_port() -> Result<u16, NemesisError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A port whose cluster bus port (port + 10000) is free too.
pub fn free_cluster_port() -> Result<u16, NemesisError> {
    loop {
        let p = free_port()?;
        if p < 55_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return Ok(p);
        }
    }
}

fn signal(child: &Child, sig: i32) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on a PID this process spawned and has not reaped; no memory involved.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// What programs a run uses.
#[derive(Clone, Debug)]
pub struct Programs {
    /// The `optout` binary under test.
    pub optout: PathBuf,
    /// `redis-server`.
    pub redis_server: String,
    /// `redis-cli` (to create a cluster).
    pub redis_cli: String,
}

impl Programs {
    /// `optout` at `optout`; redis-server and redis-cli from `OPTOUT_TEST_REDIS_SERVER` and
    /// `OPTOUT_TEST_REDIS_CLI`, else the PATH.
    pub fn new(optout: PathBuf) -> Programs {
        Programs {
            optout,
            redis_server: std::env::var("OPTOUT_TEST_REDIS_SERVER")
                .unwrap_or_else(|_| "redis-server".into()),
            redis_cli: std::env::var("OPTOUT_TEST_REDIS_CLI")
                .unwrap_or_else(|_| "redis-cli".into()),
        }
    }
}

/// A redis-server (or sentinel) process.
pub struct RedisNode {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    program: String,
    args: Vec<String>,
    sentinel_conf: Option<PathBuf>,
    child: Option<Child>,
}

impl RedisNode {
    /// A data node in `dir` with append-only persistence fsynced before every reply, so a kill
    /// loses nothing acknowledged.
    pub fn start(
        programs: &Programs,
        port: u16,
        dir: PathBuf,
        extra: &[&str],
    ) -> Result<RedisNode, NemesisError> {
        std::fs::create_dir_all(&dir)?;
        let mut args: Vec<String> = [
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--repl-diskless-sync-delay",
            "0",
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut node = RedisNode {
            port,
            dir,
            program: programs.redis_server.clone(),
            args,
            sentinel_conf: None,
            child: None,
        };
        node.spawn()?;
        Ok(node)
    }

    /// A sentinel watching `master_port` as `name` (quorum 2, down after 1 s).
    pub fn sentinel(
        programs: &Programs,
        dir: PathBuf,
        master_port: u16,
        name: &str,
    ) -> Result<RedisNode, NemesisError> {
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "sentinel monitor {name} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {name} 1000\n\
                 sentinel failover-timeout {name} 4000\n\
                 sentinel parallel-syncs {name} 1\n"
            ),
        )?;
        let mut node = RedisNode {
            port: free_port()?,
            dir,
            program: programs.redis_server.clone(),
            args: Vec::new(),
            sentinel_conf: Some(conf),
            child: None,
        };
        node.spawn()?;
        Ok(node)
    }

    fn spawn(&mut self) -> Result<(), NemesisError> {
        let mut command = Command::new(&self.program);
        if let Some(conf) = &self.sentinel_conf {
            command.arg(conf).arg("--sentinel");
        }
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--logfile", "redis.log"])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn().map_err(|e| {
            NemesisError::Setup(format!(
                "cannot start {}: {e} (install redis-server, or run `bash scripts/test.sh`, which \
                 does)",
                self.program
            ))
        })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if ping(self.port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(NemesisError::Setup(format!(
                    "redis on port {} did not answer PING within 20 s (see {})",
                    self.port,
                    self.dir.join("redis.log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process runs.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port and directory (after [`RedisNode::kill`]).
    pub fn restart(&mut self) -> Result<(), NemesisError> {
        self.kill();
        self.spawn()
    }

    /// SIGSTOP: the process stops answering, its connections stay open.
    pub fn pause(&self) {
        if let Some(c) = &self.child {
            signal(c, libc::SIGSTOP);
        }
    }

    /// SIGCONT.
    pub fn resume(&self) {
        if let Some(c) = &self.child {
            signal(c, libc::SIGCONT);
        }
    }

    /// Copies the append-only files as they are now (what a backup taken now would hold).
    pub fn copy_data(&self, to: &Path) -> Result<(), NemesisError> {
        let from = self.dir.join("appendonlydir");
        if to.exists() {
            std::fs::remove_dir_all(to)?;
        }
        copy_dir(&from, to)
    }

    /// Kills the node, puts `from` back as its append-only files and starts it again: a restore
    /// from an older copy.
    pub fn restore_data(&mut self, from: &Path) -> Result<(), NemesisError> {
        self.kill();
        let to = self.dir.join("appendonlydir");
        if to.exists() {
            std::fs::remove_dir_all(&to)?;
        }
        copy_dir(from, &to)?;
        self.spawn()
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A connection with short timeouts.
    pub async fn connection(&self) -> Result<redis::aio::MultiplexedConnection, NemesisError> {
        let client = redis::Client::open(self.url())?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        Ok(client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }
}

impl Drop for RedisNode {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            signal(c, libc::SIGCONT);
        }
        self.kill();
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), NemesisError> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 64];
    s.write_all(b"PING\r\n").is_ok()
        && s.read(&mut buf)
            .is_ok_and(|n| buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-LOADING"))
}

/// An `optout serve` process: a replica of the service.
pub struct Replica {
    /// Its index in the run.
    pub index: usize,
    /// Its gRPC port on 127.0.0.1.
    pub port: u16,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// Bumped before each start: which process answered is told by it.
    incarnation: Arc<AtomicU64>,
}

impl Replica {
    /// Starts `optout serve` with `args` (the store's flags and the run's settings) on a free port.
    pub fn start(
        programs: &Programs,
        index: usize,
        dir: &Path,
        args: Vec<String>,
    ) -> Result<Replica, NemesisError> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let mut r = Replica {
            index,
            port,
            program: programs.optout.clone(),
            args: [
                "serve".to_string(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--data-dir".into(),
                dir.join("data").display().to_string(),
            ]
            .into_iter()
            .chain(args)
            .collect(),
            log: dir.join("serve.log"),
            child: None,
            incarnation: Arc::new(AtomicU64::new(0)),
        };
        r.spawn()?;
        Ok(r)
    }

    fn spawn(&mut self) -> Result<(), NemesisError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        self.incarnation.fetch_add(1, Ordering::SeqCst);
        let child = Command::new(&self.program)
            .args(&self.args)
            .env("OPTOUT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                NemesisError::Setup(format!("cannot start {}: {e}", self.program.display()))
            })?;
        self.child = Some(child);
        Ok(())
    }

    /// The incarnation counter, shared with the clients.
    pub fn incarnation(&self) -> Arc<AtomicU64> {
        self.incarnation.clone()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Where its log goes.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Whether the process runs.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(c) = &self.child {
            signal(c, libc::SIGCONT);
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port and directory: a new incarnation, knowing nothing of the
    /// last one's memory.
    pub fn restart(&mut self) -> Result<(), NemesisError> {
        self.kill();
        self.spawn()
    }

    /// SIGSTOP.
    pub fn pause(&self) {
        if let Some(c) = &self.child {
            signal(c, libc::SIGSTOP);
        }
    }

    /// SIGCONT.
    pub fn resume(&self) {
        if let Some(c) = &self.child {
            signal(c, libc::SIGCONT);
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `optout ARGS` to its end; its stdout, or an error with its stderr.
pub fn run_optout(programs: &Programs, args: &[String]) -> Result<String, NemesisError> {
    let out = Command::new(&programs.optout)
        .args(args)
        .env("OPTOUT_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            NemesisError::Setup(format!("cannot run {}: {e}", programs.optout.display()))
        })?;
    if !out.status.success() {
        return Err(NemesisError::Setup(format!(
            "optout {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
