"""``nn.RNN``, ``nn.LSTM`` and ``nn.GRU``: the recurrences written out step by step in plain
tensor operations (``torch.func`` cannot batch torch's fused kernels over samples).

Each parameter enters through an affine map at every step: ``x_t W_ih^T + b_ih``,
``h_{t-1} W_hh^T + b_hh`` and LSTM's projection ``u_t W_hr^T``. A sample's parameter products
are sums over the steps of outer products of the stack at that map's output with its input.
The stacks there come from one reverse-mode product over the batch (the recurrence acts on
each sample alone), batched over the vectors: in the product with respect to zero tensors
added to each map's output ("probes"). Stacks reach the inputs of the call by autograd
(``CallDerivatives``).

Every argument is covered: several layers, both directions, ``batch_first`` both ways, with
and without biases, ``tanh`` and ``relu`` recurrences, LSTM projections (``proj_size``), and
initial states passed in or not. The outputs ``(output, h_n)`` (LSTM: ``(output, (h_n,
c_n))``) are joined into one per sample, so a model may use any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vjp
from torch.nn.utils.rnn import PackedSequence

from curvhooks.derivatives.base import ModuleIO
from curvhooks.derivatives.generic import CallDerivatives, batched
from curvhooks.errors import UnsupportedError

Cell = Callable[[Tensor, Tensor, tuple[Tensor, ...]], tuple[Tensor, ...]]
"""One step: the new state from the input's and the state's affine maps and the state."""
Probes = dict[str, Tensor]
"""Per layer and direction (``"_l0"``, ``"_l0_reverse"``, ...) and map (``"ih"``, ``"hh"``,
``"hr"``): the tensor ``[N, T, out]`` added to that map's outputs, in the order of steps."""


def _rnn_cell(nonlinearity: Callable[[Tensor], Tensor]) -> Cell:
    """``h' = f(x W_ih^T + b_ih + h W_hh^T + b_hh)``."""

    def step(inputs: Tensor, recurrent: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor]:
        return (nonlinearity(inputs + recurrent),)

    return step


def _lstm_cell(inputs: Tensor, recurrent: Tensor, state: tuple[Tensor, ...]):
    """Gates ``i, f, g, o`` from ``x W_ih^T + b_ih + h W_hh^T + b_hh``; ``c' = f c + i g``,
    ``h' = o tanh(c')`` (before any projection)."""
    gate_in, gate_forget, cell, gate_out = (inputs + recurrent).chunk(4, -1)
    memory = torch.sigmoid(gate_forget) * state[1] + torch.sigmoid(gate_in) * torch.tanh(cell)
    return torch.sigmoid(gate_out) * torch.tanh(memory), memory


def _gru_cell(inputs: Tensor, recurrent: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor]:
    """``r, z`` from ``x W_i^T + b_i + h W_h^T + b_h``; ``n = tanh(x W_in^T + b_in + r (h
    W_hn^T + b_hn))``, ``h' = (1 - z) n + z h``."""
    reset_in, update_in, new_in = inputs.chunk(3, -1)
    reset_h, update_h, new_h = recurrent.chunk(3, -1)
    reset = torch.sigmoid(reset_in + reset_h)
    update = torch.sigmoid(update_in + update_h)
    new = torch.tanh(new_in + reset * new_h)
    return (new + update * (state[0] - new),)


CELLS: dict[str, Cell] = {
    "RNN_TANH": _rnn_cell(torch.tanh),
    "RNN_RELU": _rnn_cell(torch.relu),
    "LSTM": _lstm_cell,
    "GRU": _gru_cell,
}


def recurrence(module: nn.RNNBase, input: Tensor, hx: Any = None) -> tuple[Tensor, Any]:
    """The outputs of ``module`` on ``input`` (and initial states ``hx``) as its ``forward``
    gives them, step by step in plain tensor operations."""
    return _run(module, None, input, hx)[0]


def _run(
    module: nn.RNNBase, probes: Probes | None, input: Tensor, hx: Any = None
) -> tuple[tuple[Tensor, Any], Probes]:
    """``recurrence`` with ``probes`` added (``None``: none), and each map's input in the
    order of steps, keyed as the probes."""
    sequences = input if module.batch_first else input.transpose(0, 1)  # [N, T, I]
    states = _initial_states(module, sequences, hx)
    directions = 2 if module.bidirectional else 1
    finals, seen = [], {}
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            state = tuple(s[layer * directions + direction] for s in states)
            added = None if probes is None else probes[suffix]
            output, state, seen[suffix] = _one_direction(module, sequences, state, suffix, added)
            outputs.append(output)
            finals.append(state)
        sequences = torch.cat(outputs, -1)
    output = sequences if module.batch_first else sequences.transpose(0, 1)
    h_n = torch.stack([final[0] for final in finals])
    if module.mode != "LSTM":
        return (output, h_n), seen
    return (output, (h_n, torch.stack([final[1] for final in finals]))), seen


def _initial_states(module: nn.RNNBase, sequences: Tensor, hx: Any) -> tuple[Tensor, ...]:
    """``(h_0,)`` (LSTM: ``(h_0, c_0)``), each ``[layers * directions, N, size]``; zeros
    where ``hx`` is ``None``."""
    if hx is not None:
        return tuple(hx) if module.mode == "LSTM" else (hx,)
    layers = module.num_layers * (2 if module.bidirectional else 1)
    batch = len(sequences)
    hidden = module.proj_size or module.hidden_size
    zeros = sequences.new_zeros(layers, batch, hidden)
    if module.mode != "LSTM":
        return (zeros,)
    return zeros, sequences.new_zeros(layers, batch, module.hidden_size)


