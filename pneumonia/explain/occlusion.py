"""Incremental occlusion (Krypton, Nakandala et al., SIGMOD 2019): Captum's `Occlusion` map,
computed by recomputing each layer only where the occluding patches change it.

The network is traced once with torch.fx and the unoccluded image runs once, keeping every
node's output. For a batch of occluded copies, a node's output is then a `Box`: per copy, the
rectangle that differs from the unoccluded output, one rectangle size for all copies so they run
as one batch. A convolution or pooling layer recomputes only the output rectangle its changed
input reaches, reading the rest of its input window from the stored activations; pointwise
layers, residual additions and concatenations work on the union of their inputs' rectangles;
anything else (global pooling, squeeze-and-excitation, the classifier, unknown ops) runs on full
maps from there on: still exact, no longer incremental.

mode="approximate" is Krypton's adaptive drill-down: a checkerboard of window positions is
computed exactly, each other window gets the mean of its four neighbours, and only the `refine`
share of those with the largest values is computed as well (docs/options.md measures it, and
Krypton's other approximation, which did not pay).
"""

from __future__ import annotations

import functools
import math
import operator
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from timm.layers import _fx as timm_fx
from timm.layers.norm_act import FrozenBatchNormAct2d
from torch import nn
from torchvision.models.feature_extraction import LeafModuleAwareTracer
from torchvision.ops import FrozenBatchNorm2d

from pneumonia.checks import check_choice, check_fraction_key
from pneumonia.errors import ConfigError

MODES = ("exact", "approximate")
APPROXIMATE_REFINE = 0.25  # chosen on validation X-rays (docs/options.md)
# A full pass must cost at least this many times a copy, by the engine's own count, for the
# engine to run: below it, networks that mix the whole map early ran slower in the engine than
# as whole passes (docs/options.md has the measurements).
MIN_SAVING = 1.2

NORM_ACT_MODULES = (BatchNormAct2d, FrozenBatchNormAct2d)
POINTWISE_MODULES = (
    nn.BatchNorm2d, *NORM_ACT_MODULES, FrozenBatchNorm2d, nn.Identity,
    nn.Dropout, nn.Dropout2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid,
    nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.PReLU,
)
POINTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, torch.sigmoid,
    torch.tanh, F.leaky_relu, F.elu, F.mish, operator.add, operator.mul, operator.sub,
    operator.truediv, torch.add, torch.mul, torch.sub, torch.cat,
}
POINTWISE_METHODS = {"relu", "sigmoid", "tanh", "add", "mul", "sub", "div", "contiguous", "clone"}


@dataclass
class Box:
    """The changed part of one node's (B, C, H, W) output for a batch of B occluded copies.

    `value` (B, C, h, w) is copy b's output on rows top[b]:top[b]+h, columns left[b]:left[b]+w;
    everywhere else the copy's output equals the unoccluded one. A node whose output changed
    beyond what a box holds keeps its whole output for the batch instead.
    """

    value: torch.Tensor
    top: torch.Tensor  # (B,) int64, on the CPU
    left: torch.Tensor


