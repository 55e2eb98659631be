//! Fuzz the secret redactor (worker-agent/src/redact.rs, included by path) on output a task
//! controls: arbitrary bytes with a secret spliced in, cut into arbitrary chunks.
//!
//! Checks: the streamed result equals the one-shot result of the whole text, neither holds the
//! secret, and masking is idempotent (a replacement never forms a value with its neighbours).

#![no_main]

#[allow(dead_code)]
#[path = "../../worker-agent/src/redact.rs"]
mod redact;

use libfuzzer_sys::fuzz_target;
use redact::{Redactor, StreamRedactor};
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    // Layout: [secret_len, at, cut count, cuts..., secret..., text...]
    let [secret_len, at, ncuts, rest @ ..] = data else {
        return;
    };
    let ncuts = usize::from(*ncuts % 8);
    if rest.len() < ncuts {
        return;
    }
    let (cuts, rest) = rest.split_at(ncuts);
    let secret_len = usize::from(*secret_len % 48) + 8;
    if rest.len() < secret_len {
        return;
    }
    let (secret, noise) = rest.split_at(secret_len);
    let Ok(secret) = std::str::from_utf8(secret) else {
        return;
    };
    let r = Arc::new(Redactor::new([("s", secret)]));
    let mut text = noise.to_vec();
    let at = usize::from(*at).min(text.len());
    text.splice(at..at, secret.bytes());
    let one_shot = r.redact_bytes(&text).into_owned();
    let mut s = StreamRedactor::new(r.clone());
    let mut out = Vec::new();
    let mut prev = 0;
    let mut points: Vec<usize> = cuts.iter().map(|c| usize::from(*c) % (text.len() + 1)).collect();
    points.sort_unstable();
    for c in points.into_iter().chain([text.len()]) {
        out.extend(s.push(&text[prev..c]));
        prev = c;
    }
    out.extend(s.finish());
    let found = |b: &[u8]| b.windows(secret.len()).any(|w| w == secret.as_bytes());
    assert!(!found(&one_shot));
    assert!(!found(&out));
    assert_eq!(out, one_shot);
    // A masked text holds no value in any form, so masking it again changes nothing.
    assert_eq!(r.redact_bytes(&one_shot), &one_shot[..]);
});
