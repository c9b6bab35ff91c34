"""`make bench`: run every benchmark script side by side in one run and write docs/BENCHMARKS.md.

Each `benchmarks/bench_*.py` is a standalone script printing a Markdown section; this runner adds the
machine description and keeps the sections in one file. `--quick` shortens every benchmark.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = [
    "bench_foundation",
    "bench_stack",
    "bench_indicators",
    "bench_training",
    "bench_predictor",
    "bench_peer_bentoml",
    "bench_backtest",
    "bench_validation",
    "bench_weights",
    "bench_shadow",
    "bench_lifecycle",
    "bench_streaming",
    "bench_make_up",
]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    libs = ", ".join(
        f"{p} {version(p)}"
        for p in ("numpy", "TA-Lib", "pandas-ta", "fastapi", "uvicorn", "asyncpg", "onnxruntime", "tensorflow")
        if _installed(p)
    )
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {platform.system()} "
        f"{platform.release()}; {libs}"
    )


def _installed(pkg: str) -> bool:
    try:
        version(pkg)
    except Exception:
        return False
    return True


def settle() -> None:
    """Let PostgreSQL write out what the last benchmark made (a million ingested bars leave a checkpoint
    running in the background for minutes), so it does not run into the next benchmark's measurements."""
    url = os.environ.get("DATABASE_URL")
    if not url:
        return
    import asyncio

    import asyncpg

    async def checkpoint() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("CHECKPOINT")
        except asyncpg.InsufficientPrivilegeError:
            pass  # not a superuser: the benchmarks simply share the machine with the checkpointer
        finally:
            await conn.close()

    asyncio.run(checkpoint())
    time.sleep(2)


METHOD = (
    "Method for every side-by-side figure (`benchmarks/common.py`: `paired`, `alternating`, `Paired`): the sides "
    "run in alternating rounds, one right after the other, the order rotating from round to round, and the "
    "figure is the median of the per-round ratios, printed with their range (min–max); a range wider than 20 "
    "points (for a factor such as 1.2× or 90×: 20 % of its median) is flagged ⚠ with a warning under its "
    "section. Absolute req/s, bars/s and ms are each side's median and stand as context only: on a shared "
    'machine they move from run to run, the ratio of two sides measured together much less. "Where the time '
    'goes" tables are py-spy profiles (`--nonblocking`, every worker process) taken by the same scripts on their '
    "own load, after the measured rounds."
)

PARTIAL_NOTE = (
    'Sections marked with a later finish time were rerun alone (`make bench ARGS="--only NAME"`); the rest '
    "come from the full run above."
)


def merge(document: str, fresh: dict[str, str]) -> str:
    """`document` with each `<!-- bench:NAME -->` section replaced by `fresh[NAME]`; a section it lacks goes
    after the nearest section before it in ORDER, else before the GPU section (or at the end)."""
    for name, section in fresh.items():
        pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->\n?", re.S)
        earlier = ORDER[: ORDER.index(name)] if name in ORDER else []
        ends = [f"<!-- /bench:{n} -->\n" for n in reversed(earlier) if f"<!-- /bench:{n} -->\n" in document]
        if pattern.search(document):
            document = pattern.sub(section.replace("\\", "\\\\"), document, count=1)
        elif ends:
            at = document.find(ends[0]) + len(ends[0])
            document = document[:at] + "\n\n" + section + document[at:]
        elif (at := document.find("\n## Training on a GPU")) >= 0:
            document = document[:at] + "\n" + section + document[at:]
        else:
            document = document.rstrip() + "\n\n" + section
    if PARTIAL_NOTE not in document:
        lines = document.split("\n")
        mode = next((k for k, line in enumerate(lines) if line.startswith("Mode:")), 0)
        lines[mode + 1 : mode + 1] = [PARTIAL_NOTE, ""]
        document = "\n".join(lines)
    return document


TARGETS_START, TARGETS_END = "<!-- bench:targets -->", "<!-- /bench:targets -->"


def _section(document: str, name: str) -> str | None:
    found = re.search(rf"<!-- bench:{name} -->(.*?)<!-- /bench:{name} -->", document, re.S)
    return found.group(1) if found else None


def _row(target: str, measured: str, ok: bool, section: str) -> str:
    return f"| {target} | {measured} | {'pass' if ok else 'FAIL'} | {section} |"


