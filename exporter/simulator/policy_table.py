"""DICT's published policy table (dict-domain.md §2), for the simulator, fixtures and docs only.

The exporter never reads capacities from here: the live values the Bridge returns are the authority.
"""

from __future__ import annotations

from dataclasses import dataclass

MINUTE = 60
DAY = 86400

#: The two policies whose capacity and refill depend on the participant's category.
CATEGORY_POLICIES = ("ENTRIES_READ_PARTICIPANT_ANTISCAN", "ENTRIES_STATISTICS_READ")
#: Category -> (refill per minute, capacity) of the category policies.
CATEGORY_LIMITS: dict[str, tuple[int, int]] = {
    "A": (25_000, 50_000),
    "B": (20_000, 40_000),
    "C": (15_000, 30_000),
    "D": (8_000, 16_000),
    "E": (2_500, 5_000),
    "F": (250, 500),
    "G": (25, 250),
    "H": (2, 50),
}
#: The antiscan bucket a key lookup charges; a 404 answer costs NOT_FOUND_COST tokens of it.
ANTISCAN = "ENTRIES_READ_PARTICIPANT_ANTISCAN"
NOT_FOUND_COST = 3
#: The buckets the bucket-query endpoints themselves spend.
POLICIES_LIST = "POLICIES_LIST"
POLICIES_READ = "POLICIES_READ"


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """Published limits of one policy: ``refill_tokens`` are added every ``refill_period_sec``."""

    name: str
    refill_tokens: int
    refill_period_sec: int
    capacity: int

    @property
    def rate_per_second(self) -> float:
        return self.refill_tokens / self.refill_period_sec


# name -> (refill tokens, refill period in seconds, capacity) for the 28 category-independent policies.
# The USER_ANTISCAN pair is per end user and invisible in DICT's PSP-level list; the simulator still serves
# them (PF values: 2/min, 100) so every row of the published table can be seen end to end.
_FIXED: dict[str, tuple[int, int, int]] = {
    "ENTRIES_READ_USER_ANTISCAN": (2, MINUTE, 100),
    "ENTRIES_READ_USER_ANTISCAN_V2": (2, MINUTE, 100),
    "ENTRIES_WRITE": (1_200, MINUTE, 36_000),
    "ENTRIES_UPDATE": (600, MINUTE, 600),
    "CLAIMS_READ": (600, MINUTE, 18_000),
    "CLAIMS_WRITE": (1_200, MINUTE, 36_000),
    "CLAIMS_LIST_WITH_ROLE": (40, MINUTE, 200),
    "CLAIMS_LIST_WITHOUT_ROLE": (10, MINUTE, 50),
    "SYNC_VERIFICATIONS_WRITE": (10, MINUTE, 50),
    "CIDS_FILES_WRITE": (40, DAY, 200),
    "CIDS_FILES_READ": (10, MINUTE, 50),
    "CIDS_EVENTS_LIST": (20, MINUTE, 100),
    "CIDS_ENTRIES_READ": (1_200, MINUTE, 36_000),
    "INFRACTION_REPORTS_READ": (600, MINUTE, 18_000),
    "INFRACTION_REPORTS_WRITE": (1_200, MINUTE, 36_000),
    "INFRACTION_REPORTS_LIST_WITH_ROLE": (40, MINUTE, 200),
    "INFRACTION_REPORTS_LIST_WITHOUT_ROLE": (10, MINUTE, 50),
    "KEYS_CHECK": (70, MINUTE, 70),
    "REFUNDS_READ": (1_200, MINUTE, 36_000),
    "REFUNDS_WRITE": (2_400, MINUTE, 72_000),
    "REFUND_LIST_WITH_ROLE": (40, MINUTE, 200),
    "REFUND_LIST_WITHOUT_ROLE": (10, MINUTE, 50),
    "FRAUD_MARKERS_READ": (600, MINUTE, 18_000),
    "FRAUD_MARKERS_WRITE": (1_200, MINUTE, 36_000),
    "FRAUD_MARKERS_LIST": (600, MINUTE, 18_000),
    "PERSONS_STATISTICS_READ": (12_000, MINUTE, 36_000),
    POLICIES_READ: (60, MINUTE, 200),
    POLICIES_LIST: (6, MINUTE, 20),
}

#: Every published policy name, in table order (30).
POLICY_NAMES: tuple[str, ...] = (*_FIXED.keys(), *CATEGORY_POLICIES)


def category_spec(name: str, category: str) -> PolicySpec:
    """Limits of one of the CATEGORY_POLICIES for a category letter A-H."""
    refill, capacity = CATEGORY_LIMITS[category]
    return PolicySpec(name, refill, MINUTE, capacity)


def policies_for(category: str) -> tuple[PolicySpec, ...]:
    """All 30 published policies with the limits of ``category``."""
    if category not in CATEGORY_LIMITS:
        raise ValueError(f"unknown DICT category {category!r} (expected one letter A-H)")
    fixed = (PolicySpec(name, *limits) for name, limits in _FIXED.items())
    return (*fixed, *(category_spec(name, category) for name in CATEGORY_POLICIES))


def spec(name: str, category: str) -> PolicySpec | None:
    """Published limits of ``name`` under ``category``; None for a name outside the table."""
    if name in CATEGORY_POLICIES:
        return category_spec(name, category)
    limits = _FIXED.get(name)
    return PolicySpec(name, *limits) if limits else None
