//! [`Batch`]: one claimed batch, row by row, from the claim to what becomes
//! of each row. The decisions that keep per-key order live here as pure
//! functions with unit tests; the publish loop ([`crate::relay`]) does the
//! I/O around them.
//!
//! ```text
//!  claimed rows, in id order
//!     │  prepare (relay): build the record, look up its topic
//!     ▼
//!  Batch::plan ──► one Slot per row:
//!     │              Send  the record goes to Kafka
//!     │              Fail  it cannot be sent now (malformed row, missing
//!     │                    topic: permanent; unknown topic state: transient)
//!     │              Held  an earlier row of its key was not sent, so it
//!     │                    must not overtake that row: it stays pending,
//!     │                    untouched (not even its attempt count)
//!     ▼
//!  publisher: one outcome per sent record
//!     │
//!     ▼
//!  Batch::settle ──► one Fate per row: Delivered, Failed, Retry or Held.
//!                    All delivered: the claim commits. Otherwise it rolls
//!                    back and the fates are written row by row
//!                    (Batch::resolution).
//! ```
//!
//! A key is held after its first unsent row when that row's failure is
//! transient (it will be sent later, and its successors must follow it), or
//! permanent under [`PoisonPolicy::BlockKey`] (the default: the key waits for
//! an operator's `failed retry` or `failed discard`). Under
//! [`PoisonPolicy::SkipRow`] a permanently failed row does not hold its key.

use std::collections::HashSet;

use crate::{
    claim::{OutboxRow, Resolution},
    config::PoisonPolicy,
    publisher::Outcome,
    record::Record,
};

/// What the batch does with one row before anything is sent.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Slot {
    /// Sent to Kafka, to this topic.
    Send {
        /// The record's topic.
        topic: String,
    },
    /// Not sent: it fails now (permanently or transiently).
    Fail(Outcome),
    /// Not sent: an earlier row of its key in this batch was not sent.
    Held,
}

/// What became of one row once the batch's outcomes are in.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Fate<'a> {
    /// Kafka acknowledged it.
    Delivered {
        /// Its topic.
        topic: &'a str,
    },
    /// It can never be published as it is.
    Failed(String),
    /// It stays pending and is tried again, with its attempt counted.
    Retry(String),
    /// It stays pending, untouched: an earlier row of its key was not sent.
    Held,
}

/// A claimed batch: its rows, in id order, and a slot for each.
#[derive(Debug)]
pub(crate) struct Batch {
    rows: Vec<OutboxRow>,
    slots: Vec<Slot>,
}

impl Batch {
    /// Decides each row's slot, in order. `prepared[i]` is row `i`'s record,
    /// or the outcome that stops it being sent. Returns the batch and the
    /// records to send, aligned with the rows (`None`: not sent).
    pub(crate) fn plan(
        rows: Vec<OutboxRow>,
        prepared: Vec<Result<Record, Outcome>>,
        policy: PoisonPolicy,
    ) -> (Batch, Vec<Option<Record>>) {
        assert_eq!(rows.len(), prepared.len(), "one preparation per row");
        let mut held: HashSet<(&str, &str)> = HashSet::new();
        let mut slots = Vec::with_capacity(rows.len());
        let mut records = Vec::with_capacity(rows.len());
        for (row, prep) in rows.iter().zip(prepared) {
            let key = (row.aggregate_type.as_str(), row.aggregate_id.as_str());
            if held.contains(&key) {
                slots.push(Slot::Held);
                records.push(None);
                continue;
            }
            match prep {
                Ok(record) => {
                    slots.push(Slot::Send {
                        topic: record.topic.clone(),
                    });
                    records.push(Some(record));
                }
                Err(outcome) => {
                    if holds_key(&outcome, policy) {
                        held.insert(key);
                    }
                    slots.push(Slot::Fail(outcome));
                    records.push(None);
                }
            }
        }
        (Batch { rows, slots }, records)
    }

    /// The batch's rows, in id order.
    pub(crate) fn rows(&self) -> &[OutboxRow] {
        &self.rows
    }

