"""The configuration schema: one dataclass per Hydra config group.

The dataclasses are the source of truth; the YAML files under ``megarank/conf/`` (shipped in the
package) only pick values, and Hydra's struct mode turns an unknown key into an error at compose
time. Derived values (data-parallel size, micro-batches per step) are not stored here:
:func:`megarank.config.validate.validate` computes them once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass
class ModelConfig:
    """The backbone: a decoder (megatron GPT layers) or an encoder (BERT, post-LayerNorm)."""

    name: str = MISSING
    """Short name used in logs and output directories."""
    family: str = MISSING
    """``gpt`` (decoder: RMSNorm/LayerNorm, RoPE, causal), ``bert`` (encoder, HF-BERT exact) or
    ``deberta`` (DeBERTa-v2/v3 encoder: disentangled attention over relative positions)."""
    num_layers: int = MISSING
    """Transformer layers; must divide by parallel.pipeline_model_parallel_size."""
    hidden_size: int = MISSING
    """Model width."""
    num_attention_heads: int = MISSING
    """Query heads; must divide by parallel.tensor_model_parallel_size."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; None means one per query head."""
    head_dim: int | None = None
    """Width of one attention head; None means hidden_size / num_attention_heads (Qwen3 sets it)."""
    ffn_hidden_size: int = MISSING
    """MLP inner width (per branch for gated MLPs)."""
    vocab_size: int = MISSING
    """Vocabulary rows; the embedding pads them up to a multiple of make_vocab_size_divisible_by
    (megarank.config.padded_vocab_size)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding rows so that each tensor-parallel shard is aligned."""
    max_position_embeddings: int = 512
    """Longest sequence; also the size of learned absolute position tables."""
    position_embedding_type: str = "rope"
    """``rope`` (decoders), ``learned_absolute`` (BERT) or ``relative`` (DeBERTa)."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    rope_scaling: str | None = None
    """RoPE frequency scaling: None (plain RoPE) or ``llama3`` (Llama 3.1/3.2/3.3: long
    wavelengths divided by rope_scaling_factor, a smooth blend between the two bands)."""
    rope_scaling_factor: float = 8.0
    """``llama3`` scaling: the factor long-wavelength frequencies are divided by (HF ``factor``)."""
    rope_low_freq_factor: float = 1.0
    """``llama3`` scaling: wavelengths above original_max_position_embeddings / this are scaled."""
    rope_high_freq_factor: float = 4.0
    """``llama3`` scaling: wavelengths below original_max_position_embeddings / this are kept."""
    rope_original_max_position_embeddings: int = 8192
    """``llama3`` scaling: the context length the model was pre-trained with before scaling."""
    sliding_window: int | None = None
    """Decoders: the HF model's attention window (Mistral); megarank attends over the whole
    sequence, which is the same while pair.max_length <= sliding_window (validate() checks it)."""
    position_offset: int = 0
    """Encoders: the position id of the first token. RoBERTa and XLM-RoBERTa: pad_token_id + 1
    (fairseq keeps the rows below for padding), so pair.max_length may use
    max_position_embeddings - position_offset positions."""
    encoder_head: str = "bert"
    """Encoders' classifier on the first token: ``bert`` (BertPooler dense + tanh, dropout,
    classifier) or ``roberta`` (RobertaClassificationHead: dropout, dense, tanh, dropout,
    out_proj) or ``deberta`` (ContextPooler: dropout, dense, GELU; dropout, classifier)."""
    classifier_dropout: float | None = None
    """Dropout in the classifier head; None: hidden_dropout (HF's rule for classifier_dropout)."""
    normalization: str = "RMSNorm"
    """``RMSNorm`` or ``LayerNorm``."""
    layernorm_epsilon: float = 1e-6
    """Epsilon of every norm layer."""
    activation: str = "silu"
    """``silu`` or ``gelu`` (exact erf GELU, as HF BERT)."""
    gated_linear_unit: bool = True
    """SwiGLU/GeGLU MLP (Llama, Qwen) rather than a plain two-layer MLP (BERT)."""
    add_bias_linear: bool = False
    """Biases on the linear layers (BERT: True; Llama/Qwen: False)."""
    add_qkv_bias: bool = False
    """Bias on the QKV projection only (Qwen2)."""
    qk_layernorm: bool = False
    """Norm on queries and keys per head (Qwen3)."""
    type_vocab_size: int = 2
    """Token-type (segment) embeddings, encoders only; 0: none (DeBERTa-v3)."""
    position_buckets: int = 256
    """DeBERTa: relative distances are exact up to position_buckets / 2 and log-bucketed beyond,
    2 * position_buckets embeddings; <= 0: no bucketing (2 * max_relative_positions)."""
    max_relative_positions: int = -1
    """DeBERTa: the distance the last bucket stands for; < 1: max_position_embeddings."""
    norm_rel_ebd: str = "layer_norm"
    """DeBERTa: ``layer_norm`` (v3: the relative embeddings go through a LayerNorm of their own)
    or ``none``."""
    pos_att_type: list[str] = field(default_factory=lambda: ["p2c", "c2p"])
    """DeBERTa: the position terms added to content-to-content attention, a subset of ``c2p``
    (query to key position) and ``p2c`` (key to query position); scores are divided by
    sqrt(head_dim * (1 + number of terms))."""
    share_att_key: bool = True
    """DeBERTa: position queries and keys come from each layer's content query and key weights
    (v3); false: from position projections of their own (HF pos_query_proj, pos_key_proj)."""
    position_biased_input: bool = False
    """DeBERTa: add learned absolute positions to the input embeddings (v3: false)."""
    pooler_dropout: float = 0.0
    """DeBERTa: dropout before ContextPooler's dense layer (HF pooler_dropout)."""
    hidden_dropout: float | None = None
    """Dropout after attention and MLP; None: model.hf_path's config.json's, else 0 (0 keeps
    runs bitwise comparable across layouts). A value set here wins over the HF config's."""
    attention_dropout: float | None = None
    """Dropout on attention probabilities; None as for hidden_dropout."""
    init_method_std: float = 0.02
    """Std of the normal initialisation of weights."""
    tokenizer: str = str(ASSETS / "tokenizers" / "bert-uncased")
    """A Hugging Face tokenizer directory (or hub name, where a hub is reachable)."""
    tie_word_embeddings: bool = False
    """Decoders: the LM output layer is the input embedding (matters for the yes/no head)."""
    hf_model_type: str | None = None
    """HF ``model_type`` this backbone corresponds to (bert, roberta, xlm-roberta, deberta-v2,
    llama, mistral, qwen2, qwen3); set by import. It picks the weight-name table of conversion."""
    init_from: str | None = None
    """A megarank checkpoint directory whose model weights start this run (any layout)."""
    hf_path: str | None = None
    """A Hugging Face model directory: its config sets the architecture fields above and its
    weights start this run (sharded to the layout as they are read)."""


@dataclass
class ParallelConfig:
    """Tensor and pipeline model-parallel sizes; data parallel is what is left of the world."""

    tensor_model_parallel_size: int = 1
    """Ranks that split each layer's weights (Megatron column/row parallel)."""
    pipeline_model_parallel_size: int = 1
    """Ranks that split the layer stack into stages."""
    sequence_parallel: bool = False
    """Shard LayerNorm/dropout activations along the sequence over the TP group (needs tp > 1)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over the data-parallel group (ZeRO-1)."""


@dataclass
class TaskConfig:
    """What the scores are trained towards."""

    loss: str = MISSING
    """``listwise`` (softmax CE over the group), ``pairwise`` (hinge), ``pointwise`` (BCE),
    ``distill`` (KL divergence to the teacher scores alone), ``margin_mse`` (MSE between the
    student's and the teacher's positive-minus-negative margins), ``ranknet`` (pairwise logistic
    over every ordered pair), ``lambdarank`` (RankNet weighted by each pair's NDCG change) or
    ``listnet`` (cross-entropy between top-one softmaxes); see megarank/training/losses.py."""
    group_size: int = 8
    """Documents per query in a training group: 1 positive + group_size-1 negatives."""
    temperature: float = 1.0
    """Listwise, listnet, ranknet, lambdarank: scores are divided by this (before the softmax,
    or inside RankNet's logistic)."""
    margin: float = 1.0
    """Pairwise: hinge margin between the positive and each negative."""
    distill_weight: float = 0.0
    """Weight of listwise distillation, KL(softmax(teacher / teacher_temperature) ||
    softmax(scores)), added to the loss; > 0 (or loss ``distill``) needs ``pos_scores`` and
    ``neg_scores`` on every training record."""
    teacher_temperature: float = 1.0
    """Teacher scores are divided by this before their softmax (0.05 for cosine similarities);
    margin_mse divides the teacher's margins by it; listnet with target labels divides the
    labels by it."""
    target: str = "labels"
    """ranknet, lambdarank, listnet: the order they learn, ``labels`` (the positive above its
    negatives) or ``teacher`` (the teacher scores' order; needs pos_scores/neg_scores)."""
    hard_weight: float = 1.0
    """Weight of the loss named by ``loss``; with distill_weight the total is hard_weight *
    L(loss) + distill_weight * L(distill_term), a mixed hard-label + distillation loss."""
    distill_term: str = "kl"
    """What distill_weight adds: ``kl`` (the distill loss), ``margin_mse``, or ``ranknet`` /
    ``lambdarank`` / ``listnet`` on the teacher's order."""
@dataclass
class PairConfig:
    """The pair format: how a (query, document) pair becomes the tokens a model scores, and what
    it scores there. The one definition of it: the scoring contract (``scoring.json``, see
    megarank/data/contract.py) is built from this group alone and read by the collator,
    export, serving and evaluation; a saved model's contract is checked against it, never
    written back into it."""

    head: str = "classifier"
    """``classifier`` (a linear score on the pooled state, HF *ForSequenceClassification) or
    ``yes_no`` (decoders: logit("yes") - logit("no") at the last token, as Qwen3-Reranker)."""
    yes_token: str = "yes"
    """yes_no head: the text of the positive answer token."""
    no_token: str = "no"
    """yes_no head: the text of the negative answer token."""
    max_length: int = 128
    """Tokens per (query, document) pair, special and template tokens included; the document
    is truncated first."""
    max_query_length: int = 32
    """Tokens kept of the query before the document is fitted."""
    template: str = "Query: {query}\nDocument: {document}\nRelevant:"
    """Decoders: how a pair is written, {query} and {document} (and, with a chat prompt,
    {instruction}) filled in. Without ``prefix`` its pieces are tokenized apart and the
    document cut to fit; with ``prefix`` (a chat prompt) the filled-in text is tokenized as one
    and cut at its end to fit max_length, the query cut first to max_query_length. Encoders use
    the tokenizer's own pair template ([CLS] query [SEP] document [SEP]) and ignore this."""
    prefix: str | None = None
    """Decoders: a chat prompt's text before the pair (a system turn and the start of the user
    turn), tokenized on its own and never cut; set, it selects the chat layout
    (pair=qwen3_reranker: Qwen3-Reranker's)."""
    suffix: str = ""
    """Chat prompt: the text after the pair (end of the user turn, the assistant's opening),
    tokenized on its own and never cut."""
    instruction: str | None = None
    """Chat prompt: the {instruction} of pairs whose record has none (a triplet's
    "instruction" or FlagEmbedding's "prompt" field, a pairs file's "instruction")."""


@dataclass
class DataConfig:
    """Training triplets and the held-out collection for periodic evaluation."""

    name: str = MISSING
    """Short name used in logs."""
    train_path: str = MISSING
    """Triplet JSONL in the FlagEmbedding form {"query", "pos": [...], "neg": [...]}, or a
    directory ``megarank prepare`` wrote from such files (tokenized once, memory-mapped)."""
    max_records: int | None = None
    """Read only the first N records (None: all)."""
    pad_to_multiple_of: int = 8
    """Dynamic padding per micro-batch is rounded up to this."""
    packing: bool = False
    """Padding-free training: a micro-batch's pairs are laid end to end in one row, attention
    kept inside each pair (flash varlen attention on CUDA, an exact unpacked SDPA elsewhere),
    positions restarting per pair, each pair scored at its own token. Scores, losses and
    gradients equal the padded micro-batch's; linears, norms and MLPs see no padding."""
    packed_multiple: int = 64
    """With data.packing: the packed row's width is rounded up to a multiple of this, so a run
    sees few distinct shapes (kernel plans and allocator blocks are reused); the remainder is
    one padding segment."""
    tokens_per_micro_batch: int | None = None
    """Micro-batches sized by tokens instead of by trainer.micro_batch_size: each rank's groups
    of a step (trainer.global_batch_size / data-parallel size) are cut, in order and whole, into
    micro-batches of at most this many tokens (the packed row's width with data.packing, else
    rows x padded width), so short pairs make larger micro-batches; their number varies by step
    and each one's loss counts by its share of the step's groups. At least one group at its
    longest (task.group_size x pair.max_length). None: trainer.micro_batch_size groups each."""
    passages: str = "first"
    """How training, evaluation and scoring read a document longer than a pair holds:
    ``first`` (FirstP: its first pair.max_length tokens) or ``max`` (MaxP: windows of it, each
    scored with the query, the best window's score is the document's; training's loss reads
    that score, so the gradient goes to the best window)."""
    passage_stride: int | None = None
    """MaxP: tokens between window starts; None: half a window."""
    train_passages: int = 4
    """MaxP at training: a document is read as at most this many windows, its first ones (a
    step costs up to this many times the pairs); evaluation and scoring read every window."""
    prefetch_steps: int = 2
    """Steps of micro-batches made ahead on a background thread while a step runs; 0: each is
    made when the step asks for it. The wait shows as ``data_wait_s`` in metrics.jsonl."""
    eval_collection: str | None = None
    """A BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels.tsv, split.json); None: no eval."""
    eval_run: str | None = None
    """First-stage TREC run whose top candidates are reranked; default <eval_collection>/run.bm25.trec."""
    eval_split: str = "test"
    """Which split.json list of queries to evaluate on."""
    eval_top_k: int = 30
    """Candidates per query reranked at evaluation."""
    eval_max_queries: int | None = None
    """Evaluate on the first N queries of the split only (None: all)."""


@dataclass
class TrainerConfig:
    """The loop: steps, batch sizes, logging, evaluation and checkpoint cadence."""

    max_steps: int = 100
    """Optimizer steps to train for."""
    global_batch_size: int = 8
    """Query groups per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 2
    """Query groups per forward pass on one rank; a group is never split."""
    stop_at_step: int | None = None
    """Stop (and save) after this step although the LR schedule spans max_steps, as a preempted
    job does; a later ``trainer.resume=true`` run continues to max_steps."""
    log_interval: int = 10
    """Steps between metric lines (progress bar and metrics.jsonl)."""
    eval_interval: int = 0
    """Steps between evaluations on the held-out queries; 0 turns periodic evaluation off."""
    eval_at_start: bool = False
    """Evaluate the starting model before the first step (a baseline in metrics.jsonl)."""
    eval_at_end: bool = True
    """Evaluate once after the last step (when data.eval_collection is set)."""
    eval_batch_size: int = 64
    """Pairs per forward pass at evaluation."""
    save_interval: int = 0
    """Steps between checkpoints; 0: only the final one."""
    save_final: bool = True
    """Write a checkpoint after the last step."""
    output_dir: str | None = None
    """Run directory (config, checkpoints, metrics.jsonl); None: runs/<date>-<time>-<model>-<task>."""
    resume: bool = False
    """Continue from the latest checkpoint in output_dir (model, optimizer, scheduler, sampler,
    RNG). A checkpoint whose files do not match what was written (truncated, missing) is
    reported by file, and the newest earlier complete one is taken instead, said in the log."""
    keep_last: int | None = None
    """Keep only the newest N complete checkpoints (older ones are deleted after each save;
    the best one is kept too); None keeps every one."""
    keep_best: str | None = None
    """A held-out metric (``NDCG@10``, ``MRR@10`` or ``Recall@10``): each evaluation that
    improves it saves a checkpoint and marks it ``checkpoints/best``, which keep_last never
    deletes and ``megarank convert to-hf --best`` exports."""
    async_save: bool = False
    """Write checkpoints in megatron's background writer process: the step loop goes on while
    a checkpoint is written, and it counts as complete (renamed, ``latest`` moved) only when
    every rank's write has finished. One save is in flight at a time."""
    max_nonfinite_steps: int = 3
    """A step whose loss or gradients are not finite is skipped (no update) and counted; after
    this many in a row the run stops with an error, its last good checkpoint intact. A
    checkpoint is never written from non-finite weights or right after a non-finite step."""
    seed: int = 1234
    """Seeds weights, data order, group sampling and dropout."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` or ``fp16`` (the last two need CUDA)."""
    recompute: str = "none"
    """Activation recomputation: ``none``, ``selective`` (attention core) or ``full`` (every
    layer, uniform), trading compute for activation memory."""
    kernels: str = "auto"
    """``auto`` (Transformer Engine when usable, else local + SDPA), ``te`` or ``local``."""
    pooled_last_layer: bool = True
    """The last layer computes only the rows the head reads (each pair's pooled token): keys
    and values of every token, the queries, output projection and MLP of the pooled ones.
    Scores and gradients are the full layer's; the saving is most of one layer (MiniLM: ~14%
    of a step's linear FLOPs). Local kernels only (not TE, DeBERTa or sequence parallelism,
    where the last layer computes every row). false: every row, as Hugging Face does."""
    keep_freed_memory: bool = True
    """On the CPU (glibc): freed memory stays in the process for the next step's tensors
    instead of being returned to the system and mapped, page-faulted and zeroed again every
    step (MiniLM: ~40,000 page faults and 0.13 s of kernel time a step here; the process's
    resident memory stays at its peak). false: glibc's defaults."""
    progress_bar: bool = True
    """Show a tqdm bar on rank 0."""


@dataclass
class OptimConfig:
    """AdamW through megatron's optimizer, with warmup and decay through its scheduler."""

    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of the decay."""
    weight_decay: float = 0.01
    """Decoupled weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 turns clipping off."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr."""
    decay_style: str = "cosine"
    """``cosine``, ``linear`` or ``constant`` after warmup."""
    loss_scale: float | None = None
    """fp16 only: a fixed loss scale; None scales dynamically (megatron's DynamicGradScaler)."""
    initial_loss_scale: float = 65536.0
    """fp16 only: the dynamic scaler's starting scale."""


@dataclass
class LoggingConfig:
    """Where metrics go besides metrics.jsonl."""

    tensorboard: bool = False
    """Write TensorBoard event files under ``<output_dir>/tensorboard`` (rank 0), flushed with
    every record, so ``tensorboard --logdir runs`` shows runs live and side by side."""
    wandb: bool = False
    """Log to Weights & Biases (rank 0)."""
    wandb_project: str = "megarank"
    """W&B project."""
    wandb_mode: str = "offline"
    """``offline`` (default: nothing leaves the machine) or ``online``."""
    level: str = "INFO"
    """Python logging level on rank 0."""


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning: LoRA adapters on megatron's parallel linears.

    ``none`` trains every weight. ``lora`` freezes the backbone and trains, on each target linear,
    ``W x + (alpha / rank) * B A x`` with one (A, B) pair per Hugging Face projection (q, k, v of a
    fused QKV; gate and up of a fused fc1), so adapters convert to and from PEFT exactly.
    ``qlora`` is LoRA over a base stored 4-bit (NF4, bitsandbytes). ``dora`` is PEFT's DoRA:
    LoRA plus a trained magnitude per output row, ``m / ||W + s B A|| * (W x + s B A x)``
    (megarank.models.dora); DoRA over a 4-bit base (QDoRA) is not supported.
    """

    method: str = "none"
    """``none``, ``lora``, ``qlora`` or ``dora``."""
    rank: int = 16
    """LoRA rank r."""
    alpha: float = 32.0
    """LoRA alpha; the update is scaled by alpha / rank (PEFT's rule)."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    targets: list[str] = field(
        default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    """megatron linears that get adapters, in every layer (decoders and encoders name them
    alike): linear_qkv, linear_proj, linear_fc1, linear_fc2."""
    train_head: bool = True
    """Train the scoring head (classifier, and an encoder's pooler) with the adapters. A yes/no
    head reads the vocabulary's rows and stays frozen."""


@dataclass
class TrainConfig:
    """A whole run: one node of each group."""

    model: ModelConfig = MISSING
    parallel: ParallelConfig = MISSING
    task: TaskConfig = MISSING
    pair: PairConfig = field(default_factory=PairConfig)
    data: DataConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)


GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "task": TaskConfig,
    "pair": PairConfig,
    "data": DataConfig,
    "trainer": TrainerConfig,
    "optim": OptimConfig,
    "logging": LoggingConfig,
    "peft": PeftConfig,
}


def _asset(rel: str) -> str:
    return str(ASSETS / rel)


def package_path(rel: str) -> str:
    """``${package:pkg/sub/dir}``: a folder inside an installed Python package (model files)."""
    import importlib.util

    name, _, sub = rel.partition("/")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"${{package:{rel}}}: package {name!r} is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))) / sub)


def register() -> None:
    """Register the schema with Hydra's ConfigStore and the ``${asset:...}`` resolver. Idempotent."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", _asset)
    if not OmegaConf.has_resolver("package"):
        OmegaConf.register_new_resolver("package", package_path)
    cs = ConfigStore.instance()
    cs.store(name="base_train", node=TrainConfig)
    for group, node in GROUPS.items():
        cs.store(group=group, name=f"base_{group}", node=node)
