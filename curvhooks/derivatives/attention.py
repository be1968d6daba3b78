"""``nn.MultiheadAttention``: its own ``forward`` differentiated by ``torch.func`` on each
call (``CallDerivatives``), its ``out_proj`` served with it (the call uses that child's
parameters without calling it).

Every argument is covered: packed or separate query, key and value projections, biases,
``add_bias_kv``, ``add_zero_attn``, ``batch_first`` both ways, key padding masks, attention
masks shared by the batch (``[L, S]``) or per sample and head (``[N * H, L, S]``, recorded as
``[N, H, L, S]``), ``is_causal``, and ``need_weights`` both ways (the weights are an output
like the attention's own).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn

from curvhooks.derivatives.generic import CallDerivatives
from curvhooks.errors import UnsupportedError

_SEQUENCES = ("query", "key", "value")


class MultiheadAttentionDerivatives(CallDerivatives):
    """``nn.MultiheadAttention`` (see the module docstring)."""

    serves_children = True

    def samples_dim(self, module: nn.Module) -> int:
        return 0 if module.batch_first else 1

    def argument_dim(self, module: nn.Module, key: int | str, value: Tensor, batch: int):
        if isinstance(key, int):  # query, key and value (``prepare``)
            return self.samples_dim(module)
        if key == "key_padding_mask" or (key == "attn_mask" and value.dim() == 4):
            return 0
        return None

    def output_dims(self, module: nn.Module, outputs: list[object]) -> list[int | None]:
        """The attention's output, then its weights ``[N, (H,) L, S]``."""
        return [self.samples_dim(module)] + [0] * (len(outputs) - 1)

    def prepare(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Query, key and value by position, the rest by keyword; a per-head attention mask
        ``[N * H, L, S]`` as ``[N, H, L, S]``."""
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        query = bound["query"]
        if query.dim() != 3:
            raise UnsupportedError(
                f"MultiheadAttention was called on one unbatched sequence {tuple(query.shape)}: "
                "curvhooks serves batches of sequences; pass [N, L, E] (batch_first=True) or "
                "[L, N, E]"
            )
        if module.training and module.dropout > 0:
            raise UnsupportedError(
                f"MultiheadAttention(dropout={module.dropout}) is in training mode, where its "
                "output is random; call model.eval() first"
            )
        others = {name: value for name, value in bound.items() if name not in _SEQUENCES}
        mask = others.get("attn_mask")
        if mask is not None and mask.dim() == 3:
            others["attn_mask"] = mask.view(-1, module.num_heads, *mask.shape[1:])
        return tuple(bound[name] for name in _SEQUENCES), others

    def run(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        mask = kwargs.get("attn_mask")
        if mask is not None and mask.dim() == 4:
            kwargs = {**kwargs, "attn_mask": mask.flatten(0, 1)}
        return module.forward(*args, **kwargs)
