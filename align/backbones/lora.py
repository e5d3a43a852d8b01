"""LoRA adapters on the denoiser through peft, by name (``policy``, later ``critic``).

One frozen base holds several named adapters (peft multi-adapter); the active ones add up. The
reference policy is the same base with adapters disabled (:func:`adapters_disabled`). Only the
LoRA tensors of one adapter move between learner and rollout workers (:func:`lora_state_dict` /
:func:`load_lora_state_dict`).

peft's ``set_adapter`` / ``enable_adapters`` also flip ``requires_grad`` of the adapters they
touch; every function here restores the trainable set it found, so which LoRA params train is
decided only by :func:`attach_lora` and :func:`set_trainable`.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Sequence

import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from align.backbones.adapter import denoiser

DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


def attach_lora(
    pipe: DiffusionPipeline,
    adapter_name: str = "policy",
    rank: int = 4,
    alpha: float | None = None,
    target_modules: str | Sequence[str] | None = None,
    init_lora_weights: bool | str = True,
    dropout: float = 0.0,
) -> list[str]:
    """Add a LoRA adapter to the denoiser and make it the only trainable thing; returns its param names.

    The first adapter becomes the active one; later ones (e.g. ``critic``) are attached inactive,
    so the policy's forward pass stays base + ``policy`` (the critic activates its own adapter).
    peft's default init (B = 0) starts as a no-op; ``init_lora_weights=False`` makes B random.
    """
    net = denoiser(pipe)
    if adapter_name in adapter_names(pipe):
        raise ValueError(f"LoRA adapter {adapter_name!r} already exists; existing: {adapter_names(pipe)}")
    previous = active_adapters(pipe)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules or DEFAULT_TARGETS),
        init_lora_weights=init_lora_weights,
        lora_dropout=dropout,
    )
    with warnings.catch_warnings():  # "multiple adapters": intended here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        net.add_adapter(config, adapter_name=adapter_name)
    net.set_adapter(previous or [adapter_name])
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    return set_trainable(pipe, [adapter_name])


def set_trainable(pipe: DiffusionPipeline, names: Sequence[str]) -> list[str]:
    """Only the LoRA params of adapters ``names`` require grad in the denoiser; returns their names."""
    _check_known(pipe, names)
    trainable = []
    for name, param in denoiser(pipe).named_parameters():
        train = "lora_" in name and any(f".{a}." in name for a in names)
        param.requires_grad_(train)
        if train:
            trainable.append(name)
    return trainable


def adapter_names(pipe: DiffusionPipeline) -> list[str]:
    """Every adapter attached to the denoiser, in order of attachment."""
    return list(getattr(denoiser(pipe), "peft_config", None) or {})


def active_adapters(pipe: DiffusionPipeline) -> list[str]:
    """The adapters whose outputs the denoiser currently adds (``[]`` when none are attached)."""
    return list(denoiser(pipe).active_adapters()) if adapter_names(pipe) else []


def _check_known(pipe: DiffusionPipeline, names: Sequence[str]) -> None:
    missing = [n for n in names if n not in adapter_names(pipe)]
    if missing:
        raise ValueError(f"unknown LoRA adapter {missing[0]!r}; existing: {adapter_names(pipe)}")


@contextlib.contextmanager
def _keep_requires_grad(net: torch.nn.Module) -> Iterator[None]:
    """Undo peft's requires_grad side effects of the block on exit (also on exceptions)."""
    saved = [(p, p.requires_grad) for p in net.parameters()]
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def set_active_adapters(pipe: DiffusionPipeline, names: Sequence[str] | str) -> None:
    """Activate exactly the named adapters (their outputs add up); trainability is unchanged. A no-op when
    exactly these are already active (the learner asks once per trained step; peft's set_adapter walks
    every module: 5.8 ms on the toy UNet against 0.5 ms for the check)."""
    names = [names] if isinstance(names, str) else list(names)
    _check_known(pipe, names)
    if sorted(active_adapters(pipe)) == sorted(names):
        return
    net = denoiser(pipe)
    with _keep_requires_grad(net):
        net.set_adapter(names)


@contextlib.contextmanager
def adapters_active(pipe: DiffusionPipeline, names: Sequence[str] | str) -> Iterator[None]:
    """Temporarily activate exactly ``names``; the previous active set is restored on exit."""
    previous = active_adapters(pipe)
    set_active_adapters(pipe, names)
    try:
        yield
    finally:
        set_active_adapters(pipe, previous)


@contextlib.contextmanager
def adapters_disabled(pipe: DiffusionPipeline) -> Iterator[None]:
    """The reference policy: the frozen base with every adapter switched off.

    On exit each LoRA layer's enabled/disabled flag and every ``requires_grad`` is restored
    exactly, also on exceptions (peft's ``enable_adapters`` alone would make all active adapters
    trainable, and would enable adapters that were disabled before).
    """
    net = denoiser(pipe)
    layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
    was_disabled = [m.disable_adapters for m in layers]
    with _keep_requires_grad(net):
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer, disabled in zip(layers, was_disabled):
                layer.enable_adapters(not disabled)


def lora_state_dict(pipe: DiffusionPipeline, adapter_name: str = "policy") -> dict[str, torch.Tensor]:
    """Detached, contiguous copies of one adapter's LoRA tensors, keyed by module path without the
    adapter name (e.g. ``down_blocks.0.attentions.0.…to_q.lora_A.weight``); safetensors-ready."""
    _check_known(pipe, [adapter_name])
    state = get_peft_model_state_dict(denoiser(pipe), adapter_name=adapter_name)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def load_lora_state_dict(pipe: DiffusionPipeline, state: dict[str, torch.Tensor], adapter_name: str = "policy") -> None:
    """Copy tensors from :func:`lora_state_dict` into an existing adapter; keys and shapes must match."""
    expected = lora_state_dict(pipe, adapter_name)
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(
            f"LoRA state for adapter {adapter_name!r} does not match the model: {len(missing)} missing "
            f"(e.g. {missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]}); was it saved from a "
            "different backbone, target_modules or adapter?"
        )
    bad = [k for k in expected if expected[k].shape != state[k].shape]
    if bad:
        raise ValueError(
            f"LoRA state for adapter {adapter_name!r}: shape mismatch at {bad[0]}: got "
            f"{tuple(state[bad[0]].shape)}, model has {tuple(expected[bad[0]].shape)} (different rank?)"
        )
    net = denoiser(pipe)
    with _keep_requires_grad(net):
        result = set_peft_model_state_dict(net, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA state for adapter {adapter_name!r}: peft did not use keys {unexpected[:2]}")


def state_num_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of a state dict's tensors (a weight sync's payload)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def lora_num_bytes(pipe: DiffusionPipeline, adapter_name: str = "policy") -> int:
    """Size of one adapter's tensors: what a weight sync to the rollout workers sends."""
    return state_num_bytes(lora_state_dict(pipe, adapter_name))
