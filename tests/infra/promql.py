"""Just enough PromQL lexing to list the series and labels a query uses.

Not a parser: it strips strings, label matchers, ranges and grouping clauses, then reads identifiers.
An identifier followed by "(" must be a known function, so a typo there fails instead of hiding.
test_monitoring.py checks the extractor itself on queries with known answers.
"""

from __future__ import annotations

import re

FUNCTIONS = frozenset(
    """abs absent absent_over_time avg_over_time ceil changes clamp clamp_max clamp_min count_over_time
    day_of_month day_of_week day_of_year days_in_month delta deriv exp floor histogram_avg histogram_count
    histogram_fraction histogram_quantile histogram_stddev histogram_stdvar histogram_sum holt_winters hour
    idelta increase irate label_join label_replace last_over_time ln log10 log2 mad_over_time max_over_time
    min_over_time minute month predict_linear present_over_time quantile_over_time rate resets round scalar
    sgn sort sort_by_label sort_by_label_desc sort_desc sqrt stddev_over_time stdvar_over_time
    sum_over_time time timestamp vector year""".split()
)
AGGREGATIONS = frozenset("sum min max avg group stddev stdvar count count_values bottomk topk quantile".split())
KEYWORDS = frozenset("and or unless bool offset group_left group_right on ignoring by without inf nan".split())

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_NUMBER = re.compile(r"(?<![\w:.])(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_GRAFANA_VAR = re.compile(r"\$\{?[a-zA-Z_][a-zA-Z0-9_]*\}?")


def analyse(expr: str) -> tuple[set[str], dict[str, set[str]], set[str]]:
    """-> (series names, {series: labels it is matched on}, labels used in by/without/on/ignoring)."""
    if "__name__" in expr:
        raise ValueError(f"selecting by __name__ hides which series a query uses: {expr}")
    text = _GRAFANA_VAR.sub("1", _STRING.sub('""', expr))

    matched: dict[str, set[str]] = {}

    def selector(m: re.Match[str]) -> str:
        name = m.group(1)
        if name is None or name in AGGREGATIONS | FUNCTIONS | KEYWORDS:
            raise ValueError(f"selector without a metric name: {m.group(0)!r} in {expr}")
        matched.setdefault(name, set()).update(_MATCHER_LABEL.findall(m.group(2)))
        return f" {name} "

    text = _SELECTOR.sub(selector, text)
    grouping: set[str] = set()

    def group(m: re.Match[str]) -> str:
        grouping.update(label.strip() for label in m.group(2).split(",") if label.strip())
        return " "

    text = _GROUPING.sub(group, text)
    text = _RANGE.sub(" ", text)
    text = _NUMBER.sub(" ", text)

    names: set[str] = set()
    for m in _IDENT.finditer(text):
        word = m.group(0)
        if text[m.end() :].lstrip().startswith("("):
            if word not in FUNCTIONS | AGGREGATIONS:
                raise ValueError(f"unknown PromQL function {word!r} in {expr}")
            continue
        if word.lower() in KEYWORDS:
            continue
        names.add(word)
    for name in names:
        matched.setdefault(name, set())
    return names, matched, grouping
