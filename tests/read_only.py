"""A test mode for the read-only contract between derivatives and extensions.

Inside ``read_only_checked()``, every registered module's and loss's derivatives method and
every given extension's ``compute`` is wrapped: it fails the test where it changed a tensor it
did not create (the stack, the recorded input and output, the cache's tensors, the module's
parameters, the loss's output and targets; seen by their ``_version`` counters, which views
share), and where a parameter method returns a tensor sharing memory with one of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import wraps

from torch import Tensor

from curvhooks.derivatives import LOSS_DERIVATIVES, MODULE_DERIVATIVES, ModuleIO
from curvhooks.extensions import Extension
from curvhooks.extensions.gram import Gram

MODULE_METHODS = (
    "jac_t_mat_prod",
    "jacobian_diagonal",
    "hessian_residual",
    "residual_roots",
    "param_jac_t_mat_prod",
    "param_jac_t_mat_prod_summed",
    "param_sq_sum",
    "param_sq_norm",
    "input_root",
    "output_root",
)
FRESH_RESULTS = {
    "param_jac_t_mat_prod",
    "param_jac_t_mat_prod_summed",
    "param_sq_sum",
    "param_sq_norm",
}
"""Methods whose result belongs to the caller: it shares memory with nothing they were given
or keep."""
LOSS_METHODS = ("sqrt_hessian", "sqrt_hessian_mc", "sqrt_hessian_rows")


def _tensors(values: Iterable[object]) -> Iterator[Tensor]:
    """The tensors in ``values``, inside tuples, lists, dicts, ``ModuleIO`` and ``Gram``."""
    for value in values:
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from _tensors(value)
        elif isinstance(value, dict):
            yield from _tensors(value.values())
        elif isinstance(value, ModuleIO):
            yield from _tensors((value.input, value.output, value.cache))
            yield from value.module.parameters()
        elif isinstance(value, Gram):
            yield value.root


def _shares_memory(first: Tensor, second: Tensor) -> bool:
    return (
        first.numel() > 0
        and second.numel() > 0
        and first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
    )


def _checked(owner: str, name: str, method: Callable, fresh: bool) -> Callable:
    @wraps(method)
    def wrapper(*args, **kwargs):
        out = kwargs.get("out")
        given = [t for t in _tensors((*args, kwargs)) if t is not out]
        versions = [t._version for t in given]
        result = method(*args, **kwargs)
        for tensor, version in zip(given, versions):
            assert tensor._version == version, (
                f"{owner}.{name} wrote into a tensor it did not create, of shape "
                f"{list(tensor.shape)}"
            )
        if fresh and out is None:
            kept = list(_tensors((*args, kwargs)))  # also what the call cached
            assert not any(_shares_memory(result, t) for t in kept), (
                f"{owner}.{name} returned a tensor that shares memory with its arguments or "
                "its cache"
            )
        return result

    return wrapper


@contextmanager
def read_only_checked(extensions: Iterable[Extension] = ()) -> Iterator[None]:
    """Check the contract of every registered derivatives object and of ``extensions``."""
    patched = []
    for derivatives in {id(d): d for d in MODULE_DERIVATIVES.values()}.values():
        owner = type(derivatives).__name__
        for name in MODULE_METHODS:
            method = getattr(derivatives, name)
            patched.append((derivatives, name))
            setattr(derivatives, name, _checked(owner, name, method, name in FRESH_RESULTS))
    for derivatives in LOSS_DERIVATIVES.values():
        for name in LOSS_METHODS:
            method = getattr(derivatives, name)
            patched.append((derivatives, name))
            setattr(derivatives, name, _checked(type(derivatives).__name__, name, method, False))
    for extension in extensions:
        patched.append((extension, "compute"))
        extension.compute = _checked(repr(extension), "compute", extension.compute, False)
    try:
        yield
    finally:
        for obj, name in patched:
            del obj.__dict__[name]
