"""``curvhooks.jacobians``: each sample's Jacobian of the model output in the parameters, with
no loss: by the hooks' ``Jacobian`` extension in one backward pass where they serve the model,
else (and when differentiable in the input) by ``torch.func``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvhooks.dataset.by_autograd import per_sample_jacobians
from curvhooks.dataset.plan import selected_params, unwrap
from curvhooks.errors import UnsupportedError
from curvhooks.extensions import Jacobian
from curvhooks.hooks import BatchResults, check_eval_mode, hooked


def jacobians(
    model: nn.Module,
    X: Tensor,
    params: list[nn.Parameter] | None = None,
    create_graph: bool = False,
) -> tuple[Tensor, Tensor]:
    """Each sample's Jacobian of the model's output in the parameters, and the output.

    Args:
        model: Any model acting on each sample alone (eval mode where it has batch
            statistics or randomness).
        X: The input batch ``[N, *in]``.
        params: The parameters (default: all that require grad); D is their total size.
        create_graph: Whether the results are differentiable in ``X`` (and ``X``'s producers);
            then by ``torch.func``.

    Returns:
        ``(J, f)``: ``J`` ``[N, C, D]`` with ``J[n, c, d]`` the derivative of output entry
        ``c`` of sample ``n`` (its output ``[*out]`` flattened to ``C`` entries) in parameter
        entry ``d`` (the parameters flattened and concatenated in order), and the output
        ``f`` ``[N, C]``; detached unless ``create_graph``.
    """
    model = unwrap(model)
    check_eval_mode(model)
    params = selected_params(model, params)
    frozen = any(not param.requires_grad for param in params)  # the hooks serve none
    found = None if create_graph or frozen else _by_hooks(model, X, params)
    if found is not None:
        return found
    with torch.enable_grad():
        output, parts = per_sample_jacobians(model, params, X, differentiable=create_graph)
    entries = (len(output), output[0].numel(), -1)
    jacobian = torch.cat([part.reshape(entries) for part in parts], -1)
    if not create_graph:
        output, jacobian = output.detach(), jacobian.detach()
    return jacobian, output.reshape(entries[:2])


def _by_hooks(
    model: nn.Module, X: Tensor, params: list[nn.Parameter]
) -> tuple[Tensor, Tensor] | None:
    """``(J [N, C, D], f [N, C])`` from the ``Jacobian`` extension, or ``None`` where the
    hooks do not serve the model."""
    with torch.no_grad():
        output = model(X)
    results = BatchResults()
    loss_fn = nn.MSELoss(reduction="sum")  # the Jacobian's stack starts at the output
    try:
        with hooked(model, loss_fn, (Jacobian(),), results, "auto", params) as hooks:
            results.new_batch()
            hooks.run_batch(X, torch.zeros_like(output))
    except UnsupportedError:
        return None
    entries, samples = output[0].numel(), len(output)
    parts = [results.get(param, Jacobian.attribute) for param in params]
    columns = [
        param.new_zeros(entries, samples, param.numel()) if part is None else part.flatten(2)
        for part, param in zip(parts, params)
    ]
    return torch.cat(columns, 2).transpose(0, 1), output.reshape(samples, entries)
