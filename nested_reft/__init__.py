"""nested-reft: reinforced fine-tuning of LLMs on math with rollouts from nested (layer-skipped) models.

The pieces, one module per idea: `nesting` (f_{x,b} and running without layers), `rollout` (sampling
with behavior log-probs), `importance` (h_m), `grpo` (advantages and loss), `rewards` (and its time
limits, `deadlines`), `problems`, `data`, `arithmetic`, `prompts`, `tasks`, `sft`, `trainer` (Algorithm 1),
`models`, `config`, `checkpoint`, `grid`, `sweep`, `results`, `report`, `cli`.
"""

__version__ = "0.1.0"
