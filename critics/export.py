"""Exports of a trained run and the critic loader (format: docs/critic_format.md).

* ``DIR/policy``: the policy LoRA in diffusers' own format (``pytorch_lora_weights.safetensors``
  with the peft ``LoraConfig`` in its safetensors metadata), so plain diffusers loads it with
  ``pipe.load_lora_weights(DIR/policy)``, alpha included.
* ``DIR/critic``: an HF-style directory, ``config.json`` + ``model.safetensors`` + ``README.md``.
  The config names the base by id *and* by a fingerprint of its denoiser weights
  (:func:`base_fingerprint`); :func:`load` refuses another base unless ``force=True``.

The critic is saved as plain safetensors + JSON rather than a diffusers ``ModelMixin``: it is not
a standalone model but heads plus a LoRA adapter on someone else's frozen base (like peft's
``adapter_config.json`` + ``adapter_model.safetensors``), and the config must carry more than
constructor arguments (base identity, normalisation, metrics).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from align import checkpoint as ckpt
from align.backbones.adapter import backbone, backbone_kind, denoiser
from align.backbones.lora import (
    active_adapters,
    adapter_names,
    attach_lora,
    load_lora_state_dict,
    lora_state_dict,
    set_active_adapters,
)
from critics.card import model_card
from critics.value_model import LatentCritic

FORMAT = "diffusion-align/latent-critic"
SCHEMA_VERSION = 1
FINGERPRINT_METHOD = "sha256/denoiser-base-state-dict/v1"
NORM_EPS = 1e-8  # RunningMeanStd.normalise: (R − mean) / (sqrt(var) + eps)


class CriticLoadError(ValueError):
    """The critic directory is malformed, newer than this code, or made for another base."""


# ------------------------------------------------------------------------------ fingerprint
def base_fingerprint(pipe) -> str:
    """``sha256:<hex>`` of the denoiser's *base* weights, independent of attached LoRA adapters.

    Keys of the denoiser's ``state_dict`` with LoRA parameters dropped and peft's ``.base_layer.``
    wrapper removed, in sorted order; per tensor the hash takes the key, dtype, shape and the raw
    bytes (CPU, contiguous). So the same weights in another dtype give another fingerprint.
    """
    state = {
        key.replace(".base_layer.", "."): t for key, t in denoiser(pipe).state_dict().items() if ".lora_" not in key
    }
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


# ---------------------------------------------------------------------------------- policy
def export_policy(pipe, out: Path, adapter: str = "policy") -> Path:
    """``adapter``'s LoRA via the pipeline class's own ``save_lora_weights`` (+ its LoraConfig as metadata)."""
    family = backbone(pipe)
    net, attr = family.net, family.denoiser_attr
    layers = get_peft_model_state_dict(net, adapter_name=adapter)
    metadata = _jsonable(net.peft_config[adapter].to_dict())
    type(pipe).save_lora_weights(out, **{f"{attr}_lora_layers": layers, f"{attr}_lora_adapter_metadata": metadata})
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj if isinstance(obj, (str, int, float, bool, type(None))) else str(obj)


# ---------------------------------------------------------------------------------- critic
def feature_layer(critic: LatentCritic) -> str:
    """The denoiser submodule the critic reads (its output; for the DiT's ``norm_out``: its input)."""
    return critic.feature_layer


def _adapter_config(pipe, adapter: str) -> dict:
    cfg = denoiser(pipe).peft_config[adapter]
    targets = cfg.target_modules
    return {
        "rank": cfg.r,
        "alpha": cfg.lora_alpha,
        "dropout": cfg.lora_dropout,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
    }


def _head_hidden(critic: LatentCritic) -> int:
    return next(iter(critic.heads.heads.values()))[0].out_features


def _head_dims(critic: LatentCritic) -> tuple[int, int]:
    """(feature channels C, timestep-embedding width D) the heads were built for: query is (C,), the
    head input is [mean pool, attention pool, temb] = 2C + D."""
    c = critic.heads.query.shape[0]
    return c, critic.heads.norm.normalized_shape[0] - 2 * c


def critic_config(
    pipe,
    critic: LatentCritic,
    base_model: str,
    reward_weights: dict[str, float],
    normalisers: dict[str, dict],
    metrics: Optional[dict] = None,
    adapter_source: str = "separate",
) -> dict:
    """The ``config.json`` of an exported critic (schema: docs/critic_format.md)."""
    missing = [n for n in critic.reward_names if n not in reward_weights or n not in normalisers]
    if missing:
        raise ValueError(f"critic export: reward {missing[0]!r} has no weight or normalisation stats")
    feat, temb = _head_dims(critic)
    rewards = []
    for name in critic.reward_names:
        norm = normalisers[name]
        rewards.append(
            {
                "name": name,
                "weight": float(reward_weights[name]),
                "norm": {
                    "mean": float(norm["mean"]),
                    "var": float(norm["var"]),
                    "count": float(norm["count"]),
                    "std": math.sqrt(float(norm["var"])),
                    "eps": NORM_EPS,
                },
            }
        )
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "base_model": {
            "id": base_model,
            "kind": backbone_kind(pipe),
            "pipeline_class": type(pipe).__name__,
            "denoiser_class": type(denoiser(pipe)).__name__,
            "dtype": str(denoiser(pipe).dtype),
            "fingerprint": base_fingerprint(pipe),
            "fingerprint_method": FINGERPRINT_METHOD,
        },
        "adapter": {"source": adapter_source, **_adapter_config(pipe, critic.adapter)},
        "feature_layer": feature_layer(critic),
        "heads": {
            "class": type(critic.heads).__name__,
            "names": list(critic.reward_names),
            "feature_dim": feat,
            "temb_dim": temb,
            "hidden": _head_hidden(critic),
        },
        "value_units": "normalised return: V_k ≈ (R_k − norm.mean) / (norm.std + norm.eps)",
        "rewards": rewards,
        "metrics": metrics or {},
    }


