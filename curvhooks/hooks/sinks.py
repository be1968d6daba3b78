"""Where results go: ``ParameterAttributes``, the attributes of the public API
(``p.grad_batch``, ...), or ``BatchResults``, a table the dataset functions read, never
touching the model.

Both hand back the memory of an earlier result that nobody else holds, for an extension to
write into (as autograd does with ``.grad``): on these CPUs, page-faulting a fresh result of
hundreds of MB costs more than computing it.
"""

from __future__ import annotations

from torch import Tensor, nn

from curvhooks.extensions import RESULT_ATTRIBUTES
from curvhooks.extensions.base import is_unreferenced


class Sink:
    """Receives each parameter's result per extension attribute."""

    def put(self, param: nn.Parameter, attribute: str, result: object) -> None:
        """Set ``param``'s result of ``attribute``."""
        raise NotImplementedError

    def previous(self, param: nn.Parameter, attribute: str) -> Tensor | None:
        """An earlier result of ``param`` and ``attribute`` that nobody else holds, to write
        into, or ``None``."""
        raise NotImplementedError


class ParameterAttributes(Sink):
    """Results as attributes of the parameters (the public API of ``curvhooks.extend``)."""

    def __init__(self) -> None:
        self._spare: dict[tuple[int, str], Tensor] = {}

    def take(self, model: nn.Module) -> None:
        """Remove every result attribute from the model's parameters; keep those nobody else
        references, to write into later."""
        self._spare = {}
        for param in model.parameters():
            for attribute in tuple(RESULT_ATTRIBUTES):
                result = param.__dict__.pop(attribute, None)
                if isinstance(result, Tensor) and is_unreferenced(result, references=1):
                    self._spare[(id(param), attribute)] = result

    def put(self, param: nn.Parameter, attribute: str, result: object) -> None:
        setattr(param, attribute, result)

    def previous(self, param: nn.Parameter, attribute: str) -> Tensor | None:
        """The live attribute (a context held open over several passes) if nobody else
        references it, or one set aside on entering."""
        live = param.__dict__.get(attribute)
        if isinstance(live, Tensor):
            return live if is_unreferenced(live, references=2) else None  # __dict__, `live`
        return self._spare.pop((id(param), attribute), None)

    def clear(self) -> None:
        self._spare.clear()


class BatchResults(Sink):
    """Results of the current batch by parameter, for the dataset functions."""

    def __init__(self) -> None:
        self._results: dict[tuple[int, str], object] = {}
        self._spare: dict[tuple[int, str], object] = {}

    def get(self, param: nn.Parameter, attribute: str) -> object | None:
        """``param``'s result of ``attribute`` in this batch; ``None`` where it has none (its
        module was not called, or did not reach the loss)."""
        return self._results.get((id(param), attribute))

    def new_batch(self) -> None:
        """Forget the results of the last batch (their memory may serve the next)."""
        self._spare, self._results = self._results, {}

    def put(self, param: nn.Parameter, attribute: str, result: object) -> None:
        self._results[(id(param), attribute)] = result

    def previous(self, param: nn.Parameter, attribute: str) -> Tensor | None:
        earlier = self._spare.pop((id(param), attribute), None)
        if isinstance(earlier, Tensor) and is_unreferenced(earlier, references=1):
            return earlier
        return None
