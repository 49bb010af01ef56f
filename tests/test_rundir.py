"""training.rundir and hooked_gpt2.atomic: the run directory's readers and writers."""

import json

import pytest

from hooked_gpt2.atomic import atomic_path, atomic_write
from training import rundir


def test_metrics_rows_skip_a_half_written_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "val_loss": 10.8}\n{"step": 1, "train_loss": 9.1}\n{"step": 2, "tr')
    assert [r["step"] for r in rundir.read_metrics(tmp_path)] == [0, 1]
    rundir.trim_metrics(tmp_path, 0)
    assert rundir.read_metrics(tmp_path) == [{"step": 0, "val_loss": 10.8}]
    assert rundir.read_metrics(tmp_path / "missing") == []


def test_atomic_writes_replace_whole_files_and_directories(tmp_path):
    atomic_write(tmp_path / "a.json", '{"v": 1}')
    atomic_write(tmp_path / "a.json", [b'{"v": ', b"2}"])
    assert json.loads((tmp_path / "a.json").read_text()) == {"v": 2}
    for version in (1, 2):  # a directory (a checkpoint) replaced as a whole
        with atomic_path(tmp_path / "ckpt") as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text(str(version))
    assert (tmp_path / "ckpt" / "weights").read_text() == "2"
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "ckpt") as tmp:  # killed mid-write
        tmp.mkdir()
        raise KeyboardInterrupt
    assert (tmp_path / "ckpt" / "weights").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "ckpt"], "no temporaries left"


def test_config_and_study_layout(tmp_path):
    with pytest.raises(ValueError, match="not a training run directory"):
        rundir.read_config(tmp_path)
    rundir.write_config(tmp_path, {"seed": 3, "max_steps": 2}, {"world_size": 1})
    assert rundir.read_config(tmp_path) == {"seed": 3, "max_steps": 2, "derived": {"world_size": 1}}
    assert rundir.run_status(tmp_path) == "new"
    assert rundir.study_run_dir(tmp_path, "baseline", 3) == tmp_path / "baseline" / "seed_3"
    assert rundir.read_study(tmp_path) is None
    rundir.write_study(tmp_path, {"seeds": [3]})
    assert rundir.read_study(tmp_path) == {"seeds": [3]}
