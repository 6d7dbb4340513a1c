"""The ``sluice`` command, an app of its own: the one place that runs Sluice on a machine.

:mod:`sluice_cli.commands` is the command line; :mod:`sluice_cli.servers` resolves where the
services find PostgreSQL and Redis (the configured URLs, or the embedded servers of
:mod:`sluice_cli.embedded`, started when a URL is unset); :mod:`sluice_cli.supervisor` runs the
services as child processes. Services are started as ``python -m sluice_<service>`` with the
resolved URLs in their environment, so nothing here imports a service and no service imports this.
"""

__version__ = "0.1.0"
