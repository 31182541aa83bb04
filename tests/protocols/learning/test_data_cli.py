"""`fedloom data CONFIG --out DIR`: the partition table, its statistics, the CSV and the PNG;
a bad config is one error line and writes nothing."""

from __future__ import annotations

import numpy as np

from kernel.run.cli import main

CONFIG = """
[protocol]
name = "fedavg"
[workload]
model = "logreg"
clients = 7
[data]
dataset = "npz:{path}"
holdout = 0.2
[data.partition]
kind = "{kind}"
{extra}
"""


def _config(tmp_path, kind="shards", extra="shards_per_client = 2", path=None):
    if path is None:
        path = tmp_path / "d.npz"
        rng = np.random.default_rng(0)
        np.savez(path, x=rng.standard_normal((140, 5)), y=np.repeat(np.arange(4), 35),
                 x_test=rng.standard_normal((10, 5)), y_test=np.arange(10) % 4)
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(path=path, kind=kind, extra=extra))
    return cfg


def test_table_csv_and_picture(tmp_path, capsys):
    cfg = _config(tmp_path)
    assert main(["data", str(cfg), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "shards, 7 clients" in out and "train samples    112" in out
    assert "held out         28" in out and "classes/client   mean" in out
    lines = (tmp_path / "out" / "partition.csv").read_text().splitlines()
    assert lines[0] == "client,train,held_out,class_0,class_1,class_2,class_3"
    rows = np.array([[int(v) for v in line.split(",")] for line in lines[1:]])
    assert len(rows) == 7 and rows[:, 1].sum() + rows[:, 2].sum() == 140
    assert (rows[:, 3:].sum(1) == rows[:, 1]).all()
    assert ((rows[:, 3:] > 0).sum(1) <= 2).all()  # two label-sorted shards: at most 2 classes
    png = (tmp_path / "out" / "label_distribution.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["label_distribution.png", "partition.csv"]


def test_bad_config_is_one_line_and_writes_nothing(tmp_path, capsys):
    cfg = _config(tmp_path, kind="dirichlet", extra="alpha = -1")
    assert main(["data", str(cfg), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "fedloom: error: [data.partition] alpha = -1; expected a number > 0 (or a " \
                  "list of them, one per client)"
    assert not (tmp_path / "out").exists()
    cfg = _config(tmp_path, path=tmp_path / "missing.npz")
    assert main(["data", str(cfg), "--out", str(tmp_path / "out")]) == 1
    assert "missing.npz' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_mixture_data_is_shown_too(tmp_path, capsys):
    cfg = tmp_path / "m.toml"
    cfg.write_text('[protocol]\nname = "fedavg"\n[workload]\nclients = 3\nsamples_per_client = 20\n'
                   '[data]\nholdout = 0.25\n')
    assert main(["data", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "mixture, iid, 3 clients" in out
    assert "train samples    45" in out and "held out         15" in out
