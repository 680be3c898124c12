"""Self-conditioning (model.clusters): k-means clusters of the images stand in for labels."""

import numpy as np
import pytest
import torch

from distributed_ebm.cli import main
from distributed_ebm.clusters import ClusteredData, Clusters
from distributed_ebm.config import ConfigError, load_config
from distributed_ebm.data import ImageData, training_data
from distributed_ebm.inference import load_run
from distributed_ebm.train_loop import train
from tests.test_train import CONFIGS


def _blobs(sizes=(500, 300, 200), dim=16, seed=0):
    """Three well-separated blobs of unequal sizes, shuffled; returns images and true blob ids."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(3, dim) * 4
    x = torch.cat([centres[k] + 0.3 * torch.randn(n, dim, generator=g) for k, n in enumerate(sizes)])
    y = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    order = torch.randperm(len(x), generator=g)
    return x[order].view(-1, 1, 4, 4), y[order]


def _relabel(found: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """The found cluster ids mapped to the true blob they hold most of."""
    mapping = {int(k): int(torch.mode(true[found == k]).values) for k in found.unique()}
    return torch.tensor([mapping[int(k)] for k in found])


def test_kmeans_recovers_unequal_blobs_with_their_shares():
    x, y = _blobs()
    clusters = Clusters.fit(x, 3, seed=0)
    found = clusters.assign(x)
    assert torch.equal(_relabel(found, y), y)  # every image in its blob's cluster
    assert sorted(clusters.shares.tolist()) == pytest.approx([0.2, 0.3, 0.5])
    again = Clusters.fit(x, 3, seed=0)  # deterministic: every rank finds the same clusters
    assert torch.equal(again.centroids, clusters.centroids)


def test_a_large_set_is_fitted_on_a_seeded_subset():
    x, y = _blobs()
    clusters = Clusters.fit(x, 3, seed=0, max_images=400)
    assert torch.equal(_relabel(clusters.assign(x), y), y)  # the subset still finds the blobs
    subset = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:400]
    expected = torch.bincount(y[subset], minlength=3).double() / 400  # the shares are the subset's
    assert sorted(clusters.shares.tolist()) == pytest.approx(sorted(expected.tolist()))
    assert sorted(clusters.shares.tolist()) != pytest.approx([0.2, 0.3, 0.5])  # not the whole set's
    again = Clusters.fit(x, 3, seed=0, max_images=400)  # the same subset on every rank
    assert torch.equal(again.centroids, clusters.centroids)


def test_a_cap_on_pixel_values_draws_the_same_subset_as_the_cap_on_images():
    x, _ = _blobs()  # 16 values per image
    by_values = Clusters.fit(x, 3, seed=0, max_values=16 * 400 + 15)
    by_images = Clusters.fit(x, 3, seed=0, max_images=400)
    assert torch.equal(by_values.centroids, by_images.centroids)
    assert torch.equal(by_values.shares, by_images.shares)
    assert not torch.equal(by_values.shares, Clusters.fit(x, 3, seed=0).shares)  # the cap did bite


def test_chunked_distances_equal_the_whole_computation_bit_for_bit():
    from distributed_ebm.clusters import CHUNK, _squared_distance

    x = torch.randn(2 * CHUNK + 123, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    point = x[7]
    assert torch.equal(_squared_distance(x, point), ((x - point) ** 2).sum(1))


def test_assign_with_a_hole_uses_only_the_observed_pixels():
    clusters = Clusters(torch.tensor([[1.0, 1.0, -1.0, -1.0], [-1.0, -1.0, 1.0, 1.0]]), torch.tensor([0.5, 0.5]))
    # the first half says cluster 0; the second half (missing) looks like cluster 1 and outweighs it
    image = torch.tensor([[0.9, 0.9, 3.0, 3.0]]).view(1, 1, 2, 2)
    assert clusters.assign(image).item() == 1
    observed = torch.tensor([[1.0, 1.0, 0.0, 0.0]]).view(1, 1, 2, 2)
    assert clusters.assign(image, observed=observed).item() == 0


@pytest.mark.parametrize("num", [7, 64, 1000])
def test_draw_is_stratified_by_the_shares(num):
    clusters = Clusters(torch.zeros(3, 4), torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    counts = torch.bincount(clusters.draw(num), minlength=3).double() / num
    # the golden-ratio sequence: every prefix within ~2/num of the shares (i.i.d. draws: ±1/√num)
    assert (counts - clusters.shares).abs().max() <= 2.5 / num + 1e-9, counts
    # any run of ids (a chain bank shard of another rank) is stratified too
    shard = torch.bincount(clusters.label_ids(torch.arange(5000, 5000 + num)), minlength=3).double() / num
    assert (shard - clusters.shares).abs().max() <= 2.5 / num + 1e-9, shard


def test_fit_refuses_too_few_images_and_one_cluster():
    with pytest.raises(ConfigError, match="at least 5 images"):
        Clusters.fit(torch.randn(3, 1, 2, 2), 5)
    with pytest.raises(ConfigError, match="fewer than 3 distinct images"):
        Clusters.fit(torch.zeros(10, 1, 2, 2), 3)
    for bad, match in (({"model.clusters": 1}, "at least 2"),
                       ({"model.clusters": 3, "model.conditional": True}, "model.conditional=false")):
        with pytest.raises(ConfigError, match=match):
            load_config(CONFIGS / "digits_ggcn.yaml", bad)


def test_batches_carry_clusters_not_the_sources_labels():
    x, y = _blobs()
    data = ClusteredData(ImageData(x, (y + 1) % 3, "blobs", 3), Clusters.fit(x, 3))
    images, labels = data.batch(64, torch.Generator().manual_seed(0))
    assert torch.equal(labels, data.clusters.assign(images))
    assert data.num_classes == 3 and data.sample_shape == (1, 4, 4)  # the rest is the wrapped data's


def test_every_rank_fits_the_same_clusters_on_the_whole_data_set(tiny_overrides):
    config = load_config(CONFIGS / "digits_ggcn.yaml", {**tiny_overrides, "model.clusters": 4})
    shards = [training_data(config, rank, 2, torch.device("cpu"))[0] for rank in range(2)]
    assert torch.equal(shards[0].clusters.centroids, shards[1].clusters.centroids)
    assert len(shards[0].data) + len(shards[1].data) == 1797  # each rank keeps its own share


def test_self_conditioned_ggcn_trains_samples_inpaints_and_resumes_without_labels(tmp_path, tiny_overrides,
                                                                                   monkeypatch):
    overrides = {**tiny_overrides, "model.clusters": 4, "data.labels": False, "generator.latent_bank_size": 64,
                 "generator.latent_dim": 8, "generator.base_width": 8, "chains.batch_size": 16}
    config = load_config(CONFIGS / "digits_ggcn.yaml", overrides)
    summary = train(config, tmp_path / "run", progress=False)
    assert summary["status"] == "completed"
    model = load_run(tmp_path / "run")
    clusters = model.clusters
    assert clusters is not None and len(clusters) == 4 and model.num_classes == 0  # no class to ask for
    _assert_holds_shares(model.state.banks["latents"].labels, clusters)  # the chains carry clusters
    with pytest.raises(ConfigError, match="not class-conditional"):
        model.sample(2, label=1)

    seen = _spy_sample_labels(model, monkeypatch)
    images = model.sample(40, batch_size=16)
    assert images.shape == (40, 1, 8, 8) and torch.isfinite(images).all()
    assert torch.equal(torch.cat(seen), clusters.draw(40))  # p(x) = Σ_k π_k p(x | k)
    seen.clear()
    for seed in range(12):
        model.sample(1, seed=seed)
    monkeypatch.undo()
    singles = {int(labels[0]) for labels in seen}
    assert len(singles) >= 3, singles  # one image per seed still visits the clusters, not one mode

    out = tmp_path / "samples.npz"  # `debm sample` writes the cluster each sample was drawn from
    assert main(["sample", "--run-dir", str(tmp_path / "run"), "--num", "5", "--seed", "3", "--out", str(out)]) == 0
    with np.load(out) as saved:
        assert saved["x"].shape == (5, 1, 8, 8) and "y" not in saved
        assert np.array_equal(saved["clusters"], clusters.draw(5, offset=15).numpy())

    missing = torch.zeros(3, 1, 8, 8)
    missing[..., 4:] = 1
    restored = model.inpaint(images[:3], missing, method="generator", steps=2)
    assert torch.equal(restored[..., :4], images[:3, ..., :4]) and torch.isfinite(restored).all()

    # resume: the same clusters label the batches, so the run continues bit for bit
    from tests.test_train import _metrics, _sets

    base = ["train", "--config", str(CONFIGS / "digits_ggcn.yaml"), *_sets(overrides)]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main([*base, "--run-dir", str(full)]) == 0
    assert main([*base, "--run-dir", str(part), "--set", "train.iterations=3"]) == 0
    assert main([*base, "--run-dir", str(part), "--resume"]) == 0
    drop = {"seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in _metrics(full)] == [
        {k: v for k, v in r.items() if k not in drop} for r in _metrics(part)]


def test_evaluate_reports_self_conditioned_sampling(tmp_path, tiny_overrides):
    from distributed_ebm.evaluation import EvalSettings, evaluate_generation

    config = load_config(CONFIGS / "digits_ggcn.yaml", {**tiny_overrides, "model.clusters": 3,
                                                        "generator.latent_bank_size": 64})
    train(config, tmp_path / "run", progress=False)
    model = load_run(tmp_path / "run")
    report = evaluate_generation(model, model.config.data, EvalSettings(
        num_samples=60, classifier_epochs=1, kid_subsets=2, cache_dir=str(tmp_path / "cache")))
    assert report["samples"]["labels"].startswith("self-conditioned: 3 k-means clusters")
    assert "label_agreement" not in report  # clusters are not the classifier's classes
    assert np.isfinite(report["scores"]["fid"])


@pytest.mark.parametrize("preset", ["digits_wgcn.yaml", "digits_mgcn.yaml"])
def test_self_conditioned_wgcn_and_mgcn_train_on_clusters(tmp_path, tiny_overrides, monkeypatch, preset):
    """The descriptive families take the same path: batches carry clusters, the wGCN bank holds
    them by their shares, fresh samples draw them by their shares."""
    config = load_config(CONFIGS / preset, {**tiny_overrides, "model.clusters": 3, "data.labels": False,
                                            "chains.bank_size": 64})
    summary = train(config, tmp_path / "run", progress=False)
    assert summary["status"] == "completed"
    model = load_run(tmp_path / "run")
    clusters = model.clusters
    assert clusters is not None and len(clusters) == 3 and model.num_classes == 0
    bank = model.state.banks.get("chains")
    if bank is not None:  # wGCN's persistent chains
        _assert_holds_shares(bank.labels, clusters)
    seen = _spy_sample_labels(model, monkeypatch)
    images = model.sample(6, steps=2)
    assert images.shape == (6, 1, 8, 8) and torch.isfinite(images).all()
    assert torch.equal(torch.cat(seen), clusters.draw(6))


def _assert_holds_shares(labels, clusters):
    share = torch.bincount(labels, minlength=len(clusters)).double() / len(labels)
    assert (share - clusters.shares).abs().max() < 0.05, (share, clusters.shares)


def _spy_sample_labels(model, monkeypatch):
    """The labels each call of the algorithm's sampler receives, in call order."""
    seen = []
    sample = type(model.algorithm).sample

    def spy(self, state, num, **kwargs):
        seen.append(kwargs["labels"].cpu())
        return sample(self, state, num, **kwargs)

    monkeypatch.setattr(type(model.algorithm), "sample", spy)
    return seen


