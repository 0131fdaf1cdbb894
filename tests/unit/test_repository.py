"""What every tracked file must be, whatever it holds: a merge leaves no conflict markers behind (one did, in
README.md and benchmarks/README.md, through a fine-tuning merge that a test of the code could not see)."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO_ROOT

CONFLICT_MARKER = re.compile(r"^(<{7} |={7}$|>{7} )", re.MULTILINE)


def tracked_text_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    return [name for name in listed.decode().split("\0") if name]


def test_no_tracked_file_holds_merge_conflict_markers():
    files = tracked_text_files()
    assert "README.md" in files
    conflicted = []
    for name in files:
        try:
            text = (REPO_ROOT / name).read_text()
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # binary, or deleted in the work tree and not yet committed
        lines = [text.count("\n", 0, match.start()) + 1 for match in CONFLICT_MARKER.finditer(text)]
        conflicted += [f"{name}:{line}" for line in lines]
    assert not conflicted, f"conflict markers left by a merge: {conflicted}"
