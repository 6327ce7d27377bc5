"""Plain data types shared by the WeaveRec data, model and evaluation layers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Item:
    """One catalogue item. Items are represented to the LLM by their title only."""

    item_id: str
    title: str
    domain: str


@dataclass(frozen=True)
class Sample:
    """One next-item prediction example for one user in one domain.

    ``history`` holds the user's previous item ids in chronological order (already truncated to the last H items),
    ``target`` the item to predict, and ``candidates`` the shuffled candidate list (``target`` plus sampled negatives
    not in the user's history), with ``target_index`` its position in ``candidates``. The ``*_titles`` fields carry
    the same items as titles, which is all the LLM sees.
    """

    user: str
    domain: str
    history: tuple[str, ...]
    history_titles: tuple[str, ...]
    target: str
    target_title: str
    candidates: tuple[str, ...]
    candidate_titles: tuple[str, ...]
    target_index: int
    full_history_len: int  # the user's number of earlier items in this domain before truncation (cold-start buckets)