def test_resume_on_other_images_keeps_the_checkpoints_clusters(tmp_path, tiny_overrides, caplog):
    """Resumed on other images, the refit finds other clusters: the batches are labelled with the
    checkpoint's, as the model was trained, and the run says so."""
    overrides = {**tiny_overrides, "model.clusters": 3, "generator.latent_bank_size": 64, "data.num_images": 300}
    first = load_config(CONFIGS / "digits_ggcn.yaml", {**overrides, "train.iterations": 3})
    train(first, tmp_path / "run", progress=False)
    trained = load_run(tmp_path / "run").clusters
    other = load_config(CONFIGS / "digits_ggcn.yaml", {**overrides, "data.num_images": 900})
    refit = training_data(other, 0, 1, torch.device("cpu"))[0].clusters
    assert not torch.allclose(refit.centroids, trained.centroids, atol=1e-5)  # other images, other clusters
    with caplog.at_level("WARNING"):
        summary = train(other, tmp_path / "run", resume=True, progress=False)
    assert summary["status"] == "completed"
    assert "differ from the checkpoint's" in caplog.text
    resumed = load_run(tmp_path / "run")
    assert resumed.iteration == 6 and torch.equal(resumed.clusters.centroids, trained.centroids)
    assert torch.equal(resumed.clusters.shares, trained.shares)


def test_a_stream_fits_its_clusters_on_images_spread_over_every_shard(tmp_path):
    """Shards written in class order (one class per shard) still give every class to the fit."""
    from distributed_ebm.data.preflight import inspect_shards
    from tests.test_shards import decode_index, write_coded_shards

    write_coded_shards(tmp_path / "shards", [40] * 6)  # 240 images; more than the 4 shards a preflight reads
    overrides = {"data.source": "webdataset", "data.urls": f"{tmp_path}/shards/shard-{{000000..000005}}.tar",
                 "data.loader_workers": 1, "data.mean_samples": 16, "data.cluster_samples": 60,
                 "model.clusters": 3}
    config = load_config(CONFIGS / "digits_ggcn.yaml", overrides)
    info = inspect_shards(config.data, 1, samples=60)
    assert decode_index(((info.fit + 1) * 127.5).round()) == [40 * s + i for s in range(6) for i in range(10)]
    assert decode_index(((info.first + 1) * 127.5).round()) == list(range(16))  # the mean: the first images
    data, mean, fit_images = training_data(config, 0, 1, torch.device("cpu"))
    assert torch.equal(data.clusters.centroids, Clusters.fit(info.fit, 3, seed=config.model.seed).centroids)
    # the mean and the reference stay the first mean_samples images; the fit images are not kept
    assert torch.equal(mean, info.first[:16].mean(0, keepdim=True)) and torch.equal(data.data.reference, info.first[:16])
    assert data.data.info.fit is None
    off = load_config(CONFIGS / "digits_ggcn.yaml", {**overrides, "model.clusters": 0})
    plain, plain_mean, plain_fit = training_data(off, 0, 1, torch.device("cpu"))
    assert torch.equal(plain_mean, mean)  # clusters on or off: the chains start from the same mean
    # statistics beyond the mean (MGCN's model.first_grid) are fitted on the images spread over the
    # shards when the clusters read them, else on the first mean_samples
    assert torch.equal(fit_images, info.fit) and torch.equal(plain_fit, info.first[:16])


