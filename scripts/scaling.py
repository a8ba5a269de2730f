"""Memory per GPU by component for the paper's models, Qwen2.5-Math-1.5B and 7B, trained by this repository
under DDP, FSDP2 on 8 GPUs and LoRA (r = 16) on one GPU; which configuration runs the paper's grid on which GPU.

Every figure is computed here from the models' configs (written below) and the paper's workload: 16 prompts x 8
completions of 256 tokens per step, prompts taken as 256 tokens (GSM8K's run 100-250 with the template, MATH's
longer), micro-batches of 16 sequences (`micro_batch_size`). As the trainer runs them: float32 weights,
gradients and AdamW moments; the compute in bfloat16 under autocast (`dtype: bfloat16`); x = 0 (every layer
runs: the largest cache and gather; skipping U layers takes U/N off both).

Activations per token and decoder layer are counted from what autograd keeps for the backward pass of a
Qwen2 layer under bfloat16 autocast with float32 weights (`activation_bytes_per_token`); tests/test_scaling.py
checks that count against the tensors torch actually saves for a small Qwen2 model. The rest are sizes of
tensors the code allocates: the logits of the completion positions (bfloat16, kept for the backward pass, and
one chunk of rows turned into float32 at a time by `policy.chosen_logprobs`), the rollout's KV cache, the weights
FSDP2 gathers.

    python scripts/scaling.py            # the Markdown tables of docs/scaling.md
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
FLOAT32, BFLOAT16 = 4, 2
ADAMW_MOMENTS = 2  # exp_avg and exp_avg_sq, float32 like the weights


@dataclass(frozen=True)
class Model:
    """The shapes that set memory (config.json of the Hub checkpoint)."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hidden // self.heads

    @property
    def layer_parameters(self) -> int:
        """One decoder layer: q/k/v with biases, o, the gated MLP, two RMSNorms."""
        h, kv = self.hidden, self.kv_dim
        attention = (h * h + h) + 2 * (h * kv + kv) + h * h
        return attention + 3 * h * self.intermediate + 2 * h

    @property
    def root_parameters(self) -> int:
        """Outside the layers: the embedding, the final norm and (untied) the output head."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + self.hidden

    @property
    def parameters(self) -> int:
        return self.layers * self.layer_parameters + self.root_parameters

    @property
    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one block: q k v o gate up down."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    @property
    def linear_weights(self) -> int:
        """The blocks' linear weight matrices (biases apart): what LoRA adapts, and what a merged copy holds."""
        return self.layers * sum(fan_in * fan_out for fan_in, fan_out in self.linear_shapes)

    def lora_parameters(self, rank: int) -> int:
        """LoRA A (r x in) and B (out x r) on every linear layer of the blocks (PEFT's all-linear)."""
        return self.layers * sum(rank * (fan_in + fan_out) for fan_in, fan_out in self.linear_shapes)


QWEN_MATH_1_5B = Model("Qwen2.5-Math-1.5B", hidden=1536, layers=28, intermediate=8960, heads=12, kv_heads=2,
                       vocab=151936, tied_embeddings=True)
QWEN_MATH_7B = Model("Qwen2.5-Math-7B", hidden=3584, layers=28, intermediate=18944, heads=28, kv_heads=4,
                     vocab=151936, tied_embeddings=False)


