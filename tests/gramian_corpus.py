"""The corpus of Gramians from real training runs (``tests/data/gramian_corpus.npz``).

`tests/benchmarks/make_gramian_corpus.py` writes it. Each Gramian is the float32 matrix handed
to UPGrad's weighting during a run of one of the examples' setups without label smoothing, as
produced (not symmetrised, not made PSD); its source is recorded with it.

The file stores, for ``k`` matrices: ``sizes`` (``[k]``, each ``m``), ``values`` (float32, the
matrices' entries one after another, row-major), ``sources`` (the setup), ``epochs`` and
``steps`` (where in the run), ``failed`` (whether the solver of the time raised or returned
non-finite weights on it, so that the matrices that once failed stay identifiable).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CORPUS_PATH = Path(__file__).parent / "data" / "gramian_corpus.npz"


@dataclass(frozen=True)
class CorpusGramian:
    """One Gramian of the corpus and where it comes from."""

    gramian: np.ndarray
    source: str
    epoch: int
    step: int
    failed: bool

    @property
    def name(self) -> str:
        return f"{self.source}-e{self.epoch}-s{self.step}"


def save_corpus(path: Path, gramians: list[CorpusGramian]) -> None:
    """Write ``gramians`` (float32) to ``path`` in the compressed format described above."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        sizes=np.array([g.gramian.shape[0] for g in gramians], dtype=np.int32),
        values=np.concatenate([g.gramian.astype(np.float32).ravel() for g in gramians]),
        sources=np.array([g.source for g in gramians]),
        epochs=np.array([g.epoch for g in gramians], dtype=np.int32),
        steps=np.array([g.step for g in gramians], dtype=np.int32),
        failed=np.array([g.failed for g in gramians], dtype=bool),
    )


def load_corpus(path: Path = CORPUS_PATH) -> list[CorpusGramian]:
    """Read the corpus: the float32 Gramians with their sources, in the stored order."""
    with np.load(path) as data:
        sizes = data["sizes"]
        ends = np.cumsum(sizes.astype(np.int64) ** 2)
        values = data["values"]
        return [
            CorpusGramian(
                gramian=values[end - int(m) ** 2 : end].reshape(int(m), int(m)),
                source=str(source),
                epoch=int(epoch),
                step=int(step),
                failed=bool(failed),
            )
            for m, end, source, epoch, step, failed in zip(
                sizes,
                ends,
                data["sources"],
                data["epochs"],
                data["steps"],
                data["failed"],
                strict=True,
            )
        ]
