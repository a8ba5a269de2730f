"""Training under `accelerate` DDP: two CPU processes (gloo) launched with `torch.distributed.run`.

The test launches this very file as the worker (`python -m torch.distributed.run --nproc_per_node 2
tests/test_distributed.py OUTPUT_DIR`). Each rank calls `train`; the worker records, per rank, which
prompts it sampled for and how many completion tokens, and the weights it ends with, so the test can
check that the ranks split the batch, that only the main process wrote the run's files, and that DDP
kept the ranks' weights identical (and equal to the saved model). Rank 1 is made to inspect the output
directory two seconds late, which fails a fresh run if the main process writes to it before every rank
has decided between a fresh start and a resume; the main process is made to write the final model two
seconds late, which the other rank's `train` must wait for.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BATCH, G, T, STEPS, WORLD = 4, 2, 4, 2, 2
ROOT = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT_S = 240  # below the launch's own timeout, so a hung worker reports where it hung


def overrides(output_dir: str) -> dict:
    return {
        "model": "tiny-llama", "dataset": "arithmetic", "output_dir": output_dir, "rft_steps": STEPS,
        "batch_size": BATCH, "micro_batch_size": 2, "grpo.num_generations": G, "grpo.learning_rate": 1e-3,
        "sampling.max_new_tokens": T, "sampling.min_new_tokens": T, "nesting.skip_ratio": 0.3,
        "save_steps": 1, "importance.mitigation": "retrace",
        # a warm-up of two steps, the second of one example: one rank gets it, the other takes part with none
        "sft.epochs": 1, "sft.batch_size": 4, "sft.max_examples": 5, "sft.learning_rate": 1e-3, "sft.max_length": 128,
    }


def PROBLEMS():  # noqa: N802 - the one problem set of every run here
    from nested_reft.tasks.arithmetic import generate_arithmetic

    return generate_arithmetic(16, seed=3)


def lowercase_share(completion: str, gold: str) -> float:
    """A reward a random tiny model earns sometimes, so groups disagree and the update is not zero."""
    return sum(ch.islower() for ch in completion) / max(len(completion), 1)


def lowercase_if_even(completion: str, gold: str) -> float:
    """lowercase_share on problems with an even answer, 0 on the others: their groups never teach."""
    return lowercase_share(completion, gold) if int(gold) % 2 == 0 else 0.0


# Rollout selection (issue 32): rounds of 2 prompts (one per rank), a pool of 6 problems read several times, odd
# answers never rewarded: groups are dropped, steps refill, prompts are skipped, and every rank must decide alike.
SELECTION = {"grpo.filter_groups": True, "grpo.generation_batch_size": 2, "grpo.filter_max_rounds": 3,
             "sampling.skip_predictable": True, "train_problems": 6, "sft.epochs": 0, "rft_steps": 3}


def worker(output_dir: str, variant: str = "plain") -> None:
    """One rank: train, recording this rank's prompts, generated tokens and final weights under records/."""
    torch.set_num_threads(1)
    import nested_reft.training.sft as sft
    import nested_reft.training.trainer as trainer
    from nested_reft.config import load_config
    from nested_reft.tasks.task import Task

    rank = int(os.environ["RANK"])
    faulthandler.dump_traceback_later(WORKER_TIMEOUT_S, exit=True)  # a hang shows every thread's stack, then exits
    records = Path(output_dir).parent / "records"
    records.mkdir(exist_ok=True)
    log = records / f"rank{rank}.jsonl"
    generate, reft = trainer.generate_rollouts, trainer.reft

    def recording_generate(model, tokenizer, prompts, num_generations, *args, **kwargs):
        rollouts = generate(model, tokenizer, prompts, num_generations, *args, **kwargs)
        with open(log, "a") as stream:
            stream.write(json.dumps({"prompts": list(prompts), "rows": rollouts.completion_ids.shape[0],
                                     "tokens": rollouts.completion_tokens}) + "\n")
        return rollouts

    def recording_reft(config, task, state, *args):
        reft(config, task, state, *args)
        accelerator, model = state.accelerator, state.model
        record = {"world": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
                  "backend": str(getattr(accelerator.state, "backend", None))}
        (records / f"rank{rank}.json").write_text(json.dumps(record))
        weights = {k: v.detach().cpu().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        torch.save(weights, records / f"rank{rank}.pt")

    decide = trainer.checkpoint_to_resume

    def late_decision(output, resume):  # rank 1 looks at the output dir late: rank 0 must not have written yet
        if rank == 1:
            time.sleep(2)
        return decide(output, resume)

    save_model = trainer.save_model

    def slow_save_model(directory, *args):  # the main process writes slowly: the other rank must wait for it
        if Path(directory).name == "model":
            time.sleep(2)
        save_model(directory, *args)

    tokenize = sft.tokenize_examples

    def recording_tokenize(tokenizer, problems, *args):  # the SFT examples this rank trains on
        with open(records / f"rank{rank}.sft.jsonl", "a") as stream:
            stream.write(json.dumps([problem.question for problem in problems]) + "\n")
        return tokenize(tokenizer, problems, *args)

    sft.tokenize_examples = recording_tokenize
    trainer.generate_rollouts, trainer.reft, trainer.save_model = recording_generate, recording_reft, slow_save_model
    trainer.checkpoint_to_resume = late_decision
    selects = variant == "selection"
    task = Task("arithmetic", PROBLEMS(), reward=lowercase_if_even if selects else lowercase_share)
    trainer.train(load_config(None, {**overrides(output_dir), **(SELECTION if selects else {})}), task)
    finished = {"model_saved": (Path(output_dir) / "model" / "model.safetensors").exists()}
    (records / f"rank{rank}.returned.json").write_text(json.dumps(finished))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_available() -> str | None:
    """Why the platform cannot run gloo, or None where it can."""
    if not torch.distributed.is_available():
        return "torch.distributed is not available in this torch build"
    if not torch.distributed.is_gloo_available():
        return "torch was built without the gloo backend"
    try:
        _free_port()
    except OSError as error:
        return f"cannot open a local TCP port for the rendezvous: {error}"
    return None


def _launch(root: Path, variant: str = "plain") -> Path:
    """Run this file's worker on WORLD gloo ranks, the run in root/run and the ranks' records in root/records."""
    reason = _gloo_available()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--nnodes=1",
               f"--master_port={_free_port()}", "--master_addr=127.0.0.1", __file__, str(root / "run"), variant]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"DDP run failed:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    return root


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    return _launch(tmp_path_factory.mktemp("ddp"))


