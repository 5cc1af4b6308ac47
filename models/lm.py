"""A small decoder-only language model (GPT-style), byte-level, trained here on Python standard-library source.

Architecture: token embedding (256 byte values) + learned positions (context 128), 2 pre-LayerNorm blocks
of causal multi-head self-attention (4 heads, width 96) and a GELU MLP (384), a final LayerNorm and an
untied linear head: 285 k parameters (small, so that ``make test`` can train it: ~15-30 s of one core).  Attention is written out (MatMul, a causal mask, Softmax)
so the exported graph holds plain ONNX ops that the compression passes can see.

Corpus: a fixed list of modules of the installed Python's ``Lib`` folder (``TRAIN_FILES``); held-out text
for perplexity comes from other modules (``HELDOUT_FILES``).  Training is a fixed recipe (``RECIPE``: seeded,
``STEPS`` steps on one torch thread, a step-based learning-rate schedule), so the weights do not depend on
how busy the machine is; it is cached (checkpoint + ONNX) under a name that carries a digest of the recipe
and the training text, so a changed recipe or corpus trains afresh and an unchanged one never retrains.

Export: input ``input_ids`` int64 [batch, sequence] (both dynamic, sequence <= 128) -> ``logits`` float32
[batch, sequence, 256].

Task metric: perplexity on held-out text (``exp`` of the mean next-byte cross-entropy over 64 windows of
128 bytes).  A uniform guess over 256 byte values has perplexity 256; the fp32 model is asserted to stay
below ``FP32_MAX_PERPLEXITY`` and well below the unigram baseline (``unigram_perplexity``: byte frequencies
alone, 23.6).  ``ppl_increase`` is the candidate's perplexity minus the fp32 model's,
``ppl_increase_rel`` the same relative to the fp32 perplexity (0.1: 10% higher; what budgets bound);
``top1_agreement`` the share of positions whose most likely next byte matches the fp32 model's.

Run as a script to train/build it and print its figures: ``python -m onnxpress.models lm``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np

from onnxpress.models import common

VERSION = 2  # of the code below (architecture, training loop); the cache key also hashes RECIPE and the corpus
NAME = "lm"
SEED = 0
VOCAB = 256
CONTEXT = 128
WIDTH = 96
LAYERS = 2
HEADS = 4
MLP_WIDTH = 384
STEPS = 300
BATCH = 8
LEARNING_RATE = 3e-3
WARMUP = 15
THREADS = 1  # a fixed intra-op thread count: float sums (and so the weights) do not depend on the machine's cores
INPUT = "input_ids"
OUTPUT = "logits"
EVAL_WINDOWS = 64
# Measured 13.20 (torch 2.13 CPU): 0.56x the unigram baseline (23.56), 19x below uniform (256).
FP32_MAX_PERPLEXITY = 14.0

TRAIN_FILES = (
    "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "cmd.py", "code.py", "codecs.py",
    "colorsys.py", "configparser.py", "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "datetime.py",
    "difflib.py", "dis.py", "enum.py", "fileinput.py", "fnmatch.py", "fractions.py", "ftplib.py", "functools.py",
    "getopt.py", "gettext.py", "glob.py", "gzip.py", "heapq.py", "hmac.py", "imaplib.py", "inspect.py",
    "ipaddress.py", "keyword.py", "linecache.py", "locale.py", "mailbox.py", "mimetypes.py", "netrc.py",
    "numbers.py", "opcode.py", "operator.py", "optparse.py", "os.py", "pathlib.py", "pdb.py", "pickle.py",
    "pkgutil.py", "platform.py", "plistlib.py", "poplib.py", "pprint.py", "queue.py", "quopri.py", "random.py",
    "reprlib.py", "sched.py", "secrets.py", "selectors.py", "shelve.py", "shlex.py", "shutil.py", "smtplib.py",
    "socket.py", "socketserver.py", "stat.py", "string.py", "subprocess.py", "symtable.py", "tabnanny.py",
    "tarfile.py", "tempfile.py", "textwrap.py", "threading.py", "timeit.py", "token.py", "tokenize.py", "trace.py",
    "traceback.py", "types.py", "typing.py", "uuid.py", "warnings.py", "wave.py", "weakref.py", "webbrowser.py",
    "zipapp.py",
)
HELDOUT_FILES = ("statistics.py", "bdb.py", "filecmp.py", "graphlib.py", "compileall.py", "pstats.py")
# Everything the trained weights depend on besides the code (VERSION) and the corpus bytes.
RECIPE = {
    "version": VERSION, "seed": SEED, "vocab": VOCAB, "context": CONTEXT, "width": WIDTH, "layers": LAYERS, "heads": HEADS,
    "mlp_width": MLP_WIDTH, "steps": STEPS, "batch": BATCH, "learning_rate": LEARNING_RATE, "warmup": WARMUP,
    "threads": THREADS, "train_files": TRAIN_FILES,
}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read(names: tuple[str, ...]) -> bytes:
    lib = stdlib_dir()
    parts = [(lib / n).read_bytes() for n in names if (lib / n).is_file()]
    if not parts:
        raise FileNotFoundError(f"none of the corpus files exist under {lib}")
    return b"\n".join(parts)


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[np.ndarray, np.ndarray]:
    """(training bytes, held-out bytes) as uint8 arrays."""
    train = np.frombuffer(_read(TRAIN_FILES), dtype=np.uint8)
    heldout = np.frombuffer(_read(tuple(n for n in HELDOUT_FILES if n not in TRAIN_FILES)), dtype=np.uint8)
    return train, heldout


def recipe_digest(recipe: dict | None = None) -> str:
    """12 hex digits of SHA-256 over the training recipe and the training bytes: the cache key of the build."""
    train, _ = corpus()
    h = hashlib.sha256(json.dumps(RECIPE if recipe is None else recipe, sort_keys=True).encode())
    h.update(hashlib.sha256(train.tobytes()).digest())
    return h.hexdigest()[:12]


def unigram_perplexity() -> float:
    """The held-out perplexity of the training text's byte frequencies (add-half smoothing) on the evaluation
    windows: what a model that ignores all context reaches. A trained LM must be clearly below it."""
    train, _ = corpus()
    p = (np.bincount(train, minlength=VOCAB) + 0.5) / (len(train) + 0.5 * VOCAB)
    nll = np.concatenate([-np.log(p[f[INPUT][:, 1:]]).ravel() for f in evaluation_feeds()])
    return float(np.exp(nll.mean()))


def encode(text: str | bytes) -> np.ndarray:
    """Byte-level tokenizer: the UTF-8 bytes as int64 token ids."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64)


