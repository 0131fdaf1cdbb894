"""Python code that makes importing some top-level packages fail, as on a machine without them: prepend it to a
`python -c` script or write it as a sitecustomize.py on the child's PYTHONPATH."""

from __future__ import annotations


def import_blocker(packages: tuple[str, ...], why: str) -> str:
    """Code installing a meta-path finder that refuses `packages` (and their submodules), saying `why`."""
    return f"""
import importlib.abc
import sys


class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {tuple(packages)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: {why})", name=name)
        return None


sys.meta_path.insert(0, Absent())
"""
