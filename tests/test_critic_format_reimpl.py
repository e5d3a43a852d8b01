"""docs/critic_format.md is enough to recompute a critic's values from its files alone.

A script written from the document (``_FROM_THE_DOC``) runs in a process that cannot import any
project code: it reads ``config.json`` and ``model.safetensors`` directly, loads the base with plain
diffusers, attaches the LoRA with peft, taps the feature layer with diffusers' own hook registry
and evaluates the heads with torch.nn.functional. Its values must equal ``critics.load``'s to 1e-6
(float32 round-off of the same operations), for the UNet and the DiT, for both adapter sources.
The base fingerprint is recomputed the same way, from the document's string forms.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

PROJECT_ROOT = Path(__file__).resolve().parents[1]

_FROM_THE_DOC = r"""
import hashlib, json, math, os, sys
ROOT = {root!r}
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != ROOT]
import torch
import torch.nn.functional as F
import diffusers
from diffusers.hooks import HookRegistry, ModelHook
from peft import LoraConfig, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
for name in list(sys.modules):
    assert not name.startswith(("align", "critics", "rewards")), name

def recompute(critic_dir, base_dir, inputs_path, out_path):
  config = json.load(open(os.path.join(critic_dir, "config.json")))
  tensors = load_file(os.path.join(critic_dir, "model.safetensors"))
  base = config["base_model"]
  # only the denoiser is needed: the text states come with the inputs
  net = getattr(diffusers, base["denoiser_class"]).from_pretrained(
      base_dir, subfolder="unet" if base["kind"] == "unet" else "transformer")
  assert str(net.dtype) == base["dtype"]

  # the fingerprint, before any adapter wraps the layers
  digest = hashlib.sha256()
  state = net.state_dict()
  for key in sorted(state):
      t = state[key].detach().to("cpu").contiguous()
      digest.update(f"{{key}}|{{t.dtype}}|{{tuple(t.shape)}}|".encode())
      digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
  fingerprint = "sha256:" + digest.hexdigest()

  # the critic's LoRA: a peft adapter, alone active during the critic's pass
  ad = config["adapter"]
  net.add_adapter(LoraConfig(r=ad["rank"], lora_alpha=ad["alpha"], target_modules=ad["target_modules"],
                             lora_dropout=ad["dropout"]), adapter_name="reimpl")
  result = set_peft_model_state_dict(net, {{k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")}},
                                     adapter_name="reimpl")
  assert not getattr(result, "unexpected_keys", None)
  net.set_adapter("reimpl")
  net.eval()

  inputs = load_file(inputs_path)
  x_t, t = inputs["x_t"], inputs["t"].expand(inputs["x_t"].shape[0])
  seen = {{}}

  class Stop(Exception):
      pass

  class Output(ModelHook):
      def __init__(self, key, stop):
          super().__init__()
          self.key, self.stop = key, stop
      def post_forward(self, module, output):
          seen[self.key] = output
          if self.stop:
              raise Stop
          return output

  class NormOutInput(ModelHook):
      def pre_forward(self, module, *args, **kwargs):
          seen["tokens"], seen["temb"] = args[0], args[1]
          raise Stop

  layer = config["feature_layer"]
  if base["kind"] == "unet":
      HookRegistry.check_if_exists_or_initialize(net.time_embedding).register_hook(Output("temb", False), "temb")
      HookRegistry.check_if_exists_or_initialize(net.get_submodule(layer)).register_hook(Output("block", True), "feat")
  else:
      assert layer == "norm_out"
      HookRegistry.check_if_exists_or_initialize(net.norm_out).register_hook(NormOutInput(), "feat")
  with torch.no_grad():
      try:
          if base["kind"] == "unet":
              net(x_t, t, encoder_hidden_states=inputs["prompt_embeds"], return_dict=False)
          else:
              net(hidden_states=x_t, timestep=t, encoder_hidden_states=inputs["prompt_embeds"],
                  pooled_projections=inputs["pooled_prompt_embeds"], return_dict=False)
      except Stop:
          pass
      if base["kind"] == "unet":
          seen["tokens"] = seen["block"].flatten(2).transpose(1, 2)       # (B, h*w, C), row-major
      tokens, temb = seen["tokens"].float(), seen["temb"].float()
      heads = config["heads"]
      C, D = heads["feature_dim"], heads["temb_dim"]
      q = tensors["heads.query"]
      assert tokens.shape[-1] == C == q.numel() and temb.shape[-1] == D
      weights = torch.softmax(tokens @ q / math.sqrt(C), dim=1)          # attention pool, scaled by 1/sqrt(C)
      pooled = torch.cat([tokens.mean(dim=1), (weights[..., None] * tokens).sum(dim=1), temb], dim=-1)
      h = F.layer_norm(pooled, (2 * C + D,), tensors["heads.norm.weight"], tensors["heads.norm.bias"], eps=1e-5)
      values = []
      for name in heads["names"]:
          p = f"heads.heads.{{name}}."
          hidden = F.silu(F.linear(h, tensors[p + "0.weight"], tensors[p + "0.bias"]))
          values.append(F.linear(hidden, tensors[p + "2.weight"], tensors[p + "2.bias"]))
      values = torch.cat(values, dim=-1)
  save_file({{"values": values.contiguous()}}, out_path, metadata={{"fingerprint": fingerprint}})

for job in json.load(open(sys.argv[1])):
    recompute(*job)
"""


def _trained_like(preset: str, adapter: str):
    """A tiny pipeline with non-trivial policy and critic adapters and random heads (as after training)."""
    from align.backbones import attach_lora, build_pipeline
    from critics.value_model import LatentCritic, critic_target_modules

    pipe = build_pipeline(f"preset:{preset}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        attach_lora(pipe, "policy", rank=4, alpha=2.0, init_lora_weights=False)
        name = "policy"
        if adapter == "separate":
            attach_lora(
                pipe, "critic", rank=2, alpha=3.0, target_modules=critic_target_modules(pipe), init_lora_weights=False
            )
            name = "critic"
        critic = LatentCritic(pipe, ["toy_geneval", "jpeg_compressibility"], adapter=name, hidden=16)
        with torch.no_grad():
            critic.heads.query.normal_()
            critic.heads.norm.weight.uniform_(0.5, 1.5)
            critic.heads.norm.bias.normal_(std=0.1)
    return pipe, critic


CASES = [("tiny-unet", "separate"), ("tiny-unet", "shared"), ("tiny-dit", "separate")]


def _export_case(root: Path, preset: str, adapter: str) -> dict:
    """Base dir, exported critic, fixed inputs and critics.load's values for one case."""
    import critics
    from align.backbones import build_pipeline, denoiser
    from align.sampling import encode_prompts

    case = root / f"{preset}-{adapter}"
    base = build_pipeline(f"preset:{preset}")
    base.save_pretrained(case / "base")
    pipe, critic = _trained_like(preset, adapter)
    out = critics.export_pipeline(
        pipe,
        critic,
        case / "export",
        base_model=f"preset:{preset}",
        reward_weights={"toy_geneval": 1.0, "jpeg_compressibility": 0.5},
        normalisers={n: {"mean": 0.0, "var": 1.0, "count": 1.0} for n in critic.reward_names},
        adapter_source=adapter,
    )
    net = denoiser(base)
    x_t = torch.randn(
        3,
        net.config.in_channels,
        net.config.sample_size,
        net.config.sample_size,
        generator=torch.Generator().manual_seed(2),
    )
    with torch.no_grad():
        embeds = encode_prompts(base, ["two red circles", "a blue square", "three green triangles"])
    t = torch.tensor(601) if preset == "tiny-unet" else torch.tensor(687.5)  # a DDIM step / 1000·σ of a flow step
    inputs = {"x_t": x_t, "t": t, "prompt_embeds": embeds["prompt_embeds"]}
    if embeds.get("pooled_prompt_embeds") is not None:
        inputs["pooled_prompt_embeds"] = embeds["pooled_prompt_embeds"]
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(case / "inputs.safetensors"))
    loaded = critics.load(out / "critic", build_pipeline(f"preset:{preset}"))
    with torch.no_grad():
        ours = loaded.values(x_t, t, {k: v for k, v in inputs.items() if k not in ("x_t", "t")})
    return {
        "dirs": [
            str(out / "critic"),
            str(case / "base"),
            str(case / "inputs.safetensors"),
            str(case / "values.safetensors"),
        ],
        "ours": ours,
    }


@pytest.fixture(scope="module")
def recomputed(tmp_path_factory):
    """Every case exported here, then recomputed by one isolated process (one torch/diffusers import)."""
    root = tmp_path_factory.mktemp("critic_reimpl")
    cases = {case: _export_case(root, *case) for case in CASES}
    (root / "jobs.json").write_text(json.dumps([c["dirs"] for c in cases.values()]))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", _FROM_THE_DOC.format(root=str(PROJECT_ROOT)), str(root / "jobs.json")],
        cwd=root,
        env={**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cases


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_values_recomputed_from_the_documented_format_equal_critics_load(case, recomputed):
    from safetensors import safe_open

    critic_dir, _, _, values_path = recomputed[case]["dirs"]
    with safe_open(values_path, framework="pt") as f:
        fingerprint = f.metadata()["fingerprint"]
    theirs, ours = load_file(values_path)["values"], recomputed[case]["ours"]
    config = json.loads((Path(critic_dir) / "config.json").read_text())
    assert fingerprint == config["base_model"]["fingerprint"]  # the documented string forms
    assert ours.shape == theirs.shape == (3, 2) and float(ours.std()) > 1e-3  # values that vary
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)
