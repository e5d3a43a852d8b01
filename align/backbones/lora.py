"""LoRA adapters on the denoiser through peft, by name (``policy``, later ``critic``).

One frozen base holds several named adapters (peft multi-adapter). The reference policy is the
same base with adapters disabled (:func:`adapters_disabled`). Only the LoRA tensors of one adapter
move between learner and rollout workers (:func:`lora_state_dict` / :func:`load_lora_state_dict`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from align.backbones.loading import denoiser

DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


def attach_lora(pipe: DiffusionPipeline, adapter_name: str = "policy", rank: int = 4,
                alpha: float | None = None, target_modules: Sequence[str] | None = None,
                init_lora_weights: bool | str = True, dropout: float = 0.0) -> list[str]:
    """Add a LoRA adapter to the denoiser; freeze everything else. Returns its trainable names.

    With peft's default init (B = 0) the adapted model starts identical to the base. The first
    adapter becomes the active one; later ones (e.g. ``critic``) are attached inactive, so the
    policy's forward pass stays base + ``policy`` (the critic activates its own adapter).
    """
    net = denoiser(pipe)
    if adapter_name in _adapter_names(net):
        raise ValueError(f"LoRA adapter {adapter_name!r} already exists; existing: {sorted(_adapter_names(net))}")
    previous = list(net.active_adapters()) if _adapter_names(net) else []
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                        target_modules=list(target_modules or DEFAULT_TARGETS),
                        init_lora_weights=init_lora_weights, lora_dropout=dropout)
    net.add_adapter(config, adapter_name=adapter_name)
    set_active_adapters(pipe, previous or [adapter_name])
    for module in (pipe.vae, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
    return set_trainable(pipe, [adapter_name])


def set_trainable(pipe: DiffusionPipeline, adapter_names: Sequence[str]) -> list[str]:
    """Only the LoRA params of ``adapter_names`` require grad; returns their names."""
    names = []
    for name, param in denoiser(pipe).named_parameters():
        train = any(f".{a}." in name for a in adapter_names) and "lora_" in name
        param.requires_grad_(train)
        if train:
            names.append(name)
    return names


def _adapter_names(net: torch.nn.Module) -> set[str]:
    return set(getattr(net, "peft_config", {}) or {})


def set_active_adapters(pipe: DiffusionPipeline, names: Sequence[str] | str) -> None:
    """Activate the named adapters (their outputs add up); trainability is unchanged."""
    net = denoiser(pipe)
    names = [names] if isinstance(names, str) else list(names)
    missing = [n for n in names if n not in _adapter_names(net)]
    if missing:
        raise ValueError(f"unknown LoRA adapter {missing[0]!r}; existing: {sorted(_adapter_names(net))}")
    requires = {n: p.requires_grad for n, p in net.named_parameters()}
    net.set_adapter(names)
    for n, p in net.named_parameters():  # peft's set_adapter flips requires_grad; keep ours
        p.requires_grad_(requires[n])


@contextlib.contextmanager
def adapters_disabled(pipe: DiffusionPipeline) -> Iterator[None]:
    """The reference policy: the frozen base with every adapter switched off, restored on exit."""
    net = denoiser(pipe)
    if not _adapter_names(net):
        yield
        return
    net.disable_adapters()
    try:
        yield
    finally:
        net.enable_adapters()


def lora_state_dict(pipe: DiffusionPipeline, adapter_name: str = "policy") -> dict[str, torch.Tensor]:
    """Detached copies of one adapter's LoRA tensors, keyed without the adapter name."""
    net = denoiser(pipe)
    if adapter_name not in _adapter_names(net):
        raise ValueError(f"unknown LoRA adapter {adapter_name!r}; existing: {sorted(_adapter_names(net))}")
    state = get_peft_model_state_dict(net, adapter_name=adapter_name)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def load_lora_state_dict(pipe: DiffusionPipeline, state: dict[str, torch.Tensor],
                         adapter_name: str = "policy") -> None:
    """Load tensors from :func:`lora_state_dict` into an existing adapter; keys and shapes must match."""
    expected = lora_state_dict(pipe, adapter_name)
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"LoRA state for adapter {adapter_name!r} does not match: "
                         f"{len(missing)} missing (e.g. {missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]})")
    bad = [k for k in expected if expected[k].shape != state[k].shape]
    if bad:
        raise ValueError(f"LoRA state for adapter {adapter_name!r}: shape mismatch at {bad[0]}: "
                         f"{tuple(state[bad[0]].shape)} vs {tuple(expected[bad[0]].shape)}")
    net = denoiser(pipe)
    requires = {n: p.requires_grad for n, p in net.named_parameters()}
    result = set_peft_model_state_dict(net, state, adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"LoRA state for adapter {adapter_name!r}: unexpected keys {result.unexpected_keys[:2]}")
    for n, p in net.named_parameters():
        p.requires_grad_(requires[n])


def lora_num_bytes(pipe: DiffusionPipeline, adapter_name: str = "policy") -> int:
    return sum(t.numel() * t.element_size() for t in lora_state_dict(pipe, adapter_name).values())
