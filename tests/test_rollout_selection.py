"""Rollouts where they teach (issue 32): DAPO's group filter and GRESO-style prompt skipping, on hand-built rewards
and stand-in rollouts (no model), then in tiny runs: what the metrics count, a step without an informative group,
and a selecting run that selects nothing equal to the plain run."""

from __future__ import annotations

import threading

import pytest
import torch
from test_trainer import G as RUN_G
from test_trainer import PROBLEMS as RUN_PROBLEMS
from test_trainer import T, final_weights, initial_weights, lowercase_if_even, run

import nested_reft.training.metrics as metrics_module
import nested_reft.training.trainer as trainer
from nested_reft.config import ConfigError, load_config
from nested_reft.engines.rollout import Rollouts
from nested_reft.store.seeding import step_generator
from nested_reft.tasks.data import DataError
from nested_reft.tasks.problems import Problem
from nested_reft.tasks.task import Task
from nested_reft.training.data_order import batch_for_step, order_indices
from nested_reft.training.metrics import SELECTION_FIELDS, StepMetrics
from nested_reft.training.prompt_history import PromptHistory
from nested_reft.training.rollout_selection import RolloutSelection, informative_groups
from nested_reft.training.startup import training_set

G = 2
PROBLEMS = [Problem(f"p{i}", f"question {i}", str(i), None) for i in range(8)]
VARIED, FLAT = [0.0, 1.0], [1.0, 1.0]


class OneRank:
    num_processes, process_index, device = 1, 0, torch.device("cpu")

    def gather(self, tensor):
        return tensor


def selecting(**overrides):
    values = {"batch_size": 2, "grpo.num_generations": G, "grpo.filter_groups": True, "seed": 3}
    return load_config(None, {**values, **overrides})


class StandIn:
    """generate and score without a model: a prompt's last id is its problem's number, round r pads prompts to 2 + r
    and completions to 3 + r tokens, and problem p's rewards are `rewards[p.id]` (default VARIED)."""

    def __init__(self, rewards: dict[str, list[float]] | None = None):
        self.rewards, self.rounds = rewards or {}, []

    def generate(self, problems, round_index):
        self.rounds.append((round_index, [p.id for p in problems]))
        rows, width, length = len(problems) * G, 2 + round_index, 3 + round_index
        numbers = torch.tensor([int(p.id[1:]) for p in problems]).repeat_interleave(G)
        prompt_ids = torch.zeros(rows, width, dtype=torch.long)
        prompt_ids[:, -1] = numbers
        return Rollouts(prompt_ids=prompt_ids, prompt_mask=torch.ones(rows, width, dtype=torch.long),
                        completion_ids=torch.ones(rows, length, dtype=torch.long),
                        completion_mask=torch.ones(rows, length, dtype=torch.long),
                        behavior_logprobs=torch.full((rows, length), -1.0), finished=torch.ones(rows, dtype=torch.bool),
                        skip_set=(), generation_time_s=1.0)

    def score(self, problems, rollouts):
        return torch.tensor([r for p in problems for r in self.rewards.get(p.id, VARIED)], dtype=torch.float32)


def step(selection, stand_in, number=1, accelerator=None, problems=PROBLEMS):
    return selection.batch(problems, number, accelerator or OneRank(), stand_in.generate, stand_in.score)


def order(config, positions):
    return [PROBLEMS[i].id for i in order_indices(len(PROBLEMS), config.seed, positions)]


def outcome(counts) -> tuple:
    return counts.groups_sampled, counts.groups_kept, counts.generation_rounds, counts.round_limit_hit


def kept_ids(batch) -> list[str]:
    return [f"p{n}" for n in batch.rollouts.prompt_ids[::G, -1].tolist()]


# --- the filter (DAPO) -----------------------------------------------------------------------------------


def test_a_group_with_equal_rewards_is_dropped_and_one_with_varied_rewards_kept():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.7])  # 4 groups of G = 2, hand-built
    assert informative_groups(rewards, 2, "reward") == [False, True, False, True]
    assert informative_groups(rewards, 2, "correct") == [False, True, False, False]  # 0.5 and 0.7: both wrong


