"""Train the three embedded demo checkpoints (GDN-2, KDA, Gated DeltaNet) on a synthetic recall mixture.

Recipe (the same for the three families; only the mixer's gate parameterisation differs):
  - tokenizer: a 1024-entry byte-level BPE (Hugging Face `tokenizers`, every byte reachable, so any text encodes),
    trained on text from the same generators; shipped as tokenizer.json beside each checkpoint (no download).
  - data: RULER-style needle prompts from our own generator (tasks/ruler/niah.py) with training seeds that the
    evaluation never uses (eval seed 42; training seeds start at 10_000), lengths 128-640 tokens,
    a mixture of S-NIAH (noise haystack), MK-NIAH (noise haystack with 4 keys), needle haystacks (MK-NIAH-2) and
    UUID values; the model sees "<s>" + prompt and learns the answer " <value>." followed by "</s>";
    the loss is on the answer tokens only.
  - model: 4 blocks, d = 128, 2 heads of 64, MLP 384, vocabulary 1024: ~0.9M parameters.
  - each sequence also asks about up to three other needles of its haystack (more answers per sequence).
  - optimiser: AdamW (betas 0.9/0.95, wd 0.1), 50 warm-up steps, cosine to 10% of the peak lr.
  - the shipped checkpoints had three stages, recorded in each config.json under recipe.stages:
      1. on one H200: lr 5e-3, batch 64, lengths 128-640, 250 s per model (about 805 steps), from
         GPT.init_weights as it was then (the final norm's gain drawn at std 0.02; it now starts at 1);
      2. on a 2-core CPU from stage 1: lr 2e-3, batch 16, lengths 128-256, 330 steps
         (`--init gdn2/demo --device cpu --lengths 128,160,192,256 --batch-size 16 --lr 2e-3 --steps 330`);
      3. on one H200 from stage 2, the three families as parallel processes: lr 3e-3, batch 128,
         lengths 128-512, 480 s each (950-1160 steps).
  - stored in bf16 safetensors (native format) under gdn2/demo/<name>/.
These are toy models for the demo suite, not the paper's 1.3B models.

    python -m evals.tools.train_demo --out gdn2/demo --device cuda --time-budget 250 --steps 100000     # stage 1
    python -m evals.tools.train_demo --out gdn2/demo --init gdn2/demo --device cpu --lengths 128,160,192,256 \
        --batch-size 16 --lr 2e-3 --workers 1 --steps 330                                         # stage 2
    for f in gdn2-demo kda-demo gdn-demo; do python -m evals.tools.train_demo --out gdn2/demo --init gdn2/demo \
        --families $f --device cuda --time-budget 480 --steps 100000 --batch-size 128 --lr 3e-3 \
        --lengths 128,192,256,320,384,512 & done; wait                                             # stage 3
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gdn2.config import Config
from gdn2.model import GPT
from gdn2.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from tasks.ruler.niah import NiahGenerator

FAMILIES = {
    # name: (description, config overrides)
    "gdn2-demo": ("Gated DeltaNet-2: channel-wise erase b and write w", {}),
    "kda-demo": ("KDA: channel-wise decay, tied scalar beta for erase and write", {"beta": "scalar"}),
    "gdn-demo": ("Gated DeltaNet: scalar decay, tied scalar beta", {"beta": "scalar", "decay": "scalar"}),
}
MODEL = dict(vocab_size=1024, padding_multiple=64, n_layer=4, n_embd=128, n_head=4, intermediate_size=384,
             gdn2_per_layer=1, gdn2_num_heads=2, gdn2_head_dim=64, local_window=64)
MIXTURE = [  # (variant, haystack, weight)
    ("niah_single_1", "noise", 2), ("niah_multikey_1", "noise", 4), ("niah_multikey_2", "needle", 3),
    ("niah_single_3", "noise", 1),
]
NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.")
QUESTION = ("\nWhat is the special magic {t} for {k} mentioned in the provided text? "
            "The special magic {t} for {k} mentioned in the provided text is")
LENGTHS = [128, 192, 256, 320, 384, 512, 640]
VOCAB = 1024
SPECIALS = ["<s>", "</s>", "<pad>"]
GEN_TOKENS = 16


def demo_config(name: str) -> Config:
    return Config(name=name, **MODEL, **FAMILIES[name][1])


def build_tokenizer(out_dir: Path, n_samples: int = 3000) -> Tokenizer:
    """Train the demo BPE on generator text (training seeds) and write tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    texts = []
    byte = ByteTokenizer()
    for i, (variant, hay, _) in enumerate(MIXTURE):
        gen = NiahGenerator(variant, byte, haystack=hay, tokens_to_generate=GEN_TOKENS, seed=20_000 + i,
                            sizing="tight")
        for sample in gen.samples(2048, n_samples // len(MIXTURE)):
            texts.append(sample["input"] + " " + ", ".join(sample["outputs"]) + ".")
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True}, indent=2) + "\n")
    return load_tokenizer(out_dir)


