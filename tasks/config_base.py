"""The base of every configuration section, apart from tasks.config so the sweep's section
(tasks/operations/sweep_space.py) can derive from it without importing the whole configuration."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A configuration section: an unknown key is an error, and so is an assignment of a wrong value."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
