//! The runtime's clock: monotonic milliseconds anchored to the wall clock at start-up.
//!
//! The fleet state machine takes `now` as a parameter; this is where the runtime gets it. Being
//! monotonic, a wall-clock step (NTP, a bad RTC on a small board) cannot expire every lease at
//! once; being anchored, the values are still meaningful as Unix-epoch milliseconds.

use std::time::{SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall_ms_at_start: u64,
    start: Instant,
}

impl Clock {
    pub fn start() -> Self {
        Self {
            wall_ms_at_start: wall_ms(),
            start: Instant::now(),
        }
    }

    /// Milliseconds since the Unix epoch, never going backwards.
    pub fn now_ms(&self) -> u64 {
        self.wall_ms_at_start + self.start.elapsed().as_millis() as u64
    }
}

/// The wall clock in Unix-epoch milliseconds.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
