"""Build the RULER QA task files (spec §9.2) from SQuAD / HotpotQA, at any sequence length.

The official REFINE repository no longer ships the ``*_1600_train`` files (post-training data, spec §3) nor the
16K test files (spec §9.2 says: regenerate them with NVIDIA RULER's ``qa_1`` / ``qa_2`` tasks and the model's
tokenizer). This module re-implements RULER's generator, ``scripts/data/synthetic/qa.py`` of ``NVIDIA/RULER``,
and writes parquet files with the exact schema of the shipped files, which
:func:`refine_core.data.tasks.read_ruler_qa` reads.

How RULER builds one example (and so does :func:`build_ruler_qa`):

* **Sources.** ``qa_1`` reads SQuAD v2 dev JSON: every unique paragraph is a document; each answerable question
  has its paragraph as gold document and the other paragraphs of the same article as preferred distractors.
  ``qa_2`` reads the HotpotQA dev *distractor* JSON: every unique ``"{title}\\n{''.join(sentences)}"`` is a
  document and a question's gold documents are all paragraphs of its own ``context`` (the 2 supporting ones and
  HotpotQA's 8 distractors, kept together).
* **Documents per prompt.** One count for the whole file, found by probing question 0 with 10, 20, 30, ...
  documents until prompt + answer exceeds ``max_seq_length``, then stepping back by 10. Every example starts
  from that count and drops 10 documents at a time until ``prompt tokens + 32 <= max_seq_length``. Hence the
  shipped 4K files: SQuAD always 20 documents, HotpotQA 20 (some 10), prompts 1.9K-4.06K tokens.
* **Which documents.** Gold documents, then the preferred distractors (sampled when there are more than
  needed), then documents sampled uniformly from the rest of the pool. The list is shuffled with a *fresh*
  ``random.Random(seed)``, i.e. with the same permutation for every prompt of the same size: in the shipped
  4K SQuAD files the gold paragraph is document 19 of 20 in every prompt. ``doc_order="ruler"`` keeps that
  quirk (the paper's train and test data have it); ``doc_order="random"`` shuffles each prompt independently.
* **Template** (spec §5.1, identical to the shipped files): the instruction, ``"The following are given
  passages."``, the ``"Document {i}:\\n{text}"`` blocks joined by blank lines, the instruction again, then
  ``"Question: {question}\\nAnswer:"``.

Random draws follow RULER's order (one ``random.Random(seed)`` for the probe and the samples), so with the same
source file, tokenizer and seed (RULER's default is 42) the documents should match RULER's output. This was not
verified bit-for-bit: the SQuAD/HotpotQA files are not available offline.

Columns of a row (spec §9.2): ``index`` (the question's position in the source, RULER's ``index``),
``prompt``, ``answer`` (list[str]), ``prompt_length`` (tokens of the prompt, no special tokens, spec §1),
``max_answer_length`` (tokens of the longest answer), ``total_length`` (= prompt_length + max_answer_length, as in
the shipped files), ``max_seq_length`` and ``task``.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import random
import re
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from refine_core.data.qa_source import QAItem, QASource
from refine_core.data.ruler_qa_source import read_ruler_qa_files
from refine_core.data.tasks import RULER_MAX_GEN_TOKENS
from refine_core.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

# The prompt template of the shipped files (spec §5.1); RULER's qa template with "passages".
RULER_QA_INSTRUCTION = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words."
)
RULER_QA_CONTEXT_HEADER = "The following are given passages."
RULER_QA_DOCUMENT = "Document {i}:\n{document}"
RULER_QA_TEMPLATE = (
    RULER_QA_INSTRUCTION + "\n\n" + RULER_QA_CONTEXT_HEADER + "\n{context}\n\n"
    + RULER_QA_INSTRUCTION + "\n\nQuestion: {question}\nAnswer:"
)
# RULER's ``incremental`` (documents added / removed per step) and its default ``--random_seed``.
RULER_DOC_STEP = 10
RULER_SEED = 42
# The columns (and their order) of the shipped files, spec §9.2.
RULER_QA_COLUMNS = ("index", "prompt", "answer", "prompt_length", "max_answer_length", "total_length",
                    "max_seq_length", "task")
# Source format -> task name (the scorer key and the file-name prefix).
SOURCE_TASKS = {"squad": "ruler_squadqa", "hotpotqa": "ruler_hotpotqa"}

SourceFormat = Literal["squad", "hotpotqa", "ruler"]
DocOrder = Literal["ruler", "random"]


# --------------------------------------------------------------------------------------------------------------
# Source readers (RULER's read_squad / read_hotpotqa)


def _load_json(path: str | os.PathLike[str]) -> Any:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"QA source {str(p)!r} does not exist. Download SQuAD v2 dev (dev-v2.0.json) or HotpotQA dev distractor "
            "(hotpot_dev_distractor_v1.json), the files RULER's qa_1 / qa_2 use, and pass its path."
        )
    with p.open(encoding="utf-8") as f:
        return json.load(f)


def _sorted_pool(texts: Iterable[str]) -> tuple[list[str], dict[str, int]]:
    documents = sorted(set(texts))
    return documents, {d: i for i, d in enumerate(documents)}


def read_squad(path: str | os.PathLike[str]) -> QASource:
    """Read a SQuAD (v1 or v2) JSON file the way RULER's ``qa_1`` does.

    Documents are the unique paragraph contexts, sorted. Each question with ``is_impossible`` false (v1 has no
    such flag) becomes a :class:`QAItem` with its paragraph as gold and the article's other paragraphs as
    ``related``.

    Args:
        path: e.g. ``dev-v2.0.json`` (``{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}``).

    Returns:
        The source, questions in file order.
    """
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{path} is not SQuAD JSON: expected an object with a 'data' list of articles. "
                         "For HotpotQA files use source_format='hotpotqa'.")
    articles = data["data"]
    documents, doc_id = _sorted_pool(p["context"] for a in articles for p in a["paragraphs"])
    questions: list[QAItem] = []
    for article in articles:
        article_docs = list(dict.fromkeys(doc_id[p["context"]] for p in article["paragraphs"]))
        for paragraph in article["paragraphs"]:
            gold = doc_id[paragraph["context"]]
            related = tuple(i for i in article_docs if i != gold)
            for qa in paragraph["qas"]:
                if qa.get("is_impossible", False):
                    continue
                answers = [str(a["text"]) for a in qa.get("answers", [])]
                if not answers:  # malformed item; RULER would emit a prompt with no gold answer
                    continue
                questions.append(QAItem(question=qa["question"], answers=answers, gold=(gold,), related=related))
    if not questions:
        raise ValueError(f"{path} holds no answerable question; is it the SQuAD dev/train JSON?")
    return QASource(questions=questions, documents=documents, name="squad")


def _hotpot_paragraphs(item: dict[str, Any]) -> list[tuple[str, list[str]]]:
    context = item["context"]
    if isinstance(context, dict):  # the Hugging Face datasets layout: {"title": [...], "sentences": [[...]]}
        return list(zip(context["title"], context["sentences"], strict=True))
    return [(title, sentences) for title, sentences in context]


def read_hotpotqa(path: str | os.PathLike[str], gold: Literal["context", "supporting"] = "context") -> QASource:
    """Read a HotpotQA JSON file (dev distractor setting) the way RULER's ``qa_2`` does.

    Documents are the unique ``"{title}\\n{''.join(sentences)}"`` paragraphs, sorted (HotpotQA sentences carry
    their own leading spaces).

    Args:
        path: e.g. ``hotpot_dev_distractor_v1.json``, a list of items with ``question``, ``answer`` and
            ``context`` = ``[[title, [sentence, ...]], ...]`` (``supporting_facts`` = ``[[title, sent_id], ...]``).
        gold: ``"context"`` (RULER): all paragraphs of the item are gold and always appear together.
            ``"supporting"``: only the paragraphs named in ``supporting_facts`` are gold; the item's other
            paragraphs become preferred distractors, which lets short budgets fit.

    Returns:
        The source, questions in file order.
    """
    data = _load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path} is not HotpotQA JSON: expected a list of items. For SQuAD files use "
                         "source_format='squad'.")
    if gold not in ("context", "supporting"):
        raise ValueError(f"gold={gold!r}; use 'context' (RULER) or 'supporting'.")

    def text(title: str, sentences: list[str]) -> str:
        return f"{title}\n{''.join(sentences)}"

    documents, doc_id = _sorted_pool(text(t, s) for item in data for t, s in _hotpot_paragraphs(item))
    questions: list[QAItem] = []
    for item in data:
        paragraphs = _hotpot_paragraphs(item)
        ids = list(dict.fromkeys(doc_id[text(t, s)] for t, s in paragraphs))
        if gold == "supporting":
            facts = item.get("supporting_facts", [])
            titles = set(facts["title"]) if isinstance(facts, dict) else {t for t, _ in facts}
            gold_ids = list(dict.fromkeys(doc_id[text(t, s)] for t, s in paragraphs if t in titles))
            if not gold_ids:
                raise ValueError(f"{path}: item {item.get('_id', item['question'])!r} has no supporting paragraph in "
                                 "its context; use gold='context'.")
            related = tuple(i for i in ids if i not in gold_ids)
        else:
            gold_ids, related = ids, ()
        questions.append(QAItem(question=item["question"], answers=[str(item["answer"])], gold=tuple(gold_ids),
                                related=related))
    if not questions:
        raise ValueError(f"{path} holds no question.")
    return QASource(questions=questions, documents=documents, name="hotpotqa")


def read_qa_source(path: str | os.PathLike[str], source_format: SourceFormat, **kwargs: Any) -> QASource:
    """:func:`read_squad` or :func:`read_hotpotqa` by ``source_format`` (``kwargs`` go to the reader)."""
    if source_format == "squad":
        return read_squad(path, **kwargs)
    if source_format == "hotpotqa":
        return read_hotpotqa(path, **kwargs)
    raise ValueError(f"source_format={source_format!r}; use 'squad' (RULER qa_1) or 'hotpotqa' (RULER qa_2).")


# --------------------------------------------------------------------------------------------------------------
# Prompts


def format_ruler_qa_prompt(documents: Sequence[str], question: str) -> str:
    """The RULER QA prompt of the shipped files (spec §5.1) for documents in the given order.

    Args:
        documents: the document texts, numbered from 1.
        question: the question, verbatim.

    Returns:
        The prompt, ending in ``"Question: {question}\\nAnswer:"``.
    """
    context = "\n\n".join(RULER_QA_DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(documents))
    return RULER_QA_TEMPLATE.format(context=context, question=question)


class _PromptMaker:
    """RULER's ``generate_input_output``: draws the documents of one prompt, consuming ``rng`` like RULER."""

    def __init__(self, source: QASource, seed: int, doc_order: DocOrder) -> None:
        if doc_order not in ("ruler", "random"):
            raise ValueError(f"doc_order={doc_order!r}; use 'ruler' (RULER's fixed permutation) or 'random'.")
        self.source = source
        self.seed = seed
        self.doc_order = doc_order
        self.rng = random.Random(seed)  # RULER: random.seed(args.random_seed)

    def _sample_rest(self, blocked: Sequence[int], k: int) -> list[int]:
        """``rng.sample([i for i in range(N) if i not in blocked], k)`` without building the N-long list.

        ``random.sample`` only uses the population's length and indexing, so sampling positions of the
        implicit list and mapping them back gives the same documents as RULER's list comprehension.
        """
        blocked_sorted = sorted(blocked)
        size = len(self.source.documents) - len(blocked_sorted)
        out = []
        for pos in self.rng.sample(range(size), k):
            # the pos-th unblocked id: smallest x with x - #(blocked <= x) == pos
            x = pos
            while True:
                nxt = pos + bisect.bisect_right(blocked_sorted, x)
                if nxt == x:
                    break
                x = nxt
            out.append(x)
        return out

    def document_ids(self, q: int, num_docs: int) -> list[int]:
        """The document indices of a prompt of question ``q`` with ``num_docs`` documents, in prompt order."""
        item = self.source.questions[q]
        gold, related = list(item.gold), list(item.related)
        n_pool = len(self.source.documents)
        if num_docs < n_pool:
            extra = num_docs - len(gold)
            if extra <= 0:
                ids = gold  # RULER crashes here (random.sample with k < 0); the gold documents alone are the floor
            elif extra > len(related):
                ids = gold + related + self._sample_rest(gold + related, extra - len(related))
            else:
                ids = gold + self.rng.sample(related, extra)
        else:
            ids = list(range(n_pool))
        if self.doc_order == "ruler":
            random.Random(self.seed).shuffle(ids)  # RULER: the same permutation for every prompt of this size
        else:
            self.rng.shuffle(ids)
        return ids

    def prompt(self, q: int, num_docs: int) -> tuple[str, list[int]]:
        ids = self.document_ids(q, num_docs)
        docs = self.source.documents
        return format_ruler_qa_prompt([docs[i] for i in ids], self.source.questions[q].question), ids


