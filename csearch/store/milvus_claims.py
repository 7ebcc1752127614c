"""Id claims: how writers sharing one Milvus collection get int64 ids that no other writer holds
or ever held, without a transaction or compare-and-set (Milvus has neither).

A writer that needs n ids inserts a claim row [start, start + n) into the store's records
collection, `start` at or above every claim it knows, then reads (Strong) every other claim above
`start`. If one overlaps its range it withdraws (deletes its row) and tries again above it. Of two
overlapping claims at least one writer sees the other: each read comes after the reader's own
insert, so the writer whose read is earlier saw nothing of a later insert, and the later reader
sees the earlier insert. So at most one writer keeps a range, and ids are never reused, since
a claim is pruned only when it is older than CLAIM_TTL and a higher claim remains.

This assumes the writers' clocks agree within a few minutes (a claim is withdrawn unless it was
checked within CLAIM_SECONDS, well inside CLAIM_TTL).
"""

from __future__ import annotations

import random
import time
import uuid

from ..errors import StoreError
from .milvus_io import PAGE_IDS, Target, calling, meta_record

STRONG, BOUNDED = "Strong", "Bounded"
CLAIM_ATTEMPTS = 50
CLAIM_SECONDS = 60.0  # a claim not checked within this is withdrawn
CLAIM_TTL = 600.0  # seconds: older claims may be pruned (all but the highest)
PRUNE_EVERY = 32  # claims won between two prunings


class IdClaims:
    """The id claims of one store, for one writer (its own handle on the records collection)."""

    def __init__(self, client, target: Target):
        self._client, self._target = client, target
        self._known, self._won = 0, 0  # the highest claim end known (claims start at or above it); claims won

    def _claims(self, where: str, level: str) -> list[dict]:
        with calling(self._target, "reserving ids"):
            return self._client.query(
                self._target.meta_collection,
                filter=f'kind == "claim" and {where}',
                output_fields=["key", "start", "stop"],
                limit=PAGE_IDS,
                consistency_level=level,
            )

    def unused(self) -> bool:
        """True when no id was ever given out (a first add may then declare extras columns)."""
        return not self._claims("stop > 0", STRONG)

    def claim(self, n: int) -> int:
        """Reserve ids [start, start + n) that no other writer holds or held; return start."""
        for attempt in range(CLAIM_ATTEMPTS):
            known = self._claims(f"stop > {self._known}", BOUNDED)  # a stale read only costs a retry
            start = max([self._known, *(int(c["stop"]) for c in known)])
            key = f"claim:{uuid.uuid4().hex}"
            began = time.monotonic()
            with calling(self._target, "reserving ids"):
                self._client.insert(self._target.meta_collection, [meta_record(key, {}, "claim", start, start + n)])
            others = self._claims(f'stop > {start} and key != "{key}"', STRONG)
            self._known = max([self._known, *(int(c["stop"]) for c in others)])
            if not any(int(c["start"]) < start + n for c in others) and time.monotonic() - began < CLAIM_SECONDS:
                self._known, self._won = max(self._known, start + n), self._won + 1
                if self._won % PRUNE_EVERY == 1:
                    self._prune(start)
                return start
            with calling(self._target, "reserving ids"):
                self._client.delete(self._target.meta_collection, ids=[key])
            time.sleep(random.uniform(0.005, 0.05) * (attempt + 1))
        raise StoreError(f"{self._target.label}: could not reserve ids in {CLAIM_ATTEMPTS} tries (too many writers)")

    def _prune(self, below: int) -> None:
        """Drop claims older than CLAIM_TTL that end at or below `below` (the highest one stays)."""
        old = int((time.time() - CLAIM_TTL) * 1000)
        with calling(self._target, "pruning old id claims"):
            where = f'kind == "claim" and time < {old} and stop <= {below}'
            self._client.delete(self._target.meta_collection, filter=where)
