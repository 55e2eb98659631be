//! drover's coordinator and operator CLI as a library, so tests and benchmarks can start the
//! coordinator in-process and reuse the operator client. `main.rs` is a thin shell over
//! [`cli::run`].
//!
//! - [`fleet`]: the registry state machine (no I/O, time as a parameter);
//! - [`store`]: the embedded SQLite database with group commit;
//! - [`server`]: the QUIC runtime around them;
//! - [`cli`]: the `drover` command line.

pub mod cli;
pub mod clock;
pub mod config;
pub mod fleet;
pub mod secrets;
pub mod server;
pub mod store;
pub mod tasks;
pub mod trust;

// Lean runtime pieces shared with the worker (logging, sd_notify, framed streams) live in the
// worker's library so the worker binary stays small and nothing is written twice.
pub use drover_worker::{logging, notify, pki, wire};
