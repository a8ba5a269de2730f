"""What the weight push of a nested rollout inside vLLM costs per RL step, on paper (docs/design/vllm.md).

The vllm engine (nested_reft/engines/vllm_engine.py) serves the step's nested model; before the step's generation its
weights are reloaded from the training model's kept layers (the embedding, final norm and head too), as TRL's
colocate mode reloads every weight each step. This script puts the bytes and the time of that reload beside the
256-token generation it serves, for Qwen2.5-Math-1.5B and 7B (shapes from scripts/scaling.py), at the paper's
workload (16 prompts x 8 completions, 256 prompt and 256 completion tokens) and x in {0, 15%, 30%}.

Both times are floors from HBM bandwidth, the bound a decode step of these models is under at batch 128: the
reload reads each kept float32 training weight and writes it as bfloat16 (6 bytes per parameter, one fused cast
and copy per tensor); a decode step reads the kept bfloat16 weights once plus the KV cache of every sequence.
A decode step's floor is the larger of that read time and its compute time (2 FLOPs per kept weight per
sequence at the GPU's dense bfloat16 rate); at these shapes the read is larger. Nothing here is measured: docs/design/vllm.md lists what a GPU
must confirm.

    python scripts/vllm_reload.py        # the Markdown table of docs/design/vllm.md
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nested_reft.nesting.layers import num_skipped_layers  # noqa: E402  (Table 1's U for a ratio x)


def _scaling_module():
    """scripts/scaling.py, the one home of the models' shapes and the paper's workload."""
    spec = importlib.util.spec_from_file_location("scaling", ROOT / "scripts" / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["scaling"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


scaling = _scaling_module()
FLOAT32, BFLOAT16 = scaling.FLOAT32, scaling.BFLOAT16


@dataclass(frozen=True)
class GPU:
    name: str
    bandwidth: float  # bytes/s, HBM, the datasheet's figure
    bf16_flops: float  # FLOP/s, dense bfloat16, the datasheet's figure


H200 = GPU("H200", bandwidth=4.8e12, bf16_flops=989e12)


@dataclass(frozen=True)
class StepCost:
    skipped: int
    reload_bytes: float
    reload_s: float
    kv_bytes_per_token: float
    kv_cache_bytes: float
    generation_s: float

    @property
    def reload_share(self) -> float:
        """The reload's time over the generation it serves."""
        return self.reload_s / self.generation_s


def kept_parameters(model, skipped: int) -> int:
    return (model.layers - skipped) * model.layer_parameters + model.root_parameters


def step_cost(model, work, gpu: GPU, ratio: float) -> StepCost:
    """The floors of one step's reload and 256-token generation with the nested model of ratio `ratio`."""
    skipped = num_skipped_layers(model.layers, ratio)
    kept = kept_parameters(model, skipped)
    reload_bytes = kept * (FLOAT32 + BFLOAT16)
    sequences = work.prompts * work.generations
    kv_per_token = (model.layers - skipped) * model.kv_dim * 2 * BFLOAT16  # keys and values, bfloat16 in vLLM
    generation_s = 0.0
    for position in range(work.prompt_tokens, work.prompt_tokens + work.completion_tokens):
        read = kept * BFLOAT16 + sequences * position * kv_per_token
        flops = 2 * kept * sequences
        generation_s += max(read / gpu.bandwidth, flops / gpu.bf16_flops)
    return StepCost(
        skipped=skipped,
        reload_bytes=reload_bytes,
        reload_s=reload_bytes / gpu.bandwidth,
        kv_bytes_per_token=kv_per_token,
        kv_cache_bytes=sequences * work.sequence_tokens * kv_per_token,
        generation_s=generation_s,
    )


def table(models, work, gpu: GPU, ratios=(0.0, 0.15, 0.30)) -> str:
    header = ("| model | x | U | reload (GB) | reload (ms) | generation floor (ms) | reload / generation "
              "| KV per token (KB) | KV cache (GB) |\n|---|---|---|---|---|---|---|---|---|")
    rows = []
    for model in models:
        for ratio in ratios:
            cost = step_cost(model, work, gpu, ratio)
            rows.append(
                f"| {model.name} | {ratio:.0%} | {cost.skipped} | {cost.reload_bytes / 1e9:.2f} "
                f"| {1e3 * cost.reload_s:.1f} | {1e3 * cost.generation_s:.0f} | {cost.reload_share:.1%} "
                f"| {cost.kv_bytes_per_token / 1e3:.1f} | {cost.kv_cache_bytes / 1e9:.2f} |"
            )
    return header + "\n" + "\n".join(rows)


def main() -> None:
    work = scaling.Workload()
    print(f"{gpu_line(H200)}; {work.prompts} prompts x {work.generations} completions, "
          f"{work.prompt_tokens} + {work.completion_tokens} tokens\n")
    print(table((scaling.QWEN_MATH_1_5B, scaling.QWEN_MATH_7B), work, H200))


def gpu_line(gpu: GPU) -> str:
    return f"{gpu.name}: {gpu.bandwidth / 1e12:.1f} TB/s HBM, {gpu.bf16_flops / 1e12:.0f} TFLOP/s bf16 dense"


if __name__ == "__main__":
    main()
