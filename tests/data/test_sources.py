"""Document sources: local files in every format, directories, globs, hub streaming (mocked), synthetic."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refine_core.config import SourceConfig
from refine_core.data.sources import Document, fingerprint, iter_documents, synthetic_documents


def _texts(source: SourceConfig) -> list[str]:
    return [d.text for d in iter_documents(source)]


# ----------------------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_sized() -> None:
    src = SourceConfig(path="synthetic", synthetic_docs=5, synthetic_words=120, synthetic_seed=3)
    docs = list(iter_documents(src))
    assert docs == list(iter_documents(src))
    assert [d.id for d in docs] == [f"synthetic-3-{i:06d}" for i in range(5)]
    assert len({d.text for d in docs}) == 5
    for d in docs:
        title, body = d.text.split("\n\n", 1)
        assert len(body.split()) == 120
        assert body.rstrip().endswith(".")
    other = list(iter_documents(SourceConfig(path="synthetic", synthetic_docs=5, synthetic_words=120)))
    assert [d.text for d in other] != [d.text for d in docs]
    # a prefix of the corpus does not depend on how many documents are asked for
    assert list(synthetic_documents(2, 120, 3)) == docs[:2]


def test_synthetic_has_learnable_structure() -> None:
    docs = list(synthetic_documents(20, 600, 0))
    words = Counter(w.strip('.,?"').lower() for d in docs for w in d.text.split())
    assert len(words) < 600  # a small vocabulary...
    assert words.most_common(1)[0][0] == "the"
    for d in docs:
        # ...and recurring named entities: some capitalised name appears many times in every document
        names = Counter(re.findall(r"(?<![.?!\"] )\b[A-Z][a-z]{3,}\b", d.text))
        assert names.most_common(1)[0][1] >= 5
        assert "," in d.text and '"' in d.text and "\n\n" in d.text


def test_synthetic_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="synthetic_words"):
        list(synthetic_documents(2, 0))


# --------------------------------------------------------------------------------------------------------- files


def _write_all_formats(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": ["p0", "p1", None], "other": [1, 2, 3]}), root / "a.parquet")
    (root / "b.jsonl").write_text('{"text": "j0"}\n\n{"text": "j1", "x": 1}\n')
    (root / "c.json").write_text(json.dumps([{"text": "l0"}, {"text": "l1"}]))
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "d.json").write_text(json.dumps({"text": ["c0", "c1"], "id": [1, 2]}))
    (root / "sub" / "e.txt").write_text("whole file\nis one document")
    (root / "README.md").write_text("not data")
    (root / ".hidden").mkdir(exist_ok=True)
    (root / ".hidden" / "z.txt").write_text("skipped")


def test_directory_reads_every_format_in_sorted_order(tmp_path: Path) -> None:
    _write_all_formats(tmp_path / "corpus")
    docs = list(iter_documents(SourceConfig(path=str(tmp_path / "corpus"))))
    assert [d.text for d in docs] == ["p0", "p1", "", "j0", "j1", "l0", "l1", "c0", "c1",
                                      "whole file\nis one document"]
    assert [d.id for d in docs][:4] == ["a.parquet:0", "a.parquet:1", "a.parquet:2", "b.jsonl:0"]
    assert docs[-1] == Document(id="sub/e.txt", text="whole file\nis one document")


def test_single_files_glob_and_max_docs(tmp_path: Path) -> None:
    _write_all_formats(tmp_path)
    assert _texts(SourceConfig(path=str(tmp_path / "b.jsonl"))) == ["j0", "j1"]
    assert _texts(SourceConfig(path=str(tmp_path / "**" / "*.json"))) == ["l0", "l1", "c0", "c1"]
    assert [d.id for d in iter_documents(SourceConfig(path=str(tmp_path / "**" / "*.json")))][2] == "sub/d.json:0"
    assert _texts(SourceConfig(path=str(tmp_path), max_docs=3)) == ["p0", "p1", ""]
    assert _texts(SourceConfig(path=str(tmp_path), max_docs=0)) == []
    # JSON lines saved as .json
    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert _texts(SourceConfig(path=str(tmp_path / "lines.json"))) == ["a", "b"]
    # another text column
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "body.parquet")
    assert _texts(SourceConfig(path=str(tmp_path / "body.parquet"), text_column="body")) == ["x"]


def test_missing_column_names_the_existing_ones(tmp_path: Path) -> None:
    _write_all_formats(tmp_path)
    with pytest.raises(ValueError, match=r"no column 'content'.*\['other', 'text'\].*text_column"):
        list(iter_documents(SourceConfig(path=str(tmp_path / "a.parquet"), text_column="content")))
    with pytest.raises(ValueError, match=r"no column 'content'.*\['text'\]"):
        list(iter_documents(SourceConfig(path=str(tmp_path / "b.jsonl"), text_column="content")))
    with pytest.raises(ValueError, match="not a string"):
        list(iter_documents(SourceConfig(path=str(tmp_path / "a.parquet"), text_column="other")))


def test_bad_paths_and_types(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match=r"unsupported type '\.csv'.*\.parquet"):
        list(iter_documents(SourceConfig(path=str(tmp_path / "data.csv"))))
    with pytest.raises(ValueError, match="does not exist"):
        list(iter_documents(SourceConfig(path=str(tmp_path / "missing"))))
    with pytest.raises(ValueError, match=r"holds no .*data\.csv"):
        list(iter_documents(SourceConfig(path=str(tmp_path))))
    with pytest.raises(ValueError, match="matches no"):
        list(iter_documents(SourceConfig(path=str(tmp_path / "*.parquet"))))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        list(iter_documents(SourceConfig(path=str(tmp_path / "bad.jsonl"))))


# ----------------------------------------------------------------------------------------------------------- hub


def test_hub_dataset_streams_through_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: dict[str, Any] = {}

    def fake_load(name: str, subset: str | None, **kwargs: Any) -> list[dict[str, Any]]:
        calls.update(kwargs, name=name, subset=subset)
        return [{"text": f"doc {i}", "meta": i} for i in range(5)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    src = SourceConfig(path="hf://org/corpus", subset="en", split="validation", max_docs=3)
    docs = list(iter_documents(src))
    assert [d.text for d in docs] == ["doc 0", "doc 1", "doc 2"]
    assert docs[0].id == "org/corpus/validation:0"
    assert calls == {"name": "org/corpus", "subset": "en", "split": "validation", "streaming": True}
    with pytest.raises(ValueError, match=r"no column 'body'.*\['meta', 'text'\]"):
        list(iter_documents(SourceConfig(path="hf://org/corpus", text_column="body")))

    def offline(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="local files"):
        list(iter_documents(SourceConfig(path="hf://org/corpus")))


def test_hub_source_without_datasets_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(ImportError, match=r"refine-core\[datasets\]"):
        list(iter_documents(SourceConfig(path="hf://org/corpus")))
    # every other source works without it
    assert len(list(iter_documents(SourceConfig(path="synthetic", synthetic_docs=2, synthetic_words=20)))) == 2


# ---------------------------------------------------------------------------------------------------------- s3


def test_s3_source(tmp_path: Path, s3) -> None:
    from refine_core.storage import upload_dir

    _write_all_formats(tmp_path / "corpus")
    upload_dir(tmp_path / "corpus", "s3://bkt/corpus")
    docs = list(iter_documents(SourceConfig(path="s3://bkt/corpus"), cache_dir=tmp_path / "cache"))
    local = list(iter_documents(SourceConfig(path=str(tmp_path / "corpus"))))
    assert docs == local


# --------------------------------------------------------------------------------------------------- fingerprint


def test_fingerprints(tmp_path: Path) -> None:
    syn = SourceConfig(path="synthetic")
    assert fingerprint(syn) == fingerprint(SourceConfig(path="synthetic"))
    assert fingerprint(syn) != fingerprint(SourceConfig(path="synthetic", synthetic_seed=1))
    assert fingerprint(syn) != fingerprint(SourceConfig(path="synthetic", synthetic_words=401))
    hub = SourceConfig(path="hf://org/x")
    assert fingerprint(hub) != fingerprint(SourceConfig(path="hf://org/x", split="test"))

    _write_all_formats(tmp_path)
    files = SourceConfig(path=str(tmp_path))
    before = fingerprint(files)
    assert fingerprint(files) == before
    target = tmp_path / "b.jsonl"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert fingerprint(files) != before
    touched = fingerprint(files)
    target.write_text(target.read_text() + '{"text": "j2"}\n')
    assert fingerprint(files) != touched
