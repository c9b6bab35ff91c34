"""A series' rollout: which version serves whom (docs/LIFECYCLE.md). The trainer writes the `rollouts` table
(it owns the registry); the predictor reads it and routes each request."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

RolloutPolicy = Literal["direct", "canary", "manual"]
Variant = Literal["production", "candidate"]
LoggedVariant = Literal["production", "candidate", "shadow"]

ROLLOUT_COLUMNS = (
    "symbol, timeframe, policy, candidate_model_id, candidate_traffic_percent, test_group_user_ids, "
    "rollout_symbols, shadow, updated_at, updated_by"
)


class Rollout(BaseModel):
    symbol: str
    timeframe: str
    policy: RolloutPolicy = Field(
        description="what a version that passes the promotion gate does: direct (replaces production), canary "
        "(becomes the candidate at the configured traffic percent; the automatic decision promotes or rolls it "
        "back on live outcomes) or manual (stays a candidate until an admin acts)"
    )
    candidate_model_id: int | None = Field(description="the registry id of the candidate, if any")
    candidate_traffic_percent: float = Field(ge=0, le=100, description="share of other traffic the candidate gets")
    test_group_user_ids: list[str] = Field(description="user ids that always get the candidate")
    rollout_symbols: list[str] = Field(description="symbols whose every request gets the candidate")
    shadow: bool = Field(description="the candidate also scores production traffic, logged as variant shadow")
    updated_at: datetime | None = None
    updated_by: str | None = None
