//! End-to-end test harness: runs the real `drover` and `drover-worker` binaries on loopback.
//!
//! What it owns:
//! - [`bin_dir`] / [`bin`]: where the binaries are (`DROVER_BIN_DIR`, else
//!   `<workspace>/target/debug`); it never builds them — run `cargo build --workspace` first.
//! - [`TestFleet`]: one temporary directory holding a fleet CA, a coordinator certificate, an
//!   operator certificate and one certificate per worker, the configs that use them, and a free
//!   UDP port on 127.0.0.1. It starts, signals and restarts the coordinator (same port, same
//!   state directory) and the workers, captures their stderr to log files in the temporary
//!   directory, and runs the real CLI against them ([`TestFleet::cli`], [`TestFleet::cli_json`]).
//! - [`RawConn`]: a hand-made QUIC client for what the real binaries refuse to do (no client
//!   certificate, a certificate from another CA, an expired one, the wrong role, a future
//!   protocol version, malformed frames). Its TLS config is built here, not with
//!   `drover::pki::client_config`, because that one checks the own certificate first.
//! - [`wait_for`] / [`TestFleet::wait_for`]: bounded polling.
//! - [`host::HostCgroup`]: a simulated worker host (a memory cgroup of the test's own) for the
//!   fault-injection suite; [`checker`]: its independent checker of the database.
//!
//! Rules the tests follow (and the harness makes easy):
//! - correctness never depends on a fixed sleep: every "eventually" is a [`wait_for`] with a
//!   generous deadline ([`DEADLINE`]); a short sleep appears only where a test checks that
//!   something does *not* happen;
//! - no test asserts a duration;
//! - every child process is killed when its owner drops (also when the test panics), so a
//!   failing test leaves nothing running;
//! - each fleet has its own directory and port, so tests run in parallel threads.
//!
//! Set `DROVER_E2E_KEEP=1` to keep each fleet's directory (configs, certificates, logs) after
//! the test, for debugging.

pub mod checker;
pub mod host;
pub mod session;
pub mod upstream;

pub use session::{
    check_session, events, kinds, of_kind, output, root_or_skip, root_or_skip_because, submit,
    task, wait_state, write_spec,
};

use drover::pki::{self, CertPaths, CertRequest, Validity};
use drover::wire::FramedRecv;
use drover_protocol::{
    close_code, encode_frame, FleetSummary, Hello, HelloReply, Role, WorkerInfo, WorkerState,
    MAX_FRAME_LEN, SUPPORTED_VERSIONS,
};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Deadline for anything that should happen "soon" (a registration, a state change). Generous
/// on purpose: the machine may be busy compiling; a healthy run takes a fraction of it.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// How often [`wait_for`] polls.
pub const POLL: Duration = Duration::from_millis(100);

/// Heartbeat interval the test coordinator asks for, in milliseconds.
pub const HEARTBEAT_MS: u64 = 200;

/// Lease of the test coordinator, in milliseconds.
pub const LEASE_MS: u64 = 1500;

/// Environment variables that would change what a child does if inherited from the shell
/// running the tests (a developer's `DROVER_CONFIG`, a journald stream, a log filter).
const SCRUBBED_ENV: &[&str] = &[
    "DROVER_ADDR",
    "DROVER_CONFIG",
    "DROVER_CA",
    "DROVER_CERT",
    "DROVER_KEY",
    "DROVER_LOG",
    "RUST_LOG",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
    "XDG_CONFIG_HOME",
];

/// Directory holding the `drover` and `drover-worker` binaries: `DROVER_BIN_DIR`, else
/// `<workspace>/target/debug`. Panics if they are missing.
pub fn bin_dir() -> PathBuf {
    let dir = std::env::var_os("DROVER_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
                .join("debug")
        });
    for name in ["drover", "drover-worker"] {
        assert!(
            dir.join(name).is_file(),
            "{} not found: run `cargo build --workspace` first (or set DROVER_BIN_DIR)",
            dir.join(name).display()
        );
    }
    dir
}

