"""Sluice common library: what two or more Sluice services share.

Settings, errors, database access and migrations, the workflow model and its validation,
users and API tokens, the broker and run message contract, the producer side of runs (enqueue,
cancel, reconcile, recover, queue stats), the rate limiter, and the process start-up of a service.
Nothing here imports a service or the ``sluice`` command (``sluice_cli``), nothing runs on its own,
and nothing opens a connection at import time.
"""

__version__ = "0.1.0"
