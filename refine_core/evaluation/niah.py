"""RULER needle-in-a-haystack (NIAH) tasks, generated under any tokenizer (spec §5.2).

The eight tasks and their templates follow NVIDIA RULER's ``synthetic.yaml`` / ``niah.py`` as packaged by
lm-evaluation-harness (``tasks/ruler/prepare_niah.py``), which the paper's Table A used:

========================  ========  ========  ========  ======  ========  =========
task                      haystack  key       value     #keys   #values   #queried
========================  ========  ========  ========  ======  ========  =========
niah_single_1             noise     words     numbers   1       1         1
niah_single_2             essay     words     numbers   1       1         1
niah_single_3             essay     words     uuids     1       1         1
niah_multikey_1           essay     words     numbers   4       1         1
niah_multikey_2           needle    words     numbers   1       1         1
niah_multikey_3           needle    uuids     uuids     1       1         1
niah_multiquery           essay     words     numbers   4       1         4
niah_multivalue           essay     words     numbers   1       4         1
========================  ========  ========  ========  ======  ========  =========

* needle: "One of the special magic {type_needle_v} for {key} is: {value}."; the prompt is RULER's template with
  the answer prefix appended, singularised ("A special magic number ...", "What is ...", "... is") when one value
  is asked for, as RULER does. Noise and needle haystacks are lines joined by "\\n" (``needle``: a haystack made of
  distractor needles with random keys and values); essay haystacks are sentences joined by " ".
* **Essay haystack (differs from RULER):** RULER uses Paul Graham's essays, which are not available offline. The
  essay-like text here comes from :func:`essay_sentences`, a fixed, self-contained sentence generator (a small
  grammar over startup/programming/writing vocabulary, no digits, never the word "magic"). Like RULER's essay it
  is the same text for every example (its first N sentences), so only the needles vary. Scores on ``essay`` tasks
  are therefore comparable across our own runs, not to numbers measured on the real essays.
* **Keys (differs from RULER):** "adjective-noun" words from built-in lists (RULER draws from wonderwords' larger
  lists). Distractor keys and values never repeat a queried key or gold value.
* **Depth:** with a depth grid, every queried needle is inserted as one block at ``round(depth * N)`` haystack
  units (depth 0: before the first unit, 1: after the last) and distractor needles (multikey_1) at random
  depths. With ``depths=None`` every needle gets its own random depth as in RULER (essay: sampled without
  replacement from RULER's 40-point grid :data:`RULER_DEPTHS`) and the recorded depth is that of the first
  answer's needle.
* **Length:** the number of haystack units N is the largest for which the whole prompt has at most
  ``length_tokens - reserve_tokens`` tokens under the given tokenizer (galloping + binary search; every returned
  prompt was measured). ``reserve_tokens`` defaults to RULER's ``tokens_to_generate`` (128), so a 4096 prompt is
  sized as lm-eval sizes its ``max_seq_lengths=4096`` samples.

Everything is deterministic per ``seed`` (string-seeded :class:`random.Random`, independent of ``PYTHONHASHSEED``).
"""

from __future__ import annotations

import logging
import math
import random
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from refine_core.data.tasks import TaskExample

logger = logging.getLogger(__name__)

Haystack = Literal["noise", "essay", "needle"]
NeedleType = Literal["words", "numbers", "uuids"]

DEFAULT_LENGTHS: tuple[int, ...] = (4096, 8192, 16384)
DEFAULT_DEPTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
# RULER: DEPTHS = np.round(np.linspace(0, 100, 40)) percent; Python's round is half-to-even like numpy's.
RULER_DEPTHS: tuple[float, ...] = tuple(round(100 * i / 39) / 100 for i in range(40))
# RULER's tokens_to_generate for NIAH: the prompt is sized so that prompt + 128 <= max_seq_length.
RULER_GEN_TOKENS = 128

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


