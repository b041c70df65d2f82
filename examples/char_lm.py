#!/usr/bin/env python
"""Character-level language model: HyperLSTM against torch.nn.LSTM on real text.

The paper's Penn Treebank / enwik8 character-modelling task, scaled to a corpus every machine has
offline: the Python standard library's own ``.py`` files, found through the running interpreter
(``sysconfig.get_paths()["stdlib"]``). Files are split into train / valid / test by a hash of their
path relative to the library root, so the split is the same on every machine with the same Python
version, and the held-out files are never seen in training. The vocabulary is the 256 byte values
(UTF-8 source; nearly all of it is ASCII, where a byte is a character), so "bits per character"
here is bits per byte.

Both models get the same byte embedding, the same softmax head, the same hidden size, the same
data in the same order and the same number of optimizer steps (or the same wall-clock budget with
``--time-budget``). Training is truncated BPTT over ``--batch`` contiguous streams: the state is
carried from one ``--seq-len`` segment to the next and detached.

    python examples/char_lm.py                          # default run (~10 min on 2 CPU cores), both models
    python examples/char_lm.py --ckpt-dir runs/lm       # ... saving checkpoints every --save-every steps
    python examples/char_lm.py --ckpt-dir runs/lm --resume --steps 3000   # continue the same run
    python examples/char_lm.py --ckpt-dir runs/lm --sample 400 --prime "def " --temperature 0.8
    python examples/char_lm.py --model hyper --hidden 1000 --hyper-size 128 --steps 20000   # larger

On a CUDA machine the models train on the GPU; the HyperLSTM's "auto" backend uses the Triton
kernels (forward and backward).
"""
from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import math
import os
import platform
import random
import statistics
import sys
import sysconfig
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

try:
    from hyperkern import HyperLSTM
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    from hyperkern import HyperLSTM

VOCAB = 256  # bytes
LN2 = math.log(2.0)
MODEL_NAMES = {"hyper": "HyperLSTM", "lstm": "nn.LSTM"}
TEST_DIRS = {"test", "tests", "idle_test"}
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
# Flags that fix the model, the data and its order: a resumed run must use the checkpoint's values.
RUN_KEYS = ("hidden", "hyper_size", "embed_size", "emb_dim", "layer_norm", "batch", "seq_len", "seed",
            "corpus", "include_tests", "max_files", "valid_frac", "test_frac")


