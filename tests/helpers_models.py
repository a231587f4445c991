"""Tiny random dense models of every supported architecture, built offline for tests.

Shared by all test files that need a real Hugging Face model folder (convert, load, adapt, ...):

    from .helpers_models import make_tiny_model   # tests/ is a package
    folder = make_tiny_model("qwen3", tmp_path / "src", shards=2)

The folder is what ``save_pretrained`` writes (``config.json``, ``generation_config.json``,
safetensors weights) plus a tiny word-level tokenizer with a chat template, so code that needs a
tokenizer works without the Hub. ``shards > 1`` splits the weights into ``model-0000i-of-0000N``
files with a ``model.safetensors.index.json``, like large Hub checkpoints.

Architectures (all with GQA, 2 layers, hidden 64, vocab 128):
    llama   plain Llama, untied embeddings
    mistral sliding_window = 16
    qwen2   q/k/v biases, tied embeddings
    qwen3   q/k norms and an explicit head_dim (32, not hidden/heads = 16)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

VOCAB_SIZE = 128
_SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"]
_WORDS = (
    "the a an of to and in is it you that he was for on are with as I his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how said each she "
    "which do their time if will way about many then them write would like so these her long make thing see "
    "him two has look more day could go come did number sound no most people my over know water than call "
    "first who may down side been now find any new work part take get place made live where after back little "
    "only round man year came show every good me give our under name very through just form sentence great "
    "think say help low line differ turn cause much mean before move right boy old too same tell does set three "
    "want air well also play small end put home read hand port large spell add even land here must big high such"
).split()
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)

_BASE = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=5,
)
_ARCH_OVERRIDES = {
    "llama": dict(tie_word_embeddings=False),
    "mistral": dict(sliding_window=16, tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=32, tie_word_embeddings=False),
}


def tiny_config(arch: str, **config_overrides):
    """The transformers config of a tiny ``arch`` model (fields overridable)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    if arch not in classes:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    fields = {**_BASE, **_ARCH_OVERRIDES[arch], **config_overrides}
    return classes[arch](**fields)


def save_tiny_tokenizer(path: str | Path) -> None:
    """Write a word-level tokenizer (vocab < 128) with a ChatML-like template into ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(_SPECIALS + _WORDS))[:VOCAB_SIZE]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(str(path))


def _split_into_shards(path: Path, shards: int) -> None:
    """Replace ``model.safetensors`` by ``shards`` files and an index (tensors unchanged)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    single = path / "model.safetensors"
    with safe_open(single, framework="pt") as f:
        names = list(f.keys())
        tensors = {n: f.get_tensor(n) for n in names}
        metadata = f.metadata() or {"format": "pt"}
    shards = min(shards, len(names))
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[s * per : (s + 1) * per]}
        save_file(part, str(path / file), metadata=metadata)
        for n, t in part.items():
            weight_map[n] = file
            total += t.numel() * t.element_size()
    single.unlink()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_tiny_model(
    arch: str,
    path: str | Path,
    *,
    shards: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
    **config_overrides,
) -> Path:
    """Build a random tiny ``arch`` model and save it (safetensors) into ``path``; returns the folder.

    ``seed`` fixes the weights; ``dtype`` is the stored dtype; ``config_overrides`` change config
    fields (e.g. ``num_hidden_layers=3``).
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # init std 0.02 gives near-uniform logits: widen so outputs tell models apart
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=5, max_new_tokens=8)
    model.save_pretrained(str(path))
    if shards > 1:
        _split_into_shards(path, shards)
    if tokenizer:
        save_tiny_tokenizer(path)
    return path