def _one_direction(
    module: nn.RNNBase,
    sequences: Tensor,
    state: tuple[Tensor, ...],
    suffix: str,
    probes: dict[str, Tensor] | None,
) -> tuple[Tensor, tuple[Tensor, ...], dict[str, Tensor]]:
    """One layer in one direction over ``[N, T, I]``: its outputs ``[N, T, H]`` in the
    sequence's order, its final state, and each map's inputs in the order of steps."""
    weights = {name: getattr(module, name + suffix, None) for name in _PARAMETERS}
    if suffix.endswith("_reverse"):
        sequences = sequences.flip(1)
    probes = probes or {}
    inputs = _added(F.linear(sequences, weights["weight_ih"], weights["bias_ih"]), probes, "ih")
    cell = CELLS[module.mode]
    previous, unprojected = [], []
    for step in range(sequences.shape[1]):
        previous.append(state[0])
        recurrent = F.linear(state[0], weights["weight_hh"], weights["bias_hh"])
        state = cell(inputs[:, step], _added(recurrent, probes, "hh", step), state)
        if weights["weight_hr"] is not None:
            unprojected.append(state[0])
            projected = _added(F.linear(state[0], weights["weight_hr"]), probes, "hr", step)
            state = (projected, *state[1:])
    seen = {"ih": sequences, "hh": torch.stack(previous, 1)}
    if unprojected:
        seen["hr"] = torch.stack(unprojected, 1)
    output = torch.stack(previous[1:] + [state[0]], 1)
    return (output.flip(1) if suffix.endswith("_reverse") else output), state, seen


_PARAMETERS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")


def _zero_probes(module: nn.RNNBase, input: Tensor) -> Probes:
    """Zero probes for every map of ``module`` on ``input``."""
    batch, steps = (0, 1) if module.batch_first else (1, 0)
    gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1) * module.hidden_size
    shape = (input.shape[batch], input.shape[steps])
    probes = {}
    for layer in range(module.num_layers):
        for suffix in ("", "_reverse")[: 2 if module.bidirectional else 1]:
            maps = {"ih": gates, "hh": gates}
            if module.proj_size:
                maps["hr"] = module.proj_size
            probes[f"_l{layer}{suffix}"] = {k: input.new_zeros(*shape, n) for k, n in maps.items()}
    return probes


def _added(output: Tensor, probes: dict[str, Tensor], name: str, step: int | None = None):
    """``output`` plus the probe of map ``name`` (at ``step``), if any."""
    probe = probes.get(name)
    if probe is None:
        return output
    return output + (probe if step is None else probe[:, step])


class RecurrentDerivatives(CallDerivatives):
    """``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` (see the module docstring)."""

    def samples_dim(self, module: nn.Module) -> int:
        return 0 if module.batch_first else 1

    def argument_dim(self, module: nn.Module, key: int | str, value: Tensor, batch: int):
        """The sequences' ``samples_dim``; the initial states hold the samples in
        dimension 1."""
        return self.samples_dim(module) if key == 0 else 1

    def output_dims(self, module: nn.Module, outputs: list[object]) -> list[int | None]:
        """The output's ``samples_dim``, then the final states ``[layers * directions, N,
        size]``."""
        return [self.samples_dim(module)] + [1] * (len(outputs) - 1)

    def prepare(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The sequences and initial states by position; refuses packed or unbatched
        sequences and dropout in training mode."""
        inputs = (*args, *kwargs.values())
        name = type(module).__name__
        if isinstance(inputs[0], PackedSequence) or inputs[0].dim() != 3:
            raise UnsupportedError(
                f"{name} was called on a packed or unbatched sequence: curvhooks serves "
                "padded batches [N, T, I] (batch_first=True) or [T, N, I]; pad the sequences "
                "(torch.nn.utils.rnn.pad_sequence) and mask the loss's targets instead"
            )
        if module.training and module.dropout > 0 and module.num_layers > 1:
            raise UnsupportedError(
                f"{name}(dropout={module.dropout}) is in training mode, where its output is "
                "random; call model.eval() first"
            )
        return inputs, {}

    def run(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        return recurrence(module, *args)

    def _per_sample_products(self, io: ModuleIO, mat: Tensor) -> dict[str, Tensor]:
        """Name -> ``[V, N, *p.shape]`` (see the module docstring)."""
        module = io.module
        args, _ = io.call.arguments(io.call.tensors)

        def joint_of(probes: Probes) -> tuple[Tensor, Probes]:
            outputs, seen = _run(module, probes, *args)
            return self.joined(module, outputs), seen

        with torch.no_grad():
            _, pullback, seen = vjp(joint_of, _zero_probes(module, args[0]), has_aux=True)
            at = batched(pullback, mat, len(mat))[0]
        products = {}
        for name, param in module.named_parameters():
            if param.requires_grad:
                kind, layer = name.split("_l", 1)
                suffix, affine = "_l" + layer, kind[-2:]
                stack = at[suffix][affine]  # [V, N, T, out]
                products[name] = (
                    torch.einsum("vnto,nti->vnoi", stack, seen[suffix][affine])
                    if kind.startswith("weight")
                    else stack.sum(2)
                )
        return products
