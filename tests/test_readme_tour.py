"""README.md stays true: its tour runs against the live stack (`make up`), and its configuration tables match the
settings classes.

The tour: every ```bash block of the README's "## Tour" section, in order, in one bash process with
`set -euo pipefail`; the first block's `export NAME=...` lines are pointed at the live stack (its URLs, key,
database, embedded Redis and sample symbol). Each block starts with `# <step>: ...`, and each step's output must
show the marker below: a block that fails, or whose output lacks its marker, fails the test naming the block,
its README line and its output.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import readme
from tests.support.live_stack import LiveStack

pytestmark = pytest.mark.slow

# step -> what its output must show (all of it, in one process, so later blocks see earlier ones' variables)
MARKERS: dict[str, str] = {
    "setup": r'"status":"healthy"',
    "ingest bars": r'"inserted":2,.*DEMO H1: 2 inserted, 0 updated.*"symbol":"DEMO","timeframe":"H1"',
    "read indicators": r'"D1":\[\{"ts":"[^"]+","values":\{"rsi_14":.*"W1":\[\{"ts"',
    "validate": r"gate: (passed|failed).*/D1/\S+ \(id \d+\): production, gate (passed|failed)",
    "train": r"registered \S+/D1/\S+ as candidate: test accuracy",
    "backtest": r"backtest \d+ of \S+ D1",
    "predict": r'"quality":\{"gate":"(passed|failed)".*"signal":"(BUY|HOLD|SELL)".*prediction id',
    "stream": r'"inserted":1.*event: signal\s+data: \{"prediction_id":"[0-9a-f-]+".*"bar_ts":"2019-01-02T00:00:00Z"',
    "A/B test": r"candidate traffic %\s+\S\s+50\s.*test group\s+\S\s+desk-alice\s.*^candidate \d{8}T\d{6}Z-",
    "promote and roll back": r"promoted \S+ \(id \d+\): now production.*rolled back to \S+ \(id \d+\): now production",
    "performance and drift": r'live performance.*predictions.*("drifted_features":|"no drift check stored for \S+ D1)',
    "audit": r"model\.rollback.*model\.promote.*rollout\.update.*\"action\":\"model\.rollback\"",
}
TOUR_TIMEOUT_S = 600
SEPARATOR = "@@tour-block"


def _setup_values(stack: LiveStack) -> dict[str, str]:
    redis = re.search(r"embedded Redis: (redis://\S+)", stack.text())
    assert redis, "the live stack printed no `embedded Redis:` line:\n" + stack.text()[-2000:]
    return {
        "AICASH_API_KEY": stack.key,
        "DATABASE_URL": stack.database_url,
        "REDIS_URL": redis.group(1),
        "INDICATORS_URL": stack.urls["indicators"],
        "TRAINER_URL": stack.urls["trainer"],
        "PREDICTOR_URL": stack.urls["predictor"],
        "S": stack.symbol,
        "TF": stack.timeframe,
    }


def _script(blocks: list[readme.TourBlock], stack: LiveStack) -> str:
    activate = Path(sys.executable).parent / "activate"
    parts = ["set -euo pipefail", "exec 2>&1"]
    for i, block in enumerate(blocks):
        code = block.code
        if i == 0:
            code = readme.rewrite_setup(code, _setup_values(stack))
            assert "source .venv/bin/activate" in code, "the tour's setup block activates .venv"
            code = code.replace("source .venv/bin/activate", f"source '{activate}'")
        parts += [f'echo "{SEPARATOR} {i} $(date +%s.%N)"', code]
    parts.append(f'echo "{SEPARATOR} end $(date +%s.%N)"')
    return "\n".join(parts) + "\n"


def _split(output: str) -> tuple[dict[int, str], dict[int, float]]:
    """Output and seconds per block index, from the separator lines."""
    texts: dict[int, str] = {}
    seconds: dict[int, float] = {}
    marks = list(re.finditer(rf"^{SEPARATOR} (\d+|end) ([\d.]+)$", output, flags=re.M))
    for here, after in zip(marks, [*marks[1:], None], strict=True):
        if here.group(1) == "end":
            continue
        i = int(here.group(1))
        texts[i] = output[here.end() : after.start() if after else len(output)]
        if after is not None:
            seconds[i] = float(after.group(2)) - float(here.group(2))
    return texts, seconds


def test_tour_has_a_block_per_step() -> None:
    steps = [b.step for b in readme.tour_blocks(readme.README.read_text())]
    assert steps == list(MARKERS), f"README tour steps {steps} != the steps this test checks {list(MARKERS)}"


def test_readme_tour_runs(live_stack: Any, tmp_path: Path) -> None:
    stack: LiveStack = live_stack
    blocks = readme.tour_blocks(readme.README.read_text())
    assert [b.step for b in blocks] == list(MARKERS)
    env = {**stack.env, "COLUMNS": "200", "NO_COLOR": "1"}  # rich tables unwrapped, no escape codes
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", "-c", _script(blocks, stack)],
        cwd=tmp_path,  # what the tour writes (var/tour/) lands here, not in the checkout
        env=env,
        capture_output=True,
        text=True,
        timeout=TOUR_TIMEOUT_S,
        check=False,
    )
    took = time.monotonic() - started
    (tmp_path / "tour-output.txt").write_text(proc.stdout)  # the whole output, for a failure's reader
    texts, seconds = _split(proc.stdout)
    timing = ", ".join(f"{blocks[i].step} {s:.1f} s" for i, s in seconds.items())
    print(f"README tour: {took:.1f} s ({timing})")
    if proc.returncode != 0:
        failed = max(texts) if texts else 0
        pytest.fail(
            f"README tour block {failed} `{blocks[failed].step}` (README.md line {blocks[failed].line}) exited "
            f"{proc.returncode}; its output:\n{texts.get(failed, proc.stdout)[-3000:]}"
        )
    for i, block in enumerate(blocks):
        marker = MARKERS[block.step]
        text = texts.get(i, "")
        assert re.search(marker, text, flags=re.S | re.M), (
            f"README tour block {i} `{block.step}` (README.md line {block.line}): output lacks {marker!r}:\n"
            + text[-3000:]
        )


def test_configuration_tables_match_the_settings() -> None:
    text = readme.README.read_text()
    tables = readme.table_rows(text)
    problems: list[str] = []
    for heading, expected in readme.expected_rows().items():
        have = readme.table_for(tables, heading)
        for name, default in expected.items():
            if name not in have:
                problems.append(f"{heading}: `{name}` (default {default}) is missing")
            elif have[name][0] != default:
                problems.append(f"{heading}: `{name}` default is {default} in the code, {have[name][0]} here")
        problems += [f"{heading}: `{name}` is no setting of this process" for name in have if name not in expected]
    tools = readme.table_for(tables, "### Tools")
    makefile = (readme.ROOT / "Makefile").read_text()
    read_elsewhere = readme.other_env_vars()
    listed = {name for rows in tables.values() for name in rows}
    problems += [f"`{name}` is read by the code but not in any table" for name in sorted(read_elsewhere - listed)]
    problems += [
        f"### Tools: `{name}` is read nowhere"
        for name in tools
        if name not in read_elsewhere and f"$({name})" not in makefile
    ]
    problems += [
        f"`{name}` has no meaning" for rows in tables.values() for name, (_, meaning) in rows.items() if not meaning
    ]
    fix = "python -m tests.support.readme prints the rows to fix"
    assert not problems, f"README.md's configuration tables disagree with the code ({fix}):\n" + "\n".join(problems)
