"""Run a function on two gloo processes on the CPU, for the tests of distributed training.

`run_ranks(tmp_path_factory, work)` starts ``WORLD`` processes, each of which joins a gloo
process group and calls ``work(rank, out)`` (a module-level function, so that it can be sent to
a spawned process), which returns a dictionary of results; each rank saves it as
``out/rank<r>.pt``. What a rank prints goes to ``out/rank<r>.log``, shown if it dies.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
TIMEOUT_S = 300  # for the ranks' whole work; it takes a few seconds
READY_S = 60  # for every rank to have its process group

Work = Callable[[int, Path], dict[str, Any]]


def loopback_interface() -> str | None:
    """The loopback interface's name, so that gloo does not pick its address from the
    host name, which may resolve to an interface a sandbox filters."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((name for name in names if name.startswith("lo")), None)


def _worker(rank: int, port: int, out: str, work: Work) -> None:
    # What a rank prints goes to its own file, which the parent shows if the rank dies.
    log = open(Path(out) / f"rank{rank}.log", "w")  # noqa: SIM115 (closed by os._exit)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    interface = loopback_interface()
    if interface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=TIMEOUT_S)
    )
    (Path(out) / f"rank{rank}.ready").touch()
    results = work(rank, Path(out))
    torch.save(results, Path(out) / f"rank{rank}.partial")
    os.replace(Path(out) / f"rank{rank}.partial", Path(out) / f"rank{rank}.pt")
    dist.barrier()  # no rank tears its connections down while a peer still uses them
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without the interpreter's teardown: gloo's background threads racing the
    # destructors at exit can abort a process whose work is already saved.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _logs(out: Path) -> str:
    parts = []
    for rank in range(WORLD):
        path = out / f"rank{rank}.log"
        text = path.read_text(errors="replace").strip() if path.exists() else ""
        parts.append(f"--- rank {rank} ---\n{text[-1500:] or '(nothing printed)'}")
    return "\n".join(parts)


def _start(out: Path, work: Work) -> None:
    """Run the workers: a Python error in a rank raises at once, and so does a rank killed by a
    signal; ranks without a process group after READY_S seconds, or unfinished after
    TIMEOUT_S, are killed and raise TimeoutError."""
    context = mp.start_processes(
        _worker,
        args=(_free_port(), str(out), work),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    start = time.monotonic()
    try:
        while not context.join(timeout=0.5):
            elapsed = time.monotonic() - start
            ready = all((out / f"rank{rank}.ready").exists() for rank in range(WORLD))
            if elapsed > TIMEOUT_S or (elapsed > READY_S and not ready):
                raise TimeoutError(f"the {WORLD} ranks were stopped after {elapsed:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


def run_ranks(tmp_path_factory: pytest.TempPathFactory, work: Work) -> Path:
    """Run ``work`` on the ranks; return the folder of their results. A Python error in a rank
    fails at once. A rank killed by a signal, or ranks past the deadline, are started again
    once; then:

    - if every rank had saved its results, the accident was in the teardown and they are used;
    - if some rank never got its process group, the machine cannot run gloo and the calling
      test is skipped, with what the ranks printed;
    - otherwise the ranks failed during their work, and the calling test fails.
    """
    for attempt in (1, 2):
        out = tmp_path_factory.mktemp(f"ranks{attempt}")
        try:
            _start(out, work)
            return out
        except (mp.ProcessExitedException, TimeoutError) as error:
            if all((out / f"rank{rank}.pt").exists() for rank in range(WORLD)):
                return out
            failure = f"{error}\n{_logs(out)}"
            started = all((out / f"rank{rank}.ready").exists() for rank in range(WORLD))
    if not started:
        pytest.skip(f"no gloo process group on this machine: {failure}")
    pytest.fail(f"the ranks died during their work: {failure}")


def load_results(out: Path) -> list[dict[str, Any]]:
    """Every rank's results, in rank order."""
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
