"""Find, run and report the benchmarks: ``python -m benchmarks [NAMES...] [--smoke] [--json-only]``.

A benchmark is any ``benchmarks/bench_*.py`` module with::

    NAME = "rpc"                          # short label (defaults to the file name)
    DESCRIPTION = "what it measures"      # one line, shown in progress and stored in the JSON
    def run(smoke: bool) -> list[dict]:   # one dict ("row") per figure

New benchmarks plug in by existing; nothing here names them. A row needs ``measure`` (text),
``ours`` (a number) and ``unit``; it may carry ``ours_p99``, ``baseline``, ``baseline_p99``,
``baseline_measure`` (what the baseline is), ``baseline_unit``, ``ratio`` (ours / baseline,
computed when missing), ``target`` (text such as ``">= 5000 req/s"`` or ``"p99 <= 10 ms"``,
compared in the row's own unit), ``passed`` (a bool that overrides the target check), ``n`` and
``note``. :func:`figure` builds such a row from :class:`Stats`; benchmarks may also write rows
by hand.

Why this shape: absolute times are noisy on shared machines, so every figure is a median over
repeated runs after a warm-up, reported with its p99 and beside a baseline measured in the same
run. Targets are figures to watch, not tests: a missed target is printed as "fail" and the
command still exits 0. Only a benchmark that crashes (or returns malformed rows) makes the exit
status non-zero, because then the suite itself is broken.

This module imports only the standard library, so load generators and other helper processes
can use its statistics without paying for the server's imports.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import json
import math
import os
import platform
import re
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

PACKAGE_DIR = Path(__file__).resolve().parent
RESULTS_DIR = PACKAGE_DIR / "results"
MODULE_PREFIX = "bench_"

EXIT_OK = 0
EXIT_CRASHED = 1
EXIT_USAGE = 2

Row = dict[str, Any]

# --- statistics ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), interpolated between closest ranks as numpy does."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Stats:
    """A figure: the median of its samples and the p99 toward the bad end.

    For a time the bad end is the slow one (the 99th percentile); for a rate it is the low one
    (the 1st percentile), so "p99" always reads as "what 99% of samples did at least as well
    as". ``p99`` is None for a single-valued figure.
    """

    median: float
    p99: float | None
    n: int

    @classmethod
    def of(cls, samples: Sequence[float], *, higher_is_better: bool = False) -> Stats:
        if not samples:
            raise ValueError("no samples")
        tail = percentile(samples, 1.0 if higher_is_better else 99.0)
        return cls(statistics.median(samples), tail if len(samples) > 1 else None, len(samples))

    @classmethod
    def single(cls, value: float) -> Stats:
        return cls(value, None, 1)

    def scaled(self, factor: float) -> Stats:
        """The same figure in another unit (seconds to ms: ``scaled(1e3)``)."""
        p99 = None if self.p99 is None else self.p99 * factor
        return Stats(self.median * factor, p99, self.n)


def time_each(fn: Callable[[], object], *, repeat: int, warmup: int) -> list[float]:
    """Seconds taken by each of ``repeat`` calls, after ``warmup`` untimed ones.

    For calls of tens of microseconds or more, where reading the clock costs nothing in
    comparison and the per-call spread (the p99) is what matters."""
    for _ in range(warmup):
        fn()
    clock = time.perf_counter
    samples: list[float] = []
    for _ in range(repeat):
        start = clock()
        fn()
        samples.append(clock() - start)
    return samples


def time_batches(
    fn: Callable[[], object], *, batch: int, repeat: int, warmup: int = 1
) -> list[float]:
    """Seconds per call, one sample per batch of ``batch`` calls, after ``warmup`` batches.

    For calls so short (well under a microsecond) that a clock read around each would measure
    the clock instead of the call."""
    clock = time.perf_counter
    loop = range(batch)
    samples: list[float] = []
    for index in range(warmup + repeat):
        start = clock()
        for _ in loop:
            fn()
        elapsed = clock() - start
        if index >= warmup:
            samples.append(elapsed / batch)
    return samples


def timed_rounds(
    fn: Callable[[], object], *, rounds: int, seconds: float, warmup_seconds: float
) -> list[list[float]]:
    """Call ``fn`` back to back for ``warmup_seconds``, then for ``rounds`` rounds of
    ``seconds`` each; returns each round's per-call durations.

    For throughput baselines that must run as long as the figure they sit beside, whatever the
    speed of the machine, rather than a fixed number of times."""
    clock = time.perf_counter
    end = clock() + warmup_seconds
    while clock() < end:
        fn()
    result: list[list[float]] = []
    for _ in range(rounds):
        samples: list[float] = []
        end = clock() + seconds
        now = clock()
        while now < end:
            fn()
            after = clock()
            samples.append(after - now)
            now = after
        result.append(samples)
    return result


def rounds_rate(rounds: Sequence[Sequence[float]]) -> Stats:
    """Calls per second of each round (count over the round's summed call time)."""
    return Stats.of([len(r) / sum(r) for r in rounds if r], higher_is_better=True)


def figure(
    measure: str,
    ours: Stats,
    unit: str,
    *,
    baseline: Stats | None = None,
    baseline_measure: str = "",
    baseline_unit: str = "",
    target: str | None = None,
    note: str = "",
    higher_is_better: bool = False,
) -> Row:
    """One row of the report: our figure, the same-run baseline and the ratio between them."""
    row: Row = {
        "measure": measure,
        "ours": ours.median,
        "ours_p99": ours.p99,
        "n": ours.n,
        "unit": unit,
        "baseline": baseline.median if baseline else None,
        "baseline_p99": baseline.p99 if baseline else None,
        "baseline_measure": baseline_measure,
        "baseline_unit": baseline_unit or unit,
        "target": target,
        "better": "higher" if higher_is_better else "lower",
        "note": note,
    }
    row["ratio"] = _ratio(row["ours"], row["baseline"])
    return row


def _ratio(ours: object, baseline: object) -> float | None:
    if _is_number(ours) and _is_number(baseline) and baseline:
        return float(ours) / float(baseline)
    return None


def _is_number(value: object) -> TypeGuard[int | float]:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and not (isinstance(value, float) and math.isnan(value))
    )


