//! The OOM policy (`retry.on_oom`): what an attempt killed for memory leads to, and how much
//! memory the retry gets. Pure functions, no I/O, no clock.
//!
//! Memory of an attempt: the task's *memory* is its cgroup limit — `limits.memory`, else
//! `requirements.memory` — and it starts as the spec says. Under `retry_with_more_memory` each
//! OOM multiplies it by `memory_factor` (at most to `memory_ceiling`) and the retry both gets
//! that limit and *reserves* it for placement, so it lands only on a worker with that much
//! memory free. An OOM at the ceiling fails the task: the same memory would fail the same way.
//! The grown figure is recorded in the session (`retry_scheduled`), so a restarted coordinator
//! restores it.

use super::units::format_size;
use crate::store::session::NewEvent;
use drover_protocol::task::{OomPolicy, RetryPolicy, TaskSpec};

/// What an OOM kill leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OomDecision {
    /// Fail now, for this reason.
    Fail(String),
    /// Retry (if attempts are left) with this memory (`None`: as the spec says), for this
    /// reason.
    Retry {
        memory_bytes: Option<u64>,
        why: String,
    },
}

/// What the worker measured of an attempt killed for memory (from its `exited` event).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OomReport {
    pub limit_bytes: Option<u64>,
    pub peak_bytes: Option<u64>,
}

impl OomReport {
    /// From an `exited` payload: `memory_limit_bytes` and `peak_memory_bytes`.
    pub fn from_exited(payload: &serde_json::Value) -> Self {
        Self {
            limit_bytes: payload.get("memory_limit_bytes").and_then(|v| v.as_u64()),
            peak_bytes: payload.get("peak_memory_bytes").and_then(|v| v.as_u64()),
        }
    }

    /// `killed for memory (OOM) at its 64 MiB limit, peak 64 MiB`.
    pub fn describe(&self) -> String {
        let mut s = String::from("killed for memory (OOM)");
        if let Some(l) = self.limit_bytes {
            s.push_str(&format!(" at its {} limit", format_size(l)));
        }
        if let Some(p) = self.peak_bytes {
            s.push_str(&format!(", peak {}", format_size(p)));
        }
        s
    }
}

/// The memory an attempt runs with when nothing grew it: `limits.memory`, else
/// `requirements.memory`, else none.
pub fn spec_memory(spec: &TaskSpec) -> Option<u64> {
    spec.limits
        .memory_bytes
        .or((spec.requirements.memory_bytes > 0).then_some(spec.requirements.memory_bytes))
}

/// Decide after an OOM. `current` is the memory the attempt ran with if grown before.
pub fn decide(
    retry: &RetryPolicy,
    spec: &TaskSpec,
    current: Option<u64>,
    report: OomReport,
) -> OomDecision {
    let what = report.describe();
    match retry.on_oom {
        OomPolicy::Fail => OomDecision::Fail(format!("{what}; retry.on_oom is \"fail\"")),
        OomPolicy::Retry => OomDecision::Retry {
            memory_bytes: current,
            why: what,
        },
        OomPolicy::RetryWithMoreMemory => {
            let Some(now) = current.or_else(|| spec_memory(spec)) else {
                // Validation refuses this combination; a retry with the same (no) limit is
                // the honest fallback.
                return OomDecision::Retry {
                    memory_bytes: None,
                    why: what,
                };
            };
            let grown = grow(now, retry.memory_factor_percent);
            let next = match retry.memory_ceiling_bytes {
                Some(ceiling) if now >= ceiling => {
                    return OomDecision::Fail(format!(
                        "{what}; already at its memory ceiling of {}",
                        format_size(ceiling)
                    ))
                }
                Some(ceiling) => grown.min(ceiling),
                None => grown,
            };
            OomDecision::Retry {
                memory_bytes: Some(next),
                why: format!("{what}; the retry gets {}", format_size(next)),
            }
        }
    }
}

/// `bytes * percent / 100`, rounded up to a whole MiB so limits stay readable, never less
/// than one MiB more than `bytes`.
fn grow(bytes: u64, percent: u32) -> u64 {
    const MIB: u64 = 1 << 20;
    let grown = (u128::from(bytes) * u128::from(percent) / 100).min(u128::from(u64::MAX)) as u64;
    let grown = grown.max(bytes.saturating_add(MIB));
    grown.div_ceil(MIB).min(u64::MAX / MIB) * MIB
}

