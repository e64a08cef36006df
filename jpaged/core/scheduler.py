"""Continuous batching: which sequences run this step, and how many tokens each
(docs/design.md, "Scheduling and preemption").

Every step first takes one token of every running sequence that has one to
compute (decode), then fills what is left of `max_num_batched_tokens` with
prompt chunks of partly prefilled or waiting sequences (prefill), as vLLM's V1
scheduler does, up to `max_mixed_step_tokens` in all while there are decode rows
(they wait for the whole step; on the CPU a step's cost per token is flat from
128 tokens up, so shorter mixed steps give running requests their tokens sooner
and the first prompts in the queue their first token sooner, at no cost in
throughput; by default the cap follows the queue: one smallest bucket while few
prompt tokens wait, four where padding is free, then what drains the queue in
about two steps): a step with
prompt chunks is a mixed step (decode rows first, `num_decode` of them) and the
running sequences keep generating while new requests are prefilled, instead of
waiting for every prefill step to pass. A step that had to preempt admits no
new request (the victim would come straight back).

Fairness: waiting sequences are admitted in turns between client requests (a
server request with many prompts is one client request, `Request.client`):
one sequence of each, the client request served longest ago (or never) first,
then another of each, and so on; recompute-preempted sequences go before all.
A 1-token request that arrives behind one of 1,000 prompts starts as soon as a
sequence slot and blocks free up, not after the 1,000; requests of one prompt
each are first come, first served.

Sharing: a request with `best_of > 1` is admitted as one sequence; when its
prompt's last chunk is scheduled, the other samples are forked from it (sharing
every block) and join the same step with zero new tokens, so all of them sample
from the prompt's logits. Writing into a shared block is copy-on-write: the
batch lists the block copies the engine does before the step.

Preemption, when a decode step runs out of blocks: the most recently admitted
running sequence is the victim. `recompute` (default) frees its blocks and puts
it back at the front of the queue, to be prefilled again (cached prefix blocks
come back for free). `swap` moves the victim's whole request group to host blocks
(shared blocks stay shared) and back before it resumes; while anything is swapped
out, no new request is admitted. Swap falls back to recompute when the host space
is full or the group is all that runs.
"""
from __future__ import annotations

import collections
import itertools
from typing import Sequence as Seq

from jpaged.config import EngineConfig
from jpaged.exceptions import BeamSearchDoesNotFitError