# --- targets ---------------------------------------------------------------------------------

_TARGET = re.compile(
    r"^\s*(?P<stat>p50|median|p99)?\s*(?P<op>>=|<=|≥|≤|>|<)\s*"
    r"(?P<value>\d[\d,_]*(?:\.\d+)?)\s*(?P<unit>.*?)\s*$",
    re.IGNORECASE,
)
# What benchmarks write for "no target"; anything else unreadable shows as "?".
_NO_TARGET = frozenset({"", "-", "\u2014", "\u2013", "n/a", "none"})  # em, en dash
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b,
    "≥": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    "≤": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
}


@dataclass(frozen=True)
class Target:
    """A parsed target: which statistic, which comparison, which number (in the row's unit)."""

    stat: str  # "ours" (the median) or "ours_p99"
    op: str
    value: float
    unit: str

    @classmethod
    def parse(cls, text: str) -> Target | None:
        match = _TARGET.match(text)
        if not match:
            return None
        stat = "ours_p99" if (match["stat"] or "").lower() == "p99" else "ours"
        value = float(match["value"].replace(",", "").replace("_", ""))
        return cls(stat, match["op"], value, match["unit"])

    def holds(self, row: Row) -> bool | None:
        figure_value = row.get(self.stat)
        if not _is_number(figure_value):
            return None
        return _OPS[self.op](float(figure_value), self.value)


def verdict(row: Row) -> str:
    """ "pass", "fail", "—" (no target) or "?" (a target the harness cannot read)."""
    passed = row.get("passed")
    if isinstance(passed, bool):
        return "pass" if passed else "fail"
    target = row.get("target")
    if target is None or str(target).strip().lower() in _NO_TARGET:
        return "—"
    parsed = Target.parse(str(target))
    outcome = parsed.holds(row) if parsed else None
    if outcome is None:
        return "?"
    return "pass" if outcome else "fail"


