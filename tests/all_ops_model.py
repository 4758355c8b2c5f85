"""A small model that runs every fastreg op family in one training step: channel dropout,
bias + activation + dropout, bias + dropout + residual add, plain dropout, and the penalty
in the loss. The whole-model tests (compile, export, autocast, determinism, CUDA graphs)
use it."""

import torch
import torch.nn.functional as F
from torch import nn

import fastreg


class AllOps(nn.Module):
    def __init__(self, mask="bits", channels=4, width=32, classes=10):
        super().__init__()
        self.mask = mask
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.drop2d = fastreg.Dropout2d(0.2, mask=mask)
        # bias=False: the bias goes into the fused op
        self.fc1 = nn.Linear(channels * 64, width, bias=False)
        self.b1 = nn.Parameter(torch.zeros(width))
        self.fc2 = nn.Linear(width, width, bias=False)
        self.b2 = nn.Parameter(torch.zeros(width))
        self.drop = fastreg.Dropout(0.3, mask=mask)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.drop2d(torch.relu(self.conv(x))).flatten(1)
        h = fastreg.bias_act_dropout(
            self.fc1(h), self.b1, 0.25, "gelu", self.training, mask=self.mask
        )
        h = fastreg.bias_dropout_add(self.fc2(h), self.b2, h, 0.25, self.training, mask=self.mask)
        return self.head(self.drop(h))


def loss_fn(model, x, y):
    return F.cross_entropy(model(x), y) + fastreg.penalty(
        model, l1=1e-4, l2=1e-3, exclude="bias_and_norm"
    )


def batch(device="cpu", n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


def train(model, steps, seed, step_fn=loss_fn, device="cpu"):
    """`steps` SGD steps from torch.manual_seed(seed): the losses, as a list of tensors."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(seed)
    losses = []
    for i in range(steps):
        x, y = batch(device, seed=i)
        optimizer.zero_grad()
        loss = step_fn(model, x, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses
