"""Feature extraction for the complexity classifier: a fixed vector of handcrafted features.

Why handcrafted and not n-grams: the classifier must generalise to subjects
(and kinds of prompt) it never saw. On the shared MMLU data, word features
learn topics, and topics do not transfer to held-out subjects (measured: they
did not raise the subject-held-out APGR); shape features (length, digits,
math symbols, multiple-choice structure, question cues) do.

Two groups:

- shape (LEARNED_FEATURES): sizes, character classes, answer-choice
  structure, question cues. Besides feeding the model, their training
  range says whether a prompt has the training data's shape at all
  (training.ScoreModel.shape_weight);
- task cues (ANCHORED_FEATURES): a code request or pasted code, a proof /
  derivation / design request, short chit-chat. The model learns their
  weights like the others where the data has them; the domain-free prior
  shifts by fixed amounts for them (ANCHORED_PRIOR_SHIFT), encoding that
  small models fail at code and multi-step proofs and handle greetings fine.
  The words are English; a cue in another language does not fire.

Everything here is pure Python over C-implemented string/bytes/regex calls
(no per-character Python loops), and each pass over the text is paid for:
the router scores every request, and a chat prompt is scored from these
features alone (tens of microseconds for 2,000 characters). Patterns are
counted on a translated "shape" of the text where merged character classes
let one pass stand for several; rare patterns and characters are searched
for only when a cheaper check (a one-byte memchr, a word already found, a
digit count) says they can occur. Where a fast path stands for its definition, a comment says why it
is the same; tests/unit/test_classifier_features_equivalence.py
keeps the original, plainer extraction and checks the two agree exactly on
the shared data, edge cases and random text.

Bump FEATURE_SPEC_VERSION whenever a feature's definition changes: a model's
metadata records the version it was trained with, and loading refuses a
mismatch. A pure speed change must instead keep every value identical (the
equivalence test is the proof).
"""

from __future__ import annotations

import math
import re

FEATURE_SPEC_VERSION = 1

# Long prompts are read on their head and tail, which bounds the cost per
# call; lengths still use the full text. This module owns the clipping: the
# router hands the classifier the whole prompt, and training reads the same
# prompts through the same functions (clip, encoder_text).
CLIP_HEAD = 2048
CLIP_TAIL = 2048
# The sentence encoder reads 48 word pieces (~220 characters of English): the
# head and the tail of the prompt, where the task and the question are
# (measured on leave-subjects-out folds: +0.009 APGR over the head alone).
ENCODER_HEAD = 110
ENCODER_TAIL = 110

LEARNED_FEATURES: tuple[str, ...] = (
    "log_chars", "log_words", "avg_word_len", "log_stem_newlines", "log_sentences",
    "log_words_per_sentence", "digit_frac", "log_digits", "log_math_symbols",
    "log_code_symbols", "upper_frac", "log_commas", "log_question_marks", "log_quotes",
    "log_pipes", "log_numbers_with_decimals", "capitalized_frac",
    "is_multiple_choice", "log_stem_chars", "log_mean_choice_chars", "log_std_choice_chars",
    "log_max_choice_chars", "numeric_choice_frac", "stem_digit_frac",
    "cue_negation", "cue_all_none_both", "cue_statement_scenario", "cue_first_person",
    "cue_calculate", "cue_explain", "has_4digit_number", "cue_judgement", "cue_conditional",
    "cue_which_of_following",
)
ANCHORED_FEATURES: tuple[str, ...] = ("task_code", "task_multistep_reasoning", "task_chitchat")
FEATURE_NAMES: tuple[str, ...] = LEARNED_FEATURES + ANCHORED_FEATURES
N_LEARNED = len(LEARNED_FEATURES)
N_FEATURES = len(FEATURE_NAMES)

# The task cues' shift of the domain-free prior (training.ScoreModel.prior), in units of
# expected gain E[large correct - small correct] in [-1, 1]: what the prior
# says where the learned model is not trusted (prompts unlike the training
# data, such as chat or code requests when it was trained on exam questions).
ANCHORED_PRIOR_SHIFT: dict[str, float] = {
    "task_code": 0.4,
    "task_multistep_reasoning": 0.4,
    "task_chitchat": -0.4,
}

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
# The same, lower-cased in the same pass (the table's values lower-cased):
# the words and the phrases are matched in lower case.
_TO_WORDS_LOWER = _TO_WORDS.lower()

