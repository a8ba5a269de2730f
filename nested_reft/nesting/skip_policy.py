"""Which layers each step's nested model skips, and how many: the paper's f_{x,b} or adaptive choices.

Past the paper (its future work asks which layers to drop). Policies, option `nesting.skip_policy`:

  uniform    f_{x,b}: U_x valid layers uniformly at random (Definition 3; the default).
  influence  U_x valid layers drawn with probability proportional to exp(-BI_l / tau), BI_l the smoothed Block
             Influence 1 - cos(h_in, h_out) of layer l (ShortGPT), measured on each step's training forward
             (`influence.InfluenceMeter`); uniform until the first measurement.
  kl_target  each step skips the largest U <= U_x whose smoothed measured KL(behavior || target) stays under
             `nesting.kl_target`, moving one layer at a time (`nesting.kl_controlled_count`); the layers are drawn
             as `nesting.kl_target_layers` (uniform or influence) says. A measurement older than
             `nesting.kl_retry_steps` steps is forgotten, so a U once found over the target is tried again.

The draws themselves are pure functions of `nesting`; this module keeps the smoothed measurements between
steps (exponential moving averages, weight `nesting.smoothing` on the past) and saves them in checkpoints, so
a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
import torch

from nested_reft.config import NestingConfig
from nested_reft.nesting.layers import (
    draw_uniform,
    draw_weighted,
    influence_probabilities,
    kl_controlled_count,
    num_skipped_layers,
)

# How each policy config.SKIP_POLICIES names chooses its layers: a name of DRAWS_BY_INFLUENCE, or None for the run's
# nesting.kl_target_layers (kl_target sets how many layers, not which)
POLICY_LAYERS: dict[str, str | None] = {"uniform": "uniform", "influence": "influence", "kl_target": None}
# The layer choices config.LAYER_CHOICES names: whether each draws by the measured Block Influence
DRAWS_BY_INFLUENCE: dict[str, bool] = {"uniform": False, "influence": True}


@dataclass
class SkipPolicy:
    """The skip policy of a run over a model of `num_layers` blocks, with its smoothed measurements."""

    name: str
    num_layers: int
    border: int
    max_count: int  # U_x: the paper's count, an upper bound for kl_target
    temperature: float
    smoothing: float
    kl_target: float
    kl_target_layers: str
    kl_retry_steps: int
    influence: list[float] | None = None  # smoothed BI per layer; None before the first measurement
    kl_by_count: dict[int, float] = field(default_factory=dict)  # smoothed KL at each U used (kl_target)
    kl_age: dict[int, int] = field(default_factory=dict)  # steps since each U of kl_by_count was last used
    count: int = 0  # the U of the next draw (kl_target)

    @classmethod
    def from_config(cls, config: NestingConfig, num_layers: int) -> SkipPolicy:
        max_count = num_skipped_layers(num_layers, config.skip_ratio)
        return cls(
            name=config.skip_policy, num_layers=num_layers, border=config.border, max_count=max_count,
            temperature=config.influence_temperature, smoothing=config.smoothing, kl_target=config.kl_target,
            kl_target_layers=config.kl_target_layers, kl_retry_steps=config.kl_retry_steps,
            count=max_count // 2,  # kl_target starts half-way to U_x
        )

    @property
    def layer_choice(self) -> str:
        """How this policy draws its layers: "influence" or "uniform"."""
        return POLICY_LAYERS[self.name] or self.kl_target_layers

    @property
    def measures_influence(self) -> bool:
        """Whether the trainer must measure Block Influence for this policy (hooks on the training forward)."""
        return DRAWS_BY_INFLUENCE[self.layer_choice]

    def draw(self, generator: torch.Generator | None = None) -> tuple[int, ...]:
        """This step's skip set."""
        count = self.count if self.name == "kl_target" else self.max_count
        if self.measures_influence and self.influence is not None:
            probabilities = influence_probabilities(self.influence, self.border, self.temperature)
            return draw_weighted(probabilities, count, generator)
        return draw_uniform(self.num_layers, count, self.border, generator)

    def observe(self, skip_set: Sequence[int], layer_influence: Sequence[float] | None, kl: float | None) -> None:
        """Fold in the step's measurements: the layers' influence (if measured) and the KL of its skip set (None:
        not measured, no token sampled; nothing to fold in)."""
        if layer_influence is not None:
            previous = self.influence or list(layer_influence)
            self.influence = [self._smooth(old, new) for old, new in zip(previous, layer_influence)]
        if self.name == "kl_target" and kl is not None:
            used = len(skip_set)
            self.kl_by_count[used] = self._smooth(self.kl_by_count.get(used, kl), kl)
            self._age_measurements(used)
            self.count = kl_controlled_count(used, self.kl_by_count, self.kl_target, self.max_count)

    def _age_measurements(self, used: int) -> None:
        """One step older for every U but `used`; forget those `kl_retry_steps` old (0: keep them forever)."""
        self.kl_age = {count: 0 if count == used else self.kl_age.get(count, 0) + 1 for count in self.kl_by_count}
        if self.kl_retry_steps:
            for count in [count for count, age in self.kl_age.items() if age >= self.kl_retry_steps]:
                del self.kl_by_count[count], self.kl_age[count]

    def state_dict(self) -> dict:
        """The measurements, JSON-ready (saved in trainer_state.json)."""
        return {"influence": self.influence, "kl_by_count": {str(k): v for k, v in self.kl_by_count.items()},
                "kl_age": {str(k): v for k, v in self.kl_age.items()}, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.influence = state["influence"]
        self.kl_by_count = {int(k): v for k, v in state["kl_by_count"].items()}
        # checkpoints from before kl_retry_steps have no ages: their measurements count as fresh
        self.kl_age = {int(k): v for k, v in state.get("kl_age", {}).items()}
        self.count = state["count"]

    def _smooth(self, old: float, new: float) -> float:
        return self.smoothing * old + (1.0 - self.smoothing) * new


def fixed_ratio_policy(config: NestingConfig, ratio: float, num_layers: int) -> SkipPolicy:
    """The run's skip policy (its border, its way of choosing layers) drawing U layers at `ratio` every time, for
    the draws made outside ReFT's loop: the warm-up's nested models (`sft.layer_drop`, `sft.distill_nested`) and
    the probe's. So "the nested model the warm-up trained for" and "the one ReFT samples from" are one definition.

    kl_target's count follows the KL of ReFT's rollouts, which these draws never see: they take its upper bound
    U_x at `ratio`, the layers chosen as `nesting.kl_target_layers` says. influence draws uniformly until its
    `influence` is set, as ReFT's does before its first measurement.
    """
    layers = SkipPolicy.from_config(config, num_layers).layer_choice
    return SkipPolicy.from_config(dataclasses.replace(config, skip_ratio=ratio, skip_policy=layers), num_layers)
