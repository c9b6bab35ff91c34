"""What tests/test_readme_tour.py reads out of README.md: the tour's bash blocks and the configuration tables.

`python -m tests.support.readme` prints the configuration rows README.md lacks or has wrong (name, default and,
as a first draft of the meaning, the comment above the field), to paste after a settings change.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TOUR_HEADING = "## Tour"
CONFIG_HEADING = "## Configuration"

# --- the tour ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TourBlock:
    step: str  # the block's first line, a comment: `# ingest bars: ...` -> "ingest bars"
    code: str
    line: int  # where the block starts in README.md (1-based), for failure messages


def section(text: str, heading: str) -> tuple[str, int]:
    """The text under a `## ` heading up to the next `## ` heading, and the line it starts on."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        raise AssertionError(f"README.md has no {heading!r} section")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end]), start + 1


def tour_blocks(text: str) -> list[TourBlock]:
    body, first_line = section(text, TOUR_HEADING)
    blocks = []
    for m in re.finditer(r"^```bash\n(.*?)^```$", body, flags=re.M | re.S):
        code = m.group(1)
        head = code.splitlines()[0] if code.strip() else ""
        step = re.match(r"#\s*([^:]+)", head)
        line = first_line + body[: m.start()].count("\n")
        if step is None:
            raise AssertionError(f"README.md line {line}: a tour block must start with `# <step>: ...`")
        blocks.append(TourBlock(step.group(1).strip(), code, line))
    return blocks


def rewrite_setup(code: str, values: dict[str, str]) -> str:
    """The setup block with each `export NAME=...` line of `values` set to the given value (one per line)."""
    missing = set(values)
    out = []
    for line in code.splitlines():
        m = re.match(r"^export ([A-Z_][A-Z0-9_]*)=", line)
        if m and m.group(1) in values:
            name = m.group(1)
            missing.discard(name)
            line = f"export {name}='{values[name]}'"
        out.append(line)
    if missing:
        raise AssertionError(f"the tour's setup block sets no {', '.join(sorted(missing))} (`export NAME=...` lines)")
    return "\n".join(out) + "\n"


# --- the configuration tables -----------------------------------------------------------------------------------


def default_text(value: Any) -> str:
    """A default as the README's table writes it."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None:
        return "(unset)"
    if value == "":
        return "(empty)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def field_defaults(cls: type[BaseModel]) -> dict[str, str]:
    fields = cls.model_fields.items()
    return {name.upper(): default_text(f.get_default(call_default_factory=True)) for name, f in fields}


def settings_classes() -> dict[str, type[BaseSettings]]:
    """Each configuration table's heading (its start) and the settings class whose own fields it lists."""
    from services.predictor.settings import PredictorSettings
    from services.trainer.settings import TrainerSettings
    from shared.backup import BackupSettings
    from shared.settings import Settings

    return {
        "### Every service": Settings,
        "### Trainer": TrainerSettings,
        "### Predictor": PredictorSettings,
        "### Backups": BackupSettings,
    }


def expected_rows() -> dict[str, dict[str, str]]:
    """Per table: the variables it must list with their defaults. A subclass's table lists what the shared
    settings lack or set differently."""
    classes = settings_classes()
    shared = field_defaults(classes["### Every service"])
    out: dict[str, dict[str, str]] = {}
    for heading, cls in classes.items():
        rows = field_defaults(cls)
        if heading != "### Every service":
            rows = {k: v for k, v in rows.items() if shared.get(k) != v}
        out[heading] = rows
    return out


def table_rows(text: str) -> dict[str, dict[str, tuple[str, str]]]:
    """The configuration section's tables: heading -> {VARIABLE: (default cell, meaning cell)}."""
    body, _ = section(text, CONFIG_HEADING)
    tables: dict[str, dict[str, tuple[str, str]]] = {}
    current: dict[str, tuple[str, str]] | None = None
    for line in body.splitlines():
        if line.startswith("### "):
            current = tables.setdefault(line.strip(), {})
            continue
        m = re.match(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|(.*)\|(.*)\|\s*$", line)
        if m and current is not None:
            current[m.group(1)] = (m.group(2).strip(), m.group(3).strip())
    return tables


def table_for(tables: dict[str, dict[str, tuple[str, str]]], heading: str) -> dict[str, tuple[str, str]]:
    found = [rows for h, rows in tables.items() if h.startswith(heading)]
    if len(found) != 1:
        raise AssertionError(f"README.md's configuration section needs one table under a heading {heading}...")
    return found[0]


# Variables read outside the settings classes: os.environ / typer envvar in the code, the Makefile's own.
ENV_READ = re.compile(r"""(?:environ\.get\(|environ\[|envvar=)\s*["']([A-Z][A-Z0-9_]*)["']""")
MAKEFILE_VARS = ("PYTHON", "EXTRAS")
DEVSTACK_PORTS = ("INDICATORS_PORT", "PREDICTOR_PORT", "TRAINER_PORT")  # f"{name.upper()}_PORT" in shared/devstack.py


def other_env_vars() -> set[str]:
    found: set[str] = set()
    for path in [*ROOT.glob("shared/**/*.py"), *ROOT.glob("services/**/*.py")]:
        found.update(ENV_READ.findall(path.read_text()))
    if '_PORT"' in (ROOT / "shared" / "devstack.py").read_text():
        found.update(DEVSTACK_PORTS)
    makefile = (ROOT / "Makefile").read_text()
    found.update(v for v in MAKEFILE_VARS if re.search(rf"^{v}\s*\??=", makefile, flags=re.M))
    every_setting = {k for rows in expected_rows().values() for k in rows}
    return found - every_setting


# --- drafting rows ----------------------------------------------------------------------------------------------


def field_comments(cls: type) -> dict[str, str]:
    """The comment lines right above each field in the class's source (a draft of the meaning)."""
    path = Path(sys.modules[cls.__module__].__file__ or "")
    lines = path.read_text().splitlines()
    tree = ast.parse(path.read_text())
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    i, comment = stmt.lineno - 2, list[str]()
                    while i >= 0 and lines[i].strip().startswith("#"):
                        comment.insert(0, lines[i].strip().lstrip("# ").strip())
                        i -= 1
                    out[stmt.target.id.upper()] = " ".join(comment)
    return out


def main() -> None:
    text = README.read_text()
    tables = table_rows(text)
    for heading, rows in expected_rows().items():
        have = table_for(tables, heading) if any(h.startswith(heading) for h in tables) else {}
        comments = field_comments(settings_classes()[heading])
        for name, default in rows.items():
            if name not in have or have[name][0] != default:
                print(f"{heading}: | `{name}` | {default} | {comments.get(name, '')} |")
    for name in sorted(other_env_vars()):
        if not any(name in rows for rows in tables.values()):
            print(f"### Tools: | `{name}` | ? | ? |")


if __name__ == "__main__":
    main()
