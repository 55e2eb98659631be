//! Acceptance criteria on the wire, without I/O: the feedback an iteration gets about the one
//! before it (`DROVER_FEEDBACK_FILE`), and the excerpts of criterion output it carries.
//!
//! The worker builds feedback as its loop runs; the coordinator rebuilds the same feedback
//! from the session's `criterion_checked` events when an attempt replaces a dead one, so both
//! use [`Feedback`] and [`excerpt`] from here and the file a task reads is the same either way.

use crate::task::CriterionResult;
use serde::{Deserialize, Serialize};

/// Most bytes of a criterion's output kept in its excerpt (the tail: test failures and
/// compiler errors are at the end).
pub const MAX_EXCERPT_BYTES: usize = 2048;

/// The JSON in `DROVER_FEEDBACK_FILE`: which criteria failed in the iteration before, with the
/// tail of their output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feedback {
    /// The iteration these results come from (the reader's is one more).
    pub iteration: u32,
    /// Only the criteria that failed, in the order they ran.
    pub failed: Vec<CriterionResult>,
}

impl Feedback {
    /// Feedback from an iteration's results, or `None` when nothing failed.
    pub fn from_results(iteration: u32, results: &[CriterionResult]) -> Option<Self> {
        let failed: Vec<CriterionResult> = results.iter().filter(|r| !r.passed).cloned().collect();
        (!failed.is_empty()).then_some(Feedback { iteration, failed })
    }
}

/// The last [`MAX_EXCERPT_BYTES`] of `output` as text (invalid UTF-8 replaced), cut at a
/// character boundary.
pub fn excerpt(output: &[u8]) -> String {
    let mut start = output.len().saturating_sub(MAX_EXCERPT_BYTES);
    // Skip UTF-8 continuation bytes so the cut does not split a character.
    while start < output.len() && start > 0 && (output[start] & 0xC0) == 0x80 {
        start += 1;
    }
    String::from_utf8_lossy(&output[start..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &str, passed: bool) -> CriterionResult {
        CriterionResult {
            name: name.into(),
            passed,
            exit: Some(if passed { 0 } else { 1 }),
            excerpt: String::new(),
        }
    }

    #[test]
    fn feedback_keeps_only_failures_and_none_when_all_pass() {
        let all = [result("build", true), result("tests", false)];
        let f = Feedback::from_results(2, &all).unwrap();
        assert_eq!(f.iteration, 2);
        assert_eq!(f.failed, vec![result("tests", false)]);
        assert_eq!(Feedback::from_results(1, &[result("build", true)]), None);
    }

    #[test]
    fn excerpt_keeps_the_tail_on_a_char_boundary() {
        assert_eq!(excerpt(b"short"), "short");
        let mut long = vec![b'a'; 5000];
        long.extend_from_slice("é".repeat(10).as_bytes());
        let e = excerpt(&long);
        assert!(e.len() <= MAX_EXCERPT_BYTES);
        assert!(e.ends_with("éééééééééé"));
        assert!(!e.contains('\u{FFFD}'));
        // A cut inside a two-byte character starts after it.
        let odd = "é".repeat(MAX_EXCERPT_BYTES);
        assert!(!excerpt(odd.as_bytes()).contains('\u{FFFD}'));
    }
}
