"""The math of each supported module and loss, one class per type, found by ``isinstance``."""

from __future__ import annotations

from torch import nn

from curvhooks.derivatives.activations import (
    ELUDerivatives,
    GELUDerivatives,
    LeakyReLUDerivatives,
    LogSigmoidDerivatives,
    ReLUDerivatives,
    SELUDerivatives,
    SigmoidDerivatives,
    SiLUDerivatives,
    SoftplusDerivatives,
    TanhDerivatives,
)
from curvhooks.derivatives.attention import MultiheadAttentionDerivatives
from curvhooks.derivatives.base import ModuleDerivatives, ModuleIO
from curvhooks.derivatives.batchnorm import BatchNormDerivatives
from curvhooks.derivatives.conv import ConvDerivatives
from curvhooks.derivatives.conv_transpose import ConvTransposeDerivatives
from curvhooks.derivatives.embedding import EmbeddingDerivatives
from curvhooks.derivatives.linear import LinearDerivatives
from curvhooks.derivatives.losses import (
    SUPPORTED_REDUCTIONS,
    BCEWithLogitsDerivatives,
    CrossEntropyDerivatives,
    LossDerivatives,
    MSEDerivatives,
    loss_gradient,
)
from curvhooks.derivatives.normalization import GroupNormDerivatives, LayerNormDerivatives
from curvhooks.derivatives.pooling import AvgPoolDerivatives, MaxPoolDerivatives
from curvhooks.derivatives.recurrent import RecurrentDerivatives
from curvhooks.derivatives.shape import (
    IdentityDerivatives,
    ReshapeDerivatives,
    ZeroPadDerivatives,
)

MODULE_DERIVATIVES: dict[type[nn.Module], ModuleDerivatives] = {
    nn.Linear: LinearDerivatives(),
    nn.Embedding: EmbeddingDerivatives(),
    nn.MultiheadAttention: MultiheadAttentionDerivatives(),
    **{recurrent: RecurrentDerivatives() for recurrent in (nn.RNN, nn.LSTM, nn.GRU)},
    **{conv: ConvDerivatives() for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d)},
    **{
        conv: ConvTransposeDerivatives()
        for conv in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    },
    **{norm: BatchNormDerivatives() for norm in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)},
    nn.LayerNorm: LayerNormDerivatives(),
    nn.GroupNorm: GroupNormDerivatives(),
    nn.ReLU: ReLUDerivatives(),
    nn.LeakyReLU: LeakyReLUDerivatives(),
    nn.ELU: ELUDerivatives(),
    nn.SELU: SELUDerivatives(),
    nn.GELU: GELUDerivatives(),
    nn.SiLU: SiLUDerivatives(),
    nn.Tanh: TanhDerivatives(),
    nn.Sigmoid: SigmoidDerivatives(),
    nn.Softplus: SoftplusDerivatives(),
    nn.LogSigmoid: LogSigmoidDerivatives(),
    nn.Flatten: ReshapeDerivatives(),
    nn.Unflatten: ReshapeDerivatives(),
    nn.Identity: IdentityDerivatives(),
    nn.Dropout: IdentityDerivatives(),
    nn.ZeroPad1d: ZeroPadDerivatives(),
    nn.ZeroPad2d: ZeroPadDerivatives(),
    nn.ZeroPad3d: ZeroPadDerivatives(),
    **{
        pool: AvgPoolDerivatives()
        for pool in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
        + (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
    },
    **{pool: MaxPoolDerivatives() for pool in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)},
}

LOSS_DERIVATIVES: dict[type[nn.Module], LossDerivatives] = {
    nn.CrossEntropyLoss: CrossEntropyDerivatives(),
    nn.MSELoss: MSEDerivatives(),
    nn.BCEWithLogitsLoss: BCEWithLogitsDerivatives(),
}


def _lookup(table: dict, obj: object):
    """The entry of the most specific class of ``obj`` in ``table`` (a registered subclass
    overrides its base), or ``None``; also ``None`` where ``obj``'s class overrides that
    class's ``forward`` (the derivatives are those of the registered ``forward``)."""
    registered = next((cls for cls in type(obj).__mro__ if cls in table), None)
    if registered is None or type(obj).forward is not registered.forward:
        return None
    return table[registered]


def module_derivatives(module: nn.Module) -> ModuleDerivatives | None:
    """The derivatives for ``module`` (subclasses included), or ``None`` if unsupported."""
    return _lookup(MODULE_DERIVATIVES, module)


def loss_derivatives(loss_fn: nn.Module) -> LossDerivatives | None:
    """The derivatives for ``loss_fn`` (subclasses included), or ``None`` if unsupported."""
    return _lookup(LOSS_DERIVATIVES, loss_fn)


def supported_names(table: dict) -> str:
    """The supported class names of a table, for error messages."""
    return ", ".join(cls.__name__ for cls in table)


__all__ = [
    "LOSS_DERIVATIVES",
    "MODULE_DERIVATIVES",
    "SUPPORTED_REDUCTIONS",
    "LossDerivatives",
    "ModuleDerivatives",
    "ModuleIO",
    "loss_derivatives",
    "loss_gradient",
    "module_derivatives",
    "supported_names",
]
