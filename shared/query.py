"""Query parameters parsed as their OpenAPI schema says, no laxer.

pydantic reads a `datetime` from a query string as ISO 8601 or, in lax mode, as any number of epoch seconds
(`0.5`, `1e3`). The schemas document ISO 8601 or whole epoch seconds (shared.errors.EPOCH_SCHEMA), so a
fraction or an exponent is refused here with a message, instead of being read as a time the client did not
mean.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

from pydantic import BeforeValidator

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_WHOLE = re.compile(r"[+-]?\d+")


def _iso_or_whole_seconds(value: object) -> object:
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()) and not _WHOLE.fullmatch(value.strip()):
        raise ValueError("a time is ISO 8601 (2024-01-02T00:00:00Z) or whole epoch seconds, not a fraction")
    return value


QueryTime = Annotated[datetime, BeforeValidator(_iso_or_whole_seconds)]