# The shape of the text, for patterns that would otherwise need regexes
# ("9.9" is a decimal, " Ul" a capitalised word): digits -> 9, upper -> U,
# lower -> l; '.', ',', '/', '%' kept; every other byte -> NUL, except:
# space and newline both -> ' '. Both start a capitalised word and end a
# sentence after '.', so one count of " Ul" (or ". ") is the count of " Ul"
# plus that of "\nUl" in the text: neither pattern can overlap itself or the
# other, so the merged count is the sum of the separate ones. Tab and CR ->
# '\t', whitespace (for the space count) but no such boundary.
_TO_SHAPE = _table({
    bytes(range(256)): b"\0",  # applied first: the entries below win
    _DIGITS: b"9", _UPPER: b"U", b"abcdefghijklmnopqrstuvwxyz": b"l",
    b" \n": b" ", b"\t\r": b"\t", b".": b".", b",": b",", b"/": b"/", b"%": b"%",
})
# (pattern in the shape, a character it needs: no search without it)
_DECIMALS: tuple[tuple[bytes, bytes], ...] = (
    (b"9.9", b"."), (b"9,9", b","), (b"9/9", b"/"), (b"9%", b"%"),
)

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
    "code": (b"implement", b"refactor", b"debug", b"traceback", b"stacktrace", b"segfault",
             b"python", b"javascript", b"typescript", b"golang", b"rust", b"java", b"sql",
             b"regex", b"json", b"yaml", b"api", b"function", b"script", b"compile", b"bug",
             b"code"),
    "reasoning": (b"prove", b"proof", b"derive", b"derivation", b"theorem", b"lemma",
                  b"rigorous", b"rigorously", b"formally", b"optimize", b"optimise",
                  b"tradeoff", b"tradeoffs", b"analyze", b"analyse"),
    "greeting": (b"hi", b"hello", b"hey", b"thanks", b"thank", b"bye", b"lol", b"morning",
                 b"evening"),
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
    b"not": b" NOT ", b"except": b" EXCEPT ", b"least": b" LEAST ", b"false": b" FALSE ",
}
# A trigger word's phrases, so that only the phrases of words present are
# searched for (each search is a pass over the text).
_PHRASES_OF: dict[bytes, tuple[tuple[str, bytes], ...]] = {
    trigger: tuple((c, p) for c, t, p in _CUE_PHRASES if t == trigger)
    for _, trigger, _ in _CUE_PHRASES
}
# Code pasted into the prompt itself, whatever the request says. Every
# marker search is a pass over the text, so each runs only when what it
# needs occurs: a line marker ("\ndef ") only when its word is a word of the
# prompt (newline and space both split words), and the brace-language
# markers only when the prompt has such punctuation at all, and each only
# when all of its punctuation does (a one-byte `in` is a memchr).
_CODE_LINE_MARKERS: tuple[tuple[bytes, bytes], ...] = (  # (its word, marker)
    (b"def", b"\ndef "), (b"class", b"\nclass "), (b"import", b"\nimport "),
)
_CODE_MARKERS = (b"#include", b"=>", b"();", b"){", b") {", b"};", b"function(",
                 b"public static", b"SELECT ")
_MARKER_PUNCT = frozenset(b"".join(_CODE_MARKERS)) & frozenset(_PUNCT)
_GATED_CODE_MARKERS: tuple[tuple[bytes, frozenset[int]], ...] = tuple(
    (m, frozenset(m) & _MARKER_PUNCT) for m in _CODE_MARKERS
)
_TRIGGERS = (frozenset(_WORD_TO_CUE) | frozenset(_PHRASES_OF) | frozenset(_NEGATIONS)
             | frozenset(w for w, _ in _CODE_LINE_MARKERS))
_CHITCHAT_MAX_CHARS = 120


def clip(text: str) -> str:
    """Head and tail of a long text: what the features look at."""
    if len(text) <= CLIP_HEAD + CLIP_TAIL:
        return text
    return text[:CLIP_HEAD] + "\n" + text[-CLIP_TAIL:]


def encoder_text(text: str) -> str:
    """What the sentence encoder reads of a prompt: its head and tail, as valid
    UTF-8 (a lone surrogate, which JSON can carry, becomes '?')."""
    if len(text) > ENCODER_HEAD + ENCODER_TAIL:
        text = text[:ENCODER_HEAD] + "\n" + text[-ENCODER_TAIL:]
    return text.encode("utf-8", "replace").decode("utf-8")


def _count(data: bytes, chars: bytes) -> int:
    # bytes.translate deletes in C: the count is the length difference.
    return len(data) - len(data.translate(None, chars))