# --- rows ------------------------------------------------------------------------------------


class MalformedRow(ValueError):
    """A benchmark returned something that is not a row; the benchmark counts as crashed."""


def normalize(row: object, index: int) -> Row:
    """Check a row's required keys and fill in the optional ones, so reports never guess."""
    if not isinstance(row, dict):
        raise MalformedRow(f"row {index} is a {type(row).__name__}, not a dict")
    measure = row.get("measure")
    if not isinstance(measure, str) or not measure:
        raise MalformedRow(f"row {index} has no 'measure' text")
    if row.get("ours") is not None and not _is_number(row["ours"]):
        raise MalformedRow(f"row {index} ({measure}): 'ours' is {row['ours']!r}, not a number")
    out: Row = {
        "measure": measure,
        "ours": None,
        "ours_p99": None,
        "unit": "",
        "baseline": None,
        "baseline_p99": None,
        "baseline_measure": "",
        "baseline_unit": "",
        "ratio": None,
        "target": None,
        "note": "",
    }
    out.update(row)
    out["baseline_unit"] = out["baseline_unit"] or out["unit"]
    if out["ratio"] is None:
        out["ratio"] = _ratio(out["ours"], out["baseline"])
    out["verdict"] = verdict(out)
    return out


# --- formatting ------------------------------------------------------------------------------


def fmt(value: object) -> str:
    """Three significant digits or so, thousands separated: figures, not measurements."""
    if not _is_number(value):
        return "—" if value is None else str(value)
    number = float(value)
    size = abs(number)
    if size >= 1000:
        return f"{number:,.0f}"
    if size >= 100:
        return f"{number:.0f}"
    if size >= 10:
        return f"{number:.1f}"
    if size >= 1:
        return f"{number:.2f}"
    if size == 0:
        return "0"
    return f"{number:.3g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _value_cell(value: object, p99: object, unit: str, label: str = "") -> str:
    if value is None:
        return "—"
    text = f"{fmt(value)} {unit}".strip()
    if _is_number(p99):
        text += f" (p99 {fmt(p99)})"
    if label:
        text += f"; {label}"
    return text


def _target_cell(row: Row) -> str:
    target = row.get("target")
    if target is None or str(target).strip().lower() in _NO_TARGET:
        return "—"
    parsed = Target.parse(str(target))
    if parsed and not parsed.unit and row.get("unit"):
        return f"{target} {row['unit']}"
    return str(target)


TABLE_HEADER = (
    "| measure | ours (median, p99) | baseline (same run) | ratio | target | pass/fail |\n"
    "|---|---|---|---|---|---|"
)


def markdown_table(rows: Sequence[Row]) -> str:
    lines = [TABLE_HEADER]
    for row in rows:
        ratio = f"{fmt(row['ratio'])}\u00d7" if _is_number(row.get("ratio")) else "—"
        cells = [
            row["measure"],
            _value_cell(row["ours"], row.get("ours_p99"), row.get("unit", "")),
            _value_cell(
                row.get("baseline"),
                row.get("baseline_p99"),
                row.get("baseline_unit", ""),
                row.get("baseline_measure", ""),
            ),
            ratio,
            _target_cell(row),
            row["verdict"],
        ]
        lines.append("| " + " | ".join(_cell(str(c)) for c in cells) + " |")
    return "\n".join(lines)


