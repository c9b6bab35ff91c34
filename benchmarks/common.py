"""Helpers for benchmark scripts: a temporary database, service subprocesses, latency statistics."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.local_services import free_port, scratch_database, wait_http

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@contextlib.contextmanager
def temporary_database() -> Iterator[str]:
    """A fresh, migrated database on DATABASE_URL's server (or an embedded one), dropped afterwards."""
    server = os.environ.get("DATABASE_URL")
    handle = None
    if not server:
        from shared.local_services import embedded_postgres

        server, handle = embedded_postgres("bench-pg")
    with scratch_database(server, "aicash_bench") as url:
        yield url
    del handle


@contextlib.contextmanager
def uvicorn_server(app: str, env: dict[str, str], workers: int = 1) -> Iterator[str]:
    with uvicorn_process(app, env, workers) as (base, _proc):
        yield base


@contextlib.contextmanager
def uvicorn_process(app: str, env: dict[str, str], workers: int = 1) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`uvicorn_server`'s base URL and the uvicorn process (to profile it)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "uvicorn"),
            app,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        env={**os.environ, **env},
        cwd=ROOT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health", 60, proc)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def percentiles(samples_s: list[float]) -> dict[str, float]:
    a = np.asarray(samples_s) * 1000
    return {
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
        "n": float(a.size),
    }


def best_of(fn: object, repeat: int, number: int) -> float:
    """Best mean seconds per call over `repeat` rounds of `number` calls (timeit's convention)."""
    import timeit

    return min(timeit.repeat(fn, repeat=repeat, number=number)) / number  # type: ignore[arg-type]


# Side-by-side figures (bench_predictor, bench_indicators, bench_stack, ...) are measured in pairs: each pair runs
# both sides back to back (the order alternating from pair to pair), and the figure is the median of the
# per-pair ratios. A slow moment then hits both sides of one pair instead of one side's median; the spread
# (min-max of the pair ratios) says how much the machine moved under the measurement.
SPREAD_WARN_POINTS = 20.0


@dataclass(frozen=True)
class Paired:
    """Per-pair ratios `b / a` of two measured sides (higher-is-better values, e.g. req/s, or times with the
    sides swapped) and the raw values of each side."""

    a: list[float]
    b: list[float]
    # A factor (`times()`, e.g. 1.15× or 89×) rather than a share (`percent()`): its spread is judged relative
    # to the median (20 points = 20 % of it), a share's in percentage points.
    factor: bool = False

    @property
    def ratios(self) -> list[float]:
        return [y / x if x else float("nan") for x, y in zip(self.a, self.b, strict=True)]

    @property
    def median(self) -> float:
        return float(np.median(self.ratios))

    @property
    def lo(self) -> float:
        return min(self.ratios)

    @property
    def hi(self) -> float:
        return max(self.ratios)

    @property
    def spread_points(self) -> float:
        width = self.hi - self.lo
        return width / self.median * 100 if self.factor else width * 100

    @property
    def warning(self) -> str | None:
        if self.spread_points <= SPREAD_WARN_POINTS:
            return None
        unit = "% of their median" if self.factor else " points"
        return (
            f"pair ratios spread over {self.spread_points:.0f}{unit} (> {SPREAD_WARN_POINTS:.0f}): the machine "
            "was not steady during this measurement"
        )

    def percent(self) -> str:
        """`57 % (pairs 52-61 %, n=5)`, the warning sign appended when the spread is too wide."""
        flag = " ⚠" if self.warning else ""
        return f"{self.median:.0%} (pairs {self.lo:.0%}–{self.hi:.0%}, n={len(self.a)}){flag}"

    def times(self) -> str:
        """`1.15× (pairs 1.12–1.19×, n=5)`."""
        flag = " ⚠" if self.warning else ""
        return f"{self.median:.2f}× (pairs {self.lo:.2f}–{self.hi:.2f}×, n={len(self.a)}){flag}"


