"""The options of the commands beside training: `nested-reft probe` (`ProbeSettings`) and `demo` (`DemoSettings`).

Each default has its reason beside it; the checks name the option as the command line gives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nested_reft.config.checks import check_option
from nested_reft.config.options import NestingConfig, SamplingConfig


@dataclass(frozen=True)
class ProbeSettings:
    """What the probe measures; each default's reason beside it."""

    skip_ratios: tuple[float, ...] = (0.05, 0.15, 0.30)  # the paper's 5 and 15%, and 30% (the study's adaptive runs)
    problems: int = 8  # prompts from the training split: enough for a KL estimate, minutes on a CPU
    draws: int = 3  # skip sets per x: one draw is one of many nested models of that size
    generations: int = 2  # completions per prompt and draw
    # how the completions are sampled; ReFT's defaults (TRL GRPOConfig's temperature 1.0), 64 tokens: the KL per
    # token settles within tens of tokens, and the study's completions took about 50
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=64, min_new_tokens=0))
    nesting: NestingConfig = field(default_factory=NestingConfig)  # border and skip policy of the draws
    # ours: issue 22's target for a nested-aware warm-up at x = 15%, and the study's kl_target; the study's
    # uniform runs at 1.6 nats per token and more lost what ReFT learns
    kl_threshold: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_option(len(self.skip_ratios) > 0, "--skip-ratios", self.skip_ratios, "a non-empty list")
        for ratio in self.skip_ratios:
            check_option(0.0 < ratio < 1.0, "--skip-ratios", ratio, "in (0, 1)")
        check_option(self.problems >= 1, "--problems", self.problems, ">= 1")
        check_option(self.draws >= 1, "--draws", self.draws, ">= 1")
        check_option(self.generations >= 1, "--generations", self.generations, ">= 1")
        check_option(self.kl_threshold > 0, "--kl-threshold", self.kl_threshold, "> 0")


# The study's options for its adaptive policies, its variants `influence` and `kl-target` (a test holds them to the
# grid); the uniform policy has none
POLICY_OPTIONS: dict[str, dict[str, float | int]] = {
    "influence": {"influence_temperature": 0.02},
    "kl_target": {"kl_target": 1.0, "kl_retry_steps": 0},
}


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs; the defaults are the study's seed 0 (README: its time on 2 CPU cores)."""

    steps: int = 24  # ReFT steps per run, the study's (a linear schedule decays to 0 over them)
    eval_problems: int = 300  # held-out slice, the first problems of the arithmetic test split (the study's)
    skip_ratio: float = 0.15  # x of the nested run: U_x = 5 of SmolLM2's 30 layers (the paper's largest x)
    skip_policy: str = "uniform"  # the paper's f_{x,b}; influence | kl_target: an adaptive policy, x its bound
    speed_prompts: int = 8  # prompts per timed generation (one completion each)
    speed_tokens: int = 16  # fixed completion length of a timed generation
    uniform_draws: int = 2  # timed uniform skip sets at U_x beside an adaptive policy's own (`bound_draws`)
    # Processes side by side, one torch thread each, as the study's lanes: the two runs and the warm-up's
    # evaluation, which on 2 cores shares them with the runs' first minutes rather than hold one core alone
    # (9 min 46 s against 2 lanes' 10 min 0 s, docs/benchmarks.md); 1 runs all in this process with torch's
    # threads (in turn).
    lanes: int = 3

    def __post_init__(self) -> None:
        for name in ("steps", "eval_problems", "speed_prompts", "speed_tokens", "lanes"):
            check_option(getattr(self, name) >= 1, f"demo {name}", getattr(self, name), ">= 1")
        check_option(self.uniform_draws >= 0, "demo uniform_draws", self.uniform_draws, ">= 0")
        self.nesting()  # NestingConfig checks skip_ratio and skip_policy, naming the option

    def nesting(self) -> NestingConfig:
        """The nested run's nesting, the study's instance at `skip_ratio`: border 1, `skip_policy` with the study's
        options for it."""
        return NestingConfig(skip_ratio=self.skip_ratio, border=1, skip_policy=self.skip_policy,
                             **POLICY_OPTIONS.get(self.skip_policy, {}))
