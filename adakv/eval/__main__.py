"""``python -m adakv.eval``: see :mod:`adakv.eval.cli`."""

from .cli import main

raise SystemExit(main())
