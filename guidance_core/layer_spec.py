"""Which self-attention layers a guidance node acts on: the `layers` / `layer` input, parsed,
validated against the model, and explained in one place.

A UNet's self-attention sites are the ``attn1`` of every transformer block of every
SpatialTransformer. The host names a site ``(block, block_id, transformer_index)``, e.g.
``("middle", 0, 0)``; users bring three other spellings, all accepted here (comma-separated, mixed
freely):

- diffusers module paths, as in ``pag_applied_layers``: ``mid``, ``down_blocks.1``,
  ``up_blocks.0.attentions.1``, ``mid_block.attentions.0.transformer_blocks.3``. A path matches
  whole dot-separated components of a site's full name
  (``down_blocks.1.attentions.0.transformer_blocks.0.attn1``), anywhere in it, so ``blocks.1`` can
  never select ``blocks.10`` (diffusers#13594). ``mid``, ``down`` and ``up`` stand for
  ``mid_block``, ``down_blocks`` and ``up_blocks``.
- the older diffusers form its docs still show: ``down.block_2``, ``up.block_1.attentions_0``.
- the index syntax of the PAG paper's SD pipeline and of sd-perturbed-attention: ``d``/``m``/``u``
  count the attention modules of the down, mid and up path in order (d0-d5, m0, u0-u8 on a UNet with six
  down and nine up attention modules), an optional ``.k`` picks transformer block k inside one (``m0.4``),
  and both take ranges:
  ``d0-3`` (or ``d0-d3``), ``d2.2-9``.
- the host's own block names: ``middle.0``, ``input.4``, ``output.3.1``.

DiT models have transformer blocks instead: ``DiTLayout`` at the end of this file (``joint.13``,
``double.7``, ``single.20``, diffusers' ``transformer_blocks.13``); the model family registry
(``patching/families``) gives each family's block kinds and their module names.

Every layout carries its family's default choice per method (``default_layers(Method.PAG)``, with
``default_source``), which the nodes' default input ``auto`` stands for.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping, Sequence

_DIFFUSERS_PATH = {"input": "down_blocks", "middle": "mid_block", "output": "up_blocks"}
_INDEX_LETTER = {"input": "d", "middle": "m", "output": "u"}
_LETTER_BLOCK = {v: k for k, v in _INDEX_LETTER.items()}
_PATH_ALIASES = {"mid": "mid_block", "down": "down_blocks", "up": "up_blocks"}

_INDEX_RE = re.compile(r"^([dmu])(\d+)(?:-[dmu]?(\d+))?(?:\.(\d+)(?:-(\d+))?)?$")
_OLD_DIFFUSERS_RE = re.compile(r"^(down|mid|up)\.block_(\d+)(?:\.attentions_(\d+))?$")
_HOST_RE = re.compile(r"^(input|middle|output)\.(\d+)(?:\.(\d+))?$")
_PATH_RE = re.compile(r"^[a-z_]+[a-z_0-9]*(?:\.[a-z_0-9]+)*$")


class LayerSpecError(ValueError):
    """A layer spec that names nothing in this model, or cannot be read."""


@dataclass(frozen=True)
class AttentionModule:
    """One SpatialTransformer of a UNet: where it sits and how many transformer blocks it holds.

    ``level`` and ``position`` are diffusers' ``down_blocks.<level>.attentions.<position>``
    (``up_blocks`` for the output path, ``mid_block.attentions.0`` for the middle).
    """

    block: str  # "input" | "middle" | "output"
    block_id: int  # index into the host's input_blocks / output_blocks (0 for the middle)
    level: int
    position: int
    depth: int  # transformer blocks inside


@dataclass(frozen=True)
class AttentionSite:
    """One self-attention (attn1) of one transformer block."""

    module: AttentionModule
    module_index: int  # n in the index syntax (d<n>, m<n>, u<n>)
    transformer_index: int

    @property
    def host_key(self) -> tuple[str, int, int]:
        return (self.module.block, self.module.block_id, self.transformer_index)

    @property
    def module_path(self) -> str:
        m = self.module
        if m.block == "middle":
            return "mid_block.attentions.0"
        return f"{_DIFFUSERS_PATH[m.block]}.{m.level}.attentions.{m.position}"

    @property
    def diffusers_name(self) -> str:
        return f"{self.module_path}.transformer_blocks.{self.transformer_index}.attn1"

    @property
    def index_name(self) -> str:
        return f"{_INDEX_LETTER[self.module.block]}{self.module_index}.{self.transformer_index}"


def select_sites(spec: str, sites: list, match, empty_message: str, missing_message) -> list:
    """Comma-separated entries of ``spec`` -> the union of ``match(entry)``, in the order of ``sites``.

    An empty spec raises ``empty_message``; an entry that matches nothing raises
    ``missing_message(entry)``. Both name what the model has.
    """
    entries = [e.strip() for e in (spec or "").split(",")]
    entries = [e for e in entries if e]
    if not entries:
        raise LayerSpecError(empty_message)
    chosen = set()
    for entry in entries:
        matched = match(entry)
        if not matched:
            raise LayerSpecError(missing_message(entry))
        chosen.update(matched)
    return [s for s in sites if s in chosen]


# The node input that stands for the family's default layers.
AUTO = "auto"


class Method(str, Enum):
    """A guidance method, as far as its layers are concerned: each family has a default per method."""

    PAG = "pag"
    SEG = "seg"
    SAG = "sag"


# Methods without a default of their own use another method's: SEG perturbs attention where PAG does.
_DEFAULT_FALLBACK = {Method.SEG: Method.PAG}
# The nodes' default specs before 'auto' (0.1.0), which saved workflows keep: on a UNet they are the
# UNet defaults; on a DiT they never named a block, so there they stand for the family's default.
LEGACY_DEFAULTS = {Method.PAG: "mid", Method.SAG: "m0.0"}


@dataclass(frozen=True, kw_only=True)
class LayerDefault:
    """A family's default layer spec for one method, and where it comes from."""

    spec: str
    source: str


