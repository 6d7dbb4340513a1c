"""Sluice standalone mode (the seeds' "without Redis"): one process, PostgreSQL only.

The API, a pool of worker threads and the scheduler's maintenance share an in-process Dramatiq
broker and rate limiter. Runs are still claimed from PostgreSQL, so priority, delays, retries,
per-user fairness, the rate limit and the concurrency limit behave as in queue mode. Runs left
queued when the process stopped are woken by the reconciler at the next start.

This package is the only place that composes the three services; none of them imports it.
"""
