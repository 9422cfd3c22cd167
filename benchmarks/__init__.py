"""privsep's benchmark suite: ``python -m benchmarks`` (see ``benchmarks/README.md``).

Every ``benchmarks/bench_*.py`` module is a benchmark. It defines ``NAME``, ``DESCRIPTION`` and
``run(smoke: bool) -> list[dict]``; :mod:`benchmarks.harness` finds, runs and reports them.
This is not a test suite: figures that miss their targets are reported, not failed.
"""
