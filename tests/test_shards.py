"""WebDataset shards: writing (tree, tar, LMDB, .npz), reading split by rank and loader worker,
corrupt samples and truncated shards, preflight messages, exact resume, and S3 on loopback."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from distributed_ebm.config import ConfigError, DataConfig, RunConfig
from distributed_ebm.data import load_dataset
from distributed_ebm.data.preflight import inspect_shards
from distributed_ebm.data.shards import ShardOptions, write_shards
from distributed_ebm.data.stream import ShardStream, StreamingData
from distributed_ebm.data.urls import expand_urls
from distributed_ebm.train_loop import train

SIZE = 8


def coded_image(index: int) -> np.ndarray:
    """An 8×8 RGB image whose first two pixels encode `index` (read back by `decode_index`)."""
    image = np.full((SIZE, SIZE, 3), 128, np.uint8)
    image[0, 0] = index % 256
    image[0, 1] = index // 256
    return image


def decode_index(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist()


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_coded_shards(folder: Path, sizes: list[int], corrupt: set[int] = frozenset()) -> list[str]:
    """Shards holding coded PNG images with consecutive indices; `corrupt` indices hold garbage."""
    folder.mkdir(parents=True, exist_ok=True)
    urls, index = [], 0
    for s, size in enumerate(sizes):
        path = folder / f"shard-{s:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for _ in range(size):
                data = b"not an image at all" if index in corrupt else png_bytes(coded_image(index))
                writer.write({"__key__": f"{index:09d}", "png": data, "cls": str(index % 3).encode()})
                index += 1
        urls.append(str(path))
    return urls


def read_all(stream_kwargs: dict, ranks: int, workers: int) -> dict[int, list[torch.Tensor]]:
    """Batches per rank, read through real DataLoader worker processes."""
    per_rank = {}
    for rank in range(ranks):
        stream = ShardStream(rank=rank, world_size=ranks, **stream_kwargs)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        per_rank[rank] = [b for b in loader if len(b.images)]
    return per_rank


def test_epoch_mode_reads_every_sample_exactly_once(tmp_path):
    urls = write_coded_shards(tmp_path, [5, 6, 7, 5, 6, 4, 7, 5])  # 45 samples, uneven shards
    batches = read_all(dict(shards=urls, batch_size=4, image_size=SIZE, channels=3, seed=3, shuffle_buffer=8,
                            epochs=1, drop_last=False), ranks=2, workers=2)
    seen = [i for rank in batches.values() for b in rank for i in decode_index(b.images)]
    assert sorted(seen) == list(range(45))
    # Disjoint by rank, and the shuffle buffer really reorders within a worker.
    rank0 = {i for b in batches[0] for i in decode_index(b.images)}
    rank1 = {i for b in batches[1] for i in decode_index(b.images)}
    assert rank0 and rank1 and not rank0 & rank1
    assert seen != sorted(seen)


def test_epoch_order_changes_between_epochs_and_is_seeded(tmp_path):
    urls = write_coded_shards(tmp_path, [6, 6, 6, 6])
    kwargs = dict(shards=urls, batch_size=6, image_size=SIZE, channels=3, shuffle_buffer=10, drop_last=False)
    order = lambda seed, epochs: [i for b in ShardStream(seed=seed, epochs=epochs, **kwargs)  # noqa: E731
                                  for i in decode_index(b.images)]
    two_epochs = order(0, 2)
    assert sorted(two_epochs[:24]) == sorted(two_epochs[24:]) == list(range(24))
    assert two_epochs[:24] != two_epochs[24:]
    assert order(0, 1) == two_epochs[:24]  # same seed, same order
    assert order(1, 1) != two_epochs[:24]


def test_resampled_mode_gives_every_rank_the_same_number_of_batches(tmp_path):
    urls = write_coded_shards(tmp_path, [2, 7, 13])  # uneven, fewer shards than 2 ranks × 2 workers
    batches = read_all(dict(shards=urls, batch_size=3, image_size=SIZE, channels=3, resampled=True,
                            epoch_batches=5, epochs=1), ranks=2, workers=2)
    assert [len(batches[r]) for r in (0, 1)] == [5, 5]
    assert all(len(b.images) == 3 for r in (0, 1) for b in batches[r])


def test_corrupt_sample_is_skipped_and_counted(tmp_path, caplog):
    urls = write_coded_shards(tmp_path, [6, 6], corrupt={4})
    stream = ShardStream(urls, batch_size=4, image_size=SIZE, channels=3, shuffle_buffer=1, epochs=1, drop_last=False)
    with caplog.at_level(logging.WARNING):
        batches = list(stream)
    seen = sorted(i for b in batches for i in decode_index(b.images))
    assert seen == [i for i in range(12) if i != 4]
    assert sum(b.corrupt for b in batches) == 1
    assert "corrupt sample 000000004" in caplog.text


def test_truncated_tar_is_reported_and_counted(tmp_path, caplog):
    urls = write_coded_shards(tmp_path, [10, 10])
    data = Path(urls[1]).read_bytes()
    Path(urls[1]).write_bytes(data[: len(data) // 2])
    stream = ShardStream(urls, batch_size=5, image_size=SIZE, channels=3, shuffle_shards=False, shuffle_buffer=1,
                         epochs=1, drop_last=False)
    with caplog.at_level(logging.WARNING):
        batches = list(stream)
    seen = sorted(i for b in batches for i in decode_index(b.images))
    assert seen[:10] == list(range(10)) and 10 < len(seen) < 20  # the intact part of the cut shard is read
    assert sum(b.bad_shards for b in batches) == 1
    assert "Shard error" in caplog.text and "shard-000001.tar" in caplog.text


def test_streaming_data_counts_corrupt_samples_in_training_metrics(tmp_path, tiny_overrides):
    write_coded_shards(tmp_path / "shards", [8, 8], corrupt={3, 9})
    config = RunConfig.from_dict({}).replace({
        **tiny_overrides, "data.source": "webdataset", "data.urls": f"{tmp_path}/shards/shard-{{000000..000001}}.tar",
        "data.loader_workers": 1, "data.shuffle_buffer": 1, "data.shuffle_shards": False,
        "train.data_batch_size": 4, "train.iterations": 3, "chains.bank_size": 4, "chains.batch_size": 4,
    })
    summary = train(config, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["status"] == "completed" and len(rows) == 3
    # In order: batches 0 1 2 4 | 5 6 7 8 | 10 11 12 13 — the corrupt 3 and 9 are skipped on the way.
    assert [r["data_corrupt"] for r in rows] == [1, 1, 2]
    assert all("data_wait_s" in r and r["data_bad_shards"] == 0 for r in rows)


def make_tree(root: Path) -> dict[str, bytes]:
    """An ImageNet-style tree train/<class>/*.JPEG (plus one corrupt file and a non-image)."""
    files = {}
    rng = np.random.default_rng(0)
    for c, name in enumerate(["n02", "n01", "n03"]):  # sorted: n01 → 0, n02 → 1, n03 → 2
        for i in range(3):
            array = rng.integers(0, 256, (12 + i, 10 + c, 3), dtype=np.uint8)
            files[f"train/{name}/img_{c}{i}.JPEG"] = jpeg_bytes(array)
    files["train/n01/broken.JPEG"] = jpeg_bytes(np.zeros((8, 8, 3), np.uint8))[:40]  # truncated JPEG
    files["train/n01/notes.txt"] = b"not an image"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def read_shard_samples(folder: Path) -> list[dict]:
    urls = sorted(str(p) for p in folder.glob("shard-*.tar"))
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


@pytest.mark.parametrize("as_tar", [True, False])
def test_imagenet_tree_converts_keeping_bytes_and_classes(tmp_path, as_tar):
    files = make_tree(tmp_path / "tree")
    source = tmp_path / "tree"
    if as_tar:
        source = tmp_path / "imagenet.tar"
        with tarfile.open(source, "w") as tar:
            tar.add(tmp_path / "tree" / "train", arcname="train")
    manifest = write_shards(str(source), str(tmp_path / "out"), ShardOptions(samples_per_shard=4, progress=False))
    assert manifest["classes"] == ["n01", "n02", "n03"]
    assert manifest["num_samples"] == 9 and manifest["num_shards"] == 3
    assert manifest["num_skipped"] == 1 and manifest["skipped"][0]["id"].endswith("broken.JPEG")
    assert manifest["class_counts"] == {"n01": 3, "n02": 3, "n03": 3}
    written = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["samples"] for s in written["shards"]] == [4, 4, 1] and all(len(s["sha256"]) == 64 for s in written["shards"])
    samples = read_shard_samples(tmp_path / "out")
    assert len(samples) == 9
    for sample in samples:
        original = json.loads(sample["json"])["id"]
        assert sample["jpg"] == files[original]  # the encoded bytes, unchanged
        assert int(sample["cls"]) == ["n01", "n02", "n03"].index(original.split("/")[1])


def test_tiny_lmdb_converts_keeping_bytes_and_resizes_on_request(tmp_path):
    import lmdb

    rng = np.random.default_rng(1)
    values = {}
    env = lmdb.open(str(tmp_path / "bedroom_lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(5):
            array = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="WEBP" if i % 2 else "JPEG")
            values[f"img{i:03d}"] = buffer.getvalue()
            txn.put(f"img{i:03d}".encode(), buffer.getvalue())
        txn.put(b"bad", b"\x00garbage")
    env.close()
    manifest = write_shards(str(tmp_path / "bedroom_lmdb"), str(tmp_path / "out"), ShardOptions(progress=False))
    assert manifest["num_samples"] == 5 and manifest["num_skipped"] == 1 and manifest["classes"] == []
    assert manifest["formats"] == {"jpg": 3, "webp": 2}
    for sample in read_shard_samples(tmp_path / "out"):
        key = "webp" if "webp" in sample else "jpg"
        assert sample[key] == values[json.loads(sample["json"])["id"]]
        assert "cls" not in sample
    write_shards(str(tmp_path / "bedroom_lmdb"), str(tmp_path / "small"), ShardOptions(image_size=16, progress=False))
    for sample in read_shard_samples(tmp_path / "small"):
        key = "webp" if "webp" in sample else "jpg"
        assert Image.open(io.BytesIO(sample[key])).size == (16, 16)


def test_npz_converts_losslessly_and_trains_back(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (50, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 4, 50)
    np.savez(tmp_path / "tiny.npz", x=x, y=y)
    manifest = write_shards(str(tmp_path / "tiny.npz"), str(tmp_path / "out"),
                            ShardOptions(samples_per_shard=20, shuffle=False, progress=False))
    assert manifest["formats"] == {"png": 50} and manifest["classes"] == ["0", "1", "2", "3"]
    data = load_dataset(DataConfig(source="webdataset", urls=f"{tmp_path}/out/shard-{{000000..000002}}.tar",
                                   loader_workers=1))
    assert torch.equal(data.x, torch.from_numpy(x).float()[:, None] / 127.5 - 1.0)  # exact pixels
    assert torch.equal(data.y, torch.from_numpy(y)) and data.num_classes == 4


def test_cli_writes_shards_and_prints_the_urls(tmp_path, capsys):
    from distributed_ebm.cli import main

    assert main(["shards", "digits", "--out", str(tmp_path / "d"), "--samples-per-shard", "600", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "1797 samples in 3 shards" in out and "shard-{000000..000002}.tar" in out


def test_preflight_messages(tmp_path):
    urls = write_coded_shards(tmp_path / "s", [4, 4, 4])
    pattern = f"{tmp_path}/s/shard-{{000000..000002}}.tar"
    with pytest.raises(ConfigError, match=r"3 shard\(s\) for 2 rank\(s\) × 2 loader worker\(s\) = 4 readers"):
        inspect_shards(DataConfig(source="webdataset", urls=pattern, loader_workers=2), world_size=2)
    inspect_shards(DataConfig(source="webdataset", urls=pattern, loader_workers=2, resampled=True, epoch_batches=4),
                   world_size=2)
    with pytest.raises(ConfigError, match="needs data.urls"):
        inspect_shards(DataConfig(source="webdataset"), world_size=1)
    with pytest.raises(ConfigError, match="do not exist"):
        inspect_shards(DataConfig(source="webdataset", urls=f"{tmp_path}/nowhere/shard-{{0..3}}.tar"), 1)
    (tmp_path / "empty.tar").write_bytes(b"\0" * 1024)
    with pytest.raises(ConfigError, match="holds no samples"):
        inspect_shards(DataConfig(source="webdataset", urls=str(tmp_path / "empty.tar"), loader_workers=0), 1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(ConfigError, match="Cannot read the shard"):
        inspect_shards(DataConfig(source="webdataset", urls=f"http://127.0.0.1:{port}/shard-0.tar",
                                  loader_workers=0), 1)
    with wds.TarWriter(str(tmp_path / "text.tar")) as writer:
        writer.write({"__key__": "a", "txt": b"hello"})
    with pytest.raises(ConfigError, match=r"hold \['txt'\] but no image"):
        inspect_shards(DataConfig(source="webdataset", urls=str(tmp_path / "text.tar"), loader_workers=0), 1)
    assert len(urls) == len(expand_urls(pattern)) == 3


def stream_run(tmp_path: Path, tiny_overrides: dict, name: str, iterations: int, resume: bool = False) -> list[dict]:
    config = RunConfig.from_dict({}).replace({
        **tiny_overrides, "data.source": "webdataset", "data.urls": f"{tmp_path}/shards/shard-{{000000..000003}}.tar",
        "data.loader_workers": 2, "data.shuffle_buffer": 6, "train.data_batch_size": 4,
        "train.iterations": iterations, "train.checkpoint_every": 3, "chains.bank_size": 4, "chains.batch_size": 4,
    })
    train(config, tmp_path / name, progress=False, resume=resume)
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_the_stream_exactly(tmp_path, tiny_overrides):
    write_coded_shards(tmp_path / "shards", [7, 9, 6, 8])  # 30 samples: 8 iterations cross an epoch
    full = stream_run(tmp_path, tiny_overrides, "full", 8)
    stream_run(tmp_path, tiny_overrides, "cut", 3)
    resumed = stream_run(tmp_path, tiny_overrides, "cut", 8, resume=True)
    keys = ("phi_data", "phi_chains", "response_distance", "grad_norm_theta")
    assert [[r[k] for k in keys] for r in resumed[3:]] == [[r[k] for k in keys] for r in full[3:]]
    assert full[-1]["data_epoch"] == 1.0


def test_streaming_data_resumes_in_a_fresh_epoch_when_the_layout_changes(tmp_path):
    write_coded_shards(tmp_path / "shards", [6, 6, 6, 6])
    config = DataConfig(source="webdataset", urls=f"{tmp_path}/shards/shard-{{000000..000003}}.tar", loader_workers=0)
    make = lambda: StreamingData(config, batch_size=4, rank=0, world_size=1, seed=0,  # noqa: E731
                                 device=torch.device("cpu"))
    data = make()
    first, _ = data.batch(4)
    state = data.state_dict()
    again = make()
    again.load_state_dict([state], rank=0)
    second = again.batch(4)[0]
    assert torch.equal(second, data.batch(4)[0]) and not torch.equal(second, first)
    # Two old ranks, one of which had reached epoch 2: every new rank starts epoch 3.
    ahead = {**state, "world_size": 2, "positions": {0: (2, 5, 1)}}
    moved = make()
    moved.load_state_dict([{**state, "world_size": 2}, ahead], rank=0)
    moved.batch(4)
    assert moved.positions[0][0] == 3


def test_manifest_sizes_give_every_reader_the_same_batches_per_epoch(tmp_path):
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "x.npz", x=rng.integers(0, 256, (50, 8, 8), dtype=np.uint8))
    manifest = write_shards(str(tmp_path / "x.npz"), str(tmp_path / "out"),
                            ShardOptions(samples_per_shard=12, progress=False))  # 12, 12, 12, 12, 2
    urls = sorted(str(p) for p in (tmp_path / "out").glob("shard-*.tar"))
    sizes = {s["name"]: s["samples"] for s in manifest["shards"]}
    counts = {}
    for rank in (0, 1):
        stream = ShardStream(urls, batch_size=4, image_size=8, channels=1, rank=rank, world_size=2, epochs=3,
                             shuffle_buffer=4, shard_sizes=sizes)
        batches = list(stream)
        counts[rank] = [sum(b.epoch == e for b in batches) for e in range(3)]
    assert counts[0] == counts[1] and min(counts[0]) >= 3  # even across ranks, every epoch
    config = DataConfig(source="webdataset", urls=f"{tmp_path}/out/shard-{{000000..000004}}.tar", loader_workers=1)
    with pytest.raises(ConfigError, match="fewer than one batch of 32"):
        inspect_shards(config, world_size=2, batch_size=32)
    with pytest.raises(ConfigError, match=r"epoch_batches \(1\) is smaller than data.loader_workers \(2\)"):
        inspect_shards(DataConfig(source="webdataset", urls=config.urls, resampled=True, epoch_batches=1,
                                  loader_workers=2), world_size=1)


def test_a_reader_that_cannot_fill_a_batch_fails_instead_of_hanging(tmp_path):
    urls = write_coded_shards(tmp_path, [3, 3])  # no manifest: caught while reading
    stream = ShardStream(urls, batch_size=4, image_size=SIZE, channels=3, rank=0, world_size=2, shuffle_buffer=1)
    with pytest.raises(ValueError, match="made no batch of 4"):  # one shard of 3 per rank, every epoch
        next(iter(stream))


@pytest.fixture()
def s3_server(monkeypatch):
    """A moto S3 server on loopback, with the aws CLI pointed at it."""
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="debm-test")
    yield endpoint
    server.stop()


def test_shards_round_trip_through_s3(tmp_path, s3_server, tiny_overrides):
    import boto3

    result = subprocess.run([sys.executable, "-m", "distributed_ebm.cli", "shards", "digits", "--out",
                             "s3://debm-test/digits", "--samples-per-shard", "400", "--quiet"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    listed = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket="debm-test", Prefix="digits/")
    names = sorted(o["Key"] for o in listed["Contents"])
    assert names == ["digits/manifest.json"] + [f"digits/shard-{i:06d}.tar" for i in range(5)]
    urls = "pipe:aws s3 cp s3://debm-test/digits/shard-{000000..000004}.tar -"
    assert urls in result.stdout  # the form `debm shards` prints is the form the README documents
    config = RunConfig.from_dict({}).replace({
        **tiny_overrides, "data.source": "webdataset", "data.urls": urls, "data.loader_workers": 1,
        "data.num_classes": 10, "train.iterations": 3,
    })
    summary = train(config, tmp_path / "run", progress=False)
    assert summary["status"] == "completed" and summary["iterations"] == 3