def decode(ids: Any) -> str:
    return bytes(int(i) for i in np.asarray(ids).ravel()).decode("utf-8", errors="replace")


def make_module():
    """A freshly initialised GPT (seed it first for reproducibility)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1 = nn.LayerNorm(WIDTH)
            self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
            self.proj = nn.Linear(WIDTH, WIDTH)
            self.ln2 = nn.LayerNorm(WIDTH)
            self.fc = nn.Linear(WIDTH, MLP_WIDTH)
            self.out = nn.Linear(MLP_WIDTH, WIDTH)
            self.register_buffer("causal", torch.tril(torch.ones(CONTEXT, CONTEXT, dtype=torch.bool)), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, c = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(WIDTH, dim=-1)
            q = q.view(b, t, HEADS, c // HEADS).transpose(1, 2)
            k = k.view(b, t, HEADS, c // HEADS).transpose(1, 2)
            v = v.view(b, t, HEADS, c // HEADS).transpose(1, 2)
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(c // HEADS))
            scores = scores.masked_fill(~self.causal[:t, :t], float("-inf"))
            attn = torch.softmax(scores, dim=-1) @ v
            x = x + self.proj(attn.transpose(1, 2).reshape(b, t, c))
            return x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))

    class TinyGPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Embedding(VOCAB, WIDTH)
            self.positions = nn.Embedding(CONTEXT, WIDTH)
            self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
            self.ln_f = nn.LayerNorm(WIDTH)
            self.head = nn.Linear(WIDTH, VOCAB, bias=False)
            self.apply(self._init)

        @staticmethod
        def _init(m: nn.Module) -> None:
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            t = input_ids.shape[1]
            x = self.tokens(input_ids) + self.positions(torch.arange(t, device=input_ids.device))
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_f(x))

    return TinyGPT()


@contextlib.contextmanager
def _no_memory_fill():
    """Deterministic mode (seed_everything) also fills every new tensor with NaN to expose reads of
    uninitialised memory: ~6% of a training step here, and no kernel of this model reads such memory."""
    import torch

    before = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = before


def learning_rate(step: int) -> float:
    """Linear warm-up over WARMUP steps, then cosine decay to a tenth of LEARNING_RATE at STEPS."""
    steps = STEPS
    return LEARNING_RATE * min(1.0, (step + 1) / WARMUP) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def train(steps: int = STEPS) -> tuple[Any, dict]:
    """The module after ``steps`` seeded optimizer steps on one torch thread: the same weights at any machine
    load (the wall time is recorded, never used). ``steps`` below STEPS: the first steps of the same run."""
    import torch

    common.seed_everything(SEED)
    train_bytes, _ = corpus()
    data = torch.from_numpy(train_bytes.astype(np.int64))
    net = make_module()
    decay = [p for n, p in net.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in net.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=LEARNING_RATE, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(SEED)
    net.train()
    losses: list[float] = []
    with common.Timer() as timer, common.torch_threads(THREADS), _no_memory_fill():
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = learning_rate(step)
            idx = torch.randint(0, len(data) - CONTEXT - 1, (BATCH,), generator=gen)
            window = torch.stack([data[i : i + CONTEXT + 1] for i in idx.tolist()])
            logits = net(window[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), window[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
    net.eval()
    info = {
        "train_seconds": round(timer.seconds, 1),
        "steps": steps,
        "tokens_seen": steps * BATCH * CONTEXT,
        "final_train_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
        "corpus_train_bytes": int(len(train_bytes)),
        "recipe": recipe_digest(),
    }
    return net, info


def module(cache_dir: str | os.PathLike | None = None):
    """The trained torch module (trained once, then loaded from the cached checkpoint)."""
    import torch

    path = common.cache_dir(cache_dir) / f"{NAME}-{recipe_digest()}.pt"

    def build(p: Path) -> None:
        net, info = train()
        common.atomic_write(p, lambda tmp: torch.save({"state_dict": net.state_dict(), "info": info}, tmp))

    common.cached(path, build)
    net = make_module()
    net.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    return net.eval()


def example_inputs(batch: int = 2, length: int = 16):
    import torch

    _, heldout = corpus()
    ids = heldout[: batch * length].astype(np.int64).reshape(batch, length)
    return (torch.from_numpy(ids.copy()),)


def build(cache_dir: str | os.PathLike | None = None) -> Path:
    """The fp32 ONNX model (cached; trains first if no checkpoint is cached); ``<name>.json`` holds its figures."""
    path = common.cache_dir(cache_dir) / f"{NAME}-{recipe_digest()}.onnx"

    def build_onnx(p: Path) -> None:
        import torch

        from onnxpress.export import export

        with common.Timer() as total:
            net = module(cache_dir)
            with common.Timer() as t_export:
                model = export(net, example_inputs(), input_names=[INPUT], output_names=[OUTPUT], dynamic_axes_by_name={INPUT: {0: "batch", 1: "sequence"}})
        info = {
            "model": NAME,
            "parameters": common.parameter_count(net),
            "perplexity": _perplexity(_logits(model, evaluation_feeds()), evaluation_feeds()),
            "uniform_perplexity": VOCAB,
            "unigram_perplexity": unigram_perplexity(),
            "export_seconds": round(t_export.seconds, 2),
            "build_seconds": round(total.seconds, 2),
            **torch.load(p.with_suffix(".pt"), weights_only=True)["info"],
            **common.versions(),
        }
        common.save_json(info, p.with_suffix(".json"))
        common.save_onnx(model, p)

    return common.cached(path, build_onnx)


def _windows(data: np.ndarray, count: int, rng_seed: int) -> np.ndarray:
    """``count`` windows of CONTEXT bytes at seeded, non-overlapping offsets."""
    starts = np.arange(0, len(data) - CONTEXT, CONTEXT)
    chosen = np.sort(np.random.default_rng(rng_seed).choice(starts, size=min(count, len(starts)), replace=False))
    return np.stack([data[s : s + CONTEXT] for s in chosen]).astype(np.int64)


def calibration_feeds(n: int = 32, batch_size: int = 8) -> list[dict[str, np.ndarray]]:
    """``n`` windows of 128 bytes of training text (disjoint from the held-out text)."""
    train, _ = corpus()
    return common.batches({INPUT: _windows(train, n, SEED + 1)}, batch_size)


def evaluation_feeds(batch_size: int = 16) -> list[dict[str, np.ndarray]]:
    """64 held-out windows of 128 bytes in batches."""
    _, heldout = corpus()
    return common.batches({INPUT: _windows(heldout, EVAL_WINDOWS, SEED + 2)}, batch_size)


def _logits(model_or_path: Any, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    return common.run_feeds(model_or_path, feeds, OUTPUT)


def next_token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each next byte: logits [b, t, V] predict ids[:, 1:]."""
    z = logits[:, :-1].astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]


