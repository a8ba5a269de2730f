"""The options of a run: one dataclass per concern, every default in exactly one place with its source.

Sources: "paper" is appendix F of the Nested-ReFT paper; "TRL" is `trl.GRPOConfig` / `trl.SFTConfig`
of TRL 1.16.0 (and the `transformers.TrainingArguments` defaults they inherit), which the paper says
it follows for everything it does not state.

A run's config is a `TrainConfig`; it loads from YAML (sections named like the fields below, `yaml_io`), takes
`section.field=value` overrides, validates every value at start-up (naming the option) and is saved
resolved into the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nested_reft.config.checks import check_option, check_types, default_of
from nested_reft.config.names import (
    BRIDGES, DTYPES, ENGINES, FILTER_METRICS, LAYER_CHOICES, LEVELS, LOSS_TYPES, MITIGATIONS, SCALINGS, SCHEDULERS,
    SKIP_POLICIES, TRAINING_SETS,
)


@dataclass(frozen=True)
class NestingConfig:
    """f_{x,b}: which layers the behavior model skips."""

    skip_ratio: float = 0.0  # x; paper grid: 0, 0.05, 0.10, 0.15 (0 = classical ReFT)
    border: int = 1  # b; paper: 1 (first and last layer never skipped); 0 for the x = 0 baseline
    # Past the paper (nested_reft.nesting.skip_policy): uniform (the paper's f_{x,b}) | influence | kl_target.
    skip_policy: str = "uniform"
    # tau of exp(-BI / tau); ours: SmolLM2's Block Influences span about 0.01-0.3 (docs/study-smollm2), so 0.05
    # makes the least influential layers several times likelier than the most; very large = uniform
    influence_temperature: float = 0.05
    smoothing: float = 0.7  # ours: EMA weight of the past for the measured influence and KL (a few steps' memory)
    kl_target: float = 0.05  # ours: per-token KL(behavior || target) that kl_target keeps under (see the study)
    kl_target_layers: str = "uniform"  # how kl_target draws its U layers: uniform | influence
    # ours: a U measured over the target is tried again once its measurement is this many steps old (the model
    # has moved since, and one draw is one of many skip sets of that size); 0 = never (the study's first
    # kl_target runs, which stayed at U = 0 after one bad draw at U = 1)
    kl_retry_steps: int = 4
    # Past the paper (issue 31, nested_reft.nesting.bridges): what stands in for a skipped block. none: nothing, the
    # paper's nested model; linear: h -> h + h W + c, fitted by ridge regression to the policy's own blocks.
    bridge: str = "none"
    # ours: lambda, the ridge penalty on W as a fraction of the mean squared activation (a few thousand tokens fit
    # d^2 + d numbers per block; the penalty keeps blocks with few or collinear tokens from overfitting)
    bridge_ridge: float = 1e-3
    bridge_decay: float = 0.8  # ours: the weight of the older steps' normal equations at each step (~5 steps' memory)
    bridge_refit_steps: int = 1  # ours: solve the bridges again every this many steps (a solve is ~d^3 per block)
    # ours: the training problems (prompt + solution) of the calibration forward that fits a fresh run's first bridges,
    # the first of the seeded epoch-0 order: 64 of about 100 tokens outnumber the d + 1 = 577 unknowns per output of
    # SmolLM2's bridges ten to one, for one no-grad forward
    bridge_calibration: int = 64

    def __post_init__(self) -> None:
        check_types(self, "nesting.")
        check_option(0.0 <= self.skip_ratio < 1.0, "nesting.skip_ratio", self.skip_ratio, "in [0, 1)")
        check_option(self.border >= 0, "nesting.border", self.border, ">= 0")
        check_option(self.skip_policy in SKIP_POLICIES, "nesting.skip_policy", self.skip_policy, f"one of {SKIP_POLICIES}")
        # Block Influences span [0, 2]: below 1e-4 the draw is already the least influential layers, and much
        # lower the softmax's logits overflow mid-run
        check_option(self.influence_temperature >= 1e-4, "nesting.influence_temperature", self.influence_temperature,
                     ">= 1e-4")
        check_option(0 <= self.smoothing < 1, "nesting.smoothing", self.smoothing, "in [0, 1)")
        check_option(self.kl_target > 0, "nesting.kl_target", self.kl_target, "> 0")
        check_option(self.kl_retry_steps >= 0, "nesting.kl_retry_steps", self.kl_retry_steps, ">= 0")
        check_option(self.kl_target_layers in LAYER_CHOICES, "nesting.kl_target_layers", self.kl_target_layers,
                     f"one of {LAYER_CHOICES}")
        check_option(self.bridge in BRIDGES, "nesting.bridge", self.bridge, f"one of {BRIDGES}")
        check_option(self.bridge_ridge >= 0, "nesting.bridge_ridge", self.bridge_ridge, ">= 0")
        check_option(0 <= self.bridge_decay <= 1, "nesting.bridge_decay", self.bridge_decay, "in [0, 1]")
        check_option(self.bridge_refit_steps >= 1, "nesting.bridge_refit_steps", self.bridge_refit_steps, ">= 1")
        check_option(self.bridge_calibration >= 1, "nesting.bridge_calibration", self.bridge_calibration, ">= 1")


@dataclass(frozen=True)
class ImportanceConfig:
    """h_m: how the update corrects for sampling from the nested model."""

    mitigation: str = "retrace"  # paper: base | practical | retrace (retrace is the most stable, section 3.1)
    retrace_lambda: float = 1.0  # paper does not state lambda; 1.0 makes retrace the truncated ratio min(1, r)
    level: str = "token"  # token | sequence; TRL importance_sampling_level="token"

    def __post_init__(self) -> None:
        check_types(self, "importance.")
        check_option(self.mitigation in MITIGATIONS, "importance.mitigation", self.mitigation, f"one of {MITIGATIONS}")
        check_option(0.0 <= self.retrace_lambda <= 1.0, "importance.retrace_lambda", self.retrace_lambda, "in [0, 1]")
        check_option(self.level in LEVELS, "importance.level", self.level, f"one of {LEVELS}")


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are drawn. Defaults follow the paper (appendix F) and TRL's GRPOConfig."""

    temperature: float = 1.0  # TRL GRPOConfig.temperature; 0 means greedy
    top_p: float = 1.0  # TRL GRPOConfig.top_p
    top_k: int = 0  # TRL GRPOConfig.top_k (0 = disabled)
    max_new_tokens: int = 256  # paper, appendix F: completions of 256 tokens
    min_new_tokens: int = 256  # paper: min = max, so every completion has the same length
    # How the model runs while sampling (nested_reft.engines.choice): eager (a Python loop over the model, rows that
    # end leave the batch) | compiled (a static KV cache and a torch.compile'd decode step, a CUDA graph on GPUs)
    # | vllm (a colocated vLLM engine, nested_reft.engines.vllm_engine; needs the `vllm` extra)
    engine: str = "eager"
    # vllm only: the share of the device's memory vLLM may hold, weights and KV cache (of the CPU's memory on a
    # CPU); TRL's vllm_gpu_memory_utilization default, which leaves the rest to the colocated training
    vllm_memory_fraction: float = 0.3
    # vllm only: the longest prompt + completion the engine takes, which sizes its KV cache blocks per sequence;
    # None = the model's own context (TRL's vllm_max_model_length default, None)
    vllm_max_model_len: int | None = None
    # LoRA (lora.r > 0) only: sample from the base weights with the adapters merged in (one matmul per linear
    # layer, not three; what TRL and verl do before handing weights to vLLM), the base saved aside and put back
    # after the rollout; False samples through the adapters (no saved copy: memory a 7B run may need, docs/scaling.md)
    merge_adapters: bool = True
    # Past the paper (issue 32, GRESO-style selective rollouts, `training.prompt_history` states the rule): before
    # sampling, a prompt whose last z >= 1 groups all had zero reward variance is skipped with probability
    # 1 - max(skip_floor, e^z), and the next prompt of the data order takes its place; e starts at skip_initial and
    # moves by skip_adapt after each step that met such a prompt, toward skipping a share skip_target of the prompts
    # the step considered. Off (ours): the paper and TRL sample every prompt of the order.
    skip_predictable: bool = False
    # ours: skip at most about half the prompts; GRESO reports up to 2.4x less rollout time, i.e. more than half of
    # the rollouts spared, in multi-epoch training where most prompts have become predictable
    skip_target: float = 0.5
    skip_initial: float = 0.5  # ours: e at the first step; a prompt with one zero-variance group is then skipped 1 in 2
    # ours: GRESO adapts its exploration probability a little at every step over hundreds of steps; our runs are
    # tens of steps, so the step is larger
    skip_adapt: float = 0.05
    # ours: a predictable prompt is sampled with probability at least this, each time the order reaches it, so no
    # prompt is skipped for ever (in expectation 1 / 0.05 = 20 times at the most in a row)
    skip_floor: float = 0.05

    def __post_init__(self) -> None:
        check_types(self, "sampling.")
        check_option(self.temperature >= 0, "sampling.temperature", self.temperature, ">= 0 (0 = greedy)")
        check_option(0 < self.top_p <= 1, "sampling.top_p", self.top_p, "in (0, 1]")
        check_option(self.top_k >= 0, "sampling.top_k", self.top_k, ">= 0 (0 = disabled)")
        check_option(self.max_new_tokens >= 1, "sampling.max_new_tokens", self.max_new_tokens, ">= 1")
        check_option(0 <= self.min_new_tokens <= self.max_new_tokens, "sampling.min_new_tokens", self.min_new_tokens,
                     f"in [0, sampling.max_new_tokens={self.max_new_tokens}]")
        check_option(self.engine in ENGINES, "sampling.engine", self.engine, f"one of {ENGINES}")
        check_option(0 < self.vllm_memory_fraction <= 1, "sampling.vllm_memory_fraction", self.vllm_memory_fraction,
                     "in (0, 1]")
        check_option(self.vllm_max_model_len is None or self.vllm_max_model_len > self.max_new_tokens,
                     "sampling.vllm_max_model_len", self.vllm_max_model_len,
                     f"None (the model's context) or more than sampling.max_new_tokens={self.max_new_tokens}")
        check_option(0 <= self.skip_target < 1, "sampling.skip_target", self.skip_target, "in [0, 1)")
        check_option(0 < self.skip_floor <= 1, "sampling.skip_floor", self.skip_floor,
                     "in (0, 1] (a prompt is always sampled with at least this probability)")
        check_option(self.skip_floor <= self.skip_initial <= 1, "sampling.skip_initial", self.skip_initial,
                     f"in [sampling.skip_floor={self.skip_floor}, 1]")
        check_option(0 <= self.skip_adapt <= 1, "sampling.skip_adapt", self.skip_adapt, "in [0, 1]")