@dataclass
class Counter:
    """Multiply-accumulates of convolutions and linear layers: the engine's cost model."""

    full_pass: int = 0  # one unoccluded image through the whole network
    copies: int = 0  # the occluded copies computed so far
    incremental: int = 0  # what computing those copies cost

    def per_copy(self) -> float:
        return self.incremental / max(self.copies, 1)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Captum's window positions along one axis: ceil((size - window) / stride) + 1 windows at
    multiples of `stride`; the last one may cross the border and is clipped there."""
    if not 0 < window <= size:
        raise ConfigError(f"window={window} must be between 1 and the input size {size}")
    return [i * stride for i in range(math.ceil((size - window) / stride) + 1)]


_TRACED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def trace(model: nn.Module) -> fx.GraphModule | None:
    """The model as an fx graph sharing its modules, timm's no-trace modules and functions
    (attention, BatchNormAct, ConvMlp...) kept whole; None when it cannot be traced."""
    if model not in _TRACED:
        try:
            tracer = LeafModuleAwareTracer(
                leaf_modules=timm_fx.get_notrace_modules(),
                autowrap_functions=tuple(f for f in timm_fx.get_notrace_functions() if callable(f)))
            _TRACED[model] = fx.GraphModule(model, tracer.trace(model))
        except Exception:  # fx raises many kinds on data-dependent control flow
            _TRACED[model] = None
    return _TRACED[model]


@contextmanager
def engine_passes(model: nn.Module) -> Iterator[None]:
    """What the engine's passes run under: no autograd, even inside a caller's inference mode;
    `inplace` flags off, so stored activations stay intact (a BatchNormAct's activation keeps its
    own: it acts on the batch norm's new output); and a convolution whose kernel covers its whole
    input (VGG's 7x7 and 1x1 head convolutions, timm's ConvMlp) runs as the matrix product it is:
    oneDNN lays its weights out anew on every call, which cost VGG16 more (docs/options.md)."""
    fresh = {id(m.act) for m in model.modules() if isinstance(m, NORM_ACT_MODULES)}
    flat: dict[nn.Module, torch.Tensor] = {}

    def forward(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        if not covers_input(m, x):
            return nn.Conv2d.forward(m, x)
        if m not in flat:  # a view, or one copy of channels-last weights per call of the engine
            flat[m] = m.weight.flatten(1)
        return F.linear(x.flatten(1), flat[m], m.bias)[:, :, None, None]

    with torch.inference_mode(False), torch.no_grad(), ExitStack() as restore:
        for m in model.modules():
            if getattr(m, "inplace", False) is True and id(m) not in fresh:
                m.inplace = False
                restore.callback(setattr, m, "inplace", True)
            if type(m) is nn.Conv2d and "forward" not in vars(m):
                m.forward = functools.partial(forward, m)
                restore.callback(delattr, m, "forward")
        yield


def place(first: torch.Tensor, last: torch.Tensor, size: int) -> tuple[torch.Tensor, int]:
    """One span length for the batch and each copy's start, covering every copy's [first, last]
    inside [0, size)."""
    length = min(int((last - first + 1).max().clamp(min=1)), size)
    return first.clamp(0, size - length), length


def reached_span(first: torch.Tensor, length: int, geometry: tuple[int, int, int, int],
                 size: int) -> tuple[torch.Tensor, int]:
    """The output span that input rows first:first+length reach through a sliding-window layer
    of `geometry` (kernel, stride, padding, dilation) along this axis; size: the output's length."""
    kernel, stride, padding, dilation = geometry
    low = first + padding - dilation * (kernel - 1)
    lo = torch.div(low + stride - 1, stride, rounding_mode="floor").clamp(min=0)
    hi = torch.div(first + length - 1 + padding, stride, rounding_mode="floor").clamp(max=size - 1)
    return place(lo, torch.maximum(hi, lo), size)


def fits(state: Box, top: torch.Tensor, left: torch.Tensor, shape: tuple[int, int]) -> bool:
    """Whether the box is exactly the window of `shape` at (top, left) for every copy."""
    return tuple(state.value.shape[-2:]) == tuple(shape) and torch.equal(state.top, top) \
        and torch.equal(state.left, left)


def gather(state: Box | None, base: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
           shape: tuple[int, int], pad_value: float = 0.0) -> torch.Tensor:
    """Each copy's values on rows top:top+h, columns left:left+w, as (B, C, h, w): the box's
    values where it has them, the unoccluded output `base` (1, C, H, W) elsewhere, `pad_value`
    past the map's border."""
    height, width = shape
    if state is not None and fits(state, top, left, shape):
        return state.value
    rows = top[:, None] + torch.arange(height)
    cols = left[:, None] + torch.arange(width)
    size_h, size_w = base.shape[-2:]
    pad = max(0, -int(rows.min()), -int(cols.min()), int(rows.max()) + 1 - size_h,
              int(cols.max()) + 1 - size_w)
    padded = F.pad(base, (pad,) * 4, value=pad_value) if pad else base
    device = base.device
    out = padded[0].permute(1, 2, 0)[(rows + pad).to(device)[:, :, None],
                                     (cols + pad).to(device)[:, None, :]]
    if state is not None:
        _paste(out, state, top, left)
    return out.permute(0, 3, 1, 2)


def _paste(out: torch.Tensor, state: Box, top: torch.Tensor, left: torch.Tensor) -> None:
    """Writes each copy's box values into `out` (B, h, w, C), a window at (top, left), where the
    box and the window overlap: work in proportion to the box, not the window."""
    values = state.value.permute(0, 2, 3, 1)
    if fits(state, top, left, tuple(out.shape[1:3])):
        out.copy_(values)
        return
    box_h, box_w = state.value.shape[-2:]
    device = out.device
    r = ((state.top - top)[:, None] + torch.arange(box_h)).to(device)  # in window coordinates
    c = ((state.left - left)[:, None] + torch.arange(box_w)).to(device)
    inside = ((r >= 0) & (r < out.shape[1]))[:, :, None] \
        & ((c >= 0) & (c < out.shape[2]))[:, None, :]
    if bool(inside.all()):  # the usual case: no index lists to build
        copies = torch.arange(len(r), device=device)[:, None, None]
        out[copies, r[:, :, None], c[:, None, :]] = values
        return
    b, i, j = inside.nonzero(as_tuple=True)
    out[b, r[b, i], c[b, j]] = values[b, i, j]


def sliding_geometry(m: nn.Module) -> tuple[tuple[int, int, int, int], ...] | None:
    """(kernel, stride, padding, dilation) per spatial axis of a layer the engine recomputes
    on windows, or None for any other layer (or an unsupported setting of one)."""
    if type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str):
        return tuple(zip(m.kernel_size, m.stride, m.padding, m.dilation))
    pair = nn.modules.utils._pair
    if type(m) is nn.MaxPool2d and not m.ceil_mode and not m.return_indices:
        dilation = pair(m.dilation)
    elif type(m) is nn.AvgPool2d and not m.ceil_mode and m.divisor_override is None and (
            m.count_include_pad or pair(m.padding) == (0, 0)):
        dilation = (1, 1)
    else:
        return None
    return tuple(zip(pair(m.kernel_size), pair(m.stride or m.kernel_size), pair(m.padding),
                     dilation))


