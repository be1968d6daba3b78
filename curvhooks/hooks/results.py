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
from curvhooks.extensions.base import SummedTarget, Target, is_unreferenced
from curvhooks.extensions.stacks import Stack, StackKind
from curvhooks.hooks.calls import Call


class Results:
    """Writes the extensions' results, reusing the memory of earlier results nobody holds.

    A parameter used by one call of the pass gets its results from that call's stacks. A
    parameter used by several calls (``shared``) gets them from the calls' per-sample
    products summed per sample and per vector (``SummedTarget``); its output gradients arrive
    at different times and are summed as they come, and ``finish_shared`` writes its results
    once the backward pass is over.
    """

    def __init__(self) -> None:
        self._spare: dict[tuple[int, str], Tensor] = {}
        self._gradients: dict[int, tuple[nn.Parameter, Tensor]] = {}
        self._shared: dict[tuple[int, str], tuple[nn.Parameter, object]] = {}

    def take(self, model: nn.Module) -> None:
        """Remove every result attribute from the model's parameters; keep those nobody else
        references, to write into later."""
        self._spare = {}
        for param in model.parameters():
            for attribute in tuple(RESULT_ATTRIBUTES):
                result = param.__dict__.pop(attribute, None)
                if isinstance(result, Tensor) and is_unreferenced(result, references=1):
                    self._spare[(id(param), attribute)] = result

    def write(
        self, call: Call, extensions: list[Extension], stacks: list[Stack], shared: set[int]
    ) -> None:
        """Set each extension's result, from its stack, on each trainable parameter of the
        call that is not ``shared`` (ids)."""
        self.reduce(call, extensions, stacks, shared)
        self.commit(call)

    def reduce(
        self, call: Call, extensions: list[Extension], stacks: list[Stack], shared: set[int]
    ) -> None:
        """Add each extension's result from one contribution to its stack (``stacks``) to
        the call's results of this pass, for its parameters that are not ``shared``."""
        if not call.params:
            return
        serving = [
            (ext, stack)
            for ext, stack in zip(extensions, stacks)
            if ext.unsupported_reason(call.derivatives) is None  # else skipped on entering
        ]
        for name, param in call.params:
            if id(param) in shared:
                continue
            target = Target(call.derivatives, call.io, name)
            for ext, stack in serving:
                self._add(call.results, (name, ext.attribute), param, ext, target, stack)

    def reduce_shared(
        self,
        kind: StackKind,
        arrivals: list[tuple[Call, Stack]],
        extensions: list[Extension],
        shared: set[int],
    ) -> None:
        """Add the results of the ``shared`` parameters from one chunk of a stack of
        ``kind`` that arrived at several calls (the same vectors at each)."""
        uses: dict[int, list[tuple[nn.Parameter, Target, tuple[Tensor, ...], str]]] = {}
        for call, stack in arrivals:
            for name, param in call.params:
                if id(param) in shared:
                    target = Target(call.derivatives, call.io, name)
                    use = (param, target, kind.parts(stack), f"{name} of {call.describe()}")
                    uses.setdefault(id(param), []).append(use)
        for entries in uses.values():
            param = entries[0][0]
            names = ", ".join(dict.fromkeys(entry[3] for entry in entries))
            described = f"{names} ({len(entries)} calls)"
            target = SummedTarget.of(
                param, [e[1] for e in entries], [e[2] for e in entries], described
            )
            token = kind.from_parts(target.tokens)
            for ext in extensions:
                self._add_shared(param, ext, target, token)

    def add_gradient(self, call: Call, grad_output: Tensor, shared: set[int]) -> None:
        """Sum the per-sample gradient products of the call's ``shared`` parameters."""
        for name, param in call.params:
            if id(param) in shared:
                products = Target(call.derivatives, call.io, name).products(grad_output[None])
                previous = self._gradients.get(id(param))
                self._gradients[id(param)] = (
                    param,
                    products if previous is None else previous[1].add_(products),
                )

    def finish_shared(self, first_order: list[Extension]) -> None:
        """Compute the shared parameters' first-order results from their summed gradients,
        then set every shared result on its parameter."""
        for param, products in self._gradients.values():
            target = SummedTarget(param, [products])
            for ext in first_order:
                self._add_shared(param, ext, target, target.tokens[0])
        for (_, attribute), (param, result) in self._shared.items():
            setattr(param, attribute, result)
        self._gradients.clear()
        self._shared.clear()

    def _add_shared(self, param: nn.Parameter, ext: Extension, target, stack) -> None:
        key = (id(param), ext.attribute)
        entry = self._shared.get(key)
        if entry is None:
            result = ext.compute(target, stack, self._previous(param, ext.attribute))
        else:
            result = ext.combine(entry[1], ext.compute(target, stack))
        self._shared[key] = (param, result)

    def _add(self, store: dict, key: object, param: nn.Parameter, ext, target, stack) -> None:
        """``store[key]``: ``ext``'s result from ``stack``, combined with what it holds."""
        if key in store:
            store[key] = ext.combine(store[key], ext.compute(target, stack))
        else:
            store[key] = ext.compute(target, stack, self._previous(param, ext.attribute))

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
        self._gradients.clear()
        self._shared.clear()


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
