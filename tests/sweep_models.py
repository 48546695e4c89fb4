"""Random architectures for the property-based sweep (tests/test_property_sweep.py).

A drawn model is a :class:`ModelSpec`: the input shape, a tuple of block specs
and a :class:`LossSpec`.  Every spec is a frozen dataclass, so a failing case
prints (and shrinks) as a readable architecture.  :class:`SweepNet` is one real
``nn.Module`` class whose ``forward`` interprets the block specs; the specs are
Python constants, so ``torch.fx`` unrolls the interpretation into a plain graph
of module calls, functional calls and tensor methods, as in a hand-written model.

Shapes are tracked while drawing, so every drawn model is valid: a layer is only
drawn where its input shape admits it, and a train-mode BatchNorm always sees
more than one value per channel (the batch has at least 3 samples).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn

from conftest import randomize_bn

# A tensor's shape without the batch: (features,) for [N, F], (C, L...) otherwise.
Shape = Tuple[int, ...]

ACTIVATIONS = ("relu", "leaky_relu", "elu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid")
MAX_FEATURES = 400  # stop adding blocks beyond this width: keeps the reference cheap


# ----------------------------------------------------------------------------- block specs
@dataclass(frozen=True)
class Conv:
    dim: int
    cin: int
    cout: int
    k: int
    stride: int = 1
    padding: Union[int, str] = 0
    dilation: int = 1
    groups: int = 1
    bias: bool = True
    functional: bool = False   # F.conv{dim}d on parameters held by the model


@dataclass(frozen=True)
class BN:
    dim: int                   # spatial dims of the input: 0 for [N, C]
    c: int
    affine: bool = True
    track: bool = True         # track_running_stats
    train: bool = True
    functional: bool = False   # F.batch_norm on parameters and buffers held by the model


@dataclass(frozen=True)
class Act:
    kind: str
    functional: bool = False
    inplace: bool = False      # ReLU only: nn.ReLU(inplace=True) / F.relu(x, inplace=True)


@dataclass(frozen=True)
class Pool:
    kind: str                  # "max", "avg", "adaptive"
    dim: int
    k: int = 2
    stride: Optional[int] = None
    padding: int = 0
    dilation: int = 1          # max only
    ceil_mode: bool = False
    count_include_pad: bool = True  # avg only
    out: int = 1               # adaptive only
    functional: bool = False


@dataclass(frozen=True)
class Drop:
    p: float
    train: bool = True
    functional: bool = False   # F.dropout(x, p, training=train)


@dataclass(frozen=True)
class Linear:
    fin: int
    fout: int
    bias: bool = True
    functional: bool = False   # F.linear on parameters held by the model


@dataclass(frozen=True)
class ChannelMix:
    """Channels-last Linear: permute/transpose, ``Linear(C, cout)``, permute back."""

    dim: int
    cin: int
    cout: int
    via: str = "permute"       # "permute", "transpose", "movedim"


@dataclass(frozen=True)
class Glue:
    """A parameter-free op: ``nn_flatten``/``nn_identity`` are the modules, the
    others are written into the forward (``SweepNet._glue``)."""

    op: str
    arg: Union[int, float, Tuple[int, ...], None] = None


@dataclass(frozen=True)
class Merge:
    """Two branches of the same input joined: ``a(x) + b(x)`` (``how`` "add",
    "iadd" for ``out += ...``, "sub", "mul") or ``torch.cat([a(x), b(x)], 1)``.
    An empty branch is the identity (a skip connection)."""

    how: str
    a: Tuple = ()
    b: Tuple = ()


@dataclass(frozen=True)
class LossSpec:
    kind: str                  # "ce", "ce_prob", "mse", "bce"
    reduction: str = "mean"
    weight: Optional[str] = None    # ce: "class"; bce: "class" or "full"
    ignore_index: Optional[int] = None
    n_ignored: int = 0
    label_smoothing: float = 0.0
    pos_weight: bool = False


@dataclass(frozen=True)
class ModelSpec:
    batch: int
    in_shape: Shape
    blocks: Tuple
    loss: LossSpec
    freeze: Optional[int] = None    # index of a parameter with requires_grad=False
    seed: int = 0

    @property
    def out_shape(self) -> Shape:
        shape = self.in_shape
        for b in self.blocks:
            shape = block_shape(b, shape)
        return shape


# ----------------------------------------------------------------------------- shapes
def _meta(shape: Shape) -> Tensor:
    return torch.empty((2,) + tuple(shape), device="meta")


def block_shape(b, shape: Shape) -> Shape:
    """Shape (without the batch) after block ``b``."""
    if isinstance(b, (BN, Act, Drop)):
        return shape
    if isinstance(b, Conv):
        w = torch.empty(b.cout, b.cin // b.groups, *([b.k] * b.dim), device="meta")
        conv = (F.conv1d, F.conv2d, F.conv3d)[b.dim - 1]
        return tuple(conv(_meta(shape), w, None, b.stride, b.padding, b.dilation, b.groups).shape[1:])
    if isinstance(b, Pool):
        return tuple(_pool_fn(b)(_meta(shape)).shape[1:])
    if isinstance(b, Linear):
        return shape[:-1] + (b.fout,)
    if isinstance(b, ChannelMix):
        return (b.cout,) + shape[1:]
    if isinstance(b, Merge):
        a, c = _seq_shape(b.a, shape), _seq_shape(b.b, shape)
        return (a[0] + c[0],) + a[1:] if b.how == "cat" else a
    if isinstance(b, Glue):
        return _glue_shape(b, shape)
    raise TypeError(b)


def _seq_shape(blocks, shape: Shape) -> Shape:
    for b in blocks:
        shape = block_shape(b, shape)
    return shape


def _glue_shape(g: Glue, shape: Shape) -> Shape:
    op = g.op
    if op in ("neg", "div", "mul_const", "rmul_const", "sub_const", "add_const", "contiguous", "nn_identity"):
        return shape
    if op in ("flatten", "view", "reshape", "torch_flatten", "flatten_method", "nn_flatten"):
        return (math.prod(shape),)
    if op in ("mean_spatial", "sum_spatial"):
        return shape[:1]
    if op == "mean_last_keep":
        return shape[:-1] + (1,)
    if op == "sum_first_spatial":
        return shape[:1] + shape[2:]
    if op == "flatten_spatial":
        return (shape[0], math.prod(shape[1:]))
    if op == "to_seq":
        return tuple(g.arg)
    if op == "unsqueeze_channel":
        return (1,) + shape
    if op == "unsqueeze_spatial":
        return shape[:1] + (1,) + shape[1:]
    if op == "squeeze_spatial":
        return shape[:1] + shape[2:]
    if op == "slice_channels":
        return (g.arg,) + shape[1:]
    if op == "slice_last":
        return shape[:-1] + (shape[-1] - 1,)
    if op == "slice_step":
        return shape[:-1] + ((shape[-1] + 1) // 2,)
    raise ValueError(op)


def _pool_fn(p: Pool):
    if p.kind == "max":
        f = (F.max_pool1d, F.max_pool2d)[p.dim - 1]
        return lambda x: f(x, p.k, p.stride, p.padding, p.dilation, p.ceil_mode)
    if p.kind == "avg":
        f = (F.avg_pool1d, F.avg_pool2d)[p.dim - 1]
        return lambda x: f(x, p.k, p.stride, p.padding, p.ceil_mode, p.count_include_pad)
    f = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)[p.dim - 1]
    return lambda x: f(x, p.out)


# ----------------------------------------------------------------------------- the model
def _pool_module(p: Pool) -> nn.Module:
    if p.kind == "max":
        return (nn.MaxPool1d, nn.MaxPool2d)[p.dim - 1](p.k, p.stride, p.padding, p.dilation, ceil_mode=p.ceil_mode)
    if p.kind == "avg":
        return (nn.AvgPool1d, nn.AvgPool2d)[p.dim - 1](p.k, p.stride, p.padding, p.ceil_mode, p.count_include_pad)
    return (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)[p.dim - 1](p.out)


def _act_module(a: Act) -> nn.Module:
    return {"relu": lambda: nn.ReLU(inplace=a.inplace), "leaky_relu": lambda: nn.LeakyReLU(0.2),
            "elu": lambda: nn.ELU(0.7), "gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU("tanh"),
            "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[a.kind]()


def _act_functional(a: Act, x: Tensor) -> Tensor:
    if a.kind == "relu":
        return F.relu(x, inplace=True) if a.inplace else x.relu()
    if a.kind == "leaky_relu":
        return F.leaky_relu(x, 0.2)
    if a.kind == "elu":
        return F.elu(x, 0.7)
    if a.kind == "gelu":
        return F.gelu(x)
    if a.kind == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if a.kind == "silu":
        return F.silu(x)
    if a.kind == "tanh":
        return torch.tanh(x)
    return torch.sigmoid(x)


class SweepNet(nn.Module):
    """The model of a :class:`ModelSpec`.  Layers used as modules live in
    ``self.layers``; the parameters (and BatchNorm buffers) of functional calls
    are the model's own, registered under the block's key."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleDict()
        self._build(spec.blocks, "b")

    # -- construction ---------------------------------------------------------------
    def _build(self, blocks, prefix: str) -> None:
        for i, b in enumerate(blocks):
            key = f"{prefix}{i}"
            if isinstance(b, Merge):
                self._build(b.a, key + "a")
                self._build(b.b, key + "b")
            elif isinstance(b, Conv):
                conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[b.dim - 1](b.cin, b.cout, b.k, b.stride, b.padding,
                                                                    b.dilation, b.groups, b.bias)
                self._add(key, conv, b.functional)
            elif isinstance(b, BN):
                bn = (nn.BatchNorm1d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[b.dim](
                    b.c, affine=b.affine, track_running_stats=b.track)
                self._add(key, bn.train(b.train), b.functional)
            elif isinstance(b, Linear):
                self._add(key, nn.Linear(b.fin, b.fout, b.bias), b.functional)
            elif isinstance(b, ChannelMix):
                self.layers[key] = nn.Linear(b.cin, b.cout)
            elif isinstance(b, Pool) and not b.functional:
                self.layers[key] = _pool_module(b)
            elif isinstance(b, Act) and not b.functional:
                self.layers[key] = _act_module(b)
            elif isinstance(b, Drop) and not b.functional:
                self.layers[key] = nn.Dropout(b.p).train(b.train)
            elif isinstance(b, Glue) and b.op in ("nn_flatten", "nn_identity"):
                self.layers[key] = nn.Flatten() if b.op == "nn_flatten" else nn.Identity()

    def _add(self, key: str, module: nn.Module, functional: bool) -> None:
        """A module, or (functional) its parameters and buffers moved onto the model."""
        if not functional:
            self.layers[key] = module
            return
        for name, p in module.named_parameters():
            self.register_parameter(f"{key}_{name}", p)
        for name, buf in module.named_buffers():
            if name != "num_batches_tracked":
                self.register_buffer(f"{key}_{name}", buf)

    def _p(self, key: str, name: str) -> Optional[Tensor]:
        return getattr(self, f"{key}_{name}", None)

    # -- forward ----------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self._seq(self.spec.blocks, x, "b")

    def _seq(self, blocks, x: Tensor, prefix: str) -> Tensor:
        for i, b in enumerate(blocks):
            x = self._block(b, x, f"{prefix}{i}")
        return x

    def _block(self, b, x: Tensor, key: str) -> Tensor:
        if isinstance(b, Merge):
            return self._merge(b, x, key)
        if isinstance(b, Glue):
            return self.layers[key](x) if b.op.startswith("nn_") else self._glue(b, x)
        if isinstance(b, ChannelMix):
            return self._channel_mix(b, x, key)
        if not getattr(b, "functional", False):
            return self.layers[key](x)
        if isinstance(b, Conv):
            conv = (F.conv1d, F.conv2d, F.conv3d)[b.dim - 1]
            return conv(x, self._p(key, "weight"), self._p(key, "bias"), b.stride, b.padding, b.dilation, b.groups)
        if isinstance(b, BN):
            # As nn.BatchNorm does: batch statistics in training or without running stats.
            return F.batch_norm(x, self._p(key, "running_mean"), self._p(key, "running_var"),
                                self._p(key, "weight"), self._p(key, "bias"), b.train or not b.track, 0.1, 1e-5)
        if isinstance(b, Linear):
            return F.linear(x, self._p(key, "weight"), self._p(key, "bias"))
        if isinstance(b, Act):
            return _act_functional(b, x)
        if isinstance(b, Pool):
            return _pool_fn(b)(x)
        if isinstance(b, Drop):
            return F.dropout(x, b.p, training=b.train)
        raise TypeError(b)

    def _merge(self, b: Merge, x: Tensor, key: str) -> Tensor:
        out = self._seq(b.a, x, key + "a")
        other = self._seq(b.b, x, key + "b")
        if b.how == "cat":
            return torch.cat([out, other], dim=1)
        if b.how == "iadd":
            out += other
            return out
        if b.how == "sub":
            return out - other
        if b.how == "mul":
            return out * other
        return out + other

    def _channel_mix(self, b: ChannelMix, x: Tensor, key: str) -> Tensor:
        lin = self.layers[key]
        if b.via == "transpose":
            return lin(x.transpose(1, -1)).transpose(1, -1)
        if b.via == "movedim":
            return lin(x.movedim(1, -1)).movedim(-1, 1)
        order = (0,) + tuple(range(2, b.dim + 2)) + (1,)
        back = (0, b.dim + 1) + tuple(range(1, b.dim + 1))
        return lin(x.permute(*order)).permute(*back)

    @staticmethod
    def _glue(g: Glue, x: Tensor) -> Tensor:
        op = g.op
        if op == "neg":
            return -x
        if op == "div":
            return x / g.arg
        if op == "mul_const":
            return x * g.arg
        if op == "rmul_const":
            return g.arg * x
        if op == "sub_const":
            return x - g.arg
        if op == "add_const":
            return x + g.arg
        if op == "contiguous":
            return x.contiguous()
        if op == "flatten":
            return x.flatten(1)
        if op == "view":  # a view needs a contiguous input (after a permute or a slice)
            return x.contiguous().view(x.size(0), -1)
        if op == "reshape":
            return x.reshape(x.shape[0], -1)
        if op == "torch_flatten":
            return torch.flatten(x, 1)
        if op == "flatten_method":
            return x.flatten(start_dim=1)
        if op == "mean_spatial":  # arg: the spatial dims (fx cannot read x.dim())
            return x.mean(dim=g.arg)
        if op == "sum_spatial":
            return x.sum(dim=g.arg)
        if op == "mean_last_keep":
            return x.mean(-1, keepdim=True)
        if op == "sum_first_spatial":
            return x.sum(2)
        if op == "flatten_spatial":
            return x.flatten(2)
        if op == "to_seq":
            return x.contiguous().view(x.size(0), *g.arg)
        if op == "unsqueeze_channel":
            return x.unsqueeze(1)
        if op == "unsqueeze_spatial":
            return torch.unsqueeze(x, 2)
        if op == "squeeze_spatial":
            return x.squeeze(2)
        if op == "slice_channels":
            return x[:, :g.arg]
        if op == "slice_last":
            return x[..., 1:]
        if op == "slice_step":
            return x[..., ::2]
        raise ValueError(op)


# ----------------------------------------------------------------------------- data
def build_case(spec: ModelSpec):
    """``(model, loss_fn, x, y)`` in float64, everything seeded by ``spec.seed``."""
    torch.manual_seed(spec.seed)
    model = SweepNet(spec).double()
    randomize_bn(model, spec.seed)
    _randomize_functional_bn(model, spec)
    if spec.freeze is not None:
        params = list(model.parameters())
        if len(params) > 1:
            params[spec.freeze % len(params)].requires_grad_(False)
    gen = torch.Generator().manual_seed(spec.seed + 1)
    x = torch.randn((spec.batch,) + spec.in_shape, generator=gen, dtype=torch.float64)
    loss_fn, y = _loss_and_target(spec.loss, (spec.batch,) + spec.out_shape, gen)
    return model, loss_fn, x, y


def _randomize_functional_bn(model: SweepNet, spec: ModelSpec) -> None:
    """What :func:`randomize_bn` does for a BatchNorm module, for the
    parameters and buffers of an ``F.batch_norm`` call."""
    gen = torch.Generator().manual_seed(spec.seed + 2)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
            elif name.endswith("running_mean"):
                t.copy_(0.2 * torch.randn(t.shape, generator=gen))


def _loss_and_target(ls: LossSpec, out: Tuple[int, ...], gen: torch.Generator):
    """The loss module and a target for an output of shape ``out``."""
    classes = out[1]
    pos = torch.Size(out[:1] + out[2:])  # the positions: [N, ...] without the class dim
    cshape = (-1,) + (1,) * (len(out) - 2)

    def positive(*shape):
        return 0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)

    if ls.kind == "mse":
        return nn.MSELoss(reduction=ls.reduction), torch.randn(out, generator=gen, dtype=torch.float64)
    if ls.kind == "bce":
        weight = None if ls.weight is None else \
            positive(classes).view(cshape) if ls.weight == "class" else positive(*out)
        pos_weight = positive(classes).view(cshape) if ls.pos_weight else None
        loss = nn.BCEWithLogitsLoss(weight=weight, reduction=ls.reduction, pos_weight=pos_weight)
        return loss, torch.rand(out, generator=gen, dtype=torch.float64)
    weight = positive(classes) if ls.weight else None
    if ls.kind == "ce_prob":
        y = torch.softmax(2 * torch.randn(out, generator=gen, dtype=torch.float64), dim=1)
        return nn.CrossEntropyLoss(weight=weight, reduction=ls.reduction, label_smoothing=ls.label_smoothing), y
    y = torch.randint(0, classes, pos, generator=gen)
    kwargs = {}
    if ls.ignore_index is not None:
        kwargs["ignore_index"] = ls.ignore_index
        flat = y.view(-1)
        # Keep position 0 valid: a mean over no valid target is NaN.
        flat[1:1 + ls.n_ignored] = ls.ignore_index
        flat[0] = 0  # never the ignored index (-100 or 1)
    loss = nn.CrossEntropyLoss(weight=weight, reduction=ls.reduction, label_smoothing=ls.label_smoothing, **kwargs)
    return loss, y


