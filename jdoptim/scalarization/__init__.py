"""Loss scalarizers: methods that turn the vector of losses ``[m]`` into one scalar loss.

A scalarizer needs no Jacobian: one ordinary backward pass of its scalar gives the update, so it
costs what plain training costs. They are the baselines that Jacobian descent is compared with,
and a cheap alternative where the Jacobian is too expensive. Each is registered under
``"scalarization.<lower-cased class name>"`` (see `jdoptim.registry.list_scalarizers`), which
keeps their names apart from the aggregators ``"mean"``, ``"sum"``, ``"constant"`` and
``"random"``.

Examples:
    >>> import torch
    >>> import jdoptim
    >>> from jdoptim.scalarization import Mean
    >>> Mean()(torch.tensor([1.0, 2.0, 3.0]))
    tensor(2.)
    >>> jdoptim.build({"name": "scalarization.stch", "mu": 0.5})
    STCH(mu=0.5, weights=None, reference=None, warmup_epochs=0)
"""

from jdoptim.scalarization._bases import Scalarizer
from jdoptim.scalarization._constant import Constant
from jdoptim.scalarization._cosmos import COSMOS
from jdoptim.scalarization._dwa import DWA
from jdoptim.scalarization._famo import FAMO
from jdoptim.scalarization._geometric_mean import GeometricMean
from jdoptim.scalarization._imtll import IMTLL
from jdoptim.scalarization._mean import Mean
from jdoptim.scalarization._pbi import PBI
from jdoptim.scalarization._random import Random
from jdoptim.scalarization._stch import STCH
from jdoptim.scalarization._sum import Sum
from jdoptim.scalarization._uw import UW

__all__ = [
    "COSMOS",
    "DWA",
    "FAMO",
    "IMTLL",
    "PBI",
    "STCH",
    "UW",
    "Constant",
    "GeometricMean",
    "Mean",
    "Random",
    "Scalarizer",
    "Sum",
]