/// Path of one of the binaries (`drover` or `drover-worker`).
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// A [`Command`] for `bin` with a scrubbed environment and `HOME` pointing at `home`, so no
/// user or system CLI config is picked up.
pub fn command(bin: &Path, home: &Path) -> Command {
    let mut cmd = Command::new(bin);
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    cmd.env("HOME", home).stdin(Stdio::null());
    cmd
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
///
/// Picked below the kernel's ephemeral range when there is room: a port taken from that range
/// could be handed to some other socket bound to port 0 (a worker, a CLI run) while the
/// coordinator is down between a kill and its restart. Successive calls in one process return
/// different ports, starting from a random offset.
pub fn free_udp_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    const FLOOR: u32 = 10_000;
    static START: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > FLOOR + 1_000 {
        let span = ephemeral_low - FLOOR;
        let start = *START.get_or_init(|| rand::random::<u32>() % span);
        for _ in 0..span {
            let i = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = FLOOR + (start + i) % span;
            let port = u16::try_from(port).expect("port below the ephemeral range");
            if udp_port_is_free(port) {
                return port;
            }
        }
    }
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind an ephemeral UDP port");
    sock.local_addr().expect("local address").port()
}

/// Whether UDP `port` on 127.0.0.1 can be bound right now.
pub fn udp_port_is_free(port: u16) -> bool {
    UdpSocket::bind(("127.0.0.1", port)).is_ok()
}

