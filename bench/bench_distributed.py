"""Distributed training measured through the project's own stages: torchrun on 1 GPU, FSDP at 1.3B, N-GPU scaling.

    # one GPU (issue 15): every training stage under torchrun with NCCL, and FSDP2 at the 1.3B / 16K shape
    python bench/bench_distributed.py run --state .bench_state/dist --out "$OUT" --parts stages-1gpu fsdp-1p3b-16k
    # N GPUs of one host (issue 16; nvidia-h100-x2 first): scaling, loss agreement, resume across rank counts
    python bench/bench_distributed.py run --state .bench_state/dist --out "$OUT" --gpus 2 \
        --parts scale-340m-4k resume-340m-4k scale-1p3b-16k
    # here: the markdown tables and the projection of the paper's mid-training run
    python bench/bench_distributed.py report --state .bench_state/dist

Every case is a real stage run, ``torchrun --nproc_per_node n -m refine_core <stage> --config configs/tiny-cpu.yaml
key=value...``, on documents of random words that ``prepare-data`` writes once per shape; the figures come from the
``result.json`` the stage exports (``run.export_uri``): the per-step history (loss, step time, tokens/s, peak GPU
memory) and the final held-out loss. As in ``bench/bench_gpu.py``, ``run`` appends one JSON record per case to
``<state>/results.jsonl``, skips cases already there, leaves a part whose estimate no longer fits ``--budget-s`` to
the next slot, and copies its records and ``run.log`` to ``--out`` after every case.

Scaling keeps the global batch fixed (so the update is the same function of the data on 1 and on n GPUs) and reports
``efficiency = tokens/s on n GPUs / (n x tokens/s on 1 GPU)``, with the steady step time as the median of the steps
after the first (the first pays compilation and the allocator's warm-up). ``--device cpu`` runs the same cases with
gloo on the CPU (``--gpus`` then means processes): how the CPU test checks this script, not a measurement.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_gpu import _card as gpu_card  # noqa: E402  (needs REPO on the path)
from bench.gpu_results import _records  # noqa: E402

BASE_CONFIG = REPO / "configs" / "tiny-cpu.yaml"

MODELS = {
    "tiny": "{hidden_size: 64, num_hidden_layers: 2, num_heads: 2}",
    "340m": "{hidden_size: 1024, num_hidden_layers: 24, num_heads: 8, vocab_size: 32000}",
    "1p3b": "{hidden_size: 2048, num_hidden_layers: 24, num_heads: 16, vocab_size: 32000}",
}
# Global documents per step at each length (fixed across rank counts; a multiple of 8 so 2, 4 and 8 GPUs split it).
GLOBAL_BATCH = {256: 8, 4096: 16, 16384: 8}
SCALE_STEPS = 4  # the first step is warm-up; the median of the other three is the steady step
PAPER_RUN = {"steps": 100, "docs_per_step": 128, "tokens_per_doc": 16384}  # spec §2.4: DeltaNet-1.3B mid-training

# name -> (estimated seconds on a warm Triton cache, kind, model, sequence length)
PARTS: dict[str, tuple[int, str, str, int]] = {
    "stages-1gpu": (240, "stages", "tiny", 256),
    "fsdp-1p3b-16k": (240, "fsdp", "1p3b", 16384),
    "scale-tiny-256": (120, "scale", "tiny", 256),
    "scale-340m-4k": (300, "scale", "340m", 4096),
    "scale-340m-16k": (300, "scale", "340m", 16384),
    "scale-1p3b-4k": (360, "scale", "1p3b", 4096),
    "scale-1p3b-16k": (420, "scale", "1p3b", 16384),
    "resume-tiny-256": (90, "resume", "tiny", 256),
    "resume-340m-4k": (240, "resume", "340m", 4096),
}


# ------------------------------------------------------------------------------------------------------ stage runs
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runner:
    """Runs stages as the user would, logging each command and its output to ``<state>/run.log``."""

    def __init__(self, state: Path, device: str, deadline: float) -> None:
        self.state, self.device, self.deadline = state, device, deadline
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
                    "TRITON_CACHE_DIR": os.environ.get("TRITON_CACHE_DIR", str(state / "triton")),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
            self.env.pop(name, None)

    def common(self, model: str, length: int, out: Path) -> list[str]:
        overrides = [f"output_dir={out}", f"device={self.device}", "tracking.backend=none",
                     f"model.config={MODELS[model]}", f"data.min_tokens={length}", f"data.max_tokens={length}"]
        if self.device != "cpu":
            overrides += ["precision=bf16", f"triton_cache_dir={self.env['TRITON_CACHE_DIR']}"]
        if model != "tiny":
            overrides.append("model.gradient_checkpointing=true")
        return overrides

    def stage(self, stage: str, overrides: list[str], nproc: int | None) -> tuple[int, float, str]:
        """``refine <stage>`` in one plain process (``nproc=None``) or under ``torchrun --nproc_per_node nproc``."""
        if nproc is None:
            launcher = [sys.executable, "-m", "refine_core"]
        else:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
                        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "refine_core"]
        command = [*launcher, stage, "--config", str(BASE_CONFIG), *overrides]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(command, cwd=REPO, env=self.env, capture_output=True, text=True,
                                  timeout=max(self.deadline - time.monotonic(), 30))
            code, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            code, output = 124, (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        seconds = time.perf_counter() - t0
        with open(self.state / "run.log", "a") as log:
            log.write(f"===== {' '.join(command)}\n===== exit {code} after {seconds:.0f} s\n{output[-20000:]}\n")
        return code, seconds, output

    def prepared(self, model: str, length: int, docs: int) -> Path:
        """A prepared corpus of ``docs`` random-word documents of ``length`` byte tokens (made once per shape)."""
        root = self.state / f"data-{length}-{docs}"
        if not (root / "data").is_dir():
            shutil.rmtree(root, ignore_errors=True)
            words = max(length // 3, 60)  # words average over 4 bytes with their space: comfortably >= length bytes
            overrides = [*self.common(model, length, root), "device=cpu",
                         f"data.sources=[{{path: synthetic, synthetic_docs: {docs}, synthetic_words: {words}}}]",
                         "data.eval_docs=8"]
            code, _, output = self.stage("prepare-data", overrides, None)
            if code != 0:
                raise RuntimeError(f"prepare-data failed:\n{output[-3000:]}")
        return root / "data"


def _result(export: Path) -> dict:
    path = export / "result.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _summary(result: dict, section: str) -> dict:
    """Steady step time (median after the first step), tokens/s, peak memory, last loss, final held-out loss."""
    rows = [r for r in result.get("history", []) if f"{section}/step_time_s" in r]
    times = [r[f"{section}/step_time_s"] for r in rows[1:]] or [r[f"{section}/step_time_s"] for r in rows]
    rates = [r[f"{section}/tokens_per_s"] for r in rows[1:] if f"{section}/tokens_per_s" in r]
    peaks = [r["system/peak_mem_gib"] for r in rows if "system/peak_mem_gib" in r]
    keys = (f"{section}/loss", f"{section}/ntp_loss", f"{section}/sft_loss")
    losses = [r[key] for r in rows for key in keys if key in r]
    return {
        "steps": len(rows),
        "step_time_s": statistics.median(times) if times else None,
        "tokens_per_s": statistics.median(rates) if rates else None,
        "peak_mem_gib": max(peaks) if peaks else None,
        "last_loss": losses[-1] if losses else None,
        "eval_loss": result.get("final_eval_loss"),
    }


SECTION = {"train-ntp": "ntp", "train-refine": "refine", "post-train": "post"}


def _train_overrides(stage: str, batch: int, micro: int, steps: int, extra: list[str]) -> list[str]:
    section = SECTION[stage]
    overrides = [f"{section}.steps={steps}", f"{section}.batch_size={batch}", f"{section}.micro_batch_size={micro}",
                 f"{section}.eval_every={steps}", f"{section}.eval_max_docs=8", f"{section}.save_every=0"]
    if stage == "train-refine":
        # spec §2.4's M = 8 positions, k = 5 tokens, G = 1 rollout; one optimizer step per step
        overrides += [f"refine.mini_batch_size={batch}", "refine.num_chunks=8", "refine.rollout_tokens=5",
                      "refine.rollouts_per_position=1"]
    return [*overrides, *extra]


# ----------------------------------------------------------------------------------------------------------- parts
def part_stages(runner: Runner, gpus: int, emit) -> None:
    """Each training stage of the tiny config under torchrun with one process (NCCL on a GPU) against a plain run."""
    data = runner.prepared("tiny", 256, 48)
    for stage in ("train-ntp", "train-refine", "post-train", "ttt"):
        for launch in ("plain", "torchrun"):
            out = runner.state / "runs" / f"stages-{stage}-{launch}"
            shutil.rmtree(out, ignore_errors=True)
            overrides = [*runner.common("tiny", 256, out), f"data.prepared_dir={data}", f"export_uri={out}/export"]
            if stage == "ttt":  # TTT reads the test prompts only; a fresh tiny model answers them
                overrides = [o for o in overrides if not o.startswith("export_uri")]
            code, seconds, output = runner.stage(stage, overrides, None if launch == "plain" else 1)
            record = {"case": f"{stage}/{launch}", "stage": stage, "launch": launch, "nproc": 1, "returncode": code,
                      "seconds": round(seconds, 1)}
            if stage in SECTION:
                record.update(_summary(_result(out / "export"), SECTION[stage]))
            elif (out / "ttt" / "summary.json").exists():  # the scores, and a digest to compare the two launches
                record["scores"] = json.loads((out / "ttt" / "summary.json").read_text())["scores"]
                files = sorted((out / "ttt" / "predictions").glob("*.jsonl"))
                record["predictions_sha256"] = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
            if code != 0:
                record["error"] = output[-1500:]
            emit(record)


def part_fsdp(runner: Runner, model: str, length: int, gpus: int, emit, stages: list[str]) -> None:
    """FSDP2 against DDP (one process: the plain single-model path) at one shape: step time and peak memory."""
    batch = 2 * gpus
    data = runner.prepared(model, length, batch * 3 + 8)
    for stage in stages:
        for parallel in ("ddp", "fsdp"):
            out = runner.state / "runs" / f"fsdp-{model}-{length}-{stage}-{parallel}"
            shutil.rmtree(out, ignore_errors=True)
            overrides = [*runner.common(model, length, out), f"data.prepared_dir={data}", f"export_uri={out}/export",
                         f"parallel={parallel}", *_train_overrides(stage, batch, 1, 3, [])]
            code, seconds, output = runner.stage(stage, overrides, gpus)
            record = {"case": f"{stage}/{parallel}/{gpus}", "stage": stage, "parallel": parallel, "nproc": gpus,
                      "model": model, "length": length, "returncode": code, "seconds": round(seconds, 1),
                      **_summary(_result(out / "export"), SECTION[stage])}
            if code != 0:
                record["error"] = output[-1500:]
            emit(record)


def part_scale(runner: Runner, model: str, length: int, gpus: int, emit, done: set[str],
               stages: list[str]) -> None:
    """NTP and REFINE steps with the same global batch on 1 and on ``gpus`` processes, DDP and FSDP."""
    batch = GLOBAL_BATCH[length]
    data = runner.prepared(model, length, batch * SCALE_STEPS + 8)
    for stage in stages:
        for parallel in ("ddp", "fsdp"):
            for nproc in sorted({1, gpus}):
                case = f"{stage}/{parallel}/{nproc}"
                if case in done or (nproc == 1 and parallel == "fsdp"):
                    continue  # one process has nothing to shard: its baseline is the DDP case's
                out = runner.state / "runs" / f"scale-{model}-{length}-{stage}-{parallel}-{nproc}"
                shutil.rmtree(out, ignore_errors=True)
                overrides = [*runner.common(model, length, out), f"data.prepared_dir={data}",
                             f"export_uri={out}/export", f"parallel={parallel}",
                             *_train_overrides(stage, batch, 1, SCALE_STEPS, [])]
                code, seconds, output = runner.stage(stage, overrides, nproc)
                record = {"case": case, "stage": stage, "parallel": parallel, "nproc": nproc, "model": model,
                          "length": length, "global_batch": batch, "returncode": code, "seconds": round(seconds, 1),
                          **_summary(_result(out / "export"), SECTION[stage])}
                if code != 0:
                    record["error"] = output[-1500:]
                emit(record)


def part_resume(runner: Runner, model: str, length: int, gpus: int, emit) -> None:
    """A train-ntp checkpoint saved on ``gpus`` processes resumes on 1, and one saved on 1 resumes on ``gpus``;
    each against the uninterrupted run on the saving side's rank count (final held-out loss and last step's loss)."""
    batch, steps = GLOBAL_BATCH[length], 4
    data = runner.prepared(model, length, batch * steps + 8)
    for first, second in ((gpus, 1), (1, gpus)):
        results = {}
        for name, plan in (("whole", [(first, None)]), ("resumed", [(first, 2), (second, None)])):
            out = runner.state / "runs" / f"resume-{model}-{length}-{first}to{second}-{name}"
            shutil.rmtree(out, ignore_errors=True)
            code = 0
            for nproc, stop_after in plan:
                overrides = [*runner.common(model, length, out), f"data.prepared_dir={data}",
                             f"export_uri={out}/export", "ntp.resume=true",
                             *_train_overrides("train-ntp", batch, 1, steps, ["ntp.save_every=2"])]
                if stop_after is not None:
                    overrides.append(f"ntp.stop_after={stop_after}")
                code, _, output = runner.stage("train-ntp", overrides, nproc)
                if code != 0:
                    break
            results[name] = {**_summary(_result(out / "export"), "ntp"), "returncode": code}
            if code != 0:
                results[name]["error"] = output[-1500:]
        emit({"case": f"{first}to{second}", "model": model, "length": length, "saved_on": first,
              "resumed_on": second, "whole": results["whole"], "resumed": results["resumed"]})


# ---------------------------------------------------------------------------------------------------- orchestration
def _card(device: str) -> str:
    return "cpu" if device == "cpu" else gpu_card()


def run(args: argparse.Namespace) -> None:
    state = Path(args.state).resolve()
    state.mkdir(parents=True, exist_ok=True)
    out = Path(args.out).resolve() if args.out else None
    start = time.monotonic()
    runner = Runner(state, args.device, start + args.budget_s)
    card = _card(args.device)
    print(f"card: {card} x {args.gpus}", flush=True)

    def copy_out() -> None:
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            for name in ("results.jsonl", "run.log"):
                if (state / name).exists():
                    shutil.copyfile(state / name, out / name)

    for name in args.parts:
        estimate, kind, model, length = PARTS[name]
        done = {r["case"] for r in _records(state) if r.get("part") == name and r.get("card") == card
                and r.get("gpus") == args.gpus and r.get("returncode", 0) == 0 and "error" not in r}
        if kind != "scale" and done:
            print(f"[skip] {name}: in results.jsonl", flush=True)
            continue
        left = start + args.budget_s - time.monotonic()
        if estimate > left and not args.force:
            print(f"[wait] {name}: needs ~{estimate}s, {left:.0f}s left in this slot", flush=True)
            continue
        print(f"[run ] {name} ({left:.0f}s left)", flush=True)

        def emit(record: dict, name: str = name) -> None:
            record = {"part": name, "card": card, "gpus": args.gpus, "device": args.device,
                      "date": time.strftime("%Y-%m-%d"), **({"commit": args.commit} if args.commit else {}), **record}
            with open(state / "results.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"       {record['case']}: " + json.dumps({k: v for k, v in record.items() if k != "error"}),
                  flush=True)
            copy_out()

        if kind == "stages":
            part_stages(runner, args.gpus, emit)
        elif kind == "fsdp":
            part_fsdp(runner, model, length, args.gpus, emit, args.stages)
        elif kind == "scale":
            part_scale(runner, model, length, args.gpus, emit, done, args.stages)
        else:
            part_resume(runner, model, length, args.gpus, emit)
    copy_out()


# ----------------------------------------------------------------------------------------------------------- report
def scaling_rows(records: list[dict]) -> list[dict]:
    """One row per (card, part, stage, parallel, n > 1): tokens/s on 1 and n processes and the efficiency."""
    latest: dict[tuple, dict] = {}
    for r in records:
        if r.get("step_time_s") and r.get("global_batch"):
            latest[(r["card"], r["part"], r["stage"], r["parallel"], r["nproc"])] = r
    rows = []
    for (card, part, stage, parallel, nproc), r in sorted(latest.items()):
        base = latest.get((card, part, stage, "ddp", 1))
        if nproc == 1 or base is None:
            continue
        tokens = r["global_batch"] * r["length"]
        one, many = tokens / base["step_time_s"], tokens / r["step_time_s"]
        rows.append({"card": card, "part": part, "stage": stage, "parallel": parallel, "nproc": nproc,
                     "step_1": base["step_time_s"], "step_n": r["step_time_s"], "tok_s_1": one, "tok_s_n": many,
                     "efficiency": many / (nproc * one), "eval_loss_1": base.get("eval_loss"),
                     "eval_loss_n": r.get("eval_loss"), "peak_gib_n": r.get("peak_mem_gib")})
    return rows


def agreeing_digits(a: float | None, b: float | None) -> int | None:
    """How many significant digits two losses share (``-log10`` of their relative difference, floored)."""
    if a is None or b is None:
        return None
    if a == b:
        return 16
    return max(0, math.floor(-math.log10(abs(a - b) / max(abs(a), abs(b)))))


def projection(tok_s_per_gpu: float, efficiency: float, gpus: int = 8) -> dict:
    """The paper's mid-training run (``PAPER_RUN``) on ``gpus`` GPUs: hours = steps x docs x tokens / (gpus x
    per-GPU tokens/s x efficiency), the per-GPU rate being the 1-GPU REFINE step's and the efficiency measured."""
    tokens = PAPER_RUN["steps"] * PAPER_RUN["docs_per_step"] * PAPER_RUN["tokens_per_doc"]
    seconds = tokens / (gpus * tok_s_per_gpu * efficiency)
    return {"tokens": tokens, "gpus": gpus, "tok_s_per_gpu": tok_s_per_gpu, "efficiency": efficiency,
            "hours": seconds / 3600}