# --- machine ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Where the figures come from: they mean little without cores, memory and CPU model."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu_model": _proc_field("/proc/cpuinfo", "model name"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        # Other work on the machine skews every absolute figure; the same-run baselines absorb
        # some of it, and this says how much there was when the run began.
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    mem_kib = _proc_field("/proc/meminfo", "MemTotal")
    if mem_kib:
        info["memory_gib"] = round(int(mem_kib.split()[0]) / 1024 / 1024, 1)
    with contextlib.suppress(OSError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            info["cgroup_cpu_limit"] = round(int(quota) / int(period), 2)
    return info


class StealMeter:
    """The share of CPU time the hypervisor gave to other guests (``steal`` in ``/proc/stat``)
    between two readings. On a shared VM it inflates every absolute figure, the baselines'
    too, and the load average does not show it."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[int, int] | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            return fields[7], sum(fields[:8])  # steal, and user..steal together
        return None

    def percent(self) -> float | None:
        end = self._read()
        if self._start is None or end is None or end[1] <= self._start[1]:
            return None
        return round((end[0] - self._start[0]) / (end[1] - self._start[1]) * 100, 1)


def _proc_field(path: str, name: str) -> str:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == name:
                return value.strip()
    return ""


def describe_machine(info: dict[str, Any]) -> str:
    parts = [f"{info['usable_cores']} cores"]
    if "cgroup_cpu_limit" in info:
        parts.append(f"cgroup limit {info['cgroup_cpu_limit']} CPUs")
    if "memory_gib" in info:
        parts.append(f"{info['memory_gib']} GiB")
    if info.get("cpu_model"):
        parts.append(str(info["cpu_model"]))
    parts.append(f"Python {info['python']}")
    if "load_average_1m" in info:
        parts.append(f"load average {info['load_average_1m']} at start")
    if info.get("cpu_steal_pct") is not None:
        parts.append(f"CPU steal {info['cpu_steal_pct']}% during the run (the host's other guests)")
    return ", ".join(parts)


# --- progress --------------------------------------------------------------------------------

_label = "bench"
_started = time.monotonic()


def progress(message: str) -> None:
    """One line on stderr, stamped with the benchmark and its elapsed time: long runs should
    show they are alive, and stdout stays clean for the table."""
    print(
        f"  [{_label} {time.monotonic() - _started:6.1f}s] {message}", file=sys.stderr, flush=True
    )


@contextlib.contextmanager
def _progress_label(label: str) -> Iterator[None]:
    global _label, _started
    _label, _started = label, time.monotonic()
    try:
        yield
    finally:
        _label = "bench"


# --- discovery and running -------------------------------------------------------------------


def discover() -> list[str]:
    """Module names of every ``bench_*.py`` beside this file, in a stable order."""
    return sorted(path.stem for path in PACKAGE_DIR.glob(f"{MODULE_PREFIX}*.py"))


def resolve(names: Sequence[str], available: Sequence[str]) -> list[str]:
    """Map what people type (``rpc``, ``bench_rpc``, ``benchmarks/bench_rpc.py``) to modules."""
    chosen: list[str] = []
    unknown: list[str] = []
    for name in names:
        stem = Path(name).stem if name.endswith(".py") else name
        module = stem if stem.startswith(MODULE_PREFIX) else MODULE_PREFIX + stem
        if module not in available:
            unknown.append(name)
        elif module not in chosen:
            chosen.append(module)
    if unknown:
        raise KeyError(
            f"no benchmark named {', '.join(unknown)}; available: "
            + ", ".join(m.removeprefix(MODULE_PREFIX) for m in available)
        )
    return chosen


def short_name(module: str) -> str:
    return module.removeprefix(MODULE_PREFIX)


def run_benchmark(module_name: str, *, smoke: bool, position: str) -> dict[str, Any]:
    """Import and run one benchmark; a crash is recorded in the result, never raised.

    The benchmark's stdout goes to stderr, so nothing it prints can corrupt the table or the
    JSON on stdout."""
    short = short_name(module_name)
    started_at = dt.datetime.now(dt.UTC)
    start = time.monotonic()
    result: dict[str, Any] = {
        "benchmark": short,
        "module": f"benchmarks.{module_name}",
        "name": short,
        "description": "",
        "smoke": smoke,
        "started_at": started_at.isoformat(timespec="seconds"),
        "rows": [],
        "error": None,
    }
    print(f"==> {short} ({position})", file=sys.stderr, flush=True)
    with _progress_label(short), contextlib.redirect_stdout(sys.stderr):
        try:
            module = importlib.import_module(f"benchmarks.{module_name}")
            result["name"] = str(getattr(module, "NAME", short))
            result["description"] = str(getattr(module, "DESCRIPTION", module.__doc__ or ""))
            if result["description"]:
                progress(result["description"].strip().splitlines()[0])
            run = getattr(module, "run", None)
            if not callable(run):
                raise TypeError(f"benchmarks.{module_name} has no run(smoke) function")
            raw = run(smoke)
            if not isinstance(raw, list):
                raise MalformedRow(f"run() returned a {type(raw).__name__}, not a list")
            result["rows"] = [normalize(row, i) for i, row in enumerate(raw)]
        except Exception as exc:
            result["rows"] = []
            result["error"] = "".join(traceback.format_exception(exc))
            print(result["error"], file=sys.stderr, flush=True)
    result["duration_s"] = round(time.monotonic() - start, 2)
    status = "CRASHED" if result["error"] else f"{len(result['rows'])} figures"
    print(f"<== {short}: {status} in {result['duration_s']:.1f} s", file=sys.stderr, flush=True)
    return result


def write_result(result: dict[str, Any], info: dict[str, Any], results_dir: Path) -> Path:
    """``<results_dir>/<date>-<name>.json``: the raw rows, the machine and any traceback."""
    results_dir.mkdir(parents=True, exist_ok=True)
    day = dt.date.today().isoformat()
    path = results_dir / f"{day}-{result['benchmark']}.json"
    document = {"date": day, "machine": info, **result}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def report(results: Sequence[dict[str, Any]], info: dict[str, Any], smoke: bool) -> str:
    """The Markdown the command prints: a heading line, one table, and any crashes."""
    day = dt.date.today().isoformat()
    mode = " (smoke mode: few iterations, figures are not meaningful)" if smoke else ""
    lines = [f"Benchmarks of {day} on {describe_machine(info)}{mode}", ""]
    rows = [row for result in results for row in result["rows"]]
    lines.append(markdown_table(rows))
    crashed = [r for r in results if r["error"]]
    if crashed:
        lines.append("")
        for result in crashed:
            last = result["error"].strip().splitlines()[-1]
            lines.append(f"**{result['benchmark']} crashed:** {last}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run privsep's benchmarks and print a Markdown table of the figures.",
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help="benchmarks to run (default: all), e.g. rpc"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="few iterations: proves the suite runs, no figures"
    )
    parser.add_argument(
        "--json-only",
        action="store_true",
        help="print the combined results as JSON on stdout instead of the Markdown table",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help=f"where the JSON files go (default: {RESULTS_DIR})",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return parser


EXIT_INTERRUPTED = 130


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen benchmarks. SIGTERM is taken as Ctrl-C: the running benchmark's
    ``with`` and ``finally`` blocks stop the servers and systems it started, rather than
    leaving them running after the suite is gone."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("benchmarks: interrupted; what it had started is stopped", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    available = discover()
    if args.list:
        for module in available:
            print(short_name(module))
        return EXIT_OK
    try:
        chosen = resolve(args.names, available) if args.names else available
    except KeyError as exc:
        print(f"{parser.prog}: {exc.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    if not chosen:
        print(f"{parser.prog}: no bench_*.py modules in {PACKAGE_DIR}", file=sys.stderr)
        return EXIT_USAGE
    info = machine()
    results: list[dict[str, Any]] = []
    whole_run = StealMeter()
    for index, module in enumerate(chosen, 1):
        steal = StealMeter()
        result = run_benchmark(module, smoke=args.smoke, position=f"{index}/{len(chosen)}")
        result["cpu_steal_pct"] = steal.percent()
        path = write_result(result, info, args.results_dir)
        print(f"    wrote {path}", file=sys.stderr, flush=True)
        results.append(result)
    info["cpu_steal_pct"] = whole_run.percent()
    if args.json_only:
        combined = {
            "date": dt.date.today().isoformat(),
            "machine": info,
            "smoke": args.smoke,
            "benchmarks": results,
        }
        print(json.dumps(combined, indent=2, ensure_ascii=False))
    else:
        print(report(results, info, args.smoke))
    return EXIT_CRASHED if any(r["error"] for r in results) else EXIT_OK
