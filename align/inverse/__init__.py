"""Inverse problems (docs/inverse.md): operators, the VE denoiser view of a backbone, DPS, CLAMP,
MAP-RPS / LMAP-RPS, GMRES, image metrics and the ``align solve`` driver (:mod:`align.inverse.solve`)."""

from align.inverse.clamp import CLAMP, ClampConfig
from align.inverse.denoiser import Denoiser, GaussianDenoiser, PipelineDenoiser
from align.inverse.dps import DPS
from align.inverse.gmres import gmres
from align.inverse.map_rps import STAGE2, MapRPS, Stage1Config
from align.inverse.operators import (
    Blur,
    Downsample,
    Inpaint,
    LatentOperator,
    MatrixOperator,
    Operator,
    anisotropic_kernel,
    box_mask,
    gaussian_kernel,
    random_mask,
)
from align.inverse.problem import InverseProblem, make_problem

__all__ = [
    "Blur",
    "CLAMP",
    "ClampConfig",
    "DPS",
    "Denoiser",
    "Downsample",
    "GaussianDenoiser",
    "Inpaint",
    "InverseProblem",
    "LatentOperator",
    "MapRPS",
    "MatrixOperator",
    "Operator",
    "PipelineDenoiser",
    "STAGE2",
    "Stage1Config",
    "anisotropic_kernel",
    "box_mask",
    "gaussian_kernel",
    "gmres",
    "make_problem",
    "random_mask",
]