# --- command line ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="char_lm.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("models")
    g.add_argument("--model", choices=("both", "hyper", "lstm"), default="both",
                   help="HyperLSTM, nn.LSTM, or both on the same data and budget")
    g.add_argument("--hidden", type=int, default=256, help="hidden size H of both models")
    g.add_argument("--hyper-size", type=int, default=64, help="HyperLSTM hyper hidden size Hh")
    g.add_argument("--embed-size", type=int, default=4, help="HyperLSTM embedding size E (z)")
    g.add_argument("--emb-dim", type=int, default=64, help="byte embedding size (input to both RNNs)")
    g.add_argument("--no-layer-norm", dest="layer_norm", action="store_false",
                   help="HyperLSTM without layer norm (without this flag: layer-normed, as the paper's best models)")
    g.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "reference"),
                   help="HyperLSTM backend (auto: triton on CUDA, else torch)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=2500, help="optimizer steps per model")
    g.add_argument("--time-budget", type=float, default=None,
                   help="also stop each model after this many seconds of training (the same wall-clock budget)")
    g.add_argument("--batch", type=int, default=32, help="number of contiguous streams (batch size)")
    g.add_argument("--seq-len", type=int, default=100, help="truncated-BPTT segment length")
    g.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    g = p.add_argument_group("progress and evaluation")
    g.add_argument("--log-every", type=int, default=50, help="print progress every N steps")
    g.add_argument("--eval-every", type=int, default=500, help="validation bpc every N steps (0: only at the end)")
    g.add_argument("--eval-bytes", type=int, default=50_000,
                   help="bytes of the validation split used for the periodic evaluations")
    g.add_argument("--final-eval-bytes", type=int, default=0,
                   help="cap on the bytes of the validation and test splits scored at the end (0: all of them)")
    g.add_argument("--eval-batch", type=int, default=64, help="streams used when scoring held-out text")
    g.add_argument("--results", default=None,
                   help="write the results as JSON here (default: <ckpt-dir>/results.json when --ckpt-dir is set)")
    g = p.add_argument_group("checkpoints and sampling")
    g.add_argument("--ckpt-dir", default=None, help="save <model>.pt here every --save-every steps and at the end")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the checkpoints in --ckpt-dir (a model without one starts from scratch)")
    g.add_argument("--sample", type=int, default=None, metavar="N",
                   help="do not train: generate N characters from the checkpoint(s) in --ckpt-dir")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    g.add_argument("--prime", default="", help="text the sample starts from (default: a newline)")
    g = p.add_argument_group("corpus")
    g.add_argument("--corpus", default=None,
                   help="folder of .py files (default: this interpreter's standard library, "
                        "sysconfig.get_paths()['stdlib'])")
    g.add_argument("--include-tests", action="store_true", help="also use the test/, tests/, idle_test/ folders")
    g.add_argument("--max-files", type=int, default=0, help="use only this many files (0: all)")
    g.add_argument("--valid-frac", type=float, default=0.05, help="fraction of files held out for validation")
    g.add_argument("--test-frac", type=float, default=0.05, help="fraction of files held out for test")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    positive = ["hidden", "hyper_size", "embed_size", "emb_dim", "steps", "batch", "seq_len", "threads",
                "log_every", "eval_bytes", "eval_batch"]
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in ("eval_every", "save_every", "max_files", "final_eval_bytes"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.time_budget is not None and not args.time_budget > 0:
        parser.error(f"--time-budget must be a positive number of seconds, got {args.time_budget}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.clip < 0:
        parser.error(f"--clip must be >= 0 (0 turns clipping off), got {args.clip}")
    for name in ("valid_frac", "test_frac"):
        if not 0.0 < getattr(args, name) < 0.5:
            parser.error(f"--{name.replace('_', '-')} must lie in (0, 0.5), got {getattr(args, name)}")
    if args.valid_frac + args.test_frac >= 0.9:
        parser.error("--valid-frac + --test-frac must leave at least 10% of the files for training")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        parser.error(f"--temperature must be positive, got {args.temperature}")
    if args.sample is not None and args.sample < 1:
        parser.error(f"--sample must be a positive number of characters, got {args.sample}")
    if (args.sample is not None or args.resume) and not args.ckpt_dir:
        parser.error(f"{'--sample' if args.sample is not None else '--resume'} needs --ckpt-dir (where the checkpoints are)")
    if args.sample is not None and args.resume:
        parser.error("--sample and --resume do not go together (--sample does not train)")
    if args.corpus is None:
        args.corpus = sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(args.corpus):
        parser.error(f"--corpus {args.corpus!r} is not a folder")
    args.corpus = os.path.abspath(args.corpus)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device {args.device!r}: {e}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} asked for, but no CUDA device is visible")
    if args.backend == "triton" and dev.type != "cuda":
        parser.error("--backend triton needs --device cuda (the Triton kernels run on the GPU)")
    return args


# --- corpus ---------------------------------------------------------------------------------------

def _hash(rel: str) -> int:
    return int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big")


def split_of(rel: str, valid_frac: float, test_frac: float) -> str:
    """'train', 'valid' or 'test' for a file, from a hash of its path relative to the corpus root."""
    u = _hash("split:" + rel) / 2.0 ** 64
    if u < test_frac:
        return "test"
    if u < test_frac + valid_frac:
        return "valid"
    return "train"


def corpus_files(root: str, include_tests: bool = False, max_files: int = 0) -> List[str]:
    """Relative paths ('/'-separated) of the .py files under root, in a fixed pseudo-random order
    (sorted by a hash of the path: the training streams mix modules instead of reading the
    library alphabetically). ``max_files`` keeps the first N of that order."""
    skip = SKIP_DIRS | (set() if include_tests else TEST_DIRS)
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for name in filenames:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
                rels.append(rel)
    rels.sort(key=lambda r: (_hash("order:" + r), r))
    return rels[:max_files] if max_files else rels


def load_corpus(args) -> Tuple[Dict[str, torch.Tensor], Dict[str, Dict]]:
    """{split: uint8 tensor of the concatenated files}, {split: {"files", "bytes"}}."""
    rels = corpus_files(args.corpus, args.include_tests, args.max_files)
    if not rels:
        raise SystemExit(f"error: no .py files found under {args.corpus}")
    chunks: Dict[str, List[bytes]] = {"train": [], "valid": [], "test": []}
    for rel in rels:
        with open(os.path.join(args.corpus, rel), "rb") as f:
            chunks[split_of(rel, args.valid_frac, args.test_frac)].append(f.read())
    data, info = {}, {}
    for split, parts in chunks.items():
        blob = b"".join(parts)
        if not parts or len(blob) < 2:
            raise SystemExit(f"error: the {split} split is empty ({len(rels)} files under {args.corpus}); "
                             "use more files (--max-files) or larger --valid-frac / --test-frac")
        data[split] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        info[split] = {"files": len(parts), "bytes": len(blob)}
    need = args.batch * (args.seq_len + 1)
    if info["train"]["bytes"] < need:
        raise SystemExit(f"error: the train split has {info['train']['bytes']} bytes, fewer than "
                         f"--batch x (--seq-len + 1) = {need}; use more files or a smaller batch / seq-len")
    return data, info


def streams(data: torch.Tensor, n: int) -> torch.Tensor:
    """[L, n] view of a byte stream cut into n contiguous streams (the tail that does not fill a
    row is dropped), as int64 token ids."""
    L = data.numel() // n
    return data[: L * n].view(n, L).t().long()


# --- models ---------------------------------------------------------------------------------------

class CharLM(nn.Module):
    """byte embedding -> HyperLSTM or nn.LSTM -> linear softmax head over the 256 bytes."""

    def __init__(self, kind: str, hidden: int, emb_dim: int, hyper_size: int = 64, embed_size: int = 4,
                 layer_norm: bool = True, backend: str = "auto"):
        super().__init__()
        if kind not in MODEL_NAMES:
            raise ValueError(f"kind must be one of {tuple(MODEL_NAMES)}, got {kind!r}")
        self.kind = kind
        self.embedding = nn.Embedding(VOCAB, emb_dim)
        if kind == "hyper":
            self.rnn = HyperLSTM(emb_dim, hidden, hyper_size=hyper_size, embed_size=embed_size, layer_norm=layer_norm, backend=backend)
        else:
            self.rnn = nn.LSTM(emb_dim, hidden)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, x: torch.Tensor, state=None):
        """x: [T, B] byte ids -> logits [T, B, 256], new state."""
        out, state = self.rnn(self.embedding(x), state)
        return self.head(out), state


