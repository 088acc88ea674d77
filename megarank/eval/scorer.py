"""Score arbitrary (query, document) pairs with a (possibly TP/PP/DP-sharded) cross-encoder.

Pairs are split over data-parallel ranks; each model-parallel group runs its share through
megatron's forward-only schedule (so pipeline stages work); the scores come back to every rank in
one all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from megarank.data.collate import PairCollator
from megarank.parallel.runtime import Runtime


class PairScorer:
    """Batches pairs with a collator and scores them, identically on every rank."""

    def __init__(self, collator: PairCollator, batch_size: int) -> None:
        self.collator, self.batch_size = collator, batch_size

    @torch.no_grad()
    def score(self, model: torch.nn.Module, rt: Runtime,
              pairs: list[tuple[str, str]]) -> torch.Tensor:
        """Scores [len(pairs)] (float32, CPU) of (query text, document text) pairs."""
        n = len(pairs)
        per_rank = -(-n // rt.dp_size)
        lo, hi = min(n, rt.dp_rank * per_rank), min(n, (rt.dp_rank + 1) * per_rank)
        mine = pairs[lo:hi]
        batches = [self.collator.encode_pairs(mine[i:i + self.batch_size])
                   for i in range(0, len(mine), self.batch_size)]
        out = torch.zeros(n, dtype=torch.float32, device=rt.device)
        if batches:
            def step(it, m):
                b = next(it).to(rt.device)
                s = m(b.input_ids, b.attention_mask, b.token_type_ids, b.pool_index)
                return s, lambda x: (x.sum() * 0.0, {"scores": x.detach().float()})

            was_training = model.training
            model.eval()
            try:
                results = get_forward_backward_func()(
                    forward_step_func=step, data_iterator=iter(batches), model=[model],
                    num_microbatches=len(batches), seq_length=self.collator.max_length,
                    micro_batch_size=self.batch_size, forward_only=True,
                )
            finally:
                model.train(was_training)
            if rt.is_last_stage and rt.tp_rank == 0:
                out[lo:hi] = torch.cat([r["scores"] for r in results])
        dist.all_reduce(out)
        return out.cpu()
