"""``python -m fastreg demo``: regularization against overfitting, runnable in seconds.

Part 1, the classic experiment: 20 noisy samples of y = x + 0.3 * noise, a 1-300-300-1
MLP trained full-batch with Adam, once without regularization, once with
``fastreg.Dropout(0.5)`` after each hidden layer, once with an L2 and once with an L1
penalty (``fastreg.penalty``). The unregularized net learns the noise: low train loss,
high test loss on fresh samples. With 20 points one data set is a coin toss, so the
losses are means over three seeds (data sets and initializations). ``--plot PATH``
draws the four fitted curves of the first.

Part 2, a real data set: scikit-learn's handwritten digits (8x8 images, shipped with the
package, no download), a 64-256-256-10 MLP with dropout 0.2 after the first hidden layer
and 0.5 after the second, trained on a small part of the data; test accuracy with and
without dropout, over a few seeds. Needs scikit-learn (optional); skipped with a
message when it is missing.
"""

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastreg
from fastreg import bench

N_SAMPLES = 20
N_TEST = 200
CURVE_SEEDS = 3
HIDDEN = 300
STEPS = 500
LR = 0.01
L2 = 3e-3
L1 = 1e-3
DIGITS_TRAIN = 200
DIGITS_EPOCHS = 60
DIGITS_HIDDEN = 256
DIGITS_SEEDS = (0, 1, 2)
SKLEARN_MISSING = (
    "digits: skipped, scikit-learn is not installed (an optional dependency "
    "of the demo): pip install scikit-learn"
)


def penalty_fn():
    """(fastreg.penalty, None), or the Python loop and a note before it is merged."""
    api = bench.penalty_api()
    if api is not None:
        return api[0], None
    return (
        lambda params, l1=0.0, l2=0.0: bench.penalty_loop(list(params), l1, l2),
        "fastreg.penalty is not in this build: the penalty runs as a Python loop",
    )


def curve_data(seed):
    """The classic experiment's data: N_SAMPLES training points on [-1, 1] and N_TEST
    fresh test points, y = x + 0.3 noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.linspace(-1, 1, N_SAMPLES).unsqueeze(1)
    y = x + 0.3 * torch.randn(x.shape, generator=gen)
    x_test = torch.linspace(-1, 1, N_TEST).unsqueeze(1)
    y_test = x_test + 0.3 * torch.randn(x_test.shape, generator=gen)
    return x, y, x_test, y_test


def curve_net(dropout):
    layers = [
        nn.Linear(1, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, 1),
    ]
    if dropout:
        layers.insert(4, fastreg.Dropout(dropout))
        layers.insert(2, fastreg.Dropout(dropout))
    return nn.Sequential(*layers)


def fit_curve(variant, x, y, seed, penalty, steps=None):
    """Trains one variant ("none", "dropout", "l2", "l1") of the 1-300-300-1 MLP."""
    steps = steps or STEPS
    torch.manual_seed(seed)
    net = curve_net(0.5 if variant == "dropout" else 0.0)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    weights = [m.weight for m in net if isinstance(m, nn.Linear)]
    for _ in range(steps):
        loss = F.mse_loss(net(x), y)
        if variant == "l2":
            loss = loss + penalty(weights, l2=L2)
        elif variant == "l1":
            loss = loss + penalty(weights, l1=L1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def curve_variants():
    return (
        ("none", "no regularization"),
        ("dropout", "fastreg.Dropout(0.5)"),
        ("l2", f"L2 penalty, l2={L2:g}"),
        ("l1", f"L1 penalty, l1={L1:g}"),
    )


def curves(seed=0, plot_path=None, out=print):
    """Part 1 over CURVE_SEEDS data sets (seed, seed + 1, ...); the plot shows the first."""
    penalty, note = penalty_fn()
    seeds = [seed + k for k in range(CURVE_SEEDS)]
    out(
        f"1. Overfitting: {N_SAMPLES} samples of y = x + 0.3 noise, a 1-{HIDDEN}-{HIDDEN}-1 MLP, "
        f"Adam lr={LR}, {STEPS} full-batch steps; test MSE on {N_TEST} fresh samples; "
        f"mean over seeds {', '.join(map(str, seeds))}"
    )
    if note:
        out(f"   ({note})")
    out(f"   {'':<24}{'train MSE':>10}{'test MSE':>10}   per seed (test)")
    data = [curve_data(s) for s in seeds]
    nets = {}
    for key, label in curve_variants():
        train, test = [], []
        for s, (x, y, x_test, y_test) in zip(seeds, data):
            net = fit_curve(key, x, y, s, penalty)
            with torch.no_grad():
                train.append(F.mse_loss(net(x), y).item())
                test.append(F.mse_loss(net(x_test), y_test).item())
            nets.setdefault(key, (label, net))
        out(
            f"   {label:<24}{statistics.mean(train):>10.4f}{statistics.mean(test):>10.4f}   "
            + " ".join(f"{t:.4f}" for t in test)
        )
    true_train = statistics.mean(F.mse_loss(x, y).item() for x, y, _, _ in data)
    true_test = statistics.mean(F.mse_loss(xt, yt).item() for _, _, xt, yt in data)
    out(f"   {'(the true line y = x)':<24}{true_train:>10.4f}{true_test:>10.4f}")
    if plot_path:
        _plot_curves(nets, data[0], seeds[0], plot_path)
        out(f"   plot: {plot_path}")


def _plot_curves(nets, data, seed, path):
    plt = bench.require_matplotlib()
    x, y, x_test, y_test = data
    grid = torch.linspace(-1.1, 1.1, 200).unsqueeze(1)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter(x_test, y_test, color="lightgray", s=6, label="test", zorder=2)
    ax.scatter(x, y, color="black", s=18, label="train", zorder=3)
    with torch.no_grad():
        for label, net in nets.values():
            ax.plot(grid, net(grid), lw=1.5, label=label)
    ax.plot(grid, grid, color="black", ls=":", lw=1, label="y = x")
    ax.set_ylim(-2.2, 2.2)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(
        f"fastreg demo: {N_SAMPLES} noisy samples, a 1-{HIDDEN}-{HIDDEN}-1 MLP (seed {seed})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_digits():
    """(x, y) of scikit-learn's digits, pixels scaled to [0, 1]; None without sklearn."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        return None
    data = sk_load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(data.target, dtype=torch.int64)


