"""Independent references with plain ``torch.func`` on a model that carries no hooks.

``functional_call`` runs on a copy of the model: on a model holding one module twice (an
unrolled recurrence) it leaves plain tensors in place of that module's parameters (torch 2.13).

Scaling follows API.md: the reduced loss is ``L = s * sum_n l_n`` with ``l_n`` sample n's loss
under reduction ``"sum"``; per-sample quantities are those of ``s * l_n``.
"""

from __future__ import annotations

import copy

import torch
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

    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, X, y)


def _flat_jacobian(model: nn.Module, X: Tensor) -> Tensor:
    """Jacobian ``[N, C, D]`` of the batch output ``[N, C]`` (C = prod(out)) in the flat
    trainable parameters."""
    params, frozen, model = trainable(model), _frozen(model), copy.deepcopy(model)

    def output(params: dict) -> Tensor:
        return functional_call(model, {**params, **frozen}, (X,)).flatten(1)

    jac = jacrev(output)(params)
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
    owners = [name.rsplit(".", 1)[0] if structure == "layer" else name for name in params]
    sizes = [p.numel() for p in params.values()]
    labels = torch.repeat_interleave(torch.arange(len(owners)), torch.tensor(sizes))
    owner_ids = torch.tensor([owners.index(owner) for owner in owners])[labels]
    return matrix * (owner_ids[:, None] == owner_ids[None, :])


def hessian_blocks(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``{name: [p.numel(), p.numel()]}``: the Hessian's diagonal blocks per parameter."""
    full = hessian_matrix(model, loss_fn, X, y)
    sizes = [p.numel() for p in trainable(model).values()]
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return {
        name: full[start:stop, start:stop]
        for name, start, stop in zip(trainable(model), starts[:-1], starts[1:])
    }
