"""Test settings of every extension class: ``tests/test_registry.py`` fails for an extension,
module or loss that is registered in curvhooks but has no test settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from curvhooks.extensions import (
    KFAC,
    KFLR,
    BatchDiagGGN,
    BatchGrad,
    BatchL2Grad,
    DiagGGN,
    DiagHessian,
    EigenCorrection,
    Extension,
    HessianBlock,
    Jacobian,
    KroneckerExtension,
    SqrtGGN,
    SumGradSquared,
    Variance,
)
from curvhooks.extensions.stacks import GGN_ROWS, GRADIENT


@dataclass(frozen=True)
class Setting:
    """One way to build an extension for a model; ``random`` where it draws random numbers
    (its results then depend on what else draws them)."""

    name: str
    build: Callable[[nn.Module], Extension]
    random: bool = False


def _random_eigenbases(model: nn.Module) -> dict[int, tuple[torch.Tensor, ...]]:
    """An orthonormal basis per side of every parameter's Kronecker factors (any basis does
    for ``EigenCorrection``'s contract)."""

    generator = torch.Generator().manual_seed(0)

    def basis(size: int, like: torch.Tensor) -> torch.Tensor:
        draw = torch.randn(size, size, dtype=like.dtype, generator=generator)
        return torch.linalg.qr(draw)[0]

    bases = {}
    for param in model.parameters():
        sides = (param.shape[0],) + ((param[0].numel(),) if param.dim() > 1 else ())
        bases[id(param)] = tuple(basis(side, param) for side in sides)
    return bases


EXTENSION_SETTINGS: dict[type[Extension], list[Setting]] = {
    BatchGrad: [Setting("BatchGrad", lambda m: BatchGrad())],
    BatchL2Grad: [Setting("BatchL2Grad", lambda m: BatchL2Grad())],
    SumGradSquared: [Setting("SumGradSquared", lambda m: SumGradSquared())],
    Variance: [Setting("Variance", lambda m: Variance())],
    SqrtGGN: [
        Setting("SqrtGGN", lambda m: SqrtGGN()),
        Setting("SqrtGGN-mc", lambda m: SqrtGGN(mc_samples=2), random=True),
    ],
    DiagGGN: [
        Setting("DiagGGN", lambda m: DiagGGN()),
        Setting("DiagGGN-mc", lambda m: DiagGGN(mc_samples=2), random=True),
    ],
    BatchDiagGGN: [
        Setting("BatchDiagGGN", lambda m: BatchDiagGGN()),
        Setting("BatchDiagGGN-mc", lambda m: BatchDiagGGN(mc_samples=2), random=True),
    ],
    DiagHessian: [Setting("DiagHessian", lambda m: DiagHessian())],
    HessianBlock: [Setting("HessianBlock", lambda m: HessianBlock())],
    Jacobian: [Setting("Jacobian", lambda m: Jacobian())],
    KFLR: [Setting("KFLR", lambda m: KFLR())],
    KFAC: [Setting("KFAC-mc", lambda m: KFAC(mc_samples=2), random=True)],
    KroneckerExtension: [
        Setting("Kronecker-empirical-reduce", lambda m: KroneckerExtension(GRADIENT, "reduce")),
    ],
    EigenCorrection: [
        Setting("EigenCorrection", lambda m: EigenCorrection(GGN_ROWS, _random_eigenbases(m))),
    ],
}
"""Every extension class, each with the settings every problem runs it with."""

SETTINGS = [setting for settings in EXTENSION_SETTINGS.values() for setting in settings]