def test_the_filter_refills_from_the_data_order_until_the_batch_holds_informative_groups():
    config = selecting()
    walk = order(config, range(8))
    flat = {walk[0], walk[1], walk[3]}  # rounds of 2: round 1 has none informative, round 2 one, round 3 the second
    stand_in = StandIn({problem: FLAT for problem in flat})
    batch = step(RolloutSelection(config), stand_in)
    assert [ids for _, ids in stand_in.rounds] == [walk[0:2], walk[2:4], walk[4:6]]
    assert [index for index, _ in stand_in.rounds] == [0, 1, 2]  # each round samples with a generator of its own
    assert kept_ids(batch) == [walk[2], walk[4]]  # the first two informative groups, in order
    assert batch.rewards.tolist() == VARIED * 2 and batch.trains
    counts = batch.selection
    assert outcome(counts) == (6, 2, 3, False)
    assert counts.sampled_rewards.numel() == 6 * G  # the dropped groups' rewards too
    assert counts.completion_lengths.tolist() == [3] * 2 * G + [4] * 2 * G + [5] * 2 * G  # every row of every round
    assert batch.rollouts.completion_mask.shape == (2 * G, 5) and batch.rollouts.prompt_mask.shape == (2 * G, 4)
    assert batch.rollouts.completion_mask.sum().item() == 4 * G + 5 * G  # padded rows keep their own lengths
    assert batch.rollouts.prompt_mask[:G].tolist() == [[0, 1, 1, 1]] * G  # round 2's prompts, left-padded
    assert batch.rollouts.generation_time_s == 3.0


def test_informative_groups_past_the_batch_are_dropped_as_verl_does():
    config = selecting(**{"grpo.generation_batch_size": 4})
    batch = step(RolloutSelection(config), StandIn())
    assert kept_ids(batch) == order(config, range(2))
    assert (batch.selection.groups_sampled, batch.selection.groups_kept, batch.selection.generation_rounds) == (4, 2, 1)


@pytest.mark.parametrize("informative, kept, trains", [(set(), 0, False), ({0}, 1, True)])
def test_refilling_stops_at_the_round_limit_and_the_step_trains_on_what_it_has(informative, kept, trains):
    config = selecting(**{"grpo.filter_max_rounds": 3})
    walk = order(config, range(8))
    stand_in = StandIn({problem: VARIED if index in informative else FLAT for index, problem in enumerate(walk)})
    selection = RolloutSelection(config)
    batch = step(selection, stand_in)
    assert len(stand_in.rounds) == 3 and selection.cursor == 6
    counts = batch.selection
    assert outcome(counts) == (6, kept, 3, True)
    assert batch.trains == trains and batch.rollouts.completion_ids.shape[0] == kept * G == batch.rewards.numel()


def test_without_a_round_limit_a_step_stops_once_it_has_read_the_training_set():
    config = selecting(**{"grpo.filter_max_rounds": 0, "grpo.generation_batch_size": 3})
    batch = step(RolloutSelection(config), StandIn({p.id: FLAT for p in PROBLEMS}))
    assert batch.selection.generation_rounds == 3 and batch.selection.round_limit_hit  # 9 prompts read >= 8


def test_without_selection_a_step_is_the_papers_batch():
    config = load_config(None, {"batch_size": 2, "grpo.num_generations": G})
    selection, stand_in = RolloutSelection(config), StandIn({p.id: FLAT for p in PROBLEMS})
    batch = step(selection, stand_in, number=3)
    assert not selection.active and batch.selection is None
    assert stand_in.rounds == [(0, [p.id for p in batch_for_step(PROBLEMS, config, 3, OneRank())])]
    assert batch.rewards.tolist() == FLAT * 2  # nothing dropped


# --- skipping predictable prompts (GRESO-style) ----------------------------------------------------------


def test_a_prompts_history_and_skip_probability_follow_the_rule_by_hand():
    history = PromptHistory(exploration=0.5)
    assert history.observe(["a", "b", "a", "c"], [True, False, True, True]) == 0
    assert history.streaks == {"a": 2, "c": 1}  # consecutive zero-variance groups; b's varied
    assert history.skip_probability("a", 0.05) == pytest.approx(1 - 0.5**2)  # 0.75
    assert history.skip_probability("c", 0.05) == pytest.approx(0.5)
    assert history.skip_probability("b", 0.05) == 0.0 and history.skip_probability("new", 0.05) == 0.0
    history.observe(["c"], [False])
    assert "c" not in history.streaks  # a group that varies clears the streak
    history.streaks["d"] = 5
    assert history.skip_probability("d", 0.05) == pytest.approx(0.95)  # 0.5^5 = 0.031 < the floor
    assert history.skip_probability("d", 0.2) == pytest.approx(0.8)


