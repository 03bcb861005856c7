"""``python -m zerockpt``: the command line (see :mod:`zerockpt.cli`)."""

from zerockpt.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