def test_a_short_shard_passes_its_shortfall_on_and_a_corrupt_sample_is_skipped(tmp_path, caplog):
    from distributed_ebm.data.preflight import inspect_shards
    from tests.test_shards import decode_index, write_coded_shards

    write_coded_shards(tmp_path / "shards", [40, 10, 40, 40], corrupt={52})
    config = load_config(CONFIGS / "digits_ggcn.yaml", {
        "data.source": "webdataset", "data.urls": f"{tmp_path}/shards/shard-{{000000..000003}}.tar",
        "data.loader_workers": 1, "data.mean_samples": 16})
    fit = inspect_shards(config.data, 1, samples=90).fit
    # shares ⌈90/4⌉ = 23, ⌈67/3⌉ = 23 (only 10 there), ⌈57/2⌉ = 29 (52 is corrupt: the shard gives 80), ⌈28/1⌉ = 28
    expected = [*range(23), *range(40, 50), *range(50, 52), *range(53, 80), *range(90, 118)]
    assert decode_index(((fit + 1) * 127.5).round()) == expected and len(fit) == 90
    with caplog.at_level("WARNING"):
        few = inspect_shards(config.data, 1, samples=200).fit  # 130 samples, 129 readable
    assert len(few) == 129 and "fitted on 129 images" in caplog.text


