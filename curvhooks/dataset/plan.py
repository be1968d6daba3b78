"""What a dataset-level call computes, checked once: the kinds, the structure, the route, the
parameters and the blocks of the result.

Names arrive as strings from the user and are parsed here into enum members (``Kind``,
``Structure``, ``Route``), which every other module compares and carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
import torch.distributed as dist
from torch import Tensor, nn

from curvhooks.hooks.plan import check_params

DEFAULT_MAX_MEMORY = 4 * 2**30
"""Largest dense result (bytes) built without ``max_memory=`` raised: 4 GiB."""


class Kind(str, Enum):
    """A curvature matrix."""

    HESSIAN = "hessian"
    GGN = "ggn"
    EMPIRICAL_FISHER = "empirical_fisher"


class Structure(str, Enum):
    """Which entries of the ``[D, D]`` matrix are computed."""

    FULL = "full"
    LAYER = "layer"
    PARAM = "param"
    DIAG = "diag"


class Route(str, Enum):
    """How a dataset function computes: ``HOOKS`` picks ``CHAIN`` (the hooks' own backward
    pass along a chain of supported modules) where it applies and ``GRAPH`` (autograd's
    backward pass feeding the hooks) elsewhere; ``AUTOGRAD`` uses plain autograd only;
    ``AUTO`` picks per function."""

    AUTO = "auto"
    HOOKS = "hooks"
    CHAIN = "chain"
    GRAPH = "graph"
    AUTOGRAD = "autograd"


def parse(enum: type[Enum], value: object, name: str, allowed: tuple | None = None) -> Enum:
    """``value`` as a member of ``enum`` (among ``allowed``), else a ``ValueError``."""
    choices = tuple(member.value for member in (allowed or enum))
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return enum(value)


@dataclass(frozen=True)
class Layout:
    """The selected parameters and the diagonal blocks a structure keeps.

    Attributes:
        params: The parameters, in the order of the rows and columns.
        offsets: Start of each parameter's rows; ``offsets[-1]`` is D.
        blocks: For each diagonal block, the indices of its parameters (contiguous);
            one block of all parameters for ``FULL``.
        structure: The structure.
    """

    params: list[nn.Parameter]
    offsets: list[int]
    blocks: list[list[int]]
    structure: Structure

    @property
    def dim(self) -> int:
        return self.offsets[-1]

    @property
    def ids(self) -> set[int]:
        """The parameters' ids."""
        return {id(p) for p in self.params}

    def span(self, block: list[int]) -> slice:
        """The rows of a block."""
        return slice(self.offsets[block[0]], self.offsets[block[-1] + 1])

    def new_result(self) -> Tensor:
        """Zeros of the result's shape: ``[D]`` for ``DIAG``, else ``[D, D]``."""
        first = self.params[0]
        shape = (self.dim,) if self.structure is Structure.DIAG else (self.dim, self.dim)
        return torch.zeros(shape, dtype=first.dtype, device=first.device)


def layout(
    model: nn.Module, params: list[nn.Parameter] | None, structure: Structure, max_memory: int
) -> Layout:
    """Lay out the rows and blocks of the result; check it fits ``max_memory``."""
    params = selected_params(model, params)
    offsets = [0]
    for param in params:
        offsets.append(offsets[-1] + param.numel())
    result = Layout(params, offsets, _blocks(model, params, structure), structure)
    _check_memory(result, max_memory)
    return result


def selected_params(model: nn.Module, params: list[nn.Parameter] | None) -> list[nn.Parameter]:
    """``params`` (default: those that require grad) checked to be the model's, once each."""
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    params = list(params)
    if not params:
        raise ValueError("no parameters selected: the model has no parameter that requires grad")
    check_params(model, params)
    return params


def _blocks(model: nn.Module, params: list[nn.Parameter], structure: Structure) -> list[list[int]]:
    indices = list(range(len(params)))
    if structure is Structure.FULL:
        return [indices]
    if structure in (Structure.PARAM, Structure.DIAG):
        return [[index] for index in indices]
    return [block for _, block in layer_groups(model, params)]


def layer_groups(model: nn.Module, params: list[nn.Parameter]) -> list[tuple[str, list[int]]]:
    """The diagonal blocks of ``structure="layer"``: each run of consecutive ``params`` held by
    one module, as the module's name in ``model.named_modules()`` and the indices of its
    parameters in ``params``. A tied parameter belongs to the first module holding it."""
    owner: dict[int, str] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), name)
    groups: list[tuple[str, list[int]]] = []
    for index, param in enumerate(params):
        if groups and groups[-1][0] == owner[id(param)]:
            groups[-1][1].append(index)
        else:
            groups.append((owner[id(param)], [index]))
    return groups


def _check_memory(result: Layout, max_memory: int) -> None:
    if result.structure is Structure.DIAG:
        return
    itemsize = result.params[0].element_size()
    needed = result.dim**2 * itemsize
    if needed > max_memory:
        raise ValueError(
            f"the dense [{result.dim}, {result.dim}] result needs {needed / 2**30:.2f} GiB, more "
            f"than max_memory={max_memory / 2**30:.2f} GiB; use structure='diag' for the [D] "
            "diagonal, structure='layer' to compute only the per-layer blocks, pass params= "
            "to select fewer parameters, or raise max_memory"
        )


def layers(model: nn.Module, params: list[nn.Parameter] | None = None) -> list[tuple[str, int]]:
    """The diagonal blocks of ``structure="layer"`` as ``(name, size)``: per module holding
    selected parameters (a run of them, in the order of ``params``), its name and class (e.g.
    ``"features.0 (Conv2d)"``; the model itself by its class alone) and their total count.

    ``params`` defaults to the parameters that require grad, as in ``ggn``; the sizes then sum
    to D, the side of the dataset-level matrices.
    """
    model = unwrap(model)
    params = selected_params(model, params)
    found = []
    for name, block in layer_groups(model, params):
        kind = type(model.get_submodule(name)).__name__
        found.append((f"{name} ({kind})" if name else kind, sum(params[i].numel() for i in block)))
    return found


def layer_sizes(model: nn.Module, params: list[nn.Parameter] | None = None) -> list[int]:
    """The side of each diagonal block of ``structure="layer"``: per module holding selected
    parameters, their total count, in the order of ``params`` (see ``layers``); modules
    without selected parameters have no entry.

    ``params`` defaults to the parameters that require grad, as in ``ggn``; the sizes then sum
    to D, the side of the dataset-level matrices.
    """
    return [size for _, size in layers(model, params)]


def check_same_layout(plan: Layout, group: object) -> None:
    """Raise on every process alike if the processes' parameter counts differ (instead of
    hanging in a collective of mismatched sizes)."""
    if group is None:
        return
    sizes: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(sizes, [p.numel() for p in plan.params], group=group)
    if any(size != sizes[0] for size in sizes):
        totals = [sum(size) for size in sizes]
        raise ValueError(
            f"the processes' models differ: parameter counts per rank {totals} (per tensor "
            f"{sizes}); give every process the same model and params"
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (curvhooks combines results itself)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
