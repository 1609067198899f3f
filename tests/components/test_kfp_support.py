"""refine_core.kfp_support without kfp: config from YAML text, metric publishing, reports, cleanup of work dirs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from refine_core import kfp_support as ks
from refine_core.config import ConfigError
from refine_core.tracking import NullTracker
from tests.components.conftest import StubArtifact

REPO = Path(__file__).resolve().parents[2]


def test_config_from_yaml_applies_overrides_then_typed_settings() -> None:
    cfg = ks.config_from_yaml("name: x\nrefine: {steps: 3}\n", ["refine.steps=5", "ntp.lr=1e-4"],
                              {"model.source": "/a: path with: colons", "refine.nsp_update": False})
    assert cfg.refine.steps == 5 and cfg.ntp.lr == pytest.approx(1e-4)
    assert cfg.model.source == "/a: path with: colons" and cfg.refine.nsp_update is False
    with pytest.raises(ConfigError, match="refine.stepz"):
        ks.config_from_yaml("refine: {stepz: 3}\n")
    with pytest.raises(ValueError, match="mapping"):
        ks.config_from_yaml("- a\n- b\n")


def test_stage_config_points_at_artifacts_and_a_fresh_work_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(ks.WORK_DIR_ENV, str(tmp_path / "work"))
    cfg = ks.stage_config("model: {config: {hidden_size: 32}, tokenizer: byte}\n", "train", prepared_dir="/in/data",
                          model_dir="/in/model")
    assert Path(cfg.output_dir).parent == tmp_path / "work" and Path(cfg.output_dir).is_dir()
    assert str(cfg.prepared_dir) == "/in/data" and cfg.model.source == "/in/model"
    # the checkpoint's own config.json and tokenizer win over the experiment's from-scratch settings
    assert cfg.model.config == {} and cfg.model.tokenizer is None
    assert ks.stage_config("", "train").output_dir != cfg.output_dir


def test_work_dir_is_removed_when_the_process_exits(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import os
        os.environ["{ks.WORK_DIR_ENV}"] = {str(tmp_path)!r}
        from refine_core import kfp_support as ks
        path = ks.work_dir("x")
        (path / "ckpt").write_text("weights")
        print(path)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip().startswith(str(tmp_path)) and not Path(out.stdout.strip()).exists()


def test_publish_metrics_drops_missing_and_non_finite_values() -> None:
    sink = StubArtifact("/unused")
    logged: list[tuple[dict, int]] = []

    class Recorder(NullTracker):
        def log_metrics(self, metrics, step):
            logged.append((dict(metrics), step))

    clean = ks.publish_metrics({"a": 1, "b": None, "c": float("nan"), "d": 2.5}, sink, Recorder(), step=7)
    assert clean == {"a": 1.0, "d": 2.5} and sink.metadata == clean and logged == [(clean, 7)]


def test_compare_report_differences_and_missing_cells() -> None:
    markdown, page, deltas = ks.compare_report(
        {"base": {"eval/qa": 10.0, "loss": 2.0}, "refine": {"eval/qa": 12.5, "extra": 1.0}}, baseline="base"
    )
    assert "| eval/qa | 10 | 12.5 | 2.5 |" in markdown
    assert "| extra | – | 1 | – |" in markdown
    assert deltas == {"compare/refine_minus_base/eval/qa": 2.5}
    assert page.startswith("<!doctype html>") and "<td>12.5</td>" in page
    with pytest.raises(ValueError, match="baseline"):
        ks.compare_report({"a": {}}, baseline="b")
    assert "recall" not in markdown  # the glossary explains only rows that are there
    probe = {"base": {**ks.midtrain_scores({"final_eval_loss": 2.0, "final_recall_acc": 0.25}, "final")}}
    assert probe["base"] == {"midtrain/final_eval_loss": 2.0, "midtrain/final_recall_acc": 25.0}
    markdown, page, _ = ks.compare_report(probe, baseline="base")
    assert "- midtrain/final_recall_acc: top-1 accuracy" in markdown and "<li>midtrain/final_recall_acc" in page


def test_flat_scores_and_reports() -> None:
    summary = {"scores": {"qa": 50.0}, "averages": {"longbench": 40.0}, "counts": {"qa": 4}}
    assert ks.flat_scores(summary) == {"eval/qa": 50.0, "eval/avg/longbench": 40.0}
    history = [{"step": float(i), "eval/loss": 5.0 - i * 0.1} for i in range(40)]
    text = ks.training_report("train-x", 39, 1.1, history, NullTracker(), ks.KfpContext("p", "r", "t"),
                              max_rows=5)
    assert "parent run `p`" in text and "MLflow tracking off" in text
    assert text.count("\n| ") <= 7 and "| 39 |" in text  # thinned, last step kept
    assert '<img alt="train-x training curves" src="data:image/png;base64,' in text  # rendered by the KFP UI
    assert "- qa: 4 examples" in ks.eval_report("ttt", "| table |", summary, NullTracker(), ks.KfpContext())


def test_refine_core_never_imports_kfp() -> None:
    code = ("import sys, refine_core.cli, refine_core.kfp_support; "
            "assert not [m for m in sys.modules if m == 'kfp' or m.startswith('kfp.')], 'kfp imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_a_tiny_runs_report_says_it_is_a_smoke_test() -> None:
    from refine_core.config import load_config

    tiny = load_config(ks_repo() / "configs" / "tiny-cpu.yaml")
    caveat = ks.smoke_test_caveat(tiny)
    assert "smoke test" in caveat and "not the paper's result" in caveat
    assert ks.smoke_test_caveat(load_config(ks_repo() / "configs" / "delta_net-1.3b-16k.yaml")) == ""
    markdown, _, _ = ks.compare_report({"start model": {"loss": 5.5}, "ntp-baseline": {"loss": 4.5},
                                        "refine": {"loss": 4.4}}, baseline="ntp-baseline", caveat=caveat)
    assert markdown.splitlines()[2].startswith("This is a smoke test")
    assert "| loss | 5.5 | 4.5 | 4.4 | 1 | -0.1" in markdown


def ks_repo():
    from pathlib import Path

    return Path(__file__).resolve().parents[2]
