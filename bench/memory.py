"""Per-rank training memory and step time: one process, DDP and FSDP2 (two processes), LoRA on and off, gradient
checkpointing on and off, on SmolLM2-135M-Instruct by default.

Each configuration is one launch of this file as its worker, launched as users launch training (plain `python`
for one process, `accelerate launch --config_file configs/accelerate/{ddp,fsdp2}.yaml` for two; on a machine
without a GPU with ACCELERATE_USE_CPU=1, gloo). The worker runs the trainer itself (`nested_reft.training.trainer.train`:
no SFT, --steps ReFT steps on generated arithmetic prompts, x = 15%, retrace) and reports, per rank:

- parameters, gradients and optimizer state, in bytes of this rank's local shards (`sharding.training_footprint`),
  read by an optimizer pre-step hook at the last step (the gradients and the previous steps' AdamW state exist);
- the process's peak memory up to that moment: peak RSS on CPU (every byte above, plus the runtime, the
  activations, and the whole model as loaded before it is sharded), peak allocated device memory on a GPU; the
  final checkpoint, written after it, is left out (under FSDP2 it gathers the whole state onto the main process);
- step time: the median step_time_s of the steps after the first (metrics.jsonl);
- the weights gathered to generate, per step (FSDP2: all but the skipped layers; 0 otherwise), and those not
  gathered because their layers were skipped (the whole model, the ranks' parameter shards summed, less that).

Configurations the trainer refuses at start-up (FSDP2 with LoRA) are listed with the refusal. Progress goes to
stderr, the Markdown table to stdout. On CPU both processes of a launch share the cores `taskset` allows: step
times compare configurations with each other on this machine, nothing more.

    taskset -c 0 python bench/memory.py                             # 2 prompts x G 2, 32 tokens, 3 steps
    python bench/memory.py --prompts 4 --generations 4 --tokens 64 --steps 4
    python bench/memory.py --model tiny-llama --steps 2               # a quick look at the plumbing
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_CONFIGS = {"ddp": "configs/accelerate/ddp.yaml", "fsdp2": "configs/accelerate/fsdp2.yaml"}
LORA_RANK = 16  # TRL ModelConfig's lora_r; docs/scaling.md uses the same
MIB = 2**20


@dataclass(frozen=True)
class Setup:
    """One configuration: how it is launched and the two options that change memory."""

    launch: str  # one-process | ddp | fsdp2
    lora: bool
    gradient_checkpointing: bool

    @property
    def processes(self) -> int:
        return 1 if self.launch == "one-process" else 2


SETUPS = [Setup(launch, lora, checkpointing) for launch in ("one-process", "ddp", "fsdp2")
          for lora in (False, True) for checkpointing in (False, True)]


def overrides(args, setup: Setup, output_dir: str) -> dict:
    """The run's config: the benchmark's size, no SFT, the paper's x = 15% with retrace."""
    return {
        "model": args.model, "dataset": "arithmetic", "output_dir": output_dir, "rft_steps": args.steps,
        "batch_size": args.prompts, "micro_batch_size": args.prompts * args.generations,
        "grpo.num_generations": args.generations, "sampling.max_new_tokens": args.tokens,
        "sampling.min_new_tokens": args.tokens, "sft.epochs": 0, "nesting.skip_ratio": 0.15,
        "importance.mitigation": "retrace", "lora.r": LORA_RANK if setup.lora else 0,
        "gradient_checkpointing": setup.gradient_checkpointing,
    }


def worker(args, setup: Setup, report_dir: Path) -> None:
    """One rank: train, measuring the footprint at every optimizer step; write this rank's report."""
    torch.set_num_threads(args.threads)
    import nested_reft.training.trainer as trainer
    from nested_reft.config import load_config
    from nested_reft.training.rundir import METRICS_FILE, read_metrics
    from nested_reft.training.sharding import training_footprint

    footprints, reft = [], trainer.reft

    def measured_reft(config, task, state, *rest):  # the trainer's loop, with a hook on its optimizer
        optimizer = getattr(state.optimizer, "optimizer", state.optimizer)  # inside accelerate's wrapper
        optimizer.register_step_pre_hook(
            lambda *_: footprints.append({**asdict(training_footprint(state.policy, optimizer)),
                                          "peak_mib": peak_memory_mib()}))
        reft(config, task, state, *rest)

    trainer.reft = measured_reft
    output = report_dir / "run"
    trainer.train(load_config(None, overrides(args, setup, str(output))))
    rows = read_metrics(output / METRICS_FILE)
    rank = int(os.environ.get("RANK", "0"))
    report = {**footprints[-1], "step_time_s": statistics.median(row["step_time_s"] for row in rows[1:] or rows),
              "gathered_weight_bytes": statistics.mean(row["gathered_weight_bytes"] for row in rows)}
    (report_dir / f"rank{rank}.json").write_text(json.dumps(report))


