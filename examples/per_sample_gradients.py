"""Per-sample gradients and their norms in one backward pass.

Run: ``python examples/per_sample_gradients.py``
"""

import torch

import curvhooks
from curvhooks import BatchGrad, BatchL2Grad


def main() -> None:
    torch.manual_seed(0)
    X, y = torch.rand(8, 3, 10, 10), torch.randint(0, 5, (8,))
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(400, 5),
    )
    loss_fn = torch.nn.CrossEntropyLoss()

    with curvhooks.extend(model, loss_fn, BatchGrad(), BatchL2Grad()):
        loss_fn(model(X), y).backward()

    for name, p in model.named_parameters():
        summed = p.grad_batch.sum(0)
        print(
            f"{name:>8}: grad_batch {tuple(p.grad_batch.shape)}, "
            f"sums to p.grad: {torch.allclose(summed, p.grad, atol=1e-7)}, "
            f"per-sample norms {p.batch_l2.sqrt().numpy().round(4)}"
        )


if __name__ == "__main__":
    main()
