"""Plain data types shared by the recipes (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100  # label of the prompt tokens: no loss there


@dataclass(frozen=True)
class EncodedExample:
    """One tokenised training example. ``labels`` is ``IGNORE_INDEX`` on the prompt, the token id on the answer.

    ``n_history`` is recipe bookkeeping (WeaveRec: history titles kept after trimming); 0 when unused.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    prompt_len: int
    n_history: int = 0

    @property
    def n_answer_tokens(self) -> int:
        return len(self.input_ids) - self.prompt_len


__all__ = ["IGNORE_INDEX", "EncodedExample"]
