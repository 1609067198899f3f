"""Issue 17's small-scale reproduction of the paper's comparison, in short device slots that resume where they stopped.

    python bench/repro.py prepare                      # CPU, once: corpus, tokenizer, held-out RULER-QA files
    python bench/repro.py calibrate --out "$OUT"       # GPU, first: step times, the projected time of every arm
    python bench/repro.py run --budget-s 540 --out "$OUT" [--only ARM[:SEED] ...]      # GPU: the next steps
    python bench/repro.py status                       # what is done, what is next
    python bench/repro.py unpack DIR                   # models brought back from an earlier slot, before `run`
    python bench/repro.py pack ARM:SEED --out DIR      # one model's bf16 parts by hand (run packs them itself)
    python bench/repro.py report                       # tables into EXPERIMENTS.md, one MLflow run per arm and seed
    ... --tiny                                         # the same code on a toy scale (tests/test_repro.py, ~1 min CPU)

The study (configs/repro/, EXPERIMENTS.md): a small DeltaNet pre-trained from scratch (``base``), mid-trained from
it with NTP only (``mid-ntp``) and with REFINE (``mid-refine``), three seeds each, every model evaluated on RULER
NIAH and a held-out RULER-QA set; then, from ``mid-refine`` seed 0, post-training (``post-sft``,
``post-nested_sft``, ``post-nested_refine``) and test-time training on the QA test prompts (``ttt-{ntp,refine}-
{reset,cumulative}``). Every step calls the stage entry functions the Kubeflow components call (``prepare_data``,
``make_ruler_qa_files``, ``train_ntp``, ``train_refine``, ``post_train``, ``evaluate``, ``test_time_train``) on the
configs in configs/repro/ with a few overrides (seed, output directory, starting model), which each result records.

Work goes to ``--work`` (default ``runs/repro``, ignored by git: checkpoints, prepared data, models); results to
``--results`` (default ``bench/results/repro``, committed): per arm and seed a ``result.json`` (commands, card,
commit, config and overrides, training history, evaluation summary), ``scores.jsonl`` (every example's score, for
the paired tests) and the NIAH heatmap. A step whose result says it is complete is never run again.

Time: ``run`` stops starting steps once the budget would not cover them; a training stage gets the deadline through
``$REFINE_DEADLINE`` (refine_core.training.session) and stops at a step boundary with a checkpoint, and the next
``run`` resumes it (``resume: true`` in the configs). With ``--out`` the results (one ``repro-results.tar.gz``), the
log and the bf16 weights of every model a later arm starts from (``model-<arm>-s<seed>.tar.partNN``, at most 15 MiB
each) are copied there: carry the parts to the next slot and ``unpack`` them (EXPERIMENTS.md has the commands).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.repro_arms import ARMS, CONFIGS, SHARED_PREFIX, STARTS, WORK_PREFIX, Arm  # noqa: E402  (needs REPO on the path)
from bench.repro_tiny import TINY, TINY_SEEDS  # noqa: E402
from bench.repro_transport import bring_back, pack_model, unpack  # noqa: E402

logger = logging.getLogger("repro")

DEFAULT_SECONDS = {"data": 180.0, "train": 60.0, "eval": 120.0, "ttt": 300.0}


def stage_dir_name(arm: Arm, cfg: Any) -> str:
    """Where the arm's stage writes under its output directory (the stages' own naming)."""
    if arm.stage == "train-refine":
        return "train-refine" if cfg.refine.nsp_update else "train-refine-baseline"
    if arm.stage == "post-train":
        return f"post-train-{cfg.post.mode}"
    return arm.stage


def _merge(tree: Any, patch: Any) -> Any:
    """``patch`` deep-merged into ``tree`` (lists of equal length merge element by element)."""
    if isinstance(tree, dict) and isinstance(patch, dict):
        return {**tree, **{k: _merge(tree.get(k), v) for k, v in patch.items()}}
    if isinstance(tree, list) and isinstance(patch, list) and len(tree) == len(patch):
        return [_merge(a, b) for a, b in zip(tree, patch, strict=True)]
    return patch


def _rebase(value: Any, work: str, shared: str) -> Any:
    if isinstance(value, dict):
        return {k: _rebase(v, work, shared) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebase(v, work, shared) for v in value]
    if isinstance(value, str) and value.startswith(WORK_PREFIX):
        return work + value[len(WORK_PREFIX):]
    if isinstance(value, str) and value.startswith(SHARED_PREFIX):
        return shared + value[len(SHARED_PREFIX):]
    return value


@dataclass
class Study:
    """Paths, scale and the bookkeeping of one study."""

    work: Path
    results: Path
    shared: Path
    tiny: bool = False
    deadline: float = float("inf")
    finished_models: list[tuple[str, int]] = field(default_factory=list)

    def seeds(self, arm: Arm) -> tuple[int, ...]:
        return TINY_SEEDS.get(arm.name, arm.seeds) if self.tiny else arm.seeds

    def config(self, name: str, overrides: list[str], label: str) -> tuple[Any, dict[str, Any]]:
        """``configs/repro/<name>`` with the paths rebased, the tiny patch (if any) and ``overrides``; the config
        and what was applied (recorded in the results)."""
        from refine_core.config import load_config

        tree = yaml.safe_load((CONFIGS / name).read_text())
        if self.tiny:
            tree = _merge(tree, TINY.get(name, {}))
        tree = _rebase(tree, str(self.work), str(self.shared))
        resolved = self.work / "configs" / f"{label}.yaml"
        resolved.parent.mkdir(parents=True, exist_ok=True)
        resolved.write_text(yaml.safe_dump(tree, sort_keys=False))
        cfg = load_config(resolved, overrides)
        recorded = [o.replace(str(self.work), WORK_PREFIX) for o in overrides]  # machine-independent paths
        return cfg, {"config": f"configs/repro/{name}", "tiny": self.tiny, "overrides": recorded}

    def arm_dir(self, arm: Arm, seed: int) -> Path:
        return self.work / f"{arm.name}-s{seed}"

    def model_dir(self, arm: Arm, seed: int) -> Path:
        cfg, _ = self.train_config(arm, seed)
        return self.arm_dir(arm, seed) / stage_dir_name(arm, cfg) / "model"

    def train_config(self, arm: Arm, seed: int) -> tuple[Any, dict[str, Any]]:
        overrides = [*arm.overrides, f"seed={seed}", f"output_dir={self.arm_dir(arm, seed)}", "tracking.backend=none"]
        if arm.start is not None:
            overrides.append(f"model.source={self.model_dir(ARMS[arm.start], 0)}")
        if arm.name == "base" and (self.work / "inputs" / "tokenizer").is_dir():
            overrides.append("data.tokenizer_vocab_size=null")  # the data stage's tokenizer, trained once
        return self.config(arm.config, overrides, f"{arm.name}-s{seed}-train")

    def eval_config(self, arm: Arm, seed: int) -> tuple[Any, dict[str, Any]]:
        overrides = [*arm.eval_overrides, f"output_dir={self.arm_dir(arm, seed)}",
                     f"model.source={self.model_dir(arm, seed)}", "tracking.backend=none"]
        return self.config("eval.yaml", overrides, f"{arm.name}-s{seed}-eval")

    # ------------------------------------------------------------------------------------------------ results
    def result_path(self, arm: Arm, seed: int) -> Path:
        return self.results / arm.name / f"s{seed}" / "result.json"

    def record(self, arm: Arm, seed: int) -> dict[str, Any]:
        path = self.result_path(arm, seed)
        return json.loads(path.read_text()) if path.is_file() else {"arm": arm.name, "seed": seed, "runs": []}

    def save_record(self, arm: Arm, seed: int, record: dict[str, Any]) -> None:
        path = self.result_path(arm, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
        tmp.replace(path)

    def timing(self, kind: str) -> float:
        """Seconds a step of ``kind`` needs: the longest measured so far, else a guess (``train``: the least slice
        worth starting, since training stops at the deadline by itself)."""
        if self.tiny:
            return 0.0
        path = self.results / "timings.json"
        measured = json.loads(path.read_text()).get(kind) if path.is_file() and kind != "train" else None
        return float(measured) if measured is not None else DEFAULT_SECONDS[kind]

    def save_timing(self, kind: str, seconds: float) -> None:
        path = self.results / "timings.json"
        timings = json.loads(path.read_text()) if path.is_file() else {}
        timings[kind] = round(max(seconds, timings.get(kind, 0.0)), 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(timings, indent=1, sort_keys=True))

    def left(self) -> float:
        return self.deadline - time.time()


def environment() -> dict[str, str]:
    """The card, the software and the commit a result was produced with."""
    import torch

    from refine_core import runtime

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {"card": card, "torch": torch.__version__, "commit": runtime.git_commit() or "unknown",
            "command": " ".join(["python", "bench/repro.py", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d %H:%M")}


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------- prepare


def prepare(study: Study) -> dict[str, Any]:
    """Corpus export, the data stage (training the tokenizer), the held-out RULER-QA files, and the leak check."""
    from refine_core.data.passages import PassageCorpus, find_leaks, load_heldout, prompt_units, unit_key
    from refine_core.data.tasks import read_task_file
    from refine_core.stages.make_ruler_qa import make_ruler_qa_files
    from refine_core.stages.prepare_data import prepare_data

    inputs = study.work / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    corpus_cfg, _ = study.config("corpus.yaml", [], "corpus")
    source = corpus_cfg.data.sources[0]
    corpus = PassageCorpus(source.passage_files, source.heldout_files, source.passage_doc_chars)
    docs = list(corpus.documents())
    _write_text_parquet(inputs / "passages.parquet", [d.id for d in docs], [d.text for d in docs])
    logger.info("exported %d documents (%d characters) to %s", len(docs), sum(len(d.text) for d in docs),
                inputs / "passages.parquet")

    shutil.rmtree(inputs / "tokenizer", ignore_errors=True)  # so the data stage trains it (train_config)
    data_cfg, _ = study.train_config(ARMS["base"], 0)
    prepared = prepare_data(data_cfg)
    shutil.copytree(prepared.prepared_dir / "tokenizer", inputs / "tokenizer")

    qa_cfg, _ = study.config("eval.yaml", [f"model.tokenizer={inputs / 'tokenizer'}", "model.source=null"], "ruler-qa")
    shutil.rmtree(qa_cfg.ruler_qa.out_dir, ignore_errors=True)  # the configs glob these files: no stale sizes
    qa_files = make_ruler_qa_files(qa_cfg)

    # The evaluation material must not be in the training text: the shipped files held out, and the files just made.
    held = load_heldout(source.heldout_files)
    made = [u for path in qa_files.values() for ex in read_task_file(path) for u in prompt_units(ex.prompt)]
    leaks = find_leaks([d.text for d in docs], held)
    missing = sorted({unit_key(u) for u in made} - held.units)
    report = {"corpus": corpus.stats, "documents": len(docs), "leaking_documents": len(leaks),
              "qa_passages_outside_the_heldout_files": len(missing),
              "qa_files": {split: str(path.relative_to(study.work)) for split, path in qa_files.items()},
              "prepared": {"counts": prepared.counts, "token_lengths": prepared.stats["token_lengths"],
                           "tokens_kept": prepared.stats["tokens_kept"]}}
    if leaks or missing:
        raise RuntimeError(f"held-out check failed: {len(leaks)} corpus documents share a 13-word run with the "
                           f"evaluation files, {len(missing)} RULER-QA passages are not from the held-out files")
    (study.results / "prepare.json").parent.mkdir(parents=True, exist_ok=True)
    (study.results / "prepare.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    logger.info("prepared: %s", json.dumps(report, sort_keys=True))
    return report


def _write_text_parquet(path: Path, ids: list[str], texts: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.table({"id": ids, "text": texts}), tmp, compression="zstd", compression_level=19)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------------------- run


def plan(study: Study, only: list[str] | None = None) -> list[tuple[Arm, int]]:
    """The (arm, seed) pairs in the order they run: base; the mid-training arms seed by seed; post; TTT."""
    order: list[tuple[Arm, int]] = [(ARMS["base"], 0)]
    mid = [ARMS["mid-ntp"], ARMS["mid-refine"]]
    for seed in sorted({s for arm in mid for s in study.seeds(arm)}):
        order += [(arm, seed) for arm in mid if seed in study.seeds(arm)]
    order += [(arm, s) for arm in ARMS.values() if arm.stage in ("post-train", "ttt") for s in study.seeds(arm)]
    if only:
        wanted = {tuple(o.split(":")) if ":" in o else (o,) for o in only}
        unknown = {w[0] for w in wanted} - set(ARMS)
        if unknown:
            raise SystemExit(f"--only names unknown arms {sorted(unknown)}; arms: {', '.join(ARMS)}")
        order = [(a, s) for a, s in order if (a.name,) in wanted or (a.name, str(s)) in wanted]
    return order


def done(study: Study, arm: Arm, seed: int) -> bool:
    """The arm and seed is trained (if it trains) and evaluated."""
    record = study.record(arm, seed)
    trained = arm.stage == "ttt" or bool(record.get("train", {}).get("complete"))
    return trained and bool(record.get("eval" if arm.evaluate else "ttt", {}).get("complete"))


def ensure_data(study: Study) -> None:
    """The prepared shards on this machine (they do not travel: about 150 MB of tokens)."""
    from refine_core.stages.prepare_data import prepare_data

    if (study.work / "data" / "manifest.json").is_file():
        return
    if not (study.work / "inputs" / "passages.parquet").is_file() or not (study.work / "inputs" / "tokenizer").is_dir():
        raise SystemExit(f"{study.work}/inputs lacks passages.parquet or tokenizer/: run `python bench/repro.py "
                         "prepare` first (on a machine with ../shared/data) and carry runs/repro/inputs")
    t0 = time.time()
    cfg, _ = study.train_config(ARMS["base"], 0)
    prepare_data(cfg)
    study.save_timing("data", time.time() - t0)


def run_train(study: Study, arm: Arm, seed: int, env: dict[str, str]) -> bool:
    """Train (or resume) one arm and seed until it completes or the deadline passes; True when complete."""
    from refine_core.stages.post_train import post_train
    from refine_core.stages.train_ntp import train_ntp
    from refine_core.stages.train_refine import train_refine
    from refine_core.training.session import DEADLINE_ENV

    record = study.record(arm, seed)
    if record.get("train", {}).get("complete"):
        return True
    if arm.start is not None and not (study.model_dir(ARMS[arm.start], 0) / "config.json").is_file():
        raise SystemExit(f"{arm.name} starts from {arm.start} seed 0, whose model is not in {study.work}: carry its "
                         "parts (model-<arm>-s0.tar.part*) and run `python bench/repro.py unpack DIR` first")
    cfg, applied = study.train_config(arm, seed)
    entry = {"train-ntp": train_ntp, "train-refine": train_refine, "post-train": post_train}[arm.stage]
    t0 = time.time()
    os.environ[DEADLINE_ENV] = str(study.deadline)
    try:
        result = entry(cfg, None)
    finally:
        os.environ.pop(DEADLINE_ENV, None)
        _free_memory()
    target = {"train-ntp": cfg.ntp.steps, "train-refine": cfg.refine.steps, "post-train": cfg.post.steps}[arm.stage]
    history = {int(h["step"]): h for h in record.get("train", {}).get("history", [])}
    history.update({int(h["step"]): h for h in result.history})
    train = record.setdefault("train", {"seconds": 0.0})
    train.update(stage=arm.stage, steps=result.steps, target_steps=target, complete=result.steps >= target,
                 final_eval_loss=result.final_eval_loss, history=[history[k] for k in sorted(history)],
                 **applied)
    train["seconds"] = train.get("seconds", 0.0) + time.time() - t0
    record["runs"].append({**env, "phase": "train", "steps_after": result.steps})
    study.save_record(arm, seed, record)
    if train["complete"] and arm.name in STARTS and seed == 0:
        study.finished_models.append((arm.name, seed))
    logger.info("%s seed %d: %d/%d steps%s", arm.name, seed, result.steps, target,
                "" if train["complete"] else " (stopped at the deadline; run again to resume)")
    return bool(train["complete"])


def run_eval(study: Study, arm: Arm, seed: int, env: dict[str, str]) -> None:
    """Evaluate one trained model (``evaluate``) or run its test-time training (``ttt``); record every score."""
    from refine_core.stages.evaluate import evaluate
    from refine_core.stages.ttt import test_time_train

    phase = "eval" if arm.evaluate else "ttt"
    t0 = time.time()
    if arm.evaluate:
        cfg, applied = study.eval_config(arm, seed)
        result = evaluate(cfg, None)
    else:
        if not (study.model_dir(ARMS[arm.start], 0) / "config.json").is_file():
            raise SystemExit(f"{arm.name} starts from {arm.start} seed 0, whose model is not in {study.work}")
        cfg, applied = study.train_config(arm, seed)
        result = test_time_train(cfg, None)
    _free_memory()
    out = study.result_path(arm, seed).parent
    out.mkdir(parents=True, exist_ok=True)
    with (out / "scores.jsonl").open("w") as f:
        for path in sorted((result.output_dir / "predictions").glob("*.jsonl")):
            for line in path.read_text().splitlines():
                row = json.loads(line)
                f.write(json.dumps({k: row[k] for k in ("id", "task", "score", "prediction")}) + "\n")
    if (result.output_dir / "niah_heatmap.png").is_file():
        shutil.copy(result.output_dir / "niah_heatmap.png", out / "niah_heatmap.png")
    (out / "summary.md").write_text(result.table + "\n")
    seconds = time.time() - t0
    record = study.record(arm, seed)
    record[phase] = {"complete": True, "summary": result.summary, "seconds": seconds, **applied}
    record["runs"].append({**env, "phase": phase})
    study.save_record(arm, seed, record)
    study.save_timing(phase, seconds)
    logger.info("%s seed %d: %s done in %.0fs", arm.name, seed, phase, seconds)


def run(study: Study, only: list[str] | None, out: Path | None) -> int:
    """Run the plan's unfinished steps in order while the budget lasts; 0 when all of them are done."""
    env = environment()
    logger.info("repro run on %s, commit %s, %.0fs left", env["card"], env["commit"], study.left())
    unpack(study, study.work / "transport")
    pending = [(a, s) for a, s in plan(study, only) if not done(study, a, s)]
    try:
        if any(arm.stage in ("train-ntp", "train-refine") for arm, _ in pending):
            ensure_data(study)  # post-training and TTT read only the RULER-QA files
        for arm, seed in pending:
            if arm.stage != "ttt" and not study.record(arm, seed).get("train", {}).get("complete"):
                if study.left() < study.timing("train"):
                    break
                if not run_train(study, arm, seed, env):
                    break
            phase = "eval" if arm.evaluate else "ttt"
            if study.left() < study.timing(phase):
                logger.info("%s seed %d: %s needs about %.0fs, %.0fs left: next command", arm.name, seed, phase,
                            study.timing(phase), study.left())
                break
            run_eval(study, arm, seed, env)
    finally:
        if out is not None:
            bring_back(study, out)
    remaining = [(a.name, s) for a, s in plan(study, only) if not done(study, a, s)]
    logger.info("remaining: %s", ", ".join(f"{a}:{s}" for a, s in remaining) or "nothing, the plan is complete")
    return 0 if not remaining else 3