def report(args: argparse.Namespace) -> str:
    records = _records(Path(args.state))
    lines = ["| card | shape | stage | parallel | GPUs | step 1 GPU (s) | step n (s) | tok/s n | efficiency | "
             "held-out loss 1 / n (digits agreeing) | peak GiB |", "|" + " --- |" * 11]
    rows = scaling_rows(records)
    for row in rows:
        digits = agreeing_digits(row["eval_loss_1"], row["eval_loss_n"])
        lines.append(f"| {row['card']} | {row['part']} | {row['stage']} | {row['parallel']} | {row['nproc']} | "
                     f"{row['step_1']:.3f} | {row['step_n']:.3f} | {row['tok_s_n']:,.0f} | {row['efficiency']:.2f} | "
                     f"{row['eval_loss_1']} / {row['eval_loss_n']} ({digits}) | {row['peak_gib_n']} |")
    for r in records:
        if r.get("saved_on") is not None:
            whole, resumed = r["whole"], r["resumed"]
            lines.append(f"\nresume {r['part']} saved on {r['saved_on']}, resumed on {r['resumed_on']}: held-out loss "
                         f"{resumed.get('eval_loss')} against {whole.get('eval_loss')} uninterrupted ("
                         f"{agreeing_digits(whole.get('eval_loss'), resumed.get('eval_loss'))} digits)")
        elif r.get("launch"):
            lines.append(f"\n{r['card']} {r['case']}: exit {r['returncode']}, {r['seconds']} s, last loss "
                         f"{r.get('last_loss')}")
        elif r.get("part", "").startswith("fsdp"):
            lines.append(f"\n{r['card']} {r['part']} {r['case']}: exit {r['returncode']}, "
                         f"step {r.get('step_time_s')} s, peak {r.get('peak_mem_gib')} GiB")
    refine = [row for row in rows if row["stage"] == "train-refine" and "1p3b-16k" in row["part"]]
    if refine:
        best = max(refine, key=lambda row: row["efficiency"])
        p = projection(best["tok_s_1"], best["efficiency"])
        lines.append(f"\nprojection ({best['card']}, {best['parallel']}): {p['tokens']:,} tokens / (8 x "
                     f"{p['tok_s_per_gpu']:,.0f} tok/s x {p['efficiency']:.2f}) = {p['hours']:.1f} h")
    text = "\n".join(lines)
    print(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the named parts' cases that are not done yet, within --budget-s")
    p_run.add_argument("--state", default=".bench_state/dist")
    p_run.add_argument("--out", default=os.environ.get("OUT"))
    p_run.add_argument("--budget-s", type=float, default=540)
    p_run.add_argument("--parts", nargs="+", choices=list(PARTS), required=True)
    p_run.add_argument("--gpus", type=int, default=1, help="processes (one per GPU) of the multi-process cases")
    p_run.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p_run.add_argument("--stages", nargs="+", default=["train-ntp", "train-refine"],
                       choices=["train-ntp", "train-refine"], help="the stages of the fsdp and scale parts")
    p_run.add_argument("--force", action="store_true", help="run the named parts even past the budget estimate")
    p_run.add_argument("--commit", help="the git commit measured (the device's copy has no .git); kept per record")
    p_rep = sub.add_parser("report", help="markdown tables and the projection from results.jsonl")
    p_rep.add_argument("--state", default=".bench_state/dist")
    args = parser.parse_args()
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
