"""The ``refine`` command line: one subcommand per pipeline stage.

    refine prepare-data --config configs/tiny-deltanet.yaml
    refine train-ntp --config configs/tiny-deltanet.yaml ntp.steps=20 device=cpu
    refine train-ntp --config configs/tiny-deltanet.yaml --print-config     # show the resolved config, run nothing
    refine warmup --config configs/delta_net-1.3b-16k.yaml triton_cache_dir=/ckpt/triton   # autotune ahead of time
    python -m refine_core train-ntp ...                                      # same thing
    refine pipeline run --config configs/tiny-cpu.yaml                      # the Kubeflow pipeline, locally

Every subcommand takes ``--config FILE`` and ``key=value`` overrides (values are YAML: ``1e-6``, ``true``,
``[1, 2]``). A bad config exits with status 2 and a one-line message naming the key. A stage is one row of
:data:`STAGES`; its module is imported only when it runs.

``refine pipeline ...`` (compile / run locally / submit the Kubeflow pipelines) is the one place where this command
line reaches the Kubeflow side: it hands the rest of the arguments to ``pipelines.cli``, imported by module name
only when that subcommand runs, so ``refine_core`` never imports kfp (and works without it installed).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

from refine_core import __version__, runtime
from refine_core.config import ConfigError, RunConfig, load_config, to_dict
from refine_core.errors import RunFailed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """A subcommand: ``module.function(cfg)``, or ``module.function(cfg, tracker)`` when ``tracked``."""

    module: str
    function: str
    help: str
    # Open an MLflow run named ``{cfg.name}-{command}`` and close it FAILED if the stage raises; the stage itself
    # logs its config, so that KFP components and tests that call it directly log the same things.
    tracked: bool = True


STAGES: dict[str, Stage] = {
    "prepare-data": Stage(
        "refine_core.stages.prepare_data", "prepare_data", "read, tokenize, filter and shard the corpora",
        tracked=False,
    ),
    "make-ruler-qa": Stage(
        "refine_core.stages.make_ruler_qa",
        "make_ruler_qa_files",
        "build RULER QA train/test files from SQuAD or HotpotQA sources",
        tracked=False,
    ),
    "train-ntp": Stage("refine_core.stages.train_ntp", "train_ntp", "next-token-prediction training (the baseline)"),
    "train-refine": Stage(
        "refine_core.stages.train_refine", "train_refine", "REFINE mid-training (refine.nsp_update=false: NTP baseline)"
    ),
    "post-train": Stage(
        "refine_core.stages.post_train", "post_train", "post-training on task data: sft, nested_sft or nested_refine"
    ),
    "ttt": Stage("refine_core.stages.ttt", "test_time_train", "test-time training on the test prompts, then answer"),
    "evaluate": Stage("refine_core.stages.evaluate", "evaluate", "RULER QA / LongBench / RULER NIAH evaluation"),
    # Untracked: it trains nothing worth logging and writes nothing but the Triton cache.
    "warmup": Stage(
        "refine_core.stages.warmup",
        "warmup",
        "fill the Triton cache (triton_cache_dir) for the config's shapes before a long GPU job",
        tracked=False,
    ),
}


TRACKING_COMMAND = "tracking"


def run_tracking_command(argv: Sequence[str]) -> int:
    """``refine tracking sync JOURNAL... [--tracking-uri URI]``: upload journals a stage wrote while offline."""
    parser = argparse.ArgumentParser(prog=f"refine {TRACKING_COMMAND}")
    sub = parser.add_subparsers(dest="action", required=True)
    sync = sub.add_parser("sync", help="upload offline tracking journals as MLflow runs")
    sync.add_argument("journals", nargs="+", metavar="JOURNAL")
    sync.add_argument("--tracking-uri", help="default: the URI the stage was using")
    args = parser.parse_args(list(argv))
    runtime.setup_logging("INFO")
    from refine_core.tracking import sync_journal

    for journal in args.journals:
        try:
            run_id = sync_journal(journal, args.tracking_uri)
        except (ValueError, OSError) as exc:
            sys.stderr.write(f"refine {TRACKING_COMMAND} sync: error: {exc}\n")
            return 2
        except Exception as exc:  # noqa: BLE001  (the server is still unreachable: say so, keep the journal)
            sys.stderr.write(
                f"refine {TRACKING_COMMAND} sync: failed: {journal} was not uploaded ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); the journal is kept, try again later\n"
            )
            return 1
        sys.stdout.write(f"{journal}: uploaded as run {run_id}\n")
    return 0


PIPELINE_COMMAND = "pipeline"
PIPELINE_MODULE = "pipelines.cli"


def run_pipeline_command(argv: Sequence[str]) -> int:
    """``refine pipeline ARGS``: import ``pipelines.cli`` now (it needs kfp) and run its ``main(ARGS)``."""
    try:
        module = importlib.import_module(PIPELINE_MODULE)
    except ImportError as exc:
        sys.stderr.write(
            f"refine {PIPELINE_COMMAND}: error: cannot import {PIPELINE_MODULE} ({exc}); install the Kubeflow extra "
            "from a checkout of this repository: pip install -e '.[kfp]'\n"
        )
        return 2
    return int(module.main(list(argv)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refine", description="REFINE for fast-weight language models: run one pipeline stage."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, stage in STAGES.items():
        sub = commands.add_parser(name, help=stage.help, description=stage.help)
        sub.add_argument("--config", metavar="FILE", help="experiment YAML (default: built-in defaults)")
        sub.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. ntp.steps=20")
    # Listed for --help only: main() hands ``refine pipeline ...`` to pipelines.cli before parsing.
    commands.add_parser(PIPELINE_COMMAND, add_help=False,
                        help="compile / run locally / submit the Kubeflow pipelines (refine pipeline --help)")
    commands.add_parser(TRACKING_COMMAND, add_help=False,
                        help="upload tracking journals written while MLflow was unreachable (refine tracking sync)")
    return parser


def run_stage(command: str, cfg: RunConfig) -> None:
    """Import the stage for ``command`` and run it on ``cfg`` (with a tracker if the stage is tracked)."""
    stage = STAGES[command]
    entry = getattr(importlib.import_module(stage.module), stage.function)
    if not stage.tracked:
        entry(cfg)
        return
    from refine_core.tracking import make_tracker

    with make_tracker(cfg, command) as tracker:  # closes FAILED and re-raises if the stage fails
        entry(cfg, tracker)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``refine`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [PIPELINE_COMMAND]:
        return run_pipeline_command(argv[1:])
    if argv[:1] == [TRACKING_COMMAND]:
        return run_tracking_command(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        runtime.setup_logging(args.log_level)
        cfg = load_config(args.config, list(args.overrides))
    except (ConfigError, ValueError) as exc:
        sys.stderr.write(f"refine {args.command}: error: {exc}\n")
        return 2
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    try:
        runtime.configure_triton_cache(cfg.triton_cache_dir)  # before a stage's first fla kernel compiles
    except OSError as exc:  # an unmounted or read-only volume: say which key points there
        sys.stderr.write(
            f"refine {args.command}: error: triton_cache_dir={cfg.triton_cache_dir!r} cannot be created ({exc}); "
            "point it at a writable directory or set it to null\n"
        )
        return 2
    logger.info("refine %s: %s (output_dir=%s)", args.command, cfg.name, cfg.output_dir)
    try:
        run_stage(args.command, cfg)
    except RunFailed as exc:  # the run started and could not finish (diverged, disk full, a server): exit 1
        sys.stderr.write(f"refine {args.command}: failed: {exc}\n")
        return 1
    except (ValueError, OSError) as exc:
        # Bad input found once the stage looked at it (a setting, a file, a path): the library's messages name the
        # value and the fix, so the user gets that line, exit 2, and no traceback unless --log-level DEBUG.
        if args.log_level.upper() == "DEBUG":
            raise
        sys.stderr.write(f"refine {args.command}: error: {_user_message(exc)}\n")
        return 2
    return 0


def _user_message(exc: BaseException) -> str:
    """One line for a user-caused failure; file-system errors get the path and what to check."""
    if not isinstance(exc, OSError) or exc.filename is None:  # our own messages already name the value and the fix
        return " ".join(str(exc).split())
    what = exc.strerror or type(exc).__name__
    path = exc.filename or ""
    hint = {
        NotADirectoryError: "a file stands where a directory is needed; fix output_dir or the data / model paths",
        IsADirectoryError: "a directory stands where a file is needed; name the file",
        PermissionError: "make it writable or choose another output_dir",
        FileNotFoundError: "check the path in the config",
    }.get(type(exc), "check the path and the disk (space, permissions)")
    return f"{what}: {path!s}; {hint} (--log-level DEBUG shows the traceback)"


if __name__ == "__main__":
    raise SystemExit(main())
