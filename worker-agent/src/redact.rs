//! Masking secret values in everything an attempt produces, before it is stored.
//!
//! A [`Redactor`] is built from the secret values an attempt was granted (on the worker) or
//! from every stored secret (on the coordinator, as a second line). It looks for each value in
//! the forms a task could print it in:
//! - as it is, JSON-escaped (events are JSON text) and percent-encoded (URLs);
//! - base64 (standard and URL-safe alphabets) at each of the three alignments the value can
//!   have inside a longer base64 text — e.g. `Authorization: Basic base64(user:value)` —
//!   keeping only the characters that depend on the value alone.
//!
//! and replaces each occurrence with `[REDACTED:<name>]`.
//!
//! [`StreamRedactor`] does the same over a byte stream cut into arbitrary chunks (a pipe read
//! by read(2)): at the end of each chunk it holds back the longest tail that could still grow
//! into a value, and emits it with the next chunk or at [`StreamRedactor::finish`]. So a value
//! split across two chunks is masked too; the cost is that up to one value's length of output
//! may wait for the next write (or the end of the stream).
//!
//! Pure code over bytes, no I/O: fuzzed by `fuzz/fuzz_targets/redact.rs`.

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine;
use std::borrow::Cow;
use std::sync::Arc;

/// Base64 fragments shorter than this are not searched for (they would match ordinary text).
const MIN_FRAGMENT: usize = 8;

/// Masks a fixed set of secret values; cheap to share (`Arc`).
#[derive(Debug)]
pub struct Redactor {
    ac: Option<AhoCorasick>,
    /// Per pattern: the replacement text and the pattern's bytes (for the hold-back).
    patterns: Vec<Pattern>,
}

#[derive(Debug)]
struct Pattern {
    bytes: Vec<u8>,
    replacement: Arc<str>,
    /// KMP failure function of `bytes`.
    fail: Vec<usize>,
}

impl Redactor {
    /// A redactor for `(name, value)` pairs; empty values are ignored.
    pub fn new<'a>(secrets: impl IntoIterator<Item = (&'a str, &'a str)>) -> Redactor {
        let mut named: Vec<(&str, Vec<u8>)> = Vec::new();
        for (name, value) in secrets {
            if value.is_empty() {
                continue;
            }
            for form in forms(value.as_bytes()) {
                if !named.iter().any(|(_, f)| *f == form) {
                    named.push((name, form));
                }
            }
        }
        let all: Vec<&[u8]> = named.iter().map(|(_, f)| f.as_slice()).collect();
        let marker = Marker::choose(&all, named.iter().map(|(n, _)| *n));
        let mut replacements: Vec<(&str, Arc<str>)> = Vec::new();
        let mut patterns: Vec<Pattern> = Vec::new();
        for (name, form) in named {
            let replacement = match replacements.iter().find(|(n, _)| *n == name) {
                Some((_, r)) => r.clone(),
                None => {
                    let r: Arc<str> = marker.text(name).into();
                    replacements.push((name, r.clone()));
                    r
                }
            };
            patterns.push(Pattern {
                fail: failure(&form),
                bytes: form,
                replacement,
            });
        }
        let ac = (!patterns.is_empty()).then(|| {
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(patterns.iter().map(|p| &p.bytes))
                .expect("patterns of bounded size always build")
        });
        Redactor { ac, patterns }
    }

    /// Whether there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.ac.is_none()
    }

    /// `text` with every occurrence masked (borrowed when there was none).
    pub fn redact_str<'t>(&self, text: &'t str) -> Cow<'t, str> {
        match self.redact_bytes(text.as_bytes()) {
            Cow::Borrowed(_) => Cow::Borrowed(text),
            // Patterns and replacements are whole UTF-8 strings (or ASCII), so cutting them
            // out of UTF-8 text leaves UTF-8; lossy only guards a value that was not.
            Cow::Owned(bytes) => Cow::Owned(String::from_utf8_lossy(&bytes).into_owned()),
        }
    }

    /// `bytes` with every occurrence masked.
    pub fn redact_bytes<'b>(&self, bytes: &'b [u8]) -> Cow<'b, [u8]> {
        let Some(ac) = &self.ac else {
            return Cow::Borrowed(bytes);
        };
        let mut out: Option<Vec<u8>> = None;
        let mut last = 0;
        for m in ac.find_iter(bytes) {
            let o = out.get_or_insert_with(|| Vec::with_capacity(bytes.len()));
            o.extend_from_slice(&bytes[last..m.start()]);
            o.extend_from_slice(self.patterns[m.pattern().as_usize()].replacement.as_bytes());
            last = m.end();
        }
        match out {
            None => Cow::Borrowed(bytes),
            Some(mut o) => {
                o.extend_from_slice(&bytes[last..]);
                Cow::Owned(o)
            }
        }
    }

    /// The longest tail of `bytes` that is a proper prefix of some pattern (where a value
    /// may begin that more input could complete).
    fn hold_len(&self, bytes: &[u8]) -> usize {
        self.patterns
            .iter()
            .map(|p| {
                let window = &bytes[bytes.len().saturating_sub(p.bytes.len() - 1)..];
                kmp_suffix_state(&p.bytes, &p.fail, window).min(p.bytes.len() - 1)
            })
            .max()
            .unwrap_or(0)
    }
}

