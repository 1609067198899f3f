"""Scoring functions for RULER QA, RULER NIAH and LongBench (spec §5), each a small pure function.

Every metric scores one prediction against one gold answer (or one list of references for the RULER string
matches) and returns a float in [0, 1]; :func:`max_over_answers` takes the maximum over several gold answers, as
spec §5.1 / §5.3 say. Post-processing of raw generations (first line, ...) lives in
:mod:`refine_core.evaluation.tasks`; the metrics here only apply what the scorers they copy apply themselves.

Sources the behaviour is copied from (reference, not code):

* LongBench ``metrics.py`` (THUDM/LongBench): :func:`normalize_answer`, :func:`qa_f1_score`,
  :func:`rouge_l_score`, :func:`classification_score` (with its exact match-removal loop), :func:`code_sim_score`.
* REFINE ``verl/verl/utils/reward_score/longbench.py`` (spec §5.3): the 50 TREC labels in :data:`TREC_CLASSES`
  (same set as the ``Type:`` labels of the few-shot examples in ``trec_16384.parquet``) and the
  ``fallback="refine"`` branch of :func:`code_sim_score` (spec §10.17).
* fuzzywuzzy 0.18.0 ``fuzz.ratio`` and its ``utils`` decorators, as installed in the official REFINE environment
  (no python-Levenshtein, so ``difflib``): :func:`difflib_ratio`, the default similarity of :func:`code_sim_score`.
* REFINE ``verl/verl/utils/reward_score/ruler.py`` (spec §5.1) for :func:`ruler_qa_score`, and lm-evaluation-harness
  ``tasks/ruler/common_utils.py`` for :func:`ruler_clean`, :func:`string_match_all` and :func:`string_match_part`
  (spec §5.2).

Verified library behaviour (see ``tests/evaluation/test_metrics.py``):

* ``rouge==1.0.1`` ROUGE-L is *summary level* over sentences split on ``"."`` and counts **distinct** words
  (``exclusive=True`` sets): R = |union LCS words| / |distinct reference words|, P = ... / |distinct prediction
  words|, F = 2PR / (P + R + 1e-8), i.e. beta = 1 with a 1e-8 guard, so a text scored against itself gives
  1 - 5e-9, not exactly 1. It raises on empty / dot-only text and can hit Python's recursion limit on a
  "sentence" of ~1000+ words (its LCS back-trace is recursive); LongBench's bare ``except`` turns all of these into
  0.0 and so does :func:`rouge_l_score`.
* Code edit similarity (spec §5.3, §10.17). The official REFINE environment pins ``fuzzywuzzy==0.18.0`` without
  ``python-Levenshtein``, so its ``fuzz.ratio(line, gold)`` is fuzzywuzzy's pure-Python fallback,
  ``int(round(100 * difflib.SequenceMatcher(None, line, gold).ratio()))`` (round-half-even) behind three decorators
  (None -> 0, equal strings -> 100 even when both are empty, one empty string -> 0). The paper's lcc / repobench-p
  numbers were computed that way, hence :func:`difflib_ratio` is the default of :func:`code_sim_score`.
  SequenceMatcher's automatic junk heuristic applies when the *gold* has 200 or more characters: every character
  occurring more than ``1 + len(gold) // 100`` times in it ("popular": spaces, common letters, ...) is left out of
  the index the matcher searches, so it only matches next to a match of a rarer character or at the very start of
  a still unmatched stretch. Long lines can then score far below their edit similarity (the 200-character
  "AB = (0, 0, ..., 0)" vs "AB = [0, 0, ..., 0]": difflib 2, indel 99). Shorter lines differ less but still do
  ("ccbcaa" vs "cbcbbbcc": difflib 43, indel 57).
* :func:`indel_ratio` (``similarity="indel"``) is ``thefuzz.fuzz.ratio`` (rapidfuzz backend),
  ``int(round(100 * indel_similarity))``, as fuzzywuzzy *with* python-Levenshtein was; both give 100 for two empty
  strings and 0 when exactly one is empty. At exact .5 ties the two can differ by one point, because rapidfuzz
  computes ``1 - d / L`` (0.42500000000000004 for d=46, L=80 -> 43) where python-Levenshtein < 0.20 computed
  ``(L - d) / L`` (0.425 -> round-half-even 42).
"""

from __future__ import annotations

import difflib
import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Literal

logger = logging.getLogger(__name__)

