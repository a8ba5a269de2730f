"""The `nested-reft` command line: a thin layer over the library.

    nested-reft data show gsm8k --limit 2 --data-dir ../shared/data
    nested-reft train --model Qwen/Qwen2.5-Math-1.5B-Instruct --dataset gsm8k --skip-ratio 0.15 --mitigation retrace
    nested-reft sft --model smollm2-135m-instruct --dataset arithmetic --output-dir runs/sft
    nested-reft demo
    nested-reft eval --model runs/sft/model --benchmarks aime24 amc math500 minerva olympiadbench --limit 50
    nested-reft sweep configs/grids/smollm2-cpu.yaml        (--emit-commands jobs.txt, --only ID, --collect, --merge DIR)
    nested-reft report runs/sweeps/smollm2-cpu
    nested-reft probe --model smollm2-135m-instruct --dataset arithmetic --skip-ratios 0.05 0.15 0.3 --output-dir runs/probe
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nested_reft.config import (
    BENCHMARKS, DEFAULT_BENCHMARKS, ENGINES, EVALUATION_SETS, NAMED_OPTIONS, SKIP_POLICIES, TRAINING_SETS, ConfigError,
    DemoSettings, EvalSettings, ProbeSettings, load_config,
)

DATA_DIR_HELP = "a local copy (default $NESTED_REFT_DATA, else the hub)"

# Training flags -> dotted config option. One table: the flag names are fixed by the docs, the options, their
# defaults and the names an option takes (NAMED_OPTIONS, which --help lists) live in nested_reft.config.
TRAIN_FLAGS: dict[str, tuple[str, type]] = {
    "--model": ("model", str),
    "--dataset": ("dataset", str),
    "--data-dir": ("data_dir", str),
    "--train-problems": ("train_problems", int),
    "--output-dir": ("output_dir", str),
    "--seed": ("seed", int),
    "--skip-ratio": ("nesting.skip_ratio", float),
    "--border": ("nesting.border", int),
    "--skip-policy": ("nesting.skip_policy", str),
    "--bridge": ("nesting.bridge", str),
    "--mitigation": ("importance.mitigation", str),
    "--retrace-lambda": ("importance.retrace_lambda", float),
    "--is-level": ("importance.level", str),
    "--sft-epochs": ("sft.epochs", int),
    "--sft-max-examples": ("sft.max_examples", int),
    "--sft-layer-drop": ("sft.layer_drop", float),
    "--sft-distill-nested": ("sft.distill_nested", float),
    "--sft-distill-ratio": ("sft.distill_ratio", float),
    "--rft-steps": ("rft_steps", int),
    "--batch-size": ("batch_size", int),
    "--micro-batch-size": ("micro_batch_size", int),
    "--num-generations": ("grpo.num_generations", int),
    "--num-iterations": ("grpo.num_iterations", int),
    "--learning-rate": ("grpo.learning_rate", float),
    "--beta": ("grpo.beta", float),
    "--filter-groups": ("grpo.filter_groups", bool),
    "--generation-batch-size": ("grpo.generation_batch_size", int),
    "--skip-predictable": ("sampling.skip_predictable", bool),
    "--lora-r": ("lora.r", int),
    "--temperature": ("sampling.temperature", float),
    "--min-completion-length": ("sampling.min_new_tokens", int),
    "--engine": ("sampling.engine", str),
    "--dtype": ("dtype", str),
    "--gradient-checkpointing": ("gradient_checkpointing", bool),
    "--save-steps": ("save_steps", int),
    "--report-to": ("report_to", str),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    _quiet_libraries()
    try:
        return args.run(args) or 0
    except _user_errors() as error:
        print(f"nested-reft: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was written is resumable (or was removed); no traceback
        print("nested-reft: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nested-reft", description="Nested-ReFT: cheaper reinforced fine-tuning.")
    commands = parser.add_subparsers(metavar="COMMAND")

    data = commands.add_parser("data", help="inspect the datasets").add_subparsers(metavar="ACTION")
    show = data.add_parser("show", help="print examples of a dataset")
    show.add_argument("name",
                      help=f"a training set ({', '.join(TRAINING_SETS)}) or benchmark ({', '.join(BENCHMARKS)})")
    show.add_argument("--split", default=None, help="train or test (default: train for training sets, else test)")
    show.add_argument("--limit", type=int, default=3)
    show.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    show.set_defaults(run=_data_show)

    for name, run, summary in (
        ("train", _train, "SFT warm-up (when --sft-epochs > 0) then Nested-ReFT"),
        ("sft", _sft, "the SFT warm-up alone; saves the model to OUTPUT_DIR/model"),
    ):
        command = commands.add_parser(name, help=summary)
        command.add_argument("--config", default=None, help="a YAML config file (see configs/)")
        for flag, (option, kind) in TRAIN_FLAGS.items():
            if kind is bool:  # a switch: present means True, absent leaves the config's value
                command.add_argument(flag, action="store_const", const=True, default=None, help=f"config option {option}")
            else:
                command.add_argument(flag, type=kind, default=None, metavar=one_of(NAMED_OPTIONS.get(option)),
                                     help=f"config option {option}")
        command.add_argument(
            "--max-completion-length", type=int, default=None,
            help="sampling.max_new_tokens; also the minimum unless --min-completion-length is given (paper: min = max)",
        )
        command.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                             help=f"any other config option, e.g. --set grpo.beta=0.04 ({names_of_other_options()})")
        command.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
        command.set_defaults(run=run)

    demo = commands.add_parser("demo", help="baseline vs Nested-ReFT (uniform x = 15%%, retrace) on SmolLM2-135M and "
                                            "arithmetic problems: the saving and what it costs")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    demo.add_argument("--steps", type=int, default=None,
                      help=f"ReFT steps per run (default {DemoSettings.steps}, the study's)")
    demo.add_argument("--eval-problems", type=int, default=None,
                      help=f"held-out problems evaluated before and after (default {DemoSettings.eval_problems}, the "
                           "study's)")
    demo.add_argument("--lanes", type=int, default=None,
                      help=f"processes side by side, one torch thread each (default {DemoSettings.lanes}: the two "
                           "runs and the warm-up's evaluation); 1: in turn")
    demo.add_argument("--skip-ratio", type=float, default=None,
                      help=f"x of the nested run (default {DemoSettings.skip_ratio:g}, the paper's largest; U_x = 5 of "
                           "SmolLM2's 30 layers)")
    demo.add_argument("--skip-policy", default=None, metavar=one_of(SKIP_POLICIES),
                      help=f"the nested run's skip policy: {DemoSettings.skip_policy} (default, the paper's f_{{x,b}}) "
                           "| influence | kl_target (adaptive, bounded by x, with the study's options)")
    demo.set_defaults(run=_demo)

    evaluation = commands.add_parser(
        "eval", help="pass@1 accuracy on math benchmarks (paper: temperature 0.6, top-p 0.95)"
    )
    evaluation.add_argument("--model", required=True, help="a model alias, local directory or hub id")
    evaluation.add_argument("--benchmarks", nargs="+", default=None, metavar="NAME",
                            help=f"names separated by spaces or commas, some of: {' '.join(EVALUATION_SETS)}; default: "
                                 f"{' '.join(DEFAULT_BENCHMARKS)} (the paper's five)")
    evaluation.add_argument("--limit", type=int, default=None, help="evaluate the first N problems of each benchmark")
    evaluation.add_argument("--max-new-tokens", type=int, default=None,
                            help=f"default {EvalSettings.max_new_tokens} (paper: 32k)")
    evaluation.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    evaluation.add_argument("--output-dir", default=None, help="default runs/eval/<model>; a rerun resumes it")
    evaluation.add_argument("--batch-size", type=int, default=None,
                            help=f"prompts per generation batch (default {EvalSettings.batch_size})")
    evaluation.add_argument("--seed", type=int, default=None, help=f"default {EvalSettings.seed}")
    evaluation.add_argument("--engine", default=None, metavar=one_of(ENGINES),
                            help=f"decoding engine (default {EvalSettings.engine})")
    evaluation.add_argument("--dtype", default="float32", help="e.g. bfloat16 on a GPU")
    evaluation.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    evaluation.set_defaults(run=_eval)

    sweep = commands.add_parser("sweep", help="run a grid of instances (configs/grids/), skipping finished ones")
    sweep.add_argument("grid", help="a grid file, e.g. configs/grids/paper.yaml")
    sweep.add_argument("--only", default=None, metavar="ID", help="run just this instance (its SFT first if missing)")
    sweep.add_argument("--emit-commands", default=None, metavar="FILE",
                       help="write one shell command per instance to FILE (for a job array) instead of running")
    sweep.add_argument("--collect", action="store_true", help="only rewrite OUTPUT_DIR/results.csv from the runs")
    sweep.add_argument("--merge", default=None, metavar="DIR",
                       help="a results directory (another sweep's output_dir, a study's docs directory) whose done "
                            "instances count as done: not run or emitted again, their rows merged into results.csv, "
                            "steps.csv and problems.csv (a study continued on a fresh checkout)")
    sweep.set_defaults(run=_sweep)

    report = commands.add_parser("report", help="Figure 1, Table 2, counts and fits from SWEEP_DIR/results.csv")
    report.add_argument("sweep_dir", help="the grid's output_dir (holding results.csv)")
    report.add_argument("--output-dir", default=None, help="default SWEEP_DIR/report")
    report.set_defaults(run=_report)

    probe = commands.add_parser("probe", help="before ReFT: how far the nested models are from the model (KL, ESS, "
                                              "rewards, speedup, Block Influence) and the largest x worth nesting")
    probe.add_argument("--model", required=True, help="a model alias, local directory or hub id")
    probe.add_argument("--dataset", required=True, metavar=one_of(TRAINING_SETS),
                       help="a training set: its first --problems problems")
    probe.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    probe.add_argument("--output-dir", required=True, help="where probe.json and probe.png go")
    probe_defaults = ProbeSettings()
    probe.add_argument("--skip-ratios", type=float, nargs="+", default=None, metavar="X",
                       help=f"default {' '.join(f'{x:g}' for x in probe_defaults.skip_ratios)}")
    probe_nesting = (("--skip-policy", str, "skip_policy"), ("--border", int, "border"), ("--bridge", str, "bridge"),
                     ("--influence-temperature", float, "influence_temperature"))
    for flag, kind, option in probe_nesting:
        probe.add_argument(flag, type=kind, default=None, metavar=one_of(NAMED_OPTIONS.get(f"nesting.{option}")),
                           help=f"nesting.{option} of the draws (default: the config's)")
    for flag, kind, default in (("--problems", int, probe_defaults.problems), ("--draws", int, probe_defaults.draws),
                                ("--generations", int, probe_defaults.generations),
                                ("--max-new-tokens", int, probe_defaults.sampling.max_new_tokens),
                                ("--temperature", float, probe_defaults.sampling.temperature),
                                ("--kl-threshold", float, probe_defaults.kl_threshold),
                                ("--seed", int, probe_defaults.seed)):
        probe.add_argument(flag, type=kind, default=None, help=f"default {default}")
    probe.add_argument("--dtype", default="float32", help="e.g. bfloat16 on a GPU")
    probe.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    probe.set_defaults(run=_probe)
    return parser


def one_of(names: Sequence[str] | None) -> str | None:
    """The metavar of a flag whose value is one of `names`, listed as argparse lists choices (None: argparse's own
    metavar). The value is checked by the config, so that a wrong one is a one-line error naming the option."""
    return None if names is None else "{" + ",".join(names) + "}"


def names_of_other_options() -> str:
    """The names each option without a flag of its own takes, for --set's help."""
    flagged = {option for option, _ in TRAIN_FLAGS.values()}
    return "; ".join(f"{option} {one_of(names)}" for option, names in NAMED_OPTIONS.items() if option not in flagged)


