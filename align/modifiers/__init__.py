"""Inference-time modifiers. Inverse problems (modifiers_spec.md §2, §4, §6.1): operators, the VE
denoiser view of a backbone, DPS, CLAMP and MAP-RPS / LMAP-RPS (docs/inverse.md). Sampling-policy
modifiers behind one protocol (``sampler.modifiers``): StayFair, Symmetric attention (docs/modifiers.md)."""
from align.modifiers.clamp import CLAMP, ClampConfig
from align.modifiers.denoiser import Denoiser, GaussianDenoiser, PipelineDenoiser
from align.modifiers.dps import DPS
from align.modifiers.gmres import gmres
from align.modifiers.map_rps import STAGE2, MapRPS, Stage1Config
from align.modifiers.operators import (Blur, Downsample, Inpaint, LatentOperator, MatrixOperator, Operator,
                                       anisotropic_kernel, box_mask, gaussian_kernel, random_mask)
from align.modifiers.problem import InverseProblem, make_problem
from align.modifiers.protocol import MODIFIERS, Modifier, ModifierStack, build_modifiers, register_modifier

__all__ = ["Blur", "CLAMP", "ClampConfig", "DPS", "Denoiser", "Downsample", "GaussianDenoiser", "Inpaint",
           "InverseProblem", "LatentOperator", "MapRPS", "MatrixOperator", "Operator", "PipelineDenoiser", "STAGE2",
           "Stage1Config", "anisotropic_kernel", "box_mask", "gaussian_kernel", "gmres", "make_problem",
           "random_mask", "MODIFIERS", "Modifier", "ModifierStack", "build_modifiers", "register_modifier"]