def test_ddp_run_completes_with_two_gloo_processes(ddp_run):
    for rank in range(WORLD):
        record = json.loads((ddp_run / "records" / f"rank{rank}.json").read_text())
        assert record["world"] == WORLD and record["distributed_type"].endswith("MULTI_CPU"), record
    summary = json.loads((ddp_run / "run" / "summary.json").read_text())
    assert summary["steps"] == STEPS


def test_train_returns_on_every_rank_only_once_the_final_model_is_saved(ddp_run):
    for rank in range(WORLD):
        assert json.loads((ddp_run / "records" / f"rank{rank}.returned.json").read_text())["model_saved"]


def test_metrics_are_written_once_by_the_main_process(ddp_run):
    lines = (ddp_run / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))
    for line in lines:
        # min = max new tokens: every completion of every rank has T tokens, and the metric sums the ranks
        assert json.loads(line)["tokens_generated"] == BATCH * G * T


def test_each_rank_samples_its_own_share_of_the_batch(ddp_run):
    from nested_reft.config import load_config
    from nested_reft.tasks.prompts import build_prompt
    from nested_reft.models.tiny import byte_tokenizer
    from nested_reft.training.data_order import batch_for_step

    class OneProcess:
        num_processes, process_index = 1, 0

    problems, tokenizer = PROBLEMS(), byte_tokenizer()
    config = load_config(None, overrides("unused"))
    calls = [[json.loads(line) for line in (ddp_run / "records" / f"rank{r}.jsonl").read_text().splitlines()]
             for r in range(WORLD)]
    for step in range(1, STEPS + 1):
        shares = [calls[rank][step - 1] for rank in range(WORLD)]
        for share in shares:
            assert len(share["prompts"]) == BATCH // WORLD
            assert share["rows"] == BATCH // WORLD * G and share["tokens"] == BATCH // WORLD * G * T
        whole = [build_prompt(tokenizer, p.question) for p in batch_for_step(problems, config, step, OneProcess())]
        assert shares[0]["prompts"] + shares[1]["prompts"] == whole  # the ranks split the step's batch


