"""FSDP2 against DDP and one process: two CPU processes (gloo) per launch, launched as users launch them,
`accelerate launch --config_file configs/accelerate/fsdp2.yaml` (and ddp.yaml).

Two launches, shared by every test here (module fixture): the FSDP2 one trains the run of test_distributed
uninterrupted, then the same run killed after step 1 and resumed; the DDP one trains it uninterrupted. This file
is the worker of both (`... tests/test_fsdp.py ROOT KIND`); it records, per rank and step, the rollouts, the
advantages, the loss and the whole weights before and after the update, each rank's training footprint (local
shard sizes), its final local weights, and the all-gathers FSDP2 ran to generate, before the sampler started
and while it ran. The one-process reference replays the recorded step here.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from test_distributed import (
    BATCH, G, ROOT, STEPS, WORKER_TIMEOUT_S, WORLD, PROBLEMS, T, _free_port, _gloo_available, lowercase_share,
    overrides,
)

LAUNCH_CONFIGS = {"fsdp2": "configs/accelerate/fsdp2.yaml", "ddp": "configs/accelerate/ddp.yaml"}
LAUNCH_TIMEOUT_S = 300
ROLLOUT_FIELDS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "behavior_logprobs", "finished")


class KilledAfterStep1(Exception):
    pass


def reward_killing_at_step_2():
    """A reward that raises while scoring step 2 (on every rank alike): checkpoint-1 is the last one written."""
    calls = []

    def reward(completion, gold):
        calls.append(None)
        if len(calls) > BATCH // WORLD * G:
            raise KilledAfterStep1
        return lowercase_share(completion, gold)

    return reward


class Recorder:
    """Wraps the trainer's pieces in a worker so that, while `on`, each rank records what the tests compare."""

    def __init__(self, records: Path, rank: int):
        self.records, self.rank, self.on = records, rank, True
        self.footprints, self.all_gathers, self.generation_gathers = [], 0, []

    def install(self) -> None:
        import nested_reft.training.trainer as trainer
        import nested_reft.training.update as update
        from nested_reft.training.sharding import FSDP2

        self.policy_update, self.step_if_finite, self.reft = trainer.policy_update, update._step_if_finite, trainer.reft
        self.all_gather, self.gathered = torch.distributed.all_gather_single, FSDP2.gathered_for_generation
        trainer.policy_update, update._step_if_finite, trainer.reft = self.update, self.step, self.loop
        torch.distributed.all_gather_single = self.counted_all_gather  # FSDP2's all-gather of a unit's shards
        FSDP2.gathered_for_generation = lambda fsdp2, model, skip_set: self.gathering(fsdp2, model, skip_set)

    def update(self, state, rollouts, advantages, config):
        """The step's rollouts, advantages, loss and whole weights before and after (rank 0 holds the weights)."""
        if not self.on:
            return self.policy_update(state, rollouts, advantages, config)
        before = whole_weights(state.policy)
        result = self.policy_update(state, rollouts, advantages, config)
        record = {field: getattr(rollouts, field) for field in ROLLOUT_FIELDS}
        record.update(advantages=advantages, loss=result.loss, before=before, after=whole_weights(state.policy))
        step = len(list(self.records.glob(f"step*.rank{self.rank}.pt"))) + 1
        torch.save(record, self.records / f"step{step}.rank{self.rank}.pt")
        return result

    def step(self, state, loss, max_grad_norm):
        """The footprint just before the optimizer steps: gradients and the earlier steps' AdamW state exist."""
        from nested_reft.training.sharding import training_footprint

        if self.on:
            self.footprints.append(asdict(training_footprint(state.policy, state.optimizer)))
        return self.step_if_finite(state, loss, max_grad_norm)

    def loop(self, config, task, state, *args):
        """The ReFT loop, then this rank's final local weights (its shards under FSDP2)."""
        self.reft(config, task, state, *args)
        if self.on:
            local = {name: (p.to_local() if hasattr(p, "to_local") else p).detach().clone()
                     for name, p in state.policy.named_parameters()}
            torch.save(local, self.records / f"final.rank{self.rank}.pt")

    def counted_all_gather(self, *args, **kwargs):
        self.all_gathers += 1
        return self.all_gather(*args, **kwargs)

    @contextlib.contextmanager
    def gathering(self, fsdp2, model, skip_set):
        """The all-gathers FSDP2 runs for a step's generation: before the sampler starts, and while it decodes."""
        start = self.all_gathers
        with self.gathered(fsdp2, model, skip_set) as gathered:
            entered = self.all_gathers
            yield gathered
            self.generation_gathers.append({"skip_set": list(skip_set), "before_sampling": entered - start,
                                            "while_sampling": self.all_gathers - entered})

    def write(self) -> None:
        (self.records / f"footprint.rank{self.rank}.json").write_text(json.dumps(self.footprints[-1]))
        (self.records / f"gathers.rank{self.rank}.json").write_text(json.dumps(self.generation_gathers))