/// The spec an attempt runs with: `memory` (when grown) as both its limit and its memory
/// reservation.
pub fn with_memory(spec: &TaskSpec, memory: Option<u64>) -> TaskSpec {
    let mut s = spec.clone();
    if let Some(m) = memory {
        s.limits.memory_bytes = Some(m);
        s.requirements.memory_bytes = m;
    }
    s
}

/// The `assigned` event of an attempt whose memory was grown, with `memory_bytes` added to its
/// payload so the session says what the attempt got.
pub fn note_memory(mut assigned: NewEvent, memory: Option<u64>) -> NewEvent {
    if let Some(m) = memory {
        if let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&assigned.payload) {
            v["memory_bytes"] = serde_json::json!(m);
            assigned.payload = v.to_string();
        }
    }
    assigned
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_protocol::task::{Limits, Requirements};

    const MIB: u64 = 1 << 20;

    fn spec(on_oom: OomPolicy, limit: Option<u64>, ceiling: Option<u64>) -> TaskSpec {
        TaskSpec {
            name: "t".into(),
            command: vec!["true".into()],
            env: Default::default(),
            inputs: vec![],
            outputs: vec![],
            requirements: Requirements::default(),
            limits: Limits {
                memory_bytes: limit,
                ..Limits::default()
            },
            network: Default::default(),
            isolation: Default::default(),
            retry: RetryPolicy {
                on_oom,
                memory_ceiling_bytes: ceiling,
                ..RetryPolicy::default()
            },
            priority: 0,
            on_disconnect: None,
            lost_after_ms: None,
            acceptance: vec![],
            max_iterations: drover_protocol::task::DEFAULT_MAX_ITERATIONS,
            verdict: None,
            egress: Vec::new(),
            secrets: Vec::new(),
        }
    }

    fn report() -> OomReport {
        OomReport {
            limit_bytes: Some(64 * MIB),
            peak_bytes: Some(64 * MIB),
        }
    }

    #[test]
    fn policies() {
        let s = spec(OomPolicy::Fail, Some(64 * MIB), None);
        let OomDecision::Fail(why) = decide(&s.retry, &s, None, report()) else {
            panic!()
        };
        assert!(
            why.contains("64 MiB limit, peak 64 MiB") && why.contains("fail"),
            "{why}"
        );
        let s = spec(OomPolicy::Retry, Some(64 * MIB), None);
        assert!(matches!(
            decide(&s.retry, &s, None, report()),
            OomDecision::Retry {
                memory_bytes: None,
                ..
            }
        ));
    }

    #[test]
    fn more_memory_doubles_up_to_the_ceiling_then_fails() {
        let s = spec(
            OomPolicy::RetryWithMoreMemory,
            Some(64 * MIB),
            Some(200 * MIB),
        );
        let step = |current| decide(&s.retry, &s, current, report());
        assert!(
            matches!(step(None), OomDecision::Retry { memory_bytes: Some(m), .. } if m == 128 * MIB)
        );
        assert!(
            matches!(step(Some(128 * MIB)), OomDecision::Retry { memory_bytes: Some(m), .. } if m == 200 * MIB)
        );
        let OomDecision::Fail(why) = step(Some(200 * MIB)) else {
            panic!("at the ceiling it fails")
        };
        assert!(why.contains("ceiling of 200 MiB"), "{why}");
        // The requirement alone is the base when there is no limit.
        let mut s = spec(OomPolicy::RetryWithMoreMemory, None, None);
        s.requirements.memory_bytes = 100 * MIB;
        assert!(matches!(
            decide(&s.retry, &s, None, report()),
            OomDecision::Retry { memory_bytes: Some(m), .. } if m == 200 * MIB
        ));
    }

    #[test]
    fn growth_rounds_up_and_always_grows() {
        assert_eq!(grow(64 * MIB, 200), 128 * MIB);
        assert_eq!(grow(64 * MIB, 101), 65 * MIB, "at least a MiB more");
        assert_eq!(grow(u64::MAX / 2, 1000) % MIB, 0, "saturates, stays whole");
        let s = with_memory(&spec(OomPolicy::Retry, Some(MIB), None), Some(8 * MIB));
        assert_eq!(
            (s.limits.memory_bytes, s.requirements.memory_bytes),
            (Some(8 * MIB), 8 * MIB)
        );
    }
}
