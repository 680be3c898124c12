"""Distributed semantics: the N-worker update equals the single-process update on the global batch."""

import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed_ebm.algorithms import ALGORITHMS, energy_loss, energy_step, jko_gamma
from distributed_ebm.config import load_config
from distributed_ebm.distributed import all_reduce_gradients, all_reduce_mean
from distributed_ebm.metrics import ResponseDistance
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
    gamma = jko_gamma(config.train.seed, 7) if ALGORITHMS[algorithm].jko else None
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


# --- N workers' step is the global batch's: GGCN's generator batch norm, unequal shards, metrics ---


def _step_config(algorithm, chains, arch="v0"):
    """A tiny config whose bank holds `chains` chains (or latents), all of them updated per step."""
    if not algorithm.startswith("ggcn"):
        return _config(algorithm).replace({"chains.bank_size": chains, "chains.batch_size": chains})
    return load_config(CONFIGS / "digits_ggcn.yaml", {
        "model.algorithm": algorithm, "model.channels": [4, 8], "optim.optimizer": "sgd", "optim.lr": 0.05,
        "model.jko_weight": 0.1, "langevin.langevin_steps": 3, "generator.latent_dim": 8,
        "generator.base_width": 2, "generator.generator_every": 1, "generator.latent_lr": 0.5,
        "generator.latent_bank_size": chains, "chains.batch_size": chains, "generator.arch": arch})


def _bank_name(algorithm):
    return "latents" if algorithm.startswith("ggcn") else "chains"


def _step_inputs(algorithm, chains, images):
    """The global bank (chains in [-1, 1], or latents ζ ~ N(0, I)) and data batch."""
    gen = torch.Generator().manual_seed(321)
    if algorithm.startswith("ggcn"):
        bank = torch.randn(chains, 8, generator=gen)
    else:
        bank = torch.rand(chains, 1, 8, 8, generator=gen) * 2 - 1
    return bank, torch.rand(images, 1, 8, 8, generator=gen) * 2 - 1


def _one_step(algorithm, bank_states, data, sizes, ranks, *, arch="v0", sum_over_group=None):
    """One train_step on `bank_states` and `data`; the Langevin noise of the `sizes[i]` chains of
    worker `ranks[i]` comes from that worker's generator, so one process reproduces the group's step."""
    state = ALGORITHMS[algorithm].build(_step_config(algorithm, len(bank_states), arch), (1, 8, 8),
                                        device=torch.device("cpu"), generator=torch.Generator(),
                                        data_mean=torch.zeros(1, 1, 8, 8), rank=ranks[0])
    with torch.no_grad():  # away from the zero scores of a fresh energy, so that every metric has a value
        gen = torch.Generator().manual_seed(5)
        for param in state.energy.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
    bank = state.banks[_bank_name(algorithm)]
    bank.states = bank_states.clone()
    sampler = state.sampler

    def per_worker_noise(score_fn, x, *, generator):
        return torch.cat([sampler(score_fn, part, generator=torch.Generator().manual_seed(100 + r))
                          for r, part in zip(ranks, torch.split(x, list(sizes)))])

    state.sampler = per_worker_noise
    if sum_over_group is not None:
        state.sync_gradients = all_reduce_gradients
    out = ALGORITHMS[algorithm].train_step(state, data, None, generator=torch.Generator(), iteration=7)
    r = ResponseDistance((1, 8, 8))(out.samples, data, sum_over_group=sum_over_group)
    return {
        "models": {k: {n: v.detach().clone() for n, v in m.state_dict().items()} for k, m in state.models.items()},
        "grads": {f"{k}.{n}": p.grad.clone() for k, m in state.models.items() for n, p in m.named_parameters()
                  if p.grad is not None},
        "step": bank.states - bank_states,  # the chains' (or ζ's) change
        "metrics": {**out.metrics, "response_distance": float(r)},
    }