def whole_weights(policy) -> dict[str, torch.Tensor]:
    """The policy's whole weights: gathered onto rank 0 under FSDP2 (every rank takes part), else its own."""
    from nested_reft.training.sharding import gathered_weights

    weights = gathered_weights(policy)
    return weights if weights is not None else {k: v.detach().clone() for k, v in policy.state_dict().items()}


def worker(root: str, kind: str) -> None:
    """One rank of a launch: train the runs of `kind` (fsdp2: whole, killed, resumed; ddp: whole), recording."""
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(WORKER_TIMEOUT_S, exit=True)
    import accelerate

    from nested_reft.config import load_config
    from nested_reft.tasks.task import Task
    from nested_reft.training.trainer import train

    records = Path(root) / "records" / kind
    records.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(records, int(os.environ["RANK"]))
    recorder.install()
    accelerate.Accelerator.end_training = lambda self: None  # one process group for the launch's runs
    runs = Path(root) / "runs"
    train(load_config(None, overrides(str(runs / f"{kind}-whole"))), Task("arithmetic", PROBLEMS(),
                                                                           reward=lowercase_share))
    recorder.write()
    if kind == "fsdp2":
        recorder.on = False
        killed = load_config(None, overrides(str(runs / "fsdp2-killed")))
        with contextlib.suppress(KilledAfterStep1):
            train(killed, Task("arithmetic", PROBLEMS(), reward=reward_killing_at_step_2()))
        train(killed, Task("arithmetic", PROBLEMS(), reward=lowercase_share), resume=True)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> Path:
    reason = _gloo_available()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("fsdp")
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", PYTHONPATH=str(ROOT))
    for kind, launch_config in LAUNCH_CONFIGS.items():
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / launch_config),
                   "--num_processes", str(WORLD), "--main_process_port", str(_free_port()), __file__, str(root), kind]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
        assert done.returncode == 0, f"{kind} launch failed:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    return root


def step_record(root: Path, kind: str, step: int, rank: int) -> dict:
    return torch.load(root / "records" / kind / f"step{step}.rank{rank}.pt", weights_only=True)


def metrics(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        difference = (a[name] - b[name]).abs().max()
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), f"{name} differs by {difference}"


def test_the_ranks_sample_the_same_nested_rollouts_under_fsdp2_and_ddp(launches):
    for step in range(1, STEPS + 1):
        for rank in range(WORLD):
            sharded, replicated = step_record(launches, "fsdp2", step, rank), step_record(launches, "ddp", step, rank)
            for field in ("prompt_ids", "completion_ids", "completion_mask"):
                assert torch.equal(sharded[field], replicated[field]), (step, rank, field)
            assert torch.allclose(sharded["behavior_logprobs"], replicated["behavior_logprobs"], atol=1e-5)
    skip_sets = [[row["skip_set"] for row in metrics(launches / "runs" / f"{kind}-whole")] for kind in LAUNCH_CONFIGS]
    assert skip_sets[0] == skip_sets[1] and all(skip_sets[0])  # the same nested models, none of them empty


def test_the_sft_warm_up_runs_sharded_and_equals_ddp(launches):
    sharded, replicated = (metrics(launches / "runs" / f"{kind}-whole", "sft_metrics.jsonl") for kind in LAUNCH_CONFIGS)
    assert [row["step"] for row in sharded] == [row["step"] for row in replicated] == [1, 2]
    for a, b in zip(sharded, replicated):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert_close(step_record(launches, "fsdp2", 1, 0)["before"], step_record(launches, "ddp", 1, 0)["before"])


