"""Every script of examples/ runs and prints what it promises.

Each script runs in a fresh interpreter with small arguments; the runs of the defaults that take
longer are marked slow. An example whose optional dependency is missing is skipped.
"""

from __future__ import annotations

import os
import re
import socket
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
        "multi_task_digits.py", "--epochs", "4", "--train-size", "2000", "--validation-size",
        "300", "--test-size", "500", "--lrs", "0.01", "0.03",
    )  # fmt: skip
    sweep = re.findall(r"^\s+(0\.01|0\.03)\s+\d\.\d+\s+\d\.\d+$", output, flags=re.MULTILINE)
    assert sweep == ["0.01", "0.03"], output
    rows = re.findall(
        r"^\s+(Mean|UPGrad)\s+0\.0[13]\s+(\d\.\d+)\s+(\d\.\d+)$", output, flags=re.MULTILINE
    )
    assert [name for name, *_ in rows] == ["Mean", "UPGrad"], output
    # A few epochs are enough to read both digits far better than chance (0.1).
    assert all(float(a) > 0.5 and float(b) > 0.5 for _, a, b in rows), output


def test_iwrm() -> None:
    pytest.importorskip("sklearn")
    output = run_example("iwrm.py", "--epochs", "2", "--lrs", "0.01", "--chunk-size", "16")
    rows = re.findall(
        r"^\s+(Mean|UPGrad)\s+0\.01\s+(\d+\.\d+)\s+(\d\.\d+)\s+(\d+) / (\d+)",
        output,
        flags=re.MULTILINE,
    )
    assert [row[0] for row in rows] == ["Mean", "UPGrad"], output
    increased = {row[0]: int(row[3]) for row in rows}
    # With a small learning rate, an UPGrad step raises no sample's loss; a Mean step almost
    # always raises some.
    assert increased["UPGrad"] < increased["Mean"], output


def test_iwrm_sweep_reports_each_method_at_its_best_learning_rate() -> None:
    pytest.importorskip("sklearn")
    output = run_example("iwrm.py", "--epochs", "1", "--lrs", "0.01", "0.3")
    table = re.findall(r"^\s+(0\.01|0\.3)\s+(\d\.\d+)\s+(\d\.\d+)$", output, flags=re.MULTILINE)
    assert [lr for lr, *_ in table] == ["0.01", "0.3"], output
    chosen = dict(re.findall(r"^\s+(Mean|UPGrad)\s+(\S+)\s+\d+\.\d+", output, flags=re.M))
    for column, name in enumerate(["Mean", "UPGrad"], start=1):
        best = max(table, key=lambda row: float(row[column]))[0]
        assert chosen[name] == best, output


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


def _checksum(output: str) -> float:
    match = re.search(r"^Parameter checksum (-?\d+\.\d+); checkpoint ", output, flags=re.M)
    assert match, output
    return float(match.group(1))


def test_distributed_single_process_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    args = ["--epochs", "2", "--samples", "512"]
    whole = run_example("distributed.py", *args, "--checkpoint", str(tmp_path / "a.pt"))
    assert "1 process on cpu, global batch 64, 8 steps per epoch." in whole, whole
    epochs = re.findall(r"^\s+(\d)  (\d\.\d{4})  (\d\.\d{4})  (\d\.\d{4})$", whole, re.M)
    assert [epoch for epoch, *_ in epochs] == ["1", "2"], whole
    # Stopped after one epoch and resumed from the checkpoint: the same parameters.
    part = tmp_path / "b.pt"
    run_example("distributed.py", *args[2:], "--epochs", "1", "--checkpoint", str(part))
    resumed = run_example("distributed.py", *args, "--checkpoint", str(part), "--resume")
    assert re.findall(r"^\s+(\d)  ", resumed, re.M) == ["2"], resumed
    assert _checksum(resumed) == _checksum(whole), (whole, resumed)


