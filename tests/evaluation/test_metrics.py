"""Metrics of spec §5 on hand-computed cases (the arithmetic is in the comments) and against slow references."""

from __future__ import annotations

import difflib
import random
import sys
from fractions import Fraction

import pytest
from thefuzz import fuzz

from refine_core.evaluation.metrics import (
    TREC_CLASSES,
    classification_score,
    code_sim_score,
    difflib_ratio,
    indel_ratio,
    max_over_answers,
    normalize_answer,
    qa_f1_score,
    rouge_l_score,
    ruler_clean,
    ruler_qa_score,
    string_match_all,
    string_match_part,
    token_f1,
)

# --- normalize_answer / QA-F1 -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Cat,  sat!", "cat sat"),  # lower, punctuation, article, whitespace
        ("An apple a day", "apple day"),  # all three articles go
        ("the-end", "theend"),  # punctuation is removed *before* articles: "theend" is no article
        ("The. end", "end"),  # "the. end" -> "the end" -> " end"
        ("theatre", "theatre"),  # articles only as whole words
        ("A", ""),
        ("\t a\nb ", "b"),  # tabs/newlines are whitespace; "a" is an article
        ("café—bar", "café—bar"),  # only ASCII string.punctuation is removed (the em dash stays)
        ("", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_qa_f1_hand_cases() -> None:
    # [cat, sat] vs [cat, sat, down]: overlap 2 -> P = 2/2 = 1, R = 2/3 -> F1 = 2 * 1 * 2/3 / (1 + 2/3) = 0.8
    assert qa_f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # [dog, dog, cat] vs [dog, cat, cat]: Counter overlap min(2,1) + min(1,2) = 2 -> P = R = 2/3 -> F1 = 2/3
    assert qa_f1_score("dog dog cat", "dog cat cat") == pytest.approx(2 / 3)
    assert qa_f1_score("Paris!", "paris") == 1.0  # normalisation makes them equal
    assert qa_f1_score("London", "Paris") == 0.0  # no overlap
    assert qa_f1_score("", "Paris") == 0.0  # empty prediction
    # both normalise to nothing: LongBench returns 0 (num_same == 0), not 1
    assert qa_f1_score("the", "a") == 0.0
    assert token_f1([], []) == 0.0


def test_max_over_answers() -> None:
    # max(F1 vs "cat sat down" = 0.8, F1 vs "cat" = 2 * 1/2 * 1 / (1/2 + 1) = 2/3) = 0.8
    assert max_over_answers(qa_f1_score, "the cat sat", ["cat sat down", "cat"]) == pytest.approx(0.8)
    assert max_over_answers(qa_f1_score, "anything", []) == 0.0


# --- ROUGE-L (rouge==1.0.1) ----------------------------------------------------------------------------------------
# The package: sentences split on ".", words counted as *sets* (exclusive=True), LCS words of every (reference
# sentence, prediction sentence) pair unioned as a set; R = |union| / |distinct ref words|,
# P = |union| / |distinct prediction words|, F = 2PR / (P + R + 1e-8) (beta = 1).


def test_rouge_l_counts_distinct_words() -> None:
    # ref [the, cat, lay, on, the, mat] -> distinct {the, cat, lay, on, mat}: m = 5; prediction likewise n = 5.
    # LCS = [the, cat, on, the, mat] -> as a set {the, cat, on, mat} = 4 -> R = P = 4/5 -> F = 0.8
    # (a textbook token ROUGE-L would give LCS 5 / 6 words = 0.833).
    assert rouge_l_score("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(0.8, abs=1e-7)


def test_rouge_l_unequal_lengths() -> None:
    # pred [a, b, c] (n = 3), ref [a, c, d, e] (m = 4), LCS [a, c] = 2 -> P = 2/3, R = 1/2
    # F = 2 * (1/3) / (2/3 + 1/2) = (2/3) / (7/6) = 4/7
    assert rouge_l_score("a b c", "a c d e") == pytest.approx(4 / 7, abs=1e-7)


def test_rouge_l_sentence_union_and_epsilon() -> None:
    # pred sentences ["a b", "c d"], ref ["a b c d"]: LCS with each = {a, b} and {c, d}, union 4; m = n = 4 -> 1
    # but F = 2 * 1 * 1 / (2 + 1e-8): a text against itself is 1 - 5e-9, not exactly 1.
    assert rouge_l_score("a b. c d", "a b c d") == pytest.approx(2 / (2 + 1e-8), abs=1e-12)
    assert rouge_l_score("same words here", "same words here") < 1.0


def test_rouge_l_errors_score_zero() -> None:
    assert rouge_l_score("", "reference") == 0.0  # the package raises "Hypothesis is empty."
    assert rouge_l_score("prediction", "") == 0.0
    assert rouge_l_score("...", "reference") == 0.0  # dot-only text has no sentence
    # The package's LCS back-trace is recursive: one "sentence" longer than the recursion limit raises
    # RecursionError (at the default limit that is ~1000 words, reachable by 512-token summaries without ".").
    words = " ".join(f"w{i}" for i in range(300))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(250)
    try:
        assert rouge_l_score(words, words) == 0.0
    finally:
        sys.setrecursionlimit(limit)


# --- TREC classification ---------------------------------------------------------------------------------------


def test_trec_class_list() -> None:
    assert len(TREC_CLASSES) == 50 and len(set(TREC_CLASSES)) == 50
    assert "Lasting time of somethin" in TREC_CLASSES  # the dataset's own misspelling (spec §10.17)
    # No label is a substring of another, so the removal rule never fires on real TREC gold labels.
    assert not [(a, b) for a in TREC_CLASSES for b in TREC_CLASSES if a != b and a in b]


def test_classification_hand_cases() -> None:
    assert classification_score("Type: Other location", "Other location") == 1.0  # one match, the gold
    # matches in list order: "Individual" (#21) then "City" (#25) -> gold among 2 matches -> 1/2
    assert classification_score("Individual or City", "City") == 0.5
    assert classification_score("city", "City") == 0.0  # case-sensitive substring search
    assert classification_score("Human being", "Individual") == 0.0  # nothing matches -> 0
    assert classification_score("Other location", "City") == 0.0  # matches, but not the gold
    # "Lasting time of something" contains the misspelt label, so a correct answer still matches it
    assert classification_score("Lasting time of something", "Lasting time of somethin") == 1.0


def test_classification_substring_rule_with_longbench_skip() -> None:
    # classes [New, York, New York], gold "New York", prediction "New York": all three match -> [New, York, New York].
    # LongBench removes matches that are substrings of the gold while iterating over the same list:
    #   i=0 "New" -> removed -> [York, New York]; i=1 is now "New York" (kept), "York" was skipped and survives.
    # Gold is among 2 -> 1/2 (a loop without the skip would keep only the gold -> 1.0).
    assert classification_score("New York", "New York", ["New", "York", "New York"]) == 0.5
    # classes [New, New York]: i=0 "New" removed -> [New York]; the loop ends -> 1/1
    assert classification_score("New York", "New York", ["New", "New York"]) == 1.0
    # a match that is a substring of the gold is dropped even when the gold itself did not match -> 0
    assert classification_score("New", "New York", ["New", "New York"]) == 0.0


# --- code edit similarity ------------------------------------------------------------------------------------------


def _indel_ratio(a: str, b: str) -> Fraction:
    """Slow reference: 100 * (L - d) / L with d = L - 2 * LCS (insertions/deletions only), exact."""
    lcs = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            lcs[i + 1][j + 1] = lcs[i][j] + 1 if x == y else max(lcs[i][j + 1], lcs[i + 1][j])
    total = len(a) + len(b)
    return Fraction(100 * 2 * lcs[-1][-1], total)


def test_thefuzz_ratio_is_rounded_indel_similarity() -> None:
    # "abcd" vs "abce": LCS 3, L = 8, d = 2 -> 100 * 6/8 = 75
    assert fuzz.ratio("abcd", "abce") == 75 == indel_ratio("abcd", "abce")
    # "kitten" vs "sitting": LCS "ittn" = 4, L = 13 -> 100 * 8/13 = 61.5 -> 62
    assert fuzz.ratio("kitten", "sitting") == 62 == indel_ratio("kitten", "sitting")
    rng = random.Random(0)
    checked = 0
    for _ in range(300):
        a = "".join(rng.choice("ab c(") for _ in range(rng.randint(1, 12)))
        b = "".join(rng.choice("ab c)") for _ in range(rng.randint(1, 12)))
        exact = _indel_ratio(a, b)
        if exact.denominator == 2:  # an exact .5 tie: see the next test
            continue
        assert fuzz.ratio(a, b) == round(exact) == indel_ratio(a, b), (a, b)
        checked += 1
    assert checked > 250
    # fuzzywuzzy's decorators: equal strings -> 100 (even empty ones), one empty string -> 0; thefuzz agrees
    assert fuzz.ratio("", "") == 100 and fuzz.ratio("x", "") == 0
    assert indel_ratio("", "") == 100 and indel_ratio("x", "") == 0 == indel_ratio("", "x")


def test_thefuzz_tie() -> None:
    # 17 x "a" vs 17 x "a" + 46 x "b": L = 80, d = 46, exact 100 * 34/80 = 42.5. rapidfuzz computes 1 - 46/80 =
    # 0.42500000000000004 -> 43; python-Levenshtein < 0.20 computed 34/80 = 0.425 -> round-half-even 42.
    a, b = "a" * 17, "a" * 17 + "b" * 46
    assert _indel_ratio(a, b) == Fraction(85, 2)
    assert fuzz.ratio(a, b) == 43 and round(100 * (34 / 80)) == 42


# difflib_ratio = fuzzywuzzy 0.18.0's fuzz.ratio without python-Levenshtein (the official REFINE environment):
# round(100 * 2M / (len(a) + len(b))), M = the characters in SequenceMatcher(None, a, b)'s matching blocks. The
# matcher takes the longest common block, then recurses on the stretches left and right of it. Its blocks are a
# common subsequence, so M <= LCS and difflib never beats indel; it falls behind when the greedy longest block
# cuts off a longer subsequence, and by a lot under autojunk (gold of 200+ characters).


def test_difflib_ratio_short_lines() -> None:
    # "abcd" vs "abce": longest block "abc" (a[0:3] = b[0:3]); right of it "d" vs "e" match nothing -> M = 3,
    # 100 * 6/8 = 75, as indel (LCS 3).
    assert difflib_ratio("abcd", "abce") == 75 == indel_ratio("abcd", "abce")
    # "ccbcaa" vs "cbcbbbcc": longest block "cbc" (a[1:4] = b[0:3]; no common substring of 3 starts elsewhere).
    # Left of it: a[0:1] = "c" vs b[0:0] = "" -> nothing; right: "aa" vs "bbbcc" -> nothing. M = 3, L = 14 ->
    # 100 * 6/14 = 42.86 -> 43. Indel: LCS "ccbc" (a[0:4]; b[0], b[2], b[3], b[6]) = 4 -> 100 * 8/14 = 57.14 -> 57.
    assert difflib_ratio("ccbcaa", "cbcbbbcc") == 43
    assert indel_ratio("ccbcaa", "cbcbbbcc") == 57
    # same block as the first case, but the right stretches "x" vs "yx" share "x": M = 3 + 1 = 4, L = 9 ->
    # 100 * 8/9 = 88.9 -> 89 (indel: LCS "abcx" = 4, the same).
    assert difflib_ratio("abcx", "abcyx") == 89 == indel_ratio("abcx", "abcyx")


def test_difflib_ratio_rounds_half_to_even() -> None:
    # "a" vs "a" + 14 x "b": M = 1, L = 16 -> 100 * 2/16 = 12.5 exactly (a binary fraction) -> 12, not 13.
    assert difflib_ratio("a", "a" + "b" * 14) == 12
    # "abc" vs "abc" + 10 x "x": M = 3, L = 16 -> 100 * 6/16 = 37.5 exactly -> 38 (the even neighbour, not floor).
    assert difflib_ratio("abc", "abc" + "x" * 10) == 38


def test_difflib_ratio_decorators() -> None:
    # fuzzywuzzy 0.18.0 wraps ratio as check_for_none(check_for_equivalence(check_empty_string(ratio))):
    assert difflib_ratio(None, "x") == 0 == difflib_ratio("x", None) == difflib_ratio(None, None)
    assert difflib_ratio("", "") == 100  # equality is checked before emptiness
    assert difflib_ratio("x", "") == 0 == difflib_ratio("", "x")
    long_line = "AB = [" + "0, " * 64 + "0]"
    assert difflib_ratio(long_line, long_line) == 100  # equal strings never reach SequenceMatcher


# Gold lines of 200+ characters: SequenceMatcher's autojunk drops every character occurring more than
# 1 + len(gold) // 100 times in the gold from the index it searches. Such "popular" characters then only match by
# extending a match found on an indexed (rarer) character, or from the very start of a still unmatched stretch.
GOLD_200 = "AB = [" + "0, " * 64 + "0]"  # 6 + 192 + 2 = 200 characters
PRED_200 = "AB = (" + "0, " * 64 + "0)"  # the same line as a tuple
GOLD_199 = "A = [" + "0, " * 64 + "0]"  # 199 characters: autojunk off
PRED_199 = "A = (" + "0, " * 64 + "0)"
ZEROS = "0, " * 64 + "0"  # 193 characters, a substring of both golds


def test_difflib_autojunk_on_long_gold_lines() -> None:
    assert (len(GOLD_200), len(PRED_200), len(GOLD_199), len(ZEROS)) == (200, 200, 199, 193)
    # GOLD_200: 1 + 200 // 100 = 3, and " " (66x), "0" (65x), "," (64x) occur more often -> only A, B, =, [, ]
    # are indexed. The longest indexed run in PRED_200 is "AB" at (0, 0); it extends over the equal " = " to the
    # block (0, 0, 5) and stops at "(" vs "[". Right of it, a[5:] holds no indexed character ("(" and ")" are not
    # in the gold, the rest is popular) and the empty match at the stretch's start cannot extend ("(" != "[").
    # M = 5, L = 400 -> 100 * 10/400 = 2.5 -> round half to even -> 2.
    # Indel: LCS = "AB = " + ZEROS = 198 -> 100 * 396/400 = 99. 97 points apart.
    assert difflib_ratio(PRED_200, GOLD_200) == 2
    assert indel_ratio(PRED_200, GOLD_200) == 99
    # autojunk is the cause: without it SequenceMatcher also finds ZEROS (6, 6, 193) -> M = 198 -> 99
    assert round(100 * difflib.SequenceMatcher(None, PRED_200, GOLD_200, autojunk=False).ratio()) == 99
    # One character shorter, no autojunk: blocks "A = " (0, 0, 4) and ZEROS (5, 5, 193) -> M = 197, L = 398 ->
    # 100 * 394/398 = 98.99 -> 99, as indel (LCS 197).
    assert difflib_ratio(PRED_199, GOLD_199) == 99 == indel_ratio(PRED_199, GOLD_199)
    # The order matters (autojunk looks at the second string only). ZEROS vs GOLD_200: ZEROS holds none of the
    # indexed A, B, =, [, ] and the empty match at (0, 0) cannot extend ("0" != "A") -> M = 0 -> 0 (indel: LCS 193,
    # L = 393 -> 98.2 -> 98). Swapped, the second string has 193 characters, nothing is dropped, and ZEROS is one
    # block (6, 0, 193) -> 100 * 386/393 = 98.2 -> 98.
    assert difflib_ratio(ZEROS, GOLD_200) == 0
    assert difflib_ratio(GOLD_200, ZEROS) == 98 == indel_ratio(ZEROS, GOLD_200)


def test_code_sim_line_selection() -> None:
    assert code_sim_score("# comment\nx = 1\ny = 2", "x = 1") == 1.0  # skip the "#" line, take the first other
    assert code_sim_score("\n\nx = 1", "x = 1") == 1.0  # leading newlines are stripped first
    assert code_sim_score("```python\nreturn a + b\n```", "return a + b") == 1.0  # "`" lines skipped
    assert code_sim_score("// js comment\nfoo();", "foo();") == 1.0  # "//" lines skipped
    assert code_sim_score("abcd", "abce") == 0.75  # difflib 75 / 100 (indel agrees, see above)
    assert code_sim_score("", "x") == 0.0  # the empty line qualifies; ratio("", "x") = 0


def test_code_sim_similarity_default_is_difflib() -> None:
    assert code_sim_score("ccbcaa", "cbcbbbcc") == 0.43  # difflib 43 (see test_difflib_ratio_short_lines)
    assert code_sim_score("ccbcaa", "cbcbbbcc", similarity="indel") == 0.57
    assert code_sim_score(PRED_200, GOLD_200) == 0.02 == code_sim_score(PRED_200, GOLD_200, similarity="difflib")
    assert code_sim_score(PRED_200, GOLD_200, similarity="indel") == 0.99
    with pytest.raises(ValueError, match="similarity='levenshtein'.*'difflib'.*'indel'"):
        code_sim_score("x", "x", similarity="levenshtein")  # type: ignore[arg-type]


def test_code_sim_difflib_needs_no_thefuzz(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "thefuzz", None)  # any "import thefuzz" now raises ImportError
    assert code_sim_score("abcd", "abce") == 0.75
    with pytest.raises(ImportError):
        code_sim_score("abcd", "abce", similarity="indel")


def test_code_sim_fallbacks() -> None:
    # no qualifying line: LongBench scores "" -> ratio("", "x") = 0
    assert code_sim_score("#x", "x", fallback="longbench") == 0.0
    # REFINE scores the whole response. "#x" vs "x": difflib's only block is "x" (1, 0, 1), nothing left of it in
    # the gold -> M = 1, L = 3 -> 100 * 2/3 = 66.7 -> 67 (indel: LCS 1, the same)
    assert code_sim_score("#x", "x", fallback="refine") == 0.67
    assert code_sim_score("#x", "x", fallback="refine", similarity="indel") == 0.67
    # ... the *unmodified* response (leading "\n" kept): "\n#x" vs "x": M = 1, L = 4 -> 50 (indel: LCS 1, the same)
    assert code_sim_score("\n#x", "x", fallback="refine") == 0.5
    assert code_sim_score("\n#x", "x", fallback="refine", similarity="indel") == 0.5
    with pytest.raises(ValueError, match="fallback"):
        code_sim_score("x", "x", fallback="other")  # type: ignore[arg-type]


# --- RULER ---------------------------------------------------------------------------------------------------------


def test_ruler_qa_first_line_and_case() -> None:
    assert ruler_qa_score("Paris\nLondon", ["london"]) == 0.0  # only the first line counts
    assert ruler_qa_score("Paris\nLondon", ["paris"]) == 1.0
    assert ruler_qa_score("  The answer is PARIS.  ", ["paris"]) == 1.0  # case-insensitive substring
    assert ruler_qa_score("Paris", ["Rome", "paris"]) == 1.0  # any gold answer
    assert ruler_qa_score("Paris", []) == 0.0
    # the first-line cut comes before the strip: a leading newline leaves an empty first line
    assert ruler_qa_score("\nParis", ["paris"]) == 0.0


def test_ruler_control_characters() -> None:
    # tab -> newline after the first-line cut: "Paris\tFrance" is matched as "Paris\nFrance"
    assert ruler_clean("Paris\tFrance ") == "Paris\nFrance"
    assert ruler_qa_score("Paris\tFrance", ["Paris France"]) == 0.0
    assert ruler_qa_score("Paris\tFrance", ["France"]) == 1.0
    # NUL is no whitespace for str.strip but becomes "\n" and is then stripped
    assert ruler_clean("\x00Paris\r") == "Paris"


def test_string_match_all_and_part() -> None:
    text = "The special magic numbers are 123 and 456."
    assert string_match_all(text, ["123", "456", "789"]) == pytest.approx(2 / 3)  # 2 of 3 found
    assert string_match_all(text, ["123"]) == 1.0
    assert string_match_all("UUID: AB-CD", ["ab-cd"]) == 1.0  # case-insensitive
    assert string_match_part(text, ["789", "456"]) == 1.0  # any reference
    assert string_match_part(text, ["789"]) == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        string_match_all(text, [])
