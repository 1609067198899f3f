"""bench/repro.py, issue 17's study driver: plan, config composition, tables from known scores, and the whole study
end to end at the tiny scale through the same code (slow)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bench import repro
from bench.repro import ARMS, Study, _merge, _rebase, plan
from bench.repro_report import BEGIN, END, load_runs, render, write_experiments
from refine_core.evaluation.significance import permutation_pvalue_reference
from tests.repro_data import fake_shared_data


def _study(tmp_path: Path, tiny: bool = True) -> Study:
    return Study(tmp_path / "work", tmp_path / "results", tmp_path / "shared", tiny=tiny)


def test_plan_order_and_only(tmp_path: Path) -> None:
    study = _study(tmp_path, tiny=False)
    order = [(a.name, s) for a, s in plan(study)]
    assert order[:7] == [("base", 0), ("mid-ntp", 0), ("mid-refine", 0), ("mid-ntp", 1), ("mid-refine", 1),
                         ("mid-ntp", 2), ("mid-refine", 2)]
    assert order[7:10] == [("post-sft", 0), ("post-nested_sft", 0), ("post-nested_refine", 0)]
    assert [name for name, _ in order[10:]] == ["ttt-ntp-reset", "ttt-ntp-cumulative", "ttt-refine-reset",
                                                "ttt-refine-cumulative"]
    assert [(a.name, s) for a, s in plan(study, ["mid-refine:1", "base"])] == [("base", 0), ("mid-refine", 1)]
    with pytest.raises(SystemExit, match="unknown arms"):
        plan(study, ["nope"])
    assert repro.STARTS == ["base", "mid-refine", "post-nested_refine"]


def test_config_composition_rebases_paths_and_records_overrides(tmp_path: Path) -> None:
    assert _merge({"a": [{"x": 1, "y": 2}, {"z": 3}], "b": 1}, {"a": [{}, {"z": 4}], "c": 2}) == {
        "a": [{"x": 1, "y": 2}, {"z": 4}], "b": 1, "c": 2}
    assert _rebase({"p": ["runs/repro/data", "../shared/data/x", "other"]}, "/w", "/s") == {
        "p": ["/w/data", "/s/x", "other"]}
    study = _study(tmp_path, tiny=False)
    cfg, applied = study.train_config(ARMS["mid-refine"], 2)
    assert cfg.seed == 2 and cfg.output_dir == str(study.work / "mid-refine-s2")
    assert cfg.model.source == str(study.work / "base-s0" / "train-ntp" / "model")
    assert cfg.data.prepared_dir == str(study.work / "data") and cfg.refine.nsp_update
    assert "model.source=runs/repro/base-s0/train-ntp/model" in applied["overrides"]  # recorded machine-independent
    ntp, _ = study.train_config(ARMS["mid-ntp"], 0)
    assert not ntp.refine.nsp_update and ntp.refine.baseline_schedule == "matched"
    # apart from the objective, the two mid-training arms are the same run
    assert {k: v for k, v in vars(ntp.refine).items() if k != "nsp_update"} == {
        k: v for k, v in vars(study.train_config(ARMS["mid-refine"], 0)[0].refine).items() if k != "nsp_update"}
    ev, _ = study.eval_config(ARMS["post-sft"], 0)
    assert ev.eval.niah_tasks == [] and ev.seed == 0  # QA only; the evaluation's seed never follows the arm's
    assert study.model_dir(ARMS["post-sft"], 0).parent.name == "post-train-sft"
    assert study.model_dir(ARMS["mid-ntp"], 1).parent.name == "train-refine-baseline"


def _write_result(results: Path, arm: str, seed: int, scores: dict[str, float], loss: float) -> None:
    folder = results / arm / f"s{seed}"
    folder.mkdir(parents=True)
    record = {"arm": arm, "seed": seed, "runs": [{"card": "test", "commit": "abc", "date": "now"}],
              "train": {"complete": True, "steps": 10, "target_steps": 10, "history": [
                  {"step": 10, "eval/loss": loss}], "config": "configs/repro/x.yaml", "overrides": []},
              "eval": {"complete": True, "summary": {"scores": {}}, "seconds": 1.0}}
    (folder / "result.json").write_text(json.dumps(record))
    (folder / "scores.jsonl").write_text("".join(
        json.dumps({"id": i, "task": i.split(":")[0], "score": s, "prediction": ""}) + "\n" for i, s in scores.items()))


def test_tables_from_known_scores(tmp_path: Path) -> None:
    results = tmp_path / "results"
    ids = [f"niah_single_1:1024:d0.5:{i}" for i in range(4)] + [f"niah_multivalue:2048:d0.5:{i}" for i in range(2)]
    qa = [f"ruler_squadqa:{i}" for i in range(5)]

    def scores(niah: list[float], answers: list[float]) -> dict[str, float]:
        return {**dict(zip(ids, niah, strict=True)), **dict(zip(qa, answers, strict=True))}

    _write_result(results, "base", 0, scores([0, 0, 0, 0, 0, 0], [0] * 5), 3.0)
    _write_result(results, "mid-ntp", 0, scores([1, 0, 0, 0, 0.5, 0], [0, 0, 0, 0, 0]), 2.5)
    _write_result(results, "mid-ntp", 1, scores([0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0]), 2.7)
    _write_result(results, "mid-refine", 0, scores([1, 1, 1, 0, 0.5, 0.5], [1, 0, 0, 0, 0]), 2.4)
    _write_result(results, "mid-refine", 1, scores([1, 1, 0, 0, 1, 0], [1, 1, 0, 0, 0]), 2.6)
    tables = render(load_runs(results))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in tables.splitlines() if line.startswith("| ")}
    # S at 1K: NTP seed means 25 and 0 -> 12.5 ± 17.7; REFINE 75 and 50 -> 62.5 ± 17.7
    assert "| 12.5 ± 17.7 |" in rows["+ NTP mid-training"] and "| 62.5 ± 17.7 |" in rows["+ REFINE mid-training"]
    assert "| 2.600 ± 0.141 |" in rows["+ NTP mid-training"]  # held-out loss mean ± std
    # the S comparison: differences over (seed, example) pairs, tested exactly
    diffs = [0, 1, 1, 0] + [1, 1, 0, 0]
    expected_p = permutation_pvalue_reference([d for d in diffs if d])
    s_row = rows["S"]
    assert "| +50.0 |" in s_row and "| yes |" in s_row and f"| {expected_p:.3g} |" in s_row
    assert "8 (4 differ, exact)" in s_row
    assert "REFINE − NTP on SQuAD-QA" in tables
    assert render({}).startswith("No device run of the study has happened yet")
    calibration = {"ntp_step_s": 0.25, "ntp_tokens_per_s": 524288.0, "refine_step_s": 1.0, "base_projected_s": 600.0,
                   "mid_ntp_projected_s": 30.0, "mid_refine_projected_s": 100.0, "card": "H100", "commit": "abc"}
    assert "| base pre-training, projected | 10.0 min |" in render({}, calibration)

    doc = tmp_path / "EXP.md"
    doc.write_text(f"intro\n{BEGIN}\nold\n{END}\noutro\n")
    write_experiments(doc, "new tables\n")
    assert doc.read_text() == f"intro\n{BEGIN}\nnew tables\n{END}\noutro\n"
    doc.write_text("no markers")
    with pytest.raises(SystemExit, match="no results markers"):
        write_experiments(doc, "x")


@pytest.mark.slow
def test_the_tiny_study_end_to_end(tmp_path: Path) -> None:
    """prepare, run (stopped at a deadline and resumed), report into MLflow and a copy of EXPERIMENTS.md, and the
    models carried to a fresh work directory: the same code as the GPU study, at the toy scale (~1.5 min)."""
    import mlflow

    shared = fake_shared_data(tmp_path / "shared")
    args = ["--tiny", "--work", str(tmp_path / "work"), "--shared", str(shared), "--results", str(tmp_path / "res")]
    assert repro.main(["prepare", *args]) == 0
    prepared = json.loads((tmp_path / "res" / "prepare.json").read_text())
    assert prepared["leaking_documents"] == 0 and prepared["corpus"]["heldout_unit"] > 0

    # a deadline that has passed: the base model trains one step, checkpoints and stops; `run` then resumes it
    study = Study(tmp_path / "work", tmp_path / "res", shared, tiny=True, deadline=time.time())
    repro.ensure_data(study)
    assert not repro.run_train(study, ARMS["base"], 0, {"card": "test"})
    assert study.record(ARMS["base"], 0)["train"]["steps"] == 1

    out = tmp_path / "out"
    assert repro.main(["run", *args, "--out", str(out)]) == 0
    base = study.record(ARMS["base"], 0)["train"]
    assert base["complete"] and [h["step"] for h in base["history"] if "ntp/loss" in h] == [1, 2, 3, 4]
    assert {p.name for p in out.iterdir()} >= {"repro-results.tar.gz", "repro-run.log", "model-base-s0.tar.part00",
                                               "model-mid-refine-s0.tar.part00",
                                               "model-post-nested_refine-s0.tar.part00"}
    ntp = [json.loads(line)["id"] for line in (tmp_path / "res" / "mid-ntp" / "s1" / "scores.jsonl").open()]
    refine = [json.loads(line)["id"] for line in (tmp_path / "res" / "mid-refine" / "s0" / "scores.jsonl").open()]
    assert sorted(ntp) == sorted(refine)  # every model answers the same examples
    assert (tmp_path / "res" / "mid-refine" / "s0" / "niah_heatmap.png").is_file()
    assert repro.main(["run", *args]) == 0  # nothing left to do

    doc = tmp_path / "EXPERIMENTS.md"
    doc.write_text(f"# plan\n{BEGIN}\n{END}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert repro.main(["report", *args, "--experiments", str(doc), "--tracking-uri", uri]) == 0
    text = doc.read_text()
    assert "| + REFINE mid-training | 0,1 |" in text and "REFINE against NTP mid-training" in text
    assert "| + Nested REFINE + TTT REFINE (cumulative) | 0 |" in text
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("refine-repro").experiment_id])
    assert sorted(r.data.tags["repro.run"] for r in runs) == sorted(
        [f"{a}/s{s}" for a, s in [("base", 0), ("mid-ntp", 0), ("mid-ntp", 1), ("mid-refine", 0), ("mid-refine", 1),
                                  ("post-sft", 0), ("post-nested_sft", 0), ("post-nested_refine", 0)]]
        + [f"ttt-{m}-{x}/s0" for m in ("ntp", "refine") for x in ("reset", "cumulative")])
    mid = next(r for r in runs if r.data.tags["repro.run"] == "mid-refine/s0")
    assert {"niah_heatmap.png", "tables.md", "scores.jsonl"} <= {a.path for a in client.list_artifacts(mid.info.run_id)}
    assert client.get_metric_history(mid.info.run_id, "refine/ntp_loss")
    assert repro.main(["report", *args, "--experiments", str(doc), "--tracking-uri", uri]) == 0
    assert len(client.search_runs([mid.info.experiment_id])) == len(runs)  # a new report replaces the old runs

    # the models travel as bf16 parts into a fresh work directory, and load
    fresh = Study(tmp_path / "work2", tmp_path / "res", shared, tiny=True)
    restored = repro.unpack(fresh, out)
    assert sorted(p.name for p in restored) == ["base-s0", "mid-refine-s0", "post-nested_refine-s0"]
    from refine_core.models import load_pretrained

    model = load_pretrained(str(fresh.model_dir(ARMS["mid-refine"], 0)))
    assert model.num_parameters() > 0
    assert repro.unpack(fresh, out) == []  # already there: kept


def test_the_repro_configs_load_and_agree() -> None:
    """Every config of configs/repro loads; the two mid-training arms differ only in the objective; the data
    sections of pre- and mid-training describe the same prepared data."""
    from refine_core.config import load_config, to_dict

    configs = {p.name: load_config(p) for p in sorted(repro.CONFIGS.glob("*.yaml"))}
    assert set(configs) == {"corpus.yaml", "eval.yaml", "midtrain-ntp.yaml", "midtrain-refine.yaml",
                            "posttrain.yaml", "pretrain.yaml", "ttt.yaml"}
    ntp, refine = to_dict(configs["midtrain-ntp.yaml"]), to_dict(configs["midtrain-refine.yaml"])
    differ = {k for k in ntp if ntp[k] != refine[k]}
    assert differ == {"name", "output_dir", "refine"}
    assert {k for k in ntp["refine"] if ntp["refine"][k] != refine["refine"][k]} == {"nsp_update"}
    pre = to_dict(configs["pretrain.yaml"])["data"]
    for name in ("midtrain-ntp.yaml", "midtrain-refine.yaml"):
        mid = to_dict(configs[name])["data"]
        assert {k for k in pre if pre[k] != mid[k]} == {"tokenizer_vocab_size", "tokenizer_train_chars"}
    # the paper's recipe where the study keeps it (spec §3): M = 8, k = 5, G = 1, cosine reward, c_nsp 0.2
    r = configs["midtrain-refine.yaml"].refine
    assert (r.num_chunks, r.rollout_tokens, r.rollouts_per_position, r.reward, r.nsp_loss_coef, r.clip_eps,
            r.dual_clip, r.batch_size // r.mini_batch_size) == (8, 5, 1, "cosine", 0.2, 0.2, 3.0, 4)
    assert configs["ttt.yaml"].refine.nsp_loss_coef == 0.4 and configs["ttt.yaml"].refine.reward == "exact_match"
    assert configs["posttrain.yaml"].refine.reward == "hybrid"