def _probe_num_docs(maker: _PromptMaker, tokenizer: Tokenizer, max_seq_length: int, max_answer_tokens: int,
                    doc_step: int) -> int:
    """RULER's search for the file-wide document count, on question 0 (``generate_samples``, "Find the perfect
    num_docs"), kept literally: the probe counts ``prompt + " " + str(answers)`` and consumes random draws."""
    n_pool = len(maker.source.documents)
    item = maker.source.questions[0]
    num_docs, total = doc_step, 0
    while total + max_answer_tokens < max_seq_length:
        prompt, _ = maker.prompt(0, num_docs)
        total = len(tokenizer.encode(prompt + f" {item.answers}"))
        if total + max_answer_tokens > max_seq_length:
            num_docs -= doc_step
            break
        num_docs += doc_step
        if num_docs > n_pool:
            num_docs = n_pool
            break
    return max(num_docs, 0)


# --------------------------------------------------------------------------------------------------------------
# Splits and file building


def _check_indices(source: QASource, indices: Sequence[int], what: str) -> list[int]:
    out = [int(i) for i in indices]
    n = len(source.questions)
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ValueError(f"{what} {bad[:5]} are outside the source's {n} questions (0..{n - 1}).")
    if len(set(out)) != len(out):
        raise ValueError(f"{what} contain duplicates; pass each question index once.")
    return out


