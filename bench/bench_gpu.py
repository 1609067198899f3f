"""The GPU measurement of issue 10 in one command that fits short device slots and resumes where the last one stopped.

    python bench/bench_gpu.py run --state .bench_state --out "$OUT" --budget-s 540       # on the GPU machine
    python bench/bench_gpu.py summarize --state .bench_state                              # here: latest.json + table

``run`` executes the named parts (default: all, in the order of ``PARTS``) one per fresh subprocess, appends what each
measures to ``<state>/results.jsonl`` and copies that file and the logs to ``--out`` after every part. A part already
in ``results.jsonl`` is skipped, and a part whose estimated time no longer fits the budget waits for the next slot;
carry the state folder to the next call to go on. Triton's cache lives in ``<state>/triton`` (fla asks Triton to keep
its autotune results there too), so a later slot starts warm; ``--pack-cache`` writes it as ``triton-cache.tar.xz``
(in parts of at most 15 MiB) to ``--out``, ``--unpack-cache`` restores it from such parts.

The parts (all bf16 autocast with fp32 master weights, random-token documents, one card):

* ``env``: card, versions, the card's measured copy bandwidth and bf16 matrix rate (the ceilings).
* ``cold-*`` / ``warm-*``: the first NTP and REFINE steps of a fresh process, with an empty and with the filled cache.
* ``tests``: the GPU tests of the branch engine, of CUDA-graph decoding, of the model on fla's kernels, of the fused
  norm / SwiGLU / short-conv kernels against the PyTorch ops and of LaCT on CUDA (``pytest -m gpu``).
* ``steps-<model>-<len>``: the NTP step against REFINE with the ``branch`` and ``faithful`` engines on the same batch
  (M = 8, k = 5, G = 1): median step time, phase split, tokens/s, MFU, peak memory, and how many Triton kernels were
  compiled after the first step (new cut positions every step must compile nothing).
* ``decode-<model>``: rollout/evaluation decoding tokens/s at batch 8, 64 and 256 against Hugging Face ``generate`` on
  fla's own ``DeltaNetForCausalLM`` with the same weights, and as a fraction of the bandwidth floor.
* ``profile-<model>-<len>``: the top CUDA kernels of one NTP and one branch REFINE step.

MFU counts model FLOPs per trained token: 6·N (N = parameters without the input embedding, whose lookup has no
matrix product) plus the chunked delta rule, 3 × (4CK + 2C(K+V) + 2CV + 6KV) per token, head and layer (forward
once, backward twice; C = 64). Activation checkpointing recomputes the forward but is not counted (model FLOPs, not
hardware FLOPs). Peak = the card's dense bf16 datasheet figure, and the matrix rate measured in ``env``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.gpu_results import _part_key, _records, summarize, tables  # noqa: E402  (needs REPO on the path)
from bench.triton_cache_parts import pack_cache, unpack_cache  # noqa: E402

MODELS = {
    "340m": {"hidden_size": 1024, "num_hidden_layers": 24, "num_heads": 8, "vocab_size": 32000},
    "1p3b": {"hidden_size": 2048, "num_hidden_layers": 24, "num_heads": 16, "vocab_size": 32000},
    # the paper's LaCT checkpoint shape (configs/lact-760m-16k.yaml)
    "lact760m": {
        "model_type": "lact_swiglu", "hidden_size": 1536, "num_hidden_layers": 24, "num_attn_heads": 24,
        "num_lact_heads": 2, "lact_chunk_size": 2048, "window_size": 2048, "w0_w2_low_rank": 32, "use_muon": True,
        "ttt_nope": True, "rope_theta": 1e6, "max_position_embeddings": 32768, "vocab_size": 32000,
    },
}
# Documents per step / per optimizer step / per micro-batch, and activation checkpointing, per (model, length).
SHAPES = {
    ("340m", 4096): {"batch": 8, "mini": 8, "micro": 4, "checkpointing": False},
    ("340m", 16384): {"batch": 2, "mini": 2, "micro": 1, "checkpointing": True},
    ("1p3b", 4096): {"batch": 4, "mini": 4, "micro": 2, "checkpointing": True},
    ("1p3b", 16384): {"batch": 2, "mini": 2, "micro": 1, "checkpointing": True},
    ("lact760m", 16384): {"batch": 2, "mini": 2, "micro": 1, "checkpointing": True},
}
DENSE_BF16_TFLOPS = {"H200": 989.5, "H100": 989.5}  # SXM datasheets, dense (no sparsity)

# the files of tests/gpu that the ``tests`` part runs (test_ddp_export needs two GPUs)
GPU_TEST_FILES = ("branch_engine", "decode_graph", "fla_model", "fla_ops", "lact_gpu")

# name -> (estimated seconds on a warm cache, argv of the part)
PARTS: dict[str, tuple[int, list[str]]] = {
    "env": (30, ["env"]),
    "cold-340m-4k": (300, ["first-steps", "340m", "4096", "cold"]),
    "warm-340m-4k": (35, ["first-steps", "340m", "4096", "warm"]),
    "tests": (120, ["tests", ",".join(GPU_TEST_FILES)]),
    "steps-340m-4k": (60, ["steps", "340m", "4096", "ntp,branch,faithful"]),
    "decode-340m": (80, ["decode", "340m"]),
    "steps-1p3b-16k": (240, ["steps", "1p3b", "16384", "ntp,branch"]),
    # The faithful engine on its own slot: its first 1.3B / 16K step re-encodes 16 prefixes of up to 16K tokens
    # three times; the NTP case again gives the ratio within its own process.
    "faithful-1p3b-16k": (300, ["steps", "1p3b", "16384", "ntp,faithful"]),
    "profile-340m-4k": (45, ["profile", "340m", "4096"]),
    "profile-1p3b-16k": (90, ["profile", "1p3b", "16384"]),
    "decode-1p3b": (150, ["decode", "1p3b"]),
    "steps-340m-16k": (150, ["steps", "340m", "16384", "ntp,branch"]),
    "steps-1p3b-4k": (150, ["steps", "1p3b", "4096", "ntp,branch"]),
    "steps-lact760m-16k": (200, ["steps", "lact760m", "16384", "ntp,branch"]),
}


# ----------------------------------------------------------------------------------------------------------- helpers
def _emit(record: dict) -> None:
    print("RESULT " + json.dumps(record), flush=True)


def _sync() -> None:
    import torch

    torch.cuda.synchronize()


def _triton_entries() -> int:
    """Compiled kernels in the Triton cache (one folder each): what a step compiled shows up here."""
    path = Path(os.environ.get("TRITON_CACHE_DIR", ""))
    return sum(1 for p in path.iterdir() if p.is_dir()) if path.is_dir() else 0


def _build(model_name: str, checkpointing: bool):
    import torch

    from refine_core.models import build_model, config_from_dict

    torch.manual_seed(0)
    fields = {"model_type": "delta_net", "eos_token_id": 2, "pad_token_id": 2, **MODELS[model_name]}
    model = build_model(config_from_dict(fields)).cuda().train()
    model.gradient_checkpointing = checkpointing
    return model


def _docs(n: int, length: int, vocab: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=gen) for _ in range(n)]


def _refine_cfg(shape: dict, engine: str, nsp: bool):
    from refine_core.config import RefineConfig

    return RefineConfig(
        batch_size=shape["batch"], mini_batch_size=shape["mini"], micro_batch_size=shape["micro"], num_chunks=8,
        rollout_tokens=5, rollouts_per_position=1, engine=engine, nsp_update=nsp, lr=1e-6, steps=1,
    )


def _step(model, optimizer, docs, cfg, step: int) -> dict:
    import torch

    from refine_core.training.refine_step import refine_step

    return refine_step(
        model, optimizer, docs, list(range(len(docs))), cfg, seed=0, step=step, pad_id=2, eos_id=2,
        autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16),
    )


def model_flops_per_token(model, chunk: int = 64) -> float:
    """6·N plus the token mixer's own work (see the module docstring) per trained token."""
    cfg = model.config
    n = model.num_parameters() - model.model.embeddings.weight.numel()
    if cfg.model_type == "lact_swiglu":
        # sliding-window attention, q·k and p·v over a full window of W keys: 4·W·D forward; the fast weights,
        # upstream's count (ttt_operation.py): 18·d·h forward per token and fast-weight head; backward twice each
        attention = 4 * cfg.window_size * cfg.hidden_size
        fast = 18 * cfg.fw_head_dim * cfg.fw_hidden_dim * cfg.num_lact_heads
        return 6 * n + 3 * (attention + fast) * cfg.num_hidden_layers
    heads, k, v = cfg.num_heads, cfg.key_dim // cfg.num_heads, cfg.value_dim // cfg.num_heads
    delta = 3 * (4 * chunk * k + 2 * chunk * (k + v) + 2 * chunk * v + 6 * k * v) * heads * cfg.num_hidden_layers
    return 6 * n + delta


