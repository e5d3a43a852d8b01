"""Sampling-policy modifiers behind one protocol (``sampler.modifiers``): StayFair, Symmetric attention
(docs/modifiers.md). Inverse problems live in :mod:`align.inverse`."""

from align.modifiers.protocol import MODIFIERS, Modifier, ModifierStack, build_modifiers, register_modifier

__all__ = ["MODIFIERS", "Modifier", "ModifierStack", "build_modifiers", "register_modifier"]