/// Masks values in a stream cut into chunks; see the module docs.
#[derive(Debug)]
pub struct StreamRedactor {
    redactor: Arc<Redactor>,
    carry: Vec<u8>,
}

impl StreamRedactor {
    pub fn new(redactor: Arc<Redactor>) -> Self {
        Self {
            redactor,
            carry: Vec::new(),
        }
    }

    /// Take the next chunk; returns the bytes that can be emitted now (possibly none).
    ///
    /// The result is exactly what masking the whole stream at once would give: everything
    /// from the first position where a value could still begin (the longest tail that is a
    /// proper prefix of one) is held back. A match found before that point is final, since no
    /// longer value can start at its position (that would make the tail from there such a
    /// prefix), and no earlier one can still be completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let Some(ac) = &self.redactor.ac else {
            return chunk.to_vec();
        };
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(chunk);
        let cutoff = buf.len() - self.redactor.hold_len(&buf);
        let mut out = Vec::with_capacity(buf.len());
        let mut last = 0;
        for m in ac.find_iter(&buf) {
            if m.start() >= cutoff {
                break;
            }
            out.extend_from_slice(&buf[last..m.start()]);
            out.extend_from_slice(
                self.redactor.patterns[m.pattern().as_usize()]
                    .replacement
                    .as_bytes(),
            );
            last = m.end();
        }
        let held = cutoff.max(last);
        out.extend_from_slice(&buf[last..held]);
        self.carry = buf[held..].to_vec();
        out
    }

    /// The end of the stream: whatever was held back (it did not grow into a value).
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.carry);
        self.redactor.redact_bytes(&rest).into_owned()
    }

    /// Bytes held back now.
    pub fn pending(&self) -> usize {
        self.carry.len()
    }
}

/// How masked values are written. Normally `[REDACTED:<name>]`; the delimiters change when a
/// value holds them, so that a replacement and the text around it can never form a value
/// again (a value starting with `]` right after `[REDACTED:x` would otherwise reappear): every
/// occurrence of a value in the output would have to contain a delimiter (which no value
/// holds) or lie inside a replacement (which none does).
#[derive(Debug, Clone, Copy)]
enum Marker {
    Delimited(u8, u8),
    /// A run of one byte no value holds (when every delimiter pair is taken).
    Fill(u8),
}

