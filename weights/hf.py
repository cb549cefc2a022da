"""Hugging Face / fla RWKV-7 model directories <-> canonical tensors (docs/interop.md).

fla's `RWKV7ForCausalLM` (flash-linear-attention) and mlx-lm's `models/rwkv7.py` read the same
directory: config.json with model_type "rwkv7" and fla's field names, model.safetensors with
fla's tensor names. Only models that are exactly RWKV-7 leave this project that way (dense
parameter tokens, every sse_gate zero, d_att = d_model: fla sizes its heads from hidden_size).

The names map 1:1 (the same correspondence as official -> fla): ln0/ln1/ln2 are pre_norm /
attn_norm / ffn_norm, ln_x is g_norm, receptance/key/value/output are r/k/v/o_proj, the
Meta-State layer is RWKV-7's channel mix (`meta.x_k -> ffn.x_k`, `meta.param_keys ->
ffn.key.weight`, `meta.param_values^T -> ffn.value.weight`). LoRA factors, stored [in, out]
here, are nn.Linear weights [out, in] there, and w0, a0, v0 are the biases of the LoRAs'
second layers; the six token-shift mixes x_r ... x_g are [1, 1, d] parameters there.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from metastate_core.config import ModelConfig
from metastate_core.constants import LN_EPS, LN_X_EPS
from metastate_core.errors import MetaStateError
from metastate_core.params import param_shapes

from . import safetensors_io as st
from .files import WeightsError, parse_json, read_text
from .format import (CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE, _read_index, _read_weights, _write_bytes,
                     validate_tensors, write_directory)

MODEL_TYPE = "rwkv7"
ARCHITECTURE = "RWKV7ForCausalLM"
SOURCE_KEY = "metastate_config"  # our config, kept in the exported config.json for the way back

_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_TRANSPOSE, _ROW = "T", "row"  # how a canonical tensor becomes fla's: transposed, or [1, 1, C]
_BLOCK_NAMES = {
    "ln0.weight": "pre_norm.weight", "ln0.bias": "pre_norm.bias",
    "ln1.weight": "attn_norm.weight", "ln1.bias": "attn_norm.bias",
    "ln2.weight": "ffn_norm.weight", "ln2.bias": "ffn_norm.bias",
    **{f"att.x_{c}": (f"attn.x_{c}", _ROW) for c in "rwkvag"},
    **{f"att.{c}0": f"attn.{c}_lora.lora.2.bias" for c in "wav"},
    **{f"att.{c}1": (f"attn.{c}_lora.lora.0.weight", _TRANSPOSE) for c in "wavg"},
    **{f"att.{c}2": (f"attn.{c}_lora.lora.2.weight", _TRANSPOSE) for c in "wavg"},
    "att.k_k": "attn.k_k", "att.k_a": "attn.k_a", "att.r_k": "attn.r_k",
    "att.receptance.weight": "attn.r_proj.weight", "att.key.weight": "attn.k_proj.weight",
    "att.value.weight": "attn.v_proj.weight", "att.output.weight": "attn.o_proj.weight",
    "att.ln_x.weight": "attn.g_norm.weight", "att.ln_x.bias": "attn.g_norm.bias",
    "meta.x_k": "ffn.x_k", "meta.param_keys": "ffn.key.weight",
    "meta.param_values": ("ffn.value.weight", _TRANSPOSE),
}
_PER_HEAD = ("attn.k_k", "attn.k_a", "attn.g_norm.weight", "attn.g_norm.bias")  # [A] in fla, [H, N] in mlx-lm
_TOP_NAMES = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
              "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}


def hf_name(name: str) -> tuple[str, str | None] | None:
    """(fla's name, transform) of a canonical tensor; None for sse_gate, which fla lacks."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name], None
    m = _BLOCK.fullmatch(name)
    if m and m.group(2) == "meta.sse_gate":
        return None
    target = _BLOCK_NAMES[m.group(2)]
    hf, how = target if isinstance(target, tuple) else (target, None)
    return f"model.layers.{m.group(1)}.{hf}", how


def not_exact_rwkv7(cfg: ModelConfig, tensors: dict[str, np.ndarray] | None = None) -> str | None:
    """Why this model is not exactly an RWKV-7 model that fla and mlx-lm can run, or None."""
    if cfg.product:
        return "it has product-key parameter tokens (param_mode 'product'), which RWKV-7's channel mix cannot hold"
    if cfg.d_att != cfg.d_model:
        return (f"its heads have grown (d_att {cfg.d_att} != d_model {cfg.d_model}), and fla and mlx-lm size "
                "their heads from hidden_size")
    for i in range(cfg.n_layer):
        if tensors is not None and np.any(np.asarray(tensors[f"blocks.{i}.meta.sse_gate"], np.float32) != 0):
            return f"blocks.{i}.meta.sse_gate is non-zero and RWKV-7 has no Self-State Encoder"
    return None


def hf_caveats(cfg: ModelConfig) -> list[str]:
    """Where fla or mlx-lm compute this model's logits slightly differently from us."""
    notes = []
    if cfg.ln_x_eps != cfg.head_size * LN_EPS:
        notes.append(f"fla's GroupNorm epsilon is head_dim * norm_eps = {cfg.head_size * LN_EPS:g}, this model's "
                     f"ln_x_eps is {cfg.ln_x_eps:g}: fla's logits differ slightly")
    if cfg.ln_x_eps != LN_X_EPS:
        notes.append(f"mlx-lm's GroupNorm epsilon is {LN_X_EPS:g} at every head size (as the official runtime's), "
                     f"this model's ln_x_eps is {cfg.ln_x_eps:g}: mlx-lm's logits differ slightly")
    return notes


# -- ours -> fla ---------------------------------------------------------------------------

def to_hf(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, tensors with fla's names and shapes) of an exact RWKV-7 model."""
    validate_tensors(cfg, tensors)
    why = not_exact_rwkv7(cfg, tensors)
    if why:
        raise WeightsError(f"cannot export to the Hugging Face / fla RWKV-7 format: {why}")
    out = {}
    for name in param_shapes(cfg):
        target = hf_name(name)
        if target is None:
            continue
        hf, how = target
        t = tensors[name]
        out[hf] = np.ascontiguousarray(t.T) if how == _TRANSPOSE else t.reshape(1, 1, -1) if how == _ROW else t
    return hf_config(cfg, {t.dtype.name for t in tensors.values()}), out


def hf_config(cfg: ModelConfig, dtypes: set[str]) -> dict:
    """fla's RWKV7Config fields (which mlx-lm's ModelArgs reads too) for `cfg`."""
    d, n = cfg.d_model, cfg.n_param_tokens
    out = {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size, "hidden_size": d, "num_hidden_layers": cfg.n_layer,
        "head_dim": cfg.head_size, "num_heads": cfg.n_head,
        "hidden_ratio": n // d if n % d == 0 else n / d, "intermediate_size": n,
        "decay_low_rank_dim": cfg.lora_w, "a_low_rank_dim": cfg.lora_a,
        "v_low_rank_dim": cfg.lora_v, "gate_low_rank_dim": cfg.lora_g,
        "value_dim": [d] * cfg.n_layer, "hidden_act": "sqrelu", "attn": None, "attn_mode": "chunk",
        "norm_first": True, "norm_bias": True, "norm_eps": LN_EPS,
        "tie_word_embeddings": False, "use_cache": True,
    }
    if len(dtypes) == 1:
        out["dtype"] = dtypes.pop()
    out[SOURCE_KEY] = cfg.to_dict()
    return out


def export_hf(cfg: ModelConfig, tensors: dict[str, np.ndarray], path: str | os.PathLike,
              extra_files: dict[str, bytes] | None = None) -> None:
    """Write a Hugging Face / fla directory (atomically, as save_model does): config.json,
    model.safetensors and `extra_files` (tokenizer files, from `tokenizer_files`)."""
    config, hf = to_hf(cfg, tensors)
    text = json.dumps(config, indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    def fill(tmp: Path) -> None:
        # transformers reads a safetensors file only if its metadata says "format": "pt"
        st.write_file(tmp / WEIGHTS_FILE, hf, {"format": "pt"})
        _write_bytes(tmp / CONFIG_FILE, text.encode("utf-8"))
        for name, data in (extra_files or {}).items():
            _write_bytes(tmp / name, data)

    write_directory(path, fill)


# -- fla -> ours ---------------------------------------------------------------------------

def is_hf_dir(path: str | os.PathLike) -> bool:
    """A directory whose config.json has a Hugging Face `model_type` (and no metastate format)."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        return False
    try:
        data = parse_json(read_text(path / CONFIG_FILE, "model config"), str(path / CONFIG_FILE))
    except WeightsError:
        return False
    return isinstance(data, dict) and "model_type" in data and "format" not in data


def config_from_hf(hf: dict, where: str) -> ModelConfig:
    """The ModelConfig of fla's RWKV7Config fields; WeightsError for what is not plain RWKV-7."""
    if hf.get("model_type") != MODEL_TYPE:
        raise WeightsError(f"{where} has model_type {hf.get('model_type')!r}; only {MODEL_TYPE!r} (fla's "
                           f"{ARCHITECTURE}) can be imported")
    refusals = [("attn", None, "hybrid attention layers"), ("hidden_act", "sqrelu", "an FFN activation"),
                ("norm_first", True, "norm_first"), ("norm_bias", True, "norm_bias"),
                ("norm_eps", LN_EPS, "a LayerNorm epsilon")]
    for key, want, what in refusals:
        if hf.get(key, want) != want:
            raise WeightsError(f"{where} sets {key} = {hf[key]!r}: {what} that this project's RWKV-7 does not "
                               f"have (it needs {key} = {json.dumps(want)})")
    try:
        d, L = hf["hidden_size"], hf["num_hidden_layers"]
        head = hf.get("head_dim") or d // hf["num_heads"]
        n = hf.get("intermediate_size") or 32 * -(-int(d * (hf.get("hidden_ratio") or 4)) // 32)  # fla's rule
        value_dim = hf.get("value_dim") or d
        if any(v != d for v in (value_dim if isinstance(value_dim, list) else [value_dim])):
            raise WeightsError(f"{where} sets value_dim {value_dim!r}: values wider than hidden_size {d} are not "
                               "RWKV-7 as this project runs it")
        sizes = dict(vocab_size=hf["vocab_size"], d_model=d, n_layer=L, head_size=head, n_param_tokens=n,
                     lora_w=hf["decay_low_rank_dim"], lora_a=hf["a_low_rank_dim"], lora_v=hf["v_low_rank_dim"],
                     lora_g=hf["gate_low_rank_dim"])
    except KeyError as e:
        raise WeightsError(f"{where} lacks {e.args[0]!r}, which an fla RWKV-7 config has") from None
    except (TypeError, ZeroDivisionError) as e:
        raise WeightsError(f"{where} holds sizes of the wrong type: {e}") from None
    try:
        cfg = ModelConfig(**sizes, ln_x_eps=LN_X_EPS)
        saved = hf.get(SOURCE_KEY)
        if isinstance(saved, dict):  # exported here: take back what fla's config cannot hold
            back = ModelConfig.from_dict(saved)
            if all(getattr(back, k) == v for k, v in sizes.items()) and not back.product:
                cfg = back
    except MetaStateError as e:
        raise WeightsError(f"{where} does not describe a valid model: {e}") from e
    return cfg


def from_hf(cfg: ModelConfig, hf: dict[str, np.ndarray], tied: bool = False) -> dict[str, np.ndarray]:
    """fla-named tensors -> canonical tensors of `cfg` (sse_gate zero: exactly RWKV-7)."""
    hf = dict(hf)
    if tied and "lm_head.weight" not in hf and "model.embeddings.weight" in hf:
        hf["lm_head.weight"] = hf["model.embeddings.weight"]
    shapes = param_shapes(cfg)
    wanted = {hf_name(n)[0] for n in shapes if hf_name(n)}
    unknown = [n for n in hf if n not in wanted]
    if unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise WeightsError(f"unknown tensor {unknown[0]!r}{more} for an fla RWKV-7 model of this config")
    out = {}
    for name, shape in shapes.items():
        target = hf_name(name)
        if target is None:
            out[name] = np.zeros(shape, hf[hf_name(name.replace("sse_gate", "x_k"))[0]].dtype)
            continue
        src, how = target
        if src not in hf:
            raise WeightsError(f"tensor {src!r} is missing")
        t = hf[src]
        want = shape[::-1] if how == _TRANSPOSE else (1, 1, *shape) if how == _ROW else shape
        if src.endswith(_PER_HEAD) and tuple(t.shape) == (cfg.n_head, cfg.head_size):
            t = t.reshape(shape)  # as mlx-lm saves them (its sanitize makes them [H, N])
        if tuple(t.shape) != tuple(want):
            raise WeightsError(f"tensor {src!r} has shape {list(t.shape)}, expected {list(want)} for this config")
        out[name] = np.ascontiguousarray(t.T) if how == _TRANSPOSE else t.reshape(shape)
    validate_tensors(cfg, out)
    return out


def import_hf(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read a Hugging Face / fla RWKV-7 directory (safetensors only: a pickle is never opened).

    The config takes a tokenizer when the directory holds one this project reads
    (rwkv_vocab_v20230424.txt or a SentencePiece tokenizer.model).
    """
    path = Path(path)
    file = path / CONFIG_FILE
    hf_cfg = parse_json(read_text(file, "model config"), str(file))
    if not isinstance(hf_cfg, dict):
        raise WeightsError(f"{file} is not a JSON object")
    if hf_cfg.get("quantization") or hf_cfg.get("quantization_config"):
        raise WeightsError(f"{path} holds quantized weights: dequantize them first (e.g. `mlx_lm.convert --hf-path "
                           f"{path} --mlx-path DIR --dequantize`)")
    cfg = config_from_hf(hf_cfg, str(file))
    if not any(path.glob("model*.safetensors")):
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        if pickles:
            raise WeightsError(f"{path} holds {pickles[0]} (a pickle) and no safetensors: pickles are never opened "
                               "here; fetch the safetensors version, or convert it with a tool you trust")
        raise WeightsError(f"{path} has no weights: no model*.safetensors")
    tensors = from_hf(cfg, _read_hf_weights(path, cfg), tied=bool(hf_cfg.get("tie_word_embeddings")))
    named = (cfg.tokenizer or {}).get("file")  # the one our config names, if exported here and still there
    if not (named and os.path.lexists(path / named)):
        cfg = cfg.replace(tokenizer=_tokenizer_beside(path))
    return cfg, tensors


def _read_hf_weights(path: Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    single, index = path / WEIGHTS_FILE, path / INDEX_FILE
    if single.is_file() and index.is_file() and set(_read_index(path, index)[0].values()) <= {WEIGHTS_FILE}:
        return st.read_file(single)[0]  # mlx-lm writes an index beside its one weight file
    return _read_weights(path, cfg, validate=False)


def _tokenizer_beside(path: Path) -> dict | None:
    from metastate_core.tokenizers import WORLD_VOCAB_FILE

    if (path / WORLD_VOCAB_FILE).is_file():
        return {"type": "rwkv_world", "file": WORLD_VOCAB_FILE}
    if (path / "tokenizer.model").is_file():
        return {"type": "sentencepiece", "file": "tokenizer.model"}
    return None


# -- tokenizers ------------------------------------------------------------------------------

WORLD_EOS = "<|endoftext|>"  # the name id 0 (end of text, no bytes) takes in tokenizer.json


def tokenizer_files(spec: dict, data: bytes) -> tuple[dict[str, bytes], list[str]]:
    """Files that let transformers' AutoTokenizer (and so mlx_lm.load) read our tokenizer,
    and notes on what differs. SentencePiece: tokenizer.model read as a LlamaTokenizer.
    RWKV World: its vocab file, and a tokenizer.json whose WordPiece model, with no word
    splitting and no continuation prefix, is the same greedy longest match over bytes."""
    if spec["type"] == "sentencepiece":
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                  "legacy": False}
        return ({"tokenizer.model": data, "tokenizer_config.json": _json_bytes(config)},
                ["transformers' LlamaTokenizer reads tokenizer.model; a text that begins with a space may "
                 "encode differently there"])
    from metastate_core.tokenizers import WORLD_VOCAB_FILE, WorldTokenizer

    files = {WORLD_VOCAB_FILE: data}
    try:
        files["tokenizer.json"] = world_tokenizer_json(WorldTokenizer(WORLD_VOCAB_FILE, data)).encode("utf-8")
    except ImportError:  # `tokenizers` comes with transformers, which every reader of this directory has
        return files, ["no tokenizer.json written (pip install tokenizers): AutoTokenizer cannot read the "
                       f"{WORLD_VOCAB_FILE} alone"]
    files["tokenizer_config.json"] = _json_bytes({"tokenizer_class": "PreTrainedTokenizerFast",
                                                  "eos_token": WORLD_EOS, "bos_token": WORLD_EOS,
                                                  "unk_token": WORLD_EOS, "clean_up_tokenization_spaces": False})
    return files, []


_WHITESPACE = b"\t\n\r\x0b\x0c "


def world_tokenizer_json(world) -> str:
    """The RWKV World vocabulary as a `tokenizers` tokenizer.json (see tokenizer_files).

    WordPiece matches a word in time quadratic in its length, so the text is cut into words
    where no token can span the cut, which keeps the match exact: before a space that follows
    a byte other than whitespace, when no token holds such a pair (none of the World
    vocabulary's 65529 does). A long run without such a space (text without spaces) stays slow.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    char = _byte_chars()
    vocab = {WORLD_EOS: 0}
    vocab.update({"".join(char[b] for b in tok): i for i, tok in enumerate(world._bytes) if tok})
    tok = Tokenizer(models.WordPiece(vocab, unk_token=WORLD_EOS, continuing_subword_prefix="",
                                     max_input_chars_per_word=2**31 - 1))
    as_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    spans_a_cut = any(t[i] == 0x20 and t[i - 1] not in _WHITESPACE for t in world._bytes for i in range(1, len(t)))
    if spans_a_cut:
        tok.pre_tokenizer = as_bytes
    else:
        cut = pre_tokenizers.Split(Regex(r"(?<=[^\t\n\r\x0b\x0c ]) "), behavior="merged_with_next")
        tok.pre_tokenizer = pre_tokenizers.Sequence([cut, as_bytes])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(WORLD_EOS, special=True)])
    return tok.to_str()


def _byte_chars() -> list[str]:
    """Byte -> the printable character byte-level tokenizers write it as (GPT-2's table):
    printable Latin-1 bytes stand for themselves, the rest take code points from 256 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