from .block_manager import BlockManager
from .scheduler_output import SchedulerOutput
from .sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager,
                 token_buckets: Seq[int] = (), padding_is_free: bool = False):
        """`token_buckets`: the token counts a prefill step is padded up to (the runner's
        compiled sizes); a step that would spill a little past one is cut back to it, unless
        `padding_is_free` (the runner's dense layers skip a bucket's padding rows, as the
        CPU's packed matmul does: a cut would only add a step). A step with decode rows
        holds at most `max_mixed_step_tokens` (default: following the queue,
        `_mixed_step_cap`; with free padding, the whole step budget)."""
        self.config = config
        self.block_manager = block_manager
        self.token_buckets = sorted(token_buckets)
        self.cut_to_buckets = not padding_is_free
        # By default the cap follows the queue (`_mixed_step_cap`). With free padding there
        # is none: a CPU step's cost per token falls as the step grows (a 128-token step
        # ~2.3 ms a token, 2,048 tokens ~1.5 ms), so whatever waits goes in one step, up to
        # the step budget, and a prompt is never split for the decode rows' sake.
        self.follows_queue = (config.max_mixed_step_tokens is None and bool(self.token_buckets)
                              and not padding_is_free)
        self.mixed_step_tokens = config.max_mixed_step_tokens or config.max_num_batched_tokens
        self.light_step_tokens = self.mixed_step_tokens
        if self.follows_queue:
            smallest = self.token_buckets[0]
            self.light_step_tokens = smallest
            self.mixed_step_tokens = 2 * smallest
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.swapped: collections.deque[list[Sequence]] = collections.deque()  # groups, first in first
        self.num_preemptions = 0
        self.num_swap_outs = 0
        self._turns = itertools.count()  # admissions so far, to order client requests' turns
        self._last_turn: dict[str, int] = {}  # waiting client request -> its last admission
        # Admitting a new sequence leaves this many blocks free for running ones to
        # grow into, so that a full pool does not preempt on the very next step.
        self.watermark_blocks = max(1, block_manager.num_blocks // 100)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        else:
            for group in self.swapped:
                if seq in group:
                    group.remove(seq)
                    if not group:
                        self.swapped.remove(group)
                    break
        seq.pending_forks = []
        self.block_manager.free(seq)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """A running sequence gains a sibling that shares its blocks (beam search)."""
        assert parent.status is SequenceStatus.RUNNING
        self.block_manager.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def schedule(self) -> SchedulerOutput | None:
        bm = self.block_manager
        for seq in self.running:  # blocks filled by the last step join the prefix cache
            bm.cache_blocks(seq)
        ops = SchedulerOutput([], [], False)
        self._schedule_swap_in(ops)
        preemptions = self.num_preemptions
        decode = self._schedule_decode(ops)
        num_decode = decode.num_tokens if decode else 0
        admit = not self.swapped and self.num_preemptions == preemptions and self._batch_open()
        budget = max(0, self.config.max_num_batched_tokens - num_decode)
        queued = sum(s.num_uncomputed_tokens for s in self.waiting)  # prompt tokens not admitted
        if num_decode:  # the decode rows wait for the whole step: keep it short (at least
            # half the cap goes to prompts, so that they never starve)
            cap = self._mixed_step_cap(queued)
            budget = min(budget, max(cap - num_decode, cap // 2))
        budget = self._fit_bucket(num_decode, budget, queued if admit else 0)
        prefill = self._schedule_prefill(ops, admit=admit, budget=budget)
        batch = prefill or decode
        if prefill and decode:
            batch = SchedulerOutput(decode.seqs + prefill.seqs, decode.num_new_tokens + prefill.num_new_tokens,
                                   is_prefill=True, num_decode=len(decode.seqs))
        if batch is None and not ops.has_block_ops and self._stalled():
            self._break_stall()
            return self.schedule()
        if batch is None:
            return ops if ops.has_block_ops else None
        batch.blocks_to_swap_in = ops.blocks_to_swap_in
        batch.blocks_to_swap_out = ops.blocks_to_swap_out
        batch.blocks_to_copy = ops.blocks_to_copy
        return batch

    def _batch_open(self) -> bool:
        """Whether new sequences may join the running ones. Static batching (`kv_policy=
        'static'`, FasterTransformer's): only while none of the batch has sampled a token yet
        (its prompts are still being prefilled), so a batch runs until its longest request
        ends before the next is admitted."""
        if not self.block_manager.policy.static_batches:
            return True
        return all(s.num_output_tokens == 0 and s.num_uncomputed_tokens for s in self.running)

    def next_to_admit(self) -> Sequence | None:
        """The waiting sequence admitted next, if any (the memory breakdown's external
        fragmentation is the free space that sequence cannot use)."""
        if not self.waiting:
            return None
        return self._admission_order()[0]

    def _partial(self) -> list[Sequence]:
        """Running sequences whose prompt is still being prefilled; one whose samples fork with
        its last chunk stays here down to its last token (decode batches get reordered, forks
        need order)."""
        return [s for s in self.running
                if s.num_uncomputed_tokens > 1 or (s.pending_forks and s.num_uncomputed_tokens)]

    def _mixed_step_cap(self, queued: int) -> int:
        """Tokens a step with decode rows may hold, by default following the queue (the
        prompt tokens waiting to be admitted). Short queue (at most `mixed_step_tokens`): one
        smallest bucket, so a prompt that arrives waits behind one
        short step at most, and two that arrive together get their first tokens one after
        the other. Longer: the bucket that drains the queue in about two steps, at least
        `mixed_step_tokens`: the running requests wait for the queue to drain whatever the
        steps are (the cost per token is flat), and fewer steps spend less on the decode
        rows and each step's fixed cost, so the last prompt of a burst gets its first token
        sooner."""
        if not self.follows_queue:
            return self.mixed_step_tokens
        if queued <= self.mixed_step_tokens:
            return self.light_step_tokens
        half = -(-queued // 2)
        drains = min((b for b in self.token_buckets if b >= half),
                     default=self.config.max_num_batched_tokens)
        return max(self.mixed_step_tokens, drains)

    def _fit_bucket(self, num_decode: int, budget: int, queued: int) -> int:
        """The prefill budget, cut so that the step ends on a token bucket when it would spill
        up to half the way to the next one (which it would be padded to: 10 decode rows and
        a 128-token prompt would run a 192-token step on the CPU, 256 on a GPU; instead 118
        prompt tokens go now, in a 128-token step, and 10 with the next step), and the cut
        keeps at least half of the prompt tokens waiting (`queued`: those not admitted yet
        that this step may admit). With free padding there is nothing to cut for."""
        if not self.cut_to_buckets:
            return budget
        wanted = min(sum(s.num_uncomputed_tokens for s in self._partial()) + queued, budget)
        total = num_decode + wanted
        lower = max((b for b in self.token_buckets if b <= total), default=total)
        upper = min((b for b in self.token_buckets if b > total), default=2 * lower)
        if 2 * (total - lower) <= upper - lower and 2 * (lower - num_decode) >= wanted > lower - num_decode:
            return lower - num_decode
        return budget

    def _admission_order(self) -> list[Sequence]:
        """The waiting sequences in the order they are admitted: recompute-preempted ones
        first (as queued), then client requests in turns, the one served longest ago (or
        never) first, ties in order of arrival."""
        preempted = [s for s in self.waiting if s.preempted]
        clients: dict[str, list[Sequence]] = {}
        for seq in self.waiting:
            if not seq.preempted:
                clients.setdefault(seq.request.client, []).append(seq)
        self._last_turn = {c: t for c, t in self._last_turn.items() if c in clients}
        if len(clients) == len(self.waiting) - len(preempted) and not self._last_turn:
            return list(self.waiting)  # one sequence each, none served yet: first come, first served
        order = sorted(clients, key=lambda c: self._last_turn.get(c, -1))  # stable: arrival order
        rounds = itertools.zip_longest(*(clients[c] for c in order))
        return preempted + [seq for turn in rounds for seq in turn if seq is not None]

    def _group_size(self, seq: Sequence) -> int:
        """Sequences admitting `seq` will add to the running set (with its forks to come)."""
        beam = seq.request.beam
        if beam is not None and seq.num_output_tokens == 0:
            return max(1, beam.width)
        return 1 + len(seq.pending_forks)

    def _schedule_prefill(self, ops: SchedulerOutput, admit: bool, budget: int) -> SchedulerOutput | None:
        bm = self.block_manager
        bs = bm.block_size
        seqs, counts = [], []
        for seq in self._partial() + (self._admission_order() if admit else []):
            if budget == 0:
                break
            is_new = seq.status is SequenceStatus.WAITING
            if is_new and len(self.running) + self._group_size(seq) > self.config.max_num_seqs:
                break
            if bm.policy.reserves:  # the whole reservation at admission, nothing after
                if is_new and not bm.can_reserve(seq, seq.num_tokens):
                    break
                chunk = min(seq.num_uncomputed_tokens, budget)
            else:
                hits = bm.match_prefix(seq) if is_new else []
                free = bm.num_free_blocks - bm.num_evictable(hits) - (self.watermark_blocks if is_new else 0)
                if hits:
                    computed, table = len(hits) * bs, len(hits)
                else:
                    computed, table = seq.num_computed_tokens, len(seq.block_table)
                    free -= bm.cow_blocks_needed(seq, computed + 1)
                room = free * bs + table * bs - computed
                chunk = min(seq.num_tokens - computed, budget, room)
                if chunk > 0 and is_new and not seq.block_table:
                    bm.take_prefix(seq, hits)
            if chunk <= 0:
                break
            ops.blocks_to_copy += bm.append(seq, seq.num_computed_tokens + chunk)
            if is_new:
                self.waiting.remove(seq)
                self._last_turn[seq.request.client] = next(self._turns)
                seq.preempted = False
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
            seqs.append(seq)
            counts.append(chunk)
            budget -= chunk
            self._fork_pending(seq, chunk, seqs, counts)
        return SchedulerOutput(seqs, counts, is_prefill=True) if seqs else None

    def _fork_pending(self, seq: Sequence, chunk: int, seqs: list, counts: list) -> None:
        """If this step completes `seq`'s prompt, fork its pending samples: they share all
        of its blocks and sample from its last token's logits in this same step (rows with
        0 new tokens right after it)."""
        if not seq.pending_forks or seq.num_computed_tokens + chunk != seq.num_tokens:
            return
        for child in seq.pending_forks:
            self.block_manager.fork(seq, child)
            child.num_computed_tokens = seq.num_tokens
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
            seqs.append(child)
            counts.append(0)
        seq.pending_forks = []

    def _schedule_decode(self, ops: SchedulerOutput) -> SchedulerOutput | None:
        bm = self.block_manager
        scheduled: list[Sequence] = []
        copies: dict[int, list[tuple[int, int]]] = {}
        for seq in list(self.running):
            if seq not in self.running:  # preempted below by an older sequence
                continue
            if seq.num_uncomputed_tokens == 0:  # a beam waiting for its siblings' logits
                continue
            while not bm.can_append(seq, seq.num_computed_tokens + 1):
                victims = self._preempt(scheduled, copies, ops)
                if seq in victims:
                    if self.running and all(s.num_uncomputed_tokens == 0 and s.request is seq.request
                                            for s in self.running):
                        self._does_not_fit()
                    break
            else:
                if seq.num_uncomputed_tokens == 1 and not seq.pending_forks:
                    copies[seq.seq_id] = bm.append(seq, seq.num_computed_tokens + 1)
                    scheduled.append(seq)
        for seq in scheduled:
            ops.blocks_to_copy += copies.get(seq.seq_id, [])
        if not scheduled:
            return None
        return SchedulerOutput(scheduled, [1] * len(scheduled), is_prefill=False)

    def _preempt(self, scheduled: list[Sequence], copies: dict, ops: SchedulerOutput) -> list[Sequence]:
        """Preempt the newest running sequence (swap: with its request group); return the victims."""
        bm = self.block_manager
        victim = self.running[-1]
        group = [s for s in self.running if s.request is victim.request]
        self.num_preemptions += 1
        if (self.config.preemption_mode == "swap" and len(group) < len(self.running)
                and bm.can_swap_out(group)):
            for s in group:  # undo this step's copy-on-write and growth for the group first
                if s in scheduled:
                    scheduled.remove(s)
                    bm.undo_copies(s, copies.pop(s.seq_id, []))
            for s in group:
                self.running.remove(s)
                bm.trim(s)
                s.status = SequenceStatus.SWAPPED
            ops.blocks_to_swap_out += bm.swap_out(group)
            self.swapped.appendleft(group)
            self.num_swap_outs += 1
            return group
        self._requeue(victim, 0)
        return [victim]

    def _requeue(self, victim: Sequence, at: int) -> None:
        """Recompute preemption: free `victim`'s blocks and queue it at `waiting[at]`."""
        self.running.remove(victim)
        self.block_manager.free(victim)
        victim.status = SequenceStatus.WAITING
        victim.preempted = True
        self.waiting.insert(at, victim)

    def _stalled(self) -> bool:
        """Nothing can run: every running sequence is a beam waiting for a sibling's logits,
        and what is queued or swapped out does not fit next to them."""
        return bool(self.running and (self.waiting or self.swapped)
                    and all(s.num_uncomputed_tokens == 0 for s in self.running))

    def _break_stall(self) -> None:
        """Recompute-preempt the newest idle beam of another request than the first one held
        up, so that the held-up request gets its room (its own beams wait for it)."""
        blocked = self.swapped[0][0].request if self.swapped else self.waiting[0].request
        others = [s for s in self.running if s.request is not blocked]
        if not others:
            self._does_not_fit()
        self._requeue(others[-1], 1 if self.waiting else 0)
        self.num_preemptions += 1

    def _does_not_fit(self):
        raise BeamSearchDoesNotFitError(
            f"a beam-search request with {len(self.running) + 1} beams does not fit in the KV "
            f"pool ({self.block_manager.num_blocks} blocks): raise kv_cache_memory or lower "
            f"the beam width")

    def _schedule_swap_in(self, ops: SchedulerOutput) -> None:
        bm = self.block_manager
        while self.swapped:
            group = self.swapped[0]
            if len(self.running) + len(group) > self.config.max_num_seqs:
                break
            reserve = (self.watermark_blocks + len(group)) if self.running else 0
            if not bm.can_swap_in(group, reserve):
                if self.running:
                    break
                # Nothing runs and the group does not fit: recompute it instead.
                self.swapped.popleft()
                for s in reversed(group):
                    bm.free(s)
                    s.status = SequenceStatus.WAITING
                    s.preempted = True
                    self.waiting.appendleft(s)
                continue
            self.swapped.popleft()
            ops.blocks_to_swap_in += bm.swap_in(group)
            for s in group:
                s.status = SequenceStatus.RUNNING
                self.running.append(s)
