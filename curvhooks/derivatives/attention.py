"""``nn.MultiheadAttention``, its ``out_proj`` served with it (the call uses that child's
parameters without calling it).

The attention is ``out = A(q, k, v) W_o^T + b_o`` with the projections ``q = x_q W_q^T + b_q``
(``k``, ``v`` alike, the added key and value biases appended to ``k`` and ``v``) and a core
``A`` without parameters. A stack ``S`` at the output reaches the core's output as
``S W_o``, and its inputs by one reverse-mode product of the core over the batch (the core
acts on each sample alone), batched over the vectors; each sample's parameter products are
then sums over positions of outer products (``out_proj``: ``S`` with ``A``; the projections:
the stack at ``q``, ``k``, ``v`` with their inputs). The core is written out here as torch's
``F.multi_head_attention_forward`` computes it; stacks reach the inputs of the call by
autograd (``CallDerivatives``).

Each projection is a linear map, and takes the Kronecker factors of an ``nn.Linear`` on its
input with the stack at its output (``LinearDerivatives``): the packed projection is one map
of the input to query, key and value where the three are one tensor (self-attention), with
an output factor over all three; separate projections (``kdim``, ``vdim``) are three.

Every argument is covered: packed or separate query, key and value projections, biases,
``add_bias_kv``, ``add_zero_attn``, ``batch_first`` both ways, key padding masks, attention
masks shared by the batch (``[L, S]``) or per sample and head (``[N * H, L, S]``, recorded as
``[N, H, L, S]``), ``is_causal``, and ``need_weights`` both ways (the weights are an output
like the attention's own).
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vjp

from curvhooks.derivatives.base import ModuleIO
from curvhooks.derivatives.generic import CallDerivatives, batched
from curvhooks.derivatives.linear import LinearDerivatives
from curvhooks.errors import UnsupportedError

_SEQUENCES = ("query", "key", "value")


class MultiheadAttentionDerivatives(CallDerivatives):
    """``nn.MultiheadAttention`` (see the module docstring)."""

    serves_children = True
    has_kronecker_factors = True

    def samples_dim(self, module: nn.Module) -> int:
        return 0 if module.batch_first else 1

    def argument_dim(self, module: nn.Module, key: int | str, value: Tensor, batch: int):
        if isinstance(key, int):  # query, key and value (``prepare``)
            return self.samples_dim(module)
        if key == "key_padding_mask" or (key == "attn_mask" and value.dim() == 4):
            return 0
        return None

    def output_dims(self, module: nn.Module, outputs: list[object]) -> list[int | None]:
        """The attention's output, then its weights ``[N, (H,) L, S]``."""
        return [self.samples_dim(module)] + [0] * (len(outputs) - 1)

    def prepare(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Query, key and value by position, the rest by keyword; a per-head attention mask
        ``[N * H, L, S]`` as ``[N, H, L, S]``."""
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        query = bound["query"]
        if query.dim() != 3:
            raise UnsupportedError(
                f"MultiheadAttention was called on one unbatched sequence {tuple(query.shape)}: "
                "curvhooks serves batches of sequences; pass [N, L, E] (batch_first=True) or "
                "[L, N, E]"
            )
        if module.training and module.dropout > 0:
            raise UnsupportedError(
                f"MultiheadAttention(dropout={module.dropout}) is in training mode, where its "
                "output is random; call model.eval() first"
            )
        others = {name: value for name, value in bound.items() if name not in _SEQUENCES}
        mask = others.get("attn_mask")
        if mask is not None and mask.dim() == 3:
            others["attn_mask"] = mask.view(-1, module.num_heads, *mask.shape[1:])
        return tuple(bound[name] for name in _SEQUENCES), others

    def run(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        mask = kwargs.get("attn_mask")
        if mask is not None and mask.dim() == 4:
            kwargs = {**kwargs, "attn_mask": mask.flatten(0, 1)}
        return module.forward(*args, **kwargs)

    def _per_sample_products(self, io: ModuleIO, mat: Tensor) -> dict[str, Tensor]:
        """Name -> ``[V, N, *p.shape]`` (see the module docstring)."""
        return _products(io.module, _pulled(io, mat))

    def kronecker_weight(self, module: nn.Module, name: str) -> str | None:
        """Each projection's weight and bias take its factors, as ``nn.Linear``'s; the packed
        projections' bias with separate weights (``kdim``, ``vdim``) and the added key and
        value biases have none."""
        return _KRONECKER.get(name if module._qkv_same_embed_dim else f"separate {name}")

    def input_root(self, io: ModuleIO, approx: str, weight: str = "weight") -> Tensor:
        """That of an ``nn.Linear`` on the projection's input (see ``_as_linear``)."""
        return _LINEAR.input_root(_as_linear(io, weight), approx)

    def output_root(self, io: ModuleIO, mat: Tensor, approx: str, weight: str = "weight") -> Tensor:
        """That of an ``nn.Linear`` with the stack at the projection's output."""
        linear = _as_linear(io, weight)  # refuses the packed projection of several inputs
        pulled = _pulled(io, mat)
        at_q, at_k, at_v = pulled.at_projections
        stack = {
            "out_proj.weight": lambda: pulled.at_output,
            "in_proj_weight": lambda: torch.cat([at_q, at_k, at_v], -1),
            "q_proj_weight": lambda: at_q,
            "k_proj_weight": lambda: at_k,
            "v_proj_weight": lambda: at_v,
        }[weight]()
        return _LINEAR.output_root(linear, stack, approx)


_LINEAR = LinearDerivatives()
_KRONECKER = {
    "in_proj_weight": "in_proj_weight",
    "in_proj_bias": "in_proj_weight",
    "out_proj.weight": "out_proj.weight",
    "out_proj.bias": "out_proj.weight",
    **{f"separate {p}_proj_weight": f"{p}_proj_weight" for p in "qkv"},
    "separate out_proj.weight": "out_proj.weight",
    "separate out_proj.bias": "out_proj.weight",
}
"""Parameter -> the weight whose Kronecker factors it takes (``"separate "``: with separate
query, key and value projections)."""


def _as_linear(io: ModuleIO, weight: str) -> ModuleIO:
    """The record of an ``nn.Linear`` call that applies ``weight`` (its input the
    projection's: the attention core's output for ``out_proj``, the query, key or value
    sequence for the others), kept for the call. The packed projection is one such call only
    on one sequence for query, key and value (self-attention)."""
    key = ("as_linear", weight)
    if key not in io.cache:
        args, _ = io.call.arguments(io.call.tensors)
        module = io.module
        if weight == "out_proj.weight":
            inputs = _pulled(io, None).attended
        elif weight == "in_proj_weight" and several_inputs(module, args, {}):
            raise UnsupportedError(
                "Kronecker factors of MultiheadAttention's packed in_proj_weight need one "
                "input for query, key and value (self-attention); with several (cross-"
                "attention) the projection is three linear maps of different inputs, which one "
                "Kronecker product cannot hold: curvhooks.kfac gives them exact blocks (over "
                "a list or a DataLoader), or leave in_proj_weight and in_proj_bias of that "
                "module out (params=), or use the GGN extensions"
            )
        else:
            position = {"in_proj_weight": 0, "q_proj_weight": 0, "k_proj_weight": 1}.get(weight, 2)
            sequence = args[position]
            inputs = sequence if module.batch_first else sequence.transpose(0, 1)
        io.cache[key] = ModuleIO(module, inputs, None, inputs.shape, inputs.shape)
    return io.cache[key]


class _Pulled(NamedTuple):
    """A stack at one call's output, pulled back: the call's sequences batch first, the
    core's output ``attended`` ``[N, L, E]``, the stack at the output ``[V, N, L, E]`` and at
    the projections' outputs ``q``, ``k``, ``v`` (the added biases' positions last)."""

    sequences: tuple[Tensor, Tensor, Tensor]
    attended: Tensor
    at_output: Tensor | None
    at_inputs: tuple[Tensor, ...] | None

    @property
    def keys(self) -> int:
        """The key sequence's length S (the added biases' positions follow it)."""
        return self.sequences[1].shape[1]

    @property
    def at_projections(self) -> tuple[Tensor, Tensor, Tensor]:
        """The stacks at the projections' outputs ``q``, ``k``, ``v``, without the added
        biases' positions."""
        at_q, at_k, at_v = self.at_inputs
        return at_q, at_k[:, :, : self.keys], at_v[:, :, : self.keys]


def _pulled(io: ModuleIO, mat: Tensor | None) -> _Pulled:
    """The stack ``mat`` ``[V, N, D]`` at the joint output pulled back (see ``_Pulled``),
    computed once per stack; with ``mat=None`` only the forward parts, which the last
    stack's record holds."""
    cached = io.cache.get("pulled")
    if cached is not None and (mat is None or cached[0] is mat):
        return cached[1]
    module = io.module
    args, kwargs = io.call.arguments(io.call.tensors)
    weights = "" if not kwargs.get("need_weights", True) else "mean"
    if weights and not kwargs.get("average_attn_weights", True):
        weights = "heads"
    with torch.no_grad():
        parts = _projected(module, args, kwargs)
        core = partial(_core, module, parts.mask, weights)
        outputs, pullback = vjp(core, *parts.projections)
        attended, at_output, at_inputs = outputs[0], None, None
        if mat is not None:
            count, (batch, length, width) = len(mat), attended.shape
            at_output = mat[..., : length * width].view(count, batch, length, width)
            cotangents = [at_output @ module.out_proj.weight]
            if weights:
                cotangents.append(mat[..., length * width :].view(count, *outputs[1].shape))
            at_inputs = batched(pullback, tuple(cotangents), count)
    pulled = _Pulled(parts.sequences, attended, at_output, at_inputs)
    io.cache["pulled"] = (mat, pulled)
    return pulled


def several_inputs(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether a call of ``module`` (an ``nn.MultiheadAttention``) with ``args`` and ``kwargs``
    takes other tensors for query, key and value (cross-attention): its packed projection is
    then three linear maps of different inputs, without Kronecker factors."""
    bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    return not (bound["query"] is bound["key"] is bound["value"])


class _Projected(NamedTuple):
    """One call's sequences batch first ``[N, L or S, E_in]``, their projections ``q``, ``k``,
    ``v`` ``[N, L or S(+1), E]`` (the added biases appended), and the core's additive mask
    (``None``: none)."""

    sequences: tuple[Tensor, Tensor, Tensor]
    projections: tuple[Tensor, Tensor, Tensor]
    mask: Tensor | None


def _projected(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> _Projected:
    """The projections of one recorded call (see ``_Projected``)."""
    sequences = tuple(s if module.batch_first else s.transpose(0, 1) for s in args)
    if module._qkv_same_embed_dim:
        weights = module.in_proj_weight.chunk(3)
    else:
        weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    biases = (None,) * 3 if module.in_proj_bias is None else module.in_proj_bias.chunk(3)
    q, k, v = (F.linear(s, w, b) for s, w, b in zip(sequences, weights, biases))
    if module.bias_k is not None:
        batch = len(k)
        k = torch.cat([k, module.bias_k.expand(batch, 1, -1)], 1)
        v = torch.cat([v, module.bias_v.expand(batch, 1, -1)], 1)
    return _Projected(sequences, (q, k, v), _additive_mask(module, kwargs, q))


def _additive_mask(module: nn.MultiheadAttention, kwargs: dict, q: Tensor) -> Tensor | None:
    """The attention and key padding masks as one additive mask broadcastable against the
    scores ``[N, H, L, S']`` (``-inf`` where a boolean mask is true), padded with zeros for
    the added key bias and zero attention."""
    extra = (module.bias_k is not None) + module.add_zero_attn
    mask = None
    attention = kwargs.get("attn_mask")
    if attention is not None:
        mask = _as_additive(attention, q)  # [L, S] or [N, H, L, S]
    padding = kwargs.get("key_padding_mask")
    if padding is not None:
        padding = _as_additive(padding, q)[:, None, None, :]
        mask = padding if mask is None else mask + padding
    return None if mask is None else F.pad(mask, (0, extra))


def _as_additive(mask: Tensor, like: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(
            mask, -torch.inf
        )
    return mask.to(like.dtype)


def _core(
    module: nn.MultiheadAttention,
    mask: Tensor | None,
    weights: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
) -> tuple[Tensor, ...]:
    """The attention without parameters: ``A`` ``[N, L, E]`` of the heads side by side,
    and the weights ``[N, L, S']`` averaged over the heads (``weights="mean"``), ``[N, H, L,
    S']`` (``"heads"``) or none (``""``)."""
    batch, length, width = q.shape
    heads = module.num_heads
    size = width // heads

    def split(t: Tensor) -> Tensor:
        return t.view(batch, -1, heads, size).transpose(1, 2)  # [N, H, L, d]

    q, k, v = split(q) * size**-0.5, split(k), split(v)
    if module.add_zero_attn:
        zeros = k.new_zeros(batch, heads, 1, size)
        k, v = torch.cat([k, zeros], 2), torch.cat([v, zeros], 2)
    scores = q @ k.transpose(-2, -1)
    probabilities = torch.softmax(scores if mask is None else scores + mask, -1)
    attended = (probabilities @ v).transpose(1, 2).reshape(batch, length, width)
    if not weights:
        return (attended,)
    return attended, probabilities.mean(1) if weights == "mean" else probabilities


def _products(module: nn.MultiheadAttention, pulled: _Pulled) -> dict[str, Tensor]:
    """Each trainable parameter's per-sample products ``[V, N, *p.shape]`` from a stack
    pulled back (``_Pulled``)."""
    at_projections, at_output, keys = pulled.at_projections, pulled.at_output, pulled.keys
    by_projection = [
        torch.einsum("vnlo,nli->vnoi", stack, sequence)
        for stack, sequence in zip(at_projections, pulled.sequences)
    ]
    every = {
        "in_proj_weight": lambda: torch.cat(by_projection, 2),
        "q_proj_weight": lambda: by_projection[0],
        "k_proj_weight": lambda: by_projection[1],
        "v_proj_weight": lambda: by_projection[2],
        "in_proj_bias": lambda: torch.cat([s.sum(2) for s in at_projections], 2),
        "bias_k": lambda: pulled.at_inputs[1][:, :, keys:, None],
        "bias_v": lambda: pulled.at_inputs[2][:, :, keys:, None],
        "out_proj.weight": lambda: torch.einsum("vnlo,nli->vnoi", at_output, pulled.attended),
        "out_proj.bias": lambda: at_output.sum(2),
    }
    return {
        name: every[name]().clone(memory_format=torch.contiguous_format)
        for name, param in module.named_parameters()
        if param.requires_grad
    }
