"""The peer of `cargo xtask bench`: the loop of `benches/benches/peer.rs` in Lightning Fabric.

The MLP 784-1024-1024-10 on the same synthetic data (x = sin(0.618 i), y = i mod 10), Adam
(lr 1e-3), global batch 128 split over the processes, on the CPU; with --devices 2 Lightning's
DDP starts a second process and averages gradients over gloo. Prints one JSON line from rank 0:
samples per second = global batch / median step time (after 3 warm-up steps).

    python3 benches/peers/lightning_mlp.py --devices 2 --steps 40

Needs `python3 -m pip install torch==2.9.0 lightning`.
"""

import argparse
import json
import statistics
import time

import lightning as L
import torch
from torch import nn

WARMUP_STEPS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--global-batch", type=int, default=128)
    args = parser.parse_args()

    strategy = "ddp" if args.devices > 1 else "auto"
    fabric = L.Fabric(accelerator="cpu", devices=args.devices, strategy=strategy)
    fabric.launch()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, optimizer = fabric.setup(model, optimizer)

    rows = args.global_batch // fabric.world_size
    x = torch.sin(torch.arange(rows * 784, dtype=torch.float32) * 0.618).reshape(rows, 784)
    y = torch.arange(rows) % 10
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for step in range(WARMUP_STEPS + args.steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        fabric.backward(loss)
        optimizer.step()
        if step >= WARMUP_STEPS:
            times.append(time.perf_counter() - start)

    if fabric.global_rank == 0:
        result = {
            "devices": args.devices,
            "samples_per_second": args.global_batch / statistics.median(times),
            "torch": torch.__version__,
            "lightning": L.__version__,
            "threads_per_process": torch.get_num_threads(),
        }
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
