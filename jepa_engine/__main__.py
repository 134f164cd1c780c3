"""`python -m jepa_engine`: the command line (jepa_engine/cli.py)."""
from jepa_engine.cli import main

raise SystemExit(main())