def export_critic(pipe, critic: LatentCritic, out: Path, **config_kwargs) -> dict:
    """Write ``config.json``, ``model.safetensors`` (``heads.*`` + ``lora.*``) and ``README.md``."""
    config = critic_config(pipe, critic, **config_kwargs)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"heads.{k}": v for k, v in critic.heads.state_dict().items()}
    tensors.update({f"lora.{k}": v for k, v in lora_state_dict(pipe, critic.adapter).items()})
    save_file(
        {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt", "critic_format": FORMAT, "schema_version": str(SCHEMA_VERSION)},
    )
    ckpt.write_json(out / "config.json", config)
    (out / "README.md").write_text(model_card(config))
    return config


_EXPORT_ENTRIES = {"policy", "critic", "export.json"}


def export_pipeline(
    pipe,
    critic: Optional[LatentCritic],
    out: str | Path,
    *,
    base_model: str,
    reward_weights: dict[str, float],
    normalisers: dict[str, dict],
    metrics: Optional[dict] = None,
    adapter_source: str = "separate",
    policy_adapter: str = "policy",
) -> Path:
    """Write ``out/policy`` (diffusers LoRA) and, given a critic, ``out/critic``; atomically.

    An existing ``out`` is replaced only if it holds nothing but a previous export.
    """
    out = Path(out)
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir()) if out.is_dir() else [out.name]
        foreign = [n for n in foreign if n not in _EXPORT_ENTRIES]
        if foreign:
            raise FileExistsError(
                f"export: {out} exists and holds {foreign[:3]}, not a previous export; "
                "choose an empty or new --out directory"
            )
    with ckpt.atomic_directory(out) as tmp:
        export_policy(pipe, tmp / "policy", policy_adapter)
        if critic is not None:
            export_critic(
                pipe,
                critic,
                tmp / "critic",
                base_model=base_model,
                reward_weights=reward_weights,
                normalisers=normalisers,
                metrics=metrics,
                adapter_source=adapter_source,
            )
        ckpt.write_json(
            tmp / "export.json",
            {
                "format": "diffusion-align/export",
                "schema_version": SCHEMA_VERSION,
                "policy": "policy",
                "critic": "critic" if critic is not None else None,
            },
        )
    return out


# ------------------------------------------------------------------------------------ load
@dataclasses.dataclass
class LoadedCritic:
    """An exported critic attached to a pipeline: V_k(x_t, t, c) in normalised units, the run's
    reward weights w_k and normalisation stats, and a count of evaluated rows (for cost reports)."""

    module: LatentCritic
    weights: torch.Tensor  # (K,) w_k from the run (overridable per call)
    norm_mean: torch.Tensor  # (K,)
    norm_std: torch.Tensor  # (K,) sqrt(var) + eps
    config: dict
    directory: str
    rows: int = 0  # x_t rows evaluated so far

    @property
    def reward_names(self) -> list[str]:
        return self.module.reward_names

    def values(self, x_t: torch.Tensor, timestep: torch.Tensor, embeds: dict) -> torch.Tensor:
        """(B, K) values; ``embeds`` holds the conditional ``prompt_embeds`` (+ ``pooled_prompt_embeds``)."""
        self.rows += x_t.shape[0]
        return self.module(x_t, timestep, embeds)

    def predicted_rewards(self, values: torch.Tensor) -> torch.Tensor:
        """Values back in reward units: R̂_k = V_k · std_k + mean_k."""
        return values * self.norm_std.to(values) + self.norm_mean.to(values)

    def weights_with(self, overrides: Sequence = ()) -> torch.Tensor:
        """w_k with overrides ``[{name, weight}]`` (or the old ``name:weight``; align/config_lists.py reads
        both); an unknown name lists the critic's heads."""
        from align.config_lists import parse_rewards

        w = self.weights.clone()
        for spec in parse_rewards(overrides, where="steering.weights"):
            if spec.name not in self.reward_names:
                raise ValueError(
                    f"steering.weights: {spec.name!r} is not a head of the critic {self.directory}; "
                    f"heads: {self.reward_names}"
                )
            w[self.reward_names.index(spec.name)] = spec.weight
        return w