def test_fewer_cluster_samples_than_shards_take_evenly_spaced_shards_and_the_value_cap_holds(tmp_path, monkeypatch):
    from distributed_ebm.data import preflight
    from tests.test_shards import decode_index, write_coded_shards

    write_coded_shards(tmp_path / "shards", [40] * 6)
    config = load_config(CONFIGS / "digits_ggcn.yaml", {
        "data.source": "webdataset", "data.urls": f"{tmp_path}/shards/shard-{{000000..000005}}.tar",
        "data.loader_workers": 1, "data.mean_samples": 16})
    fit = preflight.inspect_shards(config.data, 1, samples=3).fit
    assert decode_index(((fit + 1) * 127.5).round()) == [0, 80, 160]  # shards 0, 2, 4: not the first three
    values = fit[0].numel()
    monkeypatch.setattr(preflight, "FIT_MAX_VALUES", 12 * values + values // 2)  # room for 12 images
    capped = preflight.inspect_shards(config.data, 1, samples=100).fit
    assert decode_index(((capped + 1) * 127.5).round()) == [40 * s + i for s in range(6) for i in range(2)]


def test_clusters_on_an_energy_without_labels_fail_before_the_data_are_read(tmp_path, tiny_overrides):
    config = load_config(CONFIGS / "digits_ggcn.yaml", {
        **tiny_overrides, "model.clusters": 3, "model.energy": "mlp",
        "data.source": "npz", "data.path": str(tmp_path / "missing.npz")})  # reading it would fail first
    with pytest.raises(ConfigError, match=r"model.clusters needs a conditional energy .*'mlp'.*model.clusters off"):
        train(config, tmp_path / "run", progress=False)


def test_a_stream_cluster_read_stops_at_an_unreadable_shard(tmp_path):
    from tests.test_shards import write_coded_shards

    write_coded_shards(tmp_path / "shards", [40] * 3)
    (tmp_path / "shards" / "shard-000001.tar").write_bytes(b"not a tar")  # the second shard
    overrides = {"data.source": "webdataset", "data.urls": f"{tmp_path}/shards/shard-{{000000..000002}}.tar",
                 "data.loader_workers": 1, "data.mean_samples": 16, "data.cluster_samples": 30,
                 "model.clusters": 3}
    with pytest.raises(ConfigError, match=r"30 images spread over 3 shards \(data.cluster_samples.*shard-000001.*remove that shard"):
        training_data(load_config(CONFIGS / "digits_ggcn.yaml", overrides), 0, 1, torch.device("cpu"))
    without = load_config(CONFIGS / "digits_ggcn.yaml", {
        **overrides, "data.urls": f"{tmp_path}/shards/shard-{{000000,000002}}.tar"})
    assert len(training_data(without, 0, 1, torch.device("cpu"))[0].clusters) == 3  # the fix in the message works
