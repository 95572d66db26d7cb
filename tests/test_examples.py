"""Every script of examples/ runs and prints what it promises.

Each script runs in a fresh interpreter with small arguments; the runs of the defaults that take
longer are marked slow. An example whose optional dependency is missing is skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_example(script: str, *args: str, timeout: int = 300) -> str:
    """Run ``examples/<script>`` with ``args``; return its standard output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result.stdout


def test_every_example_is_tested() -> None:
    source = Path(__file__).read_text(encoding="utf-8")
    for script in EXAMPLES.glob("*.py"):
        assert f'"{script.name}"' in source, f"examples/{script.name} has no test here"


def increased_counts(output: str) -> dict[str, int]:
    """The quickstart's counts of steps that increased some objective, by aggregator."""
    counts = re.findall(r"^\s+(Mean|UPGrad)\s+(\d+) / (\d+) steps", output, flags=re.MULTILINE)
    return {name: int(count) for name, count, _ in counts}


def test_quickstart_small() -> None:
    output = run_example("quickstart.py", "--epochs", "2", "--samples", "1024")
    epochs = re.findall(r"^\s+(\d+)(?:\s+\d+\.\d+){8}\s*$", output, flags=re.MULTILINE)
    assert epochs == ["1", "2"], output
    counts = increased_counts(output)
    assert set(counts) == {"Mean", "UPGrad"}, output
    # The demo's claim, on this seed: UPGrad's steps raise some task's loss less often.
    assert counts["UPGrad"] < counts["Mean"], output
    assert "UPGrad increased some objective on fewer steps than Mean." in output
    assert re.search(r"Final mean of the task losses, UPGrad: \d+\.\d+", output)


@pytest.mark.slow
def test_quickstart_default() -> None:
    output = run_example("quickstart.py")
    assert len(re.findall(r"^\s+\d+(?:\s+\d+\.\d+){8}\s*$", output, flags=re.MULTILINE)) == 20
    counts = increased_counts(output)
    assert counts["UPGrad"] < counts["Mean"], output


def test_multi_task_digits() -> None:
    pytest.importorskip("sklearn")
    output = run_example(
        "multi_task_digits.py", "--epochs", "4", "--train-size", "2000", "--test-size", "500"
    )
    rows = re.findall(r"^\s+(Mean|UPGrad)\s+(\d\.\d+)\s+(\d\.\d+)$", output, flags=re.MULTILINE)
    assert [name for name, *_ in rows] == ["Mean", "UPGrad"], output
    # A few epochs are enough to read both digits far better than chance (0.1).
    assert all(float(a) > 0.5 and float(b) > 0.5 for _, a, b in rows), output


def test_iwrm() -> None:
    pytest.importorskip("sklearn")
    output = run_example("iwrm.py", "--epochs", "2", "--lr", "0.01", "--chunk-size", "16")
    rows = re.findall(
        r"^\s+(Mean|UPGrad)\s+(\d+\.\d+)\s+(\d\.\d+)\s+(\d+) / (\d+)", output, flags=re.MULTILINE
    )
    assert [row[0] for row in rows] == ["Mean", "UPGrad"], output
    increased = {row[0]: int(row[3]) for row in rows}
    # With a small learning rate, an UPGrad step raises no sample's loss; a Mean step almost
    # always raises some.
    assert increased["UPGrad"] < increased["Mean"], output


def test_config_from_file() -> None:
    output = run_example("config_from_file.py", "--steps", "2")
    assert "From jd.json:" in output
    assert "Every configuration round-tripped." in output


def test_config_from_file_reads_a_given_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text('{"aggregator": {"name": "mgda", "max_iters": 7}}', encoding="utf-8")
    output = run_example("config_from_file.py", "--config", str(path), "--steps", "1")
    assert "From mine.json:" in output and "max_iters=7" in output, output


def test_trajectories(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    output_path = tmp_path / "trajectories.png"
    output = run_example(
        "trajectories.py", "--output", str(output_path), "--steps", "30", "--aggregators",
        "mean", "upgrad",
    )  # fmt: skip
    assert output_path.read_bytes().startswith(b"\x89PNG"), output
    distances = dict(re.findall(r"^\s+(mean|upgrad)\s+(\S+)$", output, flags=re.MULTILINE))
    assert set(distances) == {"mean", "upgrad"}, output
    assert all(float(d) < 1.0 for d in distances.values()), output


def test_lightning_manual() -> None:
    pytest.importorskip("lightning")
    output = run_example("lightning_manual.py", "--epochs", "1", "--samples", "256")
    assert re.search(r"Trained 1 epochs with Lightning; task losses: \[", output), output


def test_distributed_single_process() -> None:
    output = run_example("distributed.py", "--steps", "3")
    assert "1 process, parameter checksum" in output


@pytest.mark.slow
def test_distributed_two_processes() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*command, str(EXAMPLES / "distributed.py"), "--steps", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 ranks, identical parameters on every rank: True" in result.stdout
