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
    "bench_backtest",
    "bench_validation",
    "bench_weights",
    "bench_shadow",
    "bench_lifecycle",
    "bench_streaming",
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
    before the GPU section (or at the end)."""
    for name, section in fresh.items():
        pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->\n?", re.S)
        if pattern.search(document):
            document = pattern.sub(section.replace("\\", "\\\\"), document, count=1)
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
        out.write_text(merge(out.read_text(), dict(zip(names, sections, strict=True))))
        print(f"updated {', '.join(names)} in {args.out}", file=sys.stderr)
        return
    gpu = ROOT / "docs" / "GPU_TRAINING.md"
    if gpu.exists():  # measured on a lent GPU machine, not by this run: kept verbatim and labelled so
        sections.append(gpu.read_text().strip() + "\n")
    out.write_text("\n".join(header) + "\n\n".join(sections))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
