"""``python -m sluice_cli``: the ``sluice`` command."""

from sluice_cli.commands import main

if __name__ == "__main__":
    main()