def _shares_gold(source: QASource, test: Iterable[int]) -> set[int]:
    """Questions whose gold documents overlap those of ``test`` (SQuAD: questions on the same paragraph)."""
    test_docs = {d for q in test for d in source.questions[q].gold}
    return {q for q, item in enumerate(source.questions) if test_docs.intersection(item.gold)}


def question_orders(source: QASource, seed: int, *, test_first: bool = True) -> tuple[list[int], list[int]]:
    """Candidate orders of the test and train questions (disjointness is applied by the caller).

    Args:
        source: the QA source.
        seed: the split seed.
        test_first: test takes the source's first questions, as RULER does (``pre_samples`` = 0): the shipped
            test files are questions 0..199. Otherwise test takes the start of a seeded permutation.

    Returns:
        (test order, train order): test in source order (or permuted), train in a seeded permutation.
    """
    perm = list(range(len(source.questions)))
    random.Random(seed).shuffle(perm)
    test = list(range(len(perm))) if test_first else perm
    return test, perm


def split_questions(source: QASource, n_train: int, n_test: int, seed: int = RULER_SEED, *, test_first: bool = True,
                    disjoint_gold: bool = False) -> tuple[list[int], list[int]]:
    """Disjoint train and test question indices (spec §3: 1600 train, 200 test per dataset and length).

    Args:
        source: the QA source.
        n_train, n_test: how many questions each split gets.
        seed: the split seed.
        test_first: see :func:`question_orders` (True reproduces the shipped test questions 0..n_test-1).
        disjoint_gold: also keep out of train every question that shares a gold document with a test question
            (SQuAD asks several questions about one paragraph).

    Returns:
        (train, test) question indices; train in a seeded random order, test in source order when test_first.
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train={n_train}, n_test={n_test} must be >= 0.")
    test_order, train_order = question_orders(source, seed, test_first=test_first)
    test = test_order[:n_test]
    blocked = _shares_gold(source, test) if disjoint_gold else set(test)
    train = [q for q in train_order if q not in blocked][:n_train]
    if len(test) < n_test or len(train) < n_train:
        raise ValueError(
            f"the source has {len(source.questions)} questions: not enough for {n_train} train + {n_test} test "
            f"(got {len(train)} train{' with disjoint_gold' if disjoint_gold else ''}); lower n_train / n_test or "
            "use a larger source file."
        )
    return train, test


def build_ruler_qa(
    source: QASource,
    tokenizer: Tokenizer,
    max_seq_length: int,
    num_examples: int,
    seed: int,
    task: str,
    max_answer_tokens: int = RULER_MAX_GEN_TOKENS,
    question_indices: Sequence[int] | None = None,
    *,
    exclude: Iterable[int] = (),
    num_docs: int | None = None,
    doc_step: int = RULER_DOC_STEP,
    doc_order: DocOrder = "ruler",
    shuffle_rows: bool = True,
) -> list[dict[str, Any]]:
    """Rows of a RULER QA file (spec §9.2), built like RULER's ``qa.py`` (see the module docstring).

    Questions are taken from ``question_indices`` (default: all, in source order) minus ``exclude``, in order,
    until ``num_examples`` fit: a question whose gold documents alone exceed the budget is skipped (a warning
    counts them). Every row satisfies ``prompt_length + max_answer_tokens <= max_seq_length`` (the official
    code left-pads prompts to ``max_seq_length - 32``, spec §5.1).

    Args:
        source: from :func:`read_squad` / :func:`read_hotpotqa`.
        tokenizer: the model's tokenizer (lengths are counted without special tokens, spec §1).
        max_seq_length: e.g. 4096, 8192, 16384.
        num_examples: rows wanted (1600 train / 200 test in spec §3).
        seed: RULER's ``--random_seed`` (default there 42); the output is a function of it.
        task: the ``task`` column, ``"ruler_squadqa"`` or ``"ruler_hotpotqa"`` (the scorer key).
        max_answer_tokens: the generation budget reserved after the prompt (spec §5.1: 32).
        question_indices: candidate questions, in the order they are used (e.g. from :func:`split_questions`).
        exclude: questions never used (e.g. the other split's).
        num_docs: documents per prompt to start from; None probes it like RULER.
        doc_step: documents added/removed per step (RULER: 10; 1 packs each prompt as full as it goes).
        doc_order: ``"ruler"`` (one fixed permutation per prompt size, RULER) or ``"random"`` (per prompt).
        shuffle_rows: shuffle the rows with ``seed`` (the shipped files are shuffled).

    Returns:
        ``num_examples`` dicts with keys :data:`RULER_QA_COLUMNS` (fewer, with a warning, if questions ran out).
    """
    if max_answer_tokens < 0 or max_seq_length <= max_answer_tokens:
        raise ValueError(f"max_seq_length={max_seq_length} leaves no room for a prompt after "
                         f"max_answer_tokens={max_answer_tokens}; raise max_seq_length (spec §3 uses 4096/8192/16384).")
    if num_examples <= 0:
        raise ValueError(f"num_examples={num_examples}; ask for at least one example.")
    if doc_step <= 0:
        raise ValueError(f"doc_step={doc_step}; use a positive step (RULER uses 10).")
    if not source.questions:
        raise ValueError("the QA source has no questions.")
    if not re.fullmatch(r"ruler_[a-z0-9]+", task):
        raise ValueError(f"task={task!r}; use 'ruler_squadqa' or 'ruler_hotpotqa' (the scorer key, spec §5.1).")
    candidates = _check_indices(source, range(len(source.questions)) if question_indices is None
                                else question_indices, "question_indices")
    excluded = set(_check_indices(source, list(dict.fromkeys(exclude)), "exclude"))
    candidates = [q for q in candidates if q not in excluded]
    if len(candidates) < num_examples:
        raise ValueError(f"only {len(candidates)} candidate questions after exclusions, fewer than num_examples="
                         f"{num_examples}; lower num_examples or use a larger source / fewer exclusions.")

    budget = max_seq_length - max_answer_tokens
    maker = _PromptMaker(source, seed, doc_order)
    if num_docs is None:
        num_docs = _probe_num_docs(maker, tokenizer, max_seq_length, max_answer_tokens, doc_step)
        logger.info("%s at %d tokens: starting from %d documents per prompt (RULER probe on question 0)",
                    task, max_seq_length, num_docs)

    rows: list[dict[str, Any]] = []
    doc_counts: list[int] = []
    skipped: list[int] = []
    long_answers = 0
    for q in candidates:
        if len(rows) == num_examples:
            break
        item = source.questions[q]
        n, fitted = num_docs, None
        # RULER drops `doc_step` documents until it fits; the gold documents alone are the last try.
        while fitted is None:
            n = max(n, len(item.gold))
            prompt, ids = maker.prompt(q, n)
            length = len(tokenizer.encode(prompt))
            if length <= budget:
                fitted = (prompt, ids, length)
            elif n <= len(item.gold):
                break
            else:
                n -= doc_step
        if fitted is None:
            skipped.append(q)
            continue
        prompt, ids, length = fitted
        answer_length = max(len(tokenizer.encode(a)) for a in item.answers)
        long_answers += answer_length > max_answer_tokens
        doc_counts.append(len(ids))
        rows.append({
            "index": q, "prompt": prompt, "answer": list(item.answers), "prompt_length": length,
            "max_answer_length": answer_length, "total_length": length + answer_length,
            "max_seq_length": max_seq_length, "task": task,
        })

    if skipped:
        logger.warning("%s at %d tokens: skipped %d question(s) whose gold documents alone exceed %d prompt tokens "
                       "(first: %s)", task, max_seq_length, len(skipped), budget, skipped[:5])
    if not rows:
        raise ValueError(
            f"no question fits {max_seq_length} tokens with {max_answer_tokens} answer tokens: even the gold "
            f"documents alone are longer than {budget} tokens. Raise max_seq_length"
            + (" or read HotpotQA with gold='supporting'." if source.name == "hotpotqa" else ".")
        )
    if len(rows) < num_examples:
        logger.warning("%s at %d tokens: built %d of %d examples; the candidate questions ran out after skips.",
                       task, max_seq_length, len(rows), num_examples)
    if long_answers:
        logger.warning("%s: %d example(s) have an answer longer than %d tokens; SFT and greedy decoding see it "
                       "truncated (spec §5.1)", task, long_answers, max_answer_tokens)
    lengths = [r["prompt_length"] for r in rows]
    logger.info("%s at %d tokens: %d examples, documents per prompt %d..%d (median %g), prompt tokens %d..%d",
                task, max_seq_length, len(rows), min(doc_counts), max(doc_counts), statistics.median(doc_counts),
                min(lengths), max(lengths))
    if shuffle_rows:
        random.Random(seed).shuffle(rows)  # separate generator: the row order never changes the documents
    return rows


def write_ruler_qa_parquet(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write rows in the schema of the shipped files (spec §9.2), atomically.

    Args:
        rows: dicts with exactly the keys :data:`RULER_QA_COLUMNS` (as :func:`build_ruler_qa` returns).
        path: the parquet file to write (parent directories are created).

    Returns:
        The written path.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i, row in enumerate(rows):
        if set(row) != set(RULER_QA_COLUMNS):
            raise ValueError(f"row {i} has columns {sorted(row)}; a RULER QA row needs exactly "
                             f"{list(RULER_QA_COLUMNS)} (build rows with build_ruler_qa).")
    schema = pa.schema([
        ("index", pa.int64()), ("prompt", pa.string()), ("answer", pa.list_(pa.string())),
        ("prompt_length", pa.int64()), ("max_answer_length", pa.int64()), ("total_length", pa.int64()),
        ("max_seq_length", pa.int64()), ("task", pa.string()),
    ])
    table = pa.Table.from_pydict({c: [r[c] for r in rows] for c in RULER_QA_COLUMNS}, schema=schema)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def ruler_qa_filename(task: str, name: str, max_seq_length: int, num_rows: int, split: str) -> str:
    """The official file name, ``ruler_squadqa_delta_net_4096_200_test.parquet`` (spec §9.2)."""
    return f"{task}_{name}_{max_seq_length}_{num_rows}_{split}.parquet"


def _file_name_part(name: str) -> str:
    """A tokenizer name usable in a file name: ``fla-hub/delta_net-1.3B-100B`` -> ``delta_net_1_3b_100b``."""
    base = Path(name.rstrip("/")).name or name
    return re.sub(r"[^a-z0-9]+", "_", base.lower()).strip("_") or "tokenizer"


def make_ruler_qa(
    source_path: str | os.PathLike[str],
    source_format: SourceFormat,
    tokenizer_spec: str | os.PathLike[str] | Tokenizer,
    max_seq_length: int,
    num_train: int,
    num_test: int,
    out_dir: str | os.PathLike[str],
    seed: int = RULER_SEED,
    task: str | None = None,
    *,
    name: str | None = None,
    max_answer_tokens: int = RULER_MAX_GEN_TOKENS,
    doc_step: int = RULER_DOC_STEP,
    doc_order: DocOrder = "ruler",
    test_first: bool = True,
    disjoint_gold: bool = False,
    hotpot_gold: Literal["context", "supporting"] = "context",
) -> dict[str, Path]:
    """Write the train and test files of one dataset and length (spec §3: 1600 train, 200 test).

    The test file is built first from the first questions that fit (``test_first``, RULER's choice and the
    shipped files' questions 0..199); the train file then takes questions in a seeded random order, never one
    that is in the test file.

    Args:
        source_path: SQuAD v2 dev JSON (``source_format="squad"``), HotpotQA dev distractor JSON
            (``"hotpotqa"``), or RULER QA task files of one dataset, a path, directory or glob (``"ruler"``,
            :func:`refine_core.data.ruler_qa_source.read_ruler_qa_files`).
        source_format: ``"squad"``, ``"hotpotqa"`` or ``"ruler"``.
        tokenizer_spec: a :class:`~refine_core.tokenizer.Tokenizer` or a :func:`~refine_core.tokenizer.load_tokenizer`
            spec; use the model's tokenizer (spec §9.2: the files are per model).
        max_seq_length: 4096, 8192, 16384, ...
        num_train, num_test: rows per split (0 skips the split).
        out_dir: where the files go.
        seed: RULER's seed (42 by default there); also seeds the split.
        task: the ``task`` column; default from ``source_format`` (``ruler_squadqa`` / ``ruler_hotpotqa``; for
            ``ruler``, the files' own task).
        name: the model part of the file name (official: ``lact``, ``delta_net``); default from the tokenizer.
        max_answer_tokens, doc_step, doc_order: see :func:`build_ruler_qa`.
        test_first, disjoint_gold: see :func:`split_questions`.
        hotpot_gold: see :func:`read_hotpotqa`.

    Returns:
        ``{"test": path, "train": path}`` for the splits written.
    """
    if source_format not in (*SOURCE_TASKS, "ruler"):
        raise ValueError(f"source_format={source_format!r}; use 'squad' (RULER qa_1), 'hotpotqa' (RULER qa_2) or "
                         "'ruler' (RULER QA task files).")
    if num_train < 0 or num_test < 0 or num_train + num_test == 0:
        raise ValueError(f"num_train={num_train}, num_test={num_test}: ask for at least one row (spec §3: 1600/200).")
    if source_format == "ruler":
        source = read_ruler_qa_files(source_path)
        task = task or source.name
    else:
        task = task or SOURCE_TASKS[source_format]
        source = (read_hotpotqa(source_path, gold=hotpot_gold) if source_format == "hotpotqa"
                  else read_squad(source_path))
    tokenizer = tokenizer_spec if isinstance(tokenizer_spec, Tokenizer) else load_tokenizer(tokenizer_spec)
    name = _file_name_part(name or tokenizer.name)
    test_order, train_order = question_orders(source, seed, test_first=test_first)
    common: dict[str, Any] = {"max_answer_tokens": max_answer_tokens, "doc_step": doc_step, "doc_order": doc_order}

    written: dict[str, Path] = {}
    test_used: list[int] = []
    if num_test:
        rows = build_ruler_qa(source, tokenizer, max_seq_length, num_test, seed, task, question_indices=test_order,
                              **common)
        test_used = [r["index"] for r in rows]
        written["test"] = write_ruler_qa_parquet(
            rows, Path(out_dir) / ruler_qa_filename(task, name, max_seq_length, len(rows), "test"))
    if num_train:
        blocked = _shares_gold(source, test_used) if disjoint_gold else set(test_used)
        rows = build_ruler_qa(source, tokenizer, max_seq_length, num_train, seed, task, question_indices=train_order,
                              exclude=blocked, **common)
        written["train"] = write_ruler_qa_parquet(
            rows, Path(out_dir) / ruler_qa_filename(task, name, max_seq_length, len(rows), "train"))
    for split, path in written.items():
        logger.info("wrote the %s file %s", split, path)
    return written
