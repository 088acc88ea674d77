"""The plan as a text table: the model and layout, one column per pipeline stage, the FLOPs and
whether the largest stage fits a card."""

from __future__ import annotations

from megarank.training.sizing.fit import fit, suggestions
from megarank.training.sizing.records import GIB, HEADROOM, RECOMPUTE, MemoryPlan


def _unit(plan: MemoryPlan) -> tuple[str, int]:
    """GiB, or MiB for a plan whose largest stage stays under 1 GiB."""
    return ("GiB", GIB) if plan.total() >= GIB else ("MiB", 1024**2)


def format_plan(plan: MemoryPlan, gpu: str | None = None, headroom: float = HEADROOM) -> str:
    """The plan as a text table: one column per pipeline stage, GiB per GPU; with ``gpu``, a
    last line saying whether (and by how much) the largest stage fits that card."""
    lines = [*_plan_header(plan), "", *_stage_table(plan)]
    per_gpu = plan.step_flops / plan.world_size
    extra = plan.recompute_flops.get(plan.recompute, 0.0)
    lines += ["", f"FLOPs per step: {plan.step_flops:.3e} model (forward + backward), "
              f"{per_gpu:.3e} per GPU; recompute {plan.recompute} adds {extra:.3e}"]
    if gpu is not None:
        lines += _fit_lines(plan, gpu, headroom)
    return "\n".join(lines)


def _plan_header(plan: MemoryPlan) -> list[str]:
    """The model, the layout and the micro-batch."""
    kernels = ("CUDA kernels (TE / fused norms and SwiGLU, flash attention)"
               if plan.device == "cuda" else "CPU kernels (megatron local layers, SDPA)")
    zero = f"distributed optimizer over DP {plan.dp}" if plan.distributed_optimizer \
        else "plain optimizer"
    return [
        f"megarank plan: {plan.name}, {plan.total_params / 1e9:.3f}B parameters",
        f"layout: {plan.world_size} GPUs = TP {plan.tp} x PP {plan.pp} x DP {plan.dp}"
        f"{', sequence parallel' if plan.sequence_parallel else ''}; {plan.precision}; {zero}; "
        f"recompute {plan.recompute}; {kernels}",
        (f"micro-batch: at most {plan.token_budget:,} tokens (data.tokens_per_micro_batch), "
         f"planned as {plan.sequences:.1f} sequences of {plan.length} tokens; whole groups of "
         f"{plan.documents} documents, at most {plan.num_microbatches} micro-batches per step on "
         f"each DP rank (global batch {plan.global_batch} groups)" if plan.token_budget else
         f"micro-batch: {plan.groups} group(s) x {plan.documents} documents"
         f"{f' x {plan.windows} windows (MaxP)' if plan.windows > 1 else ''} x {plan.length} "
         f"tokens = {plan.sequences * plan.length:,} tokens; {plan.num_microbatches} "
         f"micro-batches per step on each DP rank (global batch {plan.global_batch} groups)"),
    ]


def _stage_table(plan: MemoryPlan) -> list[str]:
    """One column per pipeline stage: model state, activations and the total per GPU."""
    unit, div = _unit(plan)

    def _gib(n: float) -> str:
        return f"{n / div:.2f}"

    cols = [f"stage {s.stage} ({s.layers} layers)" for s in plan.stages]
    rows: list[tuple[str, list[str]]] = [
        ("parameters per GPU", [f"{s.params / 1e6:,.1f}M" for s in plan.stages]),
        (f"weights ({plan.precision})", [_gib(s.weights) for s in plan.stages]),
        ("gradients (fp32)", [_gib(s.grads) for s in plan.stages]),
        ("optimizer, plain", [_gib(s.optim_plain) for s in plan.stages]),
        (f"optimizer, distributed (/{plan.dp})", [_gib(s.optim_distributed) for s in plan.stages]),
    ]
    for mode in RECOMPUTE:
        rows.append((f"activations / micro-batch, {mode}",
                     [_gib(s.saved_per_micro_batch[mode]) for s in plan.stages]))
    rows += [
        ("micro-batches in flight", [str(s.in_flight) for s in plan.stages]),
        ("pipeline outputs kept", [_gib(s.pipeline_outputs) for s in plan.stages]),
        (f"recompute working set ({plan.recompute})",
         [_gib(s.working_set[plan.recompute]) for s in plan.stages]),
        (f"activations ({plan.recompute})", [_gib(s.activations(plan.recompute))
                                             for s in plan.stages]),
        ("total per GPU", [_gib(s.total(plan.recompute, plan.distributed_optimizer))
                           for s in plan.stages]),
    ]
    w0 = max(len(r[0]) for r in rows) + 2
    widths = [max(len(c), *(len(r[1][i]) for r in rows)) + 2 for i, c in enumerate(cols)]
    lines = [f"{unit} per GPU".ljust(w0) + "".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    for label, vals in rows:
        lines.append(label.ljust(w0) + "".join(v.rjust(w) for v, w in zip(vals, widths, strict=True)))
    return lines


def _fit_lines(plan: MemoryPlan, gpu: str, headroom: float) -> list[str]:
    """Whether the largest stage fits ``gpu``, and what would make it fit."""
    f = fit(plan, gpu, headroom)
    verdict = (f"fits, {f.spare / GIB:.1f} GiB to spare" if f.fits
               else f"DOES NOT FIT, short by {-f.spare / GIB:.1f} GiB")
    lines = [f"GPU {f.gpu}: {f.capacity / GIB:.0f} GiB, {headroom:.0%} left free -> "
             f"{f.usable / GIB:.1f} GiB usable; largest stage needs "
             f"{f.needed / GIB:.1f} GiB: {verdict}"]
    if not f.fits:
        tips = suggestions(plan, gpu, headroom)
        lines.append("  would fit with: " + "; ".join(tips) if tips else
                     "  no recompute or optimizer setting makes it fit: use more GPUs "
                     "(TP/PP), a shorter pair.max_length or a smaller micro-batch")
    return lines
