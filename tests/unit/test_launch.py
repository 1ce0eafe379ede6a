"""The launcher's decisions (finetune_trainer/launch.py) and the resume rule across world sizes
(distributed.resume_problem): pure functions; the real launcher runs in
tests/integration/test_data_parallel.py."""

from __future__ import annotations

import pytest
from finetune_trainer import launch
from finetune_trainer.distributed import World, resume_problem
from finetune_trainer.errors import EXIT_CONFIG_ERROR, EXIT_INTERRUPTED, ConfigError


def test_no_env_trains_in_this_process() -> None:
    assert launch.plan("cuda", 8, {}) is None
    assert launch.plan("cpu", 0, {}) is None


def test_env_asks_for_ranks_and_one_rank_still_goes_through_torchrun() -> None:
    assert launch.plan("cuda", 8, {"FINETUNE_NPROC_PER_NODE": "4"}) == launch.Plan(4)
    assert launch.plan("cuda", 1, {"FINETUNE_NPROC_PER_NODE": "1"}) == launch.Plan(1)
    assert launch.plan("cpu", 0, {"FINETUNE_NPROC_PER_NODE": "2"}) == launch.Plan(2)  # gloo


def test_more_ranks_than_visible_gpus_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as e:
        launch.plan("cuda", 2, {"FINETUNE_NPROC_PER_NODE": "4"})
    assert e.value.field == "spec.resources.gpus" and "sees 2 GPU(s)" in e.value.message


@pytest.mark.parametrize("raw", ["0", "-1", "two"])
def test_bad_process_count_names_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError) as e:
        launch.plan("cpu", 0, {"FINETUNE_NPROC_PER_NODE": raw})
    assert e.value.field == "FINETUNE_NPROC_PER_NODE"


@pytest.mark.parametrize(
    ("codes", "reason", "expected"),
    [
        ({}, None, 0),
        ({0: EXIT_INTERRUPTED, 1: EXIT_INTERRUPTED}, None, EXIT_INTERRUPTED),
        ({1: EXIT_INTERRUPTED}, None, EXIT_INTERRUPTED),
        ({0: EXIT_CONFIG_ERROR, 1: EXIT_CONFIG_ERROR}, None, EXIT_CONFIG_ERROR),
        ({0: 1, 1: EXIT_CONFIG_ERROR}, None, EXIT_CONFIG_ERROR),
        ({0: 1, 1: -9}, None, 1),  # rank 1 killed -9: the attempt failed, the Job retries
        ({0: EXIT_INTERRUPTED, 1: -9}, None, 1),  # not every rank checkpointed
        (None, "interrupted", EXIT_INTERRUPTED),  # the launcher was SIGTERMed: rank 0's summary says
        (None, "error", 1),
        (None, None, 1),
    ],
)
def test_exit_code_is_what_one_process_would_exit_with(
    codes: dict[int, int] | None, reason: str | None, expected: int
) -> None:
    assert launch.exit_code(codes, reason) == expected


def test_failure_message_names_the_rank_and_the_signal() -> None:
    assert launch.failure_message({0: 1, 1: -9}).startswith("rank 1 was killed by SIGKILL")
    assert launch.failure_message({0: 1, 2: 3}).startswith("rank 2 exited with 3")
    assert launch.failure_message({0: EXIT_INTERRUPTED, 1: EXIT_INTERRUPTED}) is None


def test_resume_on_the_same_world_size_is_fine_another_is_refused() -> None:
    assert resume_problem(2, 2, 10) is None
    problem = resume_problem(2, 4, 10)
    assert problem is not None
    assert "step 10 was trained on 2 rank(s)" in problem and "spec.resources.gpus back to 2" in problem


def test_world_from_torchrun_env() -> None:
    world = World.from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    assert (world.rank, world.local_rank, world.size, world.node_rank, world.is_main) == (3, 1, 4, 1, False)
    assert World.from_env({}) == World()