def _cues(padded: bytes, words: list[bytes]) -> tuple[set[str], frozenset[bytes]]:
    hits = _TRIGGERS.intersection(words)
    found = {_WORD_TO_CUE[w] for w in hits if w in _WORD_TO_CUE}
    for w in hits:
        for cue, phrase in _PHRASES_OF.get(w, ()):
            if cue not in found and phrase in padded:
                found.add(cue)
    return found, hits


def _pasted_code(data: bytes, hits: frozenset[bytes]) -> bool:
    if b"`" in data and b"```" in data:
        return True
    for word, marker in _CODE_LINE_MARKERS:
        # `marker in b"\n" + data`, without copying the text
        if word in hits and (marker in data or data.startswith(marker[1:])):
            return True
    if not (b"{" in data or b"}" in data or b";" in data or b"#" in data):
        return False
    present = {c for c in _MARKER_PUNCT if c in data}
    return any(marker in data for marker, needs in _GATED_CODE_MARKERS if needs <= present)


def extract(text: str) -> list[float]:
    """The feature vector of one prompt, in FEATURE_NAMES order."""
    n_chars = len(text)
    t = clip(text)
    data = t.encode("utf-8", "replace")
    n_bytes = max(len(data), 1)
    # Counting in the UTF-8 bytes: the same counts as in str, at C speed.
    shape = data.translate(_TO_SHAPE)
    digits = shape.count(b"9")
    space = shape.count(b" ") + (shape.count(b"\t") if b"\t" in shape else 0)
    nonspace = len(data) - space
    lower = (b" " + data + b" ").translate(_TO_WORDS_LOWER)
    word_list = lower.split()
    n_words = max(len(word_list), 1)
    questions = data.count(b"?")
    # ". " in the shape = ". " and ".\n" in the text (see _TO_SHAPE); "? "
    # and "! " are searched for only when there is a '?' or a '!'.
    sentences = (1 + shape.count(b". ")
                 + (data.count(b"? ") if questions else 0)
                 + (data.count(b"! ") if b"!" in data else 0))

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
        # A numeric choice has a digit: none in the text, none numeric.
        numeric = sum(1 for c in choices if _is_numeric(c)) / len(choices) if digits else 0.0
    else:
        mean = std = longest = numeric = 0.0
    # The stem is a prefix of the text, so its bytes are a prefix of `data`
    # (UTF-8, and 'replace', work code point by code point).
    stem_len = len(stem.encode("utf-8", "replace"))
    stem_digits = digits if stem_len == len(data) else shape.count(b"9", 0, stem_len)
    stem_digit_frac = stem_digits / max(stem_len, 1)

    cues, hits = _cues(lower, word_list)
    code = "code" in cues or _pasted_code(data, hits)
    chitchat = "greeting" in cues and n_chars <= _CHITCHAT_MAX_CHARS
    negation = False
    for w in hits:
        # " NOT " as a whole word needs "NOT" in the text: most prompts with
        # the word "not" have no upper-case one, and skip the translation.
        if w in _NEGATIONS and _NEGATIONS[w].strip() in data:
            spaced = b" " + data.translate(_TO_WORDS) + b" "
            negation = any(_NEGATIONS[n] in spaced for n in hits if n in _NEGATIONS)
            break
    # " Ul" counts both " Ul" and "\nUl" of the text (see _TO_SHAPE).
    capitalized = shape.count(b" Ul") + shape.startswith(b"Ul")
    # Numbers with a decimal point, comma, slash or percent need a digit and
    # their separator.
    decimals = 0
    if digits:
        for pattern, separator in _DECIMALS:
            if separator in data:
                decimals += shape.count(pattern)
    four_digits = digits >= 4 and b"9999" in shape
    # The rarer characters are counted only when present (a memchr).
    quotes = ((data.count(b'"') if b'"' in data else 0)
              + (0 if data.isascii() else data.count("\u201c".encode())))

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
        shape.count(b"U") / n_bytes,
        log1p(data.count(b",")),
        log1p(questions),
        log1p(quotes),
        log1p(data.count(b"|") if b"|" in data else 0),
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
        1.0 if four_digits else 0.0,
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


def feature_spec() -> dict:
    """What a model's metadata records about the features it was trained on."""
    return {
        "version": FEATURE_SPEC_VERSION,
        "names": list(FEATURE_NAMES),
        "n_learned": N_LEARNED,
        "prior_shifts": dict(ANCHORED_PRIOR_SHIFT),
        "clip_head_chars": CLIP_HEAD,
        "clip_tail_chars": CLIP_TAIL,
        "encoder_head_chars": ENCODER_HEAD,
        "encoder_tail_chars": ENCODER_TAIL,
    }
