"""kdna_fx.timing.git_commit: the commit and the "dirty" flag every study records beside its numbers."""
import os
import shutil
import subprocess

import pytest

from kdna_fx.timing import git_commit

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")


def _git(root, *cmd):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *cmd], cwd=root, check=True,
                   capture_output=True)


def test_git_commit_dirty_and_exclude(tmp_path):
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "results"))
    for name in ("code.py", "results/out.json"):
        with open(os.path.join(root, name), "w") as f:
            f.write("0\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "start")
    state = git_commit(root=root)
    assert len(state["commit"]) == 40 and state["dirty"] is False
    with open(os.path.join(root, "results/out.json"), "w") as f:
        f.write("1\n")
    assert git_commit(root=root)["dirty"] is True
    assert git_commit(exclude=("results",), root=root)["dirty"] is False
    with open(os.path.join(root, "code.py"), "w") as f:
        f.write("1\n")
    assert git_commit(exclude=("results",), root=root)["dirty"] is True
    # untracked files are not the code that ran
    _git(root, "checkout", "-q", "--", ".")
    with open(os.path.join(root, "new.py"), "w") as f:
        f.write("1\n")
    assert git_commit(root=root)["dirty"] is False


def test_git_commit_outside_a_checkout(tmp_path):
    assert git_commit(root=str(tmp_path)) == {"commit": None, "dirty": None}
