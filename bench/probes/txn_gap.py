#!/usr/bin/env python3
"""How often the transaction coordinator refuses the next transaction of the
same id (CONCURRENT_TRANSACTIONS on AddPartitionsToTxn), by the pause
between one commit and the next transaction. librdkafka retries the refusal
after a fixed 20 ms, which is the tail of --exactly-once at low load
(BENCHMARKS.md, set K).

    pip install confluent-kafka   # the same librdkafka the relay links
    python3 bench/probes/txn_gap.py 0 2 5 10 30

Each gap runs 300 transactions of 10 records (6 partitions) and one
checkpoint record (a second topic), like a relay's small batch. It creates
two topics named probe-* on KAFKA_BROKERS (default 127.0.0.1:9092) and
leaves them; it touches nothing else.
"""
import logging
import os
import sys
import time
import uuid

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

BROKERS = os.environ.get("KAFKA_BROKERS", "127.0.0.1:9092")
TRANSACTIONS = 300


class Refusals(logging.Handler):
    """Counts the refusals in librdkafka's `debug=eos` log."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record):
        if "another concurrent operation" in record.getMessage():
            self.count += 1


def main(gaps_ms):
    suffix = uuid.uuid4().hex[:6]
    data, checkpoint = f"probe-data-{suffix}", f"probe-checkpoint-{suffix}"
    admin = AdminClient({"bootstrap.servers": BROKERS})
    for f in admin.create_topics([NewTopic(data, 6, 1), NewTopic(checkpoint, 1, 1)]).values():
        f.result()
    refusals = Refusals()
    log = logging.getLogger("librdkafka")
    log.addHandler(refusals)
    log.setLevel(logging.DEBUG)
    producer = Producer(
        {
            "bootstrap.servers": BROKERS,
            "transactional.id": f"probe-{suffix}",
            "linger.ms": 0,
            "debug": "eos",
        },
        logger=log,
    )
    producer.init_transactions()
    for gap in gaps_ms:
        refusals.count = 0
        took = []
        for _ in range(TRANSACTIONS):
            time.sleep(gap / 1000)
            start = time.perf_counter()
            producer.begin_transaction()
            for key in range(10):
                producer.produce(data, key=str(key), value=b"x" * 200)
            producer.produce(checkpoint, key="relay", value=b"ids")
            producer.flush()
            producer.commit_transaction()
            took.append((time.perf_counter() - start) * 1000)
        took.sort()
        print(
            f"pause {gap:g} ms: {refusals.count}/{TRANSACTIONS} refused, "
            f"transaction p50 {took[len(took) // 2]:.1f} ms, "
            f"p99 {took[int(len(took) * 0.99)]:.1f} ms",
            flush=True,
        )


if __name__ == "__main__":
    main([float(a) for a in sys.argv[1:]] or [0, 2, 10])