@pytest.mark.parametrize("skipped, considered, predictable, expected", [
    (3, 4, 3, 0.55),  # share 0.75 > target 0.5: explore more
    (1, 4, 2, 0.45),  # share 0.25 < 0.5: skip more
    (2, 4, 2, 0.50),  # on target
    (0, 4, 0, 0.50),  # met no predictable prompt: nothing to act on
])
def test_the_exploration_probability_moves_toward_the_target_share_of_skipped_prompts(skipped, considered, predictable,
                                                                                     expected):
    sampling = load_config(None, {"sampling.skip_target": 0.5, "sampling.skip_adapt": 0.05}).sampling
    history = PromptHistory(exploration=0.5)
    history.adapt(skipped, considered, predictable, sampling)
    assert history.exploration == pytest.approx(expected)


def test_the_exploration_probability_stays_between_the_floor_and_1():
    sampling = load_config(None, {"sampling.skip_floor": 0.1, "sampling.skip_initial": 0.1,
                                  "sampling.skip_adapt": 0.3}).sampling
    low, high = PromptHistory(exploration=0.1), PromptHistory(exploration=0.9)
    low.adapt(0, 4, 1, sampling)
    high.adapt(4, 4, 4, sampling)
    assert low.exploration == 0.1 and high.exploration == 1.0


def test_skips_draw_once_per_predictable_prompt_and_a_skipped_prompt_comes_back():
    history = PromptHistory(exploration=0.5, streaks={"a": 1, "c": 3})
    candidates = iter([(0, "a"), (1, "b"), (2, "c"), (3, "d"), (4, "e")])
    chosen, read, predictable = history.choose(candidates, 2, step_generator(0, 1, "test"), 0.05)
    draws = torch.rand(2, generator=step_generator(0, 1, "test"), dtype=torch.float64).tolist()
    skip_probabilities = [0.5, 0.0, 1 - 0.5**3, 0.0, 0.0]  # a: z = 1, c: z = 3, the others never flat
    expected, u = [], iter(draws)
    for position, q in enumerate(skip_probabilities):  # the rule by hand: one draw per prompt with z >= 1
        if len(expected) < 2 and (q == 0 or next(u) >= q):  # skipped when u < q
            expected.append(position)
    assert chosen == expected and read == expected[-1] + 1
    assert predictable == sum(q > 0 for q in skip_probabilities[:read])
    skipped = {"a", "c"} - {"a" if 0 in chosen else "", "c" if 2 in chosen else ""}
    assert history.skipped == skipped
    assert history.observe(["a", "c"], [True, True]) == len(skipped)  # sampled again after a skip: came back
    assert history.skipped == set()


def test_the_floor_keeps_every_prompt_sampled_now_and_then():
    history = PromptHistory(exploration=0.05, streaks={"stuck": 1000})
    candidates = ((position, "stuck") for position in range(10**6))
    chosen, read, _ = history.choose(candidates, 100, step_generator(0, 1, "floor"), 0.05)
    assert len(chosen) == 100 and 100 / read == pytest.approx(0.05, abs=0.015)  # sampled about 1 time in 20


def test_a_selecting_run_skips_prompts_whose_groups_taught_nothing_and_says_how_many_came_back():
    config = load_config(None, {"batch_size": 2, "grpo.num_generations": G, "sampling.skip_predictable": True,
                                "sampling.skip_initial": 0.5, "seed": 3})
    pool = PROBLEMS[:4]
    stand_in = StandIn({p.id: FLAT for p in pool})  # every group flat: every prompt predictable once sampled
    selection = RolloutSelection(config)
    first, second = step(selection, stand_in, 1, problems=pool), step(selection, stand_in, 2, problems=pool)
    assert first.selection.prompts_skipped == second.selection.prompts_skipped == 0  # epoch 0: no history yet
    assert selection.history.streaks == {p.id: 1 for p in pool} and selection.cursor == 4
    third = step(selection, stand_in, 3, problems=pool)
    # by hand: every prompt has z = 1, so q = 1 - 0.5 = 0.5 and one draw per prompt read
    draws = iter(torch.rand(64, generator=step_generator(3, 3, "skip-prompts"), dtype=torch.float64).tolist())
    sampled, read = 0, 0
    while sampled < 2:
        read += 1
        sampled += next(draws) >= 0.5
    assert third.selection.prompts_skipped == read - 2 and selection.cursor == 4 + read
    assert third.selection.skip_exploration == 0.5
    share = (read - 2) / read
    assert selection.history.exploration == pytest.approx(0.5 + 0.05 * ((share > 0.5) - (share < 0.5)))
    later = [step(selection, stand_in, number, problems=pool).selection for number in range(4, 9)]
    assert sum(counts.prompts_returned for counts in later) > 0  # skipped ones reached again and sampled


