"""The modifier protocol: one interface for guidance/attention/transition modifiers, a registry by
name, config parsing, and composition into :class:`~align.sampling.hooks.SamplerHooks` plus an
attention-processor context (docs/modifiers.md).

A modifier may hook at four points (every default is the identity):

1. ``embeds(pipe, embeds, prompts)`` — prompt/negative embeddings after encoding (StayFair's null offset);
2. ``attention_processors(pipe, stock)`` — a ``{layer name: processor}`` dict for diffusers'
   ``set_attn_processor`` (Symmetric attention), or None;
3. ``guidance()`` / ``extra_branch(pipe)`` — the CFG combination, or a third branch with its own
   combination (FairCFG);
4. ``transition()`` — the Gaussian step (mean, std) before it is drawn (classifier guidance).

Composition order (stated, tested): embeddings hooks run in list order; attention processors are
merged per layer, and two modifiers that both change one layer is an error; at most one modifier
may replace the guidance combination; transition hooks chain in list order. Each modifier says
whether it ``changes_log_probs`` (any non-identity setting does, since π is the modified
transition); at identity settings a modifier contributes no hook at all, so the sampler is
bit-identical to the unmodified one.

Config: ``modifiers`` is a list of ``{name, args}`` items, e.g. on the command line
``'modifiers=[{name: stayfair, args: {alpha: 5}}, {name: sym_attn, args: {alpha: 1.05, beta: 3}}]'``;
the old forms ``"name"``, ``"name:{key:value}"`` and ``{name: {key: value}}`` are still read (with a
deprecation note) by :func:`align.config_lists.parse_modifiers`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence

from align.config_lists import parse_modifiers
from align.sampling.hooks import ExtraBranch, GuidanceFn, SamplerHooks, StepContext, TransitionHook, cfg_combine

MODIFIERS: dict[str, type["Modifier"]] = {}


def register_modifier(name: str) -> Callable[[type], type]:
    """Register a dataclass subclass of :class:`Modifier` under ``name``."""

    def wrap(cls: type) -> type:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"modifier {name!r} must be a dataclass (its fields are the config args)")
        cls.name = name
        MODIFIERS[name] = cls
        return cls

    return wrap


class Modifier:
    """Base class: every hook is the identity. Subclasses are dataclasses whose fields are their args."""

    name: ClassVar[str] = ""
    #: whether a non-identity setting changes the policy's step log-probs (π is the modified transition)
    changes_log_probs: ClassVar[bool] = True

    def validate(self) -> None:
        """Raise ValueError (one line, naming the arg) for bad args; called before any heavy work."""

    def is_identity(self, pipe=None) -> bool:
        return False

    def embeds(self, pipe, embeds: dict, prompts: list[str]) -> dict:
        return embeds

    def attention_processors(self, pipe, stock: dict) -> Optional[dict]:
        return None

    def guidance(self) -> Optional[GuidanceFn]:
        return None

    def extra_branch(self, pipe) -> Optional[ExtraBranch]:
        return None

    def transition(self, pipe) -> Optional[TransitionHook]:
        return None

    needs_grad: ClassVar[bool] = False


# -------------------------------------------------------------------------------- parsing
# The config items are read by the one parser, align.config_lists.parse_modifiers.


def build_modifier(name: str, args: dict) -> Modifier:
    """Instantiate and validate one registered modifier; one-line errors name the modifier and arg."""
    _load_builtin()
    if name not in MODIFIERS:
        raise ValueError(f"unknown modifier {name!r}; valid modifiers: {', '.join(sorted(MODIFIERS))}")
    cls = MODIFIERS[name]
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    bad = sorted(set(args) - set(valid))
    if bad:
        raise ValueError(f"modifier {name!r} has no arg(s) {', '.join(bad)}; valid args: {', '.join(valid)}")
    try:
        mod = cls(**args)
    except (TypeError, ValueError) as err:
        raise ValueError(f"modifier {name!r}: {err}") from None
    try:
        mod.validate()
    except ValueError as err:
        msg = str(err)
        raise ValueError(msg if msg.startswith(f"modifier {name!r}") else f"modifier {name!r}: {msg}") from None
    return mod


def build_modifiers(specs: Sequence[Any]) -> "ModifierStack":
    """Config list → validated :class:`ModifierStack` (raises before any model is loaded)."""
    return ModifierStack([build_modifier(s.name, s.args) for s in parse_modifiers(specs)])


def _load_builtin() -> None:
    """Import the modules that register the shipped modifiers (lazily, to keep imports light)."""
    import importlib

    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # a real import error inside the module: surface it
                raise


#: modules whose import registers modifiers; others append theirs here.
BUILTIN_MODULES = ["align.modifiers.stayfair", "align.modifiers.sym_attn"]


# ---------------------------------------------------------------------------- composition
@dataclasses.dataclass
class ModifierStack:
    """Modifiers in config order, composed into sampler hooks and an attention-processor context."""

    modifiers: list[Modifier] = dataclasses.field(default_factory=list)

    def active(self, pipe=None) -> list[Modifier]:
        """The modifiers that are not at their identity setting (they are the only ones that hook)."""
        return [m for m in self.modifiers if not m.is_identity(pipe)]

    def changes_log_probs(self, pipe=None) -> bool:
        return any(m.changes_log_probs for m in self.active(pipe))

    def hooks(self, pipe, prompts: Optional[list[str]] = None) -> SamplerHooks:
        """Compose the sampler hooks. ``prompts`` binds per-prompt embedding hooks (sampling); without
        it (recomputation) embeddings are taken as stored in the trajectory, already hooked."""
        mods = self.active(pipe)
        embeds_hooks = [m for m in mods if type(m).embeds is not Modifier.embeds]
        guides = [(m, g) for m, g in ((m, m.guidance()) for m in mods) if g is not None]
        branches = [(m, b) for m, b in ((m, m.extra_branch(pipe)) for m in mods) if b is not None]
        owners = {m.name for m, _ in guides} | {m.name for m, _ in branches}
        if len(guides) + len(branches) > 1:
            raise ValueError(f"modifiers {sorted(owners)} all replace the guidance combination; at most one may")
        transitions = [h for h in (m.transition(pipe) for m in mods) if h is not None]
        hooks = SamplerHooks(needs_grad=any(m.needs_grad for m in mods))
        if prompts is not None and embeds_hooks:

            def embeds(e: dict) -> dict:
                for m in embeds_hooks:
                    e = m.embeds(pipe, e, list(prompts))
                return e

            hooks.prompt_embeds = embeds
        hooks.guidance = guides[0][1] if guides else cfg_combine
        hooks.extra_branch = branches[0][1] if branches else None
        if transitions:
            hooks.transition = _chain_transitions(transitions)
        return hooks

    @contextlib.contextmanager
    def attention(self, pipe) -> Iterator[None]:
        """Install the modifiers' attention processors; restore the stock ones on exit (also on error)."""
        from align.backbones.loading import denoiser

        net = denoiser(pipe)
        stock = dict(net.attn_processors)
        merged, owner = dict(stock), {}
        for m in self.active(pipe):
            procs = m.attention_processors(pipe, stock)
            for layer, proc in (procs or {}).items():
                if proc is stock.get(layer):
                    continue
                if layer in owner:
                    raise ValueError(f"modifiers {owner[layer]!r} and {m.name!r} both change attention layer {layer}")
                owner[layer] = m.name
                merged[layer] = proc
        if not owner:
            yield
            return
        net.set_attn_processor(merged)
        try:
            yield
        finally:
            net.set_attn_processor(stock)

    def describe(self) -> list[dict]:
        """JSON-able record of the stack (name + args), e.g. for samples.json."""
        return [{"name": m.name, **dataclasses.asdict(m)} for m in self.modifiers]


def _chain_transitions(hooks: list[TransitionHook]) -> TransitionHook:
    def chained(mean, std, ctx: StepContext):
        for h in hooks:
            mean, std = h(mean, std, ctx)
        return mean, std

    return chained


# ------------------------------------------------------------------- sampler integration
def canonical_specs(specs: Sequence[Any]) -> list[dict]:
    """Config items → ``[{name, args}]`` (JSON-able; what a Trajectory records)."""
    return [dataclasses.asdict(s) for s in parse_modifiers(specs)]


def stack_for(pipe, specs: Sequence[Any]) -> ModifierStack:
    """The validated stack for ``specs`` on ``pipe``, cached on the pipeline (StayFair's direction
    is encoded once per pipeline, not per rollout)."""
    import json

    key = json.dumps(canonical_specs(specs), sort_keys=True)
    cache = pipe.__dict__.setdefault("_align_modifier_stacks", {})
    if key not in cache:
        cache[key] = build_modifiers(specs)
    return cache[key]
