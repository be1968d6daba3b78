"""Writes ``docs/supported.md`` from curvhooks' registry of derivatives.

Which modules and losses have rows, and what each extension family can do with them, comes
from ``MODULE_DERIVATIVES`` and ``LOSS_DERIVATIVES``; only the supported arguments are
written here by hand, one entry per registered class (``tests/test_docs.py`` checks both
that the page is this script's output and that every registered class has its entry).

Run: ``python docs/supported.py``
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from curvhooks.derivatives import LOSS_DERIVATIVES, MODULE_DERIVATIVES, ModuleDerivatives
from curvhooks.derivatives.normalization import NormalizationDerivatives

PAGE = Path(__file__).resolve().parent / "supported.md"

IN_PLACE = "`inplace=True` too"
RECURRENT = (
    "several layers, `bidirectional`, `batch_first` both ways, bias on/off, initial states "
    "given or not, every output used; padded (not packed) sequences; eval mode where "
    "`dropout > 0`; by `torch.func` on its recurrence written step by step"
)
MODULE_ARGUMENTS = {
    nn.Linear: "inputs `[N, *, in]`, bias on/off",
    nn.Embedding: "repeated indices, `padding_idx`; no `max_norm`, no `scale_grad_by_freq`",
    **{
        conv: 'stride, int/tuple/`"same"`/`"valid"` padding, dilation, groups, bias on/off; '
        '`padding_mode="zeros"`'
        for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    },
    **{
        conv: "stride, padding, `output_padding` (also implied by `output_size=`), dilation, "
        "groups, bias on/off"
        for conv in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    },
    **{
        norm: "eval mode with running statistics tracked; affine on/off"
        for norm in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    },
    nn.MultiheadAttention: "packed or separate (`kdim`, `vdim`) projections, bias on/off, "
    "`add_bias_kv`, `add_zero_attn`, `batch_first` both ways, key padding and attention masks "
    "(shared or per head), `is_causal`, `need_weights` both ways (the weights may be used); "
    "`out_proj` served with it; eval mode where `dropout > 0`. Kronecker factors for each "
    "projection as for `Linear` (the packed one on self-attention only); none for the packed "
    "projection of cross-attention, the bias of separate projections or the added key and "
    "value biases (`curvhooks.kfac` gives them exact blocks)",
    nn.RNN: f"{RECURRENT}; `nonlinearity` tanh or relu",
    nn.LSTM: f"{RECURRENT}; `proj_size`",
    nn.GRU: RECURRENT,
    nn.LayerNorm: "any `normalized_shape`, `elementwise_affine` and `bias` on/off",
    nn.GroupNorm: "any number of groups, affine on/off, inputs `[N, C, *]`",
    nn.ReLU: IN_PLACE,
    nn.LeakyReLU: f"any `negative_slope`, {IN_PLACE}",
    nn.ELU: f"any `alpha`, {IN_PLACE}",
    nn.SELU: IN_PLACE,
    nn.GELU: '`approximate="none"` and `"tanh"`',
    nn.SiLU: IN_PLACE,
    nn.Tanh: "",
    nn.Sigmoid: "",
    nn.Softplus: "any `beta` and `threshold`",
    nn.LogSigmoid: "",
    nn.Flatten: "any `start_dim >= 1` and `end_dim`",
    nn.Unflatten: "any dimension >= 1",
    nn.Identity: "",
    nn.Dropout: "eval mode",
    **{
        pad: "negative padding (cropping) too" for pad in (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)
    },
    **{
        pool: "padding, `ceil_mode`, `count_include_pad`, `divisor_override`"
        for pool in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
    },
    **{
        pool: "any output size"
        for pool in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
    },
    **{
        pool: "padding, dilation, `ceil_mode`"
        for pool in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
    },
}
LOSS_ARGUMENTS = {
    nn.CrossEntropyLoss: "logits `[N, C, *d]`, class-index targets `[N, *d]`; no `weight`, no "
    "`label_smoothing`, no target equal to `ignore_index`",
    nn.MSELoss: "any output shape, targets of the same shape",
    nn.BCEWithLogitsLoss: "any output shape, targets of the same shape; no `weight`, no "
    "`pos_weight`",
}

HEADER = """# Supported modules and losses

Generated from the registry (`curvhooks.derivatives.MODULE_DERIVATIVES` and
`LOSS_DERIVATIVES`) by `python docs/supported.py`; a test checks that this page is its output.
A subclass of a listed module is supported unless it overrides `forward`.