class DefaultLayers:
    """The family's default layer choice per method, each with its source."""

    defaults: Mapping[Method, LayerDefault]
    legacy_defaults_apply = False  # True on DiTs: the UNet defaults of 0.1.0 mean 'auto' there

    def _default(self, method: Method) -> LayerDefault:
        method = Method(method)
        if method not in self.defaults:
            method = _DEFAULT_FALLBACK.get(method, Method.PAG)
        return self.defaults[method]

    def default_layers(self, method: Method) -> str:
        """The spec ``auto`` stands for in a node of ``method`` on this model."""
        return self._default(method).spec

    def default_source(self, method: Method) -> str:
        """Where ``default_layers(method)`` comes from (published settings, or how it was chosen)."""
        return self._default(method).source

    def resolve(self, spec: str, method: Method) -> str:
        """The spec a node of ``method`` uses: ``auto`` is the family's default (as is, on a DiT, the UNet default
        a workflow saved before 'auto' carries); anything else is itself."""
        text = (spec or "").strip().lower()
        if text == AUTO or (self.legacy_defaults_apply and text == LEGACY_DEFAULTS.get(Method(method))):
            return self.default_layers(method)
        return spec


def scaled_block_range(first: int, last: int, published_depth: int, depth: int) -> tuple[int, int]:
    """Published blocks ``first``-``last`` of a ``published_depth``-block stack, moved to a ``depth``-block one:
    as many blocks (at most ``depth``), centred at the same relative depth; the same blocks where the depths
    are equal."""
    count = min(last - first + 1, depth)
    centre = (first + last) / 2 * (depth - 1) / max(1, published_depth - 1)
    start = round(centre - (count - 1) / 2)
    start = max(0, min(start, depth - count))
    return start, start + count - 1


def describe_sites(sites) -> str:
    """Index names of ``sites``, consecutive ones of a module or kind as a range: 'double.7-9, single.3'."""
    groups: list[list] = []
    for site in sites:
        prefix, _, number = site.index_name.rpartition(".")
        if groups and groups[-1][0] == prefix and groups[-1][2] == int(number) - 1:
            groups[-1][2] = int(number)
        else:
            groups.append([prefix, int(number), int(number)])
    return ", ".join(f"{p}.{a}" if a == b else f"{p}.{a}-{b}" for p, a, b in groups)


