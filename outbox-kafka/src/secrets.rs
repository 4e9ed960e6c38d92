//! librdkafka property values are secrets until shown harmless.
//!
//! A SASL password, a TLS key's passphrase or an OAuth token reaches
//! librdkafka as a property, and librdkafka echoes values: a misspelled name
//! (`sasl.pasword=…`) comes back as an error holding the value, and its
//! configuration warnings quote values too. So every value set through
//! [`set_all`] is remembered, unless its key is on the allow-list of
//! [`is_harmless`], and [`redact`] replaces each remembered value with
//! `***` in any text: the errors the relay, consumer-kit and `outbox-dlq`
//! print, and every librdkafka log line ([`crate::logs`]).
//!
//! Values shorter than [`MIN_SECRET_LEN`] characters are not searched for in
//! texts: masking every `1` or `no` would garble the logs, and no credential
//! is that short.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Mutex, OnceLock},
};

use rdkafka::{error::KafkaError, ClientConfig};

/// The shortest value [`redact`] searches for.
pub const MIN_SECRET_LEN: usize = 4;

/// Keys whose values are never secret: addresses, mechanisms, tuning.
const HARMLESS: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "client.id",
    "group.id",
    "group.instance.id",
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.kerberos.service.name",
    "ssl.endpoint.identification.algorithm",
    "ssl.ca.location",
    "ssl.certificate.location",
    "enable.idempotence",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.partition.eof",
    "auto.offset.reset",
    "acks",
    "partitioner",
    "compression.type",
    "compression.codec",
    "debug",
    "isolation.level",
    "partition.assignment.strategy",
    "statistics.interval.ms",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "message.timeout.ms",
    "message.max.bytes",
    "request.timeout.ms",
    "socket.timeout.ms",
    "retries",
    "retry.backoff.ms",
    "linger.ms",
    "topic.metadata.refresh.interval.ms",
    "max.in.flight.requests.per.connection",
];

/// Key prefixes whose values are never secret (tuning families).
const HARMLESS_PREFIXES: &[&str] = &["batch.", "queue.", "queued.", "fetch.", "reconnect."];

/// Whether `key`'s value may be shown as it is.
pub fn is_harmless(key: &str) -> bool {
    HARMLESS.contains(&key) || HARMLESS_PREFIXES.iter().any(|p| key.starts_with(p))
}

fn remembered() -> &'static Mutex<BTreeSet<String>> {
    static SECRETS: OnceLock<Mutex<BTreeSet<String>>> = OnceLock::new();
    SECRETS.get_or_init(|| Mutex::new(BTreeSet::new()))
}

/// Remembers the value of every property whose key is not harmless.
pub fn remember<'a>(properties: impl IntoIterator<Item = (&'a String, &'a String)>) {
    let mut secrets = remembered().lock().unwrap_or_else(|p| p.into_inner());
    for (key, value) in properties {
        if !is_harmless(key) && value.len() >= MIN_SECRET_LEN {
            secrets.insert(value.clone());
        }
    }
}

/// Sets `properties` on `config`, remembering the secret ones for [`redact`].
pub fn set_all(config: &mut ClientConfig, properties: &BTreeMap<String, String>) {
    remember(properties);
    for (key, value) in properties {
        config.set(key, value);
    }
}

/// `text` with every remembered secret value replaced by `***`.
pub fn redact(text: &str) -> String {
    let secrets = remembered().lock().unwrap_or_else(|p| p.into_inner());
    if secrets.is_empty() {
        return text.to_string();
    }
    // Longest first, so a secret that contains another is masked whole.
    let mut by_length: Vec<&String> = secrets.iter().collect();
    by_length.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut out = text.to_string();
    for secret in by_length {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), "***");
        }
    }
    out
}

/// `error` without secrets: one whose text holds a remembered value (a
/// client configuration error echoes the value it refused) becomes a
/// `ClientCreation` error with the value masked. The original is dropped on
/// purpose, since it holds the secret.
pub fn scrub(error: KafkaError) -> KafkaError {
    let text = error.to_string();
    let clean = redact(&text);
    if clean == text {
        error
    } else {
        KafkaError::ClientCreation(clean)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_values_are_masked_and_harmless_ones_kept() {
        let props: BTreeMap<String, String> = [
            ("sasl.pasword", "hunter2-secret"),
            ("sasl.oauthbearer.config", "principal=svc token=tok-abcdef"),
            ("security.protocol", "SASL_SSL"),
            ("linger.ms", "20000"),
            ("ssl.key.password", "abc"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut cc = ClientConfig::new();
        set_all(&mut cc, &props);
        let text = "No such configuration property: \"sasl.pasword\" sasl.pasword hunter2-secret; \
                    principal=svc token=tok-abcdef; SASL_SSL; 20000";
        let out = redact(text);
        assert!(!out.contains("hunter2-secret"), "{out}");
        assert!(!out.contains("tok-abcdef"), "{out}");
        assert!(out.contains("sasl.pasword"), "{out}");
        assert!(out.contains("SASL_SSL") && out.contains("20000"), "{out}");
        assert_eq!(cc.get("sasl.pasword"), Some("hunter2-secret"));
        let refused = cc
            .create::<rdkafka::producer::BaseProducer>()
            .err()
            .expect("an unknown property is refused");
        assert!(
            refused.to_string().contains("hunter2-secret"),
            "librdkafka echoes it"
        );
        let clean = scrub(refused).to_string();
        assert!(!clean.contains("hunter2-secret"), "{clean}");
        assert!(clean.contains("sasl.pasword"), "{clean}");
    }

    #[test]
    fn tuning_families_are_harmless_and_credentials_are_not() {
        assert!(is_harmless("batch.num.messages"));
        assert!(is_harmless("queued.max.messages.kbytes"));
        assert!(!is_harmless("sasl.password"));
        assert!(!is_harmless("sasl.username"));
        assert!(!is_harmless("ssl.key.pem"));
        assert!(!is_harmless("sasl.oauthbearer.client.secret"));
    }
}
