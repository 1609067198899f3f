"""The ``passages`` source: units of LongBench / RULER prompts, dedupe, the held-out evaluation passages, packing."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refine_core.config import SourceConfig
from refine_core.data.passages import (
    HeldOut,
    PassageCorpus,
    find_leaks,
    load_heldout,
    ngram_keys,
    normalize,
    prompt_question,
    prompt_units,
)
from refine_core.data.ruler_qa import format_ruler_qa_prompt
from refine_core.data.sources import count_documents, fingerprint, iter_documents

LB_HEAD = "Answer the question based on the given passages. Only give me the answer and do not output any other words."


def longbench_multidoc(passages: list[str], question: str) -> str:
    body = "\n".join(f"Passage {i + 1}:\n{p}" for i, p in enumerate(passages))
    return f"{LB_HEAD}\n\nThe following are given passages.\n{body}\n\n{LB_HEAD}\n\nQuestion: {question}\nAnswer:"


def write_prompts(path: Path, prompts: list[str], **columns: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt": prompts, **columns}), path)
    return path


EVAL_PASSAGES = [
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France.",
    "Richard I of Normandy was a great ruler of the duchy for more than fifty long years. His son fought "
    "against many enemies of the duchy for decades and won most of the battles.",
]
TRAIN_PASSAGES = [
    "The river Tharn runs through the old valley and feeds the mills of the town below the hills every spring.",
    "A lighthouse stood on the northern cape; its keeper wrote long letters to the harbour master each winter.",
    "Copper was mined in the eastern ridges until the seams ran thin and the workers left for the coast.",
]


def make_files(root: Path) -> tuple[Path, Path]:
    """A RULER SQuAD test file (evaluation) and a LongBench-style file whose prompts repeat, quote and mix."""
    ruler = write_prompts(
        root / "ruler" / "ruler_squadqa_x_4096_200_test.parquet",
        [format_ruler_qa_prompt([EVAL_PASSAGES[0], TRAIN_PASSAGES[2]], "Where is Normandy?"),
         format_ruler_qa_prompt([EVAL_PASSAGES[1], EVAL_PASSAGES[0]], "Who was Richard?")],
        index=[0, 1], answer=[["France"], ["a great ruler"]], task=["ruler_squadqa", "ruler_squadqa"],
    )
    quoting = ("Chapter two: " + EVAL_PASSAGES[1].split(". ")[0].lower() + "! Nothing else in this paragraph comes "
               "from the evaluation set, but one sentence does.")
    longbench = write_prompts(
        root / "longbench" / "story_16384.parquet",
        [
            longbench_multidoc([TRAIN_PASSAGES[0], EVAL_PASSAGES[0].upper()], "Which river?"),  # held out (unit)
            longbench_multidoc([TRAIN_PASSAGES[0], TRAIN_PASSAGES[1]], "Which cape?"),  # first one is a duplicate
            "You are given a story.\n\nStory: " + TRAIN_PASSAGES[2] + "\n\n" + quoting
            + "\n\nNow, answer the question.\n\nQuestion: What?\n\nAnswer:",
        ],
    )
    return ruler, longbench


def test_prompt_units_of_both_layouts() -> None:
    ruler = format_ruler_qa_prompt(["First doc.", "Second\n\ndoc with a blank line."], "Why?")
    assert prompt_units(ruler) == ["First doc.", "Second\n\ndoc with a blank line."]
    assert prompt_question(ruler) == "Why?"
    lb = longbench_multidoc(["A text.", "B text."], "What is it?")
    assert prompt_units(lb) == ["A text.", "B text."]
    plain = "Read the text.\n\nPara one.\n \nPara two.\n\nNow, answer.\n\nQuestion: Q?\nAnswer:"
    assert prompt_units(plain) == ["Read the text.", "Para one.", "Para two.", "Now, answer.", "Question: Q?\nAnswer:"]


def test_normalisation_and_ngram_keys() -> None:
    assert normalize("  The  NORMANS,\tWeré…  ") == "the normans weré"  # accents stay, "…" goes
    text = "one two three, four five six seven eight nine ten eleven twelve thirteen fourteen!"
    assert len(ngram_keys(text)) == 2  # 14 words: two runs of 13
    assert ngram_keys(text.upper().replace(",", " -- ")) == ngram_keys(text)  # case and punctuation do not count
    assert ngram_keys("too short to have a run") == set()


def test_evaluation_passages_never_reach_the_corpus(tmp_path: Path) -> None:
    ruler, longbench = make_files(tmp_path)
    corpus = PassageCorpus([str(longbench)], [str(ruler)], doc_chars=300)
    docs = list(corpus.documents())
    text = "\n".join(d.text for d in docs)
    for passage in EVAL_PASSAGES:
        assert normalize(passage) not in normalize(text)
        for sentence in passage.split(". "):
            assert len(sentence.split()) >= 13 and normalize(sentence) not in normalize(text)
    # the training passages are there, each once, although the second prompt repeats the first one's
    assert text.count(TRAIN_PASSAGES[0]) == 1 and TRAIN_PASSAGES[1] in text
    # RULER passage TRAIN_PASSAGES[2] sits in an evaluation prompt, so it is held out from the story file too, even
    # with the template's "Story: " in front of it
    assert TRAIN_PASSAGES[2] not in text
    assert corpus.stats["heldout_unit"] == 1 and corpus.stats["heldout_ngram"] == 2
    assert corpus.stats["duplicate"] >= 1
    held = load_heldout([str(ruler)])
    assert find_leaks([d.text for d in docs], held) == []
    # the check finds a planted leak: one evaluation sentence in an otherwise new text
    assert find_leaks(["fresh words. " + EVAL_PASSAGES[0], "clean text only"], held) == [0]
    assert find_leaks(["the " + " ".join(EVAL_PASSAGES[0].split()[3:16]) + " end"], held) == [0]


def test_packing_respects_the_size_and_keeps_prompt_order(tmp_path: Path) -> None:
    paragraphs = [f"Paragraph {i} " + "word " * 30 for i in range(12)]
    write_prompts(tmp_path / "lb" / "narrativeqa_16384.parquet",
                  ["Story:\n\n" + "\n\n".join(paragraphs[:6]), "\n\n".join(paragraphs[6:])])
    long_unit = "x" * 50 + " " + "q" * 700
    code = write_prompts(tmp_path / "lb" / "zcode_16384.parquet", [long_unit])
    corpus = PassageCorpus([str(tmp_path / "lb")], doc_chars=400)
    docs = list(corpus.documents())
    joined = "\n\n".join(d.text for d in docs)
    positions = [joined.index(p.strip()) for p in paragraphs]
    assert positions == sorted(positions)  # stream order is kept
    assert all(300 <= len(d.text) <= 400 for d in docs[:-1])  # every document but the last is (nearly) full
    assert docs[0].id == "narrativeqa_16384.parquet:0:0" and docs[1].id == "narrativeqa_16384.parquet:0:1"
    assert joined.count("x") == 50 and joined.count("q") == 700  # the 751-character unit was cut, nothing lost
    assert code.exists() and corpus.stats["documents"] == len(docs)
    assert list(PassageCorpus([str(tmp_path / "lb")], doc_chars=400).documents()) == docs  # deterministic


def test_source_config_wiring(tmp_path: Path) -> None:
    ruler, longbench = make_files(tmp_path)
    source = SourceConfig(path="passages", passage_files=[str(longbench)], heldout_files=[str(ruler)],
                          passage_doc_chars=300)
    docs = list(iter_documents(source))
    assert docs and all(d.id.startswith("story_16384.parquet:") for d in docs)
    assert count_documents(source) is None
    fp = fingerprint(source)
    assert fp != fingerprint(SourceConfig(path="passages", passage_files=[str(longbench)], passage_doc_chars=300))
    assert len(list(iter_documents(SourceConfig(path="passages", passage_files=[str(longbench)], max_docs=1)))) == 1


def test_bad_passage_settings_name_the_fix(tmp_path: Path) -> None:
    ruler, longbench = make_files(tmp_path)
    with pytest.raises(ValueError, match="needs passage_files"):
        PassageCorpus([])
    with pytest.raises(ValueError, match="both passage_files and heldout_files"):
        list(PassageCorpus([str(ruler), str(longbench)], [str(ruler)]).documents())
    other = write_prompts(tmp_path / "bad.parquet", ["x"]).with_name("nocol.parquet")
    pq.write_table(pa.table({"text": ["x"]}), other)
    with pytest.raises(ValueError, match="no 'prompt' column"):
        list(PassageCorpus([str(other)]).documents())


def test_heldout_from_prompts_covers_questions() -> None:
    question = "What did the committee of the old town decide about the northern bridge in the year 1850?"
    held = HeldOut.from_prompts([format_ruler_qa_prompt(["Doc."], question)])
    assert held.holds("Notes: " + question.lower()) == "ngram"
    assert held.holds("doc") == "unit" and held.holds("Something unrelated entirely.") is None
    # runs shorter than 13 words are too common to identify a passage: only an identical unit is held out
    short = HeldOut.from_prompts([format_ruler_qa_prompt(["He was born in 1950."], "Q?")])
    assert short.holds("Elsewhere: he was born in 1950. Unrelated.") is None
    assert short.holds("He was born in 1950.") == "unit"


@pytest.mark.slow
def test_the_repro_corpus_holds_out_the_shared_ruler_squad_files() -> None:
    """configs/repro/corpus.yaml on the real ../shared/data (skipped where it is absent): no training document
    shares a 13-word run with the held-out RULER SQuAD files, and those files' passages are really held out."""
    import os

    import yaml

    repo = Path(__file__).resolve().parents[2]
    if not (repo.parent / "shared" / "data" / "ruler").is_dir():
        pytest.skip("../shared/data is not on this machine")
    source = yaml.safe_load((repo / "configs" / "repro" / "corpus.yaml").read_text())["data"]["sources"][0]
    cwd = os.getcwd()
    os.chdir(repo)  # the config names ../shared/data relative to the repository
    try:
        corpus = PassageCorpus(source["passage_files"], source["heldout_files"], source["passage_doc_chars"])
        docs = list(corpus.documents())
        held = load_heldout(source["heldout_files"])
    finally:
        os.chdir(cwd)
    assert len(held.units) > 200 and corpus.stats["documents"] == len(docs) > 2000
    assert find_leaks([d.text for d in docs], held) == []
