"""Which variant of a series serves a request: the rollout rules of docs/LIFECYCLE.md, as one pure function.

In order, the first that applies decides:

1. no rollout row, or one that names no candidate: production;
2. the request's user id is in `test_group_user_ids`: candidate;
3. the request's symbol is in `rollout_symbols`: candidate;
4. a sticky split at `candidate_traffic_percent`:

       key    = user_id, or request_id when the request carries no user id
       bucket = int.from_bytes(sha256(f"{salt}:{symbol}:{timeframe}:{key}".encode()).digest()[:8], "big") % 10_000
       candidate when bucket < candidate_traffic_percent * 100, else production

   so one bucket is 0.01 % of traffic and a percent such as 12.5 is honoured exactly. The same user gets
   the same bucket on every call and in every process (nothing is remembered: the bucket is recomputed),
   and raising the percent only moves users from production to the candidate, never back.

The series (symbol and timeframe) is part of the hashed text on purpose: buckets of different series are
independent, so the users in one series' 10 % are not the same users as in every other series' 10 % (one
experiment's arm does not decide another's, and no user is exposed to every candidate at once). The salt
(ROLLOUT_SALT) re-draws every bucket when changed; it is not USER_ID_SALT, so re-bucketing never changes the
stored user hashes. Without a user id and a request id (the middleware always sets one) the request gets
production.

Whether the candidate is loaded is the caller's to check (`Predictor.select_model`): a candidate that failed
to load, or is not loaded yet, serves nobody.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from shared.rollouts import Rollout

PRODUCTION: Literal["production"] = "production"
CANDIDATE: Literal["candidate"] = "candidate"
SHADOW: Literal["shadow"] = "shadow"
BUCKETS = 10_000


def bucket(salt: str, symbol: str, timeframe: str, key: str) -> int:
    """The split bucket (0..9999) of `key` (a user id or a request id) in one series."""
    digest = hashlib.sha256(f"{salt}:{symbol}:{timeframe}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def route(
    rollout: Rollout | None, symbol: str, user_id: str | None, request_id: str | None, salt: str
) -> Literal["production", "candidate"]:
    """The variant that serves a request of `symbol` on `rollout`'s series (rules in the module docstring)."""
    if rollout is None or rollout.candidate_model_id is None:
        return PRODUCTION
    if user_id is not None and user_id in rollout.test_group_user_ids:
        return CANDIDATE
    if symbol in rollout.rollout_symbols:
        return CANDIDATE
    percent = rollout.candidate_traffic_percent
    if percent <= 0:
        return PRODUCTION
    key = user_id if user_id is not None else request_id
    if key is None:
        return PRODUCTION
    return CANDIDATE if bucket(salt, symbol, rollout.timeframe, key) < percent * 100 else PRODUCTION
