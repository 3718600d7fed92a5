"""Numbers the docs cite from a record match it, and the record is tied to committed code (issue 33). A cited
number carries a marker right after it:

    -0.53<!-- rec bench/results/conversion/conversion_study.json verdicts/row=kdna-r4&baseline=prune@kdna-r4/calibrated/mean -->

The key path walks the JSON by "/": a dict key, a list index, or ``k=v&k=v`` (the list item whose fields hold
those values; exactly one must); ``*100`` at its end scales a fraction to the percent the doc shows. The number
must equal the record's value rounded to the decimals it shows."""
from __future__ import annotations

import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MARKER = re.compile(r"(?P<number>[-+]?\d[\d,]*(?:\.\d+)?)\s*%?<!-- rec (?P<path>\S+) (?P<key>.+?) -->")
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "bench" / "results").rglob("README.md")])


def resolve(value, key: str):
    for part in key.split("/"):
        if isinstance(value, list) and re.fullmatch(r"\d+", part):
            value = value[int(part)]
        elif isinstance(value, list):
            wanted = dict(item.split("=", 1) for item in part.split("&"))
            found = [v for v in value if all(str(v.get(k)) == w for k, w in wanted.items())]
            assert len(found) == 1, f"{part!r} selects {len(found)} items"
            value = found[0]
        else:
            value = value[part]
    return value


def citations() -> list[tuple[str, str, str, str]]:
    return [(str(doc.relative_to(ROOT)), m["number"], m["path"], m["key"])
            for doc in DOCS for m in MARKER.finditer(doc.read_text())]


def test_the_docs_cite_records():
    # every marker is read (one the pattern missed would be a citation nobody checks)
    assert len(citations()) == sum(doc.read_text().count("<!-- rec ") for doc in DOCS) >= 10


@pytest.mark.parametrize("doc,number,path,key", citations())
def test_a_cited_number_matches_its_record(doc, number, path, key):
    key, _, scale = key.partition("*")
    with open(ROOT / path) as f:
        value = resolve(json.load(f), key) * float(scale or 1)
    decimals = len(number.partition(".")[2])
    cited = float(number.replace(",", ""))
    shown = float(f"{float(value):.{decimals}f}")  # as the reports format it
    assert shown == pytest.approx(cited, abs=1e-9), f"{doc} cites {number} for {path} {key}: the record holds {value}"


@pytest.mark.parametrize("path", sorted({path for _, _, path, _ in citations()}))
def test_a_cited_record_is_tied_to_committed_code(path):
    # a number is only as good as the code behind it: a doc cites no record that bench.records_check would list
    from bench.records_check import git_state, in_history

    with open(ROOT / path) as f:
        commit, dirty = git_state(json.load(f))
    assert commit and in_history(commit) and dirty is False, (
        f"{path} is not tied to committed code (commit {commit}, dirty {dirty}): re-run it from a clean commit, "
        "or retire it and stop citing it")


def test_resolve_selects_by_fields():
    record = {"rows": [{"row": "a", "v": [1, 2.5]}, {"row": "b", "v": [3]}]}
    assert resolve(record, "rows/row=a/v/1") == 2.5
    with pytest.raises(AssertionError, match="selects 0"):
        resolve(record, "rows/row=c/v")


def test_records_check_reads_every_writer_s_commit():
    from bench.records_check import git_state

    assert git_state({"provenance": {"git": {"commit": "abc", "dirty": False}}}) == ("abc", False)
    assert git_state({"git": {"commit": "abc", "dirty": True}, "provenance": {}}) == ("abc", True)
    assert git_state({"commit": "abc", "provenance": {}}) == ("abc", None)  # a bare commit: dirty flag unknown
    assert git_state({"meta": {"commit": {"commit": "abc", "dirty": False}}}) == ("abc", False)
    assert git_state({"provenance": {"command": "x"}}) == (None, None)
