"""``Reducer``: each extension's result from the stacks that reach a call, handed to a sink.

A parameter used by one call of the pass gets its results from that call's stacks. A
parameter used by several calls (``shared``) gets them from the calls' per-sample products
summed per sample and per vector (``SummedTarget``); its output gradients arrive at different
times and are summed as they come, and ``finish_shared`` hands its results to the sink once
the backward pass is over.
"""

from __future__ import annotations

from torch import Tensor, nn

from curvhooks.extensions import Extension
from curvhooks.extensions.base import SummedTarget, Target
from curvhooks.extensions.stacks import Stack, StackKind
from curvhooks.hooks.calls import Call
from curvhooks.hooks.sinks import Sink


class Reducer:
    """Reduces stacks into results and hands them to ``sink``."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self._gradients: dict[int, tuple[nn.Parameter, Tensor]] = {}
        self._shared: dict[tuple[int, str], tuple[nn.Parameter, Extension, object]] = {}

    def write(
        self, call: Call, extensions: list[Extension], stacks: list[Stack], shared: set[int]
    ) -> None:
        """Hand each extension's result, from its stack, to the sink for each parameter of
        the call that is not ``shared`` (ids)."""
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

    def commit(self, call: Call) -> None:
        """Hand the call's results of this pass to the sink."""
        params = dict(call.params)
        for (name, attribute), (ext, result) in call.results.items():
            self.sink.put(params[name], attribute, ext.finish(result))
        call.results = {}

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
        then hand every shared result to the sink."""
        for param, products in self._gradients.values():
            target = SummedTarget(param, [products])
            for ext in first_order:
                self._add_shared(param, ext, target, target.tokens[0])
        for (_, attribute), (param, ext, result) in self._shared.items():
            self.sink.put(param, attribute, ext.finish(result))
        self.clear()

    def clear(self) -> None:
        self._gradients.clear()
        self._shared.clear()

    def _add_shared(self, param: nn.Parameter, ext: Extension, target, stack) -> None:
        key = (id(param), ext.attribute)
        entry = self._shared.get(key)
        if entry is None:
            result = ext.compute(target, stack, self.sink.previous(param, ext.attribute))
        else:
            result = ext.combine(entry[2], ext.compute(target, stack))
        self._shared[key] = (param, ext, result)

    def _add(self, store: dict, key: object, param: nn.Parameter, ext, target, stack) -> None:
        """``store[key]``: ``(ext, its result from stack)``, combined with what it holds."""
        if key in store:
            store[key] = (ext, ext.combine(store[key][1], ext.compute(target, stack)))
        else:
            store[key] = (ext, ext.compute(target, stack, self.sink.previous(param, ext.attribute)))
