"""Which records under bench/results are not tied to code (issue 33): every JSON record whose commit is missing,
not in the history of HEAD, or was taken from a dirty tree (or says nothing about its tree). The protocol-1
folders (``*_protocol1``) and ``retired/`` folders are history, kept as they were measured, and left out.

    .venv/bin/python -m bench.records_check            # one line per untied record, then a count; exit 1 if any
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from bench.common import REPO

RESULTS = os.path.join(REPO, "bench", "results")


def git_state(record: Any) -> tuple[str | None, bool | None]:
    """(commit, dirty) of a record, wherever its writer kept them: ``provenance.git`` (the one writer),
    a top-level ``git`` dict, or an older ``commit`` (string, or dict with a dirty flag; under ``meta`` in the
    coverage records)."""
    if not isinstance(record, dict):
        return None, None
    for found in ((record.get("provenance") or {}).get("git"), record.get("git"), record.get("commit"),
                  (record.get("meta") or {}).get("commit")):
        if isinstance(found, dict) and found.get("commit"):
            return found["commit"], found.get("dirty")
        if isinstance(found, str):
            return found, None
    return None, None


def in_history(commit: str) -> bool:
    done = subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=REPO, capture_output=True)
    return done.returncode == 0


def untied(root: str = RESULTS) -> list[tuple[str, str]]:
    """(path relative to the repository, why) of every record not tied to committed code."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.endswith("_protocol1") and d != "retired")
        for name in sorted(f for f in files if f.endswith(".json")):
            path = os.path.join(folder, name)
            with open(path) as f:
                commit, dirty = git_state(json.load(f))
            why = ("no commit" if commit is None else "commit not in history" if not in_history(commit)
                   else "dirty tree" if dirty else "dirty flag not recorded" if dirty is None else None)
            if why:
                out.append((os.path.relpath(path, REPO), why))
    return out


def main() -> int:
    found = untied()
    for path, why in found:
        print(f"{why:28s} {path}")
    total = sum(len([f for f in files if f.endswith('.json')]) for folder, _, files in os.walk(RESULTS)
                if "_protocol1" not in folder and f"{os.sep}retired" not in folder)
    print(f"{len(found)} of {total} records (protocol-1 and retired folders aside) are not tied to committed code")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