def peak_memory_mib() -> float:
    """Peak allocated device memory on a GPU, else the process's peak RSS (Linux reports it in KiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def launch(args, setup: Setup, report_dir: Path) -> None:
    """Run `setup` as users run it, this file its worker; raise with the output's tail if it fails."""
    worker_args = [__file__, "--worker", setup.launch, str(int(setup.lora)), str(int(setup.gradient_checkpointing)),
                   str(report_dir), *passed_options(args)]
    if setup.processes == 1:
        command = [sys.executable, *worker_args]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / LAUNCH_CONFIGS[setup.launch]), "--num_processes", str(setup.processes),
                   "--main_process_port", str(free_port()), *worker_args]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{setup} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def passed_options(args) -> list[str]:
    return ["--model", args.model, "--prompts", str(args.prompts), "--generations", str(args.generations),
            "--tokens", str(args.tokens), "--steps", str(args.steps), "--threads", str(args.threads)]


def refusal(args, setup: Setup) -> str | None:
    """Why the trainer refuses `setup` at start-up (FSDP2's checks), or None."""
    from nested_reft.config import ConfigError, load_config
    from nested_reft.training.sharding import check_fits_fsdp2

    if setup.launch != "fsdp2":
        return None
    try:
        check_fits_fsdp2(load_config(None, overrides(args, setup, "unused")), setup.processes)
    except ConfigError as error:
        return str(error)
    return None


def table_row(setup: Setup, reports: list[dict] | None, refused: str | None) -> str:
    """One Markdown row: the largest rank's figures (the ranks of a launch hold alike)."""
    head = (f"| {setup.launch} | {setup.processes} | {'r=' + str(LORA_RANK) if setup.lora else 'off'} | "
            f"{'on' if setup.gradient_checkpointing else 'off'} |")
    if refused:
        return head + f" refused: {refused.split(':')[0]} |" + " |" * 7
    largest = {key: max(report[key] for report in reports) for key in reports[0]}
    figures = [largest["parameters"] / MIB, largest["gradients"] / MIB, largest["optimizer_state"] / MIB,
               (largest["parameters"] + largest["gradients"] + largest["optimizer_state"]) / MIB, largest["peak_mib"]]
    gathered = largest["gathered_weight_bytes"]
    not_gathered = f"{(sum(r['parameters'] for r in reports) - gathered) / MIB:.1f}" if gathered else "-"
    return (head + "".join(f" {value:.1f} |" for value in figures)
            + f" {largest['step_time_s']:.2f} | {gathered / MIB:.1f} | {not_gathered} |")


TABLE_HEAD = ("| launch | processes | LoRA | gradient checkpointing | parameters MiB | gradients MiB "
              "| optimizer state MiB | sum MiB | peak memory MiB | step s | gathered MiB/step | not gathered (skipped) MiB/step |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step (all ranks together)")
    parser.add_argument("--generations", type=int, default=2, help="G, completions per prompt")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per completion (min = max)")
    parser.add_argument("--steps", type=int, default=3, help="ReFT steps; the step time is the median after the first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--only", choices=("one-process", *LAUNCH_CONFIGS), default=None)
    parser.add_argument("--worker", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        launch_name, lora, checkpointing, report_dir = args.worker
        worker(args, Setup(launch_name, lora == "1", checkpointing == "1"), Path(report_dir))
        return
    print(TABLE_HEAD, flush=True)
    for setup in SETUPS:
        if args.only and setup.launch != args.only:
            continue
        print(f"running {setup}", file=sys.stderr)
        refused = refusal(args, setup)
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as report_dir:
            if not refused:
                launch(args, setup, Path(report_dir))
            reports = [json.loads(path.read_text()) for path in sorted(Path(report_dir).glob("rank*.json"))]
            print(table_row(setup, reports, refused), flush=True)


if __name__ == "__main__":
    main()