def digits_net(dropout):
    h = DIGITS_HIDDEN
    return nn.Sequential(
        nn.Linear(64, h),
        nn.ReLU(),
        fastreg.Dropout(0.2 if dropout else 0.0),
        nn.Linear(h, h),
        nn.ReLU(),
        fastreg.Dropout(0.5 if dropout else 0.0),
        nn.Linear(h, 10),
    )


def fit_digits(x_train, y_train, dropout, seed, epochs=None, batch=32):
    epochs = epochs or DIGITS_EPOCHS
    torch.manual_seed(seed)
    net = digits_net(dropout)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x_train), generator=gen).split(batch):
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


def digits(seeds=DIGITS_SEEDS, out=print):
    data = load_digits()
    if data is None:
        out("2. " + SKLEARN_MISSING)
        return
    x, y = data
    h = DIGITS_HIDDEN
    out(
        f"2. Digits (scikit-learn, {len(x)} 8x8 images): a 64-{h}-{h}-10 MLP trained on "
        f"{DIGITS_TRAIN} images, tested on the other {len(x) - DIGITS_TRAIN}; Adam, "
        f"{DIGITS_EPOCHS} epochs of batches of 32; seeds {', '.join(map(str, seeds))}"
    )
    results = {False: [], True: []}
    for seed in seeds:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(100 + seed))
        train, test = order[:DIGITS_TRAIN], order[DIGITS_TRAIN:]
        for dropout in (False, True):
            net = fit_digits(x[train], y[train], dropout, seed)
            with torch.no_grad():
                logits = net(x[test])
            accuracy = (logits.argmax(1) == y[test]).float().mean().item()
            results[dropout].append((accuracy, F.cross_entropy(logits, y[test]).item()))
    out(f"   {'':<27}{'test accuracy':>14}{'test loss':>10}   per seed (accuracy)")
    for dropout, label in ((False, "no dropout"), (True, "fastreg.Dropout 0.2 / 0.5")):
        accuracy = statistics.mean(a for a, _ in results[dropout])
        loss = statistics.mean(value for _, value in results[dropout])
        per_seed = " ".join(f"{a:.1%}" for a, _ in results[dropout])
        out(f"   {label:<27}{accuracy:>14.1%}{loss:>10.3f}   {per_seed}")


def main(seed=0, plot_path=None, skip_digits=False, out=print):
    """Both parts, on one CPU thread: these models are too small to gain from more, one
    thread is safe from contention on a busy machine, and the numbers do not depend on
    the machine's thread count."""
    if plot_path:
        bench.require_matplotlib()  # fail before training, not after
    start = time.perf_counter()
    with bench.num_threads(1):
        curves(seed, plot_path, out)
        if not skip_digits:
            out("")
            digits(out=out)
    out(
        f"\n({time.perf_counter() - start:.0f}s on 1 CPU thread, fastreg {fastreg.__version__}, "
        f"torch {torch.__version__})"
    )