def _perplexity(logits: list[np.ndarray], feeds: list[dict[str, np.ndarray]]) -> float:
    nll = np.concatenate([next_token_nll(z, f[INPUT]).ravel() for z, f in zip(logits, feeds)])
    return float(np.exp(nll.mean()))


@functools.lru_cache(maxsize=2)
def _fp32_logits(path: str, digest: str) -> tuple[np.ndarray, ...]:
    """The fp32 build's logits on the evaluation feeds, computed once per build (``digest`` keys a rebuild):
    a search evaluates many candidates against the same reference."""
    return tuple(_logits(path, evaluation_feeds()))


def evaluate(model_or_path: Any, reference: Any = None) -> dict[str, float]:
    """Held-out perplexity, its increase over ``reference`` (default: the fp32 build), top-1 agreement."""
    feeds = evaluation_feeds()
    logits = _logits(model_or_path, feeds)
    if reference is None:
        path = build()
        ref_logits = list(_fp32_logits(str(path), common.file_digest(path)))
    else:
        ref_logits = _logits(reference, feeds)
    ppl = _perplexity(logits, feeds)
    ref_ppl = _perplexity(ref_logits, feeds)
    agree = np.concatenate([(a.argmax(-1) == b.argmax(-1)).ravel() for a, b in zip(logits, ref_logits)])
    return {
        "perplexity": ppl,
        "ppl_increase": ppl - ref_ppl,
        "ppl_increase_rel": ppl / ref_ppl - 1.0,
        "reference_perplexity": ref_ppl,
        "top1_agreement": float(agree.mean()),
        "tokens": int(sum(f[INPUT].shape[0] * (f[INPUT].shape[1] - 1) for f in feeds)),
    }


def generate(model_or_path: Any, prompt: str, length: int = 80) -> str:
    """Greedy continuation of ``prompt`` (a quick look at what the model learned)."""
    session = common.session_for(model_or_path)
    ids = list(encode(prompt))
    for _ in range(length):
        window = np.array([ids[-CONTEXT:]], dtype=np.int64)
        logits = session.run([OUTPUT], {INPUT: window})[0]
        ids.append(int(logits[0, -1].argmax()))
    return decode(ids)


def main() -> None:  # pragma: no cover - a script entry point
    path = build()
    info = common.build_info(path)
    print(f"{NAME}: {path} {path.stat().st_size / 1e6:.1f} MB, {info['parameters']:,} params, "
          f"perplexity {info['perplexity']:.3f} (unigram {info['unigram_perplexity']:.2f}, uniform {VOCAB}), "
          f"{info['steps']} steps in {info['train_seconds']} s, "
          f"export {info['export_seconds']} s")
    print(repr(generate(path, "def __init__(self")))