@pytest.mark.slow
def test_distributed_two_processes(tmp_path: Path) -> None:
    """torchrun with two gloo ranks: they end with the same parameters as one process. Its
    local rendezvous can fail on a loaded or sandboxed machine, so a failed run is tried again
    once; a second run that never completed an epoch is skipped as the machine's, and one that
    failed later fails the test."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    if loopback:  # not the address the host name resolves to, which a sandbox may filter
        env.setdefault("GLOO_SOCKET_IFNAME", loopback[0])
    args = ["--epochs", "2", "--samples", "512"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for _attempt in range(2):
        result = subprocess.run(
            [*command, str(EXAMPLES / "distributed.py"), *args, "--checkpoint",
             str(tmp_path / "two.pt")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )  # fmt: skip
        if result.returncode == 0:
            break
    finished = "2 ranks, identical parameters on every rank: True" in result.stdout
    if result.returncode != 0 and not finished and "    1  " not in result.stdout:
        pytest.skip(f"torchrun could not start two gloo ranks here: {result.stderr[-2000:]}")
    # A non-zero exit after the final line is a teardown accident: the example's work is done.
    assert finished, result.stdout[-2000:] + result.stderr[-4000:]
    assert "2 ranks on cpu, global batch 64, 8 steps per epoch." in result.stdout
    one = run_example("distributed.py", *args, "--checkpoint", str(tmp_path / "one.pt"))
    # Each rank's shard of a step is half of the batch one process reads at that step.
    assert abs(_checksum(result.stdout) - _checksum(one)) < 1e-4, (result.stdout, one)
    assert (tmp_path / "two.pt").exists()


def test_fsdp_single_process_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    args = ["--epochs", "2", "--samples", "512"]
    whole = run_example("fsdp.py", *args, "--checkpoint", str(tmp_path / "a"))
    assert "1 process on cpu, global batch 64, 8 steps per epoch." in whole, whole
    epochs = re.findall(r"^\s+(\d)  (\d\.\d{4})  (\d\.\d{4})  (\d\.\d{4})$", whole, re.M)
    assert [epoch for epoch, *_ in epochs] == ["1", "2"], whole
    # Stopped after one epoch and resumed from the sharded checkpoint: the same parameters.
    part = tmp_path / "b"
    run_example("fsdp.py", *args[2:], "--epochs", "1", "--checkpoint", str(part))
    resumed = run_example("fsdp.py", *args, "--checkpoint", str(part), "--resume")
    assert re.findall(r"^\s+(\d)  ", resumed, re.M) == ["2"], resumed
    assert _checksum(resumed) == _checksum(whole), (whole, resumed)


def test_fsdp_bfloat16(tmp_path: Path) -> None:
    output = run_example("fsdp.py", "--epochs", "2", "--samples", "512", "--bf16",
                         "--checkpoint", str(tmp_path / "c"))  # fmt: skip
    losses = re.findall(r"^\s+\d  (\d\.\d{4})  (\d\.\d{4})  (\d\.\d{4})$", output, re.M)
    assert len(losses) == 2, output
    # bfloat16 compute trains: every task's loss falls in the second epoch.
    assert all(float(b) < float(a) for a, b in zip(*losses, strict=True)), output


@pytest.mark.slow
def test_fsdp_two_processes(tmp_path: Path) -> None:
    """torchrun with two gloo ranks, each holding half of every parameter: they end where one
    process does, up to rounding. A failed start is tried again once, and skipped as the
    machine's if the ranks never completed an epoch, as for examples/distributed.py."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    if loopback:
        env.setdefault("GLOO_SOCKET_IFNAME", loopback[0])
    args = ["--epochs", "2", "--samples", "512"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for _attempt in range(2):
        result = subprocess.run(
            [*command, str(EXAMPLES / "fsdp.py"), *args, "--checkpoint", str(tmp_path / "two")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        if result.returncode == 0:
            break
    finished = "Parameter checksum" in result.stdout
    if result.returncode != 0 and not finished and "    1  " not in result.stdout:
        pytest.skip(f"torchrun could not start two gloo ranks here: {result.stderr[-2000:]}")
    assert finished, result.stdout[-2000:] + result.stderr[-4000:]
    assert "2 ranks on cpu, global batch 64, 8 steps per epoch." in result.stdout
    assert "Rank 0 holds 36411 of the model's 72771 parameters." in result.stdout
    one = run_example("fsdp.py", *args, "--checkpoint", str(tmp_path / "one"))
    assert abs(_checksum(result.stdout) - _checksum(one)) < 1e-4, (result.stdout, one)
    assert (tmp_path / "two" / "epoch-2").is_dir()


def test_iwmtl() -> None:
    output = run_example("iwmtl.py", "--epochs", "2", "--samples", "512")
    assert "losses of shape [32, 3]: 96 objectives per step, in gramian mode" in output, output
    rows = re.findall(
        r"^\s+(Mean|UPGrad)((?:\s+\d+\.\d+){3})((?:\s+\d\.\d+){3})\s+\d+\.\d+$",
        output,
        flags=re.MULTILINE,
    )
    assert [row[0] for row in rows] == ["Mean", "UPGrad"], output
    counts = dict(re.findall(r"^\s+(Mean|UPGrad)\s+(\d+) / 32 \(", output, flags=re.MULTILINE))
    assert set(counts) == {"Mean", "UPGrad"}, output
    # With the default small learning rate, a Mean step raises some (sample, task) loss; an
    # UPGrad step almost never does.
    assert int(counts["UPGrad"]) < int(counts["Mean"]), output


def test_partial_jd() -> None:
    output = run_example(
        "partial_jd.py", "--epochs", "1", "--samples", "128", "--jacobian-steps", "2"
    )
    for kind in ("conv", "gru"):
        assert f"{kind} features," in output, output
    gaps = re.findall(r"after 2 steps, jacobian and gramian \(all\) parameters differ by at most "
                      r"(\S+)$", output, flags=re.MULTILINE)  # fmt: skip
    # Jacobian mode and full gramian mode take the same steps, up to rounding.
    assert len(gaps) == 2 and all(float(gap) < 1e-4 for gap in gaps), output
    cosines = re.findall(r"head-only and full updates on the first batch: (-?\d\.\d+)", output)
    assert len(cosines) == 2 and all(-1 <= float(c) <= 1 for c in cosines), output
    times = re.findall(
        r"^\s+(jacobian|gramian, all|gramian, head)\s+(\d+\.\d+)\s+(\d+)\s", output, flags=re.M
    )
    assert [name for name, *_ in times] == ["jacobian", "gramian, all", "gramian, head"] * 2
    assert [int(steps) for *_, steps in times] == [2, 4, 4] * 2, output
    gru = {name: float(ms) for name, ms, _ in times[3:]}
    # For the GRU, the full Gramian needs the engine's per-sample fallback; the head's does not.
    assert gru["gramian, head"] < gru["gramian, all"], output


def _amp_summary(output: str) -> tuple[int, int, float]:
    match = re.search(
        r"^(\d+) of (\d+) steps were skipped for an overflow; final scale (\S+)\.$",
        output,
        flags=re.MULTILINE,
    )
    assert match, output
    return int(match.group(1)), int(match.group(2)), float(match.group(3))


def _amp_final_losses(output: str) -> tuple[list[float], list[float]]:
    autocast = re.search(r"autocast \+ GradScaler: ([\d. ]+)$", output, flags=re.MULTILINE)
    plain = re.search(r"float32:\s+([\d. ]+)$", output, flags=re.MULTILINE)
    assert autocast and plain, output
    return [float(v) for v in autocast.group(1).split()], [float(v) for v in plain.group(1).split()]


def test_amp() -> None:
    output = run_example("amp.py", "--steps", "20")
    assert _amp_summary(output) == (0, 20, 65536.0), output
    # bfloat16 autocast with a scaler trains like float32.
    autocast, plain = _amp_final_losses(output)
    assert len(autocast) == 3
    assert all(abs(a - b) <= 0.02 * b for a, b in zip(autocast, plain, strict=True)), output


def test_amp_in_gramian_mode_takes_scales_whose_square_overflows_float32() -> None:
    output = run_example("amp.py", "--steps", "3", "--mode", "gramian", "--init-scale", "1e20")
    # The Gramian of the losses scaled by 1e20 would overflow float32: it is formed in float64,
    # no step is skipped, and training follows the float32 model's.
    assert _amp_summary(output) == (0, 3, 1e20), output
    autocast, full = _amp_final_losses(output)
    assert len(autocast) == 3
    assert all(abs(a - b) <= 1e-2 * max(abs(b), 1.0) for a, b in zip(autocast, full, strict=True))


def test_rnn() -> None:
    output = run_example("rnn.py", "--steps", "10")
    # A GRU has no closed form in the Gramian engine: mode="auto" picks jacobian mode.
    assert "mode='auto' resolved to 'jacobian'" in output, output
    assert "without a closed form in the Gramian engine: 'rnn'." in output, output
    rows = re.findall(r"^\s+(Mean|UPGrad)\s+(\d+\.\d+)\s+\d+\.\d+$", output, flags=re.MULTILINE)
    assert [name for name, _ in rows] == ["Mean", "UPGrad"], output


def test_rnn_lstm_in_gramian_mode() -> None:
    output = run_example("rnn.py", "--steps", "3", "--cell", "lstm", "--mode", "gramian")
    assert "mode='gramian' resolved to 'gramian'" in output, output
    assert "LSTM with batch_first=True" in output, output


def test_monitoring(tmp_path: Path) -> None:
    log = tmp_path / "diagnostics.csv"
    output = run_example("monitoring.py", "--steps", "60", "--print-every", "30", "--log", str(log))
    conflicted = dict(
        re.findall(r"^\s+(Mean|UPGrad): the update conflicted with some task at (\d+) of 60 steps",
                   output, flags=re.MULTILINE)
    )  # fmt: skip
    assert set(conflicted) == {"Mean", "UPGrad"}, output
    # UPGrad's update never conflicts with a task; Mean's often does on these tasks.
    assert int(conflicted["UPGrad"]) == 0 and int(conflicted["Mean"]) > 0, output
    lines = log.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 + 2 * 60, lines[:3]
    header = lines[0].split(",")
    for column in ("conflicting_pairs", "update_conflicts", "weights_4", "cosine_3_4"):
        assert column in header, header
    upgrad_rows = [line for line in lines[1:] if line.startswith("UPGrad,")]
    position = header.index("update_conflicts")
    assert {row.split(",")[position] for row in upgrad_rows} == {"False"}