class TextTokenizer(Protocol):
    """Any tokenizer: only ``encode`` is called (to measure prompts); ``decode`` is part of the usual interface."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class NiahTaskConfig:
    """One RULER NIAH task (RULER ``synthetic.yaml``)."""

    haystack: Haystack
    key_type: NeedleType
    value_type: NeedleType
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1


NIAH_TASK_CONFIGS: dict[str, NiahTaskConfig] = {
    "niah_single_1": NiahTaskConfig("noise", "words", "numbers"),
    "niah_single_2": NiahTaskConfig("essay", "words", "numbers"),
    "niah_single_3": NiahTaskConfig("essay", "words", "uuids"),
    "niah_multikey_1": NiahTaskConfig("essay", "words", "numbers", num_keys=4),
    "niah_multikey_2": NiahTaskConfig("needle", "words", "numbers"),
    "niah_multikey_3": NiahTaskConfig("needle", "uuids", "uuids"),
    "niah_multiquery": NiahTaskConfig("essay", "words", "numbers", num_keys=4, num_queries=4),
    "niah_multivalue": NiahTaskConfig("essay", "words", "numbers", num_values=4),
}


def niah_groups() -> dict[str, tuple[str, ...]]:
    """Table A's columns -> NIAH tasks (spec §5.2; the grouping is the spec's inference): S, MK, MQ, MV."""
    return {
        "S": ("niah_single_1", "niah_single_2", "niah_single_3"),
        "MK": ("niah_multikey_1", "niah_multikey_2", "niah_multikey_3"),
        "MQ": ("niah_multiquery",),
        "MV": ("niah_multivalue",),
    }


@dataclass(frozen=True)
class NiahExample:
    """One generated NIAH prompt.

    Attributes:
        id: ``{task}:{length}:{depth|random}:{i}``.
        task: the task name.
        prompt: template, haystack with the needle(s), question and answer prefix (raw text, spec §1).
        references: the gold values (scored with ``string_match_all``).
        length: the requested length bucket (``length_tokens``), the Table A column.
        depth: where the queried needle(s) sit, as a fraction of the haystack (0 = start, 1 = end).
        prompt_tokens: the prompt's token count under the tokenizer it was sized for.
        query: the queried key(s) as they appear in the question.
    """

    id: str
    task: str
    prompt: str
    references: list[str]
    length: int
    depth: float
    prompt_tokens: int
    query: str = ""

    @property
    def answers(self) -> list[str]:
        """Alias of :attr:`references`, so that NIAH examples score like task-file examples."""
        return self.references

    def to_task_example(self, max_gen_tokens: int = 64) -> TaskExample:
        """The example as a :class:`TaskExample` (``extra`` keeps length, depth and prompt_tokens)."""
        return TaskExample(
            id=self.id, task=self.task, prompt=self.prompt, answers=list(self.references),
            max_gen_tokens=max_gen_tokens,
            extra={"length": self.length, "depth": self.depth, "prompt_tokens": self.prompt_tokens},
        )


# --- word lists (self-contained; keys are "adjective-noun" like RULER's wonderwords pairs) --------------------

_ADJECTIVES = (
    "abundant", "agreeable", "ancient", "bashful", "bitter", "blushing", "brave", "brief", "calm", "careful",
    "cheerful", "clumsy", "curious", "damp", "dazzling", "delicate", "eager", "elegant", "empty", "faint",
    "fancy", "fierce", "fragile", "frosty", "gentle", "gifted", "gleaming", "glossy", "grumpy", "hollow",
    "humble", "icy", "jolly", "keen", "lively", "lonely", "lucky", "mellow", "misty", "modest", "muddy",
    "nimble", "noisy", "obedient", "odd", "pale", "polite", "proud", "quaint", "quiet", "rapid", "rustic",
    "sandy", "shaggy", "shiny", "silent", "sleepy", "smoky", "snowy", "solid", "spicy", "steady", "stormy",
    "sturdy", "sunny", "swift", "tender", "tidy", "tiny", "vast", "velvet", "vivid", "wandering", "wary",
    "whispering", "wild", "witty", "wooden", "young", "zealous",
)
_NOUNS = (
    "acorn", "anchor", "apron", "attic", "badge", "bakery", "balcony", "barrel", "beacon", "blanket", "bonnet",
    "bottle", "bracelet", "bridge", "bucket", "cabin", "candle", "canyon", "carpet", "castle", "cellar",
    "chimney", "circus", "cliff", "compass", "cottage", "crayon", "crystal", "cushion", "dolphin", "drawer",
    "falcon", "feather", "ferry", "fiddle", "forest", "fountain", "galaxy", "garden", "glacier", "goblet",
    "harbor", "harvest", "helmet", "hammock", "island", "jacket", "kettle", "kitten", "ladder", "lantern",
    "lemon", "lighthouse", "locket", "lunchroom", "magnet", "meadow", "mirror", "mitten", "monastery", "mosaic",
    "napkin", "needle", "orchard", "otter", "paddle", "parcel", "pebble", "pepper", "piano", "pillow",
    "planet", "pocket", "puzzle", "quarry", "quilt", "rabbit", "ribbon", "saddle", "sailboat", "scarf",
    "shelter", "spoon", "squirrel", "stable", "teapot", "thimble", "tunnel", "umbrella", "valley", "violin",
    "wagon", "walrus", "whistle", "window", "yacht",
)

# --- essay-like haystack (stand-in for Paul Graham's essays, see the module docstring) -------------------------

_ESSAY_SEED = 20240521  # fixed: the essay is the same text in every run, like RULER's essay file
_TOPICS = (
    "startups", "programming", "writing", "good ideas", "ambition", "investors", "cities", "taste", "hackers",
    "schools", "essays", "design", "wealth", "procrastination", "languages", "users", "founders", "research",
    "curiosity", "big companies", "open source", "painting", "math", "conversation", "independent thinking",
)
_PEOPLE = (
    "founders", "programmers", "writers", "investors", "students", "painters", "hackers", "users", "teachers",
    "managers", "scientists", "readers", "engineers", "designers", "beginners", "experts",
)
_VERBS = (
    ("build", "builds"), ("notice", "notices"), ("explain", "explains"), ("ignore", "ignores"),
    ("change", "changes"), ("discover", "discovers"), ("avoid", "avoids"), ("choose", "chooses"),
    ("rewrite", "rewrites"), ("understand", "understands"), ("underestimate", "underestimates"),
    ("question", "questions"), ("solve", "solves"), ("copy", "copies"), ("learn", "learns"),
    ("make", "makes"), ("find", "finds"), ("test", "tests"), ("grow", "grows"), ("simplify", "simplifies"),
)
_OBJECTS = (
    "new ideas", "hard problems", "the obvious answer", "a small company", "the first version", "their own work",
    "the right questions", "unfashionable problems", "what users want", "the details", "a better tool",
    "the conventional wisdom", "a surprising result", "their own taste", "the next step", "a rough draft",
    "the whole system", "an unexpected market", "the boring parts", "a clear explanation",
)
_ADJ_ESSAY = (
    "strange", "surprising", "important", "hard", "easy", "rare", "common", "dangerous", "useful", "subtle",
    "obvious", "misleading", "valuable", "underrated", "simple", "difficult",
)
_ADVERBS = (
    "deliberately", "gradually", "quietly", "eventually", "almost by accident", "without planning it",
    "more than they expect", "in the beginning", "over time", "when nobody is watching",
)
_CONNECTIVES = ("In practice", "Usually", "Oddly enough", "As a rule", "For most people", "In the long run", "Often")
_SENTENCE_TEMPLATES = (
    "{People} who care about {topic} tend to {verb} {obj} {adv}.",
    "The {adj} thing about {topic} is that it {verbs} {obj}.",
    "{conn}, {people} {verb} {obj} because {topic} {verbs} {obj2}.",
    "If you want to {verb} {obj}, you should think about {topic} first.",
    "I used to think {topic} was {adj}, but now I think it is {adj2}.",
    "It is {adj} how often {people} {verb} {obj} without noticing.",
    "What {topic} really {verbs} is {obj}.",
    "There is no {adj} way to {verb} {obj}.",
    "Good {people} {verb} {obj} {adv}, and the rest {verb2} {obj2}.",
    "{Topic} is {adj} in a way that {obj} is not.",
    "Most of the time {people} {verb} {obj} {adv}.",
    "{conn}, the best way to {verb} {obj} is to start with {topic}.",
)
_essay_cache: list[str] = []
_essay_rng = random.Random(_ESSAY_SEED)


def _essay_sentence(rng: random.Random) -> str:
    verb, verbs = rng.choice(_VERBS)
    verb2, _ = rng.choice(_VERBS)
    people, topic = rng.choice(_PEOPLE), rng.choice(_TOPICS)
    text = rng.choice(_SENTENCE_TEMPLATES).format(
        people=people, People=people.capitalize(), topic=topic, Topic=topic.capitalize(), verb=verb, verbs=verbs,
        verb2=verb2, obj=rng.choice(_OBJECTS), obj2=rng.choice(_OBJECTS), adj=rng.choice(_ADJ_ESSAY),
        adj2=rng.choice(_ADJ_ESSAY), adv=rng.choice(_ADVERBS), conn=rng.choice(_CONNECTIVES),
    )
    return text[0].upper() + text[1:]


BUILTIN_HAYSTACK = "built-in essay-like text (refine_core.evaluation.niah; not RULER's Paul Graham essays)"


def haystack_sentences(path: str | Path) -> list[str]:
    """The sentences of a text file, for the ``essay`` haystack (RULER reads Paul Graham's essays this way).

    Raises:
        ValueError: the file has no sentence.
    """
    text = " ".join(Path(path).read_text(encoding="utf-8", errors="replace").split())
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    if not sentences:
        raise ValueError(f"eval.niah_haystack_file={str(path)!r} holds no sentence; give a text file of prose")
    return sentences


def essay_sentences(count: int) -> list[str]:
    """The first ``count`` sentences of the fixed essay-like haystack (same text in every call and run)."""
    while len(_essay_cache) < count:
        _essay_cache.append(_essay_sentence(_essay_rng))
    return _essay_cache[:count]


# --- needles and prompt assembly ---------------------------------------------------------------------------------


def _random_value(rng: random.Random, kind: NeedleType) -> str:
    if kind == "numbers":  # RULER: a 7-digit number
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _distinct_values(rng: random.Random, kind: NeedleType, count: int, avoid: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        value = _random_value(rng, kind)
        if value not in avoid:
            avoid.add(value)
            out.append(value)
    return out


def _type_words(cfg: NiahTaskConfig) -> tuple[str, str]:
    """(template, type_needle_v), singularised as RULER does when one value is asked for."""
    template, type_v = TEMPLATE + ANSWER_PREFIX, cfg.value_type
    if cfg.num_queries * cfg.num_values == 1:
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(old, new)
        type_v = type_v[:-1]
    return template, type_v


@dataclass
class _Plan:
    """Everything random about one example except the haystack size."""

    cfg: NiahTaskConfig
    template: str
    type_v: str
    query: str
    answers: list[str]
    needles: list[str]  # in insertion order (RULER shuffles them)
    fractions: list[float]  # insertion depth of each needle
    depth: float
    rng: random.Random
    reserved: frozenset[str]  # the example's own keys and values, which distractors never reuse
    distractors: list[str] = field(default_factory=list)  # the needle haystack, extended on demand
    essay: Sequence[str] = ()  # sentences of a user-supplied essay haystack (empty: the built-in text)

    def _fresh(self, kind: NeedleType) -> str:
        while (value := _random_value(self.rng, kind)) in self.reserved:
            pass
        return value

    def haystack(self, n: int) -> list[str]:
        if self.cfg.haystack == "noise":
            return [NOISE] * n
        if self.cfg.haystack == "essay":
            if self.essay:  # the user's text, repeated when a long haystack needs more of it
                return [self.essay[i % len(self.essay)] for i in range(n)]
            return essay_sentences(n)
        while len(self.distractors) < n:  # RULER's "needle" haystack: needles with random keys and values
            key, value = self._fresh(self.cfg.key_type), self._fresh(self.cfg.value_type)
            self.distractors.append(NEEDLE.format(type_needle_v=self.cfg.value_type, key=key, value=value))
        return self.distractors[:n]

    def prompt(self, n: int) -> str:
        units = self.haystack(n)
        slots: list[list[str]] = [[] for _ in range(n + 1)]  # slot p: needles right before unit p
        for needle, fraction in zip(self.needles, self.fractions, strict=True):
            slots[min(n, max(0, round(fraction * n)))].append(needle)
        parts: list[str] = []
        for p in range(n + 1):
            parts.extend(slots[p])
            if p < n:
                parts.append(units[p])
        context = (" " if self.cfg.haystack == "essay" else "\n").join(parts)
        return self.template.format(type_needle_v=self.type_v, context=context, query=self.query)


def _plan(cfg: NiahTaskConfig, rng: random.Random, depth: float | None) -> _Plan:
    num_keys = max(cfg.num_keys, cfg.num_queries)
    used: set[str] = set()
    keys = _distinct_values(rng, cfg.key_type, num_keys, used)
    values = [_distinct_values(rng, cfg.value_type, cfg.num_values, used) for _ in keys]
    queried = rng.sample(range(num_keys), cfg.num_queries)
    needles = [
        (k in queried, NEEDLE.format(type_needle_v=cfg.value_type, key=keys[k], value=value))
        for k in range(num_keys) for value in values[k]
    ]
    rng.shuffle(needles)
    answers = [value for k in queried for value in values[k]]
    queries = [keys[k] for k in queried]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    if depth is None:  # RULER: every needle at its own random depth
        if cfg.haystack == "essay":
            fractions = rng.sample(RULER_DEPTHS, len(needles))
        else:
            fractions = [rng.random() for _ in needles]
        first = next(i for i, (_, text) in enumerate(needles) if text.endswith(f" {answers[0]}."))
        recorded = fractions[first]
    else:  # the queried needles as one block at ``depth``, distractor needles anywhere
        fractions = [depth if target else rng.random() for target, _ in needles]
        recorded = depth
    template, type_v = _type_words(cfg)
    texts = [text for _, text in needles]
    return _Plan(cfg, template, type_v, query, answers, texts, fractions, recorded, rng, frozenset(used))


def _largest_fitting(fits: Callable[[int], bool], start: int, limit: int) -> int:
    """The largest n in [0, limit] with ``fits(n)``, searched from ``start``; 0 when nothing fits.

    Gallops away from ``start`` then bisects (assuming ``fits`` is monotone), so a good ``start`` costs two calls.
    """
    start = min(max(start, 0), limit)
    if fits(start):
        lo, step = start, 1
        while lo + step <= limit and fits(lo + step):
            lo, step = lo + step, step * 2
        hi = min(lo + step, limit + 1)
    else:
        hi, step = start, 1
        while hi - step > 0 and not fits(hi - step):
            hi, step = hi - step, step * 2
        lo = max(hi - step, 0)
    while hi - lo > 1:  # fits(lo) holds, hi fails or is limit + 1
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _fit(plan: _Plan, tokenizer: TextTokenizer, budget: int, guess: int | None) -> tuple[int, int]:
    """(haystack units, prompt tokens) of the largest prompt of ``plan`` within ``budget`` tokens.

    ``guess`` is the previous example's size (``None`` for the first: estimated from a small probe). When not
    even an empty haystack fits, returns ``(0, tokens of that prompt)``, which exceeds ``budget``.
    """
    counts: dict[int, int] = {}

    def count(n: int) -> int:
        if n not in counts:
            counts[n] = len(tokenizer.encode(plan.prompt(n)))
        return counts[n]

    if guess is None:
        probe = 8
        per_unit = max((count(probe) - count(0)) / probe, 1e-3)
        guess = int((budget - count(0)) / per_unit)
    limit = 4 * budget + 16  # any tokenizer spends well over 1/4 token per haystack unit
    n = _largest_fitting(lambda m: count(m) <= budget, guess, limit)
    if n == limit:
        raise ValueError("the NIAH prompt stops growing with the haystack under this tokenizer; check its encode().")
    return n, count(n)


def generate_niah(
    task: str,
    tokenizer: TextTokenizer,
    length_tokens: int,
    num_examples: int,
    depths: Sequence[float] | None = DEFAULT_DEPTHS,
    seed: int = 0,
    *,
    reserve_tokens: int = RULER_GEN_TOKENS,
    essay: Sequence[str] = (),
) -> list[NiahExample]:
    """Generate NIAH prompts of at most ``length_tokens - reserve_tokens`` tokens under ``tokenizer``.

    Args:
        task: one of :data:`NIAH_TASK_CONFIGS` (``niah_single_1`` ... ``niah_multivalue``).
        tokenizer: anything with ``encode(text) -> list[int]``.
        length_tokens: the length bucket (4096, 8192, 16384 in Table A).
        num_examples: examples **per depth** (per heatmap cell); with ``depths=None``, the total.
        depths: needle depths in [0, 1]; ``None`` places every needle at a random depth, as RULER does.
        seed: makes the output reproducible; different seeds give different keys, values and placements.
        reserve_tokens: room left for the answer (RULER sizes prompt + 128 generated tokens <= length).
        essay: sentences for the ``essay`` haystack (:func:`haystack_sentences`); empty: the built-in text.

    Returns:
        ``num_examples * len(depths)`` examples (depth-major), each measured to fit the budget.

    Raises:
        ValueError: unknown task, a depth outside [0, 1], or a budget too small for the template and needles.
    """
    cfg = NIAH_TASK_CONFIGS.get(task)
    if cfg is None:
        raise ValueError(f"unknown NIAH task {task!r}; use one of {', '.join(NIAH_TASK_CONFIGS)}.")
    budget = length_tokens - reserve_tokens
    if budget <= 0 or num_examples < 0:
        raise ValueError(
            f"length_tokens={length_tokens}, reserve_tokens={reserve_tokens}, num_examples={num_examples}: need "
            "length_tokens > reserve_tokens and num_examples >= 0."
        )
    if depths is not None:
        bad = [d for d in depths if not 0.0 <= d <= 1.0]
        if bad:
            raise ValueError(f"depths {bad} are outside [0, 1]; depths are fractions of the haystack (0.5 = middle).")
    cells: list[float | None] = list(depths) if depths is not None else [None]
    examples: list[NiahExample] = []
    guess: int | None = None
    for depth in cells:
        for i in range(num_examples):
            rng = random.Random(f"niah|{seed}|{task}|{length_tokens}|{depth!r}|{i}")
            plan = _plan(cfg, rng, depth)
            plan.essay = essay
            n, tokens = _fit(plan, tokenizer, budget, guess)
            if tokens > budget:
                raise ValueError(
                    f"{task}: the template, question and needles alone take {tokens} tokens, more than the budget "
                    f"{budget} (length_tokens={length_tokens} - reserve_tokens={reserve_tokens}); use a larger "
                    "length_tokens."
                )
            guess = n
            label = "random" if depth is None else f"{depth:g}"
            examples.append(NiahExample(
                id=f"{task}:{length_tokens}:{label}:{i}", task=task, prompt=plan.prompt(n),
                references=list(plan.answers), length=length_tokens, depth=float(plan.depth),
                prompt_tokens=tokens, query=plan.query,
            ))
    logger.debug("generated %d %s examples at %d tokens", len(examples), task, length_tokens)
    return examples


def generate_niah_suite(
    tokenizer: TextTokenizer,
    tasks: Iterable[str] = tuple(NIAH_TASK_CONFIGS),
    lengths: Iterable[int] = DEFAULT_LENGTHS,
    num_examples: int = 1,
    depths: Sequence[float] | None = DEFAULT_DEPTHS,
    seed: int = 0,
    *,
    reserve_tokens: int = RULER_GEN_TOKENS,
) -> list[NiahExample]:
    """:func:`generate_niah` for every task and length (task-major)."""
    return [
        example
        for task in tasks
        for length in lengths
        for example in generate_niah(task, tokenizer, length, num_examples, depths, seed, reserve_tokens=reserve_tokens)
    ]


def niah_summary(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Table A from per-example NIAH scores: group -> {str(length): score ×100, ..., "avg": mean over lengths}.

    Args:
        records: mappings with ``task``, ``length`` and ``score`` (in [0, 1]).

    Returns:
        For each group of :func:`niah_groups` and each length where all its tasks were scored, the mean over the
        group's tasks of each task's mean score, ×100; ``avg`` is the mean over those lengths (as Table A's Avg).
    """
    per_cell: dict[tuple[str, int], list[float]] = {}
    for rec in records:
        per_cell.setdefault((str(rec["task"]), int(rec["length"])), []).append(float(rec["score"]))
    lengths = sorted({length for _, length in per_cell})
    out: dict[str, dict[str, float]] = {}
    for group, names in niah_groups().items():
        row: dict[str, float] = {}
        for length in lengths:
            cells = [per_cell.get((name, length)) for name in names]
            if all(cells):
                row[str(length)] = 100.0 * math.fsum(math.fsum(c) / len(c) for c in cells if c) / len(names)
        if row:
            row["avg"] = math.fsum(row.values()) / len(row)
            out[group] = row
    return out
