"""Models from the ecosystem, built from configurations (no weights are downloaded):
torchvision's ResNet-18 and MobileNetV3-small, a timm vision transformer, and Hugging Face
GPT-2 and BERT at tiny sizes, in float64, through the first-order and GGN-family extensions
and the dataset functions, against ``tests.reference``.

The vision transformer and the language models are small enough for dense references; the
two torchvision networks (11.2M and 1.5M parameters) are checked through the GGN's diagonal
(per sample and summed) and the per-sample Jacobians. Skipped where the packages are absent:
``pip install -e .[ecosystem]`` (``make test-newest`` installs them beside the newest
torch).
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from torch import Tensor, nn

import curvhooks
from tests import reference
from tests.checks import FIRST_ORDER, GGN_FAMILY, check_every_extension, check_first_order
from tests.problems import assert_close


def _imported(name: str) -> object | None:
    """The package, or ``None`` where it is absent or fails to import (PyPI's torchvision
    beside another torch build: 'operator torchvision::nms does not exist')."""
    try:
        return importlib.import_module(name)
    except Exception:  # any failure to import means: not usable here
        return None


torchvision = _imported("torchvision")
timm = _imported("timm")
transformers = _imported("transformers")


def _needs(package: object | None, name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(package is None, reason=f"{name} not installed (.[ecosystem])")


class Logits(nn.Module):
    """A Hugging Face model's logits; for a language model ``[N, V, T]``, classes second."""

    def __init__(self, model: nn.Module, sequence: bool) -> None:
        super().__init__()
        self.model, self.sequence = model, sequence

    def forward(self, ids: Tensor) -> Tensor:
        logits = self.model(ids).logits
        return logits.transpose(1, 2) if self.sequence else logits


def _vit() -> tuple[nn.Module, Tensor, Tensor]:
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=8,
        patch_size=4,
        embed_dim=8,
        depth=1,
        num_heads=2,
        mlp_ratio=2.0,
        num_classes=3,
    )
    return model, torch.randn(3, 3, 8, 8), torch.randint(0, 3, (3,))


def _gpt2() -> tuple[nn.Module, Tensor, Tensor]:
    config = transformers.GPT2Config(
        n_embd=8,
        n_layer=1,
        n_head=2,
        vocab_size=11,
        n_positions=6,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = Logits(transformers.GPT2LMHeadModel(config), sequence=True)
    return model, torch.randint(0, 11, (3, 5)), torch.randint(0, 11, (3, 5))


def _bert() -> tuple[nn.Module, Tensor, Tensor]:
    config = transformers.BertConfig(
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        vocab_size=11,
        max_position_embeddings=6,
        num_labels=3,
    )
    model = Logits(transformers.BertForSequenceClassification(config), sequence=False)
    return model, torch.randint(0, 11, (3, 5)), torch.randint(0, 3, (3,))


SMALL = [
    pytest.param(_vit, marks=_needs(timm, "timm"), id="timm-vit"),
    pytest.param(_gpt2, marks=_needs(transformers, "transformers"), id="hf-gpt2"),
    pytest.param(_bert, marks=_needs(transformers, "transformers"), id="hf-bert"),
]


def _made(build) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on its configurations
        model, X, y = build()
    model = model.double().eval()
    return model, nn.CrossEntropyLoss(), X.double() if X.is_floating_point() else X, y


def _extended(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor, *extensions) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallbacks' warnings name the layers they serve
        with curvhooks.extend(model, loss_fn, *extensions):
            loss_fn(model(X), y).backward()
    return {
        name: {ext.attribute: getattr(p, ext.attribute) for ext in extensions}
        for name, p in model.named_parameters()
    }


@pytest.mark.parametrize("build", SMALL)
def test_small_models_through_every_extension(build):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallbacks' warnings name the layers they serve
        check_every_extension(*_made(build))


@pytest.mark.parametrize("build", SMALL)
def test_small_models_through_the_dataset_functions(build):
    """``ggn`` and ``empirical_fisher`` on both routes over two batches, and ``kfac``'s
    exact diagonal for every parameter without Kronecker factors."""
    model, loss_fn, X, y = _made(build)
    data = [(X[:2], y[:2]), (X[2:], y[2:])]
    ggn, fisher = (
        reference.ggn(model, loss_fn, X, y),
        reference.empirical_fisher(model, loss_fn, X, y),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for route in ("hooks", "autograd"):
            assert_close(curvhooks.ggn(model, loss_fn, data, route=route), ggn)
            assert_close(curvhooks.empirical_fisher(model, loss_fn, data, route=route), fisher)
        K = curvhooks.kfac(model, loss_fn, data)
    start, checked = 0, 0
    for name, param in zip(K.names, K.params):
        rows = slice(start, start + param.numel())
        start += param.numel()
        if name in K.others:
            assert_close(K.others[name], ggn[rows, rows].diagonal())
            checked += 1
    assert checked


LARGE = [
    pytest.param("resnet18", marks=_needs(torchvision, "torchvision"), id="torchvision-resnet18"),
    pytest.param(
        "mobilenet_v3_small", marks=_needs(torchvision, "torchvision"), id="torchvision-mobilenet"
    ),
]


@pytest.mark.parametrize("name", LARGE)
def test_torchvision_models_through_the_extensions(name):
    """BatchNorm in eval mode, residual additions, Hardswish and squeeze-excitation: every
    first-order and GGN-family extension on every parameter against ``tests.reference``
    (the GGN through its diagonal, per sample and summed, and the Jacobians), then
    ``curvhooks.ggn``'s diagonal and ``curvhooks.kfac``'s exact diagonal of the BatchNorm
    parameters."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=3).double().eval()
    loss_fn, X, y = nn.CrossEntropyLoss(), torch.randn(2, 3, 32, 32).double(), torch.tensor([0, 2])
    results = _extended(model, loss_fn, X, y, *FIRST_ORDER, *GGN_FAMILY)
    check_first_order(model, results, reference.per_sample_grads(model, loss_fn, X, y))
    per_sample = reference.ggn_diagonal(model, loss_fn, X, y, per_sample=True)
    expected = reference.split(per_sample.sum(0), model)
    expected_per_sample = reference.split(per_sample, model)
    jacobians = reference.jacobians(model, X)
    for param_name, found in results.items():
        assert_close(found["diag_ggn"], expected[param_name])
        assert_close(found["diag_ggn_batch"], expected_per_sample[param_name])
        assert_close(found["sqrt_ggn"].square().sum((0, 1)), expected[param_name])
        assert_close(found["jacobian"], jacobians[param_name])
    diagonal = torch.cat([d.flatten() for d in expected.values()])
    assert_close(curvhooks.ggn(model, loss_fn, (X, y), structure="diag"), diagonal)
    K = curvhooks.kfac(model, loss_fn, (X, y))
    assert K.others  # the BatchNorm parameters
    for other, block in K.others.items():
        assert_close(block, expected[other].flatten())
