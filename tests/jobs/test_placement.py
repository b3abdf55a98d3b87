"""Where actors go: CPU when the cluster has no GPU, k actors per GPU with num_gpus=1/k and
1/k of the memory fraction each."""

import pytest

from hymba_batch.jobs.driver import _placement, actor_config
from hymba_batch.jobs.spec import parse_spec

BASE = {"model": {"path": "m"}, "input": {"uri": "/in"}, "output": {"uri": "/out"}}


def test_no_gpu_means_cpu_without_being_told() -> None:
    assert _placement(parse_spec(BASE), 0) == ("cpu", 1, 0.0, 1)
    assert _placement(parse_spec(BASE, ["resources.num_actors=3"]), 0) == ("cpu", 3, 0.0, 1)
    cfg = actor_config(parse_spec(BASE, ["resources.cpus_per_actor=2"]), "cpu", 1)
    assert cfg.device == "cpu" and cfg.cpu_threads == 2


def test_fractional_gpus() -> None:
    spec = parse_spec(BASE, ["resources.actors_per_gpu=4", "model.memory_fraction=0.8"])
    assert _placement(spec, 2) == ("cuda", 8, 0.25, 4)
    cfg = actor_config(spec, "cuda", 4)
    assert cfg.memory_fraction == pytest.approx(0.2) and cfg.cpu_threads is None
    assert _placement(parse_spec(BASE, ["resources.num_gpus=1", "resources.actors_per_gpu=2"]), 8) == ("cuda", 2, 0.5, 2)
    assert _placement(parse_spec(BASE, ["model.device=cpu"]), 8)[0] == "cpu"


def test_cuda_demanded_without_gpus_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no GPUs"):
        _placement(parse_spec(BASE, ["model.device=cuda"]), 0)
