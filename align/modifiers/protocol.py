"""The modifier protocol: the one way to hook the sampler. One interface for embedding, guidance,
attention and transition modifiers (StayFair, symmetric attention, critic steering), a registry by
name, config parsing, and composition into :class:`~align.sampling.hooks.SamplerHooks` plus an
attention-processor context (docs/modifiers.md).

A modifier may hook at four points (every default is the identity):

1. ``embeds(pipe, embeds, prompts)`` — prompt/negative embeddings after encoding (StayFair's null offset);
2. ``attention_processors(pipe, stock)`` — a ``{layer name: processor}`` dict for diffusers'
   ``set_attn_processor`` (Symmetric attention), or None;
3. ``guidance()`` / ``extra_branch(pipe)`` — the CFG combination, or a third branch with its own
   combination (FairCFG);
4. ``transition(pipe)`` — the Gaussian step (mean, std) before it is drawn (classifier guidance,
   critic steering μ ← μ + s ∇V).

Composition order (stated, tested): embeddings hooks run in list order; attention processors are
merged per layer, and two modifiers that both change one layer is an error; at most one modifier
may replace the guidance combination; transition hooks chain in list order. Each modifier says
whether it ``changes_log_probs`` (any non-identity setting does, since π is the modified
transition); at identity settings a modifier contributes no hook at all, so the sampler is
bit-identical to the unmodified one. A modifier with ``stock_attention`` (a critic evaluated on the
shared denoiser) runs its transition hook with the stock attention processors.

The caller builds the stack (:func:`build_modifiers` from config, :meth:`ModifierStack.extended` for
modifiers made in code, such as steering) and hands it to the sampler; nothing is cached on the
pipeline. ``ModifierStack.specs`` are the config items it was built from: what a trajectory records
so that ``recompute_log_probs`` can rebuild the policy.

Config: ``modifiers`` is a list of ``{name, args}`` items, e.g. on the command line
``'modifiers=[{name: stayfair, args: {alpha: 5}}, {name: sym_attn, args: {alpha: 1.05, beta: 3}}]'``;
the old forms ``"name"``, ``"name:{key:value}"`` and ``{name: {key: value}}`` are still read (with a
deprecation note) by :func:`align.config_lists.parse_modifiers`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence

from align.config import ConfigError
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
    #: whether the sampler needs autograd (``no_grad`` instead of ``inference_mode``) for its hooks
    needs_grad: ClassVar[bool] = False
    #: whether its transition hook runs with the stock attention processors (a critic on the shared
    #: denoiser reads the features it was trained on, not those of the stack's processors)
    stock_attention: ClassVar[bool] = False

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

    def spec(self) -> dict:
        """``{name, args}`` of its init fields (shallow: args may hold live objects, e.g. a critic)."""
        return {"name": self.name, "args": {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}}


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
    """Config list → validated :class:`ModifierStack` recording ``specs`` (raises before any model is loaded)."""
    parsed = parse_modifiers(specs)
    return ModifierStack([build_modifier(s.name, s.args) for s in parsed], [dataclasses.asdict(s) for s in parsed])


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
    """Modifiers in order, composed into sampler hooks and an attention-processor context.

    ``specs``: the config items (``[{name, args}]``) the stack was built from, what a trajectory
    records; modifiers added in code (:meth:`extended`, e.g. critic steering) are not recorded."""

    modifiers: list[Modifier] = dataclasses.field(default_factory=list)
    specs: list[dict] = dataclasses.field(default_factory=list)
    #: (denoiser, stock, merged processors) while :meth:`attention` has installed processors
    _installed: Optional[tuple] = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def extended(self, *modifiers: Modifier) -> "ModifierStack":
        """A new stack: these modifiers, then ``modifiers`` (same instances, same ``specs``)."""
        return ModifierStack([*self.modifiers, *modifiers], [dict(s) for s in self.specs])

    def active(self, pipe=None) -> list[Modifier]:
        """The modifiers that are not at their identity setting (they are the only ones that hook)."""
        return [m for m in self.modifiers if not m.is_identity(pipe)]

    def changes_log_probs(self, pipe=None) -> bool:
        return any(m.changes_log_probs for m in self.active(pipe))

    def hooks(self, pipe, prompts: Optional[list[str]] = None) -> SamplerHooks:
        """Compose the sampler hooks. ``prompts`` binds per-prompt embedding hooks (sampling); without
        it (recomputation) embeddings are taken as stored in the trajectory, already hooked. Two
        guidance replacements are a one-line :class:`ConfigError` (as are two claims on one attention
        layer, in :meth:`attention`)."""
        mods = self.active(pipe)
        embeds_hooks = [m for m in mods if type(m).embeds is not Modifier.embeds]
        guides = [(m, g) for m, g in ((m, m.guidance()) for m in mods) if g is not None]
        branches = [(m, b) for m, b in ((m, m.extra_branch(pipe)) for m in mods) if b is not None]
        owners = {m.name for m, _ in guides} | {m.name for m, _ in branches}
        if len(guides) + len(branches) > 1:
            raise ConfigError(f"modifiers {sorted(owners)} all replace the guidance combination; at most one may")
        transitions = [h for h in (self._transition(m, pipe) for m in mods) if h is not None]
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

    def _transition(self, m: Modifier, pipe) -> Optional[TransitionHook]:
        """``m``'s transition hook, run under :meth:`stock_attention` if ``m`` asks for it."""
        hook = m.transition(pipe)
        if hook is None or not m.stock_attention:
            return hook

        def with_stock(mean, std, ctx: StepContext):
            with self.stock_attention():
                return hook(mean, std, ctx)

        return with_stock

    @contextlib.contextmanager
    def attention(self, pipe) -> Iterator[None]:
        """Install the modifiers' attention processors; restore the stock ones on exit (also on error)."""
        mods = self.active(pipe)
        if not mods:
            yield
            return
        from align.backbones.adapter import denoiser

        net = denoiser(pipe)
        stock = dict(net.attn_processors)
        merged, owner = dict(stock), {}
        for m in mods:
            procs = m.attention_processors(pipe, stock)
            for layer, proc in (procs or {}).items():
                if proc is stock.get(layer):
                    continue
                if layer in owner:
                    raise ConfigError(f"modifiers {owner[layer]!r} and {m.name!r} both change attention layer {layer}")
                owner[layer] = m.name
                merged[layer] = proc
        if not owner:
            yield
            return
        net.set_attn_processor(dict(merged))  # diffusers pops the dict's entries: pass copies
        self._installed = (net, stock, merged)
        try:
            yield
        finally:
            self._installed = None
            net.set_attn_processor(dict(stock))

    @contextlib.contextmanager
    def stock_attention(self) -> Iterator[None]:
        """Inside :meth:`attention`: the stock processors for the block, then the stack's again;
        elsewhere a no-op."""
        if self._installed is None:
            yield
            return
        net, stock, merged = self._installed
        net.set_attn_processor(dict(stock))
        try:
            yield
        finally:
            net.set_attn_processor(dict(merged))

    def describe(self) -> list[dict]:
        """The stack as ``[{name, args}]`` (every init field; e.g. for a log)."""
        return [m.spec() for m in self.modifiers]


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
