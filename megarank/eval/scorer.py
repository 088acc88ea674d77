"""Score (query, document) pairs with a (possibly TP/PP/DP-sharded) cross-encoder.

Batches are split over data-parallel ranks; each model-parallel group runs its share through
megatron's forward-only schedule (so pipeline stages work); the scores come back to every rank in
one all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from megarank.data.collate import PairBatch, PairCollator, max_over_windows
from megarank.parallel.runtime import Runtime


@torch.no_grad()
def score_batches(model: torch.nn.Module, rt: Runtime, batches: list[PairBatch]) -> torch.Tensor:
    """Scores of every row of ``batches`` (the same list on every rank), float32 on the CPU.
    Padded or packed (one row of pairs end to end) batches alike: a score per pair."""
    sizes = [b.num_rows for b in batches]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    per_rank = -(-len(batches) // rt.dp_size)
    lo_b, hi_b = min(len(batches), rt.dp_rank * per_rank), min(len(batches),
                                                                (rt.dp_rank + 1) * per_rank)
    mine = batches[lo_b:hi_b]
    out = torch.zeros(offsets[-1], dtype=torch.float32, device=rt.device)
    if mine:
        def step(it, m):
            b = next(it).to(rt.device)
            s = m(b.input_ids, b.attention_mask, b.token_type_ids, b.pool_index,
                  packed=b.packed)
            return s, lambda x: (x.sum() * 0.0, {"scores": x.detach().float()})

        was_training = model.training
        model.eval()
        try:
            results = get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter(mine), model=[model],
                num_microbatches=len(mine), seq_length=max(b.input_ids.shape[1] for b in mine),
                micro_batch_size=max(b.input_ids.shape[0] for b in mine), forward_only=True,
            )
        finally:
            model.train(was_training)
        if rt.is_last_stage and rt.tp_rank == 0:
            out[offsets[lo_b]:offsets[hi_b]] = torch.cat([r["scores"] for r in results])
    dist.all_reduce(out)
    return out.cpu()


class PairScorer:
    """Tokenizes pairs with a collator and scores them, identically on every rank.

    ``passages="max"`` (MaxP) scores every window of a long document with its query and keeps
    the best (windows as the collator cuts them: ``data.passage_stride``); ``"first"`` (FirstP)
    scores the first window only (the collator's truncation).
    """

    def __init__(self, collator: PairCollator, batch_size: int, passages: str = "first") -> None:
        if passages not in ("first", "max"):
            raise ValueError(f"passages must be first or max, got {passages!r}")
        if passages == "max" and not collator.pretokenizable:
            raise ValueError("passages=max needs query and document tokenized apart; a chat "
                             "prompt tokenizes each pair whole")
        self.collator, self.batch_size = collator, batch_size
        self.passages = passages

    def score(self, model: torch.nn.Module, rt: Runtime,
              pairs: list[tuple[str, str]]) -> torch.Tensor:
        """Scores [len(pairs)] (float32, CPU) of (query text, document text) pairs."""
        if self.passages == "max":
            return self._max_over_windows(model, rt, pairs)
        batches = [self.collator.model_layout(self.collator.encode_pairs(
            pairs[i:i + self.batch_size])) for i in range(0, len(pairs), self.batch_size)]
        return score_batches(model, rt, batches)

    def _max_over_windows(self, model: torch.nn.Module, rt: Runtime,
                          pairs: list[tuple[str, str]]) -> torch.Tensor:
        c = self.collator
        slot: dict[str, int] = {}
        query_of_pair = [slot.setdefault(p[0], len(slot)) for p in pairs]
        query_ids = c.tokenize_queries(list(slot))
        row_query, row_ids, windows = c.window_rows(
            query_ids, c.full_documents([p[1] for p in pairs]), query_of_pair)
        batches = [c.model_layout(c.encode_tokens(query_ids, row_ids[i:i + self.batch_size],
                                                  row_query[i:i + self.batch_size], 1))
                   for i in range(0, len(row_ids), self.batch_size)]
        return max_over_windows(score_batches(model, rt, batches), windows)
