"""The CLI contract: one-line errors with a non-zero exit, never a traceback, for user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.cli import build_parser, main

COMMANDS = {"convert-checkpoint", "sample", "download", "validate", "tfrecords", "train", "predict", "evaluate", "report", "publish", "compare"}


def test_every_stage_has_a_command() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == COMMANDS


def test_console_script_is_installed_and_reports_errors_on_one_line(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("personcar")
    assert exe.is_file(), "the personcar console script is not installed"
    r = subprocess.run([str(exe), "tfrecords", "--annotations", str(tmp_path / "nope.json"),
                        "--images", str(tmp_path), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("personcar tfrecords: error: ") and "nope.json" in lines[0]
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def test_train_rejects_bad_options_before_importing_tensorflow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--data", str(tmp_path), "--model-dir", str(tmp_path / "m"), "--backbone", "resnet9"])
    assert code == 2
    err = capsys.readouterr().err
    assert "argument --backbone: invalid choice: 'resnet9'" in err and err.count("\n") == 1
    assert main(["train", "--data", str(tmp_path), "--model-dir", str(tmp_path / "m"), "--image-size", "300"]) == 2
    assert "image_size: must be a multiple of 128" in capsys.readouterr().err  # the run config's own rule


def test_train_flags_override_the_run_config_json() -> None:
    from tasks.cli import run_config_from_args

    base = ["train", "--data", "d", "--model-dir", "m"]
    conf = json.dumps({"model": "ssd_resnet26_v1_fpn_256x256_tiny", "steps": 50, "augment": True})
    cfg = run_config_from_args(build_parser().parse_args([*base, "--run-config", conf, "--steps", "7", "--no-augment"]))
    assert (cfg.model, cfg.steps, cfg.augment) == ("ssd_resnet26_v1_fpn_256x256_tiny", 7, False)
    assert run_config_from_args(build_parser().parse_args([*base, "--run-config", conf])).augment is True
    assert run_config_from_args(build_parser().parse_args(base)).augment is True


def test_tfrecords_command_writes_the_contract_files(sample_dataset: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tfr"
    assert main(["tfrecords", "--annotations", str(sample_dataset["clean"]), "--images", str(sample_dataset["images"]),
                 "--out", str(out), "--num-shards", "1", "--val-fraction", "0.5"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["label_map.pbtxt", "manifest.json", "train-00000-of-00001.tfrecord",
                     "val-00000-of-00001.tfrecord", "val.coco.json"]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["val_fraction"] == 0.5