def test_the_sft_warm_up_under_ddp_equals_the_one_process_warm_up(ddp_run, tmp_path):
    """Each rank trains on its share of every SFT batch; DDP's averaged gradient is the whole batch's."""
    from nested_reft.config import load_config
    from nested_reft.tasks.task import Task
    from nested_reft.training.trainer import train

    one_process = load_config(None, {**overrides(str(tmp_path / "one")), "rft_steps": 0})
    train(one_process, Task("arithmetic", PROBLEMS(), reward=lowercase_share))
    read = lambda run: [json.loads(line) for line in (run / "sft_metrics.jsonl").read_text().splitlines()]  # noqa: E731
    ddp, one = read(ddp_run / "run"), read(tmp_path / "one")
    seen = [[json.loads(line) for line in (ddp_run / "records" / f"rank{r}.sft.jsonl").read_text().splitlines()]
            for r in range(WORLD)]
    assert [len(questions) for questions in seen[0]] == [2, 1] and [len(q) for q in seen[1]] == [2, 1]
    assert not set(seen[0][0]) & set(seen[1][0])  # step 1: the ranks split the batch of 4
    assert seen[1][1] == seen[0][1]  # step 2 has one example: rank 1 runs it with weight 0, to take part
    assert [row["step"] for row in ddp] == [row["step"] for row in one] == [1, 2]
    for a, b in zip(ddp, one):  # step 2's loss is taken after step 1's update: equal losses, equal updates
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["learning_rate"] == b["learning_rate"]


def test_ranks_end_with_identical_weights_equal_to_the_saved_model(ddp_run):
    from safetensors.torch import load_file

    from nested_reft.models.tiny import tiny_model

    ranks = [torch.load(ddp_run / "records" / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    saved = load_file(ddp_run / "run" / "model" / "model.safetensors")
    initial = tiny_model("llama", num_layers=6, seed=0)[0].state_dict()
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), f"ranks disagree on {name}"
        if name in saved:
            assert torch.equal(value, saved[name]), f"saved model differs from the ranks on {name}"
    assert any(not torch.equal(ranks[0][n], initial[n]) for n in saved), "training did not change the weights"


def test_ranks_that_select_rollouts_take_the_same_decisions_and_stay_in_lockstep(tmp_path):
    """Filter and skips on: every rank runs the same rounds (one prompt each) and trains on as many groups, and DDP
    keeps their weights identical."""
    root = _launch(tmp_path, "selection")
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    calls = [(root / "records" / f"rank{r}.jsonl").read_text().splitlines() for r in range(WORLD)]
    assert len(calls[0]) == len(calls[1]) == sum(row["generation_rounds"] for row in rows)
    assert all(len(json.loads(call)["prompts"]) == 1 for rank in calls for call in rank)
    for row in rows:
        assert row["tokens_generated"] == row["groups_sampled"] * G * T and row["groups_kept"] % WORLD == 0
    assert any(row["groups_kept"] < row["groups_sampled"] for row in rows)  # the premise: groups were dropped
    ranks = [torch.load(root / "records" / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert all(torch.equal(value, ranks[1][name]) for name, value in ranks[0].items())


if __name__ == "__main__":
    worker(*sys.argv[1:])