def recall_sequence(sample: dict, tok: Tokenizer, rng: random.Random, extra_questions: int = 3):
    """BOS + prompt + answer, then up to `extra_questions` more questions about the other needles of the haystack
    (more supervised answers per sequence); returns (tokens, loss mask on the answers)."""
    ids, mask = [tok.bos_id] + tok.encode(sample["input"]), []
    mask = [0] * len(ids)
    answers = [" " + ", ".join(sample["outputs"]) + "."]
    needles = [(t[:-1], k, v) for t, k, v in NEEDLE.findall(sample["input"]) if v not in sample["outputs"]]
    rng.shuffle(needles)
    for t, k, v in needles[:extra_questions]:
        answers.append((QUESTION.format(t=t, k=k), " " + v + "."))
    for i, answer in enumerate(answers):
        if i:
            question, answer = answer
            q = tok.encode(question)
            ids += q
            mask += [0] * len(q)
        a = tok.encode(answer) + ([tok.eos_id] if i == len(answers) - 1 else [])
        ids += a
        mask += [1] * len(a)
    return ids, mask


class RecallStream(torch.utils.data.IterableDataset):
    """Endless needle sequences; each DataLoader worker draws from its own seeds."""

    def __init__(self, tok_dir: str, seed: int):
        self.tok_dir, self.seed = tok_dir, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        tok = load_tokenizer(self.tok_dir)
        rng = random.Random(self.seed * 1000 + wid)
        gens = {}
        weights = [w for *_, w in MIXTURE]
        while True:
            variant, hay, _ = rng.choices(MIXTURE, weights)[0]
            key = (variant, hay, rng.choice(LENGTHS))
            if key not in gens:
                g = NiahGenerator(variant, tok, haystack=hay, tokens_to_generate=GEN_TOKENS,
                                  seed=10_000 + 100 * wid + len(gens), sizing="tight")
                gens[key] = g.samples(key[2], 10**9)
            try:
                sample = next(gens[key])
            except (ValueError, StopIteration):  # e.g. 4 needles that cannot fit a short budget
                gens[key] = iter(())
                continue
            yield recall_sequence(sample, tok, rng)


def collate(batch, pad_id: int):
    T = max(len(ids) for ids, _ in batch)
    tokens = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), T)
    for r, (ids, m) in enumerate(batch):
        tokens[r, : len(ids)] = torch.tensor(ids)
        mask[r, : len(m)] = torch.tensor(m, dtype=torch.float)
    return tokens, mask


def recall_batches(tok_dir: str, batch_size: int, seed: int, workers: int = 4):
    tok = load_tokenizer(tok_dir)
    loader = torch.utils.data.DataLoader(
        RecallStream(str(tok_dir), seed), batch_size=batch_size, num_workers=workers,
        collate_fn=lambda b: collate(b, tok.eos_id), prefetch_factor=4 if workers else None,
        persistent_workers=workers > 0)
    return iter(loader)