Columns: **first order** is `BatchGrad`, `BatchL2Grad`, `SumGradSquared`, `Variance`
(modules with parameters; the others pass gradients on). **GGN** is `SqrtGGN`,
`SqrtGGNMC`, `DiagGGN`, `BatchDiagGGN`, `Jacobian`, `curvhooks.ggn` and
`curvhooks.empirical_fisher`. **Hessian** is `DiagHessian` and `HessianBlock`, with the
module's own second derivative as given; `curvhooks.hessian` works for any model by autograd.
**Kronecker** is `KFLR`, `KFAC` and `curvhooks.kfac` (weights and biases); `curvhooks.kfac`
gives every other parameter its exact diagonal (`others="diag"`, the default) or dense block
(`"dense"`), or leaves it out (`"skip"`).
"""

FOOTER = """
## Beyond single modules

| model part | first order | GGN | Hessian |
|---|---|---|---|
| `Sequential`, nested, and custom containers of any graph | yes | yes (analytic pushes along chains, autograd's batched products elsewhere) | yes |
| any parameter-free operation or module between supported modules (residual additions, `torch.cat`, views, attention from torch functions) | yes | yes | where it is linear or piecewise linear (else `UnsupportedError` naming the operation) |
| a module called twice, weights tied between modules | yes (uses summed per sample) | yes | where no use feeds another |
| other modules with trainable parameters and no child modules (a layer of your own, a subclass with its own `forward`) | by `torch.func` on each call, as a function of its arguments acting on each sample alone (every tensor argument whose leading dimension is the batch holds the samples; several outputs are joined; checked at each call; one warning names them; `extend(..., generic=False)` turns it off) | the same (not KFAC); `curvhooks.ggn`/`empirical_fisher` take their autograd route unless `route="hooks"` | `curvhooks.hessian` only (the Hessian extensions refuse it) |
| parameters used directly in a container's own `forward` (a vision transformer's class token and position embeddings) | by autograd: the stacks pushed to the parameter itself, split per sample (one warning names them; `generic=False` turns it off) | the same (not KFAC); `curvhooks.ggn`/`empirical_fisher` take their autograd route | `curvhooks.hessian` only |
| a parameter a recorded call also uses, used directly as well | `UnsupportedError`, or skipped with `unsupported="skip"` | the same | `curvhooks.hessian` only |
| a module run inside a `torch.func` transform in `forward` | `UnsupportedError` | `UnsupportedError` | `curvhooks.hessian` only |

Reductions `"mean"` and `"sum"` are supported; `"none"` raises `ValueError`. Losses other
than those above work for the first-order extensions and `Jacobian`. Modules whose output
depends on the batch or on randomness (BatchNorm, Dropout) must be in `eval()` mode.
Parameters with `requires_grad=False` get no attributes and cost nothing.
"""


def first_order(derivatives: ModuleDerivatives) -> str:
    """Whether the derivatives give per-sample parameter products."""
    return "yes" if derivatives.serves_parameters else "no parameters"


def second_derivative(derivatives: ModuleDerivatives) -> str:
    """The curvature the module adds in its input."""
    if not derivatives.second_derivatives:
        return "no (`curvhooks.hessian` only)"
    if not derivatives.has_curvature:
        return "yes: none needed (linear or piecewise linear)"
    if isinstance(derivatives, NormalizationDerivatives):
        return "yes: dense blocks per normalised group"
    return "yes: element-wise second derivative"


def kronecker(derivatives: ModuleDerivatives) -> str:
    """Whether the module's parameters get Kronecker factors."""
    if derivatives.has_kronecker_factors:
        return "yes"
    return "no parameters" if first_order(derivatives) == "no parameters" else "no"


def render() -> str:
    """The page's markdown."""
    module_rows = [
        f"| `{cls.__name__}` | {MODULE_ARGUMENTS[cls]} | {first_order(derivatives)} | yes "
        f"| {second_derivative(derivatives)} | {kronecker(derivatives)} |"
        for cls, derivatives in MODULE_DERIVATIVES.items()
    ]
    loss_rows = [f"| `{cls.__name__}` | {LOSS_ARGUMENTS[cls]} |" for cls in LOSS_DERIVATIVES]
    return "\n".join(
        [
            HEADER,
            "## Modules",
            "",
            "| module | arguments | first order | GGN | Hessian | Kronecker |",
            "|---|---|---|---|---|---|",
            *module_rows,
            "",
            "## Losses (square roots of their Hessians for the GGN and Hessian families)",
            "",
            "| loss | arguments |",
            "|---|---|",
            *loss_rows,
            FOOTER,
        ]
    )


if __name__ == "__main__":
    PAGE.write_text(render())
    print(f"wrote {PAGE}")