# ------------------------------------------------------------------------------------------------------- calibrate


def calibrate(study: Study, ntp_steps: int = 30, refine_steps: int = 4) -> dict[str, float]:
    """Measured step times on this machine and what they make of the plan (``<results>/calibration.json``).

    A fresh base model trains ``ntp_steps`` NTP steps (the pre-training shapes) and then ``refine_steps`` REFINE
    mid-training steps (the REFINE arm's shapes), in scratch directories under ``<work>/calibrate``. The medians of
    the later steps (the first ones compile and autotune fla's kernels, which the Triton cache keeps for the study)
    project the time of every arm; if the pre-training would not fit a session, lower ``ntp.steps`` in
    configs/repro/pretrain.yaml before the study starts (its cosine schedule depends on it).
    """
    import statistics

    from refine_core.stages.train_ntp import train_ntp
    from refine_core.stages.train_refine import train_refine

    ensure_data(study)
    scratch = study.work / "calibrate"
    base_cfg, _ = study.train_config(ARMS["base"], 0)
    cfg, _ = study.config("pretrain.yaml", [
        f"output_dir={scratch / 'base'}", f"data.prepared_dir={study.work / 'data'}", "data.tokenizer_vocab_size=null",
        f"ntp.steps={ntp_steps}", "ntp.warmup_steps=0", "ntp.eval_every=0", "ntp.save_every=0", "ntp.resume=false",
        "overwrite=true", "tracking.backend=none"], "calibrate-ntp")
    ntp = train_ntp(cfg, None)
    _free_memory()
    ntp_s = statistics.median(h["ntp/step_time_s"] for h in ntp.history[ntp_steps // 2:] if "ntp/step_time_s" in h)
    cfg, _ = study.config("midtrain-refine.yaml", [
        f"output_dir={scratch / 'refine'}", f"data.prepared_dir={study.work / 'data'}",
        f"model.source={ntp.model_dir}", f"refine.steps={refine_steps}", "refine.eval_every=0", "refine.save_every=0",
        "refine.resume=false", "overwrite=true", "tracking.backend=none"], "calibrate-refine")
    refine = train_refine(cfg, None)
    _free_memory()
    refine_s = statistics.median(h["refine/step_time_s"] for h in refine.history[1:] if "refine/step_time_s" in h)
    tokens = base_cfg.ntp.batch_size * base_cfg.data.max_tokens
    mid, _ = study.train_config(ARMS["mid-refine"], 0)
    out = {"ntp_step_s": ntp_s, "ntp_tokens_per_s": tokens / ntp_s, "refine_step_s": refine_s,
           "base_projected_s": base_cfg.ntp.steps * ntp_s,
           "mid_refine_projected_s": mid.refine.steps * refine_s,
           # the NTP arm: the same documents in the same 4 optimizer steps a step, without the rollouts
           "mid_ntp_projected_s": mid.refine.steps * ntp_s * mid.refine.batch_size / base_cfg.ntp.batch_size}
    out = {k: round(v, 3) for k, v in out.items()}
    study.results.mkdir(parents=True, exist_ok=True)
    (study.results / "calibration.json").write_text(json.dumps({**out, **environment()}, indent=1, sort_keys=True))
    logger.info("calibration: %s", json.dumps(out, sort_keys=True))
    return out


# ------------------------------------------------------------------------------------------------------------- cli


@contextlib.contextmanager
def _log_to(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("prepare", "calibrate", "run", "status", "pack", "unpack", "report"))
    parser.add_argument("path", nargs="?", help="unpack: the folder with model-*.tar.part* files; pack: ARM:SEED")
    parser.add_argument("--work", default=WORK_PREFIX, help="checkpoints, data, models (default runs/repro)")
    parser.add_argument("--results", default=None, help="default bench/results/repro (--tiny: <work>/results)")
    parser.add_argument("--shared", default=SHARED_PREFIX, help="the LongBench / RULER files (../shared/data)")
    parser.add_argument("--tiny", action="store_true", help="everything at a toy scale (the CPU test)")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="run: seconds this command may use")
    parser.add_argument("--reserve-s", type=float, default=30.0, help="run: seconds kept for copying results out")
    parser.add_argument("--only", nargs="*", help="run/status: only these arms (ARM or ARM:SEED)")
    parser.add_argument("--out", default=None, help="run: copy results, log and finished models' parts here")
    parser.add_argument("--experiments", default=None, help="report: the EXPERIMENTS.md to update")
    parser.add_argument("--tracking-uri", default=None, help="report: MLflow store (default: the embedded one)")
    args = parser.parse_args(argv)

    from refine_core import runtime

    runtime.setup_logging("INFO")
    work = Path(args.work).resolve()
    results = Path(args.results).resolve() if args.results else (
        work / "results" if args.tiny else REPO / "bench" / "results" / "repro")
    study = Study(work, results, Path(args.shared).resolve(), tiny=args.tiny)
    out = Path(args.out) if args.out else None
    if args.command == "prepare":
        prepare(study)
        return 0
    if args.command == "status":
        for arm, seed in plan(study, args.only):
            record = study.record(arm, seed)
            train = record.get("train", {})
            steps = f"{train.get('steps', 0)}/{train.get('target_steps', '?')}" if arm.stage != "ttt" else "-"
            print(f"{arm.name:22s} seed {seed}  train {steps:>10s}  {'done' if done(study, arm, seed) else 'to do'}")
        return 0
    if args.command == "pack":
        if not args.path or ":" not in args.path or out is None:
            raise SystemExit("pack needs ARM:SEED and --out DIR")
        name, seed = args.path.split(":")
        pack_model(study, ARMS[name], int(seed), out)
        return 0
    if args.command == "calibrate":
        from refine_core.runtime import configure_triton_cache

        configure_triton_cache(None)
        with _log_to(out / "repro-calibrate.log" if out else None):
            calibrate(study)
            if out is not None:
                bring_back(study, out)
        return 0
    if args.command == "unpack":
        if not args.path:
            raise SystemExit("unpack needs the folder with the model-*.tar.part* files")
        unpack(study, Path(args.path))
        return 0
    if args.command == "report":
        from bench.repro_report import report

        experiments = Path(args.experiments) if args.experiments else (None if args.tiny else REPO / "EXPERIMENTS.md")
        report(study, experiments, args.tracking_uri)
        return 0
    from refine_core.runtime import configure_triton_cache

    configure_triton_cache(None)  # <repo>/.triton_cache: stays on a warm machine between commands
    study.deadline = time.time() + args.budget_s - args.reserve_s
    with _log_to(out / "repro-run.log" if out else None):
        return run(study, args.only, out)


if __name__ == "__main__":
    raise SystemExit(main())
