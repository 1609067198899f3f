"""Bad input is refused in one clear line (issue 13): exit status 2, a message naming the problem, the offending
value or file and the fix, and no traceback; nothing is written that a later run could mistake for a result.

Each case is what a user could type; the expected fragments are what the message must contain.
"""

from __future__ import annotations

import pytest

from refine_core.cli import main
from tests.reliability.tiny_run import TINY_RUN

TINY = [
    *TINY_RUN,
    "tracking.backend=none",
    "ntp.steps=1",
    "ntp.batch_size=4",
    "ntp.micro_batch_size=2",
]
TASKS = "eval.task_files=[configs/data/ruler_squadqa_tiny_1024_test.parquet]"
REFINE_SMALL = ["refine.steps=1", "refine.batch_size=2", "refine.mini_batch_size=2", "refine.micro_batch_size=1"]

# name -> (command, extra arguments, fragments the one error line must contain); {p}: the prepared data directory,
# {t}: this case's scratch directory (files the case writes first are made in ``setup``)
CASES: dict[str, tuple[str, list[str], list[str]]] = {
    # the config file and the overrides
    "config file missing": ("train-ntp", ["--config", "{t}/nope.yaml"], ["nope.yaml", "does not exist"]),
    "config file not YAML": ("train-ntp", ["--config", "{t}/bad.yaml"], ["bad.yaml", "not valid YAML", "line 3"]),
    "config file a list": ("train-ntp", ["--config", "{t}/list.yaml"], ["list.yaml", "mapping"]),
    "override without =": ("train-ntp", ["ntp.steps"], ["ntp.steps", "key=value"]),
    "unknown key": ("train-ntp", ["ntp.stepz=3"], ["ntp.stepz", "valid keys"]),
    "unknown section": ("train-ntp", ["ntpp.steps=3"], ["ntpp", "valid keys"]),
    "wrong type": ("train-ntp", ["ntp.steps=many"], ["ntp.steps", "integer"]),
    "a section set to null": ("train-ntp", ["ntp=null"], ["ntp is null", "leave it out"]),
    "zero steps": ("train-ntp", ["ntp.steps=0"], ["ntp.steps=0", ">= 1"]),
    "warm-up longer than the run": ("train-ntp", ["ntp.warmup_steps=5"], ["ntp.warmup_steps=5", "shorten"]),
    "unknown schedule": ("train-ntp", ["ntp.lr_schedule=step"], ["ntp.lr_schedule='step'", "cosine"]),
    "negative learning rate": ("train-ntp", ["ntp.lr=-1"], ["ntp.lr", "> 0"]),
    "unknown precision": ("train-ntp", ["precision=fp16"], ["precision='fp16'", "bf16"]),
    "empty output_dir": ("train-ntp", ["output_dir="], ["output_dir is empty"]),
    "bad resume value": ("train-ntp", ["ntp.resume=always"], ["ntp.resume='always'", "force"]),
    "unknown architecture": ("train-ntp", ["model.arch=mamba"], ["model.arch='mamba'", "lact"]),
    "LaCT with an unsupported lr_dim": ("train-ntp", ["model.arch=lact", "model.config={lr_dim: 2}"], ["lr_dim=2"]),
    "unknown engine": ("train-refine", ["refine.engine=quick"], ["refine.engine='quick'", "branch"]),
    "mini-batch larger than the batch": ("train-refine", ["refine.batch_size=2", "refine.mini_batch_size=4"],
                                         ["refine.batch_size=2", "divide"]),
    "unknown post-training mode": ("post-train", ["post.mode=rl"], ["post.mode='rl'", "nested_refine"]),
    "unknown TTT mode": ("ttt", ["ttt.mode=sometimes"], ["ttt.mode", "reset"]),
    "eval budget of zero tokens": ("evaluate", ["eval.max_seq_tokens=0", TASKS], ["eval.max_seq_tokens=0"]),
    "empty task filter": ("evaluate", ["eval.tasks=[]", TASKS], ["eval.tasks=[]", "null"]),
    # found once the stage looks at the files and the machine
    "no such data file": ("prepare-data", ["data.sources=[{path: {t}/nowhere.jsonl}]"],
                          ["nowhere.jsonl", "does not exist"]),
    "an empty data file": ("prepare-data", ["data.sources=[{path: {t}/empty.jsonl}]"],
                           ["hold no document at all", "empty.jsonl", "text_column"]),
    "no prepared data": ("train-ntp", ["data.prepared_dir={t}/nowhere"], ["no prepared data", "prepare-data"]),
    "a file where output_dir should be": ("train-ntp", ["output_dir={t}/afile", "data.prepared_dir={p}"],
                                          ["Not a directory", "afile"]),
    "no such model": ("train-ntp", ["model.source={t}/nomodel", "data.prepared_dir={p}"],
                      ["nomodel", "does not exist"]),
    "a model directory without config.json": ("train-ntp", ["model.source={t}", "data.prepared_dir={p}"],
                                              ["config.json not found"]),
    "a truncated model.safetensors": ("train-ntp", ["model.source={t}/model", "data.prepared_dir={p}"],
                                      ["model.safetensors is not a readable safetensors file", "truncated"]),
    "a data file that is not JSON lines": ("prepare-data", ["data.sources=[{path: {t}/mistyped.jsonl}]"],
                                           ["mistyped.jsonl line 1 is not valid JSON"]),
    "CUDA on a machine without it": ("train-ntp", ["device=cuda", "data.prepared_dir={p}"],
                                     ["device='cuda'", "device=cpu"]),
    "documents shorter than 2 x margin": ("train-refine", ["data.prepared_dir={p}", "refine.margin=1000",
                                                           *REFINE_SMALL], ["128 tokens", "2 x refine.margin=2000"]),
    "more chunks than tokens": ("train-refine", ["data.prepared_dir={p}", "refine.num_chunks=200", *REFINE_SMALL],
                                ["128 tokens", "refine.num_chunks=200", "data.min_tokens"]),
    "no task file matches": ("evaluate", ["eval.task_files=[{t}/none*.parquet]"], ["none*.parquet", "matches no"]),
    "a task filter that matches nothing": ("evaluate", ["eval.tasks=[nonexistent]", TASKS],
                                           ["eval.tasks=['nonexistent']", "ruler_squadqa"]),
    "no post-training files": ("post-train", [], ["post.train_files is empty"]),
}