/// Whether a process with this pid exists (`kill(pid, 0)` succeeds).
pub fn pid_exists(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Poll `check` every [`POLL`] until it returns `Ok`, for at most `deadline`.
///
/// `Err(observed)` means "not yet"; on timeout the panic message names `what`, the last
/// observed value and whatever `context` returns (e.g. the tail of a log).
pub fn wait_for_with<T, O: Debug>(
    deadline: Duration,
    what: &str,
    context: impl Fn() -> String,
    mut check: impl FnMut() -> Result<T, O>,
) -> T {
    let start = Instant::now();
    loop {
        let last = match check() {
            Ok(v) => return v,
            Err(o) => o,
        };
        if start.elapsed() >= deadline {
            panic!(
                "timed out after {deadline:?} waiting for {what}\nlast observed: {last:#?}\n{}",
                context()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// [`wait_for_with`] without extra context.
pub fn wait_for<T, O: Debug>(
    deadline: Duration,
    what: &str,
    check: impl FnMut() -> Result<T, O>,
) -> T {
    wait_for_with(deadline, what, String::new, check)
}

/// Wait (bounded) for a child to exit; `None` if it is still running at the deadline.
pub fn wait_exit(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if start.elapsed() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Longest any single CLI or short-lived binary run may take before the test fails.
pub const RUN_DEADLINE: Duration = Duration::from_secs(60);

/// Run `cmd` to completion with stdout and stderr captured, for at most `deadline`; panics
/// (after killing it) if it is still running then.
pub fn run_bounded(cmd: &mut Command, deadline: Duration) -> Output {
    use std::io::Read as _;
    let mut guard = Guard::spawn(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()));
    let mut out_pipe = guard.child.stdout.take().expect("piped stdout");
    let mut err_pipe = guard.child.stderr.take().expect("piped stderr");
    // Drain both pipes while waiting, so a chatty child can never block on a full pipe.
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    let Some(status) = wait_exit(&mut guard.child, deadline) else {
        drop(guard);
        panic!("{cmd:?} did not finish within {deadline:?}");
    };
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// Send `signal` to a child (ignoring a child that is already gone).
pub fn signal(child: &Child, signal: Signal) {
    let _ = kill(Pid::from_raw(child.id() as i32), signal);
}

/// A child process killed (SIGKILL to its process group) and reaped on drop.
#[derive(Debug)]
pub struct Guard {
    pub child: Child,
}

impl Guard {
    /// Spawn `cmd` in a new process group, so drop can kill whatever it started too.
    ///
    /// The child also gets SIGKILL when the spawning thread ends (`PR_SET_PDEATHSIG`), so even
    /// a test process that aborts (and runs no destructors) leaves no daemon behind. Spawn
    /// from the test's own thread, never from a short-lived helper thread.
    pub fn spawn(cmd: &mut Command) -> Self {
        #[allow(unsafe_code)]
        // SAFETY: the closure runs between fork and exec; it makes one async-signal-safe
        // syscall (prctl) and neither allocates nor takes locks.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        Self { child }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.pid()), Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Options for a [`TestFleet`].
#[derive(Debug, Clone)]
pub struct FleetBuilder {
    workers: Vec<(String, Vec<String>)>,
    heartbeat_interval_ms: u64,
    lease_ms: u64,
    /// Where the fleet's directory is made; default the system's temporary directory.
    parent: Option<PathBuf>,
}

impl FleetBuilder {
    /// Add a worker named `name` (its certificate CN) advertising `labels`.
    pub fn worker(mut self, name: &str, labels: &[&str]) -> Self {
        self.workers.push((
            name.to_owned(),
            labels.iter().map(|l| (*l).to_owned()).collect(),
        ));
        self
    }

    /// Add `n` workers named `w1`..`wn` with the label `test`.
    pub fn workers(mut self, n: usize) -> Self {
        for i in 1..=n {
            self = self.worker(&format!("w{i}"), &["test"]);
        }
        self
    }

    pub fn lease_ms(mut self, ms: u64) -> Self {
        self.lease_ms = ms;
        self
    }

    pub fn heartbeat_interval_ms(mut self, ms: u64) -> Self {
        self.heartbeat_interval_ms = ms;
        self
    }

    /// Create the directory, PKI and configs. Starts nothing.
    pub fn build(self) -> TestFleet {
        let mut dir = tempfile::Builder::new();
        dir.prefix("drover-e2e-");
        let dir = match &self.parent {
            Some(parent) => dir.tempdir_in(parent),
            None => dir.tempdir(),
        }
        .expect("create a temp dir");
        let root = dir.path().to_path_buf();
        let tls = root.join("tls");
        pki::create_ca(&tls, "e2e").expect("create the fleet CA");
        let issue = |role, name: &str| {
            let req = CertRequest {
                role,
                name: name.to_owned(),
                validity: Validity::Days(1),
                extra_sans: vec![],
            };
            pki::issue_cert(&tls, &tls, &req, false)
                .unwrap_or_else(|e| panic!("issue {role} certificate {name}: {e}"))
        };
        issue(Role::Coordinator, "coordinator");
        issue(Role::Operator, "operator");
        let port = free_udp_port();
        let fleet = TestFleet {
            root,
            port,
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            lease_ms: self.lease_ms,
            worker_names: self.workers.iter().map(|(n, _)| n.clone()).collect(),
            coordinator: None,
            workers: BTreeMap::new(),
            dir: Some(dir),
        };
        std::fs::write(fleet.coordinator_config(), fleet.coordinator_toml())
            .expect("write coordinator.toml");
        for (name, labels) in &self.workers {
            issue(Role::Worker, name);
            std::fs::write(fleet.worker_config(name), fleet.worker_toml(name, labels))
                .expect("write worker config");
        }
        fleet
    }
}

/// A coordinator and its workers as real processes in one temporary directory.
///
/// Layout of [`TestFleet::dir`]: `tls/` (CA and `<name>.crt`/`.key` for `coordinator`,
/// `operator` and every worker), `coordinator.toml`, `<worker>.toml`, `state/` (the registry),
/// `work/<worker>/`, and `logs/` (`coordinator.log`, `<worker>.log`; appended across
/// restarts).
#[derive(Debug)]
pub struct TestFleet {
    root: PathBuf,
    /// The coordinator's UDP port on 127.0.0.1 (kept across restarts).
    pub port: u16,
    pub heartbeat_interval_ms: u64,
    pub lease_ms: u64,
    /// Names of the configured workers, in the order they were added.
    pub worker_names: Vec<String>,
    coordinator: Option<Guard>,
    workers: BTreeMap<String, Guard>,
    // Last: removed after the processes are killed (kept if `DROVER_E2E_KEEP` is set).
    dir: Option<tempfile::TempDir>,
}

impl TestFleet {
    pub fn builder() -> FleetBuilder {
        FleetBuilder {
            workers: Vec::new(),
            heartbeat_interval_ms: HEARTBEAT_MS,
            lease_ms: LEASE_MS,
            parent: None,
        }
    }

    /// A fleet of `n` workers (`w1`..`wn`, label `test`), built but not started.
    pub fn new(n: usize) -> Self {
        Self::builder().workers(n).build()
    }

    /// Build, start the coordinator and every worker, and wait until all are ready.
    pub fn started(n: usize) -> Self {
        let mut fleet = Self::new(n);
        fleet.start_coordinator();
        fleet.start_all_workers();
        fleet.wait_all_ready();
        fleet
    }

    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.tls_dir().join(pki::CA_CERT_FILE)
    }

    /// Certificate and key of `name` in the fleet's TLS directory.
    pub fn cert_paths(&self, name: &str) -> CertPaths {
        CertPaths {
            cert: self.tls_dir().join(format!("{name}.crt")),
            key: self.tls_dir().join(format!("{name}.key")),
        }
    }

    /// Issue another certificate from the fleet CA into the TLS directory.
    pub fn issue(&self, role: Role, name: &str, validity: Validity) -> CertPaths {
        let req = CertRequest {
            role,
            name: name.to_owned(),
            validity,
            extra_sans: vec![],
        };
        pki::issue_cert(&self.tls_dir(), &self.tls_dir(), &req, false)
            .unwrap_or_else(|e| panic!("issue {role} certificate {name}: {e}"))
    }

    pub fn coordinator_config(&self) -> PathBuf {
        self.root.join("coordinator.toml")
    }

    pub fn worker_config(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.toml"))
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// The coordinator's `coordinator.toml` as the builder writes it.
    pub fn coordinator_toml(&self) -> String {
        format!(
            "listen = \"{addr}\"\nstate_dir = \"state\"\nheartbeat_interval_ms = {hb}\n\
             lease_ms = {lease}\n\n[tls]\nca = \"tls/ca.crt\"\ncert = \"tls/coordinator.crt\"\n\
             key = \"tls/coordinator.key\"\n",
            addr = self.addr(),
            hb = self.heartbeat_interval_ms,
            lease = self.lease_ms
        )
    }

    /// A worker's config as the builder writes it.
    pub fn worker_toml(&self, name: &str, labels: &[String]) -> String {
        let labels: Vec<String> = labels.iter().map(|l| format!("{l:?}")).collect();
        format!(
            "coordinator = \"{addr}\"\nwork_dir = \"work/{name}\"\nlabels = [{labels}]\n\
             reconnect_initial_ms = 100\nreconnect_max_ms = 1000\n\n[tls]\nca = \"tls/ca.crt\"\n\
             cert = \"tls/{name}.crt\"\nkey = \"tls/{name}.key\"\n",
            addr = self.addr(),
            labels = labels.join(", ")
        )
    }

    fn log_file(&self, name: &str) -> (PathBuf, File, File) {
        std::fs::create_dir_all(self.logs_dir()).expect("create logs dir");
        let path = self.logs_dir().join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("open log file");
        let err = out.try_clone().expect("clone log file");
        (path, out, err)
    }

    /// Start `drover serve` on the fleet's port and state directory (stdout and stderr appended
    /// to `logs/coordinator.log`). Does not wait for it to listen.
    pub fn start_coordinator(&mut self) {
        assert!(
            self.coordinator.is_none(),
            "the coordinator is already running"
        );
        let (_, out, err) = self.log_file("coordinator");
        let mut cmd = command(&bin("drover"), &self.root);
        cmd.arg("serve")
            .arg("--config")
            .arg(self.coordinator_config())
            .stdout(out)
            .stderr(err);
        self.coordinator = Some(Guard::spawn(&mut cmd));
    }

    /// Start the coordinator and wait until `drover status` answers.
    pub fn start_coordinator_and_wait(&mut self) {
        self.start_coordinator();
        self.wait_for(
            DEADLINE,
            "the coordinator to answer `drover status`",
            || self.status(),
        );
    }

    /// Send `sig` to the coordinator and wait (bounded) for it to exit.
    pub fn stop_coordinator(&mut self, sig: Signal) -> ExitStatus {
        let mut guard = self.coordinator.take().expect("the coordinator is running");
        signal(&guard.child, sig);
        wait_exit(&mut guard.child, DEADLINE).unwrap_or_else(|| {
            panic!(
                "the coordinator did not exit within {DEADLINE:?} after {sig}\n{}",
                self.log_tail()
            )
        })
    }

    /// Start `drover-worker` for `name` (stderr appended to `logs/<name>.log`).
    pub fn start_worker(&mut self, name: &str) {
        assert!(
            !self.workers.contains_key(name),
            "worker {name} is already running"
        );
        let (_, out, err) = self.log_file(name);
        let mut cmd = command(&bin("drover-worker"), &self.root);
        cmd.arg("--config")
            .arg(self.worker_config(name))
            .stdout(out)
            .stderr(err);
        self.workers.insert(name.to_owned(), Guard::spawn(&mut cmd));
    }

    pub fn start_all_workers(&mut self) {
        for name in self.worker_names.clone() {
            self.start_worker(&name);
        }
    }

    /// Send `sig` to worker `name` and wait (bounded) for it to exit.
    pub fn stop_worker(&mut self, name: &str, sig: Signal) -> ExitStatus {
        let mut guard = self
            .workers
            .remove(name)
            .unwrap_or_else(|| panic!("worker {name} is not running"));
        signal(&guard.child, sig);
        wait_exit(&mut guard.child, DEADLINE).unwrap_or_else(|| {
            panic!(
                "worker {name} did not exit within {DEADLINE:?} after {sig}\n{}",
                tail(&self.worker_log(name), 30)
            )
        })
    }

    /// Wait (bounded by `deadline`) for worker `name` to exit by itself (killed by the kernel,
    /// say) and return its exit status; the worker then counts as stopped. Panics at the
    /// deadline, with the tail of its log.
    pub fn wait_worker_exit(&mut self, name: &str, deadline: Duration) -> ExitStatus {
        let guard = self
            .workers
            .get_mut(name)
            .unwrap_or_else(|| panic!("worker {name} is not running"));
        let Some(status) = wait_exit(&mut guard.child, deadline) else {
            panic!(
                "worker {name} is still running after {deadline:?}\n{}",
                tail(&self.worker_log(name), 30)
            );
        };
        self.workers.remove(name);
        status
    }

    /// The process of a running worker.
    pub fn worker_process(&mut self, name: &str) -> &mut Child {
        &mut self
            .workers
            .get_mut(name)
            .unwrap_or_else(|| panic!("worker {name} is not running"))
            .child
    }

    /// Everything the coordinator has logged so far (all runs).
    pub fn coordinator_log(&self) -> String {
        std::fs::read_to_string(self.logs_dir().join("coordinator.log")).unwrap_or_default()
    }

    /// Everything worker `name` has logged so far.
    pub fn worker_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs_dir().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// The last lines of the coordinator's log, for failure messages.
    pub fn log_tail(&self) -> String {
        format!(
            "--- coordinator log (tail) ---\n{}\n---",
            tail(&self.coordinator_log(), 40)
        )
    }

    /// Poll `check` (see [`wait_for_with`]); on timeout the message includes the coordinator's
    /// log tail.
    pub fn wait_for<T, O: Debug>(
        &self,
        deadline: Duration,
        what: &str,
        check: impl FnMut() -> Result<T, O>,
    ) -> T {
        wait_for_with(deadline, what, || self.log_tail(), check)
    }

    /// Wait until the coordinator's log contains `needle`; returns the matching line.
    pub fn wait_log(&self, needle: &str) -> String {
        self.wait_for(
            DEADLINE,
            &format!("{needle:?} in the coordinator log"),
            || {
                self.coordinator_log()
                    .lines()
                    .find(|l| l.contains(needle))
                    .map(str::to_owned)
                    .ok_or("not logged yet")
            },
        )
    }

    /// Wait until a coordinator log line contains every string in `needles`; returns it.
    pub fn wait_log_line(&self, needles: &[&str]) -> String {
        self.wait_for(
            DEADLINE,
            &format!("a coordinator log line with {needles:?}"),
            || {
                self.coordinator_log()
                    .lines()
                    .find(|l| needles.iter().all(|n| l.contains(n)))
                    .map(str::to_owned)
                    .ok_or("not logged yet")
            },
        )
    }

    /// Run the real `drover` CLI with `args` followed by `--coordinator/--ca/--cert/--key`
    /// for the operator certificate.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_as("operator", args)
    }

    /// Like [`TestFleet::cli`] with the certificate of `cert_name` from the TLS directory.
    pub fn cli_as(&self, cert_name: &str, args: &[&str]) -> Output {
        let paths = self.cert_paths(cert_name);
        let mut cmd = command(&bin("drover"), &self.root);
        cmd.args(args)
            .arg("--coordinator")
            .arg(self.addr())
            .arg("--ca")
            .arg(self.ca_cert())
            .arg("--cert")
            .arg(&paths.cert)
            .arg("--key")
            .arg(&paths.key);
        run_bounded(&mut cmd, RUN_DEADLINE)
    }

    /// Run the CLI and parse its stdout as JSON; `Err` describes a failure or bad output.
    pub fn try_cli_json<T: DeserializeOwned>(&self, args: &[&str]) -> Result<T, String> {
        let out = self.cli(args);
        if !out.status.success() {
            return Err(format!(
                "drover {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "drover {args:?} printed invalid JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Run the CLI and parse its stdout as JSON; panics on failure.
    pub fn cli_json<T: DeserializeOwned>(&self, args: &[&str]) -> T {
        self.try_cli_json(args)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.log_tail()))
    }

    /// `drover workers --json`.
    pub fn workers(&self) -> Result<Vec<WorkerInfo>, String> {
        self.try_cli_json(&["workers", "--json"])
    }

    /// `drover status --json`.
    pub fn status(&self) -> Result<FleetSummary, String> {
        self.try_cli_json(&["status", "--json"])
    }

    /// `drover worker show NAME --json`.
    pub fn worker(&self, name: &str) -> Result<WorkerInfo, String> {
        self.try_cli_json(&["worker", "show", name, "--json"])
    }

    /// Wait until `drover workers --json` satisfies `pred`; returns that list.
    pub fn wait_workers(
        &self,
        what: &str,
        pred: impl Fn(&[WorkerInfo]) -> bool,
    ) -> Vec<WorkerInfo> {
        self.wait_for(DEADLINE, what, || match self.workers() {
            Ok(list) if pred(&list) => Ok(list),
            Ok(list) => Err(summarize(&list).join("; ")),
            Err(e) => Err(e),
        })
    }

    /// Wait until worker `name` is in `state`; returns its record.
    pub fn wait_worker_state(&self, name: &str, state: WorkerState) -> WorkerInfo {
        self.wait_for(
            DEADLINE,
            &format!("worker {name} to be {state}"),
            || match self.worker(name) {
                Ok(w) if w.state == state => Ok(w),
                Ok(w) => Err(format!(
                    "{} connected={} registered_ms={}",
                    w.state, w.connected, w.registered_ms
                )),
                Err(e) => Err(e),
            },
        )
    }

    /// Wait until every configured worker is ready and connected, and nothing else is listed.
    pub fn wait_all_ready(&self) -> Vec<WorkerInfo> {
        let mut want = self.worker_names.clone();
        want.sort();
        self.wait_workers(&format!("workers {want:?} to be ready"), |list| {
            list.iter().map(|w| &w.name).eq(want.iter())
                && list
                    .iter()
                    .all(|w| w.state == WorkerState::Ready && w.connected)
        })
    }

    /// Open a raw QUIC connection to the coordinator with a hand-built TLS config.
    pub fn raw_connect(&self, tls: rustls::ClientConfig) -> Result<RawConn, RawError> {
        RawConn::connect(self.socket_addr(), tls)
    }

    /// Raw TLS config that trusts the fleet CA and presents `name`'s certificate.
    pub fn raw_tls_as(&self, name: &str) -> rustls::ClientConfig {
        let p = self.cert_paths(name);
        raw_tls(&self.ca_cert(), Some((&p.cert, &p.key)))
    }
}

impl Drop for TestFleet {
    fn drop(&mut self) {
        // Workers first, then the coordinator; each guard SIGKILLs and reaps.
        self.workers.clear();
        self.coordinator = None;
        if std::env::var_os("DROVER_E2E_KEEP").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("DROVER_E2E_KEEP: kept {}", dir.keep().display());
            }
        }
    }
}

/// One line per worker: `name state connected`, for failure messages.
pub fn summarize(list: &[WorkerInfo]) -> Vec<String> {
    list.iter()
        .map(|w| {
            format!(
                "{} {} connected={} registered_ms={}",
                w.name, w.state, w.connected, w.registered_ms
            )
        })
        .collect()
}

/// A CA in `dir` unrelated to any fleet, with one certificate `name` of `role`.
pub fn foreign_cert(dir: &Path, role: Role, name: &str) -> (PathBuf, CertPaths) {
    let ca = pki::create_ca(dir, "foreign").expect("create foreign CA");
    let req = CertRequest {
        role,
        name: name.to_owned(),
        validity: Validity::Days(1),
        extra_sans: vec![],
    };
    let paths = pki::issue_cert(dir, dir, &req, false).expect("issue foreign cert");
    (ca.cert, paths)
}

/// A rustls client config like a drover peer's (ring, TLS 1.3, ALPN `drover/1`, trusting only
/// `ca`), presenting `client` = (certificate, key) if given, with no check of that
/// certificate: the coordinator must do the refusing.
pub fn raw_tls(ca: &Path, client: Option<(&Path, &Path)>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for der in pki::load_certs(ca).expect("load CA certificate") {
        roots.add(der).expect("add CA root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                pki::load_certs(cert).expect("load client certificate"),
                pki::load_key(key).expect("load client key"),
            )
            .expect("client auth config"),
    };
    config.alpn_protocols = vec![pki::ALPN.to_vec()];
    config
}

/// What went wrong on a [`RawConn`].
#[derive(Debug)]
pub enum RawError {
    /// The connection failed or was closed (for a refused TLS handshake: a transport error).
    Connection(quinn::ConnectionError),
    /// Anything else (timeouts, local setup, decode errors).
    Other(String),
}

impl RawError {
    /// The QUIC application close code, if the peer closed the connection with one.
    pub fn app_close_code(&self) -> Option<u64> {
        match self {
            RawError::Connection(quinn::ConnectionError::ApplicationClosed(c)) => {
                Some(c.error_code.into_inner())
            }
            _ => None,
        }
    }
}

fn conn_err_of(e: &drover::wire::WireError) -> RawError {
    match e.connection_error() {
        Some(c) => RawError::Connection(c.clone()),
        None => RawError::Other(e.to_string()),
    }
}

/// A hand-driven QUIC connection to the coordinator, with its own small tokio runtime so that
/// tests stay synchronous. The first bidirectional stream is opened on the first send.
#[derive(Debug)]
pub struct RawConn {
    rt: tokio::runtime::Runtime,
    endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    stream: Option<(quinn::SendStream, FramedRecv)>,
}

/// How long a raw connection waits for the coordinator at each step.
const RAW_STEP: Duration = Duration::from_secs(10);

impl RawConn {
    /// Connect (QUIC + TLS) to `addr` as server name `drover-coordinator`.
    pub fn connect(addr: SocketAddr, tls: rustls::ClientConfig) -> Result<Self, RawError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| RawError::Other(e.to_string()))?;
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| RawError::Other(e.to_string()))?;
        let config = quinn::ClientConfig::new(Arc::new(quic));
        // quinn spawns its drivers on the ambient runtime.
        let entered = rt.enter();
        let endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))
            .map_err(|e| RawError::Other(e.to_string()))?;
        let connecting = endpoint
            .connect_with(
                config,
                addr,
                drover_protocol::identity::COORDINATOR_SERVER_NAME,
            )
            .map_err(|e| RawError::Other(e.to_string()))?;
        let conn = rt.block_on(async {
            match tokio::time::timeout(RAW_STEP, connecting).await {
                Err(_) => Err(RawError::Other("no QUIC handshake within 10s".into())),
                Ok(Err(e)) => Err(RawError::Connection(e)),
                Ok(Ok(c)) => Ok(c),
            }
        })?;
        drop(entered);
        Ok(Self {
            rt,
            endpoint,
            conn,
            stream: None,
        })
    }

    fn stream(&mut self) -> Result<&mut (quinn::SendStream, FramedRecv), RawError> {
        if self.stream.is_none() {
            let conn = self.conn.clone();
            let (send, recv) = self
                .rt
                .block_on(conn.open_bi())
                .map_err(RawError::Connection)?;
            self.stream = Some((send, FramedRecv::new(recv)));
        }
        Ok(self.stream.as_mut().expect("just opened"))
    }

    /// Write raw bytes on the control stream.
    pub fn send_bytes(&mut self, bytes: &[u8]) -> Result<(), RawError> {
        let rt = self.rt.handle().clone();
        let (send, _) = self.stream()?;
        rt.block_on(send.write_all(bytes)).map_err(|e| match e {
            quinn::WriteError::ConnectionLost(c) => RawError::Connection(c),
            e => RawError::Other(e.to_string()),
        })
    }

    /// Write one framed message on the control stream.
    pub fn send<T: serde::Serialize>(&mut self, msg: &T) -> Result<(), RawError> {
        let frame = encode_frame(msg, MAX_FRAME_LEN).map_err(|e| RawError::Other(e.to_string()))?;
        self.send_bytes(&frame)
    }

    /// Read one framed message from the control stream (bounded wait).
    pub fn recv<T: DeserializeOwned>(&mut self) -> Result<T, RawError> {
        let rt = self.rt.handle().clone();
        let (_, recv) = self.stream()?;
        rt.block_on(async {
            match tokio::time::timeout(RAW_STEP, recv.next::<T>()).await {
                Err(_) => Err(RawError::Other("no answer within 10s".into())),
                Ok(Err(e)) => Err(conn_err_of(&e)),
                Ok(Ok(None)) => Err(RawError::Other("stream finished".into())),
                Ok(Ok(Some(m))) => Ok(m),
            }
        })
    }

    /// Send `hello` and read the coordinator's reply.
    pub fn hello(&mut self, hello: &Hello) -> Result<HelloReply, RawError> {
        self.send(hello)?;
        self.recv()
    }

    /// Wait (bounded) for the connection to be closed; returns why.
    pub fn closed(&self) -> Result<quinn::ConnectionError, RawError> {
        let conn = self.conn.clone();
        self.rt.block_on(async {
            tokio::time::timeout(RAW_STEP, conn.closed())
                .await
                .map_err(|_| RawError::Other("the connection is still open after 10s".into()))
        })
    }
}

impl Drop for RawConn {
    fn drop(&mut self) {
        self.conn.close(close_code::GOODBYE.into(), b"test done");
        let endpoint = self.endpoint.clone();
        self.rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
        });
    }
}

