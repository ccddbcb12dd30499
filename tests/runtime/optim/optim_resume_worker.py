"""Run by test_optim_resume.py in a FRESH interpreter: train `steps` steps from `start`, optionally
resuming from a checkpoint, and save weights + optimizer state."""

from __future__ import annotations

import sys

import torch
from optim_models import loss_fn, make_net

from onlinemodel_runtime.optim import Apollo


def main(dtype_name: str, hooks: str, start: int, steps: int, load: str, save: str) -> None:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    net = make_net(dtype=dtype)
    opt = Apollo(net.named_parameters(), lr=3e-3, weight_decay=0.01, update_proj_gap=3)
    if load != "-":
        ckpt = torch.load(load, weights_only=True)
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optim"])
    if hooks == "hooks":
        opt.attach_to_backward()
    for t in range(start, start + steps):
        loss = loss_fn(net, t)
        if hooks == "hooks":
            opt.backward_step(loss)
        else:
            loss.backward()
            opt.step()
            opt.zero_grad()
    torch.save({"model": net.state_dict(), "optim": opt.state_dict()}, save)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
