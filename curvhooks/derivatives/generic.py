"""Derivatives by ``torch.func`` on a module's own recorded call: ``CallDerivatives``, the
base of the modules whose math curvhooks runs as a function of their arguments
(``nn.MultiheadAttention``, the recurrent layers), and ``GenericDerivatives``, the fallback
for any module with parameters that curvhooks has no class for (a user's layer, a subclass
with its own ``forward``).

A call is recorded whole (``RecordedCall``): every argument, each tensor with the dimension
that holds the samples (``None`` where the batch shares it). Its outputs are joined into the
one tensor whose gradient the hooks follow (``CallDerivatives.join``): the output itself where
it is one tensor with the samples in dimension 0, else ``[N, D]``, every output's samples
flattened side by side, and the module hands on outputs re-made from it.

The module is a function of its arguments and parameters acting on each sample alone. Stacks
are pushed to the first argument by reverse-mode products over the batch, batched over the
vectors. The attention's and the recurrent layers' parameter products are analytic (their
own files); the fallback's are reverse-mode products of the call on each sample, batched over
the samples, one vector at a time, and its squared reductions accumulate vector by vector.

Nothing ``torch.func`` batches is served on trust: each such product (the pushes to the first
argument, the fallback's parameter products) is checked against one plain reverse-mode
product over the batch (a random combination of the vectors, summed over the samples), so a
batching rule that gets it wrong raises instead of giving a wrong number. The fallback also
runs the module again on its arguments at the forward pass, on the batch and on each sample
alone: a module that mixes samples or draws random numbers gives another output there, and
is refused. Modules with forward hooks of their own (which ``torch.func`` on ``forward``
would bypass), or holding one parameter under two names, are not served. The module's own
second derivatives are not known: the Hessian extensions refuse these modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map, tree_unflatten

from curvhooks.derivatives.base import ModuleDerivatives, ModuleIO
from curvhooks.errors import UnsupportedError
from curvhooks.functional import agree, check_weights, parameters_replaced

_PRODUCTS = "call_products"
_REDUCED = "call_reductions"


@dataclass(frozen=True)
class _Slot:
    """Where a tensor argument sits among a call's leaves: its index in ``tensors``."""

    index: int


