"""Example 1: the autograd engine on its own — fit a small MLP to a toy problem.

The network learns to separate two interleaved half-moons. Everything below
is minillm: tensors, ops with hand-written backward passes, and a plain SGD
loop written out by hand (later examples use minillm.optim).

    python examples/01_autograd.py [--steps 300]
"""

import argparse

import numpy as np

import minillm as mm
from minillm import functional as F


def make_moons(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved half circles with a little noise; labels 0 and 1."""
    angle = rng.uniform(0, np.pi, n)
    label = rng.integers(0, 2, n)
    x = np.where(label == 0, np.cos(angle), 1 - np.cos(angle))
    y = np.where(label == 0, np.sin(angle), 0.5 - np.sin(angle))
    points = np.stack([x, y], axis=1) + rng.normal(0, 0.1, (n, 2))
    return points.astype(np.float32), label


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="gradient steps after step 0 (default 300)")
    parser.add_argument("--lr", type=float, default=0.5, help="learning rate (default 0.5)")
    args = parser.parse_args(argv)
    if args.steps < 0 or not args.lr > 0:
        parser.error(f"need --steps >= 0 and --lr > 0, got --steps {args.steps} --lr {args.lr}")

    mm.manual_seed(0)
    rng = np.random.default_rng(0)
    points, labels = make_moons(256, rng)

    def param(*shape, scale):
        return mm.Tensor(rng.normal(0, scale, shape).astype(np.float32), requires_grad=True)

    w1, b1 = param(32, 2, scale=1.0), param(32, scale=0.0)
    w2, b2 = param(32, 32, scale=32 ** -0.5), param(32, scale=0.0)
    w3, b3 = param(2, 32, scale=32 ** -0.5), param(2, scale=0.0)
    params = [w1, b1, w2, b2, w3, b3]

    def forward(x: mm.Tensor) -> mm.Tensor:
        hidden = F.gelu(F.linear(x, w1, b1))           # (256, 32)
        hidden = F.gelu(F.linear(hidden, w2, b2))      # (256, 32)
        return F.linear(hidden, w3, b3)                # (256, 2) logits

    x = mm.Tensor(points)
    loss_value = float("nan")
    for step in range(args.steps + 1):
        logits = forward(x)
        loss = F.cross_entropy(logits, labels)
        for p in params:
            p.grad = None
        loss.backward()
        with mm.no_grad():
            for p in params:
                p.data -= args.lr * p.grad             # plain gradient descent
        loss_value = loss.item()
        if step % max(1, args.steps // 10) == 0:
            accuracy = (logits.numpy().argmax(axis=1) == labels).mean()
            print(f"step {step:4d}  loss {loss_value:.4f}  accuracy {accuracy:.1%}")
    # backward() frees the graph it walks, so draw the loss of one more forward pass
    print("the graph of the loss, as minillm records it (leaves: w1, b1, w2, b2, w3, b3):")
    print(mm.draw_graph(F.cross_entropy(forward(x), labels)))
    return loss_value


if __name__ == "__main__":
    main()
