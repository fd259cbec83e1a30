"""What the judge is asked, and how its replies are read.

Three prompts, each one named constant:

* LINK_PROMPT (paper section 4.3, appendix C): the documents on which two features fire,
  activating tokens marked <<like this>>; is one a more specific case of the other?
  The wording follows the paper's system prompt; the reply is asked for as JSON (the
  paper's "HaveRelationship: Yes / Confidence: High" form is read as well).
* EXPLAIN_PROMPT and DETECT_PROMPT: the explain-then-detect AutoInterp score of SAEBench,
  which the paper's appendix G.2 reports: the judge writes a short label from some of a
  feature's documents, then, given only the label, picks which of a shuffled mix of the
  feature's held-out documents and other features' documents it fires on.

Replies are read leniently: JSON in or out of code fences, <think> blocks skipped, plain
"Yes" / "No" with a confidence. A reply that still says neither is None (unreadable).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

Message = dict[str, str]
V = TypeVar("V")

REPAIR_TURNS = 1
"""How many times an unreadable reply is asked again before it is recorded as unreadable."""


@dataclass(frozen=True)
class Prompt:
    system: str
    user: str
    """A str.format template for the user turn."""
    repair: str
    """Sent after an unreadable reply, with that reply as the assistant's turn."""


LINK_PROMPT = Prompt(
    system=(
        "We're studying neurons in a sparse autoencoder (SAE) trained on a language model's "
        "activations. Each neuron activates on specific words, substrings or concepts in short "
        "documents; in each document the words it activates on are marked as <<word>>.\n\n"
        "You will be given two sets of documents: those on which Neuron A activates and those "
        "on which Neuron B activates. Compare the activation patterns of the two neurons and "
        "decide whether there is a parent-child relationship between them. A parent-child "
        "relationship means that one neuron's activating concept (the child) is a subset or a "
        "more specific version of the other neuron's activating concept (the parent). Either "
        "neuron may be the parent.\n\n"
        "Analyze the examples and reply with exactly one JSON object and nothing else:\n"
        '{"relationship": "yes" or "no", "confidence": "high", "medium" or "low"}'
    ),
    user=(
        "Here are the activating documents for Neuron A:\n{a}\n\n"
        "And for Neuron B:\n{b}\n\n"
        "Based on these documents, do Neuron A and Neuron B have a parent-child relationship?"
    ),
    repair=(
        "Your reply could not be read. Answer again with exactly one JSON object and nothing "
        'else: {"relationship": "yes" or "no", "confidence": "high", "medium" or "low"}'
    ),
)

EXPLAIN_PROMPT = Prompt(
    system=(
        "We're studying neurons in a sparse autoencoder (SAE) trained on a language model's "
        "activations. Each neuron activates on some particular words, substrings or concept in "
        "short documents; the words it activates on are marked as <<word>>. You will see "
        "documents on which one neuron activates, the most strongly activating first.\n\n"
        "Describe what the neuron activates on in a short label of at most 12 words. The label "
        "should cover most of the marked words, not just one of them; do not be overly "
        "specific, and mention capitalisation or punctuation only if it matters.\n\n"
        'Reply with exactly one JSON object and nothing else: {"label": "<your label>"}'
    ),
    user="The documents on which the neuron activates:\n{documents}",
    repair=(
        "Your reply could not be read. Answer again with exactly one JSON object and nothing "
        'else: {"label": "<your label>"}'
    ),
)

DETECT_PROMPT = Prompt(
    system=(
        "We're studying neurons in a sparse autoencoder (SAE) trained on a language model's "
        "activations. Each neuron activates on some particular words, substrings or concept in "
        "short documents. You will be given a short explanation of what one neuron activates "
        "on, then numbered documents in random order. Decide on which documents the neuron "
        "activates, on at least one word. Do not read the explanation too narrowly. If it "
        "activates on none of them, give an empty list.\n\n"
        "Reply with exactly one JSON object and nothing else: "
        '{"active": [the numbers of the documents]}'
    ),
    user=(
        "Explanation: {label}\n\nDocuments:\n{documents}\n\n"
        "On which documents does the neuron activate?"
    ),
    repair=(
        "Your reply could not be read. Answer again with exactly one JSON object and nothing "
        'else: {"active": [the numbers of the documents]}'
    ),
)


def numbered(texts: list[str]) -> str:
    """Documents one per line, numbered from 1, whitespace runs folded to one space."""
    return "\n".join(f"{i}. {' '.join(text.split())}" for i, text in enumerate(texts, start=1))


def messages(prompt: Prompt, **fields: str) -> list[Message]:
    return [
        {"role": "system", "content": prompt.system},
        {"role": "user", "content": prompt.user.format(**fields)},
    ]


def repaired(prompt: Prompt, sent: list[Message], reply: str) -> list[Message]:
    """The conversation asking again after the unreadable ``reply``."""
    return [
        *sent,
        {"role": "assistant", "content": reply},
        {"role": "user", "content": prompt.repair},
    ]


# ------------------------------------------------------------------ reading replies