def _step_worker(rank, world, init_file, algorithm, chains, images, arch, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from distributed_ebm.distributed import all_reduce_sum

    bank, data = _step_inputs(algorithm, sum(chains), sum(images))
    first_chain, first_image = sum(chains[:rank]), sum(images[:rank])
    result = _one_step(algorithm, bank[first_chain : first_chain + chains[rank]],
                       data[first_image : first_image + images[rank]], (chains[rank],), (rank,), arch=arch,
                       sum_over_group=all_reduce_sum)
    result["metrics"] = all_reduce_mean(result["metrics"], torch.device("cpu"))  # as the training loop logs them
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _group_and_single_step(tmp_path, algorithm, chains, images, arch="v0"):
    """(each worker's result, the one-process result on the concatenated bank and data)."""
    mp.start_processes(_step_worker, args=(len(chains), str(tmp_path / "init"), algorithm, chains, images, arch,
                                           str(tmp_path)), nprocs=len(chains), start_method="fork")
    workers = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(chains))]
    bank, data = _step_inputs(algorithm, sum(chains), sum(images))
    single = _one_step(algorithm, bank, data, chains, tuple(range(len(chains))), arch=arch)
    single["metrics"] = all_reduce_mean(single["metrics"], torch.device("cpu"))  # one process: the values as floats
    return workers, single


def _relative_gap(a, b):
    return float((a - b).norm() / b.norm())


def _assert_same_update(workers, single):
    """The energy's weights (SGD), the generator's running statistics and ξ's gradients (Adam's
    first step, about lr·sign(gradient), would blow up rounding noise where a gradient is 0, such
    as a convolution's bias before a batch norm), and the chains' (or ζ's) steps."""
    for worker in workers:
        for key, state in single["models"].items():
            for name, value in state.items():
                if key == "energy" or name.split(".")[-1] in ("running_mean", "running_var", "num_batches_tracked"):
                    assert torch.allclose(worker["models"][key][name].float(), value.float(), atol=1e-6, rtol=1e-5), \
                        f"{key}.{name}"
    xi = [name for name in single["grads"] if name.startswith("generator.")]
    if xi:
        scale = max(float(single["grads"][name].abs().max()) for name in xi)
        for name in xi:
            assert torch.allclose(workers[0]["grads"][name], single["grads"][name], rtol=1e-4, atol=1e-6 * scale), name
        assert _relative_gap(torch.cat([workers[0]["grads"][n].flatten() for n in xi]),
                             torch.cat([single["grads"][n].flatten() for n in xi])) < 1e-5
    assert _relative_gap(torch.cat([w["step"] for w in workers]), single["step"]) < 1e-5


@pytest.mark.parametrize("algorithm,arch", [("ggcn", "v0"), ("ggcn", "resnet"), ("ggcn_ams", "v0")])
def test_two_workers_equal_one_worker_on_the_global_batch_ggcn(tmp_path, algorithm, arch):
    """GGCN: the generator's batch norm normalises with the global batch's statistics (and
    updates its running statistics with them), so ξ's gradients, ζ's steps and the energy's
    update equal the one-process ones on the global batch (with each worker's own statistics,
    ξ's gradients were 40–50 % apart)."""
    workers, single = _group_and_single_step(tmp_path, algorithm, (M, M), (N, N), arch)
    _assert_same_update(workers, single)
    generator = single["models"]["generator"]
    assert all(not torch.equal(generator[k], torch.ones_like(generator[k])) for k in generator if "running_var" in k)
    assert single["grads"]["generator.net.0.weight" if arch == "v0" else "generator.project.weight"].abs().sum() > 0
    assert single["step"].abs().sum() > 0  # ζ moved


@pytest.mark.parametrize("algorithm", ["wgcn", "ggcn"])
def test_uneven_shards_equal_one_worker_on_the_global_batch(tmp_path, algorithm):
    """After a re-split that leaves 3 and 1 chains (and, here, 7 and 3 data images) on two
    workers, each worker's batch means are weighted by its share of the global batch."""
    workers, single = _group_and_single_step(tmp_path, algorithm, (3, 1), (7, 3))
    _assert_same_update(workers, single)


@pytest.mark.parametrize("algorithm", ["wgcn", "ggcn"])
def test_logged_metrics_are_the_global_batch_values(tmp_path, algorithm):
    """R, the energy gap and the means the loop logs equal the one-process values on the
    concatenated batch (not means of per-worker values), also for uneven shards."""
    workers, single = _group_and_single_step(tmp_path, algorithm, (3, 1), (7, 3))
    keys = ["response_distance", "energy_gap_z", "phi_data", "phi_chains", "energy_data", "energy_chains",
            "loss", "loss_mle", "penalty_syn", "chain_saturation", "data_saturation"]
    for key in keys + (["langevin_shift", "loss_generator"] if algorithm == "ggcn" else []):
        assert workers[0]["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-5, abs=1e-6), key
    assert single["metrics"]["energy_gap_z"] > 0 and single["metrics"]["response_distance"] > 0


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
