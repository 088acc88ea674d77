"""Score (query, document) pairs with a (possibly TP/PP/DP-sharded) cross-encoder.

Pairs are batched by length (longest first, :func:`megarank.data.budget.length_passes`), so a
short pair is not padded to a long one; the scores come back in the pairs' order. Batches are
dealt to the data-parallel ranks in turn (each gets long and short ones alike); each
model-parallel group runs its share through megatron's forward-only schedule (so pipeline stages
work); the scores come back to every rank in one all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from megarank.data.batch import PairBatch
from megarank.data.budget import gather_rows, length_passes
from megarank.data.collate import PairCollator
from megarank.data.truncation import max_over_windows
from megarank.parallel.runtime import Runtime


@torch.no_grad()
def score_batches(model: torch.nn.Module, runtime: Runtime, batches: list[PairBatch]) -> torch.Tensor:
    """Scores of every row of ``batches`` (the same list on every rank), float32 on the CPU.
    Padded or packed (one row of pairs end to end) batches alike: a score per pair."""
    offsets = [0]
    for b in batches:
        offsets.append(offsets[-1] + b.num_rows)
    taken = range(runtime.dp_rank, len(batches), runtime.dp_size)  # every dp_size-th batch, in turn
    mine = [batches[i] for i in taken]
    out = torch.zeros(offsets[-1], dtype=torch.float32, device=runtime.device)
    if mine:
        def step(it, m):
            b = next(it).to(runtime.device)
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
        if runtime.is_last_stage and runtime.tp_rank == 0:
            for i, r in zip(taken, results, strict=True):
                out[offsets[i]:offsets[i + 1]] = r["scores"]
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

    CHUNK_BATCHES = 64
    """Pairs are sorted by length within chunks of this many batches (tokenized a chunk at a
    time, so host memory stays bounded on long lists)."""

    def _by_length(self, encoded: list[PairBatch]) -> tuple[list[PairBatch], torch.Tensor]:
        """Right-padded row batches regrouped by length into batches of at most
        ``batch_size`` rows, as the model reads them; and each new row's place in ``encoded``'s
        rows taken in order."""
        c = self.collator
        batches, order, base = [], [], 0
        for chunk in encoded:
            lengths = chunk.attention_mask.sum(dim=1).tolist()
            for rows in length_passes(lengths, max_rows=self.batch_size,
                                      pad_multiple=c.pad_to_multiple_of):
                batches.append(c.model_layout(gather_rows(
                    [(chunk, r, lengths[r]) for r in rows], c.pad_id, c.pad_to_multiple_of)))
                order.extend(base + r for r in rows)
            base += chunk.num_rows
        return batches, torch.tensor(order, dtype=torch.long)

    def _score_rows(self, model: torch.nn.Module, runtime: Runtime,
                    encoded: list[PairBatch]) -> torch.Tensor:
        """Scores of ``encoded``'s rows, in order, computed in batches by length."""
        batches, order = self._by_length(encoded)
        scores = torch.empty(len(order), dtype=torch.float32)
        scores[order] = score_batches(model, runtime, batches)
        return scores

    def score(self, model: torch.nn.Module, runtime: Runtime,
              pairs: list[tuple[str, str]]) -> torch.Tensor:
        """Scores [len(pairs)] (float32, CPU) of (query text, document text) pairs."""
        if self.passages == "max":
            return self._max_over_windows(model, runtime, pairs)
        chunk = self.batch_size * self.CHUNK_BATCHES
        return self._score_rows(model, runtime, [self.collator.encode_pairs(pairs[i:i + chunk])
                                            for i in range(0, len(pairs), chunk)])

    def _max_over_windows(self, model: torch.nn.Module, runtime: Runtime,
                          pairs: list[tuple[str, str]]) -> torch.Tensor:
        c = self.collator
        query_ids, row_query, row_ids, windows = c.pair_windows(pairs)
        chunk = self.batch_size * self.CHUNK_BATCHES
        encoded = [c.encode_tokens(query_ids, row_ids[i:i + chunk], row_query[i:i + chunk], 1)
                   for i in range(0, len(row_ids), chunk)]
        return max_over_windows(self._score_rows(model, runtime, encoded), windows)
