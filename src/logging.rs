//! The daemon log (the access log is `access_log`): lines on stderr through a queue drained
//! by a thread of its own, in text or JSON, at a level that a reload can change.
//!
//! - Format and level come from `[log]` and apply on every reload (`apply`). A filter given
//!   on the command line (`--log`) or in `RUST_LOG` wins over `[log] level`: it is what an
//!   operator types while debugging.
//! - Lines that a remote peer can cause are bounded. ballast's own data-path warnings go
//!   through `log_limit` where they are written; lines from dependencies (rustls' "Illegal
//!   SNI hostname", h2, hyper) cannot, so this formatter applies the same limit to every
//!   line whose target is not ballast: each call site writes at most one line a second,
//!   and the next line says how many were suppressed (`suppressed=N`).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tracing::{Event, Subscriber};
use tracing_log::{AsLog, NormalizeEvent};
use tracing_subscriber::fmt::format::{Format, Full, Json, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::{LogConfig, LogFormat};

/// What `apply` changes in the installed subscriber.
struct Control {
    filter: reload::Handle<EnvFilter, Registry>,
    json: Arc<AtomicBool>,
    /// `--log` or `RUST_LOG` was given: `[log] level` is not applied.
    level_from_command_line: bool,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

/// Installs the global subscriber: text at `cli_filter` (else `RUST_LOG`, else `info`)
/// until the config's `[log]` is applied. The guard flushes queued lines when dropped.
pub fn init(cli_filter: Option<&str>) -> tracing_appender::non_blocking::WorkerGuard {
    let from_env = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    let level_from_command_line = cli_filter.is_some() || from_env.is_some();
    let filter = cli_filter
        .map(EnvFilter::new)
        .or_else(|| from_env.and_then(|v| EnvFilter::try_new(v).ok()))
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    // At most this many lines wait for a stalled sink (a few MB), then new ones are
    // dropped: a slow journal or a full pipe must never block a worker thread.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(16 * 1024)
        .lossy(true)
        .finish(std::io::stderr());
    let json = Arc::new(AtomicBool::new(false));
    let format = Formatter {
        json: Arc::clone(&json),
        text: Format::default(),
        json_format: Format::default()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .event_format(format)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal())
        // A line the limiter drops is a formatting "error": write nothing, not a complaint.
        .log_internal_errors(false);
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok();
    if installed {
        let _ = CONTROL.set(Control {
            filter: handle,
            json,
            level_from_command_line,
        });
    }
    guard
}

/// Applies `[log]`: at startup and on every reload. Without `init` (tests of the library)
/// it does nothing.
pub fn apply(config: &LogConfig) {
    let Some(control) = CONTROL.get() else {
        return;
    };
    control
        .json
        .store(config.format == LogFormat::Json, Ordering::Relaxed);
    if control.level_from_command_line {
        return;
    }
    // Checked when the config was read, so this parses.
    if let Ok(filter) = EnvFilter::try_new(&config.level) {
        if let Err(e) = control.filter.reload(filter) {
            tracing::warn!(error = %e, "cannot apply [log] level");
        }
        // Records of the `log` crate (rustls) are cut at the level set when the subscriber
        // was installed: follow the new one.
        tracing_log::log::set_max_level(tracing::level_filters::LevelFilter::current().as_log());
    }
}

/// Text or JSON (one object per line, fields at the top level, like the text format's
/// `key=value` pairs), switched by `json`; dependencies' lines rate-limited.
struct Formatter {
    json: Arc<AtomicBool>,
    text: Format<Full>,
    json_format: Format<Json>,
}

impl<S, N> FormatEvent<S, N> for Formatter
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let json = self.json.load(Ordering::Relaxed);
        let target = event.metadata().target();
        // ballast's own lines, and the `log` records of ballast (none today), pass as they
        // are: the ones a peer can repeat are limited where they are written.
        if target == "ballast" || target.starts_with("ballast::") {
            return self.write(json, ctx, writer, event);
        }
        let meta = event.normalized_metadata();
        let meta = meta.as_ref().unwrap_or(event.metadata());
        let key = (meta.target(), meta.file(), meta.line(), "dependency");
        let Some(suppressed) = crate::log_limit::allow(key) else {
            return Err(std::fmt::Error);
        };
        if suppressed == 0 {
            return self.write(json, ctx, writer, event);
        }
        let mut line = String::new();
        self.write(json, ctx, Writer::new(&mut line), event)?;
        let line = line.trim_end_matches('\n');
        match line.strip_suffix('}') {
            Some(object) if json => writeln!(writer, "{object},\"suppressed\":{suppressed}}}"),
            _ => writeln!(writer, "{line} suppressed={suppressed}"),
        }
    }
}

impl Formatter {
    fn write<S, N>(
        &self,
        json: bool,
        ctx: &FmtContext<'_, S, N>,
        writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
    {
        if json {
            self.json_format.format_event(ctx, writer, event)
        } else {
            self.text.format_event(ctx, writer, event)
        }
    }
}