def test_a_resumed_selection_selects_what_the_uninterrupted_one_did():
    config = selecting(**{"sampling.skip_predictable": True, "grpo.filter_max_rounds": 3})
    stand_in = StandIn({p.id: FLAT for p in PROBLEMS[::2]})
    whole, resumed = RolloutSelection(config), RolloutSelection(config)
    for number in range(1, 4):
        step(whole, stand_in, number)
    resumed.load_state_dict(whole.state_dict())
    for number in range(4, 7):
        a, b = step(whole, stand_in, number), step(resumed, stand_in, number)
        assert kept_ids(a) == kept_ids(b) and a.selection.prompts_skipped == b.selection.prompts_skipped
    assert whole.state_dict() == resumed.state_dict()


# --- several processes: the same decisions on every rank -------------------------------------------------


class Exchange:
    """An all-gather between threads that stand in for ranks."""

    def __init__(self, world: int):
        self.barrier, self.slots = threading.Barrier(world), [None] * world

    def gather(self, rank: int, tensor: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = tensor
        self.barrier.wait()
        gathered = torch.cat(self.slots)
        self.barrier.wait()
        return gathered


class ThreadRank(OneRank):
    def __init__(self, exchange: Exchange, rank: int):
        self.exchange, self.num_processes, self.process_index = exchange, len(exchange.slots), rank

    def gather(self, tensor):
        return self.exchange.gather(self.process_index, tensor)


def on_two_ranks(config, rewards, steps: int):
    """Each rank's (selection, batches) after `steps` steps, the ranks run side by side."""
    exchange, results = Exchange(2), {}

    def rank_run(rank):
        selection, stand_in = RolloutSelection(config), StandIn(rewards)
        accelerator = ThreadRank(exchange, rank)
        results[rank] = (selection, [step(selection, stand_in, n, accelerator) for n in range(1, steps + 1)])

    threads = [threading.Thread(target=rank_run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results[0], results[1]


def test_every_rank_takes_the_same_decisions_and_trains_on_as_many_groups():
    config = selecting(**{"batch_size": 4, "grpo.generation_batch_size": 2, "grpo.filter_max_rounds": 4,
                          "sampling.skip_predictable": True})
    (first, first_batches), (second, second_batches) = on_two_ranks(config, {p.id: FLAT for p in PROBLEMS[1::3]}, 6)
    assert first.state_dict() == second.state_dict()  # cursor, history and exploration alike
    assert any(batch.selection.prompts_skipped for batch in first_batches)  # the premise: skips were decided
    assert any(batch.selection.generation_rounds > 1 for batch in first_batches)  # and refills
    for a, b in zip(first_batches, second_batches):
        assert outcome(a.selection) == outcome(b.selection)
        assert a.selection.prompts_skipped == b.selection.prompts_skipped
        assert a.rewards.numel() == b.rewards.numel() == a.selection.groups_kept // 2 * G


def test_at_the_limit_every_rank_trains_on_as_many_groups_as_the_rank_with_fewest():
    config = selecting(**{"grpo.generation_batch_size": 2, "grpo.filter_max_rounds": 1})
    walk = order(config, range(2))
    (_, [a]), (_, [b]) = on_two_ranks(config, {walk[0]: VARIED, walk[1]: FLAT}, 1)
    assert a.selection.round_limit_hit and a.selection.groups_kept == b.selection.groups_kept == 0
    assert not a.trains and not b.trains  # rank 0 had one, rank 1 none: no rank steps alone


# --- options ----------------------------------------------------------------------------------------------


def test_options_are_refused_by_name():
    with pytest.raises(ConfigError, match="grpo.generation_batch_size"):
        load_config(None, {"grpo.generation_batch_size": 6})  # without the filter it would not act
    with pytest.raises(ConfigError, match="grpo.filter_metric"):
        load_config(None, {"grpo.filter_metric": "acc"})
    with pytest.raises(ConfigError, match="sampling.skip_floor"):
        load_config(None, {"sampling.skip_floor": 0.0})
    with pytest.raises(ConfigError, match="train_problems"):
        load_config(None, {"train_problems": 0})


def test_train_problems_keeps_the_first_problems_of_the_training_set():
    task = Task("tiny", list(PROBLEMS))
    assert training_set(load_config(None, {"train_problems": 3}), task).problems == PROBLEMS[:3]
    assert training_set(load_config(None, {}), task) is task
    with pytest.raises(DataError, match="train_problems=9"):
        training_set(load_config(None, {"train_problems": 9}), task)


# --- in a run (tiny models) -------------------------------------------------------------------------------


def distinct(completion: str, gold: str) -> float:
    """A reward that differs between any two different completions: every group informative."""
    return sum((index + 1) * ord(ch) for index, ch in enumerate(completion)) % 9973 / 9973


TIMES = ("generation_time_s", "scoring_time_s", "training_time_s", "step_time_s", "gen_tokens_per_s")


def test_a_selecting_run_that_drops_and_skips_nothing_is_the_plain_run_bit_for_bit(tmp_path):
    _, plain = run(tmp_path / "plain", reward=distinct, rft_steps=3)
    _, selecting_rows = run(tmp_path / "selecting", reward=distinct, rft_steps=3,
                            **{"grpo.filter_groups": True, "sampling.skip_predictable": True})
    fields = [name for name in StepMetrics.__dataclass_fields__ if name not in SELECTION_FIELDS]
    for a, b in zip(plain, selecting_rows, strict=True):
        assert list(a) == fields  # a run without selection writes the records it wrote before the options existed
        assert b["groups_kept"] == b["groups_sampled"] == 2 and b["prompts_skipped"] == 0  # the premise
        assert {k: v for k, v in a.items() if k not in TIMES} == {k: b[k] for k in a if k not in TIMES}
    selected = final_weights(tmp_path / "selecting")
    assert all(torch.equal(weight, selected[name]) for name, weight in final_weights(tmp_path / "plain").items())


def test_the_warm_up_reads_the_whole_training_set_and_refts_the_pool(tmp_path, monkeypatch):
    """train_problems bounds ReFT's problems only: the warm-up imitates as many as sft.max_examples allows."""
    warmed, prompted = [], []
    warm_up = trainer.sft_warmup
    monkeypatch.setattr(trainer, "sft_warmup", lambda model, tokenizer, problems, *a: warmed.extend(problems) or
                        warm_up(model, tokenizer, problems, *a))
    selection_batch = trainer.RolloutSelection.batch
    monkeypatch.setattr(trainer.RolloutSelection, "batch", lambda self, problems, *a: prompted.append(problems) or
                        selection_batch(self, problems, *a))
    run(tmp_path / "run", rft_steps=2, train_problems=3, **{"sft.epochs": 1, "sft.max_examples": 8})
    assert warmed == RUN_PROBLEMS and len(prompted) == 2
    assert all(list(problems) == RUN_PROBLEMS[:3] for problems in prompted)


def test_the_metrics_count_what_the_dropped_groups_cost(tmp_path, monkeypatch):
    rows_costed = []
    costed = metrics_module.rollout_flops
    monkeypatch.setattr(metrics_module, "rollout_flops",
                        lambda shapes, skip, prompts, completions, *a: rows_costed.append(len(completions))
                        or costed(shapes, skip, prompts, completions, *a))
    summary, rows = run(tmp_path / "run", reward=lowercase_if_even, rft_steps=3, train_problems=6,
                        **{"grpo.filter_groups": True, "grpo.filter_max_rounds": 3, "nesting.bridge": "linear",
                           "sampling.skip_predictable": True})
    for row, costed_rows in zip(rows, rows_costed, strict=True):
        assert row["tokens_generated"] == row["groups_sampled"] * RUN_G * T  # min = max length: every sampled row
        assert costed_rows == row["groups_sampled"] * RUN_G  # FLOPs of every sampled row, dropped groups' included
        assert row["groups_kept"] <= 2 and row["generation_rounds"] <= 3
    assert any(row["groups_kept"] < row["groups_sampled"] for row in rows)  # the premise: groups were dropped
    assert summary["groups_sampled"] == sum(row["groups_sampled"] for row in rows)
    assert summary["tokens_generated"] == summary["groups_sampled"] * RUN_G * T


def test_a_step_without_an_informative_group_takes_no_gradient_step_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "policy_update", lambda *a, **k: pytest.fail("a step without a group updated"))
    summary, rows = run(tmp_path / "run", reward=lambda completion, gold: 1.0, rft_steps=3,
                        **{"grpo.filter_groups": True, "grpo.filter_max_rounds": 2, "grpo.lr_scheduler": "linear"})
    for row in rows:
        assert row["groups_kept"] == 0 and row["round_limit_hit"] and row["generation_rounds"] == 2
        assert row["loss"] == 0.0 and row["grad_norm"] == 0.0 and not row["update_skipped"]
        assert row["h_mean"] is None and row["reward_mean"] == 1.0  # rewards: of the groups sampled
    assert rows[0]["learning_rate"] > rows[1]["learning_rate"] > rows[2]["learning_rate"]  # the schedule goes on
    assert summary["steps_without_update"] == 3 and summary["steps_at_round_limit"] == 3
    initial = initial_weights()
    assert all(torch.equal(weight, initial[name]) for name, weight in final_weights(tmp_path / "run").items())