def make_model(kind: str, args) -> CharLM:
    torch.manual_seed(args.seed)  # the same embedding initialisation for both models
    return CharLM(kind, args.hidden, args.emb_dim, args.hyper_size, args.embed_size, args.layer_norm, args.backend)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def detach_state(state):
    return None if state is None else tuple(s.detach() for s in state)


@torch.no_grad()
def evaluate(model: CharLM, data: torch.Tensor, seq_len: int, n_streams: int, device) -> Tuple[float, int]:
    """(bits per byte, bytes scored) of ``data`` read as n_streams contiguous streams, the state
    carried across segments (each stream starts from a zero state)."""
    n_streams = max(1, min(n_streams, (data.numel() - 1) // 2))
    cols = streams(data, n_streams)
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    try:
        for i in range(0, cols.shape[0] - 1, seq_len):
            T = min(seq_len, cols.shape[0] - 1 - i)
            x = cols[i:i + T].to(device)
            y = cols[i + 1:i + 1 + T].to(device)
            logits, state = model(x, state)
            total += float(F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), reduction="sum"))
            count += y.numel()
    finally:
        model.train(was_training)
    return total / count / LN2, count


@torch.no_grad()
def sample(model: CharLM, n: int, temperature: float = 1.0, prime: str = "", seed: int = 0,
           device="cpu") -> str:
    """Exactly ``n`` characters generated after ``prime`` (not included). Bytes are sampled one at
    a time and decoded as UTF-8 (invalid sequences become U+FFFD)."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    primer = list((prime or "\n").encode("utf-8"))
    x = torch.tensor(primer, dtype=torch.long, device=device).unsqueeze(1)  # [T, 1]
    logits, state = model(x)
    out: List[str] = []
    length = 0
    try:
        while length < n:
            probs = torch.softmax(logits[-1, 0].float().cpu() / temperature, dim=-1)
            byte = int(torch.multinomial(probs, 1, generator=gen))
            piece = decoder.decode(bytes([byte]))
            out.append(piece)
            length += len(piece)
            logits, state = model(torch.tensor([[byte]], dtype=torch.long, device=device), state)
    finally:
        model.train(was_training)
    return "".join(out)[:n]


# --- checkpoints ----------------------------------------------------------------------------------

def ckpt_path(ckpt_dir: str, kind: str) -> str:
    return os.path.join(ckpt_dir, f"{kind}.pt")


def save_checkpoint(path: str, model, optimizer, step: int, state, args, stats: Dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {
        "kind": model.kind, "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "rnn_state": None if state is None else [s.detach().cpu() for s in state],
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "args": {k: v for k, v in vars(args).items()}, "stats": stats,
    }
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never leaves a half-written checkpoint behind


def load_checkpoint(path: str) -> Dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise SystemExit(f"error: cannot read checkpoint {path}: {type(e).__name__}: {e}")


def check_resumable(ckpt: Dict, args, path: str) -> None:
    saved = ckpt.get("args", {})
    diff = [k for k in RUN_KEYS if k in saved and saved[k] != getattr(args, k)]
    if diff:
        flags = ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} (now {getattr(args, k)!r})" for k in diff)
        raise SystemExit(f"error: {path} was trained with different settings: {flags}. Resume with the "
                         "checkpoint's values, or use another --ckpt-dir for a new run.")


# --- training -------------------------------------------------------------------------------------

def _fmt_time(sec: float) -> str:
    sec = int(round(sec))
    return f"{sec // 3600}:{sec // 60 % 60:02d}:{sec % 60:02d}" if sec >= 3600 else f"{sec // 60}:{sec % 60:02d}"


def train_model(kind: str, args, data: Dict[str, torch.Tensor], log=print) -> Dict:
    """Train one model for args.steps steps (or args.time_budget seconds); returns its results."""
    device = torch.device(args.device)
    name = MODEL_NAMES[kind]
    tag = f"[{kind}]"
    model = make_model(kind, args).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    n_params = count_params(model)
    train = streams(data["train"], args.batch)  # [L, B]
    segs = (train.shape[0] - 1) // args.seq_len  # segments per epoch
    step, state = 0, None
    stats = {"train_time": 0.0, "eval_time": 0.0, "tokens": 0, "history": [], "log_loss": 0.0, "log_n": 0,
             "log_tokens": 0, "log_time": 0.0, "rates": []}
    path = ckpt_path(args.ckpt_dir, kind) if args.ckpt_dir else None
    if args.resume and path and os.path.exists(path):
        ckpt = load_checkpoint(path)
        check_resumable(ckpt, args, path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = args.lr  # --lr may change on resume (the same value continues exactly)
        step, stats = ckpt["step"], ckpt["stats"]
        state = None if ckpt["rnn_state"] is None else tuple(s.to(device) for s in ckpt["rnn_state"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        if ckpt["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        log(f"{tag} resumed from {path} at step {step} ({stats['tokens']:,} tokens, "
            f"{_fmt_time(stats['train_time'])} of training so far)")
    elif args.resume and path:
        log(f"{tag} no checkpoint at {path}: starting from scratch")
        torch.manual_seed(args.seed + 1)
    else:
        torch.manual_seed(args.seed + 1)  # a training RNG stream independent of the init above
    log(f"{tag} {name}: {n_params:,} parameters (hidden {args.hidden}"
        + (f", hyper {args.hyper_size}, embed {args.embed_size}, layer norm {args.layer_norm}" if kind == "hyper" else "")
        + f"); {segs:,} segments of {args.batch} x {args.seq_len} per epoch; up to {args.steps:,} steps"
        + (f" or {args.time_budget:.0f} s" if args.time_budget else ""))

    def budget_left() -> bool:
        return step < args.steps and (args.time_budget is None or stats["train_time"] < args.time_budget)

    def checkpoint() -> None:
        if path:
            save_checkpoint(path, model, optimizer, step, state, args, stats)

    def run_eval(nbytes: int, split: str) -> Tuple[float, int, float]:
        t0 = time.perf_counter()
        d = data[split] if not nbytes else data[split][:nbytes + 1]
        bpc, n = evaluate(model, d, args.seq_len, args.eval_batch, device)
        dt = time.perf_counter() - t0
        stats["eval_time"] += dt
        return bpc, n, dt

    wall0 = time.perf_counter()
    model.train()
    try:
        while budget_left():
            seg = step % segs
            if seg == 0:
                state = None  # a new epoch: the streams restart from their beginnings
            i = seg * args.seq_len
            x = train[i:i + args.seq_len].to(device, non_blocking=True)
            y = train[i + 1:i + 1 + args.seq_len].to(device, non_blocking=True)
            t0 = time.perf_counter()
            logits, new_state = model(x, state)
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            lv = float(loss.detach())  # synchronises (CUDA) before the clock is read
            dt = time.perf_counter() - t0
            state = detach_state(new_state)
            step += 1
            ntok = x.numel()
            stats["train_time"] += dt
            stats["tokens"] += ntok
            stats["log_loss"] += lv
            stats["log_n"] += 1
            stats["log_tokens"] += ntok
            stats["log_time"] += dt
            if not math.isfinite(lv):
                raise SystemExit(f"error: {tag} the training loss became {lv} at step {step}; try a lower --lr")
            if step % args.log_every == 0 or not budget_left():
                rate = stats["log_tokens"] / max(stats["log_time"], 1e-9)
                stats.setdefault("rates", []).append(rate)
                remaining = (args.steps - step) * stats["train_time"] / max(step, 1)
                if args.time_budget:
                    remaining = min(remaining, max(args.time_budget - stats["train_time"], 0.0))
                log(f"{tag} step {step:6d}/{args.steps} | train bpc {stats['log_loss'] / stats['log_n'] / LN2:6.3f} "
                    f"| {rate:8,.0f} tok/s | elapsed {_fmt_time(stats['train_time'] + stats['eval_time'])} "
                    f"| eta {_fmt_time(remaining)}")
                stats.update(log_loss=0.0, log_n=0, log_tokens=0, log_time=0.0)
            if args.eval_every and step % args.eval_every == 0 and budget_left():
                bpc, n, dt = run_eval(args.eval_bytes, "valid")
                stats["history"].append({"step": step, "valid_bpc": bpc, "bytes": n})
                log(f"{tag} step {step:6d} | valid bpc {bpc:6.3f} (first {n:,} bytes of the valid split, {dt:.1f} s)")
            if args.save_every and step % args.save_every == 0 and budget_left():
                checkpoint()
    except KeyboardInterrupt:
        if path:
            checkpoint()
            log(f"\n{tag} interrupted at step {step}: saved {path}; continue with --resume")
        raise
    checkpoint()
    if path:
        log(f"{tag} saved {path} (step {step})")
    valid_bpc, valid_n, dt_v = run_eval(args.final_eval_bytes, "valid")
    test_bpc, test_n, dt_t = run_eval(args.final_eval_bytes, "test")
    log(f"{tag} final: valid bpc {valid_bpc:.4f} ({valid_n:,} bytes, {dt_v:.1f} s), "
        f"test bpc {test_bpc:.4f} ({test_n:,} bytes, {dt_t:.1f} s)")
    return {
        "model": name, "kind": kind, "params": n_params, "steps": step, "tokens": stats["tokens"],
        "valid_bpc": valid_bpc, "test_bpc": test_bpc, "valid_bytes_scored": valid_n, "test_bytes_scored": test_n,
        "train_tokens_per_s": stats["tokens"] / max(stats["train_time"], 1e-9),
        # the median over the --log-every intervals: less sensitive to other work on a shared machine
        "train_tokens_per_s_median_interval": statistics.median(stats["rates"]) if stats.get("rates") else None,
        "train_time_s": stats["train_time"], "eval_time_s": stats["eval_time"],
        "wall_time_s": stats["train_time"] + stats["eval_time"], "session_wall_s": time.perf_counter() - wall0,
        "history": stats["history"],
    }


def format_table(results: Sequence[Dict]) -> str:
    head = (f"{'model':10s} {'params':>9s} {'test bpc':>9s} {'valid bpc':>9s} {'train tok/s':>11s} "
            f"{'steps':>6s} {'wall time':>9s}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['model']:10s} {r['params']:9,d} {r['test_bpc']:9.3f} {r['valid_bpc']:9.3f} "
                     f"{r['train_tokens_per_s']:11,.0f} {r['steps']:6d} {_fmt_time(r['wall_time_s']):>9s}")
    return "\n".join(lines)


def machine_line(args) -> str:
    from hyperkern.timing import machine_description

    dev = torch.device(args.device)
    m = machine_description()
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else m["cpu"]
    return f"{where} ({dev.type}, {m['threads']} threads), torch {m['torch']}, Python {m['python']}"


def run(argv: Optional[Sequence[str]] = None, log=print) -> Dict:
    """Parse ``argv`` and train (or sample); returns {"results": [...], "corpus": ..., "samples": ...}."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    kinds = ["hyper", "lstm"] if args.model == "both" else [args.model]
    if args.sample is not None:
        return {"samples": sample_from_checkpoints(args, kinds, log)}
    if args.resume and not os.path.isdir(args.ckpt_dir):
        raise SystemExit(f"error: --resume: no checkpoint folder {args.ckpt_dir}")
    data, info = load_corpus(args)
    log(f"corpus: {args.corpus} (.py files{'' if args.include_tests else ', test folders excluded'}), "
        f"split by file: " + ", ".join(f"{s} {info[s]['files']:,} files / {info[s]['bytes']:,} bytes"
                                       for s in ("train", "valid", "test")))
    log(f"machine: {machine_line(args)}")
    results = [train_model(kind, args, data, log) for kind in kinds]
    log("")
    log(f"byte-level LM on the Python {platform.python_version()} standard library; bpc = bits per byte on "
        f"held-out files; measured on {machine_line(args)}")
    log(format_table(results))
    out = {"results": results, "corpus": {"root": args.corpus, **info}, "machine": machine_line(args),
           "args": vars(args)}
    path = args.results or (os.path.join(args.ckpt_dir, "results.json") if args.ckpt_dir else None)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({**out, "results": [{k: v for k, v in r.items() if k != "final_state_dict"} for r in results]},
                      f, indent=2)
        log(f"wrote {path}")
    return out


def sample_from_checkpoints(args, kinds: Sequence[str], log=print) -> Dict[str, str]:
    out = {}
    for kind in kinds:
        path = ckpt_path(args.ckpt_dir, kind)
        if not os.path.exists(path):
            if args.model != "both":
                raise SystemExit(f"error: no checkpoint {path} (train with --ckpt-dir {args.ckpt_dir} first)")
            continue
        ckpt = load_checkpoint(path)
        a = argparse.Namespace(**{**vars(args), **{k: ckpt["args"][k] for k in RUN_KEYS if k in ckpt["args"]}})
        model = make_model(kind, a)
        model.load_state_dict(ckpt["model"])
        device = torch.device(args.device)
        model.to(device)
        text = sample(model, args.sample, args.temperature, args.prime, args.seed, device)
        out[kind] = text
        log(f"--- {MODEL_NAMES[kind]} (step {ckpt['step']}, temperature {args.temperature}) ---")
        log(args.prime + text)
    if not out:
        raise SystemExit(f"error: no checkpoints (hyper.pt, lstm.pt) in {args.ckpt_dir}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        run(argv, log=lambda *a: print(*a, flush=True))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
