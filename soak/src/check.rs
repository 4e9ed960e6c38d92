//! The checker: compares what producers committed (the ledger), what
//! reached Kafka, and what the consumer applied.
//!
//! - **ledger** `soak_ledger(event_id, key, seq)`: written in the producer's
//!   transaction, with the outbox row. `seq` counts up per key; producers
//!   serialize on the key's row, so seq order is commit order per key.
//! - **published**: on RabbitMQ, the tap queue bound to the run's exchange
//!   (`rabbit.rs`); on Kafka, the whole topic, read to its end with no group, as a
//!   `read_committed` reader (librdkafka's default; the Java client's is
//!   `read_uncommitted`), and a second time as `read_uncommitted` to count the records
//!   of aborted transactions (exactly-once relays) apart.
//! - **effects** `soak_effects(applied, event_id, key, seq)`: written by the
//!   consumer's handler in its dedupe transaction, `applied` counting up in
//!   the order they were written. No unique constraint, so a double effect
//!   shows, and per key the effects must come in seq order, also through
//!   poison events (dead-lettered, then replayed) under park-key.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use anyhow::Context;
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::{Headers, Message},
    ClientConfig, Offset, TopicPartitionList,
};
use sqlx::PgPool;
use uuid::Uuid;

/// The tables the checker reads; the soak creates them.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS soak_keys (key text PRIMARY KEY, seq bigint NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS soak_ledger (event_id uuid PRIMARY KEY, key text NOT NULL, seq bigint NOT NULL, poison boolean NOT NULL DEFAULT false);
CREATE TABLE IF NOT EXISTS soak_effects (applied bigserial, event_id uuid NOT NULL, key text NOT NULL, seq bigint NOT NULL);
CREATE TABLE IF NOT EXISTS soak_control (fixed boolean NOT NULL);
INSERT INTO soak_control SELECT false WHERE NOT EXISTS (SELECT 1 FROM soak_control);
";

/// What the checker counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Verdict {
    /// Events committed by producers.
    pub committed: u64,
    /// Records on the topic.
    pub records: u64,
    /// Committed events that never reached Kafka.
    pub lost: u64,
    /// Records beyond the first of their event id (published twice), as a
    /// `read_committed` reader sees them.
    pub duplicated_in_kafka: u64,
    /// Records only a `read_uncommitted` reader sees: those of aborted
    /// Kafka transactions (exactly-once relays).
    pub aborted_records: u64,
    /// Dead letters replayed onto the topic (deliberate copies of poison
    /// events, which consumers dedupe; not counted as duplicates).
    pub replayed_records: u64,
    /// Per key, first deliveries whose seq is lower than an earlier one's.
    pub out_of_order: u64,
    /// Records on the topic that no producer committed.
    pub phantom: u64,
    /// Committed events the consumer has not applied.
    pub not_applied: u64,
    /// Where those are on Kafka, per partition, beside the consumer
    /// group's committed offset there: whether the consumer never fetched
    /// them or fetched and did not settle them.
    pub not_applied_where: Vec<String>,
    /// Effects beyond the first of their event id.
    pub applied_more_than_once: u64,
    /// Per key, effects applied after an effect of a higher seq.
    pub applied_out_of_order: u64,
    /// Poison events committed (dead-lettered until the end, then replayed).
    pub poison: u64,
}

impl Verdict {
    /// Whether the guarantees held: nothing lost, nothing invented, per-key
    /// order kept, nothing applied twice, everything applied.
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.phantom == 0
            && self.out_of_order == 0
            && self.applied_out_of_order == 0
            && self.applied_more_than_once == 0
            && self.not_applied == 0
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "committed by producers:     {}", self.committed)?;
        writeln!(f, "records published:          {}", self.records)?;
        writeln!(f, "lost (must be 0):           {}", self.lost)?;
        writeln!(f, "phantom (must be 0):        {}", self.phantom)?;
        writeln!(f, "out of order per key (0):   {}", self.out_of_order)?;
        writeln!(
            f,
            "published twice:            {} (Kafka: as read_committed reads)",
            self.duplicated_in_kafka
        )?;
        writeln!(
            f,
            "aborted records:            {} (only read_uncommitted sees them)",
            self.aborted_records
        )?;
        writeln!(
            f,
            "replayed dead letters:      {} (deliberate copies, not duplicates)",
            self.replayed_records
        )?;
        writeln!(f, "not applied (must be 0):    {}", self.not_applied)?;
        for line in &self.not_applied_where {
            writeln!(f, "  {line}")?;
        }
        writeln!(
            f,
            "applied more than once (0): {}",
            self.applied_more_than_once
        )?;
        writeln!(
            f,
            "applied out of key order (0): {}",
            self.applied_out_of_order
        )?;
        write!(f, "poison events (replayed):   {}", self.poison)
    }
}

