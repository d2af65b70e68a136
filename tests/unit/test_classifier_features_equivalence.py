"""The fast feature extraction gives exactly the features of the original one.

The shipped builtin model was trained on features.extract as first written
(spec version 1). features.py was then rewritten for speed (fewer passes over
the text); the model stays valid only if every feature keeps its value for
every input. So this file keeps a verbatim copy of the original extraction
(`reference_extract`, below: slow but obviously the definition) and compares
the two on every prompt of the shared routing data, on hand-picked edge cases
(empty, long, unicode, code, lone surrogates, runs that overlap a pattern),
and on random strings drawn from the characters the features look at.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from terrace_router.classifier import Classifier, features
from terrace_router.classifier.features import FEATURE_NAMES, FEATURE_SPEC_VERSION, extract

DATA = Path(
    os.environ.get(
        "TERRACE_ROUTING_DATA",
        Path(__file__).resolve().parents[3] / "shared" / "data" / "routing" / "mmlu_routing.jsonl",
    )
)

# Features are counts, ratios and log1p of counts: the same integers give the
# same floats. A float sum in another order could differ in the last bit, so
# the comparison allows 1e-12 (the rewrite in fact matches bit for bit).
TOLERANCE = 1e-12


def assert_same_features(text: str) -> None:
    want = reference_extract(text)
    got = extract(text)
    assert len(got) == len(want) == len(FEATURE_NAMES)
    for name, g, w in zip(FEATURE_NAMES, got, want, strict=True):
        assert isinstance(g, float), (name, type(g))
        assert abs(g - w) <= TOLERANCE, (
            f"{name}: fast {g!r} != reference {w!r} for {text[:200]!r} ({len(text)} chars)"
        )


def test_the_reference_is_the_spec_the_builtin_model_was_trained_on() -> None:
    # The copy below is of spec version 1; a new spec needs a new reference.
    assert FEATURE_SPEC_VERSION == 1
    assert features.CLIP_HEAD == CLIP_HEAD and features.CLIP_TAIL == CLIP_TAIL


def test_every_prompt_of_the_shared_data() -> None:
    assert DATA.is_file(), (
        f"routing data not found at {DATA}; set TERRACE_ROUTING_DATA to mmlu_routing.jsonl"
    )
    # The records the file holds (one JSON object a line), counted apart from
    # the loop below, which must compare every one of them.
    records = sum(1 for line in DATA.read_bytes().split(b"\n") if line.strip())
    assert records > 0, f"{DATA} holds no prompts"
    if "TERRACE_ROUTING_DATA" not in os.environ:  # the shared data set: all of it
        assert records >= 11_755
    n = 0
    with DATA.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                assert_same_features(json.loads(line)["prompt"])
                n += 1
    assert n == records


EDGE_CASES = [
    "",
    " ",
    "\n",
    "a",
    "A",
    "9",
    ".",
    "?",
    "\u201c",
    "\ud800",
    "Ul",
    "hi",
    " " * 3000,
    "\t\r\n \x0b\x0c" * 500,
    "0123456789" * 1000,
    "x" * 10_000,
    "é" * 5000,
    "日本語のテキスト。" * 600,
    "\U0001f600 emoji " * 300,
    "\ud800\udc00 lone surrogates \udfff" * 10,
    "a" * 4095 + "\ud83d" + "b" * 4096,  # a surrogate at the clip boundary
    "y" * 4096,
    "y" * 4097,
    "Z" * 2047 + "\u201cq\u201c" + "Z" * 2049,
    # chains where matches of one pattern overlap (bytes.count does not count both)
    "1.2.3.4.5 v1.2.3 1,2,3,4 1/2/3 12/25/2020 9.9.9.9 1.2,3/4% 99999 1234",
    "Hello. World. Yes? No! Ok.\nNext? Fine.\n\nDone. Ul Ul\nUl",
    "Which of the following is NOT true? EXCEPT LEAST FALSE not except least false",
    "NOT. (NOT) -NOT- 'NOT' NOT's",
    "Statement 1 | The set of all 2x2 matrices is a group. Statement 2 | Every group "
    "of order 4 is cyclic.\nA. True, True\nB. False, False\nC. True, False\n"
    "D. False, True\nAnswer:",
    "Question?\nA) 1.5\nB) 2,000\nC) $3\nD) 4%\nAnswer:",
    "Q\nA. one\nB. two",  # two choices: not multiple choice
    "Stem \ud800 \u00e9 12?\nA. 1\nB. 2\u201c\nC. 3 \udfff\nAnswer:",  # non-ASCII stem
    "Q\nA. one\nB. two\nC. three\nAnswer: B\nAnswer:",
    "```python\ndef f(x):\n    return x\n```",
    "def f(): pass\nclass A: pass\nimport os",
    '#include <stdio.h>\nint main() { printf("hi"); return 0; };',
    "const f = (a) => a * 2; function(x){ return x; }",
    "public static void main(String[] args) {}",
    "SELECT * FROM t WHERE x = 1;",
    "myfunction(1); xpublic staticx; SELECTED ;",
    "Please implement a thread-safe LRU cache in Go and write unit tests, then a pull request.",
    "Prove the theorem rigorously, step by step; show your work; multi-step; trade-offs.",
    "hi, how are you? what's up? thanks, bye! good morning",
    "hello " * 30,  # chit-chat words past the length limit
    "I think my friend told me: calculate how many, how much, what is the value of x?",
    "Why? Explain and justify. Would it be best? Likely. If we suppose, assume, given...",
    "All of the above. None of the above. Both A and B. Both C. both d. Scenario 1 | "
    "Scenario 2 | Statement 1 Statement 2",
    "In 1999, 2024 and 31415 the rate was 12.5% (3/4 of 1,000).",
    "Tabs\tbefore\tUpper\tand\rCarriage\rReturn Lower",
    "\x00\x01\x1c\x1d\x1e\x1f\x7f\x80 control characters",
    "'quoted' \"double\" \u201ccurly\u201d |pipe| a|b",
    "UPPER CASE ONLY TEXT WITH NO LOWER LETTERS",
    "Don't won't can't it's O'Neil's",
    "=+*/^<>\\{}[]();_#" * 50,
]


@pytest.mark.parametrize("text", EDGE_CASES, ids=range(len(EDGE_CASES)))
def test_edge_cases(text: str) -> None:
    assert_same_features(text)


def test_clip_boundaries() -> None:
    for n in (4094, 4095, 4096, 4097, 4098, 5000, 8193):
        assert_same_features(("Ab1. " * 2000)[:n])
        assert_same_features(("x" * n)[:-3] + "NOT")


# Random strings over the characters and words the features react to, so
# that patterns touch, overlap and sit at the ends of the text.
_ALPHABET = (
    " \t\r\n\x0b\x0c.,;:?!/%\"'|#{}[]()_=+*^<>\\`-$&@~09AZazUl\u201c\u201d\u00e9\ud800\U0001f600"
)
_TOKENS = [
    "NOT",
    "not",
    "EXCEPT",
    "LEAST",
    "FALSE",
    "above",
    "all of the above",
    "Both A",
    "Statement 1",
    "Scenario 2",
    "I",
    "my",
    "how many",
    "how much",
    "what is the value",
    "which of the following",
    "Which",
    "write a function",
    "unit test",
    "pull request",
    "step by step",
    "show that",
    "design a",
    "trade offs",
    "how are you",
    "what's up",
    "hi",
    "hello",
    "code",
    "python",
    "prove",
    "def ",
    "class ",
    "import ",
    "```",
    "#include",
    "=>",
    "();",
    "){",
    ") {",
    "};",
    "function(",
    "public static",
    "SELECT ",
    "\nA. ",
    "\nB) ",
    "\nC. ",
    "\nD. ",
    "\nAnswer:",
    "1.5",
    "2,000",
    "3/4",
    "50%",
    "1999",
    "9.9.9",
    "Hello. ",
    "Yes? ",
    "No! ",
    "end.\n",
]
_text = st.lists(
    st.one_of(st.text(alphabet=_ALPHABET, max_size=6), st.sampled_from(_TOKENS)), max_size=60
).map("".join)


@settings(
    max_examples=3000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(_text)
def test_random_texts(text: str) -> None:
    assert_same_features(text)


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.text(max_size=200))
def test_arbitrary_unicode(text: str) -> None:
    assert_same_features(text)


def test_long_random_texts_around_the_clip() -> None:
    rng = __import__("random").Random(4)
    for _ in range(40):
        parts = [
            rng.choice(_TOKENS) if rng.random() < 0.3 else rng.choice(_ALPHABET)
            for _ in range(rng.randrange(1500, 3500))
        ]
        assert_same_features("".join(parts))


def test_score_equals_the_reference_path_in_every_thread() -> None:
    # score() (fast features, the encoder only where the shape allows it)
    # must give exactly what the model formula gives on the reference
    # features and a plain encoder run, also when threads score at once.
    from terrace_router.classifier.training import Inputs

    clf = Classifier.load("builtin")
    texts = EDGE_CASES + [
        json.loads(line)["prompt"]
        for line in DATA.read_text(encoding="utf-8").splitlines()[::97]
        if line.strip()
    ]

    def plain(text: str) -> float:
        x = np.array([reference_extract(text)], dtype=np.float64)
        e = (
            clf.encoder.embed([text])
            if clf.model.shape_weight(x)[0] > 0
            else np.zeros((1, clf.encoder.dim), dtype=np.float32)
        )
        return float(clf.model.score(Inputs(e, x))[0])

    want = [plain(t) for t in texts]
    assert [clf.score(t) for t in texts] == want
    got: dict[int, list[float]] = {}

    def work(i: int) -> None:
        got[i] = [clf.score(texts[(i + k) % len(texts)]) for k in range(len(texts))]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i in range(4):
        assert got[i] == [want[(i + k) % len(texts)] for k in range(len(texts))]


# --- The reference: features.extract of spec version 1, copied verbatim -----
# (from features.py as committed in 68d4053, before the speed-up). Do not
# "fix" or speed up anything below: it is the definition the model was
# trained on.

CLIP_HEAD = 2048
CLIP_TAIL = 2048

_DIGITS = b"0123456789"
_UPPER = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_MATH = b"=+*/^<>\\"
_CODE = b"{}[]();_#"
_SPACE = b" \t\r\n"


def _table(mapping: dict[bytes, bytes]) -> bytes:
    table = bytearray(range(256))
    for chars, to in mapping.items():
        for c in chars:
            table[c] = to[0]
    return bytes(table)


_PUNCT = bytes(c for c in range(33, 127) if not chr(c).isalnum() and chr(c) != "'")
# Punctuation (and tabs, CR, newlines) to spaces, for splitting into words.
_TO_WORDS = _table({_PUNCT + b"\t\r\n": b" "})
# The shape of the text: digits -> 9, upper -> U, lower -> l, rest kept; lets
# substring counts stand in for regexes ("9.9" is a decimal, " Ul" a
# capitalised word).
_TO_SHAPE = _table({_DIGITS: b"9", _UPPER: b"U", b"abcdefghijklmnopqrstuvwxyz": b"l"})

_CHOICE_SPLIT = re.compile(r"\n[A-J][.)] ")
_ANSWER_TAIL = "\nAnswer:"

# Word cues: a cue fires when one of its words is a word of the lower-cased
# prompt, or one of its phrases occurs (as whole words). One C-level
# frozenset.intersection over the prompt's words finds the words; a phrase
# is searched for only when its trigger word is among them. (A regex
# alternation over the same cues costs ten times more per call, and so does
# building a set of the prompt's words.)
_CUE_WORDS: dict[str, tuple[bytes, ...]] = {
    "first_person": (b"i", b"my", b"me"),
    "calculate": (b"calculate", b"compute", b"find"),
    "explain": (b"why", b"explain", b"justify"),
    "judgement": (b"would", b"should", b"best", b"likely"),
    "conditional": (b"if", b"suppose", b"assume", b"given"),
    "code": (
        b"implement",
        b"refactor",
        b"debug",
        b"traceback",
        b"stacktrace",
        b"segfault",
        b"python",
        b"javascript",
        b"typescript",
        b"golang",
        b"rust",
        b"java",
        b"sql",
        b"regex",
        b"json",
        b"yaml",
        b"api",
        b"function",
        b"script",
        b"compile",
        b"bug",
        b"code",
    ),
    "reasoning": (
        b"prove",
        b"proof",
        b"derive",
        b"derivation",
        b"theorem",
        b"lemma",
        b"rigorous",
        b"rigorously",
        b"formally",
        b"optimize",
        b"optimise",
        b"tradeoff",
        b"tradeoffs",
        b"analyze",
        b"analyse",
    ),
    "greeting": (
        b"hi",
        b"hello",
        b"hey",
        b"thanks",
        b"thank",
        b"bye",
        b"lol",
        b"morning",
        b"evening",
    ),
}
# (cue, trigger word, phrase): the phrase padded with spaces = whole words.
_CUE_PHRASES: tuple[tuple[str, bytes, bytes], ...] = (
    ("all_none_both", b"above", b" all of the above "),
    ("all_none_both", b"above", b" none of the above "),
    ("all_none_both", b"both", b" both a "),
    ("all_none_both", b"both", b" both b "),
    ("all_none_both", b"both", b" both c "),
    ("all_none_both", b"both", b" both d "),
    ("statement_scenario", b"statement", b" statement 1 "),
    ("statement_scenario", b"statement", b" statement 2 "),
    ("statement_scenario", b"scenario", b" scenario 1 "),
    ("statement_scenario", b"scenario", b" scenario 2 "),
    ("calculate", b"many", b" how many "),
    ("calculate", b"much", b" how much "),
    ("calculate", b"value", b" what is the value "),
    ("which_of_following", b"following", b" which of the following "),
    ("code", b"write", b" write a program "),
    ("code", b"write", b" write a function "),
    ("code", b"write", b" write a script "),
    ("code", b"write", b" write code "),
    ("code", b"unit", b" unit test"),
    ("code", b"pull", b" pull request "),
    ("reasoning", b"step", b" step by step "),
    ("reasoning", b"show", b" show that "),
    ("reasoning", b"show", b" show your work "),
    ("reasoning", b"show", b" show your reasoning "),
    ("reasoning", b"complexity", b" time complexity "),
    ("reasoning", b"design", b" design a "),
    ("reasoning", b"design", b" design an "),
    ("reasoning", b"trade", b" trade offs "),
    ("reasoning", b"step", b" multi step "),
    ("greeting", b"you", b" how are you "),
    ("greeting", b"up", b" what's up "),
)
_WORD_TO_CUE: dict[bytes, str] = {w: cue for cue, ws in _CUE_WORDS.items() for w in ws}
# Upper-case negations ("Which is NOT ..."): MMLU's trick questions.
_NEGATIONS: dict[bytes, bytes] = {
    b"not": b" NOT ",
    b"except": b" EXCEPT ",
    b"least": b" LEAST ",
    b"false": b" FALSE ",
}
_TRIGGERS = (
    frozenset(_WORD_TO_CUE) | frozenset(t for _, t, _ in _CUE_PHRASES) | frozenset(_NEGATIONS)
)
# Code pasted into the prompt itself, whatever the request says. The
# brace-language markers are searched only when the prompt has such
# punctuation at all (every search is a pass over the text).
_CODE_LINE_MARKERS = (b"```", b"\ndef ", b"\nclass ", b"\nimport ")
_CODE_MARKERS = (
    b"#include",
    b"=>",
    b"();",
    b"){",
    b") {",
    b"};",
    b"function(",
    b"public static",
    b"SELECT ",
)
_CODE_HINT = b"{};#"
_CHITCHAT_MAX_CHARS = 120


def clip(text: str) -> str:
    """Head and tail of a long text: what the features look at."""
    if len(text) <= CLIP_HEAD + CLIP_TAIL:
        return text
    return text[:CLIP_HEAD] + "\n" + text[-CLIP_TAIL:]


def _count(data: bytes, chars: bytes) -> int:
    # bytes.translate deletes in C: the count is the length difference.
    return len(data) - len(data.translate(None, chars))


def _cues(padded: bytes, words: list[bytes]) -> tuple[set[str], frozenset[bytes]]:
    hits = _TRIGGERS.intersection(words)
    found = {_WORD_TO_CUE[w] for w in hits if w in _WORD_TO_CUE}
    for cue, trigger, phrase in _CUE_PHRASES:
        if trigger in hits and cue not in found and phrase in padded:
            found.add(cue)
    return found, hits


def reference_extract(text: str) -> list[float]:
    """features.extract as it was before the speed-up (spec version 1)."""
    n_chars = len(text)
    t = clip(text)
    data = t.encode("utf-8", "replace")
    n_bytes = max(len(data), 1)
    spaced = b" " + data.translate(_TO_WORDS) + b" "
    lower = spaced.lower()
    word_list = lower.split()
    n_words = max(len(word_list), 1)
    shape = data.translate(_TO_SHAPE)
    nonspace = len(data) - _count(data, _SPACE)
    digits = _count(data, _DIGITS)
    # Counting in the UTF-8 bytes: memchr-fast, and the same counts as in str.
    sentences = 1 + data.count(b". ") + data.count(b"? ") + data.count(b"! ") + data.count(b".\n")

    parts = _CHOICE_SPLIT.split(t)
    stem = parts[0]
    is_mc = len(parts) >= 3
    if is_mc:
        choices = parts[1:]
        cut = choices[-1].rfind(_ANSWER_TAIL)  # MMLU-style prompts end "\nAnswer:"
        if cut >= 0:
            choices[-1] = choices[-1][:cut]
        lens = [len(c) for c in choices]
        mean = sum(lens) / len(lens)
        std = math.sqrt(sum((x - mean) ** 2 for x in lens) / len(lens))
        longest = max(lens)
        numeric = sum(1 for c in choices if _is_numeric(c)) / len(choices)
    else:
        mean = std = longest = numeric = 0.0
    stem_bytes = stem.encode("utf-8", "replace")
    stem_digit_frac = _count(stem_bytes, _DIGITS) / max(len(stem_bytes), 1)

    cues, hits = _cues(lower, word_list)
    lines = b"\n" + data
    code = (
        "code" in cues
        or any(m in lines for m in _CODE_LINE_MARKERS)
        or (_count(data, _CODE_HINT) > 0 and any(m in data for m in _CODE_MARKERS))
    )
    chitchat = "greeting" in cues and n_chars <= _CHITCHAT_MAX_CHARS
    negation = any(_NEGATIONS[w] in spaced for w in hits if w in _NEGATIONS)
    capitalized = shape.count(b" Ul") + shape.count(b"\nUl") + shape.startswith(b"Ul")
    decimals = shape.count(b"9.9") + shape.count(b"9,9") + shape.count(b"9/9") + shape.count(b"9%")

    log1p = math.log1p
    return [
        log1p(n_chars),
        log1p(len(word_list)),
        nonspace / n_words,
        log1p(stem.count("\n")),  # answer-choice lines excluded: MMLU always has them
        log1p(sentences),
        log1p(len(word_list) / sentences),
        digits / n_bytes,
        log1p(digits),
        log1p(_count(data, _MATH)),
        log1p(_count(data, _CODE)),
        _count(data, _UPPER) / n_bytes,
        log1p(data.count(b",")),
        log1p(data.count(b"?")),
        log1p(data.count(b'"') + data.count("\u201c".encode())),
        log1p(data.count(b"|")),
        log1p(decimals),
        capitalized / n_words,
        1.0 if is_mc else 0.0,
        log1p(len(stem)),
        log1p(mean),
        log1p(std),
        log1p(longest),
        numeric,
        stem_digit_frac,
        1.0 if negation else 0.0,
        1.0 if "all_none_both" in cues else 0.0,
        1.0 if "statement_scenario" in cues else 0.0,
        1.0 if "first_person" in cues else 0.0,
        1.0 if "calculate" in cues else 0.0,
        1.0 if "explain" in cues else 0.0,
        1.0 if b"9999" in shape else 0.0,
        1.0 if "judgement" in cues else 0.0,
        1.0 if "conditional" in cues else 0.0,
        1.0 if "which_of_following" in cues else 0.0,
        1.0 if code else 0.0,
        1.0 if "reasoning" in cues else 0.0,
        1.0 if chitchat else 0.0,
    ]


_NUMERIC_CHARS = b"0123456789 .,-+$%/()"


def _is_numeric(choice: str) -> bool:
    b = choice.strip().encode("utf-8", "replace")
    return bool(b) and not b.translate(None, _NUMERIC_CHARS) and _count(b, _DIGITS) > 0
