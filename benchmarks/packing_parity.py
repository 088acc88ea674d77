"""Packed vs padded on this machine's device: the same random stage scores and trains on the
same pairs, right-padded and packed (data.packing), and the table shows how far apart the scores,
losses and gradient norms are, and which attention path the packed rows took.

    python benchmarks/packing_parity.py                    # CUDA when present: bf16, varlen
    python benchmarks/packing_parity.py --device cpu --precision fp32

On the CPU in fp32 the two agree to 1e-5 (tests/unit/test_packing.py asserts it); on a GPU in
bf16 the packed rows go through flash varlen attention and the padded ones through SDPA's
kernels, so they agree to bf16 rounding.
"""

from __future__ import annotations

import argparse
import os

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default=None, help="default: bf16 on CUDA, fp32 on the CPU")
    ap.add_argument("--models", default="bert_tiny,gpt_tiny")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from megarank.bundle import build_bundle
    from megarank.config import compose
    from megarank.data.packing import pack_batch
    from megarank.models import attention
    from megarank.training.losses import group_loss

    cuda = torch.cuda.is_available() and args.device != "cpu"
    precision = args.precision or ("bf16" if cuda else "fp32")
    queries = ["what is lift", "boundary layer transition on a flat plate at high mach numbers"]
    docs = ["lift is the force on a wing " * k for k in (1, 5, 2, 9)] + [
        "supersonic flow over a cone " * k for k in (3, 1, 7, 4)]
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; precision {precision}; "
          f"varlen_attn {'present' if attention.varlen_attention()[0] is not None else 'absent'}")
    print("| model | max abs d score | max score | d loss | d grad norm | packed tokens / padded |")
    print("|---|---|---|---|---|---|")
    for model in args.models.split(","):
        cfg = compose([f"model={model}", "pair.max_length=128", "pair.max_query_length=16",
                       "model.hidden_dropout=0", "model.attention_dropout=0",
                       "task.group_size=4", f"trainer.precision={precision}"])
        with build_bundle(cfg, load_hf=False, device="cuda" if cuda else "cpu") as bundle:
            c, m = bundle.collator, bundle.model
            padded = c.encode_tokens(c.tokenize_queries(queries), c.tokenize_documents(docs),
                                     [0] * 4 + [1] * 4, 4)
            packed = pack_batch(padded, 64)
            out = []
            for b in (padded, packed):
                b = b.to(bundle.runtime.device)
                m.zero_grad_buffer()
                scores = m(b.input_ids, b.attention_mask, b.token_type_ids, b.pool_index,
                           packed=b.packed)
                loss = group_loss(scores.float().view(-1, 4), "listwise", 1.0, 0.0).mean()
                loss.backward()
                norm = torch.sqrt(sum((p.main_grad.float() ** 2).sum() for p in m.parameters()
                                      if getattr(p, "main_grad", None) is not None))
                out.append((scores.detach().float().cpu(), float(loss.detach()), float(norm)))
            (s0, l0, g0), (s1, l1, g1) = out
            print(f"| {model} | {float((s1 - s0).abs().max()):.3g} | "
                  f"{float(s0.abs().max()):.3g} | {abs(l1 - l0):.3g} | {abs(g1 - g0) / g0:.3g} "
                  f"(rel) | {packed.input_ids.numel()} / {padded.input_ids.numel()} |")


if __name__ == "__main__":
    main()