impl Marker {
    fn choose<'n>(forms: &[&[u8]], names: impl Iterator<Item = &'n str> + Clone) -> Marker {
        let used = |c: u8| forms.iter().any(|f| f.contains(&c));
        let inside = |text: &str| {
            forms
                .iter()
                .any(|f| text.as_bytes().windows(f.len()).any(|w| w == *f))
        };
        for (open, close) in [(b'[', b']'), (b'<', b'>'), (b'{', b'}'), (b'(', b')')] {
            let m = Marker::Delimited(open, close);
            if !used(open) && !used(close) && !names.clone().any(|n| inside(&m.text(n))) {
                return m;
            }
        }
        Marker::Fill((b'!'..=b'~').find(|c| !used(*c)).unwrap_or(b'*'))
    }

    fn text(self, name: &str) -> String {
        match self {
            Marker::Delimited(open, close) => {
                format!("{}REDACTED:{name}{}", open as char, close as char)
            }
            Marker::Fill(c) => (c as char).to_string().repeat(8),
        }
    }
}

/// Every form of `value` to search for (duplicates possible; the caller drops them).
fn forms(value: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![value.to_vec()];
    if let Ok(text) = std::str::from_utf8(value) {
        let json = serde_json::to_string(text).expect("a string always serializes");
        out.push(json.as_bytes()[1..json.len() - 1].to_vec());
    }
    out.push(percent_encode(value));
    let engines = [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::URL_SAFE,
    ];
    for engine in engines {
        for offset in 0..3usize {
            let mut padded = vec![0u8; offset];
            padded.extend_from_slice(value);
            let encoded = engine.encode(&padded);
            // Characters that hold bits of the prefix, or of what follows, are not the
            // value's alone.
            let start = (offset * 8).div_ceil(6);
            let end = ((offset + value.len()) * 8) / 6;
            if end > start && end - start >= MIN_FRAGMENT {
                out.push(encoded.as_bytes()[start..end].to_vec());
            }
        }
    }
    out
}

