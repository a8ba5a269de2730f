"""Where a decode step's time goes, eager engine against compiled engine, by torch.profiler (issue 9).

The compiled engine was slower than the eager one on this CPU (docs/benchmarks.md); this asks why. Both
engines sample the same batch (arithmetic prompts, fixed length: EOS banned until the last token) from the
same model; each is timed twice, alternating, then profiled once, and the profile's operators are printed
by self CPU time. Both profiles include the same eager prefill of the prompts.

    python bench/profile_decode.py                         # SmolLM2-135M-Instruct, batch 32, 32 tokens, 1 thread
    python bench/profile_decode.py --model tiny-llama --tokens 4 --rows 5   # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from nested_reft.tasks.arithmetic import generate_arithmetic
from nested_reft.config import SamplingConfig
from nested_reft.engines.compiled import CompiledDecoder
from nested_reft.engines.eager import EagerDecoder
from nested_reft.models.loading import load_model
from nested_reft.tasks.prompts import build_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=14, help="operators listed per engine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    model.eval()
    prompts = [build_prompt(tokenizer, problem.question) for problem in generate_arithmetic(args.batch, seed=0)]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    engines = {"eager": EagerDecoder(), "compiled": CompiledDecoder()}

    def sample(engine: str) -> float:
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        engines[engine].sample(model, encoded.input_ids, encoded.attention_mask, sampling,
                               [tokenizer.eos_token_id], tokenizer.pad_token_id, generator)
        return time.perf_counter() - start

    print(f"# {args.model}, batch {args.batch}, prompt {encoded.input_ids.shape[1]} tokens, {args.tokens} new, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print(f"first compiled call (compiling) {sample('compiled'):.1f} s")
    seconds: dict[str, list[float]] = {engine: [] for engine in engines}
    for engine in ("eager", "compiled", "compiled", "eager"):
        seconds[engine].append(sample(engine))
    for engine, values in seconds.items():
        print(f"{engine}: {statistics.median(values):.2f} s per batch (median of {len(values)}), "
              f"{statistics.median(values) / args.tokens:.3f} s per token step")
    print(f"compiled / eager time: {statistics.median(seconds['compiled']) / statistics.median(seconds['eager']):.3f}")
    for engine in engines:
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            sample(engine)
        print(f"\n## {engine}")
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                            max_name_column_width=50))


if __name__ == "__main__":
    main()