# The 50 TREC coarse:fine labels exactly as LongBench / the REFINE scorer list them, in their order (the order
# matters for the match-removal loop of classification_score). "Lasting time of somethin" is the dataset's own
# truncation (spec §10.17); the set equals the "Type:" labels of the few-shot examples in trec_16384.parquet.
TREC_CLASSES: tuple[str, ...] = (
    "Food", "Date", "Order, rank", "Speed", "Disease and medicine", "Word with a special property",
    "Abbreviation", "Language", "Letter like a-z", "Other entity", "Animal", "Expression abbreviated", "Price",
    "Techniques and method", "Musical instrument", "Mountain", "Currency name", "Event", "Product", "State",
    "Individual", "Organ of body", "Reason", "Manner of an action", "City", "Religion",
    "Invention, book and other creative piece", "Distance, linear measure", "Temperature",
    "Postcode or other code", "Size, area and volume", "Sport", "Country", "Other location",
    "Lasting time of somethin", "Equivalent term", "Description of something", "Weight", "Vehicle", "Color",
    "Other number", "Definition of something", "Element and substance", "Description of a person",
    "Symbols and sign", "Number of something", "Plant", "Percent, fraction", "Group or organization of person",
    "Title of a person",
)

CodeSimFallback = Literal["longbench", "refine"]
CodeSimSimilarity = Literal["difflib", "indel"]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# RULER / lm-eval post-processing: every ASCII control character (tab, CR, ...) becomes a newline.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


