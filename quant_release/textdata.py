"""Real English text for calibration, the FP8 fidelity probe and benchmark prompts.

Offline, the source is CPython's own reference documentation (`pydoc_data.topics`, ~465k characters
of prose and grammar that ship with every CPython). Its topics are split once, by a hash of the topic
name, into a calibration part and a held-out part, so the probe never sees calibration text.
Calibration sources (this text, cnn_dailymail, ...) are registered in quant_release/calibration/.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from typing import Literal

Split = Literal["calibration", "heldout"]


def _heldout_topic(name: str) -> bool:
    # About one topic in five is held out; by name hash so the split never depends on dict order.
    return hashlib.sha256(name.encode()).digest()[0] % 5 == 0


def python_docs(split: Split) -> list[str]:
    """CPython's reference topics for one split, in a stable (sorted) order."""
    from pydoc_data.topics import topics

    heldout = sorted(n for n in topics if _heldout_topic(n))
    if split == "heldout":
        return [topics[n] for n in heldout]
    # CPython files some texts under two names ("if" and "else"); keep those out of calibration when
    # one of the names is held out, so the probe never sees calibration text.
    heldout_texts = {topics[n] for n in heldout}
    return [topics[n] for n in sorted(topics) if not _heldout_topic(n) and topics[n] not in heldout_texts]


def token_windows(
    documents: Sequence[str],
    encode: Callable[[str], list[int]],
    count: int,
    length: int,
    seed: int,
    separator: Sequence[int] = (),
) -> list[list[int]]:
    """`count` windows of exactly `length` tokens cut from the documents' concatenated tokens.

    Windows are consecutive and non-overlapping after a seeded shuffle of the documents. When the
    text runs out, it is reused from the start (only for large requests; recorded by the caller
    through the token count and fingerprint).
    """
    if count <= 0:
        return []
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    needed = count * length
    for index in order:
        stream.extend(encode(documents[index]))
        stream.extend(separator)
        if len(stream) >= needed:
            break
    if not stream:
        raise ValueError("no text to cut windows from")
    while len(stream) < needed:
        stream.extend(stream[: needed - len(stream)])
    return [stream[i * length : (i + 1) * length] for i in range(count)]


def fingerprint_tokens(windows: Sequence[Sequence[int]]) -> str:
    digest = hashlib.sha256()
    for window in windows:
        digest.update(len(window).to_bytes(4, "little"))
        for token in window:
            digest.update(int(token).to_bytes(4, "little"))
    return digest.hexdigest()
