"""The configuration reference (``docs/configuration.md``), generated from the config classes themselves.

Every key of a run config with its type, default and meaning (the comment written above or beside the field in
:mod:`refine_core.config`), and the value the paper's runs used where spec §3 states one. A test compares the file
with :func:`render`, so the reference cannot go stale::

    python -m refine_core.config_reference > docs/configuration.md
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import typing
from typing import Any

from refine_core import config as config_module
from refine_core.config import RunConfig

# The paper's values (spec §3: mid-training for ``ntp`` / ``refine``; post-training and TTT for theirs).
PAPER = {
    "precision": "bf16", "data.min_tokens": "16384", "data.max_tokens": "16384",
    "ntp.steps": "100", "ntp.lr": "1e-6", "ntp.batch_size": "128 (one optimizer step per step)",
    "refine.steps": "100", "refine.batch_size": "128", "refine.mini_batch_size": "32", "refine.micro_batch_size": "2",
    "refine.lr": "1e-6", "refine.num_chunks": "8", "refine.rollout_tokens": "5", "refine.rollouts_per_position": "1",
    "refine.reward": "cosine (post-training: hybrid; TTT: binary = exact_match)", "refine.clip_eps": "0.2",
    "refine.dual_clip": "3.0", "refine.ntp_loss_coef": "1.0", "refine.nsp_loss_coef": "0.2 (TTT: 0.4)",
    "refine.grad_clip": "1.0", "refine.save_every": "20", "refine.eval_every": "10", "refine.temperature": "1.0",
    "post.steps": "24", "post.batch_size": "64", "post.mode": "nested_refine", "ttt.batch_size": "8",
    "ttt.mode": "cumulative (the official behaviour, spec §10.1)", "eval.max_seq_tokens": "16384",
}
_SKIP = {"extra"}


def _comments(cls: type) -> dict[str, str]:
    """The comment lines just above each field of dataclass ``cls`` (and a trailing ``# ...`` on its line)."""
    source, start = inspect.getsourcelines(cls)
    tree = ast.parse("".join(source))
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    out: dict[str, str] = {}
    for node in body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        line = node.lineno - 1
        above = []
        j = line - 1
        while j >= 0 and source[j].strip().startswith("#"):
            above.insert(0, source[j].strip().lstrip("#").strip())
            j -= 1
        inline = source[line].split("  # ", 1)[1].strip() if "  # " in source[line] else ""
        out[node.target.id] = " ".join(part for part in (*above, inline) if part)
    return out


def _type_name(tp: Any) -> str:
    text = str(tp) if not isinstance(tp, type) else tp.__name__
    # a section class by its exported name (refine_core.config.sections.SourceConfig -> refine_core.config.SourceConfig)
    text = re.sub(r"refine_core\.config\.[a-z_]+\.", "refine_core.config.", text)
    return text.replace("typing.", "").replace("NoneType", "None")


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _show(value: Any) -> str:
    if dataclasses.is_dataclass(value) or (isinstance(value, list) and value and dataclasses.is_dataclass(value[0])):
        value = config_module.to_dict(value) if not isinstance(value, list) else [
            {k: v for k, v in config_module.to_dict(v).items() if v is not None} for v in value
        ]
        return f"`{json.dumps(value)}`"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{value}`" if value != "" else '`""`'


def _rows(cls: type, prefix: str) -> list[tuple[str, str, str, str, str]]:
    hints = typing.get_type_hints(cls)
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment wins over its base's
        if dataclasses.is_dataclass(klass) and klass.__module__.startswith(config_module.__name__ + "."):
            comments.update(_comments(klass))
    rows = []
    for field in dataclasses.fields(cls):
        if field.name in _SKIP:
            continue
        key = f"{prefix}{field.name}"
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            continue  # a section: listed under its own heading
        default = _default(field)
        rows.append((key, _type_name(tp), _show(default), comments.get(field.name, ""), PAPER.get(key, "")))
    return rows


def render() -> str:
    """The whole reference as Markdown."""
    lines = [
        "# Configuration reference",
        "",
        "Every key of a run config (`--config FILE` and `key=value` overrides), generated from",
        "`refine_core/config/` by `python -m refine_core.config_reference > docs/configuration.md`;",
        "`tests/test_docs.py` fails when this file is stale. \"Paper\" is the value of the paper's runs where spec §3",
        "states one (mid-training unless noted); the `refine` options' official names and defaults are in",
        "[algorithm-options.md](algorithm-options.md).",
        "",
    ]
    sections: list[tuple[str, type]] = []

    def add(prefix: str, cls: type) -> None:  # a section, then its own sections (``trainjob.node``), depth first
        sections.append((prefix, cls))
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                add(f"{prefix}{f.name}.", hints[f.name])

    add("", RunConfig)
    for prefix, cls in sections:
        title = "Top level" if not prefix else f"`{prefix[:-1]}`"
        doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        lines += [f"## {title}", "", doc, "", "| key | type | default | meaning | paper |", "|---|---|---|---|---|"]
        for key, tp, default, meaning, paper in _rows(cls, prefix):
            meaning = meaning.replace("|", "\\|")
            lines.append(f"| `{key}` | {tp.replace('|', 'or')} | {default.replace('|', 'or')} | {meaning} | {paper} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    sys.stdout.write(render())