def config_from_args(args: argparse.Namespace):
    """A TrainConfig from --config, the fixed flags and --set overrides (later ones win)."""
    overrides = {}
    for flag, (option, _) in TRAIN_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            overrides[option] = value
    if args.max_completion_length is not None:
        overrides["sampling.max_new_tokens"] = args.max_completion_length
        overrides.setdefault("sampling.min_new_tokens", args.max_completion_length)
    for assignment in args.set:
        option, separator, value = assignment.partition("=")
        if not separator:
            raise ConfigError(f"--set expects OPTION=VALUE, got {assignment!r}")
        overrides[option.strip()] = value.strip()
    return load_config(args.config, overrides)


def _train(args: argparse.Namespace) -> int:
    from nested_reft.training.trainer import train

    summary = train(config_from_args(args), resume=args.resume)
    _print_summary(summary)
    return 0


def _sft(args: argparse.Namespace) -> int:
    import dataclasses

    from nested_reft.training.trainer import train

    config = config_from_args(args)
    if config.sft.epochs == 0:
        raise ConfigError("sft.epochs must be >= 1 for `nested-reft sft`")
    train(dataclasses.replace(config, rft_steps=0), resume=args.resume)
    print(f"SFT model saved to {config.output_dir}/model")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from nested_reft.experiments.demo import run_demo

    options = {"steps": args.steps, "eval_problems": args.eval_problems, "skip_ratio": args.skip_ratio,
               "skip_policy": args.skip_policy, "lanes": args.lanes}
    settings = DemoSettings(**{key: value for key, value in options.items() if value is not None})
    run_demo(args.output_dir, model=args.model, settings=settings)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from nested_reft.evaluation.evaluate import evaluate_model, format_table, print_progress

    settings = EvalSettings(benchmarks=args.benchmarks, limit=args.limit, data_dir=args.data_dir,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                            engine=args.engine)
    result = evaluate_model(
        args.model, settings.benchmarks, args.output_dir, settings.config(), settings.data_dir, settings.limit,
        dtype=args.dtype, device=args.device, progress=print_progress,
    )
    print(format_table(result))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from nested_reft.experiments.sweep import sweep_main

    return sweep_main(args.grid, only=args.only, emit=args.emit_commands, collect=args.collect, merge=args.merge)


