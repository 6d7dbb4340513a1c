"""``python -m sluice_worker``: start the worker service."""

from sluice_worker.service import main

if __name__ == "__main__":
    main()