def test_one_reft_step_under_fsdp2_equals_ddp_and_one_process(launches):
    sharded, replicated = step_record(launches, "fsdp2", 1, 0), step_record(launches, "ddp", 1, 0)
    assert sharded["loss"] != 0 and sharded["loss"] == pytest.approx(replicated["loss"], abs=1e-5)
    assert_close(sharded["after"], replicated["after"])
    assert any(not torch.equal(sharded["after"][n], sharded["before"][n]) for n in sharded["after"])

    loss, after = one_process_update([step_record(launches, "fsdp2", 1, rank) for rank in range(WORLD)])
    assert loss == pytest.approx(sharded["loss"], abs=1e-5)
    assert_close(after, sharded["after"])


def one_process_update(ranks: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
    """Step 1's update in this process, on the ranks' rollouts joined (rank-major) from the same weights."""
    from accelerate import Accelerator

    from nested_reft.config import load_config
    from nested_reft.models.loading import load_model
    from nested_reft.training.optim import make_optimizer
    from nested_reft.training.update import TrainingState, policy_update

    config = load_config(None, overrides("unused"))
    model, tokenizer = load_model(config.model)
    model.load_state_dict(ranks[0]["before"])
    optimizer, scheduler = make_optimizer(model, config.grpo, config.rft_steps * config.grpo.num_iterations)
    state = TrainingState(model, optimizer, scheduler, Accelerator(cpu=True))
    result = policy_update(state, joined_rollouts(ranks, tokenizer.pad_token_id), torch.cat(
        [rank["advantages"] for rank in ranks]), config)
    return result.loss, {name: value.detach().clone() for name, value in model.state_dict().items()}


def joined_rollouts(ranks: list[dict], pad_id: int):
    """The ranks' rollouts as one batch, prompts left-padded again to the longest."""
    from nested_reft.engines.rollout import Rollouts

    width = max(rank["prompt_ids"].shape[1] for rank in ranks)

    def left_padded(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (width - tensor.shape[1], 0), value=value)

    return Rollouts(
        prompt_ids=torch.cat([left_padded(rank["prompt_ids"], pad_id) for rank in ranks]),
        prompt_mask=torch.cat([left_padded(rank["prompt_mask"], 0) for rank in ranks]),
        **{field: torch.cat([rank[field] for rank in ranks]) for field in ROLLOUT_FIELDS[2:]},
        skip_set=(), generation_time_s=0.0,
    )


def test_each_rank_holds_one_world_th_of_ddps_parameters_gradients_and_optimizer_state(launches):
    def footprint(kind: str, rank: int) -> dict:
        return json.loads((launches / "records" / kind / f"footprint.rank{rank}.json").read_text())

    replicated = footprint("ddp", 0)
    assert replicated == footprint("ddp", 1) and all(replicated.values())
    for rank in range(WORLD):
        for component, whole in replicated.items():
            assert footprint("fsdp2", rank)[component] == pytest.approx(whole / WORLD, rel=0.01), (rank, component)


def test_generation_gathers_every_weight_but_the_skipped_layers(launches):
    from nested_reft.models.loading import load_model
    from nested_reft.nesting.layers import decoder_layers

    model, _ = load_model("tiny-llama")
    layers = decoder_layers(model)[2]
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    for row in metrics(launches / "runs" / "fsdp2-whole"):
        skipped = sum(p.numel() * p.element_size() for i in row["skip_set"] for p in layers[i].parameters())
        assert skipped > 0 and row["gathered_weight_bytes"] == whole - skipped
    assert {row["gathered_weight_bytes"] for row in metrics(launches / "runs" / "ddp-whole")} == {0}


def test_generation_gathers_each_kept_unit_once_per_step_not_per_token(launches):
    """One all-gather per unit (the root, each kept layer) before sampling starts, none while it decodes its T
    tokens, none for the skipped layers."""
    from nested_reft.models.loading import TINY_NUM_LAYERS

    assert T > 1
    for rank in range(WORLD):
        steps = json.loads((launches / "records" / "fsdp2" / f"gathers.rank{rank}.json").read_text())
        assert len(steps) == STEPS
        for step in steps:
            assert step["before_sampling"] == 1 + TINY_NUM_LAYERS - len(step["skip_set"]), step
            assert step["while_sampling"] == 0, step


def test_a_resumed_fsdp2_run_equals_the_uninterrupted_one(launches):
    from safetensors.torch import load_file

    whole, resumed = launches / "runs" / "fsdp2-whole", launches / "runs" / "fsdp2-killed"
    keys = ("step", "skip_set", "reward_mean", "loss", "grad_norm", "learning_rate", "h_mean", "kl_behavior_target")
    def rows(run: Path) -> list[dict]:
        return [{key: row[key] for key in keys} for row in metrics(run)]

    assert rows(resumed) == rows(whole)
    assert_close(load_file(resumed / "model" / "model.safetensors"), load_file(whole / "model" / "model.safetensors"),
                 atol=0)


def test_fsdp2_checkpoints_hold_what_ddp_checkpoints_hold(launches):
    """Whole weights and an index-keyed optimizer state: either launch resumes the other's checkpoints."""
    from safetensors.torch import load_file

    sharded, replicated = (launches / "runs" / f"{kind}-whole" / f"checkpoint-{STEPS}" for kind in LAUNCH_CONFIGS)
    assert_close(load_file(sharded / "model.safetensors"), load_file(replicated / "model.safetensors"))
    states = [torch.load(path / "optimizer.pt", weights_only=True)["optimizer"] for path in (sharded, replicated)]
    assert states[0]["param_groups"] == states[1]["param_groups"]
    assert states[0]["state"].keys() == states[1]["state"].keys()
    for index, values in states[0]["state"].items():
        assert_close(values, states[1]["state"][index])


def test_the_saved_model_loads_plainly_and_equals_the_ranks_final_weights(launches):
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(launches / "runs" / "fsdp2-whole" / "model").state_dict()
    for rank in range(WORLD):
        final = torch.load(launches / "records" / "fsdp2" / f"final.rank{rank}.pt", weights_only=True)
        for name, local in final.items():
            assert torch.equal(local, saved[name].chunk(WORLD, dim=0)[rank]), (rank, name)


# --- refusals (no launch) ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("option", "value"), [
    ("model", "/models/qwen.gguf"), ("lora.r", 16), ("grpo.beta", 0.04), ("dtype", "float16"),
])
def test_fsdp2_refuses_options_it_cannot_honour(option, value):
    from nested_reft.config import ConfigError, load_config
    from nested_reft.training.sharding import check_fits_fsdp2

    config = load_config(None, {option: value})
    check_fits_fsdp2(load_config(None, {}), WORLD)
    with pytest.raises(ConfigError, match=f"^{option} must be"):
        check_fits_fsdp2(config, WORLD)


