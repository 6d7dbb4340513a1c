"""``python -m sluice_scheduler``: start the scheduler service."""

from sluice_scheduler.service import main

if __name__ == "__main__":
    main()
