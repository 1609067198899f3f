"""`refine make-ruler-qa` writes train and test files that the task reader and post-training accept."""

from __future__ import annotations

from refine_core.cli import main
from refine_core.data.tasks import read_ruler_qa
from tests.data.test_ruler_qa import squad_path  # noqa: F401  (the fixture writing a small SQuAD v2 file)


def test_make_ruler_qa_from_the_command_line(tmp_path, squad_path):  # noqa: F811
    out = tmp_path / "ruler"
    status = main(
        [
            "make-ruler-qa",
            f"ruler_qa.source_path={squad_path}",
            "ruler_qa.max_seq_length=2048",
            "ruler_qa.num_train=10",
            "ruler_qa.num_test=5",
            f"ruler_qa.out_dir={out}",
            "ruler_qa.name=byte",
            "model.tokenizer=byte",
        ]
    )
    assert status == 0
    train, test = out / "ruler_squadqa_byte_2048_10_train.parquet", out / "ruler_squadqa_byte_2048_5_test.parquet"
    train_rows, test_rows = read_ruler_qa(train), read_ruler_qa(test)
    assert len(train_rows) == 10 and len(test_rows) == 5
    assert not {r.prompt for r in train_rows} & {r.prompt for r in test_rows}


def test_missing_source_is_a_config_error(capsys):
    assert main(["make-ruler-qa"]) == 2
    assert "ruler_qa.source_path is not set" in capsys.readouterr().err