    /// How many records the batch sends.
    pub(crate) fn sent(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s, Slot::Send { .. }))
            .count()
    }

    /// The ids of the rows the batch sends.
    pub(crate) fn sent_ids(&self) -> Vec<i64> {
        self.rows
            .iter()
            .zip(&self.slots)
            .filter(|(_, s)| matches!(s, Slot::Send { .. }))
            .map(|(r, _)| r.id)
            .collect()
    }

    /// Whether every sent row was delivered (then a Kafka transaction may
    /// commit, even if rows that were never sent failed).
    pub(crate) fn all_sent_delivered(&self, fates: &[Fate<'_>]) -> bool {
        self.slots
            .iter()
            .zip(fates)
            .all(|(s, f)| !matches!(s, Slot::Send { .. }) || matches!(f, Fate::Delivered { .. }))
    }

    /// Each row's fate, given the publisher's outcomes (aligned with the
    /// rows, `None` for a row not sent). A sent row without an outcome (a
    /// publisher that gave up waiting) is retried.
    pub(crate) fn settle(&self, outcomes: &[Option<Outcome>]) -> Vec<Fate<'_>> {
        let no_report = Outcome::Transient("no delivery report in time".into());
        self.slots
            .iter()
            .enumerate()
            .map(|(i, slot)| match slot {
                Slot::Held => Fate::Held,
                Slot::Fail(outcome) => fate_of(outcome, ""),
                Slot::Send { topic } => fate_of(
                    outcomes
                        .get(i)
                        .and_then(Option::as_ref)
                        .unwrap_or(&no_report),
                    topic,
                ),
            })
            .collect()
    }

    /// What to write for a batch that was rolled back: the rows to delete
    /// (or mark), to fail and to retry. Held rows are left alone.
    pub(crate) fn resolution(&self, fates: &[Fate<'_>]) -> Resolution {
        let mut res = Resolution::default();
        for (row, fate) in self.rows.iter().zip(fates) {
            match fate {
                Fate::Delivered { .. } => res.delivered.push(row.id),
                Fate::Failed(reason) => res.failed.push((row.id, reason.clone())),
                Fate::Retry(reason) => res.retry.push((row.id, reason.clone())),
                Fate::Held => {}
            }
        }
        res
    }
}

