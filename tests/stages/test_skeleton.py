"""The stage skeleton (``stages/common.py: run_stage``): what a body returns is written, logged and printed; a
failed gate fails in one line after that; a body that opens no run logs nothing; no stage code imports flows/."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _body(fraction: float, start: bool = True):
    from stages.common import Gate, StageResult

    def body(run):
        if start:
            run.start({"limit": 0.2})
        out = Path(run.args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "reasons.csv").write_text("id,reason\n")
        return StageResult({"n": 3, "fraction": fraction, "note": "text", "missing": None}, f"demo: {fraction:.0%} bad",
                           artifacts=[out / "reasons.csv", (out, "folder")], expectations={"expect_x": 1},
                           gate=Gate("gatlas.demo_gate", fraction, 0.2, "demo.limit", "refused", out / "reasons.csv"))

    return body


def test_run_stage_writes_logs_prints_then_applies_the_gate(tmp_path, monkeypatch, capsys):
    import mlflow

    from stages.common import StageError, run_stage

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("GATLAS_MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    args = ["--out", "o", "--metrics", "m.json"]
    flags = [("--out", "out", "output folder")]
    run_stage("demo", _body(0.0), args, flags=flags)
    assert capsys.readouterr().out.strip().endswith("demo: 0% bad")
    with pytest.raises(StageError, match=r"demo: 50.0% of the inputs were refused, above demo.limit=20.0%; reasons in o"):
        run_stage("demo", _body(0.5), args, flags=flags)
    assert capsys.readouterr().out.strip().endswith("demo: 50% bad")  # printed before failing
    assert json.loads((tmp_path / "m.json").read_text()) == {"n": 3, "fraction": 0.5, "note": "text", "missing": None,
                                                             "failed_expectations": {"expect_x": 1}}
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("gaussian-atlas").experiment_id],
                              order_by=["attributes.start_time ASC"])
    assert [r.data.tags["gatlas.demo_gate"] for r in runs] == ["passed", "failed"]
    assert all(r.info.status == "FINISHED" and r.data.metrics == {"n": 3.0, "fraction": r.data.metrics["fraction"]}
               for r in runs)
    assert {a.path for a in client.list_artifacts(runs[1].info.run_id)} == {"reasons.csv", "folder"}

    run_stage("demo", _body(0.0, start=False), ["--out", "o", "--metrics", "m2.json"], flags=flags)
    assert (tmp_path / "m2.json").exists() and len(client.search_runs([runs[0].info.experiment_id])) == 2


def test_no_stage_or_library_file_imports_flows():
    bad = []
    for f in [*(ROOT / "stages").glob("*.py"), *(ROOT / "src").rglob("*.py")]:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{f.relative_to(ROOT)}: {m}" for m in mods if m == "flows" or m.startswith("flows.")]
    assert not bad
