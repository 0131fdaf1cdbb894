"""`prefect deploy` on a laptop imports the flows' entrypoints, and the configuration with them: neither may
need torch, timm, torchvision or Ray installed (issue 26)."""

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.support.blocked_imports import import_blocker

ABSENT = ("torch", "timm", "torchvision", "ray")
BLOCKER = import_blocker(ABSENT, "not installed on a laptop")
LIGHT_MODULES = ["tasks.config", "flows.operations", "flows.pipeline", "flows.sweep", "flows.deployments"]


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_imports_without_torch_timm_or_ray(module):
    script = BLOCKER + f"import {module}\nassert not set(sys.modules) & set({ABSENT!r})\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