@pytest.mark.parametrize(("variable", "value", "key"), [
    ("FSDP_VERSION", "1", "fsdp_version"), ("FSDP_OFFLOAD_PARAMS", "true", "fsdp_offload_params"),
    ("FSDP_ACTIVATION_CHECKPOINTING", "true", "fsdp_activation_checkpointing"),
    ("FSDP_CPU_RAM_EFFICIENT_LOADING", "true", "fsdp_cpu_ram_efficient_loading"),
])
def test_launch_options_fsdp2_cannot_honour_are_refused_by_name(monkeypatch, variable, value, key):
    from nested_reft.config import ConfigError
    from nested_reft.training.sharding import FSDP2, fsdp2_of_launch

    assert fsdp2_of_launch() is None  # no FSDP launch: replicated
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp2_of_launch() == FSDP2(reshard_after_forward=True)
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    assert fsdp2_of_launch() == FSDP2(reshard_after_forward=False)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=f"^{key} in the accelerate launch config must be"):
        fsdp2_of_launch()


def test_a_one_process_fsdp2_launch_is_refused_before_anything_is_written(monkeypatch, tmp_path):
    from nested_reft.config import ConfigError, load_config
    from nested_reft.training.trainer import train

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ConfigError, match="^number of processes must be at least 2 under FSDP2"):
        train(load_config(None, overrides(str(tmp_path / "run"))))
    assert not (tmp_path / "run").exists()


if __name__ == "__main__":
    worker(*sys.argv[1:])
