"""The base of every spec section (imported by specs/job.py and specs/lm.py alike)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Base for every spec section: unknown keys are errors, and a loaded spec never changes."""

    # no NaN or infinity where a number is asked for: nothing in a job means them
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