@dataclass(frozen=True)
class GRPOConfig:
    """The RL update (TRL GRPOConfig defaults unless the paper says otherwise)."""

    num_generations: int = 8  # G; paper and TRL: 8
    learning_rate: float = 1e-6  # TRL GRPOConfig
    beta: float = 0.0  # paper: no KL penalty, so no reference model is loaded (TRL default is 0.0 too)
    num_iterations: int = 1  # mu, TRL: updates per batch; pi_old is the sampling model, so mu = 1 never clips
    epsilon: float = 0.2  # TRL: lower clip (acts only when num_iterations > 1)
    epsilon_high: float | None = None  # TRL: upper clip; None means "= epsilon" (see `clip_high`)
    loss_type: str = "dapo"  # TRL 1.16 default: normalise by active tokens of the whole batch
    scale_rewards: str = "group"  # TRL: divide by the group std
    max_grad_norm: float = 1.0  # TrainingArguments
    weight_decay: float = 0.0  # TrainingArguments (AdamW)
    adam_beta1: float = 0.9  # TrainingArguments
    adam_beta2: float = 0.999  # TrainingArguments
    adam_epsilon: float = 1e-8  # TrainingArguments
    lr_scheduler: str = "linear"  # TrainingArguments lr_scheduler_type
    warmup_ratio: float = 0.0  # TrainingArguments
    # TRL: completions that hit max_new_tokens without EOS leave the loss (DAPO's overlong filtering); they
    # still count in their group's advantages. Without it a rambling completion whose last number happens to
    # be right is rewarded, and a small model learns to ramble (docs/study-smollm2/README.md). Refused with
    # sampling.min_new_tokens = max_new_tokens (the paper's fixed length), where every completion is cut.
    mask_truncated_completions: bool = False
    # TRL 1.16 defaults disable_dropout to False; ours is True. TRL's loss is unaffected by dropout noise
    # because its logp_old comes from the same (dropout) forward as logp, but Nested-ReFT also compares
    # logp_old with behavior log-probs recorded by the dropout-free sampler: with dropout, h != 1 even at
    # x = 0, b = 0 (classical ReFT), against the paper's own check. The paper's models (Qwen2.5-Math) have
    # no dropout, so for them True changes nothing; for GPT-2/OPT-style models it removes the noise.
    disable_dropout: bool = True
    # Past the paper (issue 32, DAPO's dynamic sampling, verl's algorithm.filter_groups; `training.rollout_selection`):
    # a group whose filter_metric does not vary over its G completions has zero advantages and teaches nothing; such
    # groups are dropped and more generation rounds of generation_batch_size prompts (the next of the data order)
    # sampled until the batch holds batch_size informative groups or filter_max_rounds rounds have run. Off: verl's
    # filter_groups.enable default, the paper's and TRL's batch.
    filter_groups: bool = False
    # what must vary within a group: reward (its value; verl's "score") | correct (reward >= 1; verl's "acc"). Ours:
    # reward, whose spread is what makes the advantages nonzero
    filter_metric: str = "reward"
    # verl's max_num_gen_batches: the most generation rounds a step runs, the first included; a step that reaches it
    # trains on the informative groups it has (none: no gradient step). DAPO's recipe: 10. 0 = no limit but the data:
    # the step stops once its rounds have read as many prompts as the training set holds.
    filter_max_rounds: int = 10
    # verl's data.gen_batch_size: prompts per generation round, with filter_groups only; None = batch_size (ours:
    # the first round costs what a step without the filter costs; DAPO's recipe samples 3x the batch)
    generation_batch_size: int | None = None

    def __post_init__(self) -> None:
        check_types(self, "grpo.")
        check_option(self.num_generations >= 2, "grpo.num_generations", self.num_generations, ">= 2 (groups compare)")
        check_option(self.learning_rate > 0, "grpo.learning_rate", self.learning_rate, "> 0")
        check_option(self.beta >= 0, "grpo.beta", self.beta, ">= 0")
        check_option(self.num_iterations >= 1, "grpo.num_iterations", self.num_iterations, ">= 1")
        check_option(0 < self.epsilon < 1, "grpo.epsilon", self.epsilon, "in (0, 1)")
        check_option(self.epsilon_high is None or self.epsilon_high > 0, "grpo.epsilon_high", self.epsilon_high,
               "> 0, or None for the same as grpo.epsilon")
        check_option(self.loss_type in LOSS_TYPES, "grpo.loss_type", self.loss_type, f"one of {LOSS_TYPES}")
        check_option(self.scale_rewards in SCALINGS, "grpo.scale_rewards", self.scale_rewards, f"one of {SCALINGS}")
        check_option(self.max_grad_norm > 0, "grpo.max_grad_norm", self.max_grad_norm, "> 0")
        check_option(self.lr_scheduler in SCHEDULERS, "grpo.lr_scheduler", self.lr_scheduler, f"one of {SCHEDULERS}")
        check_option(0 <= self.warmup_ratio < 1, "grpo.warmup_ratio", self.warmup_ratio, "in [0, 1)")
        check_option(self.weight_decay >= 0, "grpo.weight_decay", self.weight_decay, ">= 0")
        for name in ("adam_beta1", "adam_beta2"):  # torch's AdamW refuses these only once the run has started
            check_option(0 <= getattr(self, name) < 1, f"grpo.{name}", getattr(self, name), "in [0, 1)")
        check_option(self.adam_epsilon > 0, "grpo.adam_epsilon", self.adam_epsilon, "> 0")
        check_option(self.filter_metric in FILTER_METRICS, "grpo.filter_metric", self.filter_metric,
                     f"one of {FILTER_METRICS}")
        check_option(self.filter_max_rounds >= 0, "grpo.filter_max_rounds", self.filter_max_rounds,
                     ">= 1, or 0 for no limit but the training set")
        check_option(self.generation_batch_size is None or self.generation_batch_size >= 1,
                     "grpo.generation_batch_size", self.generation_batch_size, ">= 1, or None for batch_size")
        check_option(self.generation_batch_size is None or self.filter_groups, "grpo.generation_batch_size",
                     self.generation_batch_size, "None while grpo.filter_groups is off: without the filter every "
                     "step samples batch_size prompts; set grpo.filter_groups: true")

        if self.num_iterations == 1:  # the clip in effect must be the default's: anything else would not act
            default = default_of(GRPOConfig, "epsilon")
            for name, value in (("epsilon", self.epsilon), ("epsilon_high", self.clip_high)):
                check_option(value == default, f"grpo.{name}", getattr(self, name),
                             "left at its default while grpo.num_iterations = 1: with one update per batch the "
                             "ratio pi_theta / pi_old is 1 and the clip never acts; set grpo.num_iterations > 1")

    @property
    def clip_high(self) -> float:
        """The upper clip epsilon in use: `epsilon_high`, or `epsilon` when unset (as TRL's GRPOTrainer does)."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


@dataclass(frozen=True)
class SFTConfig:
    """The warm-up: cross-entropy on (prompt, chain of thought), loss on completion tokens only."""

    epochs: int = 2  # E_sft; paper (following Luong et al. 2024)
    learning_rate: float = 2e-5  # TRL SFTConfig
    batch_size: int = 16  # paper's batch of 16, reached by accumulation
    max_length: int = 1024  # TRL SFTConfig max_length
    max_examples: int | None = None  # cap the SFT set (None = the whole training set)
    max_grad_norm: float = 1.0  # TRL SFTConfig (TrainingArguments)
    weight_decay: float = 0.0  # TRL SFTConfig (TrainingArguments)
    lr_scheduler: str = "linear"  # TRL SFTConfig lr_scheduler_type (TrainingArguments), no warm-up
    # Past the paper (issue 22): a warm-up that teaches the nested models to agree with the full one. Both off by
    # default, so the warm-up is the paper's. layer_drop: a skip ratio; each micro-batch's cross-entropy runs on
    # the nested model of a skip set drawn as ReFT draws them (LayerDrop, Fan et al. 2019). distill_nested: a
    # coefficient alpha; the loss adds alpha * KL(full || nested) per completion token, the full model's
    # distribution detached. distill_ratio: the nested model's skip ratio for distill_nested; None = sft.layer_drop
    # when it is set (the same nested forward serves both), else nesting.skip_ratio (the nested models ReFT samples).
    layer_drop: float = 0.0
    distill_nested: float = 0.0
    distill_ratio: float | None = None

    def nested_ratio(self, run_ratio: float) -> float:
        """The skip ratio of distill_nested's nested model, given the run's nesting.skip_ratio."""
        if self.distill_ratio is not None:
            return self.distill_ratio
        return self.layer_drop or run_ratio

    def __post_init__(self) -> None:
        check_types(self, "sft.")
        check_option(0.0 <= self.layer_drop < 1.0, "sft.layer_drop", self.layer_drop, "in [0, 1) (0 = off)")
        check_option(self.distill_nested >= 0, "sft.distill_nested", self.distill_nested, ">= 0 (0 = off)")
        check_option(self.distill_ratio is None or 0.0 < self.distill_ratio < 1.0, "sft.distill_ratio",
                     self.distill_ratio, "in (0, 1), or None for sft.layer_drop, else nesting.skip_ratio")
        check_option(self.epochs >= 0, "sft.epochs", self.epochs, ">= 0")
        check_option(self.learning_rate > 0, "sft.learning_rate", self.learning_rate, "> 0")
        check_option(self.max_grad_norm > 0, "sft.max_grad_norm", self.max_grad_norm, "> 0")
        check_option(self.weight_decay >= 0, "sft.weight_decay", self.weight_decay, ">= 0")
        check_option(self.lr_scheduler in SCHEDULERS, "sft.lr_scheduler", self.lr_scheduler, f"one of {SCHEDULERS}")
        check_option(self.batch_size >= 1, "sft.batch_size", self.batch_size, ">= 1")
        check_option(self.max_length >= 8, "sft.max_length", self.max_length, ">= 8")
        check_option(self.max_examples is None or self.max_examples >= 1, "sft.max_examples", self.max_examples,
                     ">= 1, or None for the whole training set")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters instead of full fine-tuning (nested_reft.models.lora); r = 0 trains every weight."""

    r: int = 0  # ours: off. TRL ModelConfig lora_r = 16 when use_peft
    alpha: int = 32  # TRL ModelConfig lora_alpha
    # TRL ModelConfig lora_dropout = 0.05; ours 0: dropout makes h != 1 at x = 0 (see grpo.disable_dropout).
    # A value > 0 acts in the SFT warm-up only while grpo.disable_dropout is on (the default), which sets PEFT's
    # dropout to 0 with every other before ReFT; ReFT draws it too only with grpo.disable_dropout: false.
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("all-linear",)  # PEFT: every linear layer of the blocks, not the head

    def __post_init__(self) -> None:
        check_types(self, "lora.")
        check_option(self.r >= 0, "lora.r", self.r, ">= 0 (0 = no adapters)")
        check_option(self.alpha > 0, "lora.alpha", self.alpha, "> 0")
        check_option(0 <= self.dropout < 1, "lora.dropout", self.dropout, "in [0, 1)")
        check_option(len(self.target_modules) > 0, "lora.target_modules", self.target_modules, "a non-empty list")


