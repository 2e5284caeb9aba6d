"""Text encoders of Stable Diffusion, under the original LDM parameter names.

- `CLIPTextEmbedder` (SD 1.x): OpenAI CLIP ViT-L/14 text model (transformers), last hidden state,
  B×77×768; parameters named `transformer.text_model.*` as in SD 1.x files.
- `OpenCLIPTextEmbedder` (SD 2.x): OpenCLIP ViT-H/14 text tower (open_clip), output of the
  penultimate block then `ln_final`, B×77×1024; parameters named `model.*` as in SD 2.x files.

Both tokenize offline with CLIP's BPE: a diffusers folder's `tokenizer/` when given, else the
vocabulary bundled with open_clip; `write_clip_tokenizer` writes the latter as a `tokenizer/`
folder so diffusers folders can be saved without a hub.

transformers and open_clip's model code are imported when a model that needs them is built; the BPE
tokenizer comes from open_clip's `tokenizer.py` alone, loaded without `open_clip/__init__` (which would
import torchvision's model zoo, timm and transformers just for a vocabulary).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from open_clip.tokenizer import SimpleTokenizer

# OpenAI CLIP ViT-L/14 text model, as in SD 1.x.
CLIP_VIT_L_TEXT_CONFIG: dict = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}

# CLIP's BPE vocabulary ends with the two special tokens; diffusers' tokenizer files name them so.
SOT_TOKEN, EOT_TOKEN = "<|startoftext|>", "<|endoftext|>"
OPENCLIP_LAYERS = ("last", "penultimate")


def clip_special_token_ids(vocab_size: int) -> dict:
    """bos/eos ids of a CLIP vocabulary: its last two entries (49406, 49407 for 49408)."""
    return {"bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1}


# Where open_clip's tokenizer module lives when loaded on its own (see open_clip_tokenizer_module).
_TOKENIZER_MODULE = "ldm.models._open_clip_tokenizer"


@lru_cache(maxsize=1)
def open_clip_tokenizer_module() -> ModuleType:
    """open_clip's `tokenizer.py` (CLIP's BPE, its text cleaning, the bundled vocabulary), the same code.

    `import open_clip.tokenizer` would first run `open_clip/__init__`, which imports the whole library:
    torchvision's model zoo, timm, transformers (seconds). The file needs none of it, so it is loaded by
    itself from open_clip's folder; where open_clip is imported already, or the file cannot stand alone
    (another open_clip version), open_clip's own module is used.
    """
    if "open_clip.tokenizer" in sys.modules:
        return sys.modules["open_clip.tokenizer"]
    spec = importlib.util.find_spec("open_clip")  # locates the package without running its __init__
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(d) / "tokenizer.py" for d in locations if (Path(d) / "tokenizer.py").is_file()), None)
    if path is not None:
        file_spec = importlib.util.spec_from_file_location(_TOKENIZER_MODULE, path)
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[_TOKENIZER_MODULE] = module
        try:
            file_spec.loader.exec_module(module)
        except ImportError:  # e.g. a relative import: this version's tokenizer needs its package
            pass
        else:
            if all(hasattr(module, n) for n in ("SimpleTokenizer", "basic_clean", "whitespace_clean", "default_bpe")):
                return module
        sys.modules.pop(_TOKENIZER_MODULE, None)
    return importlib.import_module("open_clip.tokenizer")


def clean_text(text: str) -> str:
    """CLIP's text normalisation (ftfy, HTML unescape, whitespace, lower case), as open_clip does.

    transformers 5's CLIPTokenizer only does NFC + lower case, so curly quotes or `&amp;` would
    otherwise get other ids than the ones SD was trained with.
    """
    tok = open_clip_tokenizer_module()
    return tok.whitespace_clean(tok.basic_clean(text)).lower()


@lru_cache(maxsize=1)
def _open_clip_bpe() -> SimpleTokenizer:
    tok = open_clip_tokenizer_module()
    return tok.SimpleTokenizer(bpe_path=tok.default_bpe())


class ClipBPETokenizer:
    """CLIP BPE tokenizer: `<sot> text <eot>` ids, truncated to `max_length` keeping `<eot>` last
    (as CLIP does), padded with `pad_id` (None: with `<eot>`, as SD 1.x)."""

    def __init__(self, tokenizer_dir: str | None = None, max_length: int = 77, pad_id: int | None = None):
        if max_length < 2:
            raise ValueError(f"max_length must leave room for <sot> and <eot>, got {max_length}")
        self.max_length = max_length
        source = _open_clip_bpe_source() if tokenizer_dir is None else _transformers_bpe_source(tokenizer_dir)
        self._encode, self.sot_id, self.eot_id = source
        self.pad_id = self.eot_id if pad_id is None else pad_id

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            raise TypeError("tokenize expects a list of prompts, got a single string")
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        for row, bpe_ids in enumerate(self._encode(list(prompts))):
            tokens = [self.sot_id, *bpe_ids[: self.max_length - 2], self.eot_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids


# A BPE source: (texts -> ids without specials, sot id, eot id).
BPESource = tuple[Callable[[list[str]], list[list[int]]], int, int]


def _open_clip_bpe_source() -> BPESource:
    bpe = _open_clip_bpe()  # cleans the text itself

    def encode(texts: list[str]) -> list[list[int]]:
        return [bpe.encode(t) for t in texts]

    return encode, bpe.sot_token_id, bpe.eot_token_id


def _transformers_bpe_source(tokenizer_dir: str) -> BPESource:
    from transformers import CLIPTokenizer

    open_clip_tokenizer_module()  # clean_text's, loaded first as before (it sets TOKENIZERS_PARALLELISM)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer in {tokenizer_dir} has no bos/eos token; is it a CLIP tokenizer?")

    def encode(texts: list[str]) -> list[list[int]]:
        cleaned = [clean_text(t) for t in texts]
        # split_special_tokens: text is BPE-encoded as is, as open_clip does; SD 2.x folders make
        # "!" their pad token, which would otherwise turn "!!" into two pad ids.
        # verbose=False: we truncate ourselves, so over-long prompts are expected here.
        encoded = tokenizer(cleaned, add_special_tokens=False, split_special_tokens=True, verbose=False)
        return encoded["input_ids"]

    return encode, tokenizer.bos_token_id, tokenizer.eos_token_id


def write_clip_tokenizer(out_dir: str, pad_token: str = EOT_TOKEN) -> None:
    """Write open_clip's bundled BPE vocabulary as a transformers CLIPTokenizer folder.

    Files: vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json. diffusers'
    SD 1.x folders pad with `<|endoftext|>`, SD 2.x folders with `!` (id 0).
    """
    bpe = _open_clip_bpe()
    # open_clip names the special tokens <start_of_text>/<end_of_text>; the ids are the same.
    renamed = {bpe.decoder[bpe.sot_token_id]: SOT_TOKEN, bpe.decoder[bpe.eot_token_id]: EOT_TOKEN}
    vocab = {renamed.get(token, token): idx for token, idx in bpe.encoder.items()}
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the CLIP vocabulary")
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.__getitem__)
    special = {"bos_token": SOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN, "pad_token": pad_token}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    os.makedirs(out_dir, exist_ok=True)
    _write_json(os.path.join(out_dir, "vocab.json"), vocab)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), special)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)


class _TextModelHolder(nn.Module):
    """Holds a transformers 5 CLIPTextModel under `text_model`, the level transformers 4 had and
    SD 1.x files keep (`transformer.text_model.*`)."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model


