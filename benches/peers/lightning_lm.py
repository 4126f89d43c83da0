"""The language-model peer of `cargo xtask bench`: the `language_model` example in Lightning Fabric.

The same character-level GPT (token and position embeddings, pre-norm blocks of causal multi-head
attention and a GELU MLP, a final LayerNorm and an untied head; PyTorch's own modules), the same
text (fabric-examples/data/pride-and-prejudice.txt.gz, the first 90% as consecutive non-overlapping
blocks, shuffled by Lightning's DistributedSampler), the same per-rank batch, AdamW (PyTorch's
fused implementation, weight decay 1e-4 as Burn's default), gradients clipped to norm 1 and the
same linear warm-up, on the CPU; with --devices 2 Lightning's DDP starts a second process and
averages gradients over gloo. Like the example, it times the epoch's steps end to end (data
loading included) and prints one JSON line from rank 0: tokens of all ranks per second.

    python3 benches/peers/lightning_lm.py --devices 2 --size small --batch-size 16 --steps 30

Needs `python3 -m pip install torch==2.9.0 lightning`. Not used: torch.compile.
"""

import argparse
import gzip
import json
import pathlib
import time

import lightning as L
import torch
from torch import nn

# (layers, heads, embed, block size, learning rate): fabric-examples/src/gpt.rs's presets.
PRESETS = {
    "tiny": (2, 2, 64, 64, 3e-3),
    "small": (4, 4, 256, 128, 1e-3),
    "base": (8, 8, 768, 256, 3e-4),
    "large": (24, 16, 1024, 256, 2e-4),
}
TEXT = pathlib.Path(__file__).resolve().parents[2] / "fabric-examples/data/pride-and-prejudice.txt.gz"
VALIDATION_SHARE = 0.1
WARMUP = 20


class Block(nn.Module):
    def __init__(self, embed: int, heads: int) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(embed)
        self.attn = nn.MultiheadAttention(embed, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(embed)
        self.mlp = nn.Sequential(nn.Linear(embed, 4 * embed), nn.GELU(), nn.Linear(4 * embed, embed))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm_attn(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False, is_causal=True)[0]
        return x + self.mlp(self.norm_mlp(x))


class Gpt(nn.Module):
    def __init__(self, vocab: int, block_size: int, layers: int, heads: int, embed: int) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab, embed)
        self.position = nn.Embedding(block_size, embed)
        for embedding in (self.token, self.position):
            nn.init.normal_(embedding.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(embed, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(embed)
        self.head = nn.Linear(embed, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        x = self.token(tokens) + self.position(torch.arange(length, device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


class TokenBlocks(torch.utils.data.Dataset):
    """Item i: the block_size + 1 tokens from i * block_size."""

    def __init__(self, tokens: torch.Tensor, block_size: int) -> None:
        self.tokens, self.block_size = tokens, block_size

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tokens[i * self.block_size : (i + 1) * self.block_size + 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--size", choices=PRESETS, default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    layers, heads, embed, block_size, lr = PRESETS[args.size]

    strategy = "ddp" if args.devices > 1 else "auto"
    fabric = L.Fabric(accelerator="cpu", devices=args.devices, strategy=strategy)
    fabric.launch()
    fabric.seed_everything(42)
    text = gzip.decompress(TEXT.read_bytes()).decode("utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    tokens = torch.tensor([index[c] for c in text], dtype=torch.long)
    train = tokens[: len(tokens) - int(len(tokens) * VALIDATION_SHARE)]
    loader = torch.utils.data.DataLoader(
        TokenBlocks(train, block_size), batch_size=args.batch_size, shuffle=True, drop_last=True
    )
    loader = fabric.setup_dataloaders(loader)
    model = Gpt(len(chars), block_size, layers, heads, embed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4, fused=True)
    model, optimizer = fabric.setup(model, optimizer)

    steps = min(args.steps, len(loader))
    fabric.barrier()
    started = time.perf_counter()
    for step, batch in enumerate(loader):
        if step == steps:
            break
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad()
        fabric.backward(loss)
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / WARMUP)
        optimizer.step()
    seconds = time.perf_counter() - started
    tokens_per_second = steps * args.batch_size * block_size * fabric.world_size / seconds
    # The mean of the ranks' rates, as the example reports it.
    rate = fabric.all_reduce(torch.tensor(tokens_per_second), reduce_op="mean").item()
    if fabric.global_rank == 0:
        result = {
            "devices": args.devices,
            "tokens_per_second": rate,
            "loss": loss.item(),
            "torch": torch.__version__,
            "lightning": L.__version__,
            "threads_per_process": torch.get_num_threads(),
        }
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
