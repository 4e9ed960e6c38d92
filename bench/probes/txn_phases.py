#!/usr/bin/env python3
"""Where a small Kafka transaction's time goes, against the same records sent
without a transaction: the send phase (produce until every record is
acknowledged) and the commit. No database; the broker on KAFKA_BROKERS
(default 127.0.0.1:9092).

    pip install confluent-kafka
    python3 bench/probes/txn_phases.py plain
    python3 bench/probes/txn_phases.py txn
    python3 bench/probes/txn_phases.py txn eos,protocol    # librdkafka's log of one transaction

Each run sends 300 batches of 10 records over 6 partitions (plus, in a
transaction, one checkpoint record on a second topic), 5 ms apart, like the
relay's batches at 2,000 events/s. It creates two topics named probe-* and
leaves them; it touches nothing else. BENCHMARKS.md, set T, has what it
showed.
"""
import logging
import os
import sys
import time
import uuid

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

BROKERS = os.environ.get("KAFKA_BROKERS", "127.0.0.1:9092")
BATCHES = 300


class Log(logging.Handler):
    """Keeps librdkafka's debug lines with the time they arrived."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append((time.perf_counter(), record.getMessage()))


def main(mode, debug):
    transactional = mode == "txn"
    suffix = uuid.uuid4().hex[:6]
    data, checkpoint = f"probe-data-{suffix}", f"probe-checkpoint-{suffix}"
    admin = AdminClient({"bootstrap.servers": BROKERS})
    for f in admin.create_topics([NewTopic(data, 6, 1), NewTopic(checkpoint, 1, 1)]).values():
        f.result()
    log = Log()
    logger = logging.getLogger("librdkafka")
    logger.addHandler(log)
    logger.setLevel(logging.DEBUG)
    conf = {"bootstrap.servers": BROKERS, "linger.ms": 0, "enable.idempotence": True, "acks": "all"}
    if transactional:
        conf["transactional.id"] = f"probe-{suffix}"
    if debug:
        conf["debug"] = debug
    producer = Producer(conf, logger=logger)
    if transactional:
        producer.init_transactions()
    sends, commits, shown = [], [], None
    for i in range(BATCHES):
        time.sleep(0.005)
        start = time.perf_counter()
        if i == BATCHES // 2:
            shown = (len(log.lines), start)
        if transactional:
            producer.begin_transaction()
        for key in range(10):
            producer.produce(data, key=str(key), value=b"x" * 200)
        if transactional:
            producer.produce(checkpoint, key="relay", value=b"ids")
        producer.flush()
        sent = time.perf_counter()
        if transactional:
            producer.commit_transaction()
        sends.append((sent - start) * 1000)
        commits.append((time.perf_counter() - sent) * 1000)
    sends.sort()
    commits.sort()
    q = lambda v, p: v[int(p * (len(v) - 1))]
    print(
        f"{mode}: send p50 {q(sends, .5):.2f} p90 {q(sends, .9):.2f} p99 {q(sends, .99):.2f} ms"
        f" | commit p50 {q(commits, .5):.2f} p90 {q(commits, .9):.2f} p99 {q(commits, .99):.2f} ms"
    )
    if debug and shown:
        first, t0 = shown
        for t, line in log.lines[first : first + 60]:
            print(f"{(t - t0) * 1000:7.2f} ms  {line[:150]}")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("plain", "txn"):
        sys.exit("usage: txn_phases.py plain|txn [librdkafka debug contexts]")
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
