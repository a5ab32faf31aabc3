"""The immutable snapshot of a participant's DICT buckets, as one Bridge list call returned it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

#: Participant categories DICT assigns. The official XML schema still says A-F; G and H exist.
CATEGORIES = frozenset("ABCDEFGH")
#: Policy names of DICT's v2 table (dict-domain.md §2). Only for start-up hints about configuration: the
#: Bridge's answer is the authority, and names outside this set are exported like any other.
DICT_POLICY_NAMES = frozenset(
    {
        "ENTRIES_READ_USER_ANTISCAN", "ENTRIES_READ_USER_ANTISCAN_V2", "ENTRIES_READ_PARTICIPANT_ANTISCAN",
        "ENTRIES_STATISTICS_READ", "ENTRIES_WRITE", "ENTRIES_UPDATE", "CLAIMS_READ", "CLAIMS_WRITE",
        "CLAIMS_LIST_WITH_ROLE", "CLAIMS_LIST_WITHOUT_ROLE", "SYNC_VERIFICATIONS_WRITE", "CIDS_FILES_WRITE",
        "CIDS_FILES_READ", "CIDS_EVENTS_LIST", "CIDS_ENTRIES_READ", "INFRACTION_REPORTS_READ",
        "INFRACTION_REPORTS_WRITE", "INFRACTION_REPORTS_LIST_WITH_ROLE",
        "INFRACTION_REPORTS_LIST_WITHOUT_ROLE", "KEYS_CHECK", "REFUNDS_READ", "REFUNDS_WRITE",
        "REFUND_LIST_WITH_ROLE", "REFUND_LIST_WITHOUT_ROLE", "FRAUD_MARKERS_READ", "FRAUD_MARKERS_WRITE",
        "FRAUD_MARKERS_LIST", "PERSONS_STATISTICS_READ", "POLICIES_READ", "POLICIES_LIST",
    }
)  # fmt: skip
#: HTTP statuses a Bridge may count (RFC 9110 defines 100-599); anything else is a broken counter.
MIN_HTTP_STATUS, MAX_HTTP_STATUS = 100, 599
#: (HTTP status, cumulative count since the Bridge started), one per status, sorted by status.
ResponseCounts = tuple[tuple[int, int], ...]
#: Names DICT used before and replaced (manual v8.0): a threshold naming one is most likely orphaned.
RENAMED_POLICIES = {"KEYS_READ": "KEYS_CHECK", "STATISTICS_READ": "ENTRIES_STATISTICS_READ"}


@dataclass(frozen=True, slots=True)
class PolicyReading:
    """One bucket as DICT reported it. ``available_tokens`` may be negative (404 lookups cost 3 tokens)."""

    name: str
    available_tokens: int
    capacity: int
    refill_tokens: int
    refill_period_sec: int
    #: DICT's answers to this policy's requests the Bridge relayed, by HTTP status, cumulative since the
    #: Bridge started; None when the Bridge does not count them (never a fake set of zeros).
    response_counts: ResponseCounts | None = None

    def count_of(self, code: int) -> int:
        """The cumulative count of answers with status ``code`` (0 if the Bridge has seen none)."""
        return next((count for status, count in self.response_counts or () if status == code), 0)

    @property
    def refill_rate_per_second(self) -> float:
        """Tokens added per second. DICT may say (1200, 60) or (20, 1): only the ratio is meaningful."""
        return self.refill_tokens / self.refill_period_sec


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one successful GetRateLimitPolicies call returned.

    ``response_time`` is DICT's clock (UTC, timezone-aware) and is the time of the snapshot everywhere:
    consumption between snapshots, stored history and exported values all use it, never the local clock.
    """

    response_time: datetime
    correlation_id: str
    category: str
    policies: tuple[PolicyReading, ...]
    #: The ISPB the answer is about: the one the Bridge names, else the one asked for, else "" (an old
    #: Bridge asked for its own participant).
    participant_ispb: str = ""

    def policy(self, name: str) -> PolicyReading | None:
        for reading in self.policies:
            if reading.name == name:
                return reading
        return None
