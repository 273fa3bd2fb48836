"""What waits in the engine: one queued call (`Entry`), the calls of one batch key
(`KeyQueue`) and a merged batch (`Batch`). Plain state; the scheduler and the dispatcher
decide what happens to it."""

from __future__ import annotations

import asyncio
import collections
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from batchproxy import codec
from batchproxy.engine.lengths import Lengths
from batchproxy.engine.padding import padding_for
from batchproxy.errors import ProxyError
from batchproxy.fleet.versions import version_spec

if TYPE_CHECKING:
    from batchproxy.engine.model_batching import ModelBatching


def call_bytes(call: codec.PredictCall) -> int:
    """The bytes a queued call holds: what the queue bound in bytes counts."""
    total = 0
    for tensor in call.inputs.values():
        data = tensor.data
        if isinstance(data, bytes):
            total += len(data)
        else:
            total += sum(len(item) for item in data)
    return total


class Entry:
    """One queued call and the progress of its rows through batches."""

    __slots__ = (
        "call",
        "dead",
        "deadline",
        "enqueued_at",
        "future",
        "nbytes",
        "next_row",
        "parts",
        "promote_at",
        "queue",
        "rows",
        "rows_answered",
        "sheddable",
        "timer",
    )

    def __init__(self, call: codec.PredictCall, future: asyncio.Future[bytes],
                 deadline: float | None, now: float, queue: KeyQueue, nbytes: int,
                 sheddable: bool = False, promote_at: float = math.inf) -> None:
        self.call = call
        self.sheddable = sheddable
        # A sheddable call waiting since before this time ranks with critical calls by its
        # arrival, so a steady stream of critical calls cannot starve it (engine/priorities).
        self.promote_at = now if not sheddable else promote_at
        self.rows: int = call.rows
        self.nbytes = nbytes
        self.future = future
        self.deadline = deadline
        self.enqueued_at = now
        self.queue = queue
        self.next_row = 0  # rows before this one are already in batches
        self.rows_answered = 0
        self.parts: list[tuple[int, bytes]] | None = None  # only for calls cut into pieces
        self.dead = False  # answered with an error, cancelled or expired
        self.timer: asyncio.TimerHandle | None = None

    @property
    def answered(self) -> bool:
        return self.future.done()

    def deliver(self, start: int, stop: int, response: bytes) -> None:
        if self.future.done():
            return
        if start == 0 and stop == self.rows:
            self.future.set_result(response)
            return
        if self.parts is None:
            self.parts = []
        self.parts.append((start, response))
        self.rows_answered += stop - start
        if self.rows_answered == self.rows:
            self.parts.sort(key=lambda part: part[0])
            try:
                joined = codec.concat_predict_responses([part for _, part in self.parts])
            except codec.CodecError as err:
                self.future.set_exception(ProxyError.from_codec_error(err))
                return
            self.future.set_result(joined)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class KeyQueue:
    """The calls waiting for one batch key: critical ones and sheddable ones, each class
    oldest first. A batch takes critical rows first; sheddable rows fill the room left."""

    __slots__ = ("batching", "entries", "full", "key", "latest", "model", "rows", "sheddable",
                 "sheddable_rows", "timeout_s", "version")

    def __init__(self, key: tuple, version: int | None = None, latest: bool = False,
                 batching: ModelBatching | None = None) -> None:
        self.key = key
        self.model: str = key[0]
        # The model's batching as it was when the queue began (a reload that changes it
        # starts a new queue): its max_batch_size (`full`) and batch timeout; 0 and None
        # without one, and the policy's own settings (the flags) apply.
        self.batching = batching
        self.full = batching.full if batching is not None else 0
        self.timeout_s = batching.timeout_s if batching is not None else None
        # The version every batch of this queue is sent for (the calls' own, a label's, or
        # the one a `latest` call was given); None: as the calls name it. `latest`: the
        # proxy chose it, so it may choose again if that version goes away.
        self.version = version
        self.latest = latest
        self.entries: collections.deque[Entry] = collections.deque()  # critical
        self.sheddable: collections.deque[Entry] = collections.deque()
        self.rows = 0  # rows of live entries not yet taken into a batch
        self.sheddable_rows = 0  # the part of them that sheddable calls hold

    @property
    def critical_rows(self) -> int:
        return self.rows - self.sheddable_rows

    def add(self, entry: Entry) -> None:
        (self.sheddable if entry.sheddable else self.entries).append(entry)
        self.rows += entry.rows
        if entry.sheddable:
            self.sheddable_rows += entry.rows

    def all_entries(self) -> list[Entry]:
        return [*self.entries, *self.sheddable]

    @staticmethod
    def _live_head(entries: collections.deque[Entry]) -> Entry | None:
        while entries and entries[0].dead:
            entries.popleft()
        return entries[0] if entries else None

    def head(self) -> Entry | None:
        """The oldest call of either class with rows still to send (answered-early calls
        are skipped): its wait is what the flush policy's due time counts from."""
        critical = self._live_head(self.entries)
        sheddable = self._live_head(self.sheddable)
        if critical is None or (sheddable is not None
                                and sheddable.enqueued_at < critical.enqueued_at):
            return sheddable
        return critical

    def next_entry(self, now: float) -> Entry | None:
        """The call whose rows a batch takes next: the oldest critical one, unless the
        oldest sheddable one is promoted (it waited long enough) and older still."""
        critical = self._live_head(self.entries)
        sheddable = self._live_head(self.sheddable)
        if sheddable is None:
            return critical
        if critical is None:
            return sheddable
        if sheddable.promote_at <= now and sheddable.enqueued_at < critical.enqueued_at:
            return sheddable
        return critical

    def pop(self, entry: Entry) -> None:
        """Drop `entry`, the head of its class, once all its rows are in batches."""
        (self.sheddable if entry.sheddable else self.entries).popleft()


