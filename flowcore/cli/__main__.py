"""`python -m flowcore.cli ...` runs the command line, as `python -m flowcore` does."""

from flowcore.cli import main

raise SystemExit(main())