/// One record as the checker sees it.
pub(crate) struct Seen {
    pub(crate) event_id: Uuid,
    pub(crate) key: String,
    pub(crate) seq: i64,
    /// Its partition and offset, on Kafka.
    pub(crate) at: Option<(i32, i64)>,
}

/// Where the checker reads what was published.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Published<'a> {
    /// The Kafka topic, at these bootstrap servers.
    Kafka(&'a str),
    /// The RabbitMQ tap queue of the run's exchange, at this URL
    /// (`rabbit.rs`).
    RabbitMq(&'a str),
}

/// Runs the comparison. `replayed` counts, per event id, the dead letters
/// the soak sent back to the topic: those copies are not duplicates.
pub(crate) async fn check(
    pool: &PgPool,
    published: Published<'_>,
    topic: &str,
    replayed: &HashMap<Uuid, u64>,
) -> anyhow::Result<Verdict> {
    let mut replays = replayed.clone();
    let ledger: Vec<(Uuid, String, i64)> =
        sqlx::query_as("SELECT event_id, key, seq FROM soak_ledger")
            .fetch_all(pool)
            .await
            .context("reading the ledger")?;
    let ledger: HashMap<Uuid, (String, i64)> =
        ledger.into_iter().map(|(id, k, s)| (id, (k, s))).collect();
    let (records, uncommitted) = match published {
        Published::Kafka(brokers) => {
            let brokers = brokers.to_string();
            let topic = topic.to_string();
            tokio::task::spawn_blocking(move || {
                anyhow::Ok((
                    read_topic(&brokers, &topic, "read_committed")?,
                    read_topic(&brokers, &topic, "read_uncommitted")?.len(),
                ))
            })
            .await??
        }
        Published::RabbitMq(url) => {
            let records = crate::rabbit::read_tap(url, topic).await?;
            let n = records.len();
            (records, n)
        }
    };

    let mut v = Verdict {
        committed: ledger.len() as u64,
        records: records.len() as u64,
        aborted_records: uncommitted.saturating_sub(records.len()) as u64,
        ..Verdict::default()
    };
    let mut first = HashSet::new();
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    for r in &records {
        if !ledger.contains_key(&r.event_id) {
            v.phantom += 1;
            continue;
        }
        if !first.insert(r.event_id) {
            match replays.get_mut(&r.event_id) {
                // A dead letter the soak sent back: a deliberate copy.
                Some(n) if *n > 0 => {
                    *n -= 1;
                    v.replayed_records += 1;
                }
                _ => v.duplicated_in_kafka += 1,
            }
            continue;
        }
        let last = last_seq.entry(r.key.clone()).or_insert(0);
        if r.seq < *last {
            v.out_of_order += 1;
        } else {
            *last = r.seq;
        }
    }
    v.lost = ledger.keys().filter(|id| !first.contains(id)).count() as u64;
    let (effects, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT event_id) FROM soak_effects")
            .fetch_one(pool)
            .await?;
    v.applied_more_than_once = (effects - distinct) as u64;
    let not_applied: HashSet<Uuid> = sqlx::query_scalar(
        "SELECT event_id FROM soak_ledger l WHERE NOT EXISTS (SELECT 1 FROM soak_effects e WHERE e.event_id = l.event_id)",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    v.not_applied = not_applied.len() as u64;
    if !not_applied.is_empty() {
        v.not_applied_where = where_not_applied(published, topic, &records, &not_applied).await?;
    }
    let effects: Vec<(String, i64)> =
        sqlx::query_as("SELECT key, seq FROM soak_effects ORDER BY applied")
            .fetch_all(pool)
            .await?;
    let mut last_applied: HashMap<String, i64> = HashMap::new();
    for (key, seq) in effects {
        let last = last_applied.entry(key).or_insert(0);
        if seq < *last {
            v.applied_out_of_order += 1;
        } else {
            *last = seq;
        }
    }
    v.poison = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM soak_ledger WHERE poison")
        .fetch_one(pool)
        .await? as u64;
    Ok(v)
}

/// The consumer group of the soak's consumer (`outbox-soak consume`).
pub(crate) const GROUP: &str = "soak";

/// Where the events not applied are: per partition, how many, their first
/// and last offsets, and the group's committed offset there (Kafka only).
async fn where_not_applied(
    published: Published<'_>,
    topic: &str,
    records: &[Seen],
    missing: &HashSet<Uuid>,
) -> anyhow::Result<Vec<String>> {
    let Published::Kafka(brokers) = published else {
        return Ok(Vec::new());
    };
    let mut spans: std::collections::BTreeMap<i32, (usize, i64, i64)> = Default::default();
    for (p, o) in records
        .iter()
        .filter(|r| missing.contains(&r.event_id))
        .filter_map(|r| r.at)
    {
        let span = spans.entry(p).or_insert((0, o, o));
        *span = (span.0 + 1, span.1.min(o), span.2.max(o));
    }
    let (brokers, topic) = (brokers.to_string(), topic.to_string());
    let partitions: Vec<i32> = spans.keys().copied().collect();
    let committed = tokio::task::spawn_blocking(move || -> anyhow::Result<TopicPartitionList> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", GROUP)
            .set("enable.auto.commit", "false")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(&topic, p);
        }
        Ok(c.committed_offsets(tpl, Duration::from_secs(10))?)
    });
    let committed = committed.await?;
    Ok(spans
        .iter()
        .map(|(p, (n, first, last))| {
            let group = match &committed {
                Ok(tpl) => match tpl.elements().iter().find(|e| e.partition() == *p) {
                    Some(e) => format!("{:?}", e.offset()),
                    None => "none".into(),
                },
                Err(e) => format!("unknown ({e})"),
            };
            format!(
                "partition {p}: {n} at offsets {first}..={last}; group {GROUP:?} committed {group}"
            )
        })
        .collect())
}

