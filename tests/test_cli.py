"""The command line: a bad config value, file or folder ends with ONE "error:" line naming it and exit status 2
-- no traceback, and before any model is loaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BAD_TRAIN_VALUES = {  # override -> the key the error must name
    "model.optim.lr=abc": "model.optim.lr",
    "trainer.max_steps=-5": "trainer.max_steps",
    "model.peft.lora_tuning.adapter_dim=0": "model.peft.lora_tuning.adapter_dim",
    "model.micro_batch_size=two": "model.micro_batch_size",
}
OTHER_BAD_RUNS = {  # name -> (arguments, what the error line must contain)
    "evaluate-unknown-key": (["evaluate", "inference.batch_size=4"], "inference.batch_size"),
    "train-missing-config": (["train", "--config", "conf/no_such.yaml"], "conf/no_such.yaml"),
    "prepare-data-missing-source": (["prepare-data", "--source", "{tmp}/nowhere", "--data-dir", "{tmp}/data"],
                                    "nowhere"),
}


def _start(args: list[str], tmp: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "SQUAD_SOURCE_DIR": ""}
    return subprocess.Popen([sys.executable, "-m", "lora_tutorial", *[a.format(tmp=tmp) for a in args]], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every bad command at once (each start imports torch and Lightning: seconds), then their results."""
    tmp = tmp_path_factory.mktemp("cli")
    procs = {o: _start(["train", o], tmp) for o in BAD_TRAIN_VALUES}
    procs.update({name: _start(args, tmp) for name, (args, _) in OTHER_BAD_RUNS.items()})
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = (proc.returncode, out, err)
    return results


def assert_one_error_line(result, must_name: str) -> None:
    returncode, out, err = result
    lines = err.splitlines()
    assert returncode == 2, (returncode, err[-2000:])
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith("error:") and must_name in lines[0], lines[0]
    assert "Traceback" not in err + out
    assert "Loaded" not in out and "GPU available" not in err + out  # stopped before a model or trainer existed


@pytest.mark.parametrize("override", BAD_TRAIN_VALUES)
def test_a_bad_train_value_is_one_error_line_and_status_2(runs, override):
    assert_one_error_line(runs[override], BAD_TRAIN_VALUES[override])
    assert override.split("=", 1)[1] in runs[override][2]  # the value is named too


@pytest.mark.parametrize("name", OTHER_BAD_RUNS)
def test_other_bad_inputs_are_one_error_line_and_status_2(runs, name):
    assert_one_error_line(runs[name], OTHER_BAD_RUNS[name][1])


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "lora_tutorial", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0
    for command in ("generate", "prepare-data", "train", "evaluate"):
        assert command in out.stdout