@dataclass(frozen=True)
class TrainConfig:
    """One Nested-ReFT run: SFT warm-up (sft.epochs > 0) then S ReFT steps."""

    model: str = "smollm2-135m-instruct"  # an alias, a hub id, a local directory or a .gguf file
    dataset: str = "arithmetic"  # svamp | gsm8k | math12k | arithmetic
    data_dir: str | None = None  # a local copy in the original formats; default $NESTED_REFT_DATA, else the hub
    # ours: ReFT reads the first N problems of the training set in the data set's own order (None = all): a fixed
    # pool that several epochs revisit (what sampling.skip_predictable learns from); the warm-up reads the whole set
    train_problems: int | None = None
    output_dir: str = "runs/nested-reft"
    seed: int = 0
    rft_steps: int = 99  # S; paper
    batch_size: int = 16  # prompts per gradient step; paper
    micro_batch_size: int = 16  # completions per forward/backward; accumulation reaches the batch
    # The compute precision, not the weights': trainable weights (and AdamW's state) stay float32, and
    # bfloat16 | float16 run forward passes and generation under accelerate's autocast (mixed_precision
    # bf16 | fp16); float32 = no autocast. Low-precision weights would lose AdamW updates at lr 1e-6.
    dtype: str = "float32"
    # Recompute activations in the backward pass instead of keeping them (transformers' gradient checkpointing,
    # non-reentrant). TRL 1.16 defaults to True; ours is False: it trades a second forward for memory, which
    # small models on one device do not need; turn it on for 7B.
    gradient_checkpointing: bool = False
    save_steps: int = 25  # checkpoint every N steps (and at the end)
    # Checkpoints kept, the newest; 0 keeps every one (to evaluate a run's trajectory). TrainingArguments'
    # default None keeps all; ours keeps 1, as a checkpoint holds AdamW's state (twice the weights).
    save_total_limit: int = 1
    max_nonfinite_steps: int = 5  # abort after this many skipped non-finite updates (0 = never abort)
    report_to: tuple[str, ...] = ()  # accelerate trackers: tensorboard, wandb, ...
    nesting: NestingConfig = field(default_factory=NestingConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        check_types(self, "")
        check_option(self.dataset in TRAINING_SETS, "dataset", self.dataset, f"one of {TRAINING_SETS}")
        check_option(0 <= self.seed < 2**32, "seed", self.seed, "in [0, 2**32) (numpy's seeds)")
        check_option(self.train_problems is None or self.train_problems >= 1, "train_problems", self.train_problems,
                     ">= 1, or None for the whole training set")
        check_option(self.rft_steps >= 0, "rft_steps", self.rft_steps, ">= 0")
        check_option(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check_option(self.micro_batch_size >= 1, "micro_batch_size", self.micro_batch_size, ">= 1")
        check_option(self.dtype in DTYPES, "dtype", self.dtype, f"one of {DTYPES}")
        check_option(self.save_steps >= 1, "save_steps", self.save_steps, ">= 1")
        check_option(self.save_total_limit >= 0, "save_total_limit", self.save_total_limit, ">= 0 (0 keeps all)")
        check_option(self.max_nonfinite_steps >= 0, "max_nonfinite_steps", self.max_nonfinite_steps, ">= 0")
        check_option(not (self.lora.r and self.grpo.beta), "grpo.beta", self.grpo.beta,
                     "0 with LoRA (lora.r > 0): the KL reference is the post-SFT model, which adapters on a frozen "
                     "base cannot give by disabling them")
        fixed_length = self.sampling.min_new_tokens == self.sampling.max_new_tokens
        check_option(not (self.grpo.mask_truncated_completions and fixed_length), "grpo.mask_truncated_completions",
                     True, f"false while sampling.min_new_tokens = sampling.max_new_tokens "
                     f"({self.sampling.max_new_tokens}): EOS is banned to the last token, so every completion is cut "
                     "and the loss masks them all (nothing trains); lower sampling.min_new_tokens")
        distills = self.sft.epochs and self.sft.distill_nested
        check_option(not distills or self.sft.nested_ratio(self.nesting.skip_ratio) > 0, "sft.distill_ratio",
                     self.sft.distill_ratio, "set when sft.distill_nested > 0 and neither sft.layer_drop nor "
                     "nesting.skip_ratio is: the distillation needs a nested model to distil into")
        # options that would do nothing in this combination are refused, not recorded in config.yaml as if they acted
        check_option(self.nesting.bridge == "none" or self.nesting.skip_ratio > 0, "nesting.bridge", self.nesting.bridge,
                     "none while nesting.skip_ratio = 0: no block is skipped, so no bridge would run")
        for name in ("layer_drop", "distill_nested"):
            check_option(self.sft.epochs > 0 or not getattr(self.sft, name), f"sft.{name}", getattr(self.sft, name),
                         "0 while sft.epochs = 0: no warm-up runs")
        check_option(self.sft.distill_ratio is None or self.sft.distill_nested > 0, "sft.distill_ratio",
                     self.sft.distill_ratio, "unset (null) while sft.distill_nested = 0: it is the distillation's "
                     "skip ratio, and nothing distils")


# Options a resumed run may change: where things are and how the run is logged, checkpointed and guarded.
# Everything else (model, data, seed, schedule, batch, micro-batch, nesting, mitigation, sampling, ...)
# shapes the trajectory, so a changed value would silently continue another run than the one saved.
RESUMABLE_OPTIONS = ("output_dir", "data_dir", "report_to", "save_steps", "save_total_limit",
                     "max_nonfinite_steps")
