"""Where the project points people at the MLflow UI, it gives the experiment's runs page in "Model training" mode
(MLflow 3.17 otherwise opens the experiment on its GenAI overview, whatever the experiment's tags say)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNS = "http://127.0.0.1:5000/#/experiments/{}/runs?workflowType=machine_learning"


def test_ui_url_is_the_runs_page_in_model_training_mode(monkeypatch):
    from stages.common import ui_url

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert ui_url("7") == RUNS.format(7)
    assert ui_url() == RUNS.format("<id>")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:8080/")
    assert ui_url("7") == "http://tracking:8080/#/experiments/7/runs?workflowType=machine_learning"


def test_the_flow_prints_the_runs_page_of_its_experiment(monkeypatch, capsys):
    import flows.pipeline as fp
    import stages.fanout

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(stages.fanout, "unreachable_api", lambda: None)
    monkeypatch.setattr(fp, "pipeline", lambda **kw: {"mlflow_run_id": "abc", "mlflow_experiment_id": "7",
                                                      "stages": {"ingest": "ran"}})
    fp.main(["run"])
    assert RUNS.format(7) in capsys.readouterr().out


def test_docs_and_commands_give_the_model_training_runs_page():
    files = [ROOT / "README.md", ROOT / "mlflow" / "README.md", ROOT / "docs" / "operations.md", ROOT / "Makefile",
             ROOT / "src" / "gaussian_atlas" / "cli.py", *(ROOT / "flows").glob("*.py"), *(ROOT / "stages").glob("*.py")]
    bare = []
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.startswith("UI = "):  # stages/common.py: the base that ui_url builds on
                continue
            for url in re.findall(r"https?://127\.0\.0\.1:5000[^\s`'\"()]*", line):
                url = url[:-1] if url.count(">") > url.count("<") else url  # <http://...> in markdown
                if not re.fullmatch(re.escape(RUNS).replace(r"\{\}", r"(\d+|<id>)"), url):
                    bare.append(f"{f.relative_to(ROOT)}: {url}")
    assert not bare
    guide = (ROOT / "mlflow" / "README.md").read_text(encoding="utf-8")
    train = guide.split("  - `train`:", 1)[1].split("\n  - ", 1)[0]
    assert "logged model" in train and "final\n    `model/` folder" not in train