def normalize_answer(s: str) -> str:
    """SQuAD-style normalisation, exactly LongBench's: lower-case, drop ASCII punctuation, drop the articles
    a/an/the (whole words), collapse whitespace (spec §5.3).

    Punctuation is removed *before* articles, so "the-end" -> "theend" keeps its letters while "the. end" -> "end".
    """
    text = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction_tokens: Sequence[str], ground_truth_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1 (LongBench ``f1_score``): overlap counted with multiplicity via ``Counter`` intersection.

    Returns 0.0 when nothing overlaps (this also covers an empty side, so there is no division by zero).
    """
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str) -> float:
    """LongBench QA-F1: token F1 between the :func:`normalize_answer` forms split on whitespace (spec §5.3)."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def rouge_l_score(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F of the ``rouge`` package (``Rouge().get_scores([pred], [gt], avg=True)["rouge-l"]["f"]``).

    Returns 0.0 wherever that call raises (empty or dot-only text, recursion depth on very long sentences),
    as LongBench's ``rouge_score`` does. See the module docstring for what the package computes.
    """
    from rouge import Rouge

    try:
        scores = Rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception as err:  # LongBench's bare ``except`` (ValueError on empty text, RecursionError, ...)
        logger.debug("rouge failed (%s: %s); scoring 0.0 as LongBench does", type(err).__name__, err)
        return 0.0
    return float(scores["rouge-l"]["f"])


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] = TREC_CLASSES) -> float:
    """LongBench TREC classification: 1/|matches| if the gold label is among the class names found in the
    prediction, else 0 (spec §5.3).

    Exactly LongBench's rule, including its quirk: the loop that drops matches which are a substring of (but not
    equal to) the gold label removes items from the list it is iterating over, so the element right after each
    removed one is skipped and survives. With the 50 TREC labels no label is a substring of another, so this only
    matters for custom ``all_classes``. Matching is case-sensitive substring search, as in LongBench.
    """
    em_match_list = [class_name for class_name in all_classes if class_name in prediction]
    # Deliberate mutation while iterating: reproduces LongBench's skip-after-remove behaviour.
    for match_term in em_match_list:
        if match_term in ground_truth and match_term != ground_truth:
            em_match_list.remove(match_term)
    if ground_truth in em_match_list:
        return 1.0 / len(em_match_list)
    return 0.0


def difflib_ratio(a: str | None, b: str | None) -> int:
    """fuzzywuzzy 0.18.0's ``fuzz.ratio(a, b)`` without python-Levenshtein: the similarity the official REFINE
    environment scored lcc / repobench-p with (spec §5.3, §10.17), from the standard library only.

    The decorators of ``fuzz.ratio`` apply in their order: None -> 0 (``check_for_none``), ``a == b`` -> 100
    (``check_for_equivalence``, so two empty strings give 100), either empty -> 0 (``check_empty_string``). Then
    ``difflib.SequenceMatcher(None, a, b)`` with its default ``autojunk=True``: when ``b`` (the gold) has 200 or more
    characters, its characters occurring more than ``1 + len(b) // 100`` times only match by extending a match of a
    rarer one (or at the start of a still unmatched stretch), so the order of the arguments matters.

    Args:
        a: the scored line (fuzzywuzzy's ``s1``).
        b: the gold line (``s2``, the one autojunk looks at).

    Returns:
        ``round(100 * 2 * M / (len(a) + len(b)))`` with M the characters in SequenceMatcher's matching blocks,
        rounded half to even as Python 3's ``round`` does (12.5 -> 12), an int in [0, 100].
    """
    if a is None or b is None:
        return 0
    if a == b:
        return 100
    if not a or not b:
        return 0
    # fuzzywuzzy's utils.intr is int(round(n)); Python 3's round already returns an int (and rounds half to even).
    return round(100 * difflib.SequenceMatcher(None, a, b).ratio())


def indel_ratio(a: str, b: str) -> int:
    """``thefuzz.fuzz.ratio(a, b)`` (rapidfuzz backend): ``round(100 * (1 - d / (len(a) + len(b))))`` with d the
    insertions + deletions turning ``a`` into ``b``; 100 for two equal strings (also empty ones), 0 when exactly one
    is empty. Not what the paper's numbers used (see :func:`difflib_ratio`); kept for comparison with thefuzz-based
    LongBench scorers.

    Args:
        a: the scored line.
        b: the gold line (the score is symmetric).

    Returns:
        An int in [0, 100].
    """
    from thefuzz import fuzz

    return fuzz.ratio(a, b)


_CODE_SIM_SIMILARITIES: dict[str, Callable[[str, str], int]] = {"difflib": difflib_ratio, "indel": indel_ratio}


def code_sim_score(
    prediction: str,
    ground_truth: str,
    fallback: CodeSimFallback = "longbench",
    similarity: CodeSimSimilarity = "difflib",
) -> float:
    """LongBench code edit similarity: ``fuzz.ratio(line, gold) / 100`` on the first line of the prediction (after
    stripping leading newlines) that contains none of "`", "#", "//" (spec §5.3).

    Args:
        prediction: the raw generation (LongBench applies no other post-processing to lcc / repobench-p).
        ground_truth: the gold next line of code.
        fallback: what to score when no line qualifies (spec §10.17): ``"longbench"`` scores "" (original
            LongBench), ``"refine"`` scores the whole, unmodified prediction (the official REFINE scorer, whose
            loop assigns the qualifying line to the response variable and otherwise leaves the response as is).
        similarity: which ``fuzz.ratio``: ``"difflib"`` (default, :func:`difflib_ratio`: fuzzywuzzy 0.18.0 without
            python-Levenshtein, as in the official REFINE environment that produced the paper's numbers) or
            ``"indel"`` (:func:`indel_ratio`: thefuzz / rapidfuzz). They differ most on gold lines of 200+
            characters, where difflib's autojunk heuristic applies (see the module docstring).

    Returns:
        The similarity in [0, 1], in steps of 0.01.

    Raises:
        ValueError: unknown ``fallback`` or ``similarity``.
    """
    if fallback not in ("longbench", "refine"):
        raise ValueError(f"code_sim_score fallback={fallback!r}; use 'longbench' (score '') or 'refine' (whole text).")
    ratio = _CODE_SIM_SIMILARITIES.get(similarity)
    if ratio is None:
        raise ValueError(
            f"code_sim_score similarity={similarity!r}; use 'difflib' (fuzzywuzzy 0.18.0 without python-Levenshtein, "
            "the paper's numbers) or 'indel' (thefuzz / rapidfuzz)."
        )
    line = "" if fallback == "longbench" else prediction
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return ratio(line, ground_truth) / 100


def ruler_clean(prediction: str) -> str:
    """RULER's ``postprocess_pred``: strip, replace each control character by a newline, strip again (spec §5.1)."""
    return _CONTROL_CHARS.sub("\n", prediction.strip()).strip()


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any reference, lower-cased, is a substring of the lower-cased prediction, else 0.0 (RULER QA).

    An empty ``references`` scores 0.0 (the official RULER QA scorer starts its max at 0.0).
    """
    lowered = prediction.lower()
    return 1.0 if any(ref.lower() in lowered for ref in references) else 0.0


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of the references found as case-insensitive substrings of the prediction (RULER NIAH, spec §5.2).

    Raises:
        ValueError: ``references`` is empty (the fraction is undefined; lm-eval would divide by zero).
    """
    if not references:
        raise ValueError("string_match_all needs at least one reference; got none (check the NIAH example).")
    lowered = prediction.lower()
    return sum(1.0 for ref in references if ref.lower() in lowered) / len(references)


def ruler_qa_score(prediction: str, answers: Sequence[str]) -> float:
    """RULER QA as the official REFINE scorer computes it (spec §5.1), on the raw decoded response: keep the first
    line (split on "\\n"), :func:`ruler_clean` it, then :func:`string_match_part` over the gold answers -> 1 or 0.

    Control characters other than "\\n" (tab, CR, ...) become newlines *after* the first-line cut, so
    "Paris\\tFrance" is matched as "Paris\\nFrance" (a gold "Paris France" does not match it).
    """
    return string_match_part(ruler_clean(prediction.split("\n")[0]), answers)


def max_over_answers(metric: Callable[[str, str], float], prediction: str, answers: Sequence[str]) -> float:
    """The best score of ``prediction`` against any gold answer; 0.0 when there are none (spec §5.3).

    Args:
        metric: a one-answer metric such as :func:`qa_f1_score`.
        prediction: the post-processed prediction.
        answers: the gold answers.
    """
    return max((metric(prediction, answer) for answer in answers), default=0.0)
