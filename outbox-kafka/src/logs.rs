//! librdkafka's logs, said once and without floods.
//!
//! During a broker outage librdkafka reports every failed connection
//! attempt, several per broker per second, and each one twice: as a log line
//! (`log` callback) and as a global error (`error` callback). Left alone
//! that is ~40 lines a second. Here every line goes through one
//! process-wide [`Repeats`] filter keyed by the message with its numbers and
//! thread prefix taken out, so:
//!
//! - the first occurrence of a kind of message is logged at once;
//! - the same kind within the next [`WINDOW`] is counted, not logged;
//! - the first one after the window is logged with how many were held back
//!   ("… (repeated 412 times in the last 10 s)");
//! - a global error that repeats a log line just said is that same kind, so
//!   it is said once.
//!
//! Callers with their own repeating warnings (a consumer's poll errors) use
//! [`limited`].

use std::{
    collections::HashMap,
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use rdkafka::{client::ClientContext, config::RDKafkaLogLevel, error::KafkaError};

/// How long repeats of one kind of message are held back.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Kinds of messages remembered at most; older ones are forgotten first.
const MAX_KINDS: usize = 256;

/// Counts repeats of each kind of message and says when one may be logged.
#[derive(Debug)]
pub struct Repeats {
    window: Duration,
    kinds: Mutex<HashMap<String, Kind>>,
}

#[derive(Debug)]
struct Kind {
    said_at: Instant,
    held_back: u64,
}

impl Repeats {
    /// A filter that holds repeats back for `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            kinds: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a message of kind `key` may be logged at `now`: `None` holds
    /// it back; `Some(n)` logs it, `n` being how many of its kind were held
    /// back since it was last logged.
    pub fn admit(&self, key: &str, now: Instant) -> Option<u64> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(kind) = kinds.get_mut(key) {
            if now.duration_since(kind.said_at) < self.window {
                kind.held_back += 1;
                return None;
            }
            let held_back = std::mem::take(&mut kind.held_back);
            kind.said_at = now;
            return Some(held_back);
        }
        if kinds.len() >= MAX_KINDS {
            // Forget the kind said longest ago.
            if let Some(oldest) = kinds
                .iter()
                .min_by_key(|(_, k)| k.said_at)
                .map(|(key, _)| key.clone())
            {
                kinds.remove(&oldest);
            }
        }
        kinds.insert(
            key.to_string(),
            Kind {
                said_at: now,
                held_back: 0,
            },
        );
        Some(0)
    }
}

/// The kind of a message: without librdkafka's `[thrd:…]: ` prefix and its
/// ` (after 0ms in state CONNECT, …)` tail, with every run of digits replaced
/// by `#` (ports, counts and durations vary between repeats of the same
/// failure).
pub fn kind_of(message: &str) -> String {
    let mut text = message.trim();
    if text.starts_with("[thrd:") {
        if let Some(end) = text.find("]: ") {
            text = &text[end + 3..];
        }
    }
    if let Some(tail) = text.find(" (after ") {
        text = &text[..tail];
    }
    let mut out = String::with_capacity(text.len());
    let mut in_digits = false;
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    out
}

fn repeats() -> &'static Repeats {
    static REPEATS: OnceLock<Repeats> = OnceLock::new();
    REPEATS.get_or_init(|| Repeats::new(WINDOW))
}

/// The suffix for a message logged after `held_back` repeats.
fn suffix(held_back: u64) -> String {
    if held_back == 0 {
        String::new()
    } else {
        format!(
            " (repeated {held_back} times in the last {} s)",
            WINDOW.as_secs()
        )
    }
}

/// Runs `say` with the suffix to append if a message of kind `key` may be
/// logged now (through the process-wide filter); does nothing otherwise.
pub fn limited(key: &str, say: impl FnOnce(&str)) {
    if let Some(held_back) = repeats().admit(key, Instant::now()) {
        say(&suffix(held_back));
    }
}

/// One librdkafka log line, at its level, target `librdkafka`.
pub fn librdkafka_log(level: RDKafkaLogLevel, facility: &str, message: &str) {
    use RDKafkaLogLevel as L;
    let message = &crate::secrets::redact(message);
    if matches!(level, L::Debug) {
        // Debug lines come only when asked for (`debug=…`): all of them.
        tracing::debug!(target: "librdkafka", facility, "{message}");
        return;
    }
    limited(&kind_of(message), |more| match level {
        L::Emerg | L::Alert | L::Critical | L::Error => {
            tracing::error!(target: "librdkafka", facility, "{message}{more}")
        }
        L::Warning => tracing::warn!(target: "librdkafka", facility, "{message}{more}"),
        _ => tracing::info!(target: "librdkafka", facility, "{message}{more}"),
    });
}

/// A global error from librdkafka. Most repeat a log line just said (a
/// failed connection); those are held back as repeats of that line.
pub fn librdkafka_error(error: &KafkaError, reason: &str) {
    limited(
        &kind_of(reason),
        |more| tracing::warn!(target: "librdkafka", error = %error, "{reason}{more}"),
    );
}

/// A client context whose logs and global errors go through [`logs`](self):
/// create producers and admin clients with it instead of rdkafka's
/// `DefaultClientContext`.
#[derive(Debug, Clone, Copy, Default)]
pub struct QuietContext;

impl ClientContext for QuietContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        librdkafka_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        librdkafka_error(&error, reason);
    }
}

/// For plain consumers (no rebalance callbacks of their own).
impl rdkafka::consumer::ConsumerContext for QuietContext {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_within_the_window_are_held_back_and_counted() {
        let r = Repeats::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(r.admit("a", t0), Some(0));
        for i in 1..=412 {
            assert_eq!(r.admit("a", t0 + Duration::from_millis(20 * i)), None);
        }
        // Another kind is not held back by the first.
        assert_eq!(r.admit("b", t0 + Duration::from_secs(1)), Some(0));
        assert_eq!(r.admit("a", t0 + Duration::from_secs(10)), Some(412));
        assert_eq!(r.admit("a", t0 + Duration::from_secs(11)), None);
        assert_eq!(r.admit("a", t0 + Duration::from_secs(30)), Some(1));
        assert_eq!(r.admit("a", t0 + Duration::from_secs(60)), Some(0));
    }

    #[test]
    fn a_log_line_and_its_global_error_are_one_kind() {
        let line = "[thrd:127.0.0.1:44363/1]: 127.0.0.1:44363/1: Connect to ipv4#127.0.0.1:44363 failed: Connection refused (after 0ms in state CONNECT)";
        let global = "127.0.0.1:44363/1: Connect to ipv4#127.0.0.1:44363 failed: Connection refused (after 12ms in state CONNECT, 1 identical error(s) suppressed)";
        assert_eq!(
            kind_of(line),
            "#.#.#.#:#/#: Connect to ipv###.#.#.#:# failed: Connection refused"
        );
        assert_eq!(kind_of(global), kind_of(line));
        assert_ne!(kind_of("Connection reset by peer"), kind_of(line));
    }

    #[test]
    fn memory_is_bounded() {
        let r = Repeats::new(Duration::from_secs(10));
        let t0 = Instant::now();
        for i in 0..10 * MAX_KINDS {
            r.admit(&format!("kind {i}"), t0 + Duration::from_millis(i as u64));
        }
        assert!(r.kinds.lock().unwrap().len() <= MAX_KINDS);
    }
}
