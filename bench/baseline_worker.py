"""The bench's baseline: a bare Dramatiq actor doing one PostgreSQL UPDATE per message.

Same broker (Redis) and database as Sluice, Dramatiq's default middleware and polling, the
same number of threads. Run as ``python bench/baseline_worker.py`` with BENCH_DATABASE_URL,
BENCH_REDIS_URL, BENCH_NAMESPACE and BENCH_THREADS set.
"""

from __future__ import annotations

import os
import signal
import threading

import dramatiq
from dramatiq import Worker
from dramatiq.brokers.redis import RedisBroker
from psycopg_pool import ConnectionPool


def main() -> None:
    threads = int(os.environ["BENCH_THREADS"])
    broker = RedisBroker(url=os.environ["BENCH_REDIS_URL"], namespace=os.environ["BENCH_NAMESPACE"])
    pool = ConnectionPool(os.environ["BENCH_DATABASE_URL"], min_size=threads, max_size=threads + 2, open=True)

    def touch(item_id: int) -> None:
        with pool.connection() as conn:
            conn.execute("UPDATE bench_items SET done_at = clock_timestamp() WHERE id = %s", (item_id,))

    dramatiq.Actor(touch, broker=broker, actor_name="touch", queue_name="bench", priority=0, options={})
    worker = Worker(broker, worker_threads=threads)
    worker.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    worker.stop()
    broker.close()
    pool.close()


if __name__ == "__main__":
    main()
