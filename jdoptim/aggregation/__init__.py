"""Aggregators (Jacobian → update) and weightings (Gramian → weights), one file per method."""

from jdoptim.aggregation._alignedmtl import AlignedMTL, AlignedMTLWeighting
from jdoptim.aggregation._bases import (
    Aggregator,
    Argument,
    GramianWeightedAggregator,
    WeightedAggregator,
    Weighting,
)
from jdoptim.aggregation._cagrad import CAGrad, CAGradWeighting
from jdoptim.aggregation._config import ConFIG
from jdoptim.aggregation._constant import Constant, ConstantWeighting
from jdoptim.aggregation._crmogm import CRMOGM, CRMOGMWeighting
from jdoptim.aggregation._dualproj import DualProj, DualProjWeighting
from jdoptim.aggregation._excessmtl import ExcessMTL, ExcessMTLWeighting
from jdoptim.aggregation._fairgrad import FairGrad, FairGradWeighting
from jdoptim.aggregation._graddrop import GradDrop
from jdoptim.aggregation._gradvac import GradVac, GradVacWeighting
from jdoptim.aggregation._imtlg import IMTLG, IMTLGWeighting
from jdoptim.aggregation._krum import Krum, KrumWeighting
from jdoptim.aggregation._mean import Mean, MeanWeighting
from jdoptim.aggregation._mgda import MGDA, MGDAWeighting
from jdoptim.aggregation._modo import MoDoWeighting
from jdoptim.aggregation._nashmtl import NashMTL, NashMTLWeighting
from jdoptim.aggregation._pcd import PCD, PCDWeighting
from jdoptim.aggregation._pcgrad import PCGrad, PCGradWeighting
from jdoptim.aggregation._random import Random, RandomWeighting
from jdoptim.aggregation._sdmgrad import SDMGradWeighting
from jdoptim.aggregation._sum import Sum, SumWeighting
from jdoptim.aggregation._trimmedmean import TrimmedMean
from jdoptim.aggregation._upgrad import UPGrad, UPGradWeighting

__all__ = [
    "CRMOGM",
    "IMTLG",
    "MGDA",
    "PCD",
    "Aggregator",
    "AlignedMTL",
    "AlignedMTLWeighting",
    "Argument",
    "CAGrad",
    "CAGradWeighting",
    "CRMOGMWeighting",
    "ConFIG",
    "Constant",
    "ConstantWeighting",
    "DualProj",
    "DualProjWeighting",
    "ExcessMTL",
    "ExcessMTLWeighting",
    "FairGrad",
    "FairGradWeighting",
    "GradDrop",
    "GradVac",
    "GradVacWeighting",
    "GramianWeightedAggregator",
    "IMTLGWeighting",
    "Krum",
    "KrumWeighting",
    "MGDAWeighting",
    "Mean",
    "MeanWeighting",
    "MoDoWeighting",
    "NashMTL",
    "NashMTLWeighting",
    "PCDWeighting",
    "PCGrad",
    "PCGradWeighting",
    "Random",
    "RandomWeighting",
    "SDMGradWeighting",
    "Sum",
    "SumWeighting",
    "TrimmedMean",
    "UPGrad",
    "UPGradWeighting",
    "WeightedAggregator",
    "Weighting",
]