# ----------------------------------------------------------------------------- strategies
_bools = st.booleans()
_small = st.integers(1, 4)


@st.composite
def conv_blocks(draw, shape: Shape, keep_spatial: bool = False):
    """A convolution valid for input ``shape``; ``keep_spatial``: stride 1 and
    padding that keeps the spatial size (for branches that are merged)."""
    dim = len(shape) - 1
    cin = shape[0]
    groups = draw(st.sampled_from([g for g in (1, 2, 3, 4) if cin % g == 0]))
    cout = groups * draw(st.integers(1, max(1, 4 // groups)))
    functional = draw(_bools)
    bias = draw(_bools)
    if keep_spatial:
        k = draw(st.sampled_from((1, 3)))
        dilation = draw(st.sampled_from((1, 2)))
        padding = draw(st.sampled_from(("same", dilation * (k - 1) // 2)))
        return Conv(dim, cin, cout, k, 1, padding, dilation, groups, bias, functional)
    smallest = min(shape[1:])
    k = draw(st.integers(1, min(3, smallest + 2)))
    dilation = draw(st.sampled_from((1, 2)))
    padding = draw(st.sampled_from((0, 1, "same", "valid")))
    stride = 1 if padding == "same" else draw(st.sampled_from((1, 1, 2)))
    conv = Conv(dim, cin, cout, k, stride, padding, dilation, groups, bias, functional)
    if padding != "same" and smallest + 2 * (padding if isinstance(padding, int) else 0) < dilation * (k - 1) + 1:
        conv = replace(conv, padding=dilation * (k - 1) // 2 + 1)
    return conv


@st.composite
def pool_blocks(draw, shape: Shape):
    dim = len(shape) - 1
    kind = draw(st.sampled_from(("max", "avg", "adaptive", "avg", "adaptive")))
    functional = draw(_bools)
    smallest = min(shape[1:])
    if kind == "adaptive":
        return Pool("adaptive", dim, out=draw(st.integers(1, smallest)), functional=functional)
    k = draw(st.integers(1, min(3, smallest)))
    stride = draw(st.sampled_from((None, 1, 2)))
    padding = draw(st.integers(0, k // 2))
    ceil_mode = draw(_bools)
    if kind == "max":
        dilation = draw(st.sampled_from((1, 1, 2))) if 2 * (k - 1) + 1 <= smallest + 2 * padding else 1
        return Pool("max", dim, k, stride, padding, dilation, ceil_mode, functional=functional)
    return Pool("avg", dim, k, stride, padding, 1, ceil_mode, draw(_bools), functional=functional)


def _act(draw) -> Act:
    kind = draw(st.sampled_from(ACTIVATIONS))
    return Act(kind, draw(_bools), kind == "relu" and draw(st.booleans()))


def _bn(draw, shape: Shape) -> BN:
    return BN(len(shape) - 1 if len(shape) > 1 else 0, shape[0], draw(_bools), draw(_bools), draw(_bools),
              draw(_bools))


def _glue_options(shape: Shape, keep_shape: bool):
    """Parameter-free ops valid on ``shape``; ``keep_shape``: only those that keep it."""
    opts = [Glue("neg"), Glue("div", 2.5), Glue("mul_const", 0.7), Glue("rmul_const", -1.3),
            Glue("sub_const", 0.3), Glue("add_const", 0.5), Glue("contiguous"), Glue("nn_identity")]
    if keep_shape:
        return opts
    spatial = shape[1:]
    if spatial:
        # A 3-d map gets no fourth spatial dim (there are no 4-d layers).
        opts += [Glue("mean_last_keep"), Glue("flatten_spatial"),
                 Glue("unsqueeze_channel" if len(shape) < 4 else "contiguous")]
        if len(spatial) == 1 and len(shape) < 4:
            opts.append(Glue("unsqueeze_spatial"))
        if len(spatial) >= 2:
            opts.append(Glue("sum_first_spatial"))
            if spatial[0] == 1:
                opts.append(Glue("squeeze_spatial"))
        if shape[0] > 1:
            opts.append(Glue("slice_channels", shape[0] - 1))
        if spatial[-1] > 2:
            opts += [Glue("slice_last"), Glue("slice_step")]
    else:
        f = shape[0]
        opts.append(Glue("unsqueeze_channel"))
        for c in (2, 3, 4):
            if f % c == 0 and f // c >= 2:
                opts.append(Glue("to_seq", (c, f // c)))
        if f > 1:
            opts.append(Glue("slice_channels", f - 1))
    return opts


@st.composite
def blocks(draw, shape: Shape, keep: bool = False, depth: int = 0):
    """One block for input ``shape``; ``keep``: the block keeps the spatial size
    (inside a branch of a merge)."""
    spatial = len(shape) > 1
    kinds = ["bn", "act", "act", "drop", "glue"]
    if spatial:
        kinds += ["conv", "conv", "channel_mix"]
        if not keep and len(shape) <= 3:
            kinds += ["pool", "pool", "pool", "stage"]
        if not keep:
            kinds.append("linear")  # over the last dim ("any leading dims")
    else:
        kinds += ["linear", "linear"]
    if depth < 1:
        kinds += ["merge", "merge"]
    kind = draw(st.sampled_from(kinds))
    if kind == "conv":
        return (draw(conv_blocks(shape, keep)),)
    if kind == "bn":
        return (_bn(draw, shape),)
    if kind == "act":
        return (_act(draw),)
    if kind == "drop":
        return (Drop(draw(st.sampled_from((0.2, 0.5))), draw(st.sampled_from((True, True, False))), draw(_bools)),)
    if kind == "pool":
        return (draw(pool_blocks(shape)),)
    if kind == "linear":
        return (Linear(shape[-1], draw(st.integers(1, 6 if spatial else 4)), draw(_bools), draw(_bools)),)
    if kind == "channel_mix":
        return (ChannelMix(len(shape) - 1, shape[0], draw(_small), draw(st.sampled_from(("permute", "transpose",
                                                                                           "movedim")))),)
    if kind == "glue":
        return (draw(st.sampled_from(_glue_options(shape, keep))),)
    if kind == "stage":
        return draw(stage(shape))
    return (draw(merge(shape, depth)),)


@st.composite
def stage(draw, shape: Shape):
    """A convnet stage ``[Conv] -> [BatchNorm] -> ReLU -> MaxPool``: the runs the
    engine fuses (a Conv fuses in only on the data, with groups=1 and train-mode BatchNorm)."""
    out = []
    if draw(_bools):
        conv = Conv(len(shape) - 1, shape[0], draw(_small), 3, 1, 1, bias=draw(_bools), functional=draw(_bools))
        out.append(conv)
        shape = block_shape(conv, shape)
    if draw(_bools):
        out.append(BN(len(shape) - 1, shape[0], draw(_bools), draw(_bools), draw(_bools), draw(_bools)))
    out.append(Act("relu", draw(_bools), draw(_bools) and bool(out)))  # never in place on the data
    k = min(2, min(shape[1:]))
    out.append(Pool("max", len(shape) - 1, k, functional=draw(_bools)))
    return tuple(out)


def writes_safely_after(prev) -> bool:
    """Whether an in-place op may overwrite the output of block ``prev``, as in
    eager PyTorch: not the input of a sequence (it may be shared with a skip),
    not a view of one, not an output autograd saved for its own backward
    (ReLU, Tanh, Sigmoid)."""
    if isinstance(prev, (Conv, BN, Linear, Pool, ChannelMix, Merge)):
        return True
    if isinstance(prev, Drop):
        return prev.train
    return isinstance(prev, Glue) and prev.op in ("neg", "div", "mul_const", "rmul_const", "sub_const",
                                                   "add_const")


def _batch_stats(b) -> bool:
    return isinstance(b, BN) and (b.train or not b.track)


def _after_batch_stats_bn(out) -> bool:
    """Whether the next block reads a batch-statistics BatchNorm's output through
    scalar glue only.  A second batch-statistics BatchNorm there undoes the first
    one's affine map up to eps: the products along its parameters are ~1e-11
    of rounding noise, and no relative error can be asked of them (found by
    this sweep: hfopt 1.2e-9, reverse-over-reverse autograd 2.5e-9 from an
    explicit Jacobian)."""
    for b in reversed(out):
        if not _scalar_affine((b,)):
            return _batch_stats(b)
    return False


@st.composite
def sequence(draw, shape: Shape, n_max: int, keep: bool = False, depth: int = 0):
    out = []
    for _ in range(draw(st.integers(0, n_max))):
        for b in draw(blocks(shape, keep, depth)):
            if isinstance(b, Act) and b.inplace and not (out and writes_safely_after(out[-1])):
                b = replace(b, inplace=False)
            if isinstance(b, BN) and _after_batch_stats_bn(out):
                b = Act("tanh")
            try:
                new = block_shape(b, shape)
            except RuntimeError:  # no valid output for this input (too small)
                break
            out.append(b)
            shape = new
        if math.prod(shape) > MAX_FEATURES:
            break
    return tuple(out), shape


def _scalar_affine(blocks) -> bool:
    """Whether a branch is ``alpha * x + c`` (glue by constants only)."""
    return all(isinstance(b, Glue) and b.op in ("neg", "div", "mul_const", "rmul_const", "sub_const", "add_const",
                                                "contiguous", "nn_identity") or isinstance(b, Drop) and not b.train
               for b in blocks)


def _project(shape: Shape, c: int) -> Tuple:
    """A 1x1 convolution (or Linear) taking ``shape`` to ``c`` channels."""
    if len(shape) == 1:
        return (Linear(shape[0], c, bias=False),)
    return (Conv(len(shape) - 1, shape[0], c, 1, bias=False),)


@st.composite
def merge(draw, shape: Shape, depth: int):
    how = draw(st.sampled_from(("add", "iadd", "sub", "mul", "cat", "cat", "cat")))
    a, sa = draw(sequence(shape, 2, keep=True, depth=depth + 1))
    b, sb = draw(sequence(shape, 2, keep=True, depth=depth + 1))
    if how != "cat" and _scalar_affine(a) and _scalar_affine(b):
        # Both branches are alpha * x + c: x - (x - 0.3) is a constant, whose
        # curvature is rounding noise (no relative error can be asked of it).
        b = b + (Act("tanh"),)
    if how == "iadd" and not (a and writes_safely_after(a[-1])):
        a = a + (Glue("mul_const", 0.7),)
    if how != "cat" and sb[0] != sa[0]:  # a projection shortcut
        b = b + _project(sb, sa[0])
    return Merge(how, a, b)


@st.composite
def heads(draw, shape: Shape):
    """Glue that takes ``shape`` to [N, F]: flatten in its spellings, or pooling by mean/sum."""
    if len(shape) == 1:
        return ()
    op = draw(st.sampled_from(("nn_flatten", "flatten", "view", "reshape", "torch_flatten", "flatten_method",
                               "mean_spatial", "sum_spatial")))
    return (Glue(op, tuple(range(2, len(shape) + 1)) if op.endswith("_spatial") else None),)


@st.composite
def losses(draw):
    kind = draw(st.sampled_from(("ce", "ce", "ce_prob", "mse", "bce")))
    reduction = draw(st.sampled_from(("mean", "sum")))
    if kind == "mse":
        return LossSpec("mse", reduction)
    if kind == "bce":
        return LossSpec("bce", reduction, draw(st.sampled_from((None, "class", "full"))), pos_weight=draw(_bools))
    smoothing = draw(st.sampled_from((0.0, 0.0, 0.1, 0.3)))
    weight = draw(st.sampled_from((None, "class")))
    if kind == "ce_prob":
        return LossSpec("ce_prob", reduction, weight, label_smoothing=smoothing)
    ignore = draw(st.sampled_from((None, -100, 1)))
    n_ignored = draw(st.integers(0, 2)) if ignore is not None else 0
    return LossSpec("ce", reduction, weight, ignore, n_ignored, smoothing)


@st.composite
def models(draw):
    """A whole :class:`ModelSpec`: input, body, head, output layer and loss."""
    batch = draw(st.integers(3, 6))
    dim = draw(st.sampled_from((0, 1, 1, 2, 2, 3)))
    c = draw(_small)
    spatial = {0: (), 1: (draw(st.integers(4, 8)),), 2: (draw(st.integers(4, 6)), draw(st.integers(4, 6))),
               3: (3, 3, 3)}[dim]
    in_shape = (c,) + spatial if dim else (draw(st.integers(2, 6)),)
    body = ()
    if dim in (1, 2) and draw(_bools):  # a convnet's first stage, on the data: the fused runs
        body = draw(stage(in_shape))
    more, shape = draw(sequence(_seq_shape(body, in_shape), 6))
    body += more
    classes = draw(st.integers(2, 4))
    spatial_output = len(shape) == 2 and draw(st.integers(0, 3)) == 0
    if spatial_output:  # per-position outputs [N, K, L]: a 1x1 convolution head
        head = (Conv(1, shape[0], classes, 1, functional=draw(_bools)),)
    else:
        head = draw(heads(shape))
        shape = _seq_shape(head, shape)
        head += (Linear(shape[0], classes, draw(_bools), draw(_bools)),)
    loss = draw(losses())
    freeze = draw(st.one_of(st.none(), st.integers(0, 7)))
    return ModelSpec(batch, in_shape, body + head, loss, freeze, draw(st.integers(0, 2 ** 16)))