def _report(args: argparse.Namespace) -> int:
    from nested_reft.experiments.report import report_main

    return report_main(args.sweep_dir, args.output_dir)


def _probe(args: argparse.Namespace) -> int:
    from nested_reft.experiments.probe import probe_main, probe_settings

    nesting = {"skip_policy": args.skip_policy, "border": args.border, "bridge": args.bridge,
               "influence_temperature": args.influence_temperature}
    settings = probe_settings(args.skip_ratios, args.max_new_tokens, args.temperature, nesting, problems=args.problems,
                              draws=args.draws, generations=args.generations, kl_threshold=args.kl_threshold,
                              seed=args.seed)
    probe_main(args.model, args.dataset, args.output_dir, settings, args.data_dir, args.dtype, args.device)
    return 0


def _data_show(args: argparse.Namespace) -> int:
    from nested_reft.tasks.data import load_problems

    split = args.split or ("train" if args.name in TRAINING_SETS else "test")
    for problem in load_problems(args.name, split=split, data_dir=args.data_dir, limit=args.limit):
        print(f"--- {problem.id}\nquestion: {problem.question}\nanswer:   {problem.answer}")
        if problem.solution:
            print(f"solution: {problem.solution}")
    return 0


def _print_summary(summary: dict) -> None:
    for key in ("steps", "total_runtime_s", "token_speed", "generation_share", "final_reward"):
        value = summary.get(key)
        print(f"{key:>18}: {value:.4g}" if isinstance(value, float) else f"{key:>18}: {value}")


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by what the user asked for, or that a user can act on: one line, not a traceback.

    ConfigError covers the trainer's refusals too (an output directory that holds a run, a bad launch);
    LockHeldError is a run directory, sweep or sweep instance that another process is writing (it names
    that process); PathError is an output path that cannot be written (a full disk or a read-only file system
    met while writing too), or a damaged file the project reads back; FloatingPointError is the trainer's abort
    after `max_nonfinite_steps` non-finite updates, or the warm-up's at a non-finite step.
    """
    from nested_reft.training.checkpoint import CheckpointError
    from nested_reft.tasks.data import DataError
    from nested_reft.evaluation.records import EvalError
    from nested_reft.store.files import LockHeldError, PathError
    from nested_reft.models.loading import ModelLoadError
    from nested_reft.experiments.results import ResultsError

    return (ConfigError, DataError, ModelLoadError, CheckpointError, EvalError, ResultsError, LockHeldError,
            PathError, FloatingPointError)


def _quiet_libraries() -> None:
    """Keep the terminal for our progress bar: no per-shard save bars or library chatter."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