/// A [`Hello`] for `role` with this build's versions.
pub fn hello(role: Role) -> Hello {
    Hello {
        versions: SUPPORTED_VERSIONS,
        role,
        software: "drover-tests raw client".into(),
    }
}

/// Connect with `tls` and send `hello`: the coordinator's reply, or why the connection failed
/// (at the TLS handshake, or by a close before the reply).
pub fn raw_hello(
    addr: SocketAddr,
    tls: rustls::ClientConfig,
    hello: &Hello,
) -> Result<HelloReply, RawError> {
    let mut conn = RawConn::connect(addr, tls)?;
    conn.hello(hello)
}

impl FleetBuilder {
    /// Make the fleet's directory in `parent` instead of the system's temporary directory
    /// (sandbox tests: a sandboxed task's private /tmp would hide a fleet under /tmp anyway).
    pub fn in_dir(mut self, parent: &Path) -> Self {
        self.parent = Some(parent.to_path_buf());
        self
    }
}

impl TestFleet {
    /// Like [`TestFleet::start_worker`], with extra environment variables for the worker.
    pub fn start_worker_with_env(&mut self, name: &str, env: &[(&str, &str)]) {
        assert!(
            !self.workers.contains_key(name),
            "worker {name} is already running"
        );
        let (_, out, err) = self.log_file(name);
        let mut cmd = command(&bin("drover-worker"), &self.root);
        cmd.arg("--config")
            .arg(self.worker_config(name))
            .envs(env.iter().copied())
            .stdout(out)
            .stderr(err);
        self.workers.insert(name.to_owned(), Guard::spawn(&mut cmd));
    }

