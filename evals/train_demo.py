"""Train the three embedded demo checkpoints (GDN-2, KDA, Gated DeltaNet) on a synthetic recall mixture.

Recipe (the same for the three families; only the mixer's gate parameterisation differs):
  - data: RULER-style needle prompts from our own generator (tasks/ruler/niah.py) with training seeds that the
    evaluation never uses (eval seed 42; training seeds start at 10_000), byte-level tokens, lengths 256-1280,
    a mixture of S-NIAH (noise haystack), MK-NIAH (noise haystack with 4 keys), needle haystacks (MK-NIAH-2) and
    UUID values; the model sees "<s>" + prompt and learns the answer " <value>." followed by "</s>";
    the loss is on the answer tokens only.
  - model: 4 blocks, d = 128, 2 heads of 64, MLP 384, byte vocabulary (259, padded to 320): ~0.8M parameters.
  - optimiser: AdamW (lr 3e-3, betas 0.9/0.95, wd 0.1), 100 warm-up steps, cosine to 10%, batch 32.
  - stored in bf16 safetensors (native format) under gdn2/demo/<name>/.
These are toy models for the demo suite, not the paper's 1.3B models.

    python -m evals.train_demo --out gdn2/demo --steps 1500 --device cuda
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gdn2.config import Config
from gdn2.model import GPT
from gdn2.tokenizer import ByteTokenizer
from tasks.ruler.niah import NiahGenerator

FAMILIES = {
    # name: (description, config overrides)
    "gdn2-demo": ("Gated DeltaNet-2: channel-wise erase b and write w", {}),
    "kda-demo": ("KDA: channel-wise decay, tied scalar beta for erase and write", {"beta": "scalar"}),
    "gdn-demo": ("Gated DeltaNet: scalar decay, tied scalar beta", {"beta": "scalar", "decay": "scalar"}),
}
MODEL = dict(vocab_size=259, padding_multiple=64, n_layer=4, n_embd=128, n_head=4, intermediate_size=384,
             gdn2_per_layer=1, gdn2_num_heads=2, gdn2_head_dim=64, local_window=64)
MIXTURE = [  # (variant, haystack, weight)
    ("niah_single_1", "noise", 3), ("niah_multikey_1", "noise", 3), ("niah_multikey_2", "needle", 2),
    ("niah_single_3", "noise", 1), ("niah_multivalue", "noise", 1),
]
LENGTHS = [256, 384, 512, 640, 768, 1024, 1280]
GEN_TOKENS = 16


def demo_config(name: str) -> Config:
    return Config(name=name, **MODEL, **FAMILIES[name][1])


def recall_batches(batch_size: int, seed: int):
    """Endless (tokens, loss mask) batches of byte-tokenised needle prompts with their answers."""
    tok = ByteTokenizer()
    rng = random.Random(seed)
    gens = {}
    weights = [w for *_, w in MIXTURE]
    while True:
        seqs, masks = [], []
        while len(seqs) < batch_size:
            variant, hay, _ = rng.choices(MIXTURE, weights)[0]
            length = rng.choice(LENGTHS)
            key = (variant, hay, length)
            if key not in gens:
                gens[key] = NiahGenerator(variant, tok, haystack=hay, tokens_to_generate=GEN_TOKENS,
                                          seed=10_000 + len(gens))
                gens[key] = (gens[key], gens[key].samples(length, 10**9))
            try:
                sample = next(gens[key][1])
            except (ValueError, StopIteration):  # e.g. 4 needles that cannot fit a short budget
                gens[key] = (None, iter(()))
                continue
            prompt = [tok.bos_id] + tok.encode(sample["input"])
            answer = tok.encode(" " + ", ".join(sample["outputs"]) + ".") + [tok.eos_id]
            seqs.append(prompt + answer)
            masks.append([0] * len(prompt) + [1] * len(answer))
        T = max(map(len, seqs))
        tokens = torch.full((batch_size, T), tok.pad_id, dtype=torch.long)
        mask = torch.zeros(batch_size, T)
        for r, (s, m) in enumerate(zip(seqs, masks)):
            tokens[r, : len(s)] = torch.tensor(s)
            mask[r, : len(m)] = torch.tensor(m, dtype=torch.float)
        yield tokens, mask


def train(name: str, steps: int, device: str, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
          log_every: int = 100, time_budget: float = float("inf")) -> GPT:
    """Train until `steps` or `time_budget` seconds, whichever comes first; the schedule follows the nearer one."""
    torch.manual_seed(seed)
    model = GPT(demo_config(name)).init_weights(seed=seed).to(device)
    model.backend = "torch"  # differentiable; the Triton kernels are inference-only
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    data = recall_batches(batch_size, seed=1000 + seed)
    t0 = time.time()
    for step in range(steps):
        progress = max(step / steps, (time.time() - t0) / time_budget)
        if progress >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        tokens, mask = (x.to(device) for x in next(data))
        B, T = tokens.shape
        cu = torch.arange(B + 1, device=device) * (T - 1)
        hidden = model.forward_packed(tokens[:, :-1].reshape(-1), cu, model.new_state(B, device))
        logits = model.lm_head(hidden).float()
        loss_tok = F.cross_entropy(logits, tokens[:, 1:].reshape(-1), reduction="none")
        m = mask[:, 1:].reshape(-1)
        loss = (loss_tok * m).sum() / m.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"{name} step {step:5d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.steps_done = step + 1
    return model


@torch.no_grad()
def quick_accuracy(model: GPT, variant: str, length: int, n: int = 50) -> float:
    """Greedy answers to held-out needle prompts (the evaluation's seed), scored by RULER's string match."""
    tok = ByteTokenizer()
    gen = NiahGenerator(variant, tok, haystack="noise", tokens_to_generate=GEN_TOKENS, seed=42)
    hits = 0
    for sample in gen.samples(length, n):
        ids = torch.tensor([[tok.bos_id] + tok.encode(sample["input"])], device=model.lm_head.weight.device)
        logits, state = model.prefill(ids, logits="last")
        out = []
        for _ in range(GEN_TOKENS):
            nxt = logits.argmax(-1)
            if int(nxt) == tok.eos_id:
                break
            out.append(int(nxt))
            logits, state = model.step(nxt, state)
        hits += all(v.lower() in tok.decode(out).lower() for v in sample["outputs"])
    return hits / n


def save(model: GPT, out_dir: Path, recipe: dict) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out_dir / "model.safetensors"))
    meta = {"format": "gdn2-native", "config": model.config.to_dict(), "tokenizer": "byte", "bos": True,
            "description": FAMILIES[model.config.name][0], "recipe": recipe}
    (out_dir / "config.json").write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gdn2/demo")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--time-budget", type=float, default=float("inf"), help="seconds per model")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    for name in args.families.split(","):
        model = train(name, args.steps, args.device, time_budget=args.time_budget)
        model.eval()
        for param in model.parameters():  # evaluate what is shipped: bf16-rounded weights
            param.data = param.data.to(torch.bfloat16).float()
        for variant in ("niah_single_1", "niah_multikey_1"):
            for length in (512, 1024):
                print(f"{name} {variant}@{length}: {quick_accuracy(model, variant, length):.2f}", flush=True)
        recipe = {"steps": model.steps_done, "batch_size": 32, "lr": 3e-3, "mixture": MIXTURE, "lengths": LENGTHS,
                  "script": "python -m evals.train_demo"}
        save(model, Path(args.out) / name, recipe)


if __name__ == "__main__":
    main()