Piece = tuple[Entry, int, int]  # rows [start, stop) of one call


@dataclass
class Batch:
    """Rows [start, stop) of each entry, in order; encoded once, sent to one replica, for
    one version (`version`; None: as its calls name it). With allowed batch sizes,
    `padding` copies of a real row follow them on the wire, so the replica sees
    `sent_rows`; they are cut from the answer before it is split."""

    model: str
    pieces: list[Piece]
    request: bytes
    rows: int
    version: int | None = None
    latest: bool = False  # the proxy chose the version for `latest` calls
    sizes: tuple[int, ...] = ()  # the allowed batch sizes; () for any
    padding: int = 0
    # Variable-length inputs padded to one length, outputs cut back (engine/lengths.py).
    lengths: Lengths | None = None
    # Sent to wait behind a batch its replica still ran (engine/policy.py, Flush.behind).
    behind: bool = False

    @classmethod
    def of(cls, model: str, pieces: list[Piece], version: int | None = None,
           latest: bool = False, sizes: tuple[int, ...] = (),
           lengths: Lengths | None = None) -> Batch:
        rows = sum(stop - start for _, start, stop in pieces)
        padding = padding_for(sizes, rows)
        items = [(entry.call, start, stop) for entry, start, stop in pieces]
        if lengths is not None:
            items = lengths.pad(items)
        if version is not None and items:
            # The merged request's ModelSpec is the first call's: that one, with the
            # version appended, names the version (no copy of the merged request).
            call, start, stop = items[0]
            items[0] = (codec.PredictCall(call.model_name, version, None,
                                          call.signature_name, call.output_filter,
                                          call.model_spec + version_spec(version),
                                          call.inputs, call.rows, call.key), start, stop)
        request = codec.encode_predict_request(items, padding)
        return cls(model, pieces, request, rows, version, latest, sizes, padding, lengths)

    def same(self, pieces: list[Piece]) -> Batch:
        """A batch of other pieces of the same queue, shaped alike, for the same version."""
        return Batch.of(self.model, pieces, self.version, self.latest, self.sizes,
                        self.lengths)

    def for_version(self, version: int) -> Batch:
        """The same calls, sent for another version (a `latest` batch whose version left)."""
        return Batch.of(self.model, self.pieces, version, self.latest, self.sizes,
                        self.lengths)

    @property
    def sent_rows(self) -> int:
        """Rows the replica runs, padding included: what its cost depends on."""
        return self.rows + self.padding

    def answer_rows(self) -> list[int]:
        """Rows of the answer per piece, then the padding's (cut off and dropped)."""
        counts = [stop - start for _, start, stop in self.pieces]
        if self.padding:
            counts.append(self.padding)
        return counts

    def waiting(self) -> bool:
        """Whether any of its callers still waits for an answer."""
        return any(not entry.answered for entry, _, _ in self.pieces)

    def patience(self, now: float, default_s: float) -> float:
        """How long the batch's answer is still worth waiting for: until the LAST of its
        waiting callers' deadlines (a caller with none waits up to `default_s`). One caller's
        tight deadline never cuts the call short for the others; that caller is answered
        by its own timer."""
        longest = 0.0
        for entry, _, _ in self.pieces:
            if entry.answered:
                continue
            if entry.deadline is None:
                return default_s
            longest = max(longest, entry.deadline - now)
        return longest

    def without_answered(self) -> Batch:
        """The same batch less the calls already answered (expired, cancelled): a retry
        sends only rows someone still waits for."""
        live = [piece for piece in self.pieces if not piece[0].answered]
        if len(live) == len(self.pieces):
            return self
        return self.same(live)

    def first(self) -> Batch:
        return self.same(self.pieces[:1])

    def rest(self) -> Batch:
        """All but the first call (an empty batch when there is no other)."""
        rest = self.pieces[1:]
        if not rest:
            return Batch(self.model, [], b"", 0, self.version, self.latest, self.sizes)
        return self.same(rest)

    def halves(self) -> tuple[Batch, Batch]:
        middle = len(self.pieces) // 2
        return self.same(self.pieces[:middle]), self.same(self.pieces[middle:])