fn percent_encode(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    for &b in value {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

/// KMP failure function: `fail[i]` is the length of the longest proper prefix of
/// `p[..=i]` that is also its suffix.
fn failure(p: &[u8]) -> Vec<usize> {
    let mut fail = vec![0; p.len()];
    let mut k = 0;
    for i in 1..p.len() {
        while k > 0 && p[i] != p[k] {
            k = fail[k - 1];
        }
        if p[i] == p[k] {
            k += 1;
        }
        fail[i] = k;
    }
    fail
}

/// After reading `text`, the length of the longest prefix of `p` that `text` ends with.
fn kmp_suffix_state(p: &[u8], fail: &[usize], text: &[u8]) -> usize {
    let mut k = 0;
    for &b in text {
        while k > 0 && (k == p.len() || p[k] != b) {
            k = fail[k - 1];
        }
        if p[k] == b {
            k += 1;
        }
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    use proptest::prelude::*;

    const SECRET: &str = "ghp_S3cr3tT0kenValue42";

    fn redactor() -> Arc<Redactor> {
        Arc::new(Redactor::new([("gh", SECRET)]))
    }

    #[test]
    fn masks_every_form() {
        let r = redactor();
        let basic = STANDARD.encode(format!("x-access-token:{SECRET}"));
        let cases = [
            format!("token={SECRET}!"),
            format!("{{\"k\":\"{SECRET}\"}}"),
            format!("Authorization: Basic {basic}"),
            format!("b64 {}", STANDARD.encode(SECRET)),
            format!("b64url {}", URL_SAFE.encode(format!("ab{SECRET}"))),
            format!("b64 offset 1 {}", STANDARD.encode(format!("a{SECRET}zz"))),
        ];
        for case in cases {
            let out = r.redact_str(&case);
            assert!(out.contains("[REDACTED:gh]"), "not masked: {case} -> {out}");
            assert!(!out.contains(SECRET), "{out}");
        }
        assert_eq!(r.redact_str("nothing here"), "nothing here");
    }

    #[test]
    fn json_escaped_values_are_masked() {
        let tricky = "pa\"ss\\word\nline2";
        let r = Redactor::new([("t", tricky)]);
        let json = serde_json::json!({ "data": format!("x{tricky}y") }).to_string();
        let out = r.redact_str(&json);
        assert!(out.contains("[REDACTED:t]"), "{out}");
    }

    #[test]
    fn a_value_split_across_chunks_is_masked() {
        let r = redactor();
        let text = format!("before {SECRET} after");
        for cut in 0..=text.len() {
            let mut s = StreamRedactor::new(r.clone());
            let mut out = s.push(&text.as_bytes()[..cut]);
            out.extend(s.push(&text.as_bytes()[cut..]));
            out.extend(s.finish());
            let out = String::from_utf8(out).unwrap();
            assert_eq!(out, "before [REDACTED:gh] after", "cut at {cut}");
        }
    }

    #[test]
    fn held_back_bytes_come_out_at_the_end() {
        let r = redactor();
        let mut s = StreamRedactor::new(r);
        let out = s.push(b"prompt> ghp_S3");
        assert_eq!(out, b"prompt> ");
        assert_eq!(s.pending(), 6);
        assert_eq!(s.finish(), b"ghp_S3");
    }

    #[test]
    fn a_replacement_never_forms_the_value_again() {
        // Found by fuzz/fuzz_targets/redact.rs: "[REDACTED:s" + "]ce..." was the value again.
        let secret = "]ce\x05\x05ret-va";
        let r = Redactor::new([("s", secret)]);
        let text = format!("\x02s{secret}ce\x05\x05ret-vanoise");
        let out = r.redact_str(&text);
        assert!(!out.contains(secret), "{out:?}");
        assert!(out.contains("<REDACTED:s>"), "{out:?}");
        // A value that is a replacement's inside, and one holding every delimiter.
        for secret in ["REDACTED:s", "[]<>{}()REDACTED"] {
            let r = Redactor::new([("s", secret)]);
            let text = format!("a{secret}{secret}b");
            let out = r.redact_str(&text);
            assert!(!out.contains(secret), "{secret}: {out:?}");
        }
    }

    #[test]
    fn streaming_takes_the_longer_form_as_one_shot_does() {
        // Found by fuzz/fuzz_targets/redact.rs: the value is a prefix of its own JSON-escaped
        // form, and a cut right after the value made the stream take the shorter match.
        let secret = format!("s{}", "\\".repeat(8));
        let r = Arc::new(Redactor::new([("t", secret.as_str())]));
        let text = format!("ab{}{} tail", secret, "\\".repeat(12));
        let one_shot = r.redact_bytes(text.as_bytes()).into_owned();
        for cut in 0..=text.len() {
            let mut s = StreamRedactor::new(r.clone());
            let mut out = s.push(&text.as_bytes()[..cut]);
            out.extend(s.push(&text.as_bytes()[cut..]));
            out.extend(s.finish());
            assert_eq!(out, one_shot, "cut at {cut}");
        }
    }

    #[test]
    fn no_secrets_is_a_no_op() {
        let r = Arc::new(Redactor::new([]));
        assert!(r.is_empty());
        let mut s = StreamRedactor::new(r);
        assert_eq!(s.push(b"abc"), b"abc");
        assert_eq!(s.finish(), b"");
    }

    proptest! {
        /// However the stream is cut, the output holds no value and equals the one-shot result.
        #[test]
        fn streaming_equals_one_shot(
            noise in proptest::collection::vec(any::<u8>(), 0..200),
            at in 0usize..200,
            cuts in proptest::collection::vec(0usize..260, 0..6),
        ) {
            let r = redactor();
            let mut text = noise.clone();
            let at = at.min(text.len());
            text.splice(at..at, SECRET.bytes());
            let one_shot = r.redact_bytes(&text).into_owned();
            let mut cuts = cuts;
            cuts.push(text.len());
            cuts.sort_unstable();
            let mut s = StreamRedactor::new(r.clone());
            let mut out = Vec::new();
            let mut prev = 0;
            for c in cuts {
                let c = c.min(text.len());
                if c < prev { continue; }
                out.extend(s.push(&text[prev..c]));
                prev = c;
            }
            out.extend(s.finish());
            prop_assert_eq!(&out, &one_shot);
            let secret = SECRET.as_bytes();
            prop_assert!(!out.windows(secret.len()).any(|w| w == secret));
        }
    }
}