@dataclass
class RecordedCall:
    """A module's call: its arguments' leaves, the tensors detached and kept once each (a
    tensor passed as query, key and value is one), and each tensor's dimension of the
    samples (``None``: shared by the batch)."""

    tensors: list[Tensor]
    dims: list[int | None]
    leaves: list[object]
    spec: TreeSpec

    def arguments(self, tensors: list[Tensor]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with ``tensors`` in place of the recorded ones."""
        leaves = [tensors[leaf.index] if isinstance(leaf, _Slot) else leaf for leaf in self.leaves]
        return tree_unflatten(leaves, self.spec)

    def sample(self, tensors: list[Tensor]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of one sample's call (a batch of one), from ``tensors`` that
        hold that sample alone (the shared ones whole)."""
        return self.arguments(
            [t if dim is None else t.unsqueeze(dim) for t, dim in zip(tensors, self.dims)]
        )

    @property
    def batched_tensors(self) -> int:
        """How many tensor arguments hold the samples."""
        return sum(dim is not None for dim in self.dims)

    def per_sample(self, batch: int) -> RecordedCall:
        """The call on arguments shared by the batch (samples dimension of size 1), as if
        each of ``batch`` samples made it."""
        tensors = [
            t if dim is None else t.expand(*t.shape[:dim], batch, *t.shape[dim + 1 :])
            for t, dim in zip(self.tensors, self.dims)
        ]
        return RecordedCall(tensors, self.dims, self.leaves, self.spec)


@dataclass
class _Pending:
    """Per-sample products from one stack not yet asked for, by parameter name: made by the
    derivatives, each handed over (and then the caller's) once."""

    stack: Tensor
    products: dict[str, Tensor]


class CallDerivatives(ModuleDerivatives):
    """A module's derivatives by ``torch.func`` on its recorded call (see the module
    docstring). Subclasses say where each argument and output holds the samples, and may
    run the module by a function of their own (``run``)."""

    needs_input = True
    whole_call = True
    second_derivatives = False

    def samples_dim(self, module: nn.Module) -> int:
        """The dimension of the first argument that holds the samples."""
        return 0

    def argument_dim(self, module: nn.Module, key: int | str, value: Tensor, batch: int):
        """The dimension of the samples in argument ``key`` (a position or a keyword), for
        every tensor in it; ``None`` where the batch shares it. By default the first
        argument's ``samples_dim``, else 0 for a tensor whose leading dimension is the batch."""
        if key == 0:
            return self.samples_dim(module)
        return 0 if value.dim() and value.shape[0] == batch else None

    def output_dims(self, module: nn.Module, outputs: list[object]) -> list[int | None]:
        """The dimension of the samples in each leaf of the output; by default 0."""
        return [0] * len(outputs)

    def prepare(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The arguments as recorded (``run`` takes them back); raises ``UnsupportedError``
        for a call the derivatives cannot serve. By default as passed."""
        return args, kwargs

    def run(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """The module's outputs from recorded arguments; by default its ``forward`` (no
        hooks: the recorder's would record the call)."""
        return module.forward(*args, **kwargs)

    def record(self, module: nn.Module, args: tuple, kwargs: dict) -> RecordedCall:
        """The call of ``module`` on ``args`` and ``kwargs``, as ``run`` takes it back."""
        args, kwargs = self.prepare(module, args, kwargs)
        if not args or not isinstance(args[0], Tensor):
            raise UnsupportedError(
                f"{type(module).__name__} was called without a tensor as its first argument; "
                "curvhooks serves calls on a batch of samples in the first argument"
            )
        batch = args[0].shape[self.samples_dim(module)]
        tensors, dims, slots = [], [], {}
        for key, value in [*enumerate(args), *kwargs.items()]:
            for leaf in tree_flatten(value)[0]:
                if isinstance(leaf, Tensor) and id(leaf) not in slots:
                    slots[id(leaf)] = _Slot(len(tensors))
                    tensors.append(leaf.detach())
                    dims.append(self.argument_dim(module, key, leaf, batch))
        leaves, spec = tree_flatten((args, kwargs))
        leaves = [slots[id(leaf)] if isinstance(leaf, Tensor) else leaf for leaf in leaves]
        return RecordedCall(tensors, dims, leaves, spec)

    def joined(self, module: nn.Module, output: Any) -> Tensor:
        """The module's outputs as one tensor (see the module docstring)."""
        leaves, _ = tree_flatten(output)
        dims = self.output_dims(module, leaves)
        if isinstance(output, Tensor) and dims == [0]:
            return output
        pieces = [(leaf, dim) for leaf, dim in zip(leaves, dims) if isinstance(leaf, Tensor)]
        batch = pieces[0][0].shape[pieces[0][1]]
        return torch.cat([leaf.movedim(dim, 0).reshape(batch, -1) for leaf, dim in pieces], 1)

    def joint_output(self, module: nn.Module, arguments: tuple[tuple, dict]) -> Tensor:
        """The joint output (``joined``) of the module run (``run``) on ``(args, kwargs)``."""
        return self.joined(module, self.run(module, *arguments))

    def join(self, module: nn.Module, output: Any) -> tuple[Tensor, Any]:
        """``(joint, outputs)``: the outputs joined (``joined``), and the outputs to hand on,
        re-made from the joint (each a fresh contiguous tensor) unless the joint is the
        output itself."""
        joint = self.joined(module, output)
        if joint is output:
            return joint, output
        leaves, spec = tree_flatten(output)
        dims = self.output_dims(module, leaves)
        tensors = [(i, leaf) for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
        sizes = [leaf.numel() // len(joint) for _, leaf in tensors]
        for (i, leaf), piece in zip(tensors, joint.split(sizes, 1)):
            moved = leaf.movedim(dims[i], 0).shape
            remade = piece.reshape(moved).movedim(0, dims[i])
            leaves[i] = remade.clone(memory_format=torch.contiguous_format)
        return joint, tree_unflatten(leaves, spec)

    def jac_t_mat_prod(self, io: ModuleIO, mat: Tensor) -> Tensor:
        """The stack pushed to the first argument (the only one holding the samples: a call
        with several is no link of a chain)."""
        call = io.call

        def joint_of(first: Tensor) -> Tensor:
            return self.joint_output(io.module, call.arguments([first, *call.tensors[1:]]))

        _, pullback = vjp(_without_parameters(io.module, joint_of), call.tensors[0])
        pushed = vmap(pullback)(mat)[0]
        _check_batching(io.module, mat, pushed, pullback)
        return pushed

    def param_jac_t_mat_prod(
        self, io: ModuleIO, name: str, mat: Tensor, out: Tensor | None = None
    ) -> Tensor:
        """Per-sample products ``[V, N, *p.shape]``; those of the module's other parameters
        from the same stack are computed with them and kept until asked for (once each)."""
        pending = io.cache.get(_PRODUCTS)
        if pending is None or pending.stack is not mat or name not in pending.products:
            pending = io.cache[_PRODUCTS] = _Pending(mat, self._per_sample_products(io, mat))
        products = pending.products.pop(name)
        return products if out is None else out.copy_(products)

    def _per_sample_products(self, io: ModuleIO, mat: Tensor) -> dict[str, Tensor]:
        """Name -> ``[V, N, *p.shape]``: each sample's products of the stack ``mat``
        ``[V, N, *joint]`` with the Jacobian of the joint output in each trainable
        parameter."""
        raise NotImplementedError


def batched(pullback: Callable[..., Any], cotangents: Any, count: int) -> Any:
    """``pullback`` of each of ``count`` vectors (``cotangents``: tensors ``[V, ...]``, or a
    tuple of them), stacked: by ``vmap``, or directly for one vector (``vmap``'s overhead on
    every operation of a long backward pass, a recurrence's, exceeds the product's cost)."""
    if count > 1:
        return vmap(pullback)(cotangents)
    return tree_map(lambda tensor: tensor[None], pullback(tree_map(lambda t: t[0], cotangents)))


def _trainable(module: nn.Module) -> list[str]:
    """The names of the module's parameters that require gradients (children's included)."""
    return [name for name, param in module.named_parameters() if param.requires_grad]


def _without_parameters(
    module: nn.Module, function: Callable[..., Tensor]
) -> Callable[..., Tensor]:
    """``function`` run with the module's parameters detached (products in the arguments
    only)."""
    detached = {id(param): param.detach() for param in module.parameters()}

    def run(*args: Tensor) -> Tensor:
        with parameters_replaced(module, detached):
            return function(*args)

    return run


class GenericDerivatives(CallDerivatives):
    """Any module with parameters, by ``torch.func`` on its recorded call (see the module
    docstring)."""

    generic = True

    def _per_sample_products(self, io: ModuleIO, mat: Tensor) -> dict[str, Tensor]:
        per_vector = list(self._by_vector(io, mat))
        products = [
            parts[0][None] if len(parts) == 1 else torch.stack(parts) for parts in zip(*per_vector)
        ]
        weights = check_weights(mat, (len(mat),))
        combined = [torch.einsum("v,vn...->...", weights, p) for p in products]
        self._check(io, mat, combined)
        return dict(zip(_trainable(io.module), products))

    def param_sq_sum(self, io: ModuleIO, name: str, mat: Tensor, per_sample: bool) -> Tensor:
        """Accumulated vector by vector: the products of all vectors at once (``[V, N,
        *p.shape]``) are never formed."""
        reduce = (lambda p: p.square()) if per_sample else (lambda p: p.square().sum(0))
        return self._reduced(io, mat, ("sq_sum", per_sample), reduce, name)

    def param_sq_norm(self, io: ModuleIO, name: str, mat: Tensor) -> Tensor:
        """Accumulated vector by vector, as ``param_sq_sum``."""
        return self._reduced(io, mat, ("sq_norm",), lambda p: p.square().flatten(1).sum(1), name)

    def _reduced(
        self,
        io: ModuleIO,
        mat: Tensor,
        kind: tuple,
        reduce: Callable[[Tensor], Tensor],
        name: str,
    ) -> Tensor:
        """Each parameter's ``reduce`` of its per-sample products ``[N, *p.shape]``, summed
        over the vectors; those of the module's other parameters are computed with it and
        kept until asked for (once each)."""
        key = (_REDUCED, *kind)
        pending = io.cache.get(key)
        if pending is None or pending.stack is not mat or name not in pending.products:
            weights = check_weights(mat, (len(mat),))
            sums, combined = None, None
            for index, parts in enumerate(self._by_vector(io, mat)):
                reduced = [reduce(part) for part in parts]
                weighted = [weights[index] * part.sum(0) for part in parts]
                sums = reduced if sums is None else [a.add_(b) for a, b in zip(sums, reduced)]
                combined = (
                    weighted
                    if combined is None
                    else [a.add_(b) for a, b in zip(combined, weighted)]
                )
            self._check(io, mat, combined)
            pending = io.cache[key] = _Pending(mat, dict(zip(_trainable(io.module), sums)))
        return pending.products.pop(name)

    def _by_vector(self, io: ModuleIO, mat: Tensor) -> Iterator[tuple[Tensor, ...]]:
        """Each vector's per-sample products ``[N, *p.shape]``, by trainable parameter
        (``_trainable``): reverse-mode products of the call on each sample, batched over
        the samples (nested ``vmap`` over the vectors too hits wrong batching rules, e.g. of
        ``prelu``'s backward in torch 2.13)."""
        module, call = io.module, io.call
        names = _trainable(module)
        points = [module.get_parameter(name).detach() for name in names]

        def sample_products(tensors: list[Tensor], vector: Tensor) -> tuple[Tensor, ...]:
            arguments = call.sample(tensors)
            _, pullback = vjp(lambda *values: self._joint_of(io, arguments, values)[0], *points)
            return pullback(vector)

        per_sample = vmap(sample_products, in_dims=(call.dims, 0))
        for vector in mat:
            yield per_sample(call.tensors, vector)

    def _joint_of(self, io: ModuleIO, arguments: tuple[tuple, dict], values: tuple) -> Tensor:
        """The joint output of the call on ``arguments``, the trainable parameters
        replaced by ``values``."""
        module = io.module
        replaced = {id(module.get_parameter(n)): v for n, v in zip(_trainable(module), values)}
        with parameters_replaced(module, replaced):
            return self.joint_output(module, arguments)

    def _check(self, io: ModuleIO, mat: Tensor, combined: list[Tensor]) -> None:
        """Raise unless ``combined`` (the products of the vectors weighted by
        ``check_weights``, summed over the samples) agree with one plain reverse-mode
        product over the batch."""
        arguments = io.call.arguments(io.call.tensors)
        points = [io.module.get_parameter(name).detach() for name in _trainable(io.module)]
        _, pullback = vjp(lambda *values: self._joint_of(io, arguments, values), *points)
        weights = check_weights(mat, (len(mat),))
        expected = pullback(torch.einsum("v,v...->...", weights, mat))
        if not all(agree(found, reference) for found, reference in zip(combined, expected)):
            raise _batching_refusal(io.module)

    @staticmethod
    def serves(module: nn.Module) -> bool:
        """Whether the fallback may serve ``module`` (asked before curvhooks hooks it)."""
        return _refusal_reason(module) is None

    def take_saved(self, io: ModuleIO, joint: Tensor) -> None:
        """At the forward pass, with the joint output: check that the module is a function of
        its arguments acting on each sample alone (before later modules may change its output
        in place)."""
        module, call = io.module, io.call
        tensors = [tensor.clone() for tensor in call.tensors]  # it may write into them

        def alone(*samples: Tensor) -> Tensor:
            return self.joint_output(module, call.sample(list(samples)))[0]

        try:
            with torch.no_grad():
                batched = self.joint_output(module, call.arguments(tensors))
                each = vmap(alone, in_dims=tuple(call.dims), randomness="different")(*tensors)
        except (TypeError, RuntimeError, ValueError) as error:
            raise _refusal(module, f"it fails when run again on its input ({error})") from error
        for where, value in (("on the batch", batched), ("on each sample alone", each)):
            if not agree(value, joint.detach()):
                raise _refusal(
                    module,
                    f"run again {where} it gives another output than in the forward pass (it "
                    "mixes samples or is random)",
                )


class DirectDerivatives(ModuleDerivatives):
    """Parameters that a module's own ``forward`` uses directly, without a module call the
    hooks could record (a container's: a vision transformer's class token and position
    embedding). The product of a stack with such a parameter is the stack pushed to the
    parameter itself, and the hooks push it there split per sample (one vector per sample and
    stacked vector, as to a call on a tensor shared by the batch): the output ``[N,
    *p.shape]`` of such a call is the parameter's per-sample derivative."""

    direct = True
    second_derivatives = False

    def param_jac_t_mat_prod(
        self, io: ModuleIO, name: str, mat: Tensor, out: Tensor | None = None
    ) -> Tensor:
        return mat.clone() if out is None else out.copy_(mat)


def _refusal_reason(module: nn.Module) -> str | None:
    """Why the fallback may not serve ``module``: forward hooks of its own (``weight_norm``,
    say), which ``torch.func`` on ``forward`` would bypass, or one parameter under several
    names; ``None`` if it may."""
    if module._forward_pre_hooks or module._forward_hooks:
        return "it has forward hooks of its own"
    names = dict(module.named_parameters(remove_duplicate=False))
    if len(names) != len(dict(module.named_parameters())):
        return "it holds one parameter under several names"
    return None


def _check_batching(module: nn.Module, mat: Tensor, pushed: Tensor, pullback: Callable) -> None:
    """Raise unless ``pushed`` ``[V, N, *in]`` (the stack ``mat`` pushed to the input, a
    vector at a time) agrees with one plain reverse-mode product of a random combination of
    the stack's vectors over the batch."""
    weights = check_weights(mat, (len(mat),))
    expected = pullback(torch.einsum("v,v...->...", weights, mat))[0]
    if not agree(torch.einsum("v,v...->...", weights, pushed), expected):
        raise _batching_refusal(module)


def _batching_refusal(module: nn.Module) -> UnsupportedError:
    return UnsupportedError(
        f"curvhooks serves {type(module).__name__} by torch.func, whose batched products "
        "disagree with a plain one over the batch (a batching rule of this torch version); "
        "pass unsupported='skip' to leave its parameters out, or use the dataset functions "
        "(autograd)"
    )


def _refusal(module: nn.Module, why: str) -> UnsupportedError:
    return UnsupportedError(
        f"{type(module).__name__} has no curvhooks derivatives, and the generic torch.func "
        f"fallback (a function of its arguments acting on each sample alone) cannot serve "
        f"it: {why}; pass generic=False and unsupported='skip' to leave its parameters out, "
        "or use the dataset functions (autograd)"
    )
