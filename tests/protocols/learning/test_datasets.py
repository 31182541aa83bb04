"""Loaders read small files the tests write in the real formats (IDX gz or not, CIFAR-10
binary, LEAF JSON, npz), and refuse malformed ones with one error naming the file."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.options import ConfigError
from protocols.learning import datasets
from protocols.learning.datasets import DataError


def _idx(path, array, gz=False, magic_type=0x08):
    head = bytes([0, 0, magic_type, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = head + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def _mnist(folder, gz, n=12, m=5, label_hi=9):
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    suffix = ".gz" if gz else ""
    imgs = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, label_hi + 1, n).astype(np.uint8)
    _idx(folder / f"train-images-idx3-ubyte{suffix}", imgs, gz)
    _idx(folder / f"train-labels-idx1-ubyte{suffix}", labels, gz)
    _idx(folder / f"t10k-images-idx3-ubyte{suffix}", imgs[:m], gz)
    _idx(folder / f"t10k-labels-idx1-ubyte{suffix}", labels[:m], gz)
    return imgs, labels


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files(tmp_path, gz):
    imgs, labels = _mnist(tmp_path / "m", gz)
    ds = datasets.load(f"mnist:{tmp_path / 'm'}")
    assert ds.x.shape == (12, 1, 28, 28) and ds.x.dtype == np.float32
    assert np.array_equal(ds.x[:, 0], imgs.astype(np.float32) / 255)
    assert np.array_equal(ds.y, labels) and ds.classes == 10
    assert ds.x_test.shape == (5, 1, 28, 28) and np.array_equal(ds.y_test, labels[:5])


def test_mnist_wrong_magic_names_file(tmp_path):
    _mnist(tmp_path / "m", False)
    bad = tmp_path / "m" / "train-labels-idx1-ubyte"
    data = bytearray(bad.read_bytes())
    data[3] = 3  # says three dimensions: an images file where labels belong
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.*magic number 00000803; "
                                        r"expected 00000801"):
        datasets.load(f"mnist:{tmp_path / 'm'}")


def test_mnist_truncated_and_label_out_of_range(tmp_path):
    _mnist(tmp_path / "t", True)
    path = tmp_path / "t" / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-7]))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz.*header says shape "
                                        r"\(12, 28, 28\)"):
        datasets.load(f"mnist:{tmp_path / 't'}")
    _mnist(tmp_path / "r", False, label_hi=12)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.*label 1[0-2] at index .* "
                                        r"out of range; expected 0..9"):
        datasets.load(f"mnist:{tmp_path / 'r'}")


def test_missing_files_and_folders(tmp_path):
    with pytest.raises(DataError, match=r"\[data\] dataset: folder .*nowhere.* does not exist"):
        datasets.load(f"mnist:{tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"MNIST train images: none of train-images-idx3-ubyte"):
        datasets.load(f"mnist:{tmp_path / 'empty'}")
    with pytest.raises(DataError, match=r"npz file .*nope.npz' does not exist"):
        datasets.load(f"npz:{tmp_path / 'nope.npz'}")
    with pytest.raises(DataError, match=r"no data_batch_\*.bin"):
        datasets.load(f"cifar10:{tmp_path / 'empty'}")
    with pytest.raises(ConfigError, match=r"expected 'npz:PATH'"):
        datasets.load("npz:")


def _cifar(path, n, seed, label_hi=9):
    rng = np.random.default_rng(seed)
    recs = rng.integers(0, 256, (n, 3073)).astype(np.uint8)
    recs[:, 0] = rng.integers(0, label_hi + 1, n)
    path.write_bytes(recs.tobytes())
    return recs


def test_cifar10_binary_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    a = _cifar(folder / "data_batch_1.bin", 4, 1)
    b = _cifar(folder / "data_batch_2.bin", 3, 2)
    t = _cifar(folder / "test_batch.bin", 2, 3)
    ds = datasets.load(f"cifar10:{tmp_path}")  # the archive's own folder is found inside
    assert ds.x.shape == (7, 3, 32, 32) and ds.y.tolist() == [*a[:, 0], *b[:, 0]]
    assert np.array_equal(ds.x[4], b[0, 1:].reshape(3, 32, 32) / np.float32(255))
    assert ds.y_test.tolist() == t[:, 0].tolist()


def test_cifar10_truncated_record_and_bad_label(tmp_path):
    _cifar(tmp_path / "data_batch_1.bin", 3, 1)
    with open(tmp_path / "data_batch_1.bin", "ab") as f:
        f.write(b"\x01" * 100)
    with pytest.raises(DataError, match=r"data_batch_1.bin.*truncated record at byte offset "
                                        r"9219"):
        datasets.load(f"cifar10:{tmp_path}")
    recs = _cifar(tmp_path / "data_batch_1.bin", 3, 1)
    recs[2, 0] = 11
    (tmp_path / "data_batch_1.bin").write_bytes(recs.tobytes())
    with pytest.raises(DataError, match=r"label 11 in record 2 \(byte offset 6146\) is out "
                                        r"of range"):
        datasets.load(f"cifar10:{tmp_path}")


def _leaf_file(path, users, make_x, make_y):
    doc = {"users": users, "num_samples": [], "user_data": {}}
    for i, u in enumerate(users):
        n = 2 + i
        doc["num_samples"].append(n)
        doc["user_data"][u] = {"x": [make_x(i, j) for j in range(n)],
                               "y": [make_y(i, j) for j in range(n)]}
    path.write_text(json.dumps(doc))


def test_leaf_femnist_and_shakespeare(tmp_path):
    for sub in ("train", "test"):
        (tmp_path / "femnist" / sub).mkdir(parents=True)
        _leaf_file(tmp_path / "femnist" / sub / "all_data_0.json", ["f0001", "f0002"],
                   lambda i, j: [float((i + j) % 2)] * 784, lambda i, j: (i * 7 + j) % 62)
    ds = datasets.load(f"leaf:{tmp_path / 'femnist'}")
    assert ds.x.shape == (5, 1, 28, 28) and ds.group.tolist() == [0, 0, 1, 1, 1]
    assert ds.y.tolist() == [0, 1, 7, 8, 9] and ds.x_test.shape == (5, 1, 28, 28)
    (tmp_path / "shakespeare" / "train").mkdir(parents=True)
    _leaf_file(tmp_path / "shakespeare" / "train" / "a.json", ["ROMEO", "JULIET"],
               lambda i, j: "to be", lambda i, j: "ab"[i])
    ds = datasets.load(f"leaf:{tmp_path / 'shakespeare'}")
    assert ds.x.dtype == np.int64 and ds.x.shape == (5, 5) and ds.classes == 80
    assert ds.y.tolist() == [datasets.LEAF_LETTERS.index(c) for c in "aabbb"]


def test_leaf_bad_file(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "x.json").write_text('{"users": ["a"]}')
    with pytest.raises(DataError, match=r"x.json.*lacks 'user_data'"):
        datasets.load(f"leaf:{tmp_path}")


def test_npz_with_groups_and_test_split(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x=rng.standard_normal((20, 6)), y=rng.integers(0, 3, 20),
             group=np.arange(20) % 4, x_test=rng.standard_normal((5, 6)), y_test=np.arange(5) % 3)
    ds = datasets.load(f"npz:{path}")
    assert ds.x.dtype == np.float32 and ds.shape == (6,) and ds.classes == 3
    assert ds.group.tolist() == (np.arange(20) % 4).tolist() and len(ds.y_test) == 5


def test_labels_out_of_range_and_bad_arrays(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 2)), y=np.array([0, 1, 5, 1]))
    with pytest.raises(DataError, match=r"label 5 in y is out of range; expected labels in "
                                        r"0..2 \(3 classes\)"):
        datasets.load(f"npz:{path}", classes=3)
    np.savez(path, x=np.zeros((4, 2)), y=np.array([0, -1, 0, 1]))
    with pytest.raises(DataError, match=r"label -1 in y is out of range"):
        datasets.load(f"npz:{path}")
    np.savez(path, x=np.zeros((4, 2)), y=np.array([0, 1, 0]))
    with pytest.raises(DataError, match=r"y has shape \(3,\); expected \(4,\)"):
        datasets.load(f"npz:{path}")
    np.savez(path, features=np.zeros((4, 2)))
    with pytest.raises(DataError, match=r"has arrays \['features'\]; expected 'x' and 'y'"):
        datasets.load(f"npz:{path}")
    path.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"d.npz' cannot be read"):
        datasets.load(f"npz:{path}")


def test_digits_is_sklearns_bundled_set():
    ds = datasets.load("digits")
    assert ds.x.shape == (1797, 1, 8, 8) and ds.classes == 10
    assert ds.x.min() >= 0 and ds.x.max() <= 1


def test_user_dataset_function(tmp_path):
    from kernel import registry

    registry.register("datasets", "tests.tiny", lambda: (np.ones((6, 3)), np.arange(6) % 2))
    ds = datasets.load("tests.tiny")
    assert ds.x.shape == (6, 3) and ds.classes == 2
    with pytest.raises(ConfigError, match=r"dataset = 'tests_nowhere_mod:fn': no module named "
                                          r"'tests_nowhere_mod' \(looked in"):
        datasets.load("tests_nowhere_mod:fn")


def test_leaf_writers_become_clients_with_the_natural_partition(tmp_path):
    from protocols import learners

    (tmp_path / "train").mkdir()
    _leaf_file(tmp_path / "train" / "a.json", ["w1", "w2", "w3"],
               lambda i, j: [0.5] * 784, lambda i, j: j % 3)
    learner = learners.make({"workload": {"model": "logreg", "clients": 3},
                             "data": {"dataset": f"leaf:{tmp_path}", "test_fraction": 0.0,
                                      "partition": {"kind": "natural"}}})
    assert [learner.samples(i) for i in range(3)] == [2, 3, 4]  # writer i wrote 2 + i
    assert learner.evaluate(learner.init()) is None  # no test split asked for


@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(0, 5), min_size=1, max_size=4), gz=st.booleans(),
       code=st.sampled_from(sorted(datasets.IDX_TYPES)), seed=st.integers(0, 1000))
def test_idx_round_trip(tmp_path_factory, shape, gz, code, seed):
    dtype = np.dtype(datasets.IDX_TYPES[code])
    a = (np.random.default_rng(seed).standard_normal(shape) * 50).astype(dtype)
    head = bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)
    data = head + a.tobytes()
    path = tmp_path_factory.mktemp("idx") / ("f.gz" if gz else "f")
    path.write_bytes(gzip.compress(data) if gz else data)
    got = datasets.read_idx(path, len(shape))
    assert got.shape == tuple(shape) and np.array_equal(got, a)
    with pytest.raises(DataError, match="magic number"):
        datasets.read_idx(path, len(shape) + 1)