def read_config(directory: str | Path) -> dict:
    """``config.json`` of an exported critic, checked for format and schema version."""
    path = Path(directory) / "config.json"
    if not path.is_file() or not (Path(directory) / "model.safetensors").is_file():
        raise CriticLoadError(
            f"critic {directory}: needs config.json and model.safetensors (an `align export` critic directory)"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CriticLoadError(f"critic {directory}: {path} is truncated or not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        config = config if isinstance(config, dict) else {}
        raise CriticLoadError(
            f"critic {directory}: config.json format is {config.get('format')!r}, expected {FORMAT!r}"
        )
    version = config.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise CriticLoadError(
            f"critic {directory}: schema_version {version!r} is not supported by this code "
            f"(supports <= {SCHEMA_VERSION}); upgrade diffusion-align"
        )
    return config


def check_base(config: dict, pipe, directory: str | Path, force: bool = False) -> str:
    """The pipeline's fingerprint; a :class:`CriticLoadError` naming both fingerprints on mismatch
    (unless ``force``). A different backbone kind is refused even with ``force``."""
    base = config.get("base_model")
    if not isinstance(base, dict) or not {"kind", "id", "fingerprint"} <= set(base):
        raise CriticLoadError(f"critic {directory}: config.json has no complete base_model (kind, id, fingerprint)")
    kind = backbone_kind(pipe)
    if base["kind"] != kind:
        raise CriticLoadError(
            f"critic {directory} was trained on a {base['kind']} backbone ({base['id']}); "
            f"this pipeline is a {kind} ({type(pipe).__name__}): cannot load it, even with force"
        )
    actual = base_fingerprint(pipe)
    if actual != base["fingerprint"] and not force:
        raise CriticLoadError(
            f"critic {directory} was trained on base {base['id']!r} with fingerprint "
            f"{base['fingerprint']}, but this pipeline's {type(denoiser(pipe)).__name__} has "
            f"fingerprint {actual}; load it onto the same base weights, or pass force=True "
            "(--force) for a deliberate transfer"
        )
    return actual


def load(directory: str | Path, pipe, force: bool = False, adapter_name: str = "critic") -> LoadedCritic:
    """Attach an exported critic to ``pipe`` (its LoRA as adapter ``adapter_name``, inactive for
    sampling) and return it; see :func:`check_base` for the base check."""
    config = read_config(directory)
    check_base(config, pipe, directory, force)
    heads_cfg, adapter_cfg = config["heads"], config["adapter"]
    if adapter_name in adapter_names(pipe):
        raise CriticLoadError(
            f"critic {directory}: the pipeline already has a LoRA adapter {adapter_name!r}; pass another adapter_name"
        )
    weights = Path(directory) / "model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError (or OSError) on a cut-off file
        raise CriticLoadError(
            f"critic {directory}: {weights} is truncated or corrupt "
            f"({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        ) from None
    heads = {k[len("heads.") :]: v for k, v in tensors.items() if k.startswith("heads.")}
    lora = {k[len("lora.") :]: v for k, v in tensors.items() if k.startswith("lora.")}
    try:
        module = LatentCritic(
            pipe,
            heads_cfg["names"],
            adapter=adapter_name,
            hidden=heads_cfg["hidden"],
            feature_layer=config["feature_layer"],
        )
        module.heads.load_state_dict(heads)
    except (RuntimeError, ValueError, TypeError) as err:
        raise CriticLoadError(
            f"critic {directory}: its heads (feature layer {config['feature_layer']!r}) do not fit "
            f"this backbone: {str(err).splitlines()[0]}"
        ) from None
    previous = active_adapters(pipe)
    attach_lora(
        pipe,
        adapter_name,
        rank=adapter_cfg["rank"],
        alpha=adapter_cfg["alpha"],
        target_modules=adapter_cfg["target_modules"],
        dropout=adapter_cfg.get("dropout", 0.0),
    )
    try:
        set_active_adapters(pipe, previous)  # attaching the first adapter would make it the sampling one
        load_lora_state_dict(pipe, lora, adapter_name)
    except ValueError as err:
        denoiser(pipe).delete_adapters(adapter_name)
        raise CriticLoadError(f"critic {directory}: {err}") from None
    # requires_grad stays as in training (heads and the critic's LoRA: True): on CPU, linear layers
    # with frozen weights take another kernel path whose results differ in the last bit.
    module.eval()
    rewards = config["rewards"]
    return LoadedCritic(
        module=module,
        weights=torch.tensor([r["weight"] for r in rewards], dtype=torch.float32),
        norm_mean=torch.tensor([r["norm"]["mean"] for r in rewards], dtype=torch.float32),
        norm_std=torch.tensor(
            [r["norm"]["std"] + r["norm"].get("eps", NORM_EPS) for r in rewards], dtype=torch.float32
        ),
        config=config,
        directory=str(directory),
    )