    /// The coordinator's pid, if it runs.
    pub fn coordinator_pid(&self) -> Option<i32> {
        self.coordinator.as_ref().map(Guard::pid)
    }

    /// Worker `name`'s pid, if it runs.
    pub fn worker_pid(&self, name: &str) -> Option<i32> {
        self.workers.get(name).map(Guard::pid)
    }
}

/// A `kB` figure of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, ...) in bytes; `None` when the
/// process or the line is missing.
pub fn proc_status_bytes(pid: i32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Is any process on the host running with `marker` in its command line?
pub fn process_with(marker: &str) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|p| {
            std::fs::read(p.path().join("cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(marker)
                })
                .unwrap_or(false)
        })
}

impl TestFleet {
    /// The coordinator's SQLite database (for [`checker::read_sessions`]).
    pub fn db_path(&self) -> PathBuf {
        self.root.join("state").join("drover.db")
    }

    /// Start worker `name` as `prefix... drover-worker --config ...` (e.g. `ip netns exec NS`),
    /// with extra environment variables.
    pub fn start_worker_wrapped(&mut self, name: &str, prefix: &[&str], env: &[(&str, &str)]) {
        assert!(
            !self.workers.contains_key(name),
            "worker {name} is already running"
        );
        let (_, out, err) = self.log_file(name);
        let worker = bin("drover-worker");
        let mut cmd = command(
            Path::new(prefix.first().copied().unwrap_or("env")),
            &self.root,
        );
        cmd.args(prefix.iter().skip(1))
            .arg(worker)
            .arg("--config")
            .arg(self.worker_config(name))
            .envs(env.iter().copied())
            .stdout(out)
            .stderr(err);
        self.workers.insert(name.to_owned(), Guard::spawn(&mut cmd));
    }
}