@dataclass(frozen=True)
class Verdict:
    related: bool
    confidence: str | None
    """"high", "medium", "low" or None when the reply gave none."""


_THINK = re.compile(r"<think>.*?(</think>|$)", re.S | re.I)
_FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)```", re.S)
_YES, _NO = ("yes", "y", "true"), ("no", "n", "false")
_VERDICT_KEYS = ("relationship", "haverelationship", "has_relationship", "answer", "verdict")


def _clean(text: str) -> str:
    """Drop reasoning blocks some models (Qwen3, DeepSeek-R1) emit before their answer."""
    return _THINK.sub("", text).strip()


def _json_value(text: str) -> object | None:
    """The first JSON object or list found in ``text``: fenced, whole, or embedded."""
    candidates = [*_FENCE.findall(text), text]
    for start, end in (("{", "}"), ("[", "]")):
        if start in text and end in text:
            candidates.append(text[text.index(start) : text.rindex(end) + 1])
    for candidate in candidates:
        try:
            return json.loads(candidate.strip())
        except ValueError:
            continue
    return None


def _yes_no(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().strip(".!").lower()
        return True if word in _YES else False if word in _NO else None
    return None


def _confidence(value: object) -> str | None:
    """high / medium / low; a number (0-1 or 0-100) is binned in thirds."""
    if isinstance(value, str):
        word = value.strip().strip(".").lower()
        if word in ("high", "medium", "low"):
            return word
        value = word.rstrip("%")
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    x = x / 100 if x > 1 else x
    return "high" if x >= 2 / 3 else "medium" if x >= 1 / 3 else "low"


def parse_verdict(text: str) -> Verdict | None:
    """Yes / no and the confidence from a link reply, or None when it says neither."""
    text = _clean(text)
    data = _json_value(text)
    if isinstance(data, dict):
        lower = {str(k).lower().replace(" ", ""): v for k, v in data.items()}
        for key in _VERDICT_KEYS:
            related = _yes_no(lower.get(key))
            if related is not None:
                return Verdict(related, _confidence(lower.get("confidence")))
    # Plain text: the paper's "HaveRelationship: Yes", or a lone yes or no.
    named = re.search(r"relationship\W*(yes|no)\b", text, re.I)
    words = {w.lower() for w in re.findall(r"\b(yes|no)\b", text, re.I)}
    if named:
        related = named.group(1).lower() == "yes"
    elif len(words) == 1:
        related = words == {"yes"}
    else:
        return None
    level = re.search(r"confidence\W*(high|medium|low|\d+(?:\.\d+)?%?)", text, re.I)
    return Verdict(related, _confidence(level.group(1)) if level else None)


def parse_label(text: str) -> str | None:
    """A feature's label: the JSON "label", else the first line of plain text."""
    text = _clean(text)
    data = _json_value(text)
    if isinstance(data, dict):
        label = data.get("label")
        return " ".join(label.split())[:200] if isinstance(label, str) and label.strip() else None
    for line in _FENCE.sub(lambda m: m.group(1), text).splitlines():
        line = re.sub(r"^\s*(label|explanation)\s*:\s*", "", line, flags=re.I).strip(" \"'`*")
        if line and line[0] not in "{[":
            return line[:200]
    return None


def parse_active(text: str, n: int) -> set[int] | None:
    """The document numbers (1..n) a detection reply names, or None if it is unreadable."""
    text = _clean(text)
    data = _json_value(text)
    if isinstance(data, dict):
        data = data.get("active")
    if isinstance(data, list):
        values = data
    elif re.fullmatch(r"none\.?", text, re.I):
        values = []
    elif re.fullmatch(r"[\d\s,;.]+", text):
        values = re.findall(r"\d+", text)
    else:
        return None
    try:
        picked = {int(v) for v in values}
    except (TypeError, ValueError):
        return None
    return picked if all(1 <= v <= n for v in picked) else None


# ------------------------------------------------------------------ asking


class Completer(Protocol):
    def complete(self, messages: list[Message]) -> str: ...


def ask(
    client: Completer, prompt: Prompt, sent: list[Message], read: Callable[[str], V | None]
) -> tuple[V | None, str]:
    """The judge's reply read by ``read`` (None if still unreadable after REPAIR_TURNS
    reminders of the format), and the reply's text."""
    reply = client.complete(sent)
    for _ in range(REPAIR_TURNS):
        value = read(reply)
        if value is not None:
            return value, reply
        sent = repaired(prompt, sent, reply)
        reply = client.complete(sent)
    return read(reply), reply


def check_readable(
    records: list[dict], unreadable: Callable[[dict], bool], max_share: float, what: str
) -> None:
    """Stop when none, or too many, of the judge's replies could be read: an endpoint that
    never answers in the asked form must not produce a report."""
    bad = [r for r in records if unreadable(r)]
    if bad and (len(bad) == len(records) or len(bad) > max_share * len(records)):
        raise ValueError(
            f"{len(bad)} of {len(records)} judge replies about {what} could not be read "
            f"(limit: --max_unreadable {max_share:g}); the first: {bad[0]['reply'][:120]!r}"
        )