/// Whether every row was delivered (then the claim commits).
pub(crate) fn all_delivered(fates: &[Fate<'_>]) -> bool {
    fates.iter().all(|f| matches!(f, Fate::Delivered { .. }))
}

/// The fates after the batch's Kafka transaction was aborted: nothing of it
/// is visible, so a delivered row stays pending, untouched, to be sent again.
pub(crate) fn aborted(fates: Vec<Fate<'_>>) -> Vec<Fate<'_>> {
    fates
        .into_iter()
        .map(|f| match f {
            Fate::Delivered { .. } => Fate::Held,
            other => other,
        })
        .collect()
}

/// Whether a row that was not sent holds the later rows of its key.
fn holds_key(outcome: &Outcome, policy: PoisonPolicy) -> bool {
    match outcome {
        Outcome::Transient(_) => true,
        Outcome::Permanent(_) => policy == PoisonPolicy::BlockKey,
        Outcome::Delivered => false,
    }
}

fn fate_of<'a>(outcome: &Outcome, topic: &'a str) -> Fate<'a> {
    match outcome {
        Outcome::Delivered => Fate::Delivered { topic },
        Outcome::Permanent(reason) => Fate::Failed(reason.clone()),
        Outcome::Transient(reason) => Fate::Retry(reason.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::OwnedHeaders;

    fn row(id: i64, key: &str) -> OutboxRow {
        OutboxRow {
            id,
            event_id: uuid::Uuid::new_v4(),
            aggregate_type: "order".into(),
            aggregate_id: key.into(),
            event_type: "order.placed".into(),
            event_version: 1,
            topic: None,
            payload: Some("{}".into()),
            payload_bytes: None,
            content_type: "application/json".into(),
            headers: "{}".into(),
            correlation_id: None,
            causation_id: None,
            traceparent: None,
            tracestate: None,
            source: None,
            occurred_at: chrono::Utc::now(),
            created_at: chrono::Utc::now(),
        }
    }

    fn ok(key: &str) -> Result<Record, Outcome> {
        Ok(Record {
            topic: "orders".into(),
            key: key.into(),
            value: Some(b"{}".to_vec()),
            headers: OwnedHeaders::new(),
        })
    }

    fn permanent() -> Result<Record, Outcome> {
        Err(Outcome::Permanent("malformed".into()))
    }

    fn transient() -> Result<Record, Outcome> {
        Err(Outcome::Transient("no metadata".into()))
    }

    fn plan(
        rows: &[(i64, &str, Result<Record, Outcome>)],
        policy: PoisonPolicy,
    ) -> (Batch, Vec<Option<Record>>) {
        Batch::plan(
            rows.iter().map(|(id, key, _)| row(*id, key)).collect(),
            rows.iter().map(|(_, _, p)| p.clone()).collect(),
            policy,
        )
    }

    fn send() -> Slot {
        Slot::Send {
            topic: "orders".into(),
        }
    }

    #[test]
    fn a_permanently_failed_row_holds_its_key_under_block_key_only() {
        let rows = [
            (1, "a", permanent()),
            (2, "a", ok("a")),
            (3, "b", ok("b")),
            (4, "a", ok("a")),
        ];
        let (batch, records) = plan(&rows, PoisonPolicy::BlockKey);
        assert_eq!(
            batch.slots,
            vec![
                Slot::Fail(Outcome::Permanent("malformed".into())),
                Slot::Held,
                send(),
                Slot::Held
            ]
        );
        assert_eq!(records.iter().filter(|r| r.is_some()).count(), 1);
        assert_eq!(batch.sent(), 1);

        let (batch, _) = plan(&rows, PoisonPolicy::SkipRow);
        assert_eq!(
            batch.slots,
            vec![
                Slot::Fail(Outcome::Permanent("malformed".into())),
                send(),
                send(),
                send()
            ]
        );
    }

    #[test]
    fn a_transient_failure_holds_its_key_under_either_policy() {
        for policy in [PoisonPolicy::BlockKey, PoisonPolicy::SkipRow] {
            let rows = [(1, "a", transient()), (2, "a", ok("a")), (3, "b", ok("b"))];
            let (batch, _) = plan(&rows, policy);
            assert_eq!(
                batch.slots,
                vec![
                    Slot::Fail(Outcome::Transient("no metadata".into())),
                    Slot::Held,
                    send()
                ],
                "{policy:?}"
            );
        }
    }

    #[test]
    fn a_key_is_held_only_after_its_failed_row_and_keys_are_types_and_ids() {
        let mut other_type = row(3, "a");
        other_type.aggregate_type = "invoice".into();
        let (batch, _) = Batch::plan(
            vec![row(1, "a"), row(2, "a"), other_type, row(4, "a")],
            vec![ok("a"), transient(), ok("a"), ok("a")],
            PoisonPolicy::BlockKey,
        );
        // Row 1 goes before the failure; invoice "a" is another key.
        assert_eq!(
            batch.slots,
            vec![
                send(),
                Slot::Fail(Outcome::Transient("no metadata".into())),
                send(),
                Slot::Held
            ]
        );
    }

    #[test]
    fn settling_gives_each_row_its_fate_and_held_rows_stay_untouched() {
        let rows = [(1, "a", ok("a")), (2, "b", permanent()), (3, "b", ok("b"))];
        let (batch, _) = plan(&rows, PoisonPolicy::BlockKey);
        let outcomes = vec![Some(Outcome::Delivered), None, None];
        let fates = batch.settle(&outcomes);
        assert_eq!(
            fates,
            vec![
                Fate::Delivered { topic: "orders" },
                Fate::Failed("malformed".into()),
                Fate::Held
            ]
        );
        assert!(!all_delivered(&fates));
        let res = batch.resolution(&fates);
        assert_eq!(res.delivered, vec![1]);
        assert_eq!(res.failed, vec![(2, "malformed".to_string())]);
        assert!(res.retry.is_empty(), "a held row is not retried: {res:?}");
    }

    #[test]
    fn a_batch_whose_reports_never_came_is_retried_whole() {
        let rows = [(1, "a", ok("a")), (2, "b", ok("b"))];
        let (batch, _) = plan(&rows, PoisonPolicy::BlockKey);
        // The publisher gave up waiting: no outcome for any sent record.
        let fates = batch.settle(&[]);
        assert_eq!(
            fates,
            vec![
                Fate::Retry("no delivery report in time".into()),
                Fate::Retry("no delivery report in time".into())
            ]
        );
        let res = batch.resolution(&fates);
        assert_eq!(res.retry.len(), 2);
    }

    #[test]
    fn every_row_delivered_commits() {
        let rows = [(1, "a", ok("a")), (2, "a", ok("a"))];
        let (batch, records) = plan(&rows, PoisonPolicy::BlockKey);
        assert_eq!(records.len(), 2);
        let fates = batch.settle(&[Some(Outcome::Delivered), Some(Outcome::Delivered)]);
        assert!(all_delivered(&fates));
    }

    #[test]
    fn an_aborted_transaction_leaves_its_delivered_rows_pending() {
        let rows = [(1, "a", ok("a")), (2, "b", permanent()), (3, "c", ok("c"))];
        let (batch, _) = plan(&rows, PoisonPolicy::SkipRow);
        assert_eq!(batch.sent_ids(), vec![1, 3]);
        let fates = batch.settle(&[
            Some(Outcome::Delivered),
            None,
            Some(Outcome::Transient("timed out".into())),
        ]);
        assert!(!batch.all_sent_delivered(&fates));
        let fates = aborted(fates);
        assert_eq!(fates[0], Fate::Held);
        assert!(matches!(fates[1], Fate::Failed(_)));
        assert!(matches!(fates[2], Fate::Retry(_)));
        let res = batch.resolution(&fates);
        assert!(res.delivered.is_empty());

        let fates = batch.settle(&[Some(Outcome::Delivered), None, Some(Outcome::Delivered)]);
        assert!(batch.all_sent_delivered(&fates));
        assert!(!all_delivered(&fates), "the unsent row still fails");
    }
}
