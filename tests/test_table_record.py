"""The README's claims table is the committed CPU table (`bash benchmarks/table_cpu.sh`), for today's code.

`benchmarks/results/table_cpu/` holds what the run measured: one record per run and the report.
These tests check that the records were made at the protocol the committed command gives now
(a changed world generator, curve or default without new records fails here), that every run the
claims need is there with its method's plateau budget, that the verdicts follow from the records,
and that the README prints the report's claims table.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "table_cpu"


@pytest.fixture(scope="module")
def table():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import table as module

    return module


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads((OUT / "table.json").read_text())


def _args(table, report):
    argv = shlex.split(report["command"])[2:]  # "python benchmarks/table.py ..."
    return table.parse_args(argv)


def test_records_were_made_at_the_protocol_the_command_gives_today(table, report):
    args = _args(table, report)
    assert table.protocol(args) == report["protocol"]
    script = (ROOT / "benchmarks" / "table_cpu.sh").read_text()
    for flag in ("--ablations claims", "--precision bf16", "--jobs 2 --threads 1", "--cache-frozen-prefix"):
        assert flag in report["command"] and flag in script


def test_every_claim_run_is_there_with_its_methods_plateau_budget(table, report):
    args = _args(table, report)
    records = table.load_records(OUT, report["protocol"])
    methods = None if args.methods == "all" else args.methods.split(",")
    jobs = table.run_order(args, table.main_rows(methods), table.claim_ablation_rows())
    expected = {(row.slug, seed) for _, row, seed in jobs}
    assert {(r["row_slug"], r["seed"]) for r in records} == expected
    for r in records:
        if r["method"] != "zero_shot":
            assert r["epochs"] == args.budget["video"][r["method"]], r["row_slug"]
            assert r["updates"] == r["epochs"] * 18  # 600 training clips, 32 per update, full epochs
    seeded = [r for r in records if r["row_slug"] in table.SEEDED_METHODS | table.CLAIM_ABLATIONS]
    assert len(seeded) == (7 + 4) * 3


def test_verdicts_follow_from_the_records(table, report):
    recomputed = table.claims(table.load_records(OUT, report["protocol"]))
    assert [c["verdict"] for c in recomputed] == [c["verdict"] for c in report["claims"]]
    for mine, theirs in zip(recomputed, report["claims"]):
        if mine.get("diff") is not None:
            assert mine["diff"] == pytest.approx(theirs["diff"])
    assert all(c["verdict"] != "not run" for c in recomputed)


def test_readme_prints_the_committed_claims_table(report):
    md = (OUT / "table.md").read_text()
    claims = md.split("### claims", 1)[1]
    rows = [line for line in claims.splitlines() if line.startswith("| C")]
    assert len(rows) == 5
    readme = (ROOT / "README.md").read_text()
    for row in rows:
        assert row in readme, f"README.md: expected the claims row {row!r} of {OUT / 'table.md'}"
