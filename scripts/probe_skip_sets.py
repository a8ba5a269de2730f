"""How far a nested behavior model is from the full model, per skip policy: the sweep that chose the study's
influence temperature tau and KL target (docs/study-smollm2/README.md).

For a model (the study's SFT warm-up), it measures each decoder layer's Block Influence BI_l = 1 - cos(h_in, h_out)
on reference solutions of training problems (the hooks the trainer uses, `nested_reft.influence`), then, for
skip sets drawn uniformly at several ratios x and by influence at several temperatures tau, samples completions
from the nested model and scores them under the full model: KL(behavior || target) per token, the effective
sample size of the importance ratios and the fraction retrace truncates (`nested_reft.importance`), averaged over
`--draws` skip sets each. Nothing trains.

    python scripts/probe_skip_sets.py runs/sweeps/study-smollm2/smollm2-135m-instruct/arithmetic/sft-s0/model
"""

from __future__ import annotations

import argparse
import statistics

import torch

from nested_reft.arithmetic import arithmetic_split
from nested_reft.config import ImportanceConfig, SamplingConfig
from nested_reft.importance import importance_statistics
from nested_reft.influence import InfluenceMeter
from nested_reft.models import load_model
from nested_reft.nesting import (
    draw_uniform, draw_weighted, influence_probabilities, num_decoder_layers, num_skipped_layers,
)
from nested_reft.policy import completion_logprobs
from nested_reft.prompts import build_prompt
from nested_reft.rollout import generate_rollouts
from nested_reft.sft import tokenize_examples


def block_influence(model, tokenizer, problems) -> list[float]:
    """Each layer's BI over the completion tokens of the problems' reference solutions (teacher-forced)."""
    batch = tokenize_examples(tokenizer, problems, 256, model.device)
    meter = InfluenceMeter(model)  # its hooks stay on the model, idle outside `measuring`
    with torch.no_grad(), meter.measuring(batch.completion_mask):
        completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    return meter.take()


def distance(model, tokenizer, prompts, skip_set, sampling: SamplingConfig, generations: int, seed: int) -> dict:
    """KL, ESS and retrace's truncated fraction of completions sampled with `skip_set` skipped."""
    rollouts = generate_rollouts(model, tokenizer, prompts, generations, sampling, skip_set,
                                 torch.Generator().manual_seed(seed))
    with torch.no_grad():
        target = completion_logprobs(model, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.completion_ids,
                                     rollouts.completion_mask, sampling.temperature)
    stats = importance_statistics(target, rollouts.behavior_logprobs, rollouts.completion_mask.float(),
                                  ImportanceConfig(mitigation="retrace"))
    return {"kl": stats.kl_behavior_target, "ess": stats.ess, "truncated": stats.truncated}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.15, 0.30, 0.45], help="uniform draws at x")
    parser.add_argument("--influence-ratio", type=float, default=0.30, help="x of the influence draws")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2], help="tau")
    parser.add_argument("--border", type=int, default=1)
    parser.add_argument("--draws", type=int, default=4, help="skip sets per setting")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--sampling-temperature", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=torch.float32, device="cpu")
    model.eval()
    problems = arithmetic_split("train")
    influence = block_influence(model, tokenizer, problems[:16])
    print("BI per layer: " + " ".join(f"{value:.3f}" for value in influence))
    num_layers = num_decoder_layers(model)
    prompts = [build_prompt(tokenizer, problem.question) for problem in problems[100:100 + args.prompts]]
    sampling = SamplingConfig(temperature=args.sampling_temperature, max_new_tokens=args.max_new_tokens,
                              min_new_tokens=0)
    settings = [(f"uniform x={ratio:g}", ratio, None) for ratio in args.ratios]
    settings += [(f"influence x={args.influence_ratio:g} tau={tau:g}", args.influence_ratio, tau)
                 for tau in args.temperatures]
    print("\n| draw | U | KL(behavior \\|\\| target) per token | ESS | truncated | skip sets |\n|---|---|---|---|---|---|")
    for name, ratio, tau in settings:
        count = num_skipped_layers(num_layers, ratio)
        rows, sets = [], []
        for draw in range(args.draws):
            generator = torch.Generator().manual_seed(draw)
            if tau is None:
                skip_set = draw_uniform(num_layers, count, args.border, generator)
            else:
                skip_set = draw_weighted(influence_probabilities(influence, args.border, tau), count, generator)
            sets.append(",".join(map(str, sorted(skip_set))))
            rows.append(distance(model, tokenizer, prompts, skip_set, sampling, args.generations, draw))
        means = {key: statistics.mean(row[key] for row in rows) for key in ("kl", "ess", "truncated")}
        print(f"| {name} | {count} | {means['kl']:.3f} | {means['ess']:.3f} | {means['truncated']:.3f} "
              f"| {'; '.join(sets)} |", flush=True)


if __name__ == "__main__":
    main()
