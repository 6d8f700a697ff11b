"""`python -m flowcore ...` runs the command line."""

from flowcore.cli import main

raise SystemExit(main())
