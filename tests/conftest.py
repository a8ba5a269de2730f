"""Shared fixtures and stand-ins: where the shared datasets are, one torch thread per test, bridges fitted to a
model, an optimizer that records gradients."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers

from nested_reft.nesting.bridges import BridgeFitter, Bridges, fit_bridges
from nested_reft.nesting.layers import decoder_layers

# CI clones the repo next to a copy of shared/, as the developers' checkout sits next to it.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The directory of the real datasets, or a clean skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and much faster on a shared, busy 2-core CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fitted_bridges(model, tokenizer, prompts: list[str]) -> Bridges:
    """Bridges fitted to `model` on `prompts` (what a calibration pass does), for every block (border 0)."""
    fitter = BridgeFitter(model, range(len(decoder_layers(model)[2])), decay=1.0)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad(), fitter.recording(encoded["attention_mask"]):
        model(**encoded, use_cache=False)
    fitter.end_step()
    return fit_bridges(fitter.total, ridge=1e-2)


class GradientRecorder:
    """Stands in for the optimizer of `policy_update`: keeps the gradients at `step()` (the last in `gradients`,
    every step's in `history`) and applies plain SGD at `learning_rate` (0: the weights stay)."""

    def __init__(self, model, learning_rate: float = 0.0):
        self.parameters, self.gradients, self.history = dict(model.named_parameters()), {}, []
        self.learning_rate = learning_rate

    def step(self) -> None:
        self.gradients = {n: p.grad.detach().clone() for n, p in self.parameters.items() if p.grad is not None}
        self.history.append(self.gradients)
        with torch.no_grad():
            for name, gradient in self.gradients.items():
                self.parameters[name].sub_(self.learning_rate * gradient)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for parameter in self.parameters.values():
            parameter.grad = None


class NoSchedule:
    """Stands in for the scheduler of `policy_update`."""

    def step(self) -> None:
        pass


def chi_square_critical_p001(df: int) -> float:
    """The p = 0.001 critical value of chi-square with `df` degrees of freedom (Wilson-Hilferty, ~1% at df >= 10)."""
    return df * (1 - 2 / (9 * df) + 3.0902 * (2 / (9 * df)) ** 0.5) ** 3


def truncated_copy(model: transformers.PreTrainedModel, skip_set) -> transformers.PreTrainedModel:
    """The reference: a physically smaller model, built from a config of N - |S| layers and the kept weights."""
    _, _, layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    kept = [i for i in range(len(layers)) if i not in skip_set]
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in kept]
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix + "."):
            index, rest = key[len(prefix) + 1 :].split(".", 1)
            if int(index) in skip_set:
                continue
            key = f"{prefix}.{kept.index(int(index))}.{rest}"
        state[key] = value
    smaller = transformers.AutoModelForCausalLM.from_config(config)
    smaller.load_state_dict(state, strict=True)
    smaller.generation_config = copy.deepcopy(model.generation_config)
    return smaller.eval()
