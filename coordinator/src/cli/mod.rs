//! The `drover` command line: the coordinator daemon (`serve`), the operator commands, the
//! fleet PKI and the local dev fleet. clap types live here and nowhere else.
//!
//! Exit codes (stable, for scripts): 0 success; 1 failure (e.g. not found); 2 bad command line;
//! 64 bad configuration; 69 coordinator unreachable; 77 refused by the coordinator
//! (certificate, role or protocol version).

/// `println!` that ends the command quietly (status 0) when stdout is a closed pipe, as Unix
/// tools do (`drover workers --json | head -1`), instead of panicking on EPIPE.
macro_rules! outln {
    () => { $crate::cli::write_stdout(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::cli::write_stdout(format_args!($($arg)*), true) };
}
/// `print!` with the same closed-pipe behaviour as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => { $crate::cli::write_stdout(format_args!($($arg)*), false) };
}

/// Write to stdout; on a closed pipe, exit 0 at once.
pub fn write_stdout(args: std::fmt::Arguments<'_>, newline: bool) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(args)
        .and_then(|()| {
            if newline {
                stdout.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| stdout.flush());
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

pub mod client;
pub mod dev;
pub mod ops;
pub mod output;
pub mod run;
pub mod secret;
pub mod settings;
pub mod tasks;
pub mod trust;

use clap::{Args, Parser, Subcommand};
use drover_protocol::{Role, WorkerState};
use std::path::PathBuf;

/// Exit codes; see the module doc.
pub mod exit {
    pub const FAILURE: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const CONFIG: i32 = 64;
    pub const UNAVAILABLE: i32 = 69;
    pub const REFUSED: i32 = 77;
}

const AFTER_HELP: &str = "\
EXIT STATUS:
  0   success
  1   the operation failed (for example: no such worker)
  2   bad command line
  64  bad configuration or task spec (the message names the file and key)
  69  the coordinator could not be reached
  77  the coordinator refused us (certificate, role or protocol version)

ENVIRONMENT:
  DROVER_ADDR     coordinator address (host:port), like --coordinator
  DROVER_CONFIG   CLI config file, like --config
  DROVER_CA, DROVER_CERT, DROVER_KEY
                  fleet CA, operator certificate and key, like --ca/--cert/--key
  DROVER_LOG      log filter (e.g. debug, drover=trace)";

/// drover: run agent workloads on a fleet of machines you own.
///
/// One binary is both the coordinator daemon (`drover serve`) and the operator CLI. Operator
/// commands talk to the coordinator over QUIC with mutual TLS and an operator certificate.
#[derive(Debug, Parser)]
#[command(name = "drover", version, after_long_help = AFTER_HELP, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// How operator commands find and authenticate to the coordinator.
/// Precedence: flags, then environment, then the CLI config file.
#[derive(Debug, Args, Clone, Default)]
pub struct ConnArgs {
    /// Coordinator address, host:port [env: DROVER_ADDR] [default: 127.0.0.1:7070]
    #[arg(long, value_name = "HOST:PORT")]
    pub coordinator: Option<String>,
    /// CLI config file [env: DROVER_CONFIG] [default: ~/.config/drover/cli.toml, then /etc/drover/cli.toml]
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Fleet CA certificate [env: DROVER_CA]
    #[arg(long, value_name = "PATH")]
    pub ca: Option<PathBuf>,
    /// Operator certificate [env: DROVER_CERT]
    #[arg(long, value_name = "PATH")]
    pub cert: Option<PathBuf>,
    /// Operator private key [env: DROVER_KEY]
    #[arg(long, value_name = "PATH")]
    pub key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator daemon (what drover.service starts).
    Serve(ServeArgs),
    /// Fleet summary: workers by state, total and free cores, memory and GPUs; lost and
    /// draining workers; retrying tasks with their reason and attempts.
    Status(StatusArgs),
    /// Stop placing new work on a worker; let its running attempts finish (until --deadline,
    /// after which they are rescheduled elsewhere). Kept across restarts until undrained.
    Drain(ops::DrainArgs),
    /// Make a drained worker take new work again.
    Undrain(ops::UndrainArgs),
    /// List workers.
    Workers(WorkersArgs),
    /// One worker.
    #[command(subcommand)]
    Worker(WorkerCommand),
    /// Fleet PKI: the CA and certificates for coordinators, workers and operators.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// Join tokens, with which new workers enroll themselves (needs `tls.ca_key` on the
    /// coordinator).
    #[command(subcommand)]
    Token(trust::TokenCommand),
    /// Secrets that task specs grant for a use (the worker's egress proxy adds them to
    /// requests for the hosts a grant names); stored encrypted, never shown again.
    #[command(subcommand)]
    Secret(secret::SecretCommand),
    /// Submit a task spec, with its inputs packed and sent along; prints the task id (with
    /// --follow, streams its events).
    Submit {
        #[command(flatten)]
        args: tasks::SubmitArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List tasks.
    Tasks {
        /// Only tasks in this state: queued, running, succeeded, failed, cancelled,
        /// satisfied, verified or rejected.
        #[arg(long, value_name = "STATE", value_parser = parse_task_state)]
        state: Option<drover_protocol::task::TaskState>,
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        json: JsonArg,
    },
    /// One task.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Read a task's session by position (events N..M), or follow it live.
    Events {
        #[command(flatten)]
        args: tasks::EventsArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Cancel a task: a queued one at once, a running one is killed (its whole process tree).
    Cancel {
        /// Task id.
        id: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Write the files an attempt of a task stored (its `outputs`) into a directory.
    ///
    /// Without --attempt, the last attempt that stored outputs. Files land under their paths
    /// in the workspace; existing files are not overwritten unless --force. Exits 1 when the
    /// task does not exist, declares no outputs or has stored none yet.
    Outputs {
        #[command(flatten)]
        args: tasks::OutputsArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Start a local fleet (a coordinator and N workers) for trying drover out.
    Dev(dev::DevArgs),
    /// Write man pages for drover and each of its subcommands into DIR (used by packaging).
    #[command(hide = true)]
    Manpages {
        /// Directory to write drover.1, drover-serve.1, ... into (created if missing).
        dir: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Coordinator config file.
    #[arg(long = "config", short = 'c', value_name = "PATH", default_value = crate::config::DEFAULT_CONFIG_PATH)]
    pub config_file: PathBuf,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub json: JsonArg,
}

#[derive(Debug, Args)]
pub struct JsonArg {
    /// Print JSON (schema in docs/json-schema.md) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct WorkersArgs {
    /// Only workers in this state.
    #[arg(long, value_name = "STATE", value_parser = parse_state)]
    pub state: Option<WorkerState>,
    /// Only workers with this label.
    #[arg(long, value_name = "LABEL")]
    pub label: Option<String>,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub json: JsonArg,
}

fn parse_state(s: &str) -> Result<WorkerState, String> {
    s.parse()
}

fn parse_task_state(s: &str) -> Result<drover_protocol::task::TaskState, String> {
    s.parse()
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// State, attempts, worker, why it waits or why it failed, and stored outputs.
    Show {
        /// Task id.
        id: String,
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        json: JsonArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum WorkerCommand {
    /// Latest resource report, age of last heartbeat, version and address of one worker.
    Show {
        /// The worker's name (its certificate name).
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Revoke a worker: close its connection now and refuse its certificates from then on
    /// (checked at every TLS handshake, kept across restarts). The name cannot enroll again
    /// until `drover worker reinstate NAME`.
    Revoke {
        /// The worker's name.
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Let a revoked worker name enroll again (with a new token made with --name NAME); the
    /// certificates it had stay refused.
    Reinstate {
        /// The worker's name.
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        json: JsonArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Manage the fleet certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Manage certificates signed by the fleet CA.
    #[command(subcommand)]
    Cert(CertCommand),
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a new fleet CA (ca.crt and ca.key, the key with mode 0600).
    Create {
        /// Directory to write into (created if missing).
        #[arg(long, default_value = "/etc/drover/tls", value_name = "DIR")]
        dir: PathBuf,
        /// A name for the fleet, shown in the CA's subject.
        #[arg(long, default_value = "fleet")]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Issue a certificate carrying a role, signed by the CA.
    Create {
        /// What the holder may do: coordinator, worker or operator.
        #[arg(long, value_parser = parse_role, value_name = "ROLE")]
        role: Role,
        /// The holder's name: a worker's identity in the fleet, an operator's user name.
        #[arg(long)]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Directory holding ca.crt and ca.key.
        #[arg(long, default_value = "/etc/drover/tls", value_name = "DIR")]
        ca_dir: PathBuf,
        /// Directory to write NAME.crt and NAME.key into [default: the CA directory].
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
        /// Extra DNS names or IP addresses for a coordinator certificate (repeatable).
        #[arg(long, value_name = "NAME|IP")]
        san: Vec<String>,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
}

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    pub code: i32,
    pub message: String,
}

impl CliError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl<E: std::fmt::Display> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError::new(exit::FAILURE, e.to_string())
    }
}
