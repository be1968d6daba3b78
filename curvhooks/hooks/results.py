"""Results on the parameters: writing them, reusing unreferenced ones, clearing them.

An extension's result is any object (a tensor, or a tuple of Kronecker factors); it is set as
the extension's attribute on each trainable parameter. Clearing covers every attribute of
every extension class defined (``RESULT_ATTRIBUTES``), the user's own included.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from curvhooks.extensions import RESULT_ATTRIBUTES, Extension
from curvhooks.extensions.base import Target, is_unreferenced
from curvhooks.extensions.stacks import Stack
from curvhooks.hooks.calls import Call


class Results:
    """Writes the extensions' results, reusing the memory of earlier results nobody holds."""

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

    def write(self, call: Call, extensions: list[Extension], stacks: list[Stack]) -> None:
        """Set each extension's result, from its stack, on each trainable parameter of the
        call."""
        self.reduce(call, extensions, stacks)
        self.commit(call)

    def reduce(self, call: Call, extensions: list[Extension], stacks: list[Stack]) -> None:
        """Add each extension's result from one contribution to its stack (``stacks``) to
        the call's results of this pass."""
        for name, param in call.params:
            target = Target(call.derivatives, call.io, name)
            for ext, stack in zip(extensions, stacks):
                key = (name, ext.attribute)
                if key in call.results:
                    call.results[key] = ext.combine(call.results[key], ext.compute(target, stack))
                else:
                    previous = self._previous(param, ext.attribute)
                    call.results[key] = ext.compute(target, stack, previous)

    def commit(self, call: Call) -> None:
        """Set the call's results of this pass on its parameters."""
        params = dict(call.params)
        for (name, attribute), result in call.results.items():
            setattr(params[name], attribute, result)
        call.results = {}

    def _previous(self, param: nn.Parameter, attribute: str) -> Tensor | None:
        """The previous result on ``param`` if nobody else references it: the live attribute
        (a context held open over several passes) or one set aside on entry."""
        live = param.__dict__.get(attribute)
        if isinstance(live, Tensor):
            return live if is_unreferenced(live, references=2) else None  # __dict__, `live`
        return self._spare.pop((id(param), attribute), None)

    def clear(self) -> None:
        self._spare.clear()


def clear_results(model: nn.Module) -> None:
    """Remove every curvhooks result attribute from the model's parameters."""
    for param in model.parameters():
        for attribute in tuple(RESULT_ATTRIBUTES):
            param.__dict__.pop(attribute, None)


@contextmanager
def results_preserved(model: nn.Module) -> Iterator[None]:
    """Set the result attributes on the model's parameters aside for the block, then remove
    whatever results the block left and put the earlier ones back."""
    saved = [
        (param, attribute, param.__dict__.pop(attribute))
        for param in model.parameters()
        for attribute in tuple(RESULT_ATTRIBUTES)
        if attribute in param.__dict__
    ]
    try:
        yield
    finally:
        clear_results(model)
        for param, attribute, result in saved:
            setattr(param, attribute, result)
