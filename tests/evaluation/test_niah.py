"""RULER NIAH generation (spec §5.2) under stand-in tokenizers: budgets, needle depth, references, determinism."""

from __future__ import annotations

import re

import pytest

from refine_core.evaluation.niah import (
    DEFAULT_DEPTHS,
    NIAH_TASK_CONFIGS,
    RULER_DEPTHS,
    NiahExample,
    essay_sentences,
    generate_niah,
    generate_niah_suite,
    niah_groups,
    niah_summary,
)
from refine_core.evaluation.tasks import get_task

NEEDLE_RE = re.compile(r"One of the special magic [a-z]+ for (\S+) is: (\S+)\.")


class ByteTokenizer:
    """Stand-in: one token per UTF-8 byte."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode()


class WordTokenizer:
    """Stand-in with a very different granularity: one token per whitespace-separated word."""

    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError


def _context(prompt: str) -> str:
    # RULER's template: one header line, the context, one question line (the context may span lines)
    return prompt[prompt.index("\n") + 1 : prompt.rindex("\n")]


def _target_depth(example: NiahExample) -> float:
    """Where the queried needles start, as a fraction of the context without them."""
    ctx = _context(example.prompt)
    spans = [(m.start(), m.end()) for m in NEEDLE_RE.finditer(ctx) if m.group(2) in example.references]
    assert len(spans) == len(example.references)
    start, end = min(s for s, _ in spans), max(e for _, e in spans)
    return start / (len(ctx) - (end - start))


def test_task_configs_follow_ruler() -> None:
    # RULER synthetic.yaml: (haystack, key type, value type, #keys, #values, #queries)
    expected = {
        "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
        "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
        "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
        "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
        "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
        "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
        "niah_multiquery": ("essay", "words", "numbers", 4, 1, 4),
        "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    }
    got = {n: (c.haystack, c.key_type, c.value_type, c.num_keys, c.num_values, c.num_queries)
           for n, c in NIAH_TASK_CONFIGS.items()}
    assert got == expected
    groups = niah_groups()
    assert list(groups) == ["S", "MK", "MQ", "MV"]
    assert sorted(n for names in groups.values() for n in names) == sorted(NIAH_TASK_CONFIGS)
    assert len(RULER_DEPTHS) == 40 and RULER_DEPTHS[0] == 0.0 and RULER_DEPTHS[-1] == 1.0


@pytest.mark.parametrize("task", list(NIAH_TASK_CONFIGS))
def test_every_task_fits_and_contains_its_references(task: str) -> None:
    length, reserve = 3000, 128
    examples = generate_niah(task, ByteTokenizer(), length, 2, seed=1, reserve_tokens=reserve)
    assert len(examples) == 2 * len(DEFAULT_DEPTHS)
    assert len({ex.id for ex in examples}) == len(examples)
    budget = length - reserve
    for ex in examples:
        assert ex.task == task and ex.length == length
        tokens = len(ByteTokenizer().encode(ex.prompt))
        assert tokens == ex.prompt_tokens
        assert 0.9 * budget < tokens <= budget, (ex.id, tokens, budget)
        cfg = NIAH_TASK_CONFIGS[task]
        assert len(ex.references) == cfg.num_values * cfg.num_queries
        assert all(ref in ex.prompt for ref in ex.references)
        assert f" for {ex.query} mentioned in the provided text" in ex.prompt
        # a perfect answer scores 1 with the registered scorer, an empty one 0
        assert get_task(task).score(", ".join(ex.references), ex) == 1.0
        assert get_task(task).score("", ex) == 0.0


def test_templates_singular_and_plural() -> None:
    single = generate_niah("niah_single_1", ByteTokenizer(), 1024, 1, depths=[0.5])[0]
    assert single.prompt.startswith("A special magic number is hidden within the following text.")
    assert single.prompt.endswith(f"The special magic number for {single.query} mentioned in the provided text is")
    assert f"What is the special magic number for {single.query} mentioned in the provided text?" in single.prompt
    assert "One of the special magic numbers for" in single.prompt  # the needle keeps RULER's plural
    multi = generate_niah("niah_multiquery", ByteTokenizer(), 2048, 1, depths=[0.5])[0]
    assert multi.prompt.startswith("Some special magic numbers are hidden within the following text.")
    assert multi.query.count(", ") == 3 and ", and " in multi.query  # "k1, k2, k3, and k4"
    assert multi.prompt.endswith(f"The special magic numbers for {multi.query} mentioned in the provided text are")
    uuid = generate_niah("niah_single_3", ByteTokenizer(), 2048, 1, depths=[0.5])[0]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuid.references[0])
    noise = _context(single.prompt).split("\n")
    assert noise.count("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.")
    haystack = _context(generate_niah("niah_multikey_2", ByteTokenizer(), 2048, 1, depths=[0.5])[0].prompt)
    assert all(NEEDLE_RE.fullmatch(line) for line in haystack.split("\n"))  # a haystack made of needles


@pytest.mark.parametrize("task", list(NIAH_TASK_CONFIGS))
def test_needles_sit_at_the_requested_depth(task: str) -> None:
    depths = [0.0, 0.1, 0.5, 0.9, 1.0]
    for ex in generate_niah(task, ByteTokenizer(), 8192, 1, depths=depths, seed=3, reserve_tokens=0):
        assert _target_depth(ex) == pytest.approx(ex.depth, abs=0.03), ex.id
    assert [ex.depth for ex in generate_niah(task, ByteTokenizer(), 2048, 1, depths=depths)] == depths


def test_multikey_distractors_use_other_keys() -> None:
    ex = generate_niah("niah_multikey_1", ByteTokenizer(), 4096, 1, depths=[0.5])[0]
    needles = NEEDLE_RE.findall(_context(ex.prompt))
    assert len(needles) == 4 and len({key for key, _ in needles}) == 4
    assert [value for key, value in needles if key == ex.query] == ex.references
    hay = generate_niah("niah_multikey_3", ByteTokenizer(), 4096, 1, depths=[0.5])[0]
    keys = [key for key, _ in NEEDLE_RE.findall(_context(hay.prompt))]
    assert keys.count(hay.query) == 1 and len(keys) > 10  # the queried key appears once among many


def test_deterministic_per_seed() -> None:
    a = generate_niah("niah_multivalue", ByteTokenizer(), 2048, 2, seed=7)
    b = generate_niah("niah_multivalue", ByteTokenizer(), 2048, 2, seed=7)
    c = generate_niah("niah_multivalue", ByteTokenizer(), 2048, 2, seed=8)
    assert a == b
    assert [ex.references for ex in a] != [ex.references for ex in c]
    assert essay_sentences(50) == essay_sentences(50)


def test_ruler_random_depths() -> None:
    examples = generate_niah("niah_multikey_1", ByteTokenizer(), 4096, 6, depths=None, seed=2, reserve_tokens=0)
    assert len(examples) == 6 and all(":random:" in ex.id for ex in examples)
    assert all(ex.depth in RULER_DEPTHS for ex in examples)  # essay needles use RULER's 40-point grid
    assert len({ex.depth for ex in examples}) > 1
    for ex in examples:
        assert _target_depth(ex) == pytest.approx(ex.depth, abs=0.06)  # 3 random distractors may shift it


def test_other_tokenizer_granularity() -> None:
    for ex in generate_niah_suite(WordTokenizer(), lengths=[600, 1200], depths=[0.5], reserve_tokens=64):
        budget = ex.length - 64
        assert 0.9 * budget < len(WordTokenizer().encode(ex.prompt)) <= budget, ex.id


def test_essay_haystack_is_clean_text() -> None:
    text = " ".join(essay_sentences(300))
    assert not re.search(r"\d", text) and "magic" not in text
    assert all(s[0].isupper() and s.endswith(".") for s in essay_sentences(300))


def test_errors_say_the_fix() -> None:
    with pytest.raises(ValueError, match="unknown NIAH task"):
        generate_niah("niah_single_9", ByteTokenizer(), 4096, 1)
    with pytest.raises(ValueError, match="outside"):
        generate_niah("niah_single_1", ByteTokenizer(), 4096, 1, depths=[1.5])
    with pytest.raises(ValueError, match="larger length_tokens"):
        generate_niah("niah_single_1", ByteTokenizer(), 300, 1, reserve_tokens=0)
    with pytest.raises(ValueError, match="reserve_tokens"):
        generate_niah("niah_single_1", ByteTokenizer(), 100, 1)


def test_to_task_example_and_summary() -> None:
    ex = generate_niah("niah_single_2", ByteTokenizer(), 2048, 1, depths=[0.25])[0]
    task_example = ex.to_task_example()
    assert task_example.answers == ex.references and task_example.extra["depth"] == 0.25
    records = [
        {"task": "niah_multiquery", "length": 4096, "score": 1.0},
        {"task": "niah_multiquery", "length": 4096, "score": 0.5},  # MQ 4K: mean 0.75 -> 75.0
        {"task": "niah_multiquery", "length": 8192, "score": 0.25},  # MQ 8K: 25.0 -> Avg (75 + 25) / 2 = 50
        {"task": "niah_single_1", "length": 4096, "score": 1.0},  # S is incomplete (no single_2/3): left out
    ]
    assert niah_summary(records) == {"MQ": {"4096": 75.0, "8192": 25.0, "avg": 50.0}}


def test_the_essay_haystack_can_come_from_a_text_file_and_the_report_says_which(tmp_path):
    from refine_core.config import load_config
    from refine_core.evaluation.niah import BUILTIN_HAYSTACK, generate_niah, haystack_sentences
    from refine_core.models import DeltaNetConfig, build_model, save_pretrained
    from refine_core.stages.evaluate import evaluate
    from refine_core.tokenizer import ByteTokenizer

    essay = tmp_path / "essays.txt"
    essay.write_text("The best essays are short. Founders should write them!\nWhy? Because writing is thinking.")
    sentences = haystack_sentences(essay)
    assert sentences == ["The best essays are short.", "Founders should write them!", "Why?",
                         "Because writing is thinking."]
    tok = ByteTokenizer()
    [example] = generate_niah("niah_single_2", tok, 700, 1, depths=[0.5], essay=sentences)
    assert "Founders should write them!" in example.prompt  # the file's text, repeated to fill the haystack
    model_dir = save_pretrained(build_model(DeltaNetConfig(hidden_size=32, num_hidden_layers=1, num_heads=2,
                                                           vocab_size=tok.vocab_size)), tmp_path / "m", tokenizer=tok)
    common = [f"output_dir={tmp_path / 'out'}", "device=cpu", "tracking.backend=none", f"model.source={model_dir}",
              "model.tokenizer=null", "eval.niah_tasks=[niah_single_2]", "eval.niah_lengths=[700]",
              "eval.niah_depths=[0.5]", "eval.max_seq_tokens=1024"]
    result = evaluate(load_config(None, [*common, f"eval.niah_haystack_file={essay}"]))
    assert result.summary["niah_haystack"] == str(essay) and f"NIAH essay haystack: {essay}" in result.table
    builtin = evaluate(load_config(None, [*common, f"output_dir={tmp_path / 'out2'}"]))
    assert builtin.summary["niah_haystack"] == BUILTIN_HAYSTACK
