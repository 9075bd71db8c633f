"""Caption processing in ai-toolkit's order: dropout, trigger word, token shuffle.

What: :func:`process_caption` turns the caption read from disk into the text the model trains on
for one draw: with probability ``dropout_rate`` the caption becomes empty (so the model also
learns the trigger alone, which keeps classifier-free guidance meaningful); ``[trigger]`` is
replaced by the trigger word, which is prepended as ``"<trigger> "`` when absent; then, if
``shuffle``, the comma-separated tokens after the first ``keep_tokens`` are shuffled.

Why this order: it is ai-toolkit's, so a dataset tuned there trains the same here. A dropped
caption therefore still carries the trigger, and because the trigger is prepended with a space
(not a comma) it stays glued to the first token, so ``keep_tokens: 1`` pins it in place.

All randomness comes from the ``random.Random`` passed in: the trainer derives it from
(seed, epoch), which makes any draw reproducible and a resumed run identical. We chose
``random.Random`` over a ``torch.Generator`` because captions are Python strings and
``Random.shuffle`` is stable across platforms and versions for a given seed.
"""

from __future__ import annotations

import random
import re

TRIGGER_PLACEHOLDER = "[trigger]"


def inject_trigger(text: str, trigger: str | None, add_if_absent: bool = True) -> str:
    """Replace ``[trigger]`` by ``trigger`` and, if ``add_if_absent``, prepend it when missing.

    Sample prompts use ``add_if_absent=False`` (only the placeholder is replaced), as ai-toolkit.
    Without a trigger word the placeholder is removed and the spaces it leaves are tidied.
    """
    word = (trigger or "").strip()
    text = text.replace(TRIGGER_PLACEHOLDER, word)
    if not word:
        return re.sub(r"\s{2,}", " ", text).strip()
    if add_if_absent and word not in text:
        text = f"{word} {text}" if text.strip() else word
    return text.strip()


def shuffle_tokens(text: str, keep_tokens: int, rng: random.Random) -> str:
    """Shuffle the comma-separated tokens of ``text``; the first ``keep_tokens`` stay in place."""
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    head, tail = tokens[:keep_tokens], tokens[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def process_caption(raw: str, *, trigger: str | None, rng: random.Random, dropout_rate: float = 0.0,
                    shuffle: bool = False, keep_tokens: int = 0) -> str:
    """The caption of one training draw (see the module docstring for the order)."""
    # Draw only when the feature is on, so turning it off does not shift the other random draws.
    text = "" if dropout_rate > 0 and rng.random() < dropout_rate else raw
    text = inject_trigger(text, trigger)
    return shuffle_tokens(text, keep_tokens, rng) if shuffle else text
