//! Logging set-up: natively to the journal (structured fields) when journald is connected,
//! readable lines on stderr otherwise. `RUST_LOG` / `DROVER_LOG` override the level.

use std::io::IsTerminal;
use tracing_subscriber::{fmt, prelude::*, EnvFilter};

/// Install the global subscriber; `default` is the filter when no env var sets one.
pub fn init(identifier: &str, default: &str) {
    let filter = std::env::var("DROVER_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| default.to_owned());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new(default));
    if systemd_journal_logger::connected_to_journal() {
        if let Ok(journal) = systemd_journal_logger::JournalLog::new() {
            let journal = journal.with_syslog_identifier(identifier.into());
            if log::set_boxed_logger(Box::new(journal)).is_ok() {
                // Libraries that log through `log` directly (rustls, quinn) bypass the tracing
                // filter: gate them at the filter's most verbose level, so the default "info"
                // keeps their debug chatter out of the journal. (Our own events reach the
                // journal through LogBridge, after the tracing filter.)
                log::set_max_level(match filter.max_level_hint() {
                    Some(l) if l >= tracing_subscriber::filter::LevelFilter::TRACE => {
                        log::LevelFilter::Trace
                    }
                    Some(l) if l >= tracing_subscriber::filter::LevelFilter::DEBUG => {
                        log::LevelFilter::Debug
                    }
                    Some(l) if l >= tracing_subscriber::filter::LevelFilter::INFO => {
                        log::LevelFilter::Info
                    }
                    Some(l) if l >= tracing_subscriber::filter::LevelFilter::WARN => {
                        log::LevelFilter::Warn
                    }
                    _ => log::LevelFilter::Error,
                });
                // tracing events (with their fields) become `log` records, which the journal
                // logger writes as structured journal fields.
                let _ = tracing_subscriber::registry()
                    .with(filter)
                    .with(LogBridge)
                    .try_init();
                return;
            }
        }
    }
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .try_init();
}

/// Forwards tracing events to the `log` facade with their fields as key-values.
struct LogBridge;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LogBridge {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut visitor = Fields::default();
        event.record(&mut visitor);
        let meta = event.metadata();
        let level = match *meta.level() {
            tracing::Level::ERROR => log::Level::Error,
            tracing::Level::WARN => log::Level::Warn,
            tracing::Level::INFO => log::Level::Info,
            tracing::Level::DEBUG => log::Level::Debug,
            tracing::Level::TRACE => log::Level::Trace,
        };
        let kvs: Vec<(String, String)> = visitor.fields;
        let kv_refs: Vec<(&str, &str)> =
            kvs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let text = if kvs.is_empty() {
            visitor.message.clone()
        } else {
            let rendered: Vec<String> = kvs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{} {}", visitor.message, rendered.join(" "))
        };
        log::logger().log(
            &log::Record::builder()
                .level(level)
                .target(meta.target())
                .module_path(meta.module_path())
                .file(meta.file())
                .line(meta.line())
                .key_values(&kv_refs)
                .args(format_args!("{text}"))
                .build(),
        );
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(String, String)>,
}

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.fields
                .push((field.name().to_uppercase(), format!("{value:?}")));
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.fields
                .push((field.name().to_uppercase(), value.to_owned()));
        }
    }
}
