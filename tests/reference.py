"""Independent references with plain ``torch.func`` on a model that carries no hooks.

``functional_call`` runs on a copy of the model: on a model holding one module twice (an
unrolled recurrence) it leaves plain tensors in place of that module's parameters (torch 2.13).

Scaling follows docs/concepts.md: the reduced loss is ``L = s * sum_n l_n`` with ``l_n``
sample n's loss under reduction ``"sum"``; per-sample quantities are those of ``s * l_n``.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap


def trainable(model: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters, by name, detached."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _frozen(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}


def reduction_scale(loss_fn: nn.Module, output: Tensor) -> float:
    """``s``: 1 for ``"sum"``; for ``"mean"`` 1 over the number of positions (cross-entropy on
    ``[N, C, *d]``) or of entries (MSE, BCE)."""
    if loss_fn.reduction == "sum":
        return 1.0
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return output.shape[1] / output.numel()
    return 1.0 / output.numel()


def _sum_loss(loss_fn: nn.Module) -> nn.Module:
    return type(loss_fn)(reduction="sum")


def per_sample_grads(
    model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor
) -> dict[str, Tensor]:
    """``{name: [N, *p.shape]}``: gradients of ``s * l_n``."""
    frozen, sum_loss = _frozen(model), _sum_loss(loss_fn)
    scale = reduction_scale(loss_fn, model(X))
    params, model = trainable(model), copy.deepcopy(model)

    def sample_loss(params: dict, x: Tensor, target: Tensor) -> Tensor:
        output = functional_call(model, {**params, **frozen}, (x[None],))
        return scale * sum_loss(output, target[None])

    try:
        return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, X, y)
    except RuntimeError:  # torch's recurrent kernels have no batching rule: one at a time
        per_sample = [grad(sample_loss)(params, X[n], y[n]) for n in range(len(X))]
        return {name: torch.stack([g[name] for g in per_sample]) for name in params}


def _flat_jacobian(model: nn.Module, X: Tensor) -> Tensor:
    """Jacobian ``[N, C, D]`` of the batch output ``[N, C]`` (C = prod(out)) in the flat
    trainable parameters."""
    params, frozen, model = trainable(model), _frozen(model), copy.deepcopy(model)

    def output(params: dict) -> Tensor:
        return functional_call(model, {**params, **frozen}, (X,)).flatten(1)

    try:
        jac = jacrev(output)(params)
    except RuntimeError:  # torch's recurrent kernels have no batching rule: row by row
        jac = jacrev(output, chunk_size=1)(params)
    return torch.cat([jac[name].flatten(2) for name in params], dim=2)


def jacobians(model: nn.Module, X: Tensor) -> dict[str, Tensor]:
    """``{name: [C, N, *p.shape]}``: per-sample Jacobians of the flattened output."""
    return split(_flat_jacobian(model, X).transpose(0, 1), model)


def _output_hessians(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """Hessian of the reduced loss in the output, one ``[C, C]`` block per sample: ``[N, C, C]``."""
    with torch.no_grad():
        output = model(X)
    hess = hessian(lambda out: loss_fn(out.view_as(output), y))(output.flatten(1))
    return torch.stack([hess[n, :, n, :] for n in range(output.shape[0])])


def ggn_per_sample(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """``[N, D, D]``: ``J_n^T H_n J_n`` over the flat trainable parameters."""
    jac = _flat_jacobian(model, X)
    return torch.einsum("ncd,nce,nef->ndf", jac, _output_hessians(model, loss_fn, X, y), jac)


def ggn_diagonal(
    model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor, per_sample: bool = False
) -> Tensor:
    """``[D]`` (``[N, D]`` per sample): the GGN's diagonal, from the per-sample Jacobians and
    a square root of each sample's loss Hessian (no ``[D, D]`` matrix: for models of
    millions of parameters)."""
    values, vectors = torch.linalg.eigh(_output_hessians(model, loss_fn, X, y))
    roots = vectors * values.clamp(min=0).sqrt()[:, None, :]  # H_n = R_n R_n^T
    squares = torch.einsum("nck,ncd->nkd", roots, _flat_jacobian(model, X)).square().sum(1)
    return squares if per_sample else squares.sum(0)


def ggn(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """``[D, D]``: the GGN of the reduced loss."""
    return ggn_per_sample(model, loss_fn, X, y).sum(0)


def split(flat: Tensor, model: nn.Module) -> dict[str, Tensor]:
    """Split the last dimension of ``flat`` into the trainable parameters' shapes."""
    params = trainable(model)
    pieces = flat.split([p.numel() for p in params.values()], dim=-1)
    return {
        name: piece.reshape(*flat.shape[:-1], *p.shape)
        for (name, p), piece in zip(params.items(), pieces)
    }


