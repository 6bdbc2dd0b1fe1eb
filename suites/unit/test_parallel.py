"""harness.parallel and ``run --num-processes``: the pieces that do not need several processes."""

from __future__ import annotations

import pytest
import torch

from harness.cli import build_parser, launch_argv
from harness.errors import HarnessError
from harness.parallel import SINGLE, Parallel, launched_world_size


class Fake(Parallel):
    """A process ``rank`` of ``world``, for the arithmetic that does not communicate."""

    def __init__(self, rank: int, world: int):
        super().__init__()
        self._rank, self._world = rank, world

    @property
    def world_size(self):
        return self._world

    @property
    def rank(self):
        return self._rank


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [8, 10, 32])
def test_shards_cover_the_batch_once_in_order(world, n):
    rows = [i for r in range(world) for i in Fake(r, world).shard(n)]
    assert rows == list(range(n))
    sizes = [len(Fake(r, world).shard(n)) for r in range(world)]
    assert max(sizes) - min(sizes) <= 1


def test_a_batch_the_processes_cannot_share_is_refused_naming_the_field():
    Fake(0, 2).check_divides(8, "ppo.batch_size")
    with pytest.raises(HarnessError) as e:
        Fake(0, 3).check_divides(8, "ppo.mini_batch_size")
    assert e.value.field == "ppo.mini_batch_size" and "3" in str(e.value)


def test_one_process_is_the_identity():
    t = torch.arange(4.0)
    assert SINGLE.gather(t) is t and SINGLE.sum(t) is t
    assert SINGLE.gather_object([1, 2]) == [1, 2]
    assert SINGLE.any(True) and not SINGLE.any(False)
    assert SINGLE.is_main and SINGLE.world_size == 1 and list(SINGLE.shard(3)) == [0, 1, 2]
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    SINGLE.sum_gradients([p])
    assert p.grad.tolist() == [3.0, 3.0]


def test_without_a_launcher_there_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_world_size() == 1
    assert Parallel.from_environment("cpu").accelerator is None


def test_num_processes_becomes_accelerate_launch_arguments():
    argv = ["run", "--preset", "tiny", "--num-processes", "2", "ppo.steps=2", "--output", "out"]
    assert build_parser().parse_args(argv).num_processes == 2
    got = launch_argv(argv, 2, 29555)
    assert got[got.index("--num_processes") + 1] == "2"
    assert got[got.index("--main_process_port") + 1] == "29555"
    tail = got[got.index("-m"):]
    assert tail == ["-m", "harness.cli", "run", "--preset", "tiny", "ppo.steps=2", "--output", "out"]
    assert "--num-processes" not in " ".join(launch_argv(["run", "--num-processes=4"], 4, 1))


def test_num_processes_below_one_is_refused():
    from harness.cli import main

    assert main(["run", "--preset", "tiny", "--num-processes", "0"]) == 2


def test_other_commands_refuse_a_multi_process_launcher(monkeypatch, capsys):
    from harness.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["presets"]) == 2
    assert "only run is data-parallel" in capsys.readouterr().err