# ------------------------------------------------------------------------------------------------------------ parts
def part_env() -> None:
    import torch

    import refine_core.models.ops.fla_backend as fb

    def version(name: str) -> str | None:
        try:
            from importlib.metadata import version as v

            return v(name)
        except Exception:
            return None

    torch.manual_seed(0)
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        _sync()
        times.append(start.elapsed_time(end) / 1e3)
    copy_gbs = 2 * x.numel() / statistics.median(times[2:]) / 1e9
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    _sync()
    matmul_tflops = 20 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12
    name = torch.cuda.get_device_name()
    _emit({
        "part": "env", "card": name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "triton": version("triton"), "fla": version("fla-core"), "transformers": version("transformers"),
        "fla_available": fb.fla_available(), "copy_gbs": round(copy_gbs, 1), "matmul_tflops": round(matmul_tflops, 1),
        "dense_bf16_tflops_datasheet": next((v for k, v in DENSE_BF16_TFLOPS.items() if k in name), None),
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
        "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
    })


def part_first_steps(model_name: str, length: int, which: str) -> None:
    """A fresh process's first NTP step and first REFINE step (each includes any compile/autotune), then steady."""
    import torch

    t_start = time.perf_counter()
    shape = SHAPES[(model_name, length)]
    model = _build(model_name, shape["checkpointing"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    docs = _docs(shape["mini"], length, model.config.vocab_size)
    built = time.perf_counter() - t_start
    entries = _triton_entries()
    record = {"part": f"{which}-{model_name}-{length // 1024}k", "cache_entries_before": entries, "build_s": built}
    for case, cfg in (("ntp", _refine_cfg({**shape, "batch": shape["mini"]}, "branch", False)),
                      ("refine", _refine_cfg({**shape, "batch": shape["mini"]}, "branch", True))):
        times = []
        for step in range(4):
            _sync()
            t0 = time.perf_counter()
            _step(model, optimizer, docs, cfg, step)
            _sync()
            times.append(time.perf_counter() - t0)
        record[f"first_{case}_step_s"] = round(times[0], 3)
        record[f"steady_{case}_step_s"] = round(statistics.median(times[1:]), 3)
        record[f"{case}_step_s_all"] = [round(t, 3) for t in times]
    record["cache_entries_after"] = _triton_entries()
    record["process_s"] = round(time.perf_counter() - t_start, 1)
    _emit(record)


def part_steps(model_name: str, length: int, cases: str) -> None:
    import torch

    shape = SHAPES[(model_name, length)]
    model = _build(model_name, shape["checkpointing"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    docs = _docs(shape["batch"], length, model.config.vocab_size)
    flops = model_flops_per_token(model)
    tokens = shape["batch"] * length
    repeats = 3 if length <= 4096 else 2
    base = {"model": model_name, "params": model.num_parameters(), "seq": length, **shape, "M": 8, "k": 5, "G": 1}
    ntp_time = None
    for case in cases.split(","):
        cfg = _refine_cfg(shape, "branch" if case == "ntp" else case, case != "ntp")
        if case == "faithful" and length > 4096:
            repeats = 1
        # The faithful engine re-encodes M·G prefixes per document with gradients: without activation checkpointing
        # its 340M / 4K step needs more than 80 GB (it ran out of memory on an H100), so it always checkpoints.
        model.gradient_checkpointing = shape["checkpointing"] or case == "faithful"
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        times, phases = [], []
        try:
            t0 = time.perf_counter()
            _step(model, optimizer, docs, cfg, 0)  # warm-up (and first-shape compiles)
            _sync()
            # progress lines: a part cut off by the slot's end still says how far each case got
            print(f"PROGRESS {case} warm-up step {time.perf_counter() - t0:.2f}s", flush=True)
            entries = _triton_entries()
            for rep in range(1, repeats + 1):
                _sync()
                t0 = time.perf_counter()
                metrics = _step(model, optimizer, docs, cfg, rep)  # new positions every step
                _sync()
                times.append(time.perf_counter() - t0)
                phases.append({k: v for k, v in metrics.items() if k.startswith("time/")})
                print(f"PROGRESS {case} step {rep} {times[-1]:.2f}s", flush=True)
        except torch.OutOfMemoryError as exc:
            _emit({"part": f"steps-{model_name}-{length // 1024}k", "case": case, **base, "error": f"OOM: {exc}"[:300]})
            optimizer.zero_grad(set_to_none=True)
            continue
        step_s = statistics.median(times)
        ntp_time = step_s if case == "ntp" else ntp_time
        record = {
            "part": f"steps-{model_name}-{length // 1024}k", "case": case, **base,
            "checkpointing": model.gradient_checkpointing,
            "step_s": round(step_s, 4), "step_s_min": round(min(times), 4), "step_s_all": [round(t, 4) for t in times],
            "ratio_to_ntp": None if ntp_time is None else round(step_s / ntp_time, 3),
            "tokens_per_s": round(tokens / step_s),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "triton_compiles_after_first_step": _triton_entries() - entries,
            **{k: round(statistics.median(p[k] for p in phases), 4) for k in phases[0]},
        }
        if case == "ntp":
            record["model_flops_per_token"] = flops
            record["achieved_tflops"] = round(flops * tokens / step_s / 1e12, 1)
        if "time/entropy_s" in record:
            record["entropy_pass_tokens_per_s"] = round(tokens / record["time/entropy_s"])
        _emit(record)


def part_decode(model_name: str) -> None:
    import torch

    from bench.bench_decode import measure_decode

    model = _build(model_name, False).to(torch.bfloat16).eval()
    # The headline batch (64) first: a slot that ends early keeps it.
    for row in measure_decode(model, batches=(64, 256, 8), prompt_tokens=128, new_tokens=64, repeats=2):
        _emit({"part": f"decode-{model_name}", "model": model_name, **row})


def part_profile(model_name: str, length: int) -> None:
    """One NTP and one branch REFINE step under the profiler: wall time, GPU busy time, top kernels and CPU ops."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    shape = SHAPES[(model_name, length)]
    model = _build(model_name, shape["checkpointing"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    docs = _docs(shape["mini"], length, model.config.vocab_size)
    for case in ("ntp", "branch"):
        cfg = _refine_cfg({**shape, "batch": shape["mini"]}, "branch", case != "ntp")
        _step(model, optimizer, docs, cfg, 0)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            _sync()
            t0 = time.perf_counter()
            metrics = _step(model, optimizer, docs, cfg, 1)
            _sync()
            wall = time.perf_counter() - t0
        events = prof.key_averages()
        kernels = sorted((e for e in events if e.device_type == DeviceType.CUDA),
                         key=lambda e: e.self_device_time_total, reverse=True)
        gpu = sum(e.self_device_time_total for e in kernels)
        cpu_ops = sorted((e for e in events if e.device_type == DeviceType.CPU),
                         key=lambda e: e.self_cpu_time_total, reverse=True)
        _emit({
            "part": f"profile-{model_name}-{length // 1024}k", "case": case, "wall_ms_profiled": round(wall * 1e3, 1),
            "gpu_busy_ms": round(gpu / 1e3, 1), "kernel_launches": sum(e.count for e in kernels),
            "phases": {k: round(v, 4) for k, v in metrics.items() if k.startswith("time/")},
            "top_kernels": [
                {"kernel": e.key[:80], "ms": round(e.self_device_time_total / 1e3, 2), "calls": e.count,
                 "share": round(e.self_device_time_total / max(gpu, 1), 3)} for e in kernels[:18]
            ],
            "top_cpu_ops": [
                {"op": e.key[:60], "self_ms": round(e.self_cpu_time_total / 1e3, 1), "calls": e.count}
                for e in cpu_ops[:12]
            ],
        })


def part_tests(log: Path, files: str) -> None:
    """The GPU tests, one pytest process per file and one record each: a slot that ends mid-way keeps the files that
    finished (the next slot runs only the rest), and ``tests.log`` grows as they run."""
    done = {r.get("case") for r in _records(log.parent) if r.get("part") == "tests" and r.get("returncode") == 0}
    for name in files.split(","):
        if name in done:
            continue
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-s", "-v", "-p", "no:cacheprovider",
               f"tests/gpu/test_{name}.py", "-k", "not test_fla_delta_rule_matches_torch and not gated_backward"]
        t0 = time.perf_counter()
        with open(log, "a") as f:
            f.write(f"===== tests/gpu/test_{name}.py\n")
            f.flush()
            proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, text=True)
        text = log.read_text()
        own = text[text.rindex(f"===== tests/gpu/test_{name}.py"):]
        lines = [ln for ln in own.splitlines() if "rel err" in ln or "passed" in ln or "failed" in ln]
        if proc.returncode != 0:  # the failures' own report, so that run.log says which test failed and why
            print(own[-6000:], flush=True)
        _emit({"part": "tests", "case": name, "returncode": proc.returncode, "seconds": round(time.perf_counter() - t0),
               "summary": lines[-12:]})


# ----------------------------------------------------------------------------------------------------- orchestration
def _card() -> str:
    """The GPU's name, without importing torch (the orchestrator stays light)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        out = []
    return out[0].strip() if out else "unknown"


def _done(state: Path, card: str) -> set[str]:
    """Parts fully measured on this kind of card (a slot on another card measures them again).

    A ``steps`` part is done only when every one of its cases has a record: a slot that ran out of time after the
    NTP case measures the part again (the ratios come from one process, so its NTP case runs again too). The
    ``tests`` part is done when every test file has passed: a file that failed runs again (``part_tests``).
    """
    seen: dict[str, set] = {}
    for r in _records(state):
        if r.get("card") == card and not (r.get("part") == "tests" and r.get("returncode") != 0):
            seen.setdefault(_part_key(r), set()).add(r.get("case"))
    done = set()
    for name, cases in seen.items():
        argv = PARTS.get(name, (0, []))[1]
        wanted = (set(argv[3].split(",")) if argv[:1] == ["steps"]
                  else set(argv[1].split(",")) if argv[:1] == ["tests"] else set())
        if wanted <= cases:
            done.add(name)
    return done


def _copy_out(state: Path, out: Path | None) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    for name in ("results.jsonl", "run.log", "tests.log"):
        if (state / name).exists():
            (out / name).write_bytes((state / name).read_bytes())


def run(args: argparse.Namespace) -> None:
    state = Path(args.state).resolve()
    state.mkdir(parents=True, exist_ok=True)
    out = Path(args.out).resolve() if args.out else None
    if args.unpack_cache:
        unpack_cache(state, Path(args.unpack_cache))
    env = {**os.environ, "TRITON_CACHE_DIR": str(state / "triton"), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    card = _card()
    print(f"card: {card}", flush=True)
    names = args.parts or list(PARTS)
    fla_configs = state / "fla_configs"
    with open(state / "run.log", "a") as log:
        for name in names:
            done = _done(state, card)
            if name in done and name not in (args.again or ()):
                print(f"[skip] {name}: in results.jsonl", flush=True)
                continue
            estimate, argv = PARTS[name]
            left = args.budget_s - (time.perf_counter() - start)
            if estimate > left and not args.force:
                print(f"[wait] {name}: needs ~{estimate}s, {left:.0f}s left in this slot", flush=True)
                continue
            print(f"[run ] {name} ({left:.0f}s left)", flush=True)
            log.write(f"===== {name} on {card}\n")
            t0 = time.perf_counter()
            cmd = [sys.executable, str(Path(__file__).resolve()), "part", *argv, "--state", str(state)]
            part_env = dict(env)
            if argv[0] != "first-steps":
                # As a job with a warmed cache runs (refine_core.runtime.configure_triton_cache): each tuned key
                # takes its own configuration, a new key is autotuned (fuzzy reuse overflowed shared memory).
                from refine_core.models.ops.fla_configs import export_fla_configs

                exported = export_fla_configs(state / "triton", fla_configs)
                if exported:
                    part_env.update(FLA_CONFIG_DIR=str(fla_configs), FLA_CACHE_MODE="strict")
            try:
                proc = subprocess.run(cmd, cwd=REPO, env=part_env, capture_output=True, text=True,
                                      timeout=max(left, 30))
                output, code = proc.stdout + proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as exc:
                output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
                code = "timeout"
            log.write(f"===== {name} ({time.perf_counter() - t0:.0f}s, exit {code})\n{output}\n")
            log.flush()
            results = [line[len("RESULT ") :] for line in output.splitlines() if line.startswith("RESULT ")]
            with open(state / "results.jsonl", "a") as f:
                for line in results:
                    extra = {"card": card, "part_key": name, **({"commit": args.commit} if args.commit else {})}
                    f.write(json.dumps({**json.loads(line), **extra}) + "\n")
            print(f"[done] {name}: exit {code}, {len(results)} result(s), {time.perf_counter() - t0:.0f}s", flush=True)
            if code != 0:
                print("\n".join(output.splitlines()[-25:]), flush=True)
            _copy_out(state, out)
    if out is not None and args.pack_cache:
        pack_cache(state, out)
    _copy_out(state, out)
    summarize(argparse.Namespace(state=str(state), latest=None, card=card))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the parts that are not done yet, within --budget-s")
    p_run.add_argument("--state", default=".bench_state")
    p_run.add_argument("--out", default=os.environ.get("OUT"))
    p_run.add_argument("--budget-s", type=float, default=540)
    p_run.add_argument("--parts", nargs="*", choices=list(PARTS))
    p_run.add_argument("--force", action="store_true", help="run the named parts even past the budget estimate")
    p_run.add_argument("--again", nargs="*", choices=list(PARTS),
                       help="measure these parts again although results.jsonl has them (the newest record wins)")
    p_run.add_argument("--pack-cache", action="store_true")
    p_run.add_argument("--unpack-cache", help="a folder holding triton-cache.tar.xz.part* files")
    p_run.add_argument("--commit", help="the git commit measured (the device's copy has no .git); kept per record")
    p_part = sub.add_parser("part", help="one measurement (run by `run` in a fresh process)")
    p_part.add_argument("argv", nargs="+")
    p_part.add_argument("--state", default=".bench_state")
    p_sum = sub.add_parser("summarize", help="headline figures from results.jsonl")
    p_sum.add_argument("--state", default=".bench_state")
    p_sum.add_argument("--latest", help="write them here (bench/results/latest.json)")
    p_sum.add_argument("--card", help="whose records (default: the card of the newest record)")
    p_tab = sub.add_parser("tables", help="markdown tables of all results (for BENCHMARKS.md)")
    p_tab.add_argument("--state", default=".bench_state")
    p_tab.add_argument("--card", help="whose records (default: the card of the newest record)")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    elif args.command == "summarize":
        summarize(args)
    elif args.command == "tables":
        tables(args)
    else:
        kind, *rest = args.argv
        with contextlib.ExitStack():
            if kind == "env":
                part_env()
            elif kind == "first-steps":
                part_first_steps(rest[0], int(rest[1]), rest[2])
            elif kind == "steps":
                part_steps(rest[0], int(rest[1]), rest[2])
            elif kind == "decode":
                part_decode(rest[0])
            elif kind == "profile":
                part_profile(rest[0], int(rest[1]))
            elif kind == "tests":
                part_tests(Path(args.state) / "tests.log", rest[0] if rest else ",".join(GPU_TEST_FILES))
            else:
                raise SystemExit(f"unknown part {kind!r}")


if __name__ == "__main__":
    main()
