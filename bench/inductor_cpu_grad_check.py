"""Reproduce the Inductor CPU gradient problem of docs/known-issues.md.

Trains one step of a transformed TinyResNet compiled with Inductor and compares every gradient with a
float64 eager copy. Run it under several hash seeds, since the failure depends on it:

    for h in 0 1 2 3 4 5; do PYTHONHASHSEED=$h .venv/bin/python -m bench.inductor_cpu_grad_check; done
"""
from __future__ import annotations

import copy
import os

import torch

import kdna_fx
from kdna_fx.testing import TinyResNet, randomize_adapters


def main() -> None:
    torch.manual_seed(0)
    kmodel = kdna_fx.transform(TinyResNet(width=4))
    randomize_adapters(kmodel)
    kmodel.train()
    x = torch.randn(4, 3, 16, 16)
    reference = copy.deepcopy(kmodel).double()
    reference(x.double()).square().sum().backward()
    compiled = torch.compile(kmodel, backend="inductor", fullgraph=True)
    compiled(x).square().sum().backward()
    err, name = max(((p.grad.double() - q.grad).abs().max().item(), n)
                    for (n, p), (_, q) in zip(kmodel.named_parameters(), reference.named_parameters()))
    verdict = "OK" if err < 1e-4 else "WRONG"
    print(f"PYTHONHASHSEED={os.environ.get('PYTHONHASHSEED', 'random')}: largest gradient error {err:.2e} "
          f"({name}) {verdict}")


if __name__ == "__main__":
    main()
