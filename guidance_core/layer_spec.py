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
  count the attention modules of the down, mid and up path in order (SD1.5: d0-d5, m0, u0-u8), an
  optional ``.k`` picks transformer block k inside one (SDXL: ``m0.4``), and both take ranges:
  ``d0-3`` (or ``d0-d3``), ``d2.2-9``.
- the host's own block names: ``middle.0``, ``input.4``, ``output.3.1``.

DiT models (SD3's MMDiT, Flux) have transformer blocks instead: ``DiTLayout`` at the end of this file
(``joint.13``, ``double.7``, ``single.20``, diffusers' ``transformer_blocks.13``).

Every layout carries its family's default choice per node kind (``default_layers("pag")``, with
``default_source``), which the nodes' default input ``auto`` stands for.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

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
# Node kinds without a default of their own use another kind's: SEG perturbs attention where PAG does.
_DEFAULT_KIND_FALLBACK = {"seg": "pag"}
# The nodes' default specs before 'auto' (0.1.0), which saved workflows keep: on a UNet they are the
# defaults below; on a DiT they never named a block, so there they stand for the family's default.
LEGACY_DEFAULTS = {"pag": "mid", "sag": "m0.0"}

UNET_DEFAULTS = {"pag": "mid", "sag": "m0.0"}
UNET_DEFAULT_SOURCES = {
    "pag": "diffusers' PAG default pag_applied_layers='mid' (the paper's SD1.5 'm0')",
    "sag": "diffusers' StableDiffusionSAGPipeline and ComfyUI's SAG node: the middle block's first transformer",
}


class DefaultLayers:
    """The family's default layer choice per node kind ("pag", "sag", ...), each with its source."""

    defaults: dict[str, str]
    default_sources: dict[str, str]
    legacy_defaults_apply = False  # True on DiTs: the UNet defaults of 0.1.0 mean 'auto' there

    def _kind(self, kind: str) -> str:
        return kind if kind in self.defaults else _DEFAULT_KIND_FALLBACK.get(kind, "pag")

    def default_layers(self, kind: str) -> str:
        """The spec ``auto`` stands for in a node of ``kind`` on this model."""
        return self.defaults[self._kind(kind)]

    def default_source(self, kind: str) -> str:
        """Where ``default_layers(kind)`` comes from (published settings, or how it was chosen)."""
        return self.default_sources[self._kind(kind)]

    def resolve(self, spec: str, kind: str) -> str:
        """The spec a node of ``kind`` uses: ``auto`` is the family's default (as is, on a DiT, the UNet default
        a workflow saved before 'auto' carries); anything else is itself."""
        text = (spec or "").strip().lower()
        if text == AUTO or (self.legacy_defaults_apply and text == LEGACY_DEFAULTS.get(kind)):
            return self.default_layers(kind)
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
    """All self-attention sites of one model, in forward order (down, mid, up)."""

    def __init__(self, modules: list[AttentionModule]):
        self.defaults = dict(UNET_DEFAULTS)
        self.default_sources = dict(UNET_DEFAULT_SOURCES)
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
# A DiT's self-attention sites are its transformer blocks. Each kind of block has three spellings:
#
#   kind    short name  host module (ComfyUI)  diffusers module                    models
#   joint   joint.13    joint_blocks.13        transformer_blocks.13(.attn)        SD3 / SD3.5 (MMDiT)
#   double  double.7    double_blocks.7        transformer_blocks.7(.attn)         Flux, Chroma
#   single  single.20   single_blocks.20       single_transformer_blocks.20(.attn) Flux, Chroma
#   double  double.30   transformer_blocks.30  transformer_blocks.30(.attn)        Qwen-Image
#   single  single.15   layers.15              layers.15(.attention / .attn)       Z-Image / Lumina 2 (NextDiT)
#   double  double.8    double_stream_blocks.8 double_stream_blocks.8(.block.attn1) HiDream
#   single  single.20   single_stream_blocks.20 single_stream_blocks.20(.block.attn1) HiDream
#   double  double.2    double_blocks.2        transformer_blocks.2(.attn)         HunyuanVideo
#   single  single.10   single_blocks.10       single_transformer_blocks.10(.attn) HunyuanVideo
#   block   block.10    blocks.10              blocks.10(.attn1)                   Wan 2.1 / 2.2
#   block   block.19    transformer_blocks.19  transformer_blocks.19(.attn1)       LTX-Video
#
# (``block`` is a video DiT's block with a video-only self-attention, attn1, and a cross-attention to the
# text, attn2, which guidance leaves alone.)
#
# (Flux and Chroma call their dual-stream blocks double_blocks; Qwen-Image's are the same kind of block,
# which the host names "double" too, under transformer_blocks: a layout can give a kind another host path,
# and another diffusers path and attention module name.)
#
# Accepted entries: a short name, a range of one kind (``single.0-9``), a kind alone (every block of
# it), or a module path matched on whole dot-separated components of the host or diffusers name, as
# for UNets (``transformer_blocks.13``, ``joint_blocks.13``, ``single_transformer_blocks.20.attn``).
# diffusers' docs and SD3 PAG default write ``blocks.13`` / ``blocks.1``: a path may start with
# ``blocks``, which stands for any ``*_blocks`` component, so on Flux it names the double and the
# single block of that index, as diffusers' regex search would (without its ``blocks.1`` also
# taking ``blocks.10``-``19``).

_DIT_HOST_PATH = {"joint": "joint_blocks", "double": "double_blocks", "single": "single_blocks", "block": "blocks"}
_DIT_DIFFUSERS_PATH = {"joint": "transformer_blocks", "double": "transformer_blocks", "single": "single_transformer_blocks",
                       "block": "blocks"}
# the diffusers attention module of a block that is guided, where it is not ``attn``
_DIT_DIFFUSERS_ATTENTION = {"block": "attn1"}
_DIT_SHORT_RE = re.compile(r"^(joint|double|single|block)(?:\.(\d+)(?:-(\d+))?)?$")


@dataclass(frozen=True)
class DiTBlock:
    """One transformer block of a DiT, the unit attention guidance acts on."""

    kind: str  # "joint" | "double" | "single"
    index: int
    # the host's and diffusers' module list and diffusers' attention module where they are not the kind's
    # usual ones; not part of the block's identity
    host_path: str | None = field(default=None, compare=False)
    diffusers_path: str | None = field(default=None, compare=False)
    diffusers_attention: str = field(default="attn", compare=False)

    @property
    def index_name(self) -> str:
        return f"{self.kind}.{self.index}"

    @property
    def host_name(self) -> str:
        return f"{self.host_path or _DIT_HOST_PATH[self.kind]}.{self.index}"

    @property
    def diffusers_name(self) -> str:
        return f"{self.diffusers_path or _DIT_DIFFUSERS_PATH[self.kind]}.{self.index}.{self.diffusers_attention}"


class DiTLayout(DefaultLayers):
    """The transformer blocks of one DiT, in forward order.

    ``family`` names the model in messages (e.g. "SD3", "Flux"); ``architecture`` is the node's key for
    how to reach the blocks (see nodes/dit_attention.py); ``depths`` maps each kind to its block count, in
    forward order; ``notes`` adds a line per kind to ``describe`` (e.g. which blocks have a second,
    image-only self-attention); ``host_paths`` / ``diffusers_paths`` give a kind's module list where it is
    not the usual one (Qwen-Image's double blocks are its ``transformer_blocks``) and ``diffusers_attention``
    its attention module in diffusers (``attn``). ``defaults`` is the family's default spec per node kind
    ("pag", "sag"; other kinds use PAG's), ``default_sources`` says where each comes from; without them the
    middle block of the largest kind, for which nothing is published.
    """

    legacy_defaults_apply = True

    def __init__(self, family: str, architecture: str, depths: dict[str, int], notes: dict[str, str] | None = None,
                 host_paths: dict[str, str] | None = None, defaults: dict[str, str] | None = None,
                 default_sources: dict[str, str] | None = None, diffusers_paths: dict[str, str] | None = None,
                 diffusers_attention: dict[str, str] | None = None):
        self.family = family
        self.architecture = architecture
        self.depths = dict(depths)
        self.notes = dict(notes or {})
        self.host_paths = {kind: (host_paths or {}).get(kind, _DIT_HOST_PATH[kind]) for kind in self.depths}
        self.diffusers_paths = {kind: (diffusers_paths or {}).get(kind, _DIT_DIFFUSERS_PATH[kind])
                                for kind in self.depths}
        attention = {kind: (diffusers_attention or {}).get(kind, _DIT_DIFFUSERS_ATTENTION.get(kind, "attn"))
                     for kind in self.depths}
        self.sites: list[DiTBlock] = [
            DiTBlock(kind, i, self.host_paths[kind], self.diffusers_paths[kind], attention[kind])
            for kind, n in self.depths.items() for i in range(n)
        ]
        if defaults is None:
            kind, n = max(self.depths.items(), key=lambda item: item[1])
            defaults = {"pag": f"{kind}.{n // 2}", "sag": f"{kind}.{n // 2}"}
            default_sources = {k: "none published for this family: the middle block" for k in defaults}
        self.defaults = dict(defaults)
        self.default_sources = dict(default_sources or {})

    def describe(self) -> str:
        """The blocks of this model in all three spellings, one kind per line."""
        lines = []
        for kind, n in self.depths.items():
            if n == 0:
                continue
            indices = "0" if n == 1 else f"0-{n - 1}"
            line = (f"  {kind}.{indices} = {self.diffusers_paths[kind]}.{indices} "
                    f"(host {self.host_paths[kind]}.{indices})")
            if kind in self.notes:
                line += f"; {self.notes[kind]}"
            lines.append(line)
        return "\n".join(lines)

    def _examples(self) -> tuple[str, str]:
        """A block and a range of this model, for messages: ('joint.12', 'joint.12-23')."""
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
            f"The layer spec is empty. Name at least one transformer block, e.g. '{self._examples()[0]}'. "
            f"This {self.family} model has:\n{self.describe()}",
            lambda entry: f"Layer '{entry}' does not exist in this {self.family} model, which has transformer "
            f"blocks, not UNet layers. Use one of these blocks (short, diffusers or host spelling; ranges such as "
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
        if _PATH_RE.match(text):
            components = text.split(".")
            return [s for s in self.sites if self._path_matches(s, components)]
        block, blocks = self._examples()
        raise LayerSpecError(
            f"Cannot read layer '{entry}'. Write a block such as '{block}', a range such as '{blocks}', or a "
            f"diffusers / host path such as '{self.diffusers_paths[self.sites[0].kind]}.{self.sites[0].index}'. "
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