class CLIPTextEmbedder(nn.Module):
    """SD 1.x text encoder: CLIP text model (default ViT-L/14), output its last hidden state.

    `config` holds transformers CLIPTextConfig kwargs overriding `CLIP_VIT_L_TEXT_CONFIG`.
    """

    POSITION_IDS = "transformer.text_model.embeddings.position_ids"

    def __init__(self, config: dict | None = None, tokenizer_dir: str | None = None, max_length: int = 77):
        super().__init__()
        merged = {**CLIP_VIT_L_TEXT_CONFIG, **(config or {})}
        merged = {**clip_special_token_ids(merged["vocab_size"]), **merged}
        if max_length > merged["max_position_embeddings"]:
            raise ValueError(
                f"max_length {max_length} > max_position_embeddings {merged['max_position_embeddings']}"
            )
        from transformers import CLIPTextConfig, CLIPTextModel

        model = CLIPTextModel(CLIPTextConfig(**merged))
        # transformers 4's CLIPTextModel still has the `text_model` level itself.
        self.transformer = model if hasattr(model, "text_model") else _TextModelHolder(model)
        self.output_dim: int = merged["hidden_size"]
        self.tokenizer = ClipBPETokenizer(tokenizer_dir, max_length, pad_id=None)
        self.register_load_state_dict_pre_hook(_drop_position_ids)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        device = self.transformer.text_model.embeddings.token_embedding.weight.device
        return self.transformer.text_model(input_ids=tokens.to(device)).last_hidden_state

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.encode(self.tokenize(prompts))


