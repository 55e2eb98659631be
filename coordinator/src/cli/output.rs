//! Human output for operator commands: aligned tables that fit in 100 columns, sizes in
//! binary units, ages relative to the coordinator's clock. `--json` bypasses all of this and
//! prints the protocol records as they are (docs/json-schema.md).

use drover_protocol::{
    Attention, CgroupVersion, DrainReport, FleetSummary, WorkerInfo, WorkerNote, WorkerState,
};
use std::fmt::Write as _;

/// Widest line any table prints.
pub const MAX_WIDTH: usize = 100;

/// `1.5 GiB`, `512 MiB`, `0 B`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else if v >= 100.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `850ms`, `12s`, `4m`, `3h`, `2d`.
pub fn age(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms"),
        1000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{}m", ms / 60_000),
        3_600_000..=86_399_999 => format!("{}h", ms / 3_600_000),
        _ => format!("{}d", ms / 86_400_000),
    }
}

/// `2026-11-25 09:36:00 UTC`.
pub fn timestamp(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Render rows as left-aligned columns separated by two spaces; the last column is cut to
/// keep every line within [`MAX_WIDTH`].
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let cols = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(cols) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let all = std::iter::once(header.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .chain(rows.iter().cloned());
    for row in all {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate().take(cols) {
            if i + 1 == cols {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
            }
        }
        let line = line.trim_end();
        out.push_str(&truncate(line, MAX_WIDTH));
        out.push('\n');
    }
    out
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

pub fn status(s: &FleetSummary) -> String {
    let w = &s.workers;
    let mut out = String::new();
    let _ = writeln!(out, "Coordinator  {}", s.coordinator_version);
    let _ = writeln!(
        out,
        "Workers      {} ready, {} draining, {} lost, {} down",
        w.ready, w.draining, w.lost, w.down
    );
    out.push('\n');
    out.push_str(&table(
        &["CAPACITY", "TOTAL", "FREE"],
        &[
            vec![
                "Cores".into(),
                s.total.cpus.to_string(),
                s.free.cpus.to_string(),
            ],
            vec![
                "Memory".into(),
                bytes(s.total.memory_bytes),
                bytes(s.free.memory_bytes),
            ],
            vec![
                "GPUs".into(),
                s.total.gpus.to_string(),
                s.free.gpus.to_string(),
            ],
        ],
    ));
    out
}

pub fn workers(list: &[WorkerInfo]) -> String {
    if list.is_empty() {
        return "No workers match.\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|w| {
            let r = &w.resources;
            vec![
                w.name.clone(),
                w.state.to_string(),
                r.arch.clone(),
                r.cpu_count.to_string(),
                format!(
                    "{} / {}",
                    bytes(w.usage.memory_available_bytes),
                    bytes(r.memory_total_bytes)
                ),
                r.gpus.len().to_string(),
                format!("{:.2}", w.usage.load.one),
                age(w.last_heartbeat_age_ms),
                if r.labels.is_empty() {
                    "-".into()
                } else {
                    r.labels.join(",")
                },
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "STATE",
            "ARCH",
            "CPUS",
            "MEM AVAIL / TOTAL",
            "GPUS",
            "LOAD",
            "HEARTBEAT",
            "LABELS",
        ],
        &rows,
    )
}

pub fn worker(w: &WorkerInfo, now_ms: u64) -> String {
    let r = &w.resources;
    let since = now_ms.saturating_sub(w.state_changed_ms);
    let gpus = if r.gpus.is_empty() {
        "none".to_owned()
    } else {
        r.gpus
            .iter()
            .map(|g| match g.memory_bytes {
                Some(m) => format!("{} ({})", g.model, bytes(m)),
                None => g.model.clone(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let cgroup = match r.cgroup {
        CgroupVersion::V2 => "v2",
        CgroupVersion::V1 => "v1",
        CgroupVersion::None => "none",
    };
    let rows = [
        ("Name", w.name.clone()),
        (
            "State",
            format!(
                "{} (since {}, {} ago)",
                w.state,
                timestamp(w.state_changed_ms),
                age(since)
            ),
        ),
        (
            "Connected",
            if w.connected {
                format!("yes, from {}", w.address)
            } else {
                format!("no (last from {})", w.address)
            },
        ),
        (
            "Version",
            format!("{} (protocol v{})", w.version, w.protocol_version),
        ),
        ("Heartbeat", format!("{} ago", age(w.last_heartbeat_age_ms))),
        (
            "Host",
            format!("{}, {}, kernel {}, {}", r.hostname, r.os, r.kernel, r.arch),
        ),
        ("CPU", format!("{} x {}", r.cpu_count, r.cpu_model)),
        (
            "Load",
            format!(
                "{:.2} {:.2} {:.2}, {:.0}% busy",
                w.usage.load.one, w.usage.load.five, w.usage.load.fifteen, w.usage.cpu_percent
            ),
        ),
        (
            "Memory",
            format!(
                "{} available of {}",
                bytes(w.usage.memory_available_bytes),
                bytes(r.memory_total_bytes)
            ),
        ),
        (
            "Disk",
            format!(
                "{} free of {} ({})",
                bytes(w.usage.disk_free_bytes),
                bytes(r.disk_total_bytes),
                r.work_dir
            ),
        ),
        ("GPUs", gpus),
        (
            "Sandbox",
            format!(
                "cgroup {cgroup}, namespaces {}",
                if r.namespaces { "yes" } else { "no" }
            ),
        ),
        (
            "Labels",
            if r.labels.is_empty() {
                "-".into()
            } else {
                r.labels.join(", ")
            },
        ),
        ("First seen", timestamp(w.first_seen_ms)),
        ("Registered", timestamp(w.registered_ms)),
    ];
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&truncate(&format!("{:<12}{v}", format!("{k}:")), MAX_WIDTH));
        out.push('\n');
    }
    out
}

/// `1 attempt (t3)`, `2 attempts (t3, t5)`, `no attempt`.
fn attempts(ids: &[String]) -> String {
    match ids.len() {
        0 => "no attempt".into(),
        1 => format!("1 attempt ({})", ids[0]),
        n => format!("{n} attempts ({})", ids.join(", ")),
    }
}

/// `at 2026-11-25 10:00:00 UTC (in 10m)`.
fn deadline(deadline_ms: u64, now_ms: u64) -> String {
    format!(
        "at {} (in {})",
        timestamp(deadline_ms),
        age(deadline_ms.saturating_sub(now_ms))
    )
}

/// What `drover drain` / `drover undrain` did, in a sentence or two.
pub fn drain_report(r: &DrainReport) -> String {
    let n = &r.name;
    let running = &r.running;
    let mut out = String::new();
    let Some(d) = r.drain else {
        let _ = match (r.changed, r.state) {
            (false, _) => writeln!(out, "{n} was not drained; nothing changed ({}).", r.state),
            (true, WorkerState::Ready) => writeln!(
                out,
                "{n}: ready (was {}); it takes new work again.",
                r.previous
            ),
            (true, state) => writeln!(
                out,
                "{n}: drain lifted; it is {state} and will be ready for work when it comes back."
            ),
        };
        return out;
    };
    let head = match (r.changed, r.state) {
        (_, WorkerState::Lost | WorkerState::Down) => format!(
            "{n}: drain recorded; it is {} and will take no new work when it comes back.",
            r.state
        ),
        (false, _) => format!("{n} was already draining; nothing changed."),
        (true, _) if r.previous == WorkerState::Draining => match d.deadline_ms {
            Some(_) => format!("{n}: still draining, with the new deadline."),
            None => format!("{n}: still draining, now without a deadline."),
        },
        (true, _) => format!(
            "{n}: draining (was {}); no new work goes there.",
            r.previous
        ),
    };
    let _ = writeln!(out, "{head}");
    let _ = match (running.is_empty(), d.deadline_ms) {
        (true, _) => writeln!(out, "Nothing runs there now: it is drained."),
        (false, Some(at)) if at <= r.now_ms => writeln!(
            out,
            "Deadline reached: {} stopped and rescheduled on other workers.",
            attempts(running)
        ),
        (false, Some(at)) => writeln!(
            out,
            "{} may finish until the deadline {}; then what still runs is rescheduled on \
             other workers.",
            capitalize(&attempts(running)),
            deadline(at, r.now_ms)
        ),
        (false, None) => writeln!(
            out,
            "{} may run to its end (no deadline; `drover drain {n} --deadline 10m` sets one).",
            capitalize(&attempts(running))
        ),
    };
    out
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// `drover worker show`'s lines about a drain and the attempts running there.
pub fn worker_note(n: &WorkerNote, now_ms: u64) -> String {
    let mut out = String::new();
    if let Some(d) = n.drain {
        let until = match d.deadline_ms {
            Some(at) if at <= now_ms => "deadline passed".to_owned(),
            Some(at) => format!("deadline {}", deadline(at, now_ms)),
            None => "no deadline".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<12}since {} ({} ago), {until}",
            "Drain:",
            timestamp(d.since_ms),
            age(now_ms.saturating_sub(d.since_ms))
        );
    }
    let _ = writeln!(out, "{:<12}{}", "Running:", attempts(&n.running));
    out
}

/// The part of `drover status` below the capacity table: lost and draining workers, and
/// retrying tasks. Empty when nothing needs attention.
pub fn attention(a: &Attention) -> String {
    let mut out = String::new();
    if !a.workers.is_empty() {
        let rows: Vec<Vec<String>> = a
            .workers
            .iter()
            .map(|w| {
                let detail = match (w.state, w.drain) {
                    (WorkerState::Lost, _) => format!(
                        "no heartbeat for {}{}",
                        age(a.now_ms.saturating_sub(w.last_heartbeat_ms)),
                        if w.drain.is_some() { "; drained" } else { "" }
                    ),
                    (_, Some(d)) => {
                        let when = match d.deadline_ms {
                            Some(at) if at <= a.now_ms => "deadline passed".to_owned(),
                            Some(at) => format!("deadline in {}", age(at - a.now_ms)),
                            None => "no deadline".to_owned(),
                        };
                        let running = if w.running.is_empty() {
                            "drained".to_owned()
                        } else {
                            format!("{} running", attempts(&w.running))
                        };
                        format!("{running}; {when}")
                    }
                    (state, None) => state.to_string(),
                };
                vec![
                    w.name.clone(),
                    w.state.to_string(),
                    age(a.now_ms.saturating_sub(w.state_changed_ms)),
                    detail,
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(&["WORKER", "STATE", "SINCE", "DETAIL"], &rows));
    }
    if !a.retrying.is_empty() {
        let rows: Vec<Vec<String>> = a
            .retrying
            .iter()
            .map(|t| {
                let next = if t.not_before_ms > a.now_ms {
                    format!("in {}", age(t.not_before_ms - a.now_ms))
                } else {
                    "now".to_owned()
                };
                vec![
                    t.id.clone(),
                    t.name.clone(),
                    format!("{}/{}", t.attempts, t.max_attempts),
                    next,
                    t.reason.clone(),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &["RETRYING", "NAME", "ATTEMPTS", "NEXT", "REASON"],
            &rows,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(8 << 30), "8.0 GiB");
        assert_eq!(bytes(300 << 30), "300 GiB");
        assert_eq!(age(850), "850ms");
        assert_eq!(age(12_300), "12.3s");
        assert_eq!(age(7_200_000), "2h");
        assert_eq!(timestamp(0), "1970-01-01 00:00:00 UTC");
    }

    #[test]
    fn tables_align_and_fit() {
        let long = "x".repeat(200);
        let t = table(
            &["A", "BB"],
            &[vec!["aaaa".into(), "1".into()], vec!["b".into(), long]],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "A     BB");
        assert_eq!(lines[1], "aaaa  1");
        assert!(lines.iter().all(|l| l.chars().count() <= MAX_WIDTH));
    }

    #[test]
    fn drain_reports_say_what_happened() {
        use drover_protocol::DrainInfo;
        let mut r = DrainReport {
            name: "w1".into(),
            previous: WorkerState::Ready,
            state: WorkerState::Draining,
            drain: Some(DrainInfo {
                since_ms: 0,
                deadline_ms: Some(600_000),
            }),
            changed: true,
            running: vec!["t3".into()],
            now_ms: 0,
        };
        let text = drain_report(&r);
        assert!(text.starts_with("w1: draining (was ready)"), "{text}");
        assert!(
            text.contains("1 attempt (t3) may finish") && text.contains("(in 10m)"),
            "{text}"
        );
        r.running.clear();
        assert!(drain_report(&r).contains("it is drained"));
        r.state = WorkerState::Lost;
        r.previous = WorkerState::Lost;
        assert!(drain_report(&r).contains("it is lost and will take no new work"));
        r.drain = None;
        r.state = WorkerState::Ready;
        r.previous = WorkerState::Draining;
        assert!(drain_report(&r).starts_with("w1: ready (was draining)"));
        r.changed = false;
        assert!(drain_report(&r).contains("was not drained"));
    }

    #[test]
    fn worker_note_shows_drain_and_running() {
        use drover_protocol::DrainInfo;
        let n = WorkerNote {
            name: "w".into(),
            state: WorkerState::Draining,
            state_changed_ms: 0,
            last_heartbeat_ms: 0,
            connected: true,
            drain: Some(DrainInfo {
                since_ms: 0,
                deadline_ms: Some(300_000),
            }),
            running: vec![],
        };
        let text = worker_note(&n, 60_000);
        assert!(
            text.contains("Drain:      since 1970-01-01 00:00:00 UTC (1m ago), deadline at"),
            "{text}"
        );
        assert!(
            text.contains("(in 4m)") && text.contains("Running:    no attempt"),
            "{text}"
        );
    }

    #[test]
    fn attention_lists_lost_draining_and_retrying() {
        use drover_protocol::{DrainInfo, RetryingTask, WorkerNote};
        let note = |name: &str, state, drain| WorkerNote {
            name: name.into(),
            state,
            state_changed_ms: 0,
            last_heartbeat_ms: 1000,
            connected: state != WorkerState::Lost,
            drain,
            running: vec!["t1".into()],
        };
        let a = Attention {
            now_ms: 61_000,
            workers: vec![
                note("a", WorkerState::Lost, None),
                note(
                    "b",
                    WorkerState::Draining,
                    Some(DrainInfo {
                        since_ms: 0,
                        deadline_ms: Some(121_000),
                    }),
                ),
            ],
            retrying: vec![RetryingTask {
                id: "t9".into(),
                name: "job".into(),
                attempts: 2,
                max_attempts: 3,
                reason: "retrying after attempt 2 killed for memory (OOM)".into(),
                not_before_ms: 65_000,
            }],
        };
        let text = attention(&a);
        assert!(text.contains("no heartbeat for 1m"), "{text}");
        assert!(
            text.contains("1 attempt (t1) running; deadline in 1m"),
            "{text}"
        );
        assert!(
            text.contains("t9") && text.contains("2/3") && text.contains("in 4.0s"),
            "{text}"
        );
        assert!(text.lines().all(|l| l.chars().count() <= MAX_WIDTH));
        assert_eq!(
            attention(&Attention {
                now_ms: 0,
                workers: vec![],
                retrying: vec![]
            }),
            ""
        );
    }
}
