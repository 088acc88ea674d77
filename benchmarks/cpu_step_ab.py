"""Two CPU step changes measured against their old forms in one process, alternated round by
round so the machine's drift weighs on both alike: the word embedding's gradient straight into
megatron's buffer (megarank.models.embedding_grad) against torch's dense backward and the DDP
hook, and the CPU dropout's bool masks converted through uint8 (megarank.models.dropout._as)
against torch's bool-to-float conversion. MiniLM geometry by default, random weights, one
thread.

    python benchmarks/cpu_step_ab.py [--model minilm] [--rows 16] [--length 128] [--rounds 20]

Prints the median and fastest step of each form and the ratio new / old; for the embedding,
also the largest difference between the two forms' gradients after a step (0: the same bits).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", help="a model config (conf/model/NAME.yaml)")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()

    import torch
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    import megarank.models.dropout as dropout
    from megarank.bundle import build_bundle
    from megarank.config import compose
    from megarank.models import embedding_grad

    torch.set_num_threads(1)
    ids = torch.randint(1000, 20000, (args.rows, args.length),
                        generator=torch.Generator().manual_seed(0))
    batch = (ids, torch.ones_like(ids), torch.zeros_like(ids),
             torch.zeros(args.rows, dtype=torch.long))
    cfg = compose([f"model={args.model}", f"pair.max_length={args.length}", "trainer.device=cpu"])
    print("| change | old step ms (median / fastest) | new step ms | new / old | notes |")
    print("|---|---|---|---|---|")
    with build_bundle(cfg, load_hf=False, device="cpu") as bundle:
        model = bundle.model
        model.train()
        (emb,) = [m for m in model.modules() if isinstance(m, VocabParallelEmbedding)]
        if not embedding_grad.installed(emb):
            raise SystemExit(f"model={args.model}: the build did not install the embedding's "
                             "direct gradient path (megarank.models.embedding_grad); nothing "
                             "to compare")
        new_mask, old_mask = dropout._as, (lambda kept, dtype: kept.to(dtype))

        def step() -> float:
            model.zero_grad_buffer()
            start = time.perf_counter()
            model(*batch).float().sum().backward()
            return time.perf_counter() - start

        def grads() -> dict[str, torch.Tensor]:
            return {n: p.main_grad.clone() for n, p in model.named_parameters()
                    if p.requires_grad}

        def alternate(set_old, set_new) -> tuple[list[float], list[float]]:
            old, new = [], []
            for _ in range(2):
                set_old(), step(), set_new(), step()
            for r in range(args.rounds):
                order = [(set_old, old), (set_new, new)]
                for use, times in order if r % 2 else order[::-1]:
                    use()
                    times.append(step())
            return old, new

        def row(name: str, old: list[float], new: list[float], note: str) -> None:
            mo, mn = statistics.median(old), statistics.median(new)
            print(f"| {name} | {mo * 1e3:.0f} / {min(old) * 1e3:.0f} | {mn * 1e3:.0f} / "
                  f"{min(new) * 1e3:.0f} | {mn / mo:.3f} | {note} |")

        megatron_lookup = functools.partial(embedding_grad.remove, emb)
        direct_rows = functools.partial(embedding_grad.rows_into_main_grad, emb)

        # Gradients compared without dropout (eval mode: megatron's RNG tracker moves on).
        model.eval()
        megatron_lookup(), step()
        reference = grads()
        direct_rows(), step()
        direct = grads()
        model.train()
        diff = max(float((direct[k] - reference[k]).abs().max()) for k in reference)
        old, new = alternate(megatron_lookup, direct_rows)
        row("embedding gradient into main_grad", old, new,
            f"gradients' largest difference {diff:g}")

        def use_mask(fn):
            return lambda: setattr(dropout, "_as", fn)

        old, new = alternate(use_mask(old_mask), use_mask(new_mask))
        dropout._as = new_mask
        row("dropout masks through uint8", old, new, "the same values")


if __name__ == "__main__":
    main()
