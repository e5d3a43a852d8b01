"""GenEval (Ghosh et al. 2023) for this project: the rule engine (``rules``), the shipped prompt set
(``data``), the detector and colour-classifier protocols with their transformers / open_clip defaults
(``models``) and the ``geneval`` reward (``reward``). Heavy libraries are imported where they are used."""

from rewards.geneval.rules import (
    GENEVAL_COLORS,
    RELATIONS,
    ColorClassifier,
    Detection,
    RuleConfig,
    Verdict,
    evaluate,
    validate_metadata,
)

__all__ = [
    "GENEVAL_COLORS",
    "RELATIONS",
    "ColorClassifier",
    "Detection",
    "RuleConfig",
    "Verdict",
    "evaluate",
    "validate_metadata",
]