/// Every record of `topic` at `isolation` (`read_committed` or
/// `read_uncommitted`), partition by partition in offset order. Reads to
/// each partition's end: for `read_committed`, once no transaction begun
/// before the high watermark is still open (a killed relay's transaction is
/// aborted when a new relay fences it, or after its timeout).
fn read_topic(brokers: &str, topic: &str, isolation: &str) -> anyhow::Result<Vec<Seen>> {
    let reader = |isolation: &str| -> anyhow::Result<BaseConsumer<QuietEof>> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "outbox-soak-checker")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", isolation)
            .create_with_context(QuietEof)?)
    };
    let c = reader(isolation)?;
    let hw = reader("read_uncommitted")?;
    let timeout = Duration::from_secs(10);
    let md = c.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    anyhow::ensure!(!partitions.is_empty(), "topic {topic} does not exist");
    let mut tpl = TopicPartitionList::new();
    let mut remaining = HashMap::new();
    let open_until = std::time::Instant::now() + Duration::from_secs(120);
    for p in partitions {
        let (low, high) = hw.fetch_watermarks(topic, p, timeout)?;
        if high > low {
            // read_committed's end (the last stable offset) must pass `high`.
            while c.fetch_watermarks(topic, p, timeout)?.1 < high {
                anyhow::ensure!(
                    std::time::Instant::now() < open_until,
                    "a transaction on {topic} partition {p} stayed open for 120 s"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
            remaining.insert(p, high);
        }
    }
    let mut per_partition: HashMap<i32, Vec<(i64, Seen)>> = HashMap::new();
    if remaining.is_empty() {
        return Ok(Vec::new());
    }
    c.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while !remaining.is_empty() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "reading {topic} did not finish within 300 s"
        );
        let m = match c.poll(Duration::from_millis(500)) {
            None => continue,
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                remaining.remove(&p);
                continue;
            }
            Some(m) => m?,
        };
        let p = m.partition();
        if !remaining.contains_key(&p) {
            continue;
        }
        let id = m
            .headers()
            .and_then(|hs| hs.iter().find(|h| h.key == "ce_id").and_then(|h| h.value))
            .and_then(|v| Uuid::parse_str(std::str::from_utf8(v).ok()?).ok())
            .context("a record without a valid ce_id")?;
        let payload: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or(b"null"))?;
        per_partition.entry(p).or_default().push((
            m.offset(),
            Seen {
                event_id: id,
                key: m
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default(),
                seq: payload["seq"].as_i64().unwrap_or(-1),
                at: Some((p, m.offset())),
            },
        ));
    }
    let mut out = Vec::new();
    let mut parts: Vec<_> = per_partition.into_iter().collect();
    parts.sort_by_key(|(p, _)| *p);
    for (_, mut recs) in parts {
        recs.sort_by_key(|(o, _)| *o);
        out.extend(recs.into_iter().map(|(_, s)| s));
    }
    Ok(out)
}

/// The reader's client context: reaching a partition's end is how the read
/// finishes, not an error to log.
struct QuietEof;

impl rdkafka::ClientContext for QuietEof {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF) {
            tracing::warn!(error = %error, reason, "checker's reader");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for QuietEof {}