def hessian_matrix(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """``[D, D]``: the Hessian of the reduced loss in the flat trainable parameters.

    ``torch.func.hessian`` (forward over reverse), except for models where it is wrong
    (torch 2.13: through LayerNorm, and an Embedding's ``padding_idx`` row gets curvature):
    those take reverse-over-reverse autograd, much slower on convolutions."""
    params, frozen, model = trainable(model), _frozen(model), copy.deepcopy(model)
    shapes = [p.shape for p in params.values()]

    def loss(flat: Tensor) -> Tensor:
        pieces = flat.split([s.numel() for s in shapes])
        values = {name: piece.view(s) for name, piece, s in zip(params, pieces, shapes)}
        return loss_fn(functional_call(model, {**values, **frozen}, (X,)), y)

    point = torch.cat([p.flatten() for p in params.values()])
    if _forward_over_reverse_is_wrong(model):
        # vmap has no batching rule for GroupNorm's double backward (torch 2.13): loop there
        vectorize = not any(isinstance(m, nn.GroupNorm) for m in model.modules())
        return torch.autograd.functional.hessian(loss, point, vectorize=vectorize)
    return hessian(loss)(point)


def _forward_over_reverse_is_wrong(model: nn.Module) -> bool:
    return any(
        isinstance(m, (nn.LayerNorm, nn.GroupNorm))
        or (isinstance(m, nn.Embedding) and m.padding_idx is not None)
        for m in model.modules()
    )


def empirical_fisher(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """``[D, D]``: ``s * sum_n grad(l_n) grad(l_n)^T``."""
    grads = per_sample_grads(model, loss_fn, X, y)  # gradients of s * l_n
    flat = torch.cat([g.flatten(1) for g in grads.values()], dim=1)
    return flat.T @ flat / reduction_scale(loss_fn, model(X))


def restrict(matrix: Tensor, model: nn.Module, structure: str) -> Tensor:
    """Keep the diagonal blocks of ``structure`` (``"diag"``: the diagonal ``[D]``)."""
    if structure == "full":
        return matrix
    if structure == "diag":
        return matrix.diagonal()
    params = trainable(model)
    # a layer is a module: the model's own parameters (no dot in their names) form one
    owners = [_owner(name) if structure == "layer" else name for name in params]
    sizes = [p.numel() for p in params.values()]
    labels = torch.repeat_interleave(torch.arange(len(owners)), torch.tensor(sizes))
    owner_ids = torch.tensor([owners.index(owner) for owner in owners])[labels]
    return matrix * (owner_ids[:, None] == owner_ids[None, :])


def _owner(name: str) -> str:
    """The path of the module holding parameter ``name`` (``""``: the model itself)."""
    return name.rsplit(".", 1)[0] if "." in name else ""


def hessian_blocks(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``{name: [p.numel(), p.numel()]}``: the Hessian's diagonal blocks per parameter."""
    return parameter_blocks(hessian_matrix(model, loss_fn, X, y), model)


def parameter_blocks(matrix: Tensor, model: nn.Module) -> dict[str, Tensor]:
    """``{name: [p.numel(), p.numel()]}``: the diagonal blocks of a ``[D, D]`` matrix over
    the flat trainable parameters."""
    sizes = [p.numel() for p in trainable(model).values()]
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return {
        name: matrix[start:stop, start:stop]
        for name, start, stop in zip(trainable(model), starts[:-1], starts[1:])
    }


def kronecker_factors(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    layer: str,
    fisher: str = "type-2",
    approx: str = "expand",
) -> tuple[Tensor, Tensor]:
    """KFAC's ``(B, A)`` for the weight of the ``Linear``/``Conv`` module ``layer`` (called
    once), for the reduced loss on ``(X, y)``, in curvlinops' convention (type-2: each output
    row's Hessian root, its columns summed over a sample's rows; empirical: the gradient over
    ``sqrt(s)``). The layer's output gradients come from ``torch.func.vjp`` through a shift
    added to that output; convolution inputs are unfolded by a convolution with one-hot
    kernels."""
    model = copy.deepcopy(model)
    module = model.get_submodule(layer)
    seen = {}

    def shifted(module, args, output):
        seen["input"] = args[0].detach()
        return output + seen["shift"]

    def model_output(shift: Tensor) -> Tensor:
        seen["shift"] = shift
        return model(X)

    with torch.no_grad():
        zero = torch.zeros_like(module(_layer_input(model, module, X)))
    handle = module.register_forward_hook(shifted)
    output, pullback = torch.func.vjp(model_output, zero)
    handle.remove()
    roots = _output_roots(loss_fn, output.detach(), y, fisher)  # [V, N, *out]
    stack = torch.stack([pullback(root)[0] for root in roots])  # [V, N, *layer_out]
    x = _positions_last(module, seen["input"])  # [N, G, I, T]
    if isinstance(module, nn.Linear):
        stack = stack.reshape(*stack.shape[:2], -1, stack.shape[-1]).transpose(-1, -2)
    else:
        stack = stack.flatten(3)  # [V, N, O, T]
    x = x.mean(1)  # groups averaged, as curvlinops does: [N, I, T]
    if approx == "reduce":
        x, stack = x.mean(-1, keepdim=True), stack.sum(-1, keepdim=True)
    A = torch.einsum("nit,njt->ij", x, x) / (x.shape[0] * x.shape[2])
    return torch.einsum("vnot,vnpt->op", stack, stack), A


def _layer_input(model: nn.Module, module: nn.Module, X: Tensor) -> Tensor:
    seen = {}
    handle = module.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(X)
    handle.remove()
    return seen["x"]


def _output_roots(loss_fn: nn.Module, output: Tensor, y: Tensor, fisher: str) -> Tensor:
    """``[V, N, *out]``: the rows' Hessian roots (``"type-2"``; checked against
    ``torch.func.hessian``) or the gradient over ``sqrt(s)`` (``"empirical"``)."""
    scale = reduction_scale(loss_fn, output)
    if fisher == "empirical":
        return torch.func.grad(lambda out: loss_fn(out, y))(output)[None] / scale**0.5
    classes_dim = 1 if isinstance(loss_fn, nn.CrossEntropyLoss) else output.dim() - 1
    moved = output.movedim(classes_dim, -1)  # rows [N, *d, C]
    rows = moved.reshape(-1, moved.shape[-1])
    hess = hessian(lambda rows_: loss_fn(rows_.view_as(moved).movedim(-1, classes_dim), y))(rows)
    blocks = torch.stack([hess[r, :, r] for r in range(len(rows))])  # [R, C, C]
    if isinstance(loss_fn, nn.CrossEntropyLoss):  # curvlinops' root diag(sqrt p) - p sqrt(p)^T
        p = rows.softmax(-1)
        roots = (torch.diag_embed(p.sqrt()) - p[:, :, None] * p.sqrt()[:, None, :]) * scale**0.5
    else:
        roots = torch.diag_embed(blocks.diagonal(dim1=1, dim2=2).sqrt())
    torch.testing.assert_close(roots @ roots.mT, blocks, rtol=1e-10, atol=1e-12)
    columns = roots.reshape(*moved.shape, -1).movedim(-1, 0)  # [C (columns), N, *d, C]
    return columns.movedim(-1, classes_dim + 1)


def _positions_last(module: nn.Module, x: Tensor) -> Tensor:
    """A layer's input as ``[N, G, I, T]``: a Linear's features at each position; a
    convolution's patches (channel-major, then kernel offsets) per group."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], 1, -1, x.shape[-1]).transpose(-1, -2)
    channels, kernel = x.shape[1], module.kernel_size
    spatial = len(kernel)
    one_hot = torch.eye(math.prod(kernel), dtype=x.dtype).view(-1, 1, *kernel)
    convolution = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    patches = convolution(
        x,
        one_hot.repeat(channels, 1, *[1] * spatial),
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=channels,
    )  # [N, C * K, *out]
    return patches.reshape(x.shape[0], module.groups, -1, patches[0, 0].numel())