def setup(scratch) -> None:
    (scratch / "bad.yaml").write_text("name: x\nntp: [steps: 1\n")
    (scratch / "list.yaml").write_text("- a\n- b\n")
    (scratch / "empty.jsonl").write_text("")
    (scratch / "afile").write_text("x")
    (scratch / "mistyped.jsonl").write_text("{not json\n")
    from refine_core.models import DeltaNetConfig, build_model, save_pretrained

    model_dir = save_pretrained(build_model(DeltaNetConfig(hidden_size=32, num_hidden_layers=1, num_heads=2,
                                                           vocab_size=259)), scratch / "model")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gets_one_clear_line_and_exit_2(name, tmp_path, prepared, capsys, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[2])  # TASKS is relative to the repo
    command, extra, fragments = CASES[name]
    setup(tmp_path)
    extra = [a.replace("{t}", str(tmp_path)).replace("{p}", str(prepared)) for a in extra]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main([command, *([] if extra[:1] == ["--config"] else []), *_with_defaults(extra, tmp_path)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith(f"refine {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "out") == before  # nothing new beside the inputs


def _with_defaults(extra: list[str], scratch) -> list[str]:
    """The tiny settings and a scratch output_dir, unless the case sets them itself (the case's own come last)."""
    keys = {a.split("=", 1)[0] for a in extra if "=" in a}
    base = [a for a in TINY if a.split("=", 1)[0] not in keys]
    out = [] if "output_dir" in keys else [f"output_dir={scratch / 'out'}"]
    return [*base, *out, *extra] if extra[:1] != ["--config"] else [*extra, *out]
