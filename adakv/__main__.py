"""`python -m adakv COMMAND` is the same as the `adakv` console script."""

from adakv.apps.cli import main

raise SystemExit(main())
