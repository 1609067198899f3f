"""Config loading: YAML + dotted overrides, unknown keys, type errors, invalid values, and the repo's configs/."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from refine_core.config import (
    ConfigError,
    RunConfig,
    SourceConfig,
    dump_yaml,
    flatten,
    load_config,
    parse_overrides,
    to_dict,
)

REPO = Path(__file__).resolve().parent.parent
REPO_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_defaults_without_file() -> None:
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg == RunConfig()
    assert cfg.stage_dir("train-ntp") == Path("runs/default/train-ntp")
    assert cfg.prepared_dir == Path("runs/default/data")


def test_file_then_overrides(tmp_path: Path) -> None:
    tree = {"name": "tiny", "ntp": {"steps": 5, "lr": "3e-4"}, "model": {"config": {"hidden_size": 64}}}
    overrides = ["ntp.steps=7", "model.config.num_heads=2", "tracking.backend=none", "ntp.betas=[0.8, 0.9]"]
    cfg = load_config(write(tmp_path, tree), overrides)
    assert cfg.name == "tiny"
    assert cfg.ntp.steps == 7  # the override wins over the file
    assert cfg.ntp.lr == pytest.approx(3e-4)  # YAML reads "3e-4" as a string; it is coerced
    assert cfg.model.config == {"hidden_size": 64, "num_heads": 2}
    assert cfg.tracking.backend == "none"
    assert cfg.ntp.betas == (0.8, 0.9)


def test_int_to_float_and_integral_float_to_int() -> None:
    cfg = load_config(None, ["ntp.lr=1", "ntp.steps=10.0"])
    assert cfg.ntp.lr == 1.0 and isinstance(cfg.ntp.lr, float)
    assert cfg.ntp.steps == 10 and isinstance(cfg.ntp.steps, int)


def test_unknown_key_names_key_and_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"ntp\.stepz") as info:
        load_config(None, ["ntp.stepz=3"])
    assert "steps" in str(info.value)


def test_unknown_top_level_key_in_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown config key.*trainer"):
        load_config(write(tmp_path, {"trainer": {"steps": 1}}))


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("ntp.steps=abc", "ntp.steps must be an integer"),
        ("ntp.steps=1.5", "ntp.steps must be an integer"),
        ("ntp.lr=fast", "ntp.lr must be a number"),
        ("ntp.resume=1", "ntp.resume must be true or false"),
        ("ntp.betas=[0.9]", "ntp.betas must be a list of 2 values"),
        ("data.sources=foo", "data.sources must be a list"),
        ("model.config=3", "model.config must be a mapping"),
    ],
)
def test_type_errors(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("ntp.batch_size=3", "not a multiple"),
        ("ntp.lr_schedule=step", "lr_schedule"),
        ("ntp.steps=0", "ntp.steps=0 must be >= 1"),
        ("precision=fp16", "precision='fp16'"),
        ("tracking.backend=wandb", "tracking.backend='wandb'"),
        ("model.arch=transformer", "model.arch='transformer'"),
        ("data.max_tokens=10", "data.max_tokens=10 is smaller"),
    ],
)
def test_invalid_values(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_bad_override_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["ntp.steps"])
    with pytest.raises(ConfigError, match="'name' is not a section"):
        load_config(write(tmp_path, {"name": "x"}), ["name.sub=1"])


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(bad)


def test_list_of_sources(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {"data": {"sources": [{"path": "synthetic", "synthetic_docs": 3}, {"path": "corpus/*.jsonl", "max_docs": 10}]}},
    )
    cfg = load_config(path)
    assert cfg.data.sources == [
        SourceConfig(path="synthetic", synthetic_docs=3),
        SourceConfig(path="corpus/*.jsonl", max_docs=10),
    ]
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]"):
        load_config(None, ["data.sources=[{path: a}, {pth: b}]"])


def test_dump_yaml_round_trip_and_flatten(tmp_path: Path) -> None:
    cfg = load_config(None, ["name=rt", "ntp.betas=[0.8, 0.95]", "tracking.tags={team: a}"])
    dump_yaml(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg
    flat = flatten(to_dict(cfg))
    assert flat["ntp.betas"] == [0.8, 0.95]
    assert flat["tracking.tags.team"] == "a"
    assert flat["model.config"] == {}  # empty sections stay a value


@pytest.mark.parametrize("path", REPO_CONFIGS or [None], ids=lambda p: p.name if p else "none")
def test_repo_configs_load(path: Path | None) -> None:
    if path is None:
        pytest.skip("no configs/*.yaml in the repository yet")
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