def _drop_position_ids(module, state_dict, prefix, *args) -> None:
    # Older SD 1.x files store CLIP's position_ids (0..76) as a tensor; transformers now keeps it
    # as a non-persistent buffer. Some fine-tunes even hold corrupted (float) values, so the
    # stored copy is ignored and the buffer stays arange(77).
    state_dict.pop(prefix + CLIPTextEmbedder.POSITION_IDS, None)


class _OpenCLIPTextTower(nn.Module):
    """open_clip's CLIP model without the visual tower, laid out as SD 2.x files hold it:
    token_embedding, positional_embedding, transformer.resblocks.*, ln_final, and, with
    `projection_dim`, the unused-by-SD text_projection and logit_scale."""

    def __init__(
        self,
        width: int,
        heads: int,
        layers: int,
        vocab_size: int,
        context_length: int,
        projection_dim: int | None,
    ):
        super().__init__()
        from open_clip.transformer import TextTransformer  # the whole of open_clip: SD 2.x models only

        text = TextTransformer(
            context_length=context_length,
            vocab_size=vocab_size,
            width=width,
            heads=heads,
            layers=layers,
            output_dim=projection_dim,
            act_layer=nn.GELU,
        )
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.transformer = text.transformer
        self.ln_final = text.ln_final
        if projection_dim:
            self.text_projection = text.text_projection
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("attn_mask", text.attn_mask, persistent=False)


class OpenCLIPTextEmbedder(nn.Module):
    """SD 2.x text encoder: OpenCLIP text transformer (default ViT-H/14).

    `layer="penultimate"` (SD 2.x) skips the last block, then applies `ln_final`. diffusers'
    SD 2.x text_encoder already lacks that block, so weights converted from diffusers build this
    with `layers=23, layer="last", projection=False` and give the same output.
    `projection`: hold `text_projection` and `logit_scale` (in SD 2.x files, never used by SD):
    True for a width×width projection (ViT-H/14), an int for another output size, False for none.
    """

    def __init__(
        self,
        width: int = 1024,
        heads: int = 16,
        layers: int = 24,
        vocab_size: int = 49408,
        context_length: int = 77,
        layer: str = "penultimate",
        tokenizer_dir: str | None = None,
        projection: bool | int = True,
    ):
        super().__init__()
        if layer not in OPENCLIP_LAYERS:
            raise ValueError(f"layer must be one of {OPENCLIP_LAYERS}, got {layer!r}")
        if layer == "penultimate" and layers < 2:
            raise ValueError("layer='penultimate' needs at least 2 layers")
        # bool before int: True is an int too.
        projection_dim = (width if projection else None) if isinstance(projection, bool) else projection
        self.model = _OpenCLIPTextTower(width, heads, layers, vocab_size, context_length, projection_dim)
        self.layer = layer
        self.num_blocks_used = layers - 1 if layer == "penultimate" else layers
        self.output_dim: int = width
        self.tokenizer = ClipBPETokenizer(tokenizer_dir, context_length, pad_id=0)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        model = self.model
        tokens = tokens.to(model.token_embedding.weight.device)
        length = tokens.shape[1]
        x = model.token_embedding(tokens) + model.positional_embedding[:length]
        mask = model.attn_mask[:length, :length].to(x.dtype)
        # Older open_clip builds its blocks sequence-first.
        batch_first = getattr(model.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for block in model.transformer.resblocks[: self.num_blocks_used]:
            x = block(x, attn_mask=mask)
        if not batch_first:
            x = x.transpose(0, 1)
        return model.ln_final(x)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.encode(self.tokenize(prompts))
