"""``nn.RNN``, ``nn.LSTM`` and ``nn.GRU``: the recurrences written out step by step in plain
tensor operations (``torch.func`` cannot batch torch's fused kernels over samples), and
differentiated by ``torch.func`` on each call (``CallDerivatives``).

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
from torch.nn.utils.rnn import PackedSequence

from curvhooks.derivatives.generic import CallDerivatives
from curvhooks.errors import UnsupportedError

Cell = Callable[[Tensor, Tensor, tuple[Tensor, ...], dict[str, Tensor]], tuple[Tensor, ...]]


def _rnn_cell(nonlinearity: Callable[[Tensor], Tensor]) -> Cell:
    """``h' = f(x W_ih^T + b_ih + h W_hh^T + b_hh)``."""

    def step(inputs: Tensor, recurrent: Tensor, state: tuple[Tensor, ...], _) -> tuple[Tensor]:
        return (nonlinearity(inputs + recurrent),)

    return step


def _lstm_cell(inputs: Tensor, recurrent: Tensor, state: tuple[Tensor, ...], weights: dict):
    """Gates ``i, f, g, o`` from ``x W_ih^T + b_ih + h W_hh^T + b_hh``; ``c' = f c + i g``,
    ``h' = o tanh(c')``, projected by ``W_hr`` where the layer has one."""
    gate_in, gate_forget, cell, gate_out = (inputs + recurrent).chunk(4, -1)
    memory = torch.sigmoid(gate_forget) * state[1] + torch.sigmoid(gate_in) * torch.tanh(cell)
    hidden = torch.sigmoid(gate_out) * torch.tanh(memory)
    if "weight_hr" in weights:
        hidden = F.linear(hidden, weights["weight_hr"])
    return hidden, memory


def _gru_cell(inputs: Tensor, recurrent: Tensor, state: tuple[Tensor, ...], _) -> tuple[Tensor]:
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
    sequences = input if module.batch_first else input.transpose(0, 1)  # [N, T, I]
    states = _initial_states(module, sequences, hx)
    directions = 2 if module.bidirectional else 1
    finals = []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            state = tuple(s[index] for s in states)
            output, state = _one_direction(module, sequences, state, layer, direction)
            outputs.append(output)
            finals.append(state)
        sequences = torch.cat(outputs, -1)
    output = sequences if module.batch_first else sequences.transpose(0, 1)
    h_n = torch.stack([final[0] for final in finals])
    if module.mode != "LSTM":
        return output, h_n
    return output, (h_n, torch.stack([final[1] for final in finals]))


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
    module: nn.RNNBase, sequences: Tensor, state: tuple[Tensor, ...], layer: int, direction: int
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One layer in one direction over ``[N, T, I]``: its outputs ``[N, T, H]`` in the
    sequence's order, and its final state."""
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    weights = {
        name: getattr(module, name + suffix)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
        if hasattr(module, name + suffix)
    }
    if direction:
        sequences = sequences.flip(1)
    inputs = F.linear(sequences, weights["weight_ih"], weights.get("bias_ih"))
    cell = CELLS[module.mode]
    steps = []
    for step in range(sequences.shape[1]):
        recurrent = F.linear(state[0], weights["weight_hh"], weights.get("bias_hh"))
        state = cell(inputs[:, step], recurrent, state, weights)
        steps.append(state[0])
    output = torch.stack(steps, 1)
    return (output.flip(1) if direction else output), state


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
