//! `ChannelLayer`: the `tracing` layer that feeds [`LogChannels`].
//!
//! It formats an event's fields into one message string on the caller's
//! thread, then hands it to [`LogChannels::submit`] — the same non-blocking
//! path as direct submissions. Callsites below their channel's level get
//! `Interest::never` and cost nothing; run-time level changes rebuild the
//! interest cache. Spans are not recorded. The layer filters globally, so
//! it is meant to be the subscriber's only layer (or behind a per-layer
//! filter when composed with others).

use crate::LogChannels;
use std::fmt::{self, Write as _};
use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

#[derive(Clone)]
pub struct ChannelLayer {
    channels: LogChannels,
}

impl ChannelLayer {
    pub(crate) fn new(channels: LogChannels) -> Self {
        Self { channels }
    }
}

impl<S: Subscriber> Layer<S> for ChannelLayer {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if meta.is_event() && self.channels.enabled(meta.target(), *meta.level()) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, meta: &Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        meta.is_event() && self.channels.enabled(meta.target(), *meta.level())
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut visitor = MessageVisitor::default();
        event.record(&mut visitor);
        self.channels
            .submit(meta.target(), *meta.level(), visitor.finish());
    }
}

/// Collects ` key=value` pairs (Debug) and the `message` (Display) into one
/// buffer (one allocation); `finish` moves the message to the front.
#[derive(Default)]
struct MessageVisitor {
    buf: String,
    /// Where the message starts and ends in `buf`, once recorded.
    message: Option<(usize, usize)>,
}

impl MessageVisitor {
    fn record_message(&mut self, value: fmt::Arguments<'_>) {
        let start = self.buf.len();
        let _ = self.buf.write_fmt(value);
        self.message = Some((start, self.buf.len()));
    }

    fn finish(self) -> String {
        match self.message {
            None => self.buf.trim_start().to_string(),
            Some((0, _)) => self.buf,
            Some((start, end)) => {
                // Fields came first: rotate "<fields><message><fields>" into
                // "<message><fields><fields>". Both parts are whole strings,
                // so the bytes stay valid UTF-8.
                let mut bytes = self.buf.into_bytes();
                bytes[..end].rotate_left(start);
                String::from_utf8(bytes)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
            }
        }
    }
}

impl Visit for MessageVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_message(format_args!("{value}"));
        } else {
            let _ = write!(self.buf, " {}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.record_message(format_args!("{value:?}"));
        } else {
            let _ = write!(self.buf, " {}={value:?}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{LogChannels, LogConfig, Record, Sink};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tracing_subscriber::layer::SubscriberExt;

    #[derive(Clone, Default)]
    struct MemSink(Arc<Mutex<Vec<String>>>);

    impl Sink for MemSink {
        fn write(&mut self, rec: &Record) -> std::io::Result<()> {
            let line = format!("{} {} {}", rec.level, rec.channel, rec.message);
            self.0.lock().unwrap().push(line);
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn events_become_records_and_level_raises_take_effect() {
        let ch = LogChannels::new(&LogConfig::default()).unwrap();
        let mem = MemSink::default();
        ch.add_sink("mem", Box::new(mem.clone())).unwrap();
        let subscriber = tracing_subscriber::registry().with(ch.layer());
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "noisy", peer = 7, reason = "slow", "lease lapsed after {} ms", 1500);
            tracing::debug!(target: "noisy", "hidden");
            tracing::info!(target: "noisy", count = 3);
            tracing::info!(target: "noisy", "ünïcode {}", "é");
            tracing::info!(target: "noisy", a = "é", "x");
            tracing::info_span!("ignored").in_scope(|| {});
            ch.set_level("noisy", "debug").unwrap();
            tracing::debug!(target: "noisy", "now shown");
            ch.set_level("noisy", "error").unwrap();
            tracing::warn!(target: "noisy", "hidden again");
        });
        assert!(ch.flush(Duration::from_secs(10)));
        assert_eq!(
            *mem.0.lock().unwrap(),
            [
                "WARN noisy lease lapsed after 1500 ms peer=7 reason=\"slow\"",
                "INFO noisy count=3",
                "INFO noisy ünïcode é",
                "INFO noisy x a=\"é\"",
                "DEBUG noisy now shown",
            ]
        );
    }
}