_TICK = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a uvicorn supervisor and its workers)."""
    out = [pid]
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for child in children:
        out += process_tree(int(child))
    return out


def processes_named(pattern: str) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far (from /proc; gone ones count 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / _TICK


def alternating[T](runs: dict[str, Callable[[], T]], rounds: int) -> dict[str, list[T]]:
    """Each of `runs` once per round, `rounds` times; the order rotates from round to round (a b c, b c a,
    ...; with two sides a b, b a), so neither side always runs first or last."""
    names = list(runs)
    out: dict[str, list[T]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(runs[name]())
    return out


def paired(run_a: Callable[[], float], run_b: Callable[[], float], pairs: int) -> Paired:
    """`pairs` alternating pairs of the two sides; see `Paired`."""
    got = alternating({"a": run_a, "b": run_b}, pairs)
    return Paired(got["a"], got["b"])


def warnings_of(*figures: Paired) -> list[str]:
    """The spread warnings of `figures`, as Markdown lines for the end of a section (printed to stderr too)."""
    lines = []
    for f in figures:
        if f.warning:
            lines.append(f"- ⚠ {f.warning} (ratios {', '.join(f'{r:.2f}' for r in f.ratios)}).")
            print(f"WARNING: {f.warning}", file=sys.stderr)
    return lines


PY_SPY = BIN / "py-spy"


def _frame_name(frame: str) -> str:
    """`handle (/…/site-packages/starlette/routing.py:123)` -> `starlette/routing.py: handle`."""
    func, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", f"{ROOT}/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = re.sub(r"^.*/lib/python3\.\d+/", "", path)
    return f"{path}: {func}" if path else func


def profile_top(pid: int, load: Callable[[], object], seconds: int, n: int = 12, rate: int = 200) -> list[str]:
    """Sample process `pid` and its children with py-spy (`--nonblocking`: the processes are never paused)
    while `load()` runs, and return Markdown: the `n` functions with the most samples on top of the stack
    (self) and with the most samples anywhere in their stack (total), as shares of the busy samples (py-spy
    leaves out samples of threads waiting idle, the event loop's epoll included). Reproducible: the bench
    runs it on its own load; no profile when py-spy is missing or cannot attach (it needs ptrace rights)."""
    if not PY_SPY.exists():
        return [f"_No profile: {PY_SPY} is not installed._"]
    with tempfile_path(".txt") as out:
        cmd = [str(PY_SPY), "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--format", "raw"]
        cmd += ["--rate", str(rate), "--duration", str(seconds), "--output", str(out)]
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        load()
        _, err = spy.communicate(timeout=seconds + 60)
        if spy.returncode != 0 or not out.exists():
            return [f"_No profile: py-spy failed ({err.strip().splitlines()[-1] if err.strip() else spy.returncode})._"]
        lines = out.read_text().splitlines()
    self_n: dict[str, int] = {}
    total_n: dict[str, int] = {}
    busy = 0
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        frames = [_frame_name(f) for f in stack.split(";")]
        # the first frames are "process NNN" / "thread (...)" labels with --subprocesses; keep code frames
        frames = [f for f in frames if ": " in f]
        if not frames:
            continue
        busy += k
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + k
        for f in set(frames):
            total_n[f] = total_n.get(f, 0) + k
    if not busy:
        return ["_No profile: py-spy recorded no busy samples._"]
    top_self = sorted(self_n.items(), key=lambda kv: -kv[1])[:n]
    # Inclusive shares of this project's own functions (the library frames under them are the same on every
    # request: the server loop, the ASGI layers' entries).
    ours = [kv for kv in total_n.items() if kv[0].startswith(("shared/", "services/"))]
    top_total = sorted(ours, key=lambda kv: -kv[1])[:n]
    by_package: dict[str, int] = {}
    for frame, k in self_n.items():
        path = frame.split(": ", 1)[0]
        parts = path.split("/")
        key = "/".join(parts[:2]) if parts[0] in ("shared", "services") and len(parts) > 2 else parts[0]
        key = key.removesuffix(".py")
        by_package[key] = by_package.get(key, 0) + k
    packages = sorted(by_package.items(), key=lambda kv: -kv[1])[:10]
    shares = ", ".join(f"{name} {k / busy:.0%}" for name, k in packages)
    out_lines = [
        f"py-spy, {seconds} s at {rate} Hz, {busy:,} busy samples over every process: Python busy "
        f"{busy / (rate * seconds):.2f} of a core on average, the rest waiting (on the network, PostgreSQL, "
        f"Redis, the other processes). By package (self samples, the function on top of the stack): {shares}.",
        "",
        "| # | self: function (where) | self | total: this project's function (where) | total |",
        "| ---: | --- | ---: | --- | ---: |",
    ]
    for i in range(max(len(top_self), len(top_total))):
        s = top_self[i] if i < len(top_self) else ("", 0)
        t = top_total[i] if i < len(top_total) else ("", 0)
        out_lines.append(f"| {i + 1} | `{s[0]}` | {s[1] / busy:.1%} | `{t[0]}` | {t[1] / busy:.1%} |")
    return out_lines


@contextlib.contextmanager
def tempfile_path(suffix: str) -> Iterator[Path]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-") as d:
        yield Path(d) / f"out{suffix}"
