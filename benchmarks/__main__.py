"""``python -m benchmarks``: see :mod:`benchmarks.harness` and ``benchmarks/README.md``."""

from benchmarks.harness import main

raise SystemExit(main())