class AttentionLayout(DefaultLayers):
    """All self-attention sites of one UNet, in forward order (down, mid, up), with its family's ``defaults``."""

    def __init__(self, modules: Sequence[AttentionModule], *, defaults: Mapping[Method, LayerDefault]):
        self.defaults = dict(defaults)
        order = {"input": 0, "middle": 1, "output": 2}
        self.modules = sorted(modules, key=lambda m: (order[m.block], m.block_id))
        self.sites: list[AttentionSite] = []
        self._module_index: dict[AttentionModule, int] = {}
        counters = {"input": 0, "middle": 0, "output": 0}
        for m in self.modules:
            n = counters[m.block]
            counters[m.block] += 1
            self._module_index[m] = n
            for k in range(m.depth):
                self.sites.append(AttentionSite(m, n, k))

    def describe(self) -> str:
        """The layers of this model in both spellings, one attention module per line."""
        lines = []
        for m in self.modules:
            n = self._module_index[m]
            letter = _INDEX_LETTER[m.block]
            path = AttentionSite(m, n, 0).module_path
            line = f"  {letter}{n} = {path} (host block {m.block}.{m.block_id})"
            if m.depth > 1:
                line += f", transformer blocks 0-{m.depth - 1}: {letter}{n}.0-{m.depth - 1}"
            lines.append(line)
        return "\n".join(lines)

    def select(self, spec: str) -> list[AttentionSite]:
        """Parse a comma-separated layer spec and return the sites it names, in forward order.

        Raises LayerSpecError naming the entry that selects nothing, with this model's layers.
        """
        return select_sites(
            spec,
            self.sites,
            self._match,
            "The layer spec is empty. Name at least one self-attention layer, e.g. 'mid' "
            f"(the middle block). This model has:\n{self.describe()}",
            lambda entry: f"Layer '{entry}' does not exist in this model. Use one of these layers "
            f"(index or diffusers spelling; comma-separate several):\n{self.describe()}",
        )

    def _match(self, entry: str) -> list[AttentionSite]:
        text = entry.lower()
        if m := _INDEX_RE.match(text):
            letter, first, last, k_first, k_last = m.groups()
            block = _LETTER_BLOCK[letter]
            modules = range(int(first), int(last if last is not None else first) + 1)
            if k_first is None:
                return [s for s in self.sites if s.module.block == block and s.module_index in modules]
            ks = range(int(k_first), int(k_last if k_last is not None else k_first) + 1)
            return [
                s
                for s in self.sites
                if s.module.block == block and s.module_index in modules and s.transformer_index in ks
            ]
        if m := _OLD_DIFFUSERS_RE.match(text):
            path, level, position = m.groups()
            components = [_PATH_ALIASES[path], level] + (["attentions", position] if position else [])
            return self._match_components(components)
        if m := _HOST_RE.match(text):
            block, block_id, k = m.groups()
            return [
                s
                for s in self.sites
                if s.module.block == block
                and s.module.block_id == int(block_id)
                and (k is None or s.transformer_index == int(k))
            ]
        if _PATH_RE.match(text):
            components = text.split(".")
            components[0] = _PATH_ALIASES.get(components[0], components[0])
            return self._match_components(components)
        raise LayerSpecError(
            f"Cannot read layer '{entry}'. Write an index such as 'm0', 'd4', 'u0.4', 'd2.2-9', a "
            "diffusers path such as 'mid', 'down_blocks.1' or 'up_blocks.0.attentions.1', or a host "
            f"block such as 'middle.0'. This model has:\n{self.describe()}"
        )

    def _match_components(self, components: list[str]) -> list[AttentionSite]:
        n = len(components)
        found = []
        for site in self.sites:
            name = site.diffusers_name.split(".")
            if any(name[i : i + n] == components for i in range(len(name) - n + 1)):
                found.append(site)
        return found


# --- DiT transformer blocks ------------------------------------------------------------------------
#
# A DiT's self-attention sites are its transformer blocks. Blocks come in kinds, each with our short
# name and the module list that holds them in the host and in diffusers (given per family by the
# registry, as ``BlockKind``):
#
#   joint   blocks over cat(text, image) with a weight set per stream
#   double  dual-stream blocks: text and image streams, one joint attention
#   single  single-stream blocks over one joint sequence
#   block   a video DiT's block: a video-only self-attention (attn1), then a cross-attention to the
#           text (attn2), which guidance leaves alone
#   down.L, up.L
#           the attention blocks of resolution level L (0 = the finest) on the down or the up path of a
#           U-shaped model, whose module lists interleave them with other modules (``BlockKind.module_indices``)
#
# Accepted entries: a short name (``double.7``, ``down.1.3``), a range of one kind (``single.0-9``,
# ``up.1.0-3``), a kind alone (every block of it; ``down`` / ``up`` alone: every level's), or a module
# path matched on whole dot-separated components of the host or diffusers name, as for UNets
# (``transformer_blocks.13``, ``joint_blocks.13``, ``single_transformer_blocks.20.attn``). diffusers' docs
# and PAG defaults write ``blocks.13``: a path may start with ``blocks``, which stands for any ``*_blocks``
# component, so where a model has two kinds it names the block of that index of each, as diffusers' regex
# search would (without its ``blocks.1`` also taking ``blocks.10``-``19``).

BLOCK_KINDS = ("joint", "double", "single", "block")
LEVEL_KINDS = ("down", "up")  # named with their level: "down.0", "up.2"
_DIT_SHORT_RE = re.compile(r"^(joint|double|single|block)(?:\.(\d+)(?:-(\d+))?)?$")
_LEVEL_SHORT_RE = re.compile(r"^(down|up)(?:\.(\d+)(?:\.(\d+)(?:-(\d+))?)?)?$")
_LEVEL_KIND_RE = re.compile(r"^(down|up)\.\d+$")


@dataclass(frozen=True, kw_only=True)
class BlockKind:
    """One kind of transformer block of a DiT: ``count`` blocks in the host's module list ``host_path`` and
    diffusers' ``diffusers_path``, whose guided attention is diffusers' ``diffusers_attention``; ``note`` adds
    a line to ``describe`` (e.g. which blocks have a second, image-only self-attention)."""

    name: str
    count: int
    host_path: str
    diffusers_path: str
    diffusers_attention: str = "attn"
    note: str | None = None
    # what precedes the index in the host's module name: "block" where the host names its blocks "block0", ...
    # in a ModuleDict (``blocks.block0``)
    host_index_prefix: str = ""
    # where block i sits in the module list (the host's and diffusers'), where other modules come between the
    # blocks; None: block i is module i
    module_indices: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.name not in BLOCK_KINDS and not _LEVEL_KIND_RE.match(self.name):
            raise ValueError(f"block kind {self.name!r} is not one of {BLOCK_KINDS} nor a level of {LEVEL_KINDS} "
                             "('down.0', 'up.2')")
        if self.module_indices is not None and len(self.module_indices) != self.count:
            raise ValueError(f"block kind {self.name!r}: {len(self.module_indices)} module indices for {self.count} "
                             "blocks")

    @property
    def module_range(self) -> str:
        """The kind's modules in its module list, for messages: '0-23', or '2, 5, ..., 23' where other modules
        come between them."""
        if self.count == 0:
            return ""
        if self.module_indices is None:
            return "0" if self.count == 1 else f"0-{self.count - 1}"
        indices = self.module_indices
        if len(indices) <= 3:
            return ", ".join(str(i) for i in indices)
        return f"{indices[0]}, {indices[1]}, ..., {indices[-1]}"


@dataclass(frozen=True)
class DiTBlock:
    """One transformer block of a DiT, the unit attention guidance acts on."""

    kind: str  # one of BLOCK_KINDS
    index: int
    # the host's and diffusers' module list and diffusers' attention module; not part of the block's identity
    host_path: str = field(compare=False, kw_only=True)
    diffusers_path: str = field(compare=False, kw_only=True)
    diffusers_attention: str = field(default="attn", compare=False, kw_only=True)
    host_index_prefix: str = field(default="", compare=False, kw_only=True)
    # the block's place in its module list where that is not ``index`` (``BlockKind.module_indices``)
    module_index: int | None = field(default=None, compare=False, kw_only=True)

    @property
    def index_name(self) -> str:
        return f"{self.kind}.{self.index}"

    @property
    def module_position(self) -> int:
        """Where the block sits in its module list."""
        return self.index if self.module_index is None else self.module_index

    @property
    def host_name(self) -> str:
        return f"{self.host_path}.{self.host_index_prefix}{self.module_position}"

    @property
    def diffusers_name(self) -> str:
        return f"{self.diffusers_path}.{self.module_position}.{self.diffusers_attention}"


def middle_block_defaults(kinds: Sequence[BlockKind]) -> dict[Method, LayerDefault]:
    """The middle block of the largest kind, for a family with nothing published."""
    largest = max(kinds, key=lambda kind: kind.count)
    spec = f"{largest.name}.{largest.count // 2}"
    source = "none published for this family: the middle block"
    return {Method.PAG: LayerDefault(spec=spec, source=source), Method.SAG: LayerDefault(spec=spec, source=source)}


class DiTLayout(DefaultLayers):
    """The transformer blocks of one DiT, in forward order.

    ``family`` names the model in messages; ``kinds`` are its block kinds in forward
    order; ``defaults`` is the family's default spec per method (SEG uses PAG's), each with its source.
    """

    legacy_defaults_apply = True

    def __init__(self, *, family: str, kinds: Sequence[BlockKind], defaults: Mapping[Method, LayerDefault] | None = None):
        self.family = family
        self.kinds = tuple(kinds)
        self.depths = {kind.name: kind.count for kind in self.kinds}
        self.host_paths = {kind.name: kind.host_path for kind in self.kinds}
        self.diffusers_paths = {kind.name: kind.diffusers_path for kind in self.kinds}
        self.sites: list[DiTBlock] = [
            DiTBlock(kind.name, i, host_path=kind.host_path, diffusers_path=kind.diffusers_path,
                     diffusers_attention=kind.diffusers_attention, host_index_prefix=kind.host_index_prefix,
                     module_index=None if kind.module_indices is None else kind.module_indices[i])
            for kind in self.kinds for i in range(kind.count)
        ]
        self.defaults = dict(defaults) if defaults is not None else middle_block_defaults(self.kinds)

    def describe(self) -> str:
        """The blocks of this model in all three spellings, one kind per line."""
        lines = []
        for kind in self.kinds:
            if kind.count == 0:
                continue
            indices = "0" if kind.count == 1 else f"0-{kind.count - 1}"
            modules = kind.module_range
            if kind.module_indices is not None:
                modules = f"{{{modules}}}"
            line = (f"  {kind.name}.{indices} = {kind.diffusers_path}.{modules} "
                    f"(host {kind.host_path}.{kind.host_index_prefix}{modules})")
            if kind.note:
                line += f"; {kind.note}"
            lines.append(line)
        return "\n".join(lines)

    def _examples(self) -> tuple[str, str]:
        """A block and a range of this model, for messages: ('joint.12', 'joint.0-23')."""
        kind, n = max(self.depths.items(), key=lambda item: item[1])
        return f"{kind}.{n // 2}", f"{kind}.0-{n - 1}"

    def select(self, spec: str) -> list[DiTBlock]:
        """Parse a comma-separated block spec and return the blocks it names, in forward order.

        Raises LayerSpecError naming the entry that selects nothing, with this model's blocks.
        """
        return select_sites(
            spec,
            self.sites,
            self._match,
            f"The layer spec is empty. Name at least one attention block, e.g. '{self._examples()[0]}'. "
            f"This {self.family} model has:\n{self.describe()}",
            lambda entry: f"Layer '{entry}' does not exist in this {self.family} model, whose attention blocks are "
            f"named as below, not as UNet layers. Use one of them (short, diffusers or host spelling; ranges such as "
            f"'{self._examples()[1]}'; comma-separate several):\n{self.describe()}",
        )

    def _match(self, entry: str) -> list[DiTBlock]:
        text = entry.lower()
        if m := _DIT_SHORT_RE.match(text):
            kind, first, last = m.groups()
            if first is None:
                return [s for s in self.sites if s.kind == kind]
            indices = range(int(first), int(last if last is not None else first) + 1)
            return [s for s in self.sites if s.kind == kind and s.index in indices]
        if m := _LEVEL_SHORT_RE.match(text):
            path, level, first, last = m.groups()
            if level is None:
                return [s for s in self.sites if s.kind.startswith(f"{path}.")]
            kind = f"{path}.{level}"
            if first is None:
                return [s for s in self.sites if s.kind == kind]
            indices = range(int(first), int(last if last is not None else first) + 1)
            return [s for s in self.sites if s.kind == kind and s.index in indices]
        if _PATH_RE.match(text):
            components = text.split(".")
            return [s for s in self.sites if self._path_matches(s, components)]
        block, blocks = self._examples()
        raise LayerSpecError(
            f"Cannot read layer '{entry}'. Write a block such as '{block}', a range such as '{blocks}', or a "
            f"diffusers / host path such as '{self.diffusers_paths[self.sites[0].kind]}.{self.sites[0].module_position}'. "
            f"This {self.family} model has:\n{self.describe()}"
        )

    @staticmethod
    def _path_matches(site: DiTBlock, components: list[str]) -> bool:
        n = len(components)
        for name in (site.diffusers_name, site.host_name):
            parts = name.split(".")
            for i in range(len(parts) - n + 1):
                window = parts[i : i + n]
                head_ok = window[0] == components[0] or (components[0] == "blocks" and window[0].endswith("_blocks"))
                if head_ok and window[1:] == components[1:]:
                    return True
        return False
