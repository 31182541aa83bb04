"""Nothing lost, nothing overwritten by surprise: outputs are written to temporary names and
renamed (a symlink planted at an output's name is replaced, its target untouched), a token
from the command line never reaches config.toml, an `--out` that is a file fails before the
run, and a new run into a folder holding an unfinished run's checkpoint is refused unless
forced."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.options import ConfigError
from kernel.run import checkpoint as ckpt
from kernel.run.cli import EXIT_ERROR, EXIT_OK, main
from kernel.run.outputs import FILES, SECRET_KEYS, without_secrets, write_outputs
from kernel.run.runner import run

TINY = {"run": {"seed": 1, "rounds": 2},
        "protocol": {"name": "fedavg", "clients_per_round": 2},
        "workload": {"model": "linear", "clients": 3, "input_dim": 4, "samples_per_client": 8,
                     "test_samples": 10}}


def test_symlinks_planted_at_every_output_name_are_replaced_not_followed(
        tmp_path: Path) -> None:
    out, victims = tmp_path / "out", tmp_path / "victims"
    out.mkdir()
    victims.mkdir()
    for name in FILES:
        (victims / name).write_text("precious")
        os.symlink(victims / name, out / name)
    run(TINY, out, quiet=True)
    assert all((victims / n).read_text() == "precious" for n in FILES)
    assert not any((out / n).is_symlink() for n in FILES)
    assert sorted(os.listdir(out)) == sorted(FILES)  # no temporary file left behind


def test_a_token_given_on_the_command_line_is_not_written_to_config_toml(
        tmp_path: Path) -> None:
    # What `fedloom run --set transport.token=...` hands write_outputs on grpc.
    cfg = {**TINY, "transport": {"kind": "grpc", "token": "s3cr3t-value", "shards": 2}}
    write_outputs(tmp_path, cfg, {}, [], None)
    text = (tmp_path / "config.toml").read_text()
    assert "s3cr3t" not in text
    assert tomllib.loads(text)["transport"] == {"kind": "grpc", "shards": 2}


@settings(max_examples=40)
@given(st.recursive(st.integers() | st.text(max_size=3),
                    lambda c: st.dictionaries(st.sampled_from(["a", "token", "password",
                                                               "secret", "b"]), c, max_size=4),
                    max_leaves=10).filter(lambda x: isinstance(x, dict)))
def test_without_secrets_leaves_no_secret_key_at_any_depth(cfg: dict[str, Any]) -> None:
    def keys(x: Any) -> set[str]:
        if not isinstance(x, dict):
            return set()
        return set(x) | set().union(*(keys(v) for v in x.values()))

    assert not keys(without_secrets(cfg)) & SECRET_KEYS


def test_an_out_path_that_is_a_file_fails_before_the_run(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    f = tmp_path / "file"
    f.write_text("keep")
    assert main(["run", "--out", str(f), "--quiet", "--set", "workload.clients=1"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err == f"fedloom: error: output directory {str(f)!r} is a file; give a directory " \
                  f"(--out DIR)\n"
    assert f.read_text() == "keep"


def test_a_new_run_into_an_unfinished_runs_folder_is_refused_unless_forced(
        tmp_path: Path) -> None:
    # An unfinished run: a checkpoint and no result.json.
    from tests.kernel.run.test_checkpoint import good_checkpoint

    (tmp_path / ckpt.FILENAME).write_bytes(good_checkpoint())
    with pytest.raises(ConfigError, match=rf"{tmp_path} holds the checkpoint of a run that has "
                                          rf"not finished; resume it with `fedloom run "
                                          rf"--resume {tmp_path}`, or pass --force"):
        run(TINY, tmp_path, quiet=True)
    assert os.listdir(tmp_path) == [ckpt.FILENAME]
    assert main(["run", "--out", str(tmp_path), "--quiet", "--force", "--set",
                 "workload.model=\"linear\"", "--set", "workload.clients=2"]) == EXIT_OK
    # Finished now (result.json newer than the checkpoint): a new run may replace it.
    run(TINY, tmp_path, quiet=True)
