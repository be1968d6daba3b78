"""Sequence models: per-sample gradients and the Monte Carlo diagonal GGN through
``nn.MultiheadAttention`` and ``nn.LSTM`` against a plain backward pass and peers.

Run: ``python -m benchmarks.sequence [--repeats 5] [--problem NAME]``; writes
docs/benchmarks/sequence.md when it ran every problem.

- ``gpt2-block``: one pre-norm GPT-2 block (width 256, 4 heads, causal attention, GELU MLP of
  width 1,024) and a linear head to 64 classes per token, on 16 sequences of 128 tokens
  (``[16, 128, 256]`` inputs), cross-entropy over every token. Opacus runs the same block with
  its own attention layer (``DPMultiheadAttention``, the same weights, sequences first: its
  mask check fails for batch-first inputs).
- ``lstm``: a one-layer LSTM (32 inputs, 64 hidden) and a linear head to 10 classes per step,
  on 64 sequences of 32 steps, cross-entropy over every step. BackPACK runs it as a
  sequence of its own modules (one takes the output from the LSTM's tuple, one moves the
  classes to dimension 1), Opacus with its ``DPLSTM``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from benchmarks.common import (
    backpack_step,
    curvhooks_held_open,
    curvhooks_per_step,
    failing_build,
    opacus_step,
    optional,
    problems_main,
)
from curvhooks import BatchGrad, DiagGGN

WIDTH, HEADS, TOKENS, CLASSES = 256, 4, 128, 64


class Block(nn.Module):
    """A pre-norm GPT-2 block and a per-token head: logits ``[N, C, T]``."""

    def __init__(self) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(WIDTH)
        self.attention = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        self.mlp_norm = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(
            nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH)
        )
        self.head = nn.Linear(WIDTH, CLASSES)
        self.register_buffer("causal", torch.triu(torch.full((TOKENS, TOKENS), -torch.inf), 1))

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.attention_norm(x)
        first = self.attention.batch_first
        hidden = hidden if first else hidden.transpose(0, 1)
        mixed = self.attention(hidden, hidden, hidden, need_weights=False, attn_mask=self.causal)[0]
        x = x + (mixed if first else mixed.transpose(0, 1))
        x = x + self.mlp(self.mlp_norm(x))
        return self.head(x).transpose(1, 2)


class Recurrent(nn.Module):
    """A batch-first LSTM and a per-step head: logits ``[N, C, T]``."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(32, 64, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lstm(x)[0]).transpose(1, 2)


def gpt2_block() -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    X, y = torch.randn(16, TOKENS, WIDTH), torch.randint(0, CLASSES, (16, TOKENS))
    return Block().eval(), nn.CrossEntropyLoss(), X, y


def lstm() -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    X, y = torch.randn(64, 32, 32), torch.randint(0, 10, (64, 32))
    return Recurrent(), nn.CrossEntropyLoss(), X, y


PROBLEMS = {"gpt2-block": gpt2_block, "lstm": lstm}


def build_methods(problem: str, device: torch.device) -> dict[str, Callable[[], object]]:
    model, loss_fn, X, y = PROBLEMS[problem]()
    model, X, y = model.to(device), X.to(device), y.to(device)

    def backward() -> None:
        loss_fn(model(X), y).backward()

    methods = {
        "backward": backward,
        "curvhooks BatchGrad (context per step)": curvhooks_per_step(
            model, loss_fn, X, y, BatchGrad
        ),
        "curvhooks BatchGrad (context held open)": curvhooks_held_open(
            model, loss_fn, X, y, BatchGrad
        ),
        "curvhooks DiagGGN(mc_samples=1)": curvhooks_per_step(
            model, loss_fn, X, y, lambda: DiagGGN(mc_samples=1)
        ),
    }
    if optional("opacus"):
        methods["opacus BatchGrad"] = _opacus(problem, model, loss_fn, X, y)
    if problem == "lstm" and optional("backpack"):
        methods.update(_backpack(model, loss_fn, X, y))
    return methods


@failing_build
def _opacus(problem: str, model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor):
    """Opacus's step on the model with Opacus's own layer in place of the attention or LSTM
    (the same weights), in train mode: Opacus records activations only there (the models
    have no dropout)."""
    from opacus.layers import DPLSTM, DPMultiheadAttention

    own = copy.deepcopy(model)
    if problem == "gpt2-block":
        # batch_first=False: Opacus 1.6 checks attention masks against the wrong dimension
        own.attention = DPMultiheadAttention(WIDTH, HEADS, batch_first=False)
        own.attention.load_state_dict(model.attention.state_dict())
    else:
        own.lstm = DPLSTM(32, 64, batch_first=True)
        own.lstm.load_state_dict(model.lstm.state_dict())
    return opacus_step(own.to(X.device).train(), loss_fn, X, y)


def _backpack(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor):
    """BackPACK's ``BatchGrad`` and ``DiagGGNMC`` on the model as a sequence of its own
    modules (to take the output from the LSTM's tuple and move the classes to dimension 1),
    the same weights."""
    from backpack.custom_module.permute import Permute
    from backpack.custom_module.reduce_tuple import ReduceTuple
    from backpack.extensions import BatchGrad as BackpackBatchGrad
    from backpack.extensions import DiagGGNMC

    own = copy.deepcopy(model)
    chain = nn.Sequential(own.lstm, ReduceTuple(index=0), own.head, Permute(0, 2, 1))
    return {
        "backpack BatchGrad": backpack_step(chain, loss_fn, X, y, BackpackBatchGrad),
        "backpack DiagGGNMC(mc_samples=1)": backpack_step(chain, loss_fn, X, y, DiagGGNMC),
    }


PEERS = {
    "curvhooks BatchGrad": ("opacus BatchGrad", "backpack BatchGrad"),
    "curvhooks DiagGGN": ("backpack DiagGGNMC(mc_samples=1)",),
}


def _peers_of(method: str) -> tuple[str, ...]:
    return next((peers for prefix, peers in PEERS.items() if method.startswith(prefix)), ())


def main() -> None:
    problems_main(
        __spec__.name,
        build_methods,
        _peers_of,
        "sequence",
        "Sequence models: BatchGrad and DiagGGN through attention and LSTM",
        problems=list(PROBLEMS),
    )


if __name__ == "__main__":
    main()
