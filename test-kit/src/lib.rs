//! The toolkit's own test kit: what the integration tests, the benchmarks,
//! the soak and the demo share, written once.
//!
//! | module | what |
//! |---|---|
//! | [`kafka`] | private Apache Kafka brokers (one node, or three) on loopback |
//! | [`rabbitmq`] | a private RabbitMQ node on loopback (to restart, or alarm) |
//! | [`db`] | a fresh database by name |
//! | [`topic`] | a topic on a broker |
//! | [`process`] | a child process killed when dropped, with SIGTERM, exit and RSS |
//! | [`wait`] | waiting for a condition with a deadline |
//! | [`http`] | a minimal HTTP/1.1 client |
//! | [`parse_duration`] | `500ms`, `5s`, `1.5s`, `2m` |
//!
//! Only for this repository's tests and tools (`publish = false`); it reads
//! the environment where a test needs it, which the libraries never do.

use std::time::Duration;

pub mod db;
pub mod http;
pub mod kafka;
pub mod process;
pub mod rabbitmq;
pub mod topic;
pub mod wait;

/// Parses a duration written as `500ms`, `5s`, `1.5s`, a bare number of
/// seconds (`5`, `0.5`), or anything `humantime` reads (`2m`, `1h 30m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let seconds = |n: &str| n.parse::<f64>().ok().filter(|n| n.is_finite() && *n >= 0.0);
    if let Some(ms) = s.strip_suffix("ms").and_then(seconds) {
        return Ok(Duration::from_secs_f64(ms / 1000.0));
    }
    if let Some(secs) = seconds(s.strip_suffix('s').unwrap_or(s)) {
        return Ok(Duration::from_secs_f64(secs));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration such as 500ms, 5s or 2m: {e}"))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_in_every_written_form() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