@dataclass(frozen=True)
class Workload:
    """One step of the paper's grid, and how the trainer cuts it."""

    prompts: int = 16
    generations: int = 8
    prompt_tokens: int = 256
    completion_tokens: int = 256
    micro_batch: int = 16  # sequences per forward/backward (micro_batch_size)
    lora_rank: int = 16  # TRL ModelConfig's lora_r

    @property
    def sequence_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def activation_bytes_per_token(model: Model) -> int:
    """Bytes autograd keeps per token and decoder layer for the backward of a Qwen2 layer under bf16 autocast.

    Float32 (4 B): the layer's input, the residual after attention, each RMSNorm's normalised output (2 x 2).
    Bfloat16 (2 B): the autocast copy of the normalised input that each of q, k, v, gate and up casts for itself
    (5); q and rotate_half(q), k and rotate_half(k) kept by the rotary multiplications; SDPA's inputs (q cast
    from the float32 rotary product, k and v repeated to every head: 3 of hidden size) and output, and the
    contiguous copy o_proj reads; the MLP's gate, SiLU, up outputs and their product (4 of intermediate size).
    """
    h, kv, i = model.hidden, model.kv_dim, model.intermediate
    float32 = FLOAT32 * (4 * h)
    bfloat16 = BFLOAT16 * (5 * h + 2 * h + 2 * kv + 3 * h + 2 * h + 4 * i)
    return float32 + bfloat16


def activations(model: Model, work: Workload, checkpointing: bool) -> float:
    """Bytes the backward of one micro-batch needs from its forward, the logits apart.

    Without checkpointing every layer's saved tensors; with it each layer's input (float32) plus one layer's
    saved tensors, rebuilt while its backward runs.
    """
    tokens = work.micro_batch * work.sequence_tokens
    per_layer = activation_bytes_per_token(model) * tokens
    if checkpointing:
        return model.layers * FLOAT32 * model.hidden * tokens + per_layer
    return model.layers * per_layer


def logits(model: Model, work: Workload) -> float:
    """The completion positions' logits of one micro-batch in bfloat16 (what the backward keeps), and the float32
    rows that `policy.chosen_logprobs` works on at a time (a chunk and its softmax)."""
    from nested_reft.engines.logprobs import CHUNK_ROWS

    return work.micro_batch * (work.completion_tokens + 1) * model.vocab * BFLOAT16 + 2 * CHUNK_ROWS * model.vocab * FLOAT32


def kv_cache(model: Model, sequences: int, work: Workload) -> float:
    """The rollout's cache at its last token: keys float32 (the rotary product of bf16 keys and float32 cos/sin),
    values bfloat16, for every layer and every token of `sequences` sequences."""
    per_token = model.layers * model.kv_dim * (FLOAT32 + BFLOAT16)
    return sequences * work.sequence_tokens * per_token


@dataclass(frozen=True)
class Setup:
    """How the model lies on the GPUs."""

    name: str
    gpus: int
    sharded: bool
    lora: bool


DDP = Setup("DDP (every GPU)", gpus=8, sharded=False, lora=False)
FSDP2_8 = Setup("FSDP2 on 8 GPUs", gpus=8, sharded=True, lora=False)
LORA_1 = Setup("LoRA r=16 on 1 GPU", gpus=1, sharded=False, lora=True)
SETUPS = (DDP, FSDP2_8, LORA_1)


def components(model: Model, setup: Setup, work: Workload) -> dict[str, float]:
    """Bytes per GPU by component. Persistent: weights and AdamW; only while training: gradients, DDP's buckets,
    activations, logits, the layers FSDP2 gathers for the forward and backward; only while generating: the KV
    cache, (FSDP2) the whole weights it gathers once per step and (LoRA) the merged copy of the adapted weights."""
    trained = model.lora_parameters(work.lora_rank) if setup.lora else model.parameters
    weights = FLOAT32 * (model.parameters + (trained if setup.lora else 0))
    share = setup.gpus if setup.sharded else 1
    sequences = work.prompts * work.generations // setup.gpus  # each GPU samples its share of the rollouts
    return {
        "weights": weights / share,
        "gradients": FLOAT32 * trained / share,
        "DDP gradient buckets": FLOAT32 * trained if setup.gpus > 1 and not setup.sharded else 0.0,
        "AdamW state": ADAMW_MOMENTS * FLOAT32 * trained / share,
        "activations, no checkpointing": activations(model, work, checkpointing=False),
        "activations, checkpointing": activations(model, work, checkpointing=True),
        "logits": logits(model, work),
        "gathered for training (root + 2 layers)": (
            FLOAT32 * (model.root_parameters + 2 * model.layer_parameters) if setup.sharded else 0.0),
        "KV cache (rollout)": kv_cache(model, sequences, work),
        "gathered for generation": FLOAT32 * model.parameters if setup.sharded else 0.0,
        # LoRA rollouts sample from W + BA, every adapted weight's float32 original saved aside (lora.merged_for_sampling)
        "merged adapter weights (rollout)": FLOAT32 * model.linear_weights if setup.lora else 0.0,
    }