def targets(document: str) -> str:
    """The design's targets (prediction p95 < 100 ms, training < 2 h) and the issues' goals as pass/fail, read
    from the figures of the sections in `document` (so a partial run's new figures count), with the section each
    comes from."""
    rows = []
    predictor = _section(document, "bench_predictor")
    open_loop = r"^\| uncached, open loop (\d+) req/s \(achieved \d+\) \| p50 [\d.]+ ms, p95 ([\d.]+) ms"
    runs = [(float(rate), float(p95)) for rate, p95 in re.findall(open_loop, predictor or "", re.M)]
    upto = [(r, p) for r, p in runs if r <= 1000]
    if upto:
        worst = max(upto, key=lambda rp: rp[1])
        saturation = re.search(r"^\| saturation: [^|]*\| ([^|]*)\|", predictor or "", re.M)
        rows.append(
            _row(
                "prediction latency p95 < 100 ms, uncached (every open-loop rate up to 1,000 req/s)",
                f"worst p95 {worst[1]:.1f} ms (at {worst[0]:.0f} req/s); saturation: "
                f"{saturation.group(1).strip() if saturation else 'not measured'}",
                worst[1] < 100,
                "bench_predictor",
            )
        )
    else:
        rows.append("| prediction latency p95 < 100 ms | not measured in this document | — | bench_predictor |")
    cached = re.search(r"^\| cached predictions \(POST[^|]*\| [\d,]+ req/s, p99 ([\d.]+) ms", predictor or "", re.M)
    if cached:
        p99 = float(cached.group(1))
        what = "prediction latency p95 < 100 ms, cached (wrk 32 connections, closed loop; its p99 bounds the p95)"
        rows.append(_row(what, f"p99 {p99:.1f} ms", p99 < 100, "bench_predictor"))
    training = _section(document, "bench_training")
    wall = re.search(r"^\| full retrain wall time [^|]*\| ([\d.]+) s", training or "", re.M)
    if wall:
        s = float(wall.group(1))
        what = "training < 2 h (full retrain of one model: import to registered artifacts)"
        rows.append(_row(what, f"{s:.1f} s ({s / 3600:.2f} h)", s < 7200, "bench_training"))
    else:
        rows.append("| training < 2 h | not measured in this document | — | bench_training |")
    # Issue 14's goals: each a row of its section, "| label | figure (pairs …) | ≥ goal |".
    for name, label, what in (
        (
            "bench_predictor",
            "cached / bare",
            "cached predictions ≥ 60 % of the bare FastAPI endpoint (per-pair median)",
        ),
        ("bench_predictor", "cached / the predictor's /health floor", "cached predictions ≥ 80 % of the /health floor"),
        ("bench_indicators", "ingest over HTTP", "ingest ≥ 150,000 bars/s (1,000,000 M1 bars, 50,000 a request)"),
        ("bench_indicators", "API / binary COPY floor", "ingest ≥ 70 % of the binary COPY floor"),
        ("bench_indicators", "API / `copy_records_to_table`", "ingest ≥ 70 % of a bare `copy_records_to_table`"),
    ):
        row = re.search(
            rf"^\| {re.escape(label)}[^|]* \| ([^|]*) \| ≥ ([\d,]+) ?%? ?[^|]*\|", _section(document, name) or "", re.M
        )
        value = re.match(r"[\d,.]+", row.group(1).strip()) if row else None
        if row and value:
            figure, goal = row.group(1).strip(), float(row.group(2).replace(",", ""))
            rows.append(_row(f"{what} (issue 14)", figure, float(value.group(0).replace(",", "")) >= goal, name))
    make_up = _section(document, "bench_make_up")
    for run, target in (("first", 90), ("second", 15)):
        got = re.search(rf"^\| {run} \| ([\d.]+) s \|", make_up or "", re.M)
        if got:
            s = float(got.group(1))
            what = f"`make up` on a fresh checkout, {run} run: first prediction < {target} s (issue 13)"
            rows.append(_row(what, f"{s:.1f} s", s < target, "bench_make_up"))
    return "\n".join(
        [
            TARGETS_START,
            "## Targets",
            "",
            "The design's targets and the open issues' goals, read by the runner from the sections below (a rerun "
            "section's figures count once it is rerun). A goal held to a per-pair median passes on the median; its "
            "range and ⚠ say how far one run can be trusted.",
            "",
            "| target | measured | verdict | section |",
            "| --- | --- | --- | --- |",
            *rows,
            TARGETS_END,
            "",
        ]
    )


def with_targets(document: str) -> str:
    """`document` with its targets table (re)written before the first benchmark section."""
    document = re.sub(rf"{TARGETS_START}.*?{TARGETS_END}\n*", "", document, flags=re.S)
    at = document.find("<!-- bench:")
    table = targets(document)
    if at < 0:
        return document.rstrip() + "\n\n" + table
    head = document[:at].rstrip("\n") + "\n\n"
    return head + table + "\n" + document[at:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = parser.parse_args()
    names = [n for n in ORDER if (ROOT / "benchmarks" / f"{n}.py").exists() and (not args.only or n in args.only)]
    sections = []
    for name in names:
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *(["--quick"] if args.quick else [])]
        print(f"running {' '.join(cmd)}", file=sys.stderr)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        took = time.perf_counter() - t0
        settle()
        when = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            body = f"## {name}\n\nFAILED (exit {proc.returncode}); see the run's stderr.\n"
        else:
            body = proc.stdout.strip() + f"\n\n_({name} took {took:.0f} s, finished {when})_\n"
        sections.append(f"<!-- bench:{name} -->\n{body}<!-- /bench:{name} -->\n")
    header = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m benchmarks.run`); every figure below comes from that one run.",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}.",
        f"Mode: {'quick' if args.quick else 'full'}.",
        "",
        METHOD,
        "",
    ]
    out = Path(args.out)
    if args.only and out.exists():
        # A partial run replaces (or adds) its own sections and keeps every other one as measured before.
        out.write_text(with_targets(merge(out.read_text(), dict(zip(names, sections, strict=True)))))
        print(f"updated {', '.join(names)} in {args.out}", file=sys.stderr)
        return
    gpu = ROOT / "docs" / "GPU_TRAINING.md"
    if gpu.exists():  # measured on a lent GPU machine, not by this run: kept verbatim and labelled so
        sections.append(gpu.read_text().strip() + "\n")
    out.write_text(with_targets("\n".join(header) + "\n\n".join(sections)))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