def train(name: str, tok_dir: str, steps: int, device: str, batch_size: int = 64, lr: float = 5e-3, seed: int = 0,
          workers: int = 4, log_every: int = 100, time_budget: float = float("inf"), init: str | None = None,
          lengths: list[int] | None = None) -> GPT:
    """Train until `steps` or `time_budget` seconds, whichever comes first; the schedule follows the nearer one."""
    torch.manual_seed(seed)
    model = GPT(demo_config(name)).init_weights(seed=seed).to(device)
    if init:  # continue from an earlier run of this recipe
        from safetensors.torch import load_file

        model.load_state_dict({k: v.float() for k, v in load_file(str(Path(init) / "model.safetensors")).items()})
    if lengths:
        LENGTHS[:] = lengths
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    data = recall_batches(tok_dir, batch_size, seed=1000 + seed, workers=workers)
    t0 = time.time()
    for step in range(steps):
        progress = max(step / steps, (time.time() - t0) / time_budget)
        if progress >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        tokens, mask = (x.to(device) for x in next(data))
        B, T = tokens.shape
        cu = torch.arange(B + 1, device=device) * (T - 1)
        hidden = model.forward_packed(tokens[:, :-1].reshape(-1), cu, model.new_state(B, device),
                                      backend="torch")  # differentiable; the Triton kernels are inference-only
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
def quick_accuracy(model: GPT, tok: Tokenizer, variant: str, length: int, n: int = 50) -> float:
    """Greedy answers to held-out needle prompts (the evaluation's seed), scored by RULER's string match."""
    gen = NiahGenerator(variant, tok, haystack="noise", tokens_to_generate=GEN_TOKENS, seed=42, sizing="tight")
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


def save(model: GPT, out_dir: Path, recipe: dict, tok_dir: Path) -> None:
    import shutil

    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out_dir / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, out_dir / name)
    meta = {"format": "gdn2-native", "config": model.config.to_dict(), "bos": True,
            "description": FAMILIES[model.config.name][0], "recipe": recipe}
    (out_dir / "config.json").write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gdn2/demo")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--time-budget", type=float, default=float("inf"), help="seconds per model")
    p.add_argument("--init", help="folder holding <family>/model.safetensors to continue from")
    p.add_argument("--lengths", help="comma-separated training lengths (default: the recipe's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--no-eval", action="store_true", help="skip the held-out needle check after training")
    args = p.parse_args(argv)
    torch.set_float32_matmul_precision("high")  # tf32 for training speed; one API, never mixed with the legacy flag
    tok_dir = Path(args.out) / "tokenizer"
    tok = load_tokenizer(tok_dir) if (tok_dir / "tokenizer.json").exists() else build_tokenizer(tok_dir)
    for name in args.families.split(","):
        model = train(name, str(tok_dir), args.steps, args.device, time_budget=args.time_budget,
                      init=str(Path(args.init) / name) if args.init else None, batch_size=args.batch_size,
                      lr=args.lr, lengths=[int(x) for x in args.lengths.split(",")] if args.lengths else None,
                      workers=args.workers, log_every=args.log_every)
        model.eval()
        for param in model.parameters():  # evaluate what is shipped: bf16-rounded weights
            param.data = param.data.to(torch.bfloat16).float()
        for variant in () if args.no_eval else ("niah_single_1", "niah_multikey_1"):
            for length in (256, 512, 1024):
                print(f"{name} {variant}@{length}: {quick_accuracy(model, tok, variant, length):.2f}", flush=True)
        stage = {"steps": model.steps_done, "batch_size": args.batch_size, "lr": args.lr, "mixture": MIXTURE,
                 "lengths": list(LENGTHS), "device": args.device, "init": args.init,
                 "command": "python -m evals.tools.train_demo " + " ".join(argv if argv is not None else sys.argv[1:])}
        earlier = []
        if args.init and (Path(args.init) / name / "config.json").is_file():
            recipe = json.loads((Path(args.init) / name / "config.json").read_text()).get("recipe", {})
            earlier = recipe.get("stages", [])
        save(model, Path(args.out) / name, {"stages": earlier + [stage]}, tok_dir)


if __name__ == "__main__":
    main()