def peaks(parts: dict[str, float]) -> dict[str, float]:
    """The two phases' totals: generation holds the persistent state, the cache, the gathered or merged weights;
    training the persistent state, gradients, buckets, activations, logits and the layers gathered for it."""
    persistent = parts["weights"] + parts["AdamW state"]
    training = persistent + parts["gradients"] + parts["DDP gradient buckets"] + parts["logits"] + parts[
        "gathered for training (root + 2 layers)"]
    return {
        "generation": persistent + parts["KV cache (rollout)"] + parts["gathered for generation"]
        + parts["merged adapter weights (rollout)"],
        "training, no checkpointing": training + parts["activations, no checkpointing"],
        "training, checkpointing": training + parts["activations, checkpointing"],
    }


GPUS = {"A100/H100 80 GB": 80 * GB, "H200 141 GB": 141 * GB}
# measured peak / this model's peak on an H200 at the 1.5B shapes, the largest of eager, LoRA, checkpointing and
# generation (1.15-1.22; docs/benchmarks.md, the second device check): what the model leaves out (the caching
# allocator, autocast's bfloat16 weight copies) is kept as a margin when judging whether a step fits
MEASURED_OVER_MODELLED = 1.22


def verdict(peak: dict[str, float], capacity: float, margin: float = MEASURED_OVER_MODELLED) -> str:
    """Whether a step fits a GPU of `capacity` bytes, and with which gradient checkpointing setting, with the
    modelled peaks scaled by `margin`."""
    generation = peak["generation"] * margin
    if max(generation, peak["training, no checkpointing"] * margin) <= capacity:
        return "fits"
    if max(generation, peak["training, checkpointing"] * margin) <= capacity:
        return "fits with gradient checkpointing"
    return "does not fit"


def model_table(model: Model, work: Workload) -> str:
    """One model's Markdown table: components and phase peaks (GB per GPU), then the verdict per GPU."""
    parts = {setup: components(model, setup, work) for setup in SETUPS}
    header = "| GB per GPU | " + " | ".join(setup.name for setup in SETUPS) + " |\n|---|" + "---|" * len(SETUPS)
    rows = [f"| {name} | " + " | ".join(f"{parts[setup][name] / GB:.1f}" for setup in SETUPS) + " |"
            for name in parts[DDP]]
    peak = {setup: peaks(parts[setup]) for setup in SETUPS}
    rows += [f"| **peak, {name}** | " + " | ".join(f"**{peak[setup][name] / GB:.1f}**" for setup in SETUPS) + " |"
             for name in peak[DDP]]
    rows += [f"| {gpu} | " + " | ".join(verdict(peak[setup], capacity) for setup in SETUPS) + " |"
             for gpu, capacity in GPUS.items()]
    counts = (f"{model.parameters / 1e9:.2f} B parameters ({model.layers} layers of "
              f"{model.layer_parameters / 1e6:.1f} M, "
              f"{model.root_parameters / 1e6:.0f} M outside them), LoRA r={work.lora_rank}: "
              f"{model.lora_parameters(work.lora_rank) / 1e6:.1f} M")
    return f"### {model.name}\n\n{counts}.\n\n{header}\n" + "\n".join(rows)


def main() -> None:
    work = Workload()
    print("\n\n".join(model_table(model, work) for model in (QWEN_MATH_1_5B, QWEN_MATH_7B)))


if __name__ == "__main__":
    main()
