"""Distributed semantics: the N-worker update equals the single-process update on the global batch."""

import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed_ebm.algorithms import ALGORITHMS, energy_loss, energy_step, jko_gamma
from distributed_ebm.config import load_config
from distributed_ebm.distributed import all_reduce_gradients
from tests.test_train import CONFIGS

M, N = 6, 5  # chains and data images per worker


def _config(algorithm):
    return load_config(CONFIGS / "digits_wgcn.yaml", {
        "model.algorithm": algorithm, "model.channels": [4, 8], "optim.optimizer": "sgd", "optim.lr": 0.05,
        "model.jko_weight": 0.1, "langevin.langevin_steps": 3, "chains.bank_size": M, "chains.batch_size": M})


def _global_batch():
    gen = torch.Generator().manual_seed(123)
    return torch.rand(2 * M, 1, 8, 8, generator=gen) * 2 - 1, torch.rand(2 * N, 1, 8, 8, generator=gen) * 2 - 1


def _worker(rank, world, init_file, algorithm, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    chains, data = _global_batch()
    state = ALGORITHMS[algorithm].build(_config(algorithm), (1, 8, 8), device=torch.device("cpu"),
                                        generator=torch.Generator(), data_mean=torch.zeros(1, 1, 8, 8), rank=rank)
    state.banks["chains"].states = chains[rank * M : (rank + 1) * M].clone()
    state.sync_gradients = all_reduce_gradients
    ALGORITHMS[algorithm].train_step(state, data[rank * N : (rank + 1) * N], None,
                                     generator=torch.Generator().manual_seed(100 + rank), iteration=7)
    if rank == 0:
        torch.save({k: v.detach() for k, v in state.energy.state_dict().items()}, out_file)
    dist.destroy_process_group()


def _single_process_update(algorithm):
    """1 worker × 2M chains on the same data, chains and noise (each half's Langevin noise comes
    from the generator that worker used)."""
    chains, data = _global_batch()
    config = _config(algorithm).replace({"chains.bank_size": 2 * M, "chains.batch_size": 2 * M})
    state = ALGORITHMS[algorithm].build(config, (1, 8, 8), device=torch.device("cpu"), generator=torch.Generator(),
                                        data_mean=torch.zeros(1, 1, 8, 8))
    x_syn = torch.cat([state.sampler(state.energy, chains[r * M : (r + 1) * M],
                                     generator=torch.Generator().manual_seed(100 + r)) for r in range(2)])
    gamma = jko_gamma(config.train.seed, 7, x_syn.device) if ALGORITHMS[algorithm].jko else None
    loss = energy_loss(state.energy, data, None, chains, x_syn, None, gamma=gamma,
                       jko_weight=config.model.jko_weight, penalty_params=config.model.penalty_params).loss
    energy_step(state, state.energy, loss)
    return state.energy.state_dict()


def _check(tmp_path, algorithm):
    out_file = tmp_path / "rank0.pt"
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), algorithm, str(out_file)), nprocs=2,
                       start_method="fork" if os.name == "posix" else "spawn")
    two_workers = torch.load(out_file)
    one_worker = _single_process_update(algorithm)
    initial = ALGORITHMS[algorithm].build(_config(algorithm), (1, 8, 8), device=torch.device("cpu"),
                                          generator=torch.Generator(), data_mean=torch.zeros(1, 1, 8, 8)).energy
    moved = 0
    for name, value in one_worker.items():
        assert torch.allclose(two_workers[name], value, atol=1e-6, rtol=1e-5), name
        moved += int(not torch.equal(value, initial.state_dict()[name]))
    assert moved >= 2  # the update did something


def test_two_workers_equal_one_worker_on_the_global_batch_wgcn(tmp_path):
    _check(tmp_path, "wgcn")


def test_two_workers_equal_one_worker_on_the_global_batch_gcn(tmp_path):
    _check(tmp_path, "gcn")


def _loop_worker(rank, world, init_file, run_dir, iterations, resume, preset):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from distributed_ebm.train_loop import train

    config = load_config(CONFIGS / preset, {
        "train.iterations": iterations, "train.checkpoint_every": 2, "train.data_batch_size": 8,
        "chains.bank_size": 6, "chains.batch_size": 6, "langevin.langevin_steps": 2, "model.channels": [4, 8],
        "generator.base_width": 2, "generator.latent_bank_size": 6, "tracking.enabled": False})
    train(config, run_dir, progress=False, resume=resume)
    dist.destroy_process_group()


def _run_group(world, tmp_path, tag, iterations, resume, preset):
    mp.start_processes(_loop_worker, args=(world, str(tmp_path / f"init-{tag}"), str(tmp_path / "run"), iterations,
                                           resume, preset), nprocs=world, start_method="fork")


@pytest.mark.parametrize("preset,bank", [("digits_wgcn.yaml", "chains"), ("digits_ggcn.yaml", "latents")])
def test_resume_on_more_workers_resplits_every_chain(tmp_path, preset, bank):
    from distributed_ebm.checkpoint import read_checkpoint

    _run_group(2, tmp_path, "a", 4, False, preset)
    _, before = read_checkpoint(tmp_path / "run" / "checkpoints" / "iter-00000004")
    states = {int(i): s for r in before for i, s in zip(r["banks"][bank]["ids"], r["banks"][bank]["states"])}
    _run_group(3, tmp_path, "b", 4, True, preset)  # nothing to do: same checkpoint, re-split on load
    _run_group(3, tmp_path, "c", 6, True, preset)
    shared, after = read_checkpoint(tmp_path / "run" / "checkpoints" / "iter-00000006")
    assert shared["world_size"] == 3 and len(after) == 3
    ids = sorted(int(i) for r in after for i in r["banks"][bank]["ids"])
    assert ids == sorted(states) == list(range(12))
    assert [len(r["banks"][bank]["ids"]) for r in after] == [4, 4, 4]


@pytest.mark.parametrize("device,workers,gpus,cluster,expected", [
    ("auto", 2, 0, None, "cpu"),  # no GPU asked: CPU workers, not all on GPU 0
    ("auto", 2, 1, 4, "cuda"),
    ("cuda", 1, 1, None, "cuda"),
    ("auto", 2, 0.5, None, "whole GPUs"),
    ("cpu", 2, 1, None, "train.device is 'cpu'"),
    ("cuda", 2, 0, None, "--gpus-per-worker 1"),
    ("auto", 4, 1, 2, "need 4 GPUs; this Ray cluster has 2"),
])
def test_gpu_requests_are_pinned_or_refused_before_any_worker(device, workers, gpus, cluster, expected):
    from distributed_ebm.config import ConfigError
    from distributed_ebm.trainer import check_gpu_request

    if expected in ("cpu", "cuda"):
        assert check_gpu_request(device, workers, gpus, cluster) == expected
    else:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            check_gpu_request(device, workers, gpus, cluster)
