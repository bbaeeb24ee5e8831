"""Continuous batching: one thread runs the model for every request the engine serves.

Requests wait in a bounded queue. Between two steps the scheduler admits waiting requests while the
batch has room (`max_batch`) and the KV they may need fits the engine's KV budget (on the full
cache, a prompt prefix that a running request holds already is counted once). A step computes
prompt chunks of the sequences still in prefill, up to `step_tokens` (new requests first, for a
short time to first token), and a token for every decoding sequence; a long prompt never stalls
the decoding ones for more than a chunk.

Batch invariance: a request's tokens do not depend on what else runs. Prompts are cut into chunks
of a fixed size counted from their first uncached token, and each chunk gets a pass of its own, so
its shape (and the kernels chosen for it) never depends on the batch. Decode passes: int8 weights
multiply row by row, so any number of rows gives every row the same result. Other matrix kernels
choose their blocking by the batch's shape, though at a fixed shape every row comes out the same
wherever it sits; so their decode pass always has `max_batch` rows (padding rows touch no cache).
Padding is cheap with bfloat16 weights (oneDNN, AMX); MKL's float32 kernels cost about three times
as much at 8 rows as at 1 (benchmarks/batching.py times them), so float32 engines leave it off
unless `batch_invariant` is set; without it, each step is one fused pass.

Speculative decoding (engine/speculation.py): a decoding request may add draft tokens from its
own context to its row of the decode pass; its decoder then takes the rows in order while its
choices match the draft, and the KV of the rejected tokens is dropped before sliding-window blocks
are released. With int8 weights every row's logits are those it would get alone, so drafts
change nothing but the speed. Padded passes and policies that learn from every query's attention
do not draft.

Each request's events go to its `Ticket`, which a thread or an asyncio task reads. Cancelling a
ticket (a client went away) frees its sequence before the next pass.

Who runs the passes: a thread that waits for its own events drives the scheduler while nobody else
does, so a program that generates from its main thread computes there. Tickets read by an event
loop are driven by `run()`, on the thread that calls it (`pyagent serve` gives it the main
thread), or else by a background thread started on demand, which ends once idle. This matters on
CPUs: OpenMP (libgomp) wakes its workers quickly for the main thread only, once the process has
more threads than cores, and a forward pass starts a hundred parallel regions.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pyagent.engine.decoding import Decoder
from pyagent.engine.kvcache import Sequence
from pyagent.engine.quantize import ROW_WISE, weight_precision
from pyagent.engine.speculation import Drafter, SpeculationSettings
from pyagent.errors import ConfigError, OverloadedError, PyAgentError
from pyagent.types import Completion, StreamEvent

if TYPE_CHECKING:
    from pyagent.engine.generate import Engine


HANDOVER_S = 0.02  # how often a waiting thread checks whether the driver left
BACKGROUND_IDLE_S = 2.0  # a background driver with nothing to do for this long ends


@dataclass(frozen=True)
class SchedulerSettings:
    """How many requests run together, how many may wait, and how many tokens one pass computes
    (decode tokens first, then whole prompt chunks; at least one chunk always goes in)."""

    max_batch: int = 8
    max_queue: int = 64
    step_tokens: int = 512
    batch_invariant: bool | None = None  # None: on, except with float32 weights
    speculation: SpeculationSettings = field(default_factory=SpeculationSettings)

    def __post_init__(self) -> None:
        for name in ("max_batch", "step_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ConfigError(f"max_queue must be >= 0, got {self.max_queue}")


class Ticket:
    """A submitted request's events, in order; the last carries the `Completion`. Iterate it from
    a thread, or with `async for` when it was made for an event loop."""

    def __init__(self, scheduler: Scheduler, loop: asyncio.AbstractEventLoop | None = None):
        self._scheduler = scheduler
        self._loop = loop
        self._events: asyncio.Queue | queue.SimpleQueue = (
            asyncio.Queue() if loop is not None else queue.SimpleQueue())
        self.cancelled = False
        self.finished = False
        self._outcome: Completion | PyAgentError | None = None

    def put(self, item: StreamEvent | BaseException) -> None:
        """Deliver an event or an error (called by the scheduler's thread)."""
        if self._loop is None:
            self._events.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody is listening any more
            self.cancelled = True

    def cancel(self) -> None:
        """Stop generating for this request and free its KV (no effect once finished)."""
        if not self.cancelled and not self.finished:
            self.cancelled = True
            self._scheduler.poke(drive=not self.asynchronous)

    def poll(self) -> StreamEvent | BaseException | None:
        """The next item if one has arrived (threads only)."""
        assert isinstance(self._events, queue.SimpleQueue), "this ticket belongs to an event loop"
        try:
            return self._events.get_nowait()
        except queue.Empty:
            return None

    def wait(self, timeout: float) -> StreamEvent | BaseException | None:
        """The next item, waiting up to `timeout` seconds for it (threads only)."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def __iter__(self) -> Iterator[StreamEvent]:
        try:
            while not self.finished:
                yield self._take(self._scheduler.next_event(self))
        finally:
            self.cancel()

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        assert isinstance(self._events, asyncio.Queue), "this ticket has no event loop"
        try:
            while not self.finished:
                yield self._take(await self._events.get())
        finally:
            self.cancel()

    def outcome(self) -> Completion | PyAgentError | None:
        """The completion, or the error that ended the request, once it has arrived (threads
        only; the events before it are let go); else None. Never waits."""
        while self._outcome is None and not self.finished and (item := self.poll()) is not None:
            try:
                event = self._take(item)
            except PyAgentError as exc:
                self._outcome = exc
            else:
                self._outcome = event.completion
        return self._outcome

    def result(self) -> Completion | PyAgentError:
        """The completion, or the error that ended the request, waiting for it (and running
        passes meanwhile if no other thread is)."""
        try:
            for event in self:
                self._outcome = event.completion or self._outcome
        except PyAgentError as exc:
            self._outcome = exc
        assert self._outcome is not None
        return self._outcome

    def _take(self, item: StreamEvent | BaseException) -> StreamEvent:
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.completion is not None
        return item

    @property
    def asynchronous(self) -> bool:
        return self._loop is not None


@dataclass
class Job:
    """A request inside the scheduler: its prompt, decoding state, KV reservation and sequence."""

    prompt_ids: list[int]
    decoder: Decoder
    ticket: Ticket
    reserve: dict[str, int]  # KV tokens reserved per layer group
    credit: int = 0  # global tokens of its prefix that an older running request holds
    sequence: Sequence | None = None
    todo: list[int] = field(default_factory=list)  # prompt tokens still to compute
    drafter: Drafter | None = None  # prompt lookup over its tokens, when it speculates
    rejected: int = 0  # draft tokens of the last pass whose KV must be dropped


class Scheduler:
    """Admits, batches and steps the requests of one `Engine`."""

    def __init__(self, engine: Engine, settings: SchedulerSettings | None = None):
        self.engine = engine
        self.settings = settings or SchedulerSettings()
        self.budget = engine.kv_token_budget()  # group -> KV tokens all admitted requests may use
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._reserved = dict.fromkeys(self.budget, 0)
        self._cond = threading.Condition()
        self._driver: threading.Thread | None = None  # the thread running a pass now
        self._runners = 0  # threads inside run()
        self._closed = False
        self._service_s = 1.0  # moving average of a request's time in the engine
        self.steps = 0
        self.most_running = 0  # the most requests that ran at once
        precision = weight_precision(engine.model)
        invariant = self.settings.batch_invariant
        if invariant is None:
            invariant = precision != "float32"
        # rows of every decode pass (0: as many as decode), and whether a step is one pass
        self.pad_rows = self.settings.max_batch if invariant and precision not in ROW_WISE else 0
        self.fused = not invariant and precision not in ROW_WISE
        # prompt lookup, where a draft's rows get the logits they would get alone: not with
        # padded passes (their kernels depend on the rows), nor with policies that learn from
        # every query's attention (a rejected draft's queries would teach them)
        self.speculation = self.settings.speculation
        policy = engine.policy
        self.speculates = self.speculation.draft_tokens > 0 and self.pad_rows == 0 and not (
            policy is not None and (policy.collects or policy.window or policy.reconstructs))
        self.drafted = self.accepted = 0  # draft tokens proposed and accepted, all requests

    # --- the caller's side ---------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise `OverloadedError` when the queue is full or the engine closed."""
        with self._cond:
            if self._closed:
                raise OverloadedError("the engine is shutting down", retry_after=5,
                                      code="engine_closed")
            free = max(0, self.settings.max_batch - len(self._running))
            if len(self._waiting) >= self.settings.max_queue + free:
                raise OverloadedError(
                    f"the engine is busy: {len(self._running)} requests running and "
                    f"{len(self._waiting)} waiting (max_queue {self.settings.max_queue})",
                    retry_after=self.retry_after())
            self._waiting.append(job)
            self._cond.notify_all()
            if job.ticket.asynchronous and not self._runners:
                self._runners += 1  # counted now, so concurrent submits start one thread
                threading.Thread(target=self._run, args=(lambda: False, BACKGROUND_IDLE_S),
                                 daemon=True, name="pyagent-scheduler").start()

    def retry_after(self) -> int:
        """Seconds until a slot is likely free, from the recent time requests spend running."""
        batches_ahead = (len(self._waiting) + 1) / self.settings.max_batch
        return max(1, math.ceil(self._service_s * batches_ahead))

    def load(self) -> dict[str, int]:
        """Requests running and waiting, and the KV tokens reserved per layer group."""
        with self._cond:
            return {"running": len(self._running), "waiting": len(self._waiting),
                    **{f"reserved_{g}": n for g, n in self._reserved.items()}}

    def close(self) -> None:
        """Refuse new requests, fail the waiting and running ones, and stop `run()` loops."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            while self._driver is not None or self._runners:
                self._cond.wait()
            jobs = [*self._running, *self._waiting]
        closed = OverloadedError("the engine shut down", retry_after=5, code="engine_closed")
        for job in jobs:
            self._finish(job, closed)

    # --- driving -------------------------------------------------------------------------------

    def next_event(self, ticket: Ticket) -> StreamEvent | BaseException:
        """Wait for `ticket`'s next item, running passes meanwhile if no other thread is. Only
        this ticket's own items wake the thread: a batch's waiters don't crowd the driver."""
        while (item := ticket.poll()) is None:
            if not self._runners and self._lead():
                self._work()
                continue
            item = ticket.wait(HANDOVER_S)
            if item is not None:
                return item
        return item

    def run(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Run passes on this thread until `stop()` is true or the scheduler closes."""
        with self._cond:
            self._runners += 1
        self._run(stop)

    def _run(self, stop: Callable[[], bool], idle_exit: float | None = None) -> None:
        """The driving loop of a counted runner; with `idle_exit`, it ends after that many
        seconds without work (a background thread then lets go of its OpenMP pool)."""
        idle_since = None
        try:
            while not stop():
                if self._lead():
                    self._work()
                    idle_since = None
                    continue
                with self._cond:
                    if self._closed:
                        return
                    if idle_exit is not None and not (self._running or self._waiting):
                        idle_since = idle_since or time.monotonic()
                        if time.monotonic() - idle_since > idle_exit:
                            return
                    self._cond.wait(0.1)
        finally:
            with self._cond:
                self._runners -= 1
                self._cond.notify_all()

    def poke(self, drive: bool) -> None:
        """Let a driver see a change (a cancelled ticket); with `drive`, run a round on this
        thread if nobody else does."""
        with self._cond:
            self._cond.notify_all()
        if drive and not self._runners and self._lead():
            self._work()

    def _lead(self) -> bool:
        """Become the driver if there is work and no driver (`run()` loops take precedence
        over waiting threads)."""
        with self._cond:
            if self._driver is None and not self._closed and (self._running or self._waiting):
                self._driver = threading.current_thread()
                return True
            return False

    def _work(self) -> None:
        """One round as the driver: admit, drop cancelled requests, step; then let go."""
        try:
            with self._cond:
                admitted = self._admit()
            for job in admitted:
                self._open(job)
            self._drop_cancelled()
            if self._running:
                self._step()
        finally:
            with self._cond:
                self._driver = None
                self._cond.notify_all()

    # --- the driver's side ---------------------------------------------------------------------

    def _fits(self, job: Job, credit: int = 0) -> bool:
        return all(self._reserved[g] + job.reserve[g] - (credit if g == "global" else 0)
                   <= self.budget[g] for g in self.budget)

    def _has_room(self, job: Job) -> bool:
        """Whether `job` fits the batch and the KV budget; on the full cache, the global blocks
        of its prompt prefix that a running request holds already are not reserved twice."""
        if len(self._running) >= self.settings.max_batch:
            return False
        job.credit = 0
        if self._fits(job):
            return True
        if not self._credits_prefixes():
            return False
        job.credit = self.engine.cache.live_prefix_tokens(job.prompt_ids)
        return job.credit > 0 and self._fits(job, job.credit)

    def _credits_prefixes(self) -> bool:
        """Prefix credit is safe only without eviction: a running request then never drops a
        global block, so a block it shares stays held once until it finishes."""
        return self.engine.policy is None and self.engine.kv.share_prefix

    def _recount(self) -> None:
        """The KV tokens reserved per group: each running request's reservation, less the
        global blocks it shares with an older running request (those the older one holds)."""
        reserved = dict.fromkeys(self.budget, 0)
        held: set[int] = set()
        block_size = self.engine.kv.block_size
        for job in self._running:
            if self._credits_prefixes() and job.sequence is not None:
                blocks = job.sequence.tables["global"].blocks
                job.credit = len(held.intersection(blocks)) * block_size
                held.update(blocks)
            for group, tokens in job.reserve.items():
                reserved[group] += tokens - (job.credit if group == "global" else 0)
        self._reserved = reserved

    def _admit(self) -> list[Job]:
        admitted = []
        while self._waiting and self._has_room(self._waiting[0]):
            job = self._waiting.popleft()
            if job.ticket.cancelled:
                continue
            job.decoder.admitted_at = time.perf_counter()
            self._running.append(job)
            admitted.append(job)
            self.most_running = max(self.most_running, len(self._running))
            self._recount()
        return admitted

    def _open(self, job: Job) -> None:
        engine = self.engine
        try:
            with engine.exclusive():
                job.sequence = engine.open(job.prompt_ids)
        except PyAgentError as exc:  # its budget cannot hold the reused prefix: it alone fails
            self._finish(job, exc)
            return
        job.todo = job.prompt_ids[job.sequence.length:]
        if self.speculates:
            job.drafter = Drafter(job.prompt_ids, self.speculation)

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._running if j.ticket.cancelled]:
            self._release(job)

    def _step(self) -> None:
        """Prompt chunks within `step_tokens` (the first always goes in), then a decode token for
        every other job: in one pass when `fused`; otherwise a pass per chunk, then the decode
        pass (of `pad_rows` rows when padding)."""
        decoding = [job for job in self._running if not job.todo]
        room = self.settings.step_tokens - len(decoding)
        chunk_size = self.engine.kv.prefill_chunk
        chunks: list[tuple[Job | None, list[int]]] = []
        for job in [j for j in self._running if j.todo]:
            chunk = job.todo[:chunk_size]
            if chunks and len(chunk) > room:
                break
            chunks.append((job, chunk))
            room -= len(chunk)
        decodes: list[tuple[Job | None, list[int]]] = [
            (job, [job.decoder.last_token, *self._draft(job)]) for job in decoding]
        if self.fused:
            self._pass(chunks + decodes)
        else:
            for item in chunks:
                self._pass([item])
            if decodes:
                self._pass(decodes + [(None, [0])] * max(0, self.pad_rows - len(decodes)))
        self.steps += 1

    def _draft(self, job: Job) -> list[int]:
        """Draft tokens for `job`'s next pass: never past its `max_tokens`, and never past the
        next eviction, so every token is computed on the cache it would see without a draft."""
        if job.drafter is None:
            return []
        engine, sequence = self.engine, job.sequence
        assert sequence is not None
        limit = job.decoder.request.sampling.max_tokens - len(job.decoder.generated) - 1
        if engine.policy is not None:
            every = engine.kv.evict_every
            limit = min(limit, every - 1 - (sequence.length - sequence.prompt_length) % every)
        return job.drafter.propose(limit)

    def _pass(self, items: list[tuple[Job | None, list[int]]]) -> None:
        """One forward pass; then the decoders take the rows that end a prompt or decode (a
        draft's rows in order, until a choice differs from the draft), the rejected draft
        tokens' KV is dropped, and the budget is applied."""
        engine = self.engine
        jobs = [job for job, _ in items if job is not None]
        decoding = any(job is not None and not job.todo for job in jobs)
        drafts = any(job is not None and not job.todo and len(tokens) > 1
                     for job, tokens in items)
        try:
            with engine.exclusive():
                hidden = engine.forward_batch(
                    [(job and job.sequence, tokens) for job, tokens in items],
                    dense=False if decoding else None, finish=False, trim=not drafts)
                # a decode samples every row, a prompt's pass only its last chunk's last row
                ready = [(job, tokens, h if not job.todo else h[-1:])
                         for (job, tokens), h in zip(items, hidden, strict=True)
                         if job is not None and (not job.todo or len(tokens) == len(job.todo))]
                logits = engine.logits(torch.cat([h for *_, h in ready])) if ready else None
                deltas, row = {}, 0
                for job, tokens, rows in ready:
                    assert logits is not None
                    deltas[id(job)] = self._verify(job, tokens, logits[row:row + len(rows)])
                    row += len(rows)
                failed = []
                for job, tokens in items:
                    if job is not None:
                        try:
                            self._after_forward(job, tokens)
                        except PyAgentError as exc:  # this request's budget: fails it alone
                            failed.append((job, exc))
        except Exception as exc:  # a failed pass fails the requests in it, never the others
            error = exc if isinstance(exc, PyAgentError) else PyAgentError(
                f"generation failed: {exc}")
            for job in jobs:
                self._finish(job, error)
            return
        for job, exc in failed:
            self._finish(job, exc)
        for job, _, _ in ready:
            if any(job is f for f, _ in failed):
                continue
            if delta := deltas[id(job)]:  # a draft's rows may release text and then end it
                job.ticket.put(StreamEvent(delta, logprobs=job.decoder.released_logprobs()))
            if job.decoder.done:
                self._finish(job)

    def _verify(self, job: Job, tokens: list[int], logits: torch.Tensor) -> str:
        """Let `job`'s decoder take `logits` row by row while its choices match the draft
        (`tokens[1:]` of a decode; none for a prompt's last row); the text released."""
        decoder, draft = job.decoder, tokens[1:] if not job.todo else []
        delta, taken, accepted = "", 0, 0
        for i in range(logits.shape[0]):
            delta += decoder.advance(logits[i])
            taken += 1
            matched = i < len(draft) and decoder.last_token == draft[i]
            accepted += matched
            if decoder.done or not matched:
                break
        if draft:
            decoder.drafted += len(draft)
            decoder.accepted += accepted
            self.drafted += len(draft)
            self.accepted += accepted
            job.rejected = len(tokens) - taken
        if job.drafter is not None:
            job.drafter.feedback(len(draft), accepted)
            job.drafter.extend(decoder.generated[-taken:])
        return delta

    def _after_forward(self, job: Job, tokens: list[int]) -> None:
        """Bookkeeping after a pass: a rejected draft's KV dropped, sliding-window blocks
        released, the prompt left to compute, and the KV budget."""
        engine = self.engine
        sequence = job.sequence
        assert sequence is not None
        engine.cache.truncate(sequence, job.rejected)
        job.rejected = 0
        engine.cache.finish(sequence)
        if job.todo:
            job.todo = job.todo[len(tokens):]
            engine.after_prompt_chunk(sequence, last=not job.todo)
        elif (sequence.length - sequence.prompt_length) % engine.kv.evict_every == 0:
            engine.enforce_budget(sequence)

    def _finish(self, job: Job, error: BaseException | None = None) -> None:
        if error is None:
            assert job.sequence is not None
            text, completion = job.decoder.completion(job.sequence.cached_tokens,
                                                       job.sequence.peak_bytes)
            job.ticket.put(StreamEvent(text, completion, job.decoder.released_logprobs()))
            elapsed = time.perf_counter() - job.decoder.started
            self._service_s = 0.8 * self._service_s + 0.2 * elapsed
        else:
            job.ticket.put(error)
        self._release(job)

    def _release(self, job: Job) -> None:
        if job.sequence is not None:
            with self.engine.exclusive():
                self.engine.close(job.sequence)
            job.sequence = None
        with self._cond:
            if job in self._running:
                self._running.remove(job)
                self._recount()
            elif job in self._waiting:
                self._waiting.remove(job)