def unpadded(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The layer `m` without its padding (the engine pads its windows itself)."""
    if isinstance(m, nn.Conv2d):
        return lambda x: F.conv2d(x, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)
    if isinstance(m, nn.MaxPool2d):
        return lambda x: F.max_pool2d(x, m.kernel_size, m.stride, 0, m.dilation)
    return lambda x: F.avg_pool2d(x, m.kernel_size, m.stride, 0)


def covers_input(m: nn.Module, x: Any) -> bool:
    """Whether `m` is a convolution whose kernel covers its whole unpadded input `x` (one output
    position per map: a matrix product)."""
    return type(m) is nn.Conv2d and isinstance(x, torch.Tensor) and x.dim() == 4 \
        and tuple(x.shape[-2:]) == tuple(m.kernel_size) and m.padding == (0, 0) \
        and m.dilation == (1, 1) and m.groups == 1


def is_pointwise_module(m: nn.Module) -> bool:
    """Whether `m` (in eval mode) acts on each position of its input map by itself."""
    if type(m) not in POINTWISE_MODULES or m.training:
        return False
    if isinstance(m, nn.BatchNorm2d) and m.running_mean is None:
        return False  # normalises with the batch's own statistics
    return all(is_pointwise_module(child) for child in m.children())


def module_macs(m: nn.Module, out: Any) -> int:
    """Multiply-accumulates of a convolution or linear layer that produced `out`."""
    if isinstance(m, nn.Conv2d) and isinstance(out, torch.Tensor):
        return out.numel() * m.in_channels // m.groups * math.prod(m.kernel_size)
    if isinstance(m, nn.Linear) and isinstance(out, torch.Tensor):
        return out.numel() * m.in_features
    return 0


@dataclass
class Engine:
    """Runs occluded copies of one image through a traced network incrementally."""

    graph: fx.GraphModule
    counter: Counter = field(default_factory=Counter)
    copies: int = 0  # occluded copies in the batch being computed
    activations: set = field(default_factory=set)  # nodes whose output depends on the image

    def run_base(self, image: torch.Tensor) -> dict[fx.Node, Any]:
        """Every node's output for the unoccluded image (1, C, H, W)."""
        values: dict[fx.Node, Any] = {}
        for node in self.graph.graph.nodes:
            if node.op == "placeholder":
                values[node] = image
                self.activations.add(node)
                continue
            if any(n in self.activations for n in node.all_input_nodes):
                self.activations.add(node)
            if node.op == "output":
                break
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
            values[node] = self._call(node, args, kwargs)
            if isinstance(values[node], torch.Tensor) and values[node].dim() == 4:
                # channels last, so that gathering a window copies whole channel vectors
                values[node] = values[node].contiguous(memory_format=torch.channels_last)
            if node.op == "call_module":
                self.counter.full_pass += module_macs(self._module(node), values[node])
        return values

    def run_copies(self, base: dict[fx.Node, Any], starts: list[tuple[int, int]], window: int,
                   baseline: float) -> torch.Tensor:
        """The network's output for the copies occluded at `starts` (row, column) of the input."""
        states: dict[fx.Node, Any] = {}
        self.copies = len(starts)
        self.counter.copies += len(starts)
        for node in self.graph.graph.nodes:
            if node.op == "placeholder":
                states[node] = self._occluded_input(base[node], starts, window, baseline)
            elif node.op == "output":
                return fx.node.map_arg(node.args[0], lambda n: self._full(n, states, base))
            elif any(n in states for n in node.all_input_nodes):
                states[node] = self._propagate(node, states, base)
        raise ValueError("the traced graph has no output node")

    def _occluded_input(self, image: torch.Tensor, starts: list[tuple[int, int]], window: int,
                        baseline: float) -> Box:
        """Boxes of side `window` holding each copy's input around its (border-clipped) patch."""
        size_h, size_w = image.shape[-2:]
        first = torch.tensor(starts, dtype=torch.long)
        top, left = first[:, 0].clamp(max=size_h - window), first[:, 1].clamp(max=size_w - window)
        value = gather(None, image, top, left, (window, window)).clone()
        rows = (top[:, None] + torch.arange(window)) >= first[:, :1]
        cols = (left[:, None] + torch.arange(window)) >= first[:, 1:]
        patch = (rows[:, :, None] & cols[:, None, :]).to(value.device)[:, None]
        return Box(value.masked_fill(patch, baseline), top, left)

    def _propagate(self, node: fx.Node, states: dict[fx.Node, Any],
                   base: dict[fx.Node, Any]) -> Any:
        """The changed part of `node`'s output, by the cheapest exact rule that applies."""
        if node.op == "call_module":
            m = self._module(node)
            geometry = sliding_geometry(m)
            arg = states.get(node.args[0]) if node.args else None
            if geometry is not None and isinstance(arg, Box) and len(node.all_input_nodes) == 1:
                return self._sliding(m, geometry, arg, base[node.args[0]], base[node])
        if self._pointwise(node, states, base):
            return self._pointwise_box(node, states, base)
        return self._full_node(node, states, base)

    def _sliding(self, m: nn.Module, geometry: tuple, state: Box, base_in: torch.Tensor,
                 base_out: torch.Tensor) -> Box:
        """A convolution or pooling layer recomputed on the output rectangle its box reaches."""
        if state.value.shape[-2:] == base_in.shape[-2:]:  # the whole map changed: no windows
            top, left = torch.zeros_like(state.top), torch.zeros_like(state.left)
            out = m(state.value)
        else:
            size = base_out.shape[-2:]
            (top, height), (left, width) = (
                reached_span(first, state.value.shape[2 + a], geometry[a], size[a])
                for a, first in enumerate((state.top, state.left)))
            window = [(n - 1) * s + d * (k - 1) + 1
                      for n, (k, s, _, d) in zip((height, width), geometry)]
            pad_value = float("-inf") if isinstance(m, nn.MaxPool2d) else 0.0
            x = gather(state, base_in, top * geometry[0][1] - geometry[0][2],
                       left * geometry[1][1] - geometry[1][2], tuple(window), pad_value)
            out = unpadded(m)(x)
        self.counter.incremental += module_macs(m, out)
        return Box(out, top, left)

    def _pointwise(self, node: fx.Node, states: dict[fx.Node, Any],
                   base: dict[fx.Node, Any]) -> bool:
        """Whether `node` maps each position of same-size input maps to that position alone."""
        if node.op == "call_module":
            known = is_pointwise_module(self._module(node))
        elif node.op == "call_function":
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            known = node.target in POINTWISE_FUNCTIONS and (node.target is not torch.cat
                                                            or dim in (1, -3))
        else:
            known = node.op == "call_method" and node.target in POINTWISE_METHODS
        out = base[node]
        if not known or not isinstance(out, torch.Tensor) or out.dim() != 4:
            return False
        for n in node.all_input_nodes:
            value = base[n]
            if n in states and (not isinstance(states[n], Box)
                                or value.shape[-2:] != out.shape[-2:]):
                return False  # (a changed 1x1 map broadcast over a larger one: full maps)
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[-2:] != (1, 1) \
                    and (value.dim() != 4 or value.shape[-2:] != out.shape[-2:]):
                return False
        return True

    def _pointwise_box(self, node: fx.Node, states: dict[fx.Node, Any],
                       base: dict[fx.Node, Any]) -> Box:
        """A pointwise node computed on the union of its inputs' boxes."""
        boxes = [states[n] for n in node.all_input_nodes if n in states]
        firsts = torch.stack([torch.stack((b.top, b.left)) for b in boxes])  # (boxes, 2, B)
        sides = torch.tensor([tuple(b.value.shape[-2:]) for b in boxes])[:, :, None]
        first, last = firsts.min(0).values, (firsts + sides - 1).max(0).values
        size = tuple(base[node].shape[-2:])
        (top, height), (left, width) = (place(first[a], last[a], size[a]) for a in (0, 1))
        whole = (height, width) == size
        if node.target is torch.cat and not whole:
            return Box(self._pasted_cat(node, states, base, top, left, (height, width)),
                       top, left)

        def local(n: fx.Node) -> Any:
            value = base[n]
            if n in states or isinstance(value, torch.Tensor) and value.dim() == 4 \
                    and value.shape[-2:] != (1, 1):  # (unchanged 1x1 maps broadcast as they are)
                out = gather(states.get(n), value, top, left, (height, width))
                if whole and n in states:  # widened to the whole map once, for every later use
                    states[n] = Box(out, top, left)
                return out
            return value

        args, kwargs = fx.node.map_arg((node.args, node.kwargs), local)
        return Box(self._call(node, args, kwargs), top, left)

    @staticmethod
    def _pasted_cat(node: fx.Node, states: dict[fx.Node, Any], base: dict[fx.Node, Any],
                    top: torch.Tensor, left: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """A channel concatenation on a window: its stored output there, with each changed
        input's box written into that input's channels (one copy of the window, not two)."""
        out = gather(None, base[node], top, left, shape)
        channels_last = out.permute(0, 2, 3, 1)  # gather's own (B, h, w, C) storage
        offset = 0
        for n in node.args[0] if node.args else node.kwargs["tensors"]:
            channels = base[n].shape[1]
            if n in states:
                _paste(channels_last[..., offset:offset + channels], states[n], top, left)
            offset += channels
        return out

    def _full_node(self, node: fx.Node, states: dict[fx.Node, Any],
                   base: dict[fx.Node, Any]) -> Any:
        """A node computed on whole maps for every copy."""
        args, kwargs = fx.node.map_arg((node.args, node.kwargs),
                                       lambda n: self._full(n, states, base))
        out = self._call(node, args, kwargs)
        if node.op == "call_module":
            self.counter.incremental += module_macs(self._module(node), out)
        return out

    def _full(self, node: fx.Node, states: dict[fx.Node, Any], base: dict[fx.Node, Any]) -> Any:
        """`node`'s whole output for every copy: a box pasted into the stored map, an unchanged
        activation repeated over the batch; weights and constants stay as they are."""
        value = base[node]
        if isinstance(states.get(node), Box):
            zeros = torch.zeros(self.copies, dtype=torch.long)
            return gather(states[node], value, zeros, zeros, tuple(value.shape[-2:]))
        if node in states:
            return states[node]
        if node in self.activations and isinstance(value, torch.Tensor):
            return value.expand(self.copies, *value.shape[1:])
        return value

    def _module(self, node: fx.Node) -> nn.Module:
        return self.graph.get_submodule(node.target)

    def _call(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        """Runs one node's operation, never in place (stored activations must stay intact)."""
        if kwargs.get("inplace"):
            kwargs = {**kwargs, "inplace": False}
        if node.op == "call_module":
            return self._module(node)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            name = node.target
            if name.endswith("_") and not name.endswith("__"):
                name = name[:-1]
            return getattr(args[0], name)(*args[1:], **kwargs)
        if node.op == "get_attr":
            return operator.attrgetter(node.target)(self.graph)
        raise ValueError(f"unexpected fx node kind {node.op}")


_SAVES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def saves_work(model: nn.Module, image: torch.Tensor, window: int, stride: int,
               copies_per_pass: int) -> bool:
    """Whether, by the engine's count on a batch of copies of `image` (1, C, H, W), a full pass
    costs MIN_SAVING times a copy or more; False if untraceable. Cached per model and geometry."""
    graph = trace(model)
    if graph is None:
        return False
    decided = _SAVES.setdefault(model, {})
    key = (tuple(image.shape[1:]), window, stride, copies_per_pass)
    if key not in decided:
        engine = Engine(graph)
        rows, cols = (window_starts(size, window, stride) for size in image.shape[-2:])
        starts = [(r, c) for r in rows for c in cols][:copies_per_pass]
        with engine_passes(model):
            engine.run_copies(engine.run_base(image[:1]), starts, window, 0.0)
        decided[key] = engine.counter.full_pass >= MIN_SAVING * engine.counter.per_copy()
    return decided[key]


def incremental_occlusion_map(model: nn.Module, images: torch.Tensor, target: torch.Tensor,
                              window: int, stride: int, baseline: float, copies_per_pass: int = 32,
                              mode: str = "exact", refine: float = APPROXIMATE_REFINE,
                              counter: Counter | None = None) -> torch.Tensor | None:
    """Captum's occlusion map of the target probability, (N, H, W), computed incrementally;
    None when the model cannot be traced (the caller then runs Captum). images: (N, C, H, W);
    each window covers all channels."""
    check_choice("mode", mode, MODES)
    check_fraction_key("refine", refine, high_inclusive=True)
    graph = trace(model)
    if graph is None:
        return None
    engine = Engine(graph, counter or Counter())
    with engine_passes(model):
        maps = [_one_map(engine, image[None], int(t), window, stride, baseline, copies_per_pass,
                         refine if mode == "approximate" else 1.0)
                for image, t in zip(images, target)]
    return torch.stack(maps)


def checkerboard(rows: int, cols: int) -> torch.Tensor:
    """(rows, cols) bool: the window positions drill-down computes first, every other one in a
    checkerboard, so each of the others has its four direct neighbours computed."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return (r + c) % 2 == 0


def fill_in(grid: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """The grid with each unknown cell set to the mean of its known direct neighbours."""
    cross = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=grid.dtype, device=grid.device)
    known = known.to(grid.dtype)
    total = F.conv2d((grid * known)[None, None], cross[None, None], padding=1)[0, 0]
    count = F.conv2d(known[None, None], cross[None, None], padding=1)[0, 0]
    return torch.where(known.bool(), grid, total / count.clamp(min=1))


def _one_map(engine: Engine, image: torch.Tensor, target: int, window: int, stride: int,
             baseline: float, copies_per_pass: int, refine: float) -> torch.Tensor:
    """One image's map: the mean probability drop over the windows covering each pixel; refine < 1
    drills down (the module's docstring), 1 computes every window."""
    base = engine.run_base(image)
    output = next(n for n in engine.graph.graph.nodes if n.op == "output")
    reference = fx.node.map_arg(output.args[0], lambda n: base[n])
    p_reference = reference.softmax(1)[0, target]
    rows, cols = (window_starts(size, window, stride) for size in image.shape[-2:])

    def drops(cells: list[tuple[int, int]]) -> torch.Tensor:
        """The probability drop of the windows at these (row, column) grid cells."""
        out = [p_reference - engine.run_copies(base, [(rows[r], cols[c]) for r, c in
                                                      cells[i:i + copies_per_pass]],
                                               window, baseline).softmax(1)[:, target]
               for i in range(0, len(cells), copies_per_pass)]
        return torch.cat(out).to(p_reference.dtype)

    cells = [(r, c) for r in range(len(rows)) for c in range(len(cols))]
    grid = torch.zeros(len(rows), len(cols), dtype=p_reference.dtype, device=image.device)
    if refine < 1:  # cells and boolean masks both run in row-major order
        first = checkerboard(len(rows), len(cols)).to(grid.device)
        flags = first.flatten().tolist()
        grid[first] = drops([cell for cell, f in zip(cells, flags) if f])
        grid = fill_in(grid, first)
        rest = [cell for cell, f in zip(cells, flags) if not f]
        largest = grid[~first].abs().argsort(descending=True)[:math.ceil(refine * len(rest))]
        cells = [rest[i] for i in largest.tolist()]
    if cells:
        grid[tuple(torch.tensor(cells).T)] = drops(cells)
    return spread(grid, window, stride, tuple(image.shape[-2:]))


def spread(grid: torch.Tensor, window: int, stride: int, size: tuple[int, int]) -> torch.Tensor:
    """The map: each pixel's mean over the windows covering it of their values (grid: one value
    per window position, windows at multiples of `stride`, the last ones clipped at the border)."""
    rows, cols = grid.shape
    padded = ((rows - 1) * stride + window, (cols - 1) * stride + window)
    columns = grid.reshape(1, 1, -1).expand(1, window * window, -1)
    total = F.fold(columns, padded, window, stride=stride)
    count = F.fold(torch.ones_like(columns), padded, window, stride=stride)
    return (total / count)[0, 0, :size[0], :size[1]]
