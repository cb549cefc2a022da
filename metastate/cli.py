"""The `metastate` command: init, inspect, logits, convert, grow, generate, chat, train, bench,
serve, eval, lm-eval.

Every failure a user can cause ends as one line `error: <message>` on stderr and a non-zero
exit code (2 when the command line does not parse and when a backend's extra is not installed,
130 on Ctrl-C, 1 otherwise: a bad value, a missing file, a model that does not fit).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from metastate import __version__
from metastate.api import BACKENDS, DTYPES, KERNELS, BackendUnavailable, compute_logits
from metastate_core.constants import WEIGHT_DTYPES
from metastate_core.errors import ExtraUnavailable, MetaStateError, install_hint, require_extra

PTH_SUFFIXES = (".pth", ".pt")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # e.g. fla-hub/rwkv7-0.1B-world


class CLIError(MetaStateError):
    """Bad arguments that argparse alone cannot see."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: <message>` instead of usage + traceback-like noise."""

    def error(self, message):
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


# -- helpers --------------------------------------------------------------------------------
@contextmanager
def _progress(desc: str, steps: int):
    """A coarse progress bar (load / transform / save) on a terminal; silent otherwise."""
    from tqdm import tqdm

    with tqdm(total=steps, desc=desc, unit="step", disable=None, file=sys.stderr, leave=False) as bar:
        yield bar


def _check_out(path: Path, force: bool) -> None:
    if path.exists() and not force and (not path.is_dir() or any(path.iterdir())):
        raise CLIError(f"{path} already exists (pass --force to replace it)")


def _parse_tokens(text: str) -> list[int]:
    parts = [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]
    try:
        tokens = [int(p) for p in parts]
    except ValueError:
        raise CLIError(f"--tokens expects comma-separated integers, got {text!r}") from None
    if not tokens:
        raise CLIError("--tokens is empty")
    return tokens


def _tokenizer_spec(file: Path) -> tuple[dict, str]:
    """config.json tokenizer entry and the name the file takes inside the model directory."""
    if file.suffix == ".model":
        return {"type": "sentencepiece", "file": "tokenizer.model"}, "tokenizer.model"
    if file.suffix == ".txt":
        return {"type": "rwkv_world", "file": file.name}, file.name
    raise CLIError(f"unknown tokenizer file {file}: expected a sentencepiece .model or an RWKV World vocab .txt")


def _disk_dtype(tensors: dict) -> str | None:
    """The one dtype all tensors share on disk, or None when they are mixed."""
    names = {np.dtype(t.dtype).name for t in tensors.values()}
    return names.pop() if len(names) == 1 else None


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.0f}{suffix}{unit}" if suffix == "" else f"{n:.2f}{suffix}{unit}"
        n /= 1000


# -- sub-commands ---------------------------------------------------------------------------
def cmd_init(args) -> int:
    from metastate_core.config import ModelConfig
    from metastate_core.params import init_params
    from weights import save_model

    out = Path(args.out)
    _check_out(out, args.force)
    product = ("n_sub_keys", "param_heads", "param_topk")
    given = [k for k in product if getattr(args, k) is not None]
    if (args.param_mode == "product") != bool(given) or 0 < len(given) < 3:
        raise CLIError("--param-mode product goes with all of --n-sub-keys, --param-heads and --param-topk")
    sizes = {k: getattr(args, k) for k in ("d_model", "n_layer", "head_size", "d_att", "n_param_tokens", "sse_heads",
                                           "param_mode", *product)}
    cfg = ModelConfig(vocab_size=args.vocab_size, **{k: v for k, v in sizes.items() if v is not None})
    _check_memory(cfg, 8, "initialising this model")  # float32, and a copy in --dtype
    tensors = init_params(cfg, args.seed, np.float32)
    save_model(out, cfg, tensors, dtype=args.dtype)
    n = sum(t.size for t in tensors.values())
    print(f"initialised a {cfg.n_layer}-layer model ({_human(n)} parameters, {args.dtype}) in {out}")
    return 0


def _param_group(name: str) -> str:
    if name == "emb.weight":
        return "embedding"
    if name == "head.weight":
        return "head"
    if ".att." in name:
        return "time_mix"
    if name.endswith(("meta.param_keys", "meta.sub_keys", "meta.param_values")):
        return "param_tokens"
    if name.endswith("meta.sse_gate"):
        return "sse_gate"
    return "norms_and_token_shift"  # ln0/ln1/ln2/ln_out and meta.x_k


def model_summary(path: Path) -> dict:
    """Everything `inspect` shows, JSON-serialisable."""
    from weights.quantized import load_dequantized, quantization_summary

    cfg, tensors = load_dequantized(path)  # an MLX-quantized model: its matrices in float32
    quantized = quantization_summary(path)  # None for an ordinary model (file headers only)
    groups: dict[str, int] = {}
    dtypes: dict[str, int] = {}
    for name, t in tensors.items():
        group = _param_group(name)
        groups[group] = groups.get(group, 0) + int(t.size)
        dtype = np.dtype(t.dtype).name
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
    per_layer = cfg.state_bytes_per_layer(batch=1)
    values = [tensors[f"blocks.{i}.meta.param_values"].nbytes for i in range(cfg.n_layer)]
    info = {
        "path": str(path),
        "config": cfg.to_dict(),
        "n_head": cfg.n_head,
        "parameters": {"total": sum(groups.values()), "groups": groups},
        "state_bytes": {"per_layer": per_layer, "total": per_layer * cfg.n_layer,
                        "floats_per_layer": 2 * cfg.d_model + cfg.n_head * cfg.head_size**2},
        # per layer: tokens held, tokens each input token reads (P k in product mode), value table bytes
        "param_tokens": {"mode": cfg.param_mode, "per_layer": cfg.n_param_tokens,
                         "active_per_token": cfg.param_heads * cfg.param_topk if cfg.product else cfg.n_param_tokens,
                         "value_bytes": {"per_layer": values[0], "total": sum(values)}},
        "dtypes": dtypes,
        "growth": cfg.growth,
        "tokenizer": cfg.tokenizer,
    }
    if quantized:  # what is on disk: packed matrices, and the value tables' packed bytes
        info["dtypes"], info["param_tokens"]["value_bytes"] = quantized["dtypes"], quantized["value_bytes"]
        info["quantization"] = quantized
    return info


def cmd_inspect(args) -> int:
    from weights.quantized import quantization_lines

    info = model_summary(Path(args.model))
    if args.json:
        print(json.dumps(info, indent=2, allow_nan=False))
        return 0
    c, p, s, t = info["config"], info["parameters"], info["state_bytes"], info["param_tokens"]
    print(f"model      {info['path']}")
    print(f"shape      vocab {c['vocab_size']}, d_model {c['d_model']}, {c['n_layer']} layers, "
          f"{info['n_head']} heads x {c['head_size']} (d_att {c['d_att']})")
    print(f"lora       w {c['lora_w']}, a {c['lora_a']}, v {c['lora_v']}, g {c['lora_g']}")
    how = (f"product keys {c['n_sub_keys']}^2, {c['param_heads']} heads x top-{c['param_topk']}"
           if c["param_mode"] == "product" else "dense")
    print(f"meta       {c['n_param_tokens']:,} parameter tokens per layer ({how}), {t['active_per_token']:,} active "
          f"per token, SSE reads {c['sse_heads']} heads")
    print(f"values     {t['value_bytes']['per_layer']:,} bytes per layer, {t['value_bytes']['total']:,} in total "
          f"({_human(t['value_bytes']['total'], 'B')})")
    print(f"parameters {p['total']:,} ({_human(p['total'])})")
    for group, n in p["groups"].items():
        print(f"  {group:<22} {n:>14,}")
    print(f"state      {s['per_layer']:,} bytes per layer ({s['floats_per_layer']:,} float32), "
          f"{s['total']:,} in total ({_human(s['total'], 'B')}), batch 1")
    print("dtypes     " + ", ".join(f"{k} ({v} tensors)" for k, v in info["dtypes"].items()))
    for line in quantization_lines(info.get("quantization")):
        print(line)
    tok = info["tokenizer"]
    print(f"tokenizer  {json.dumps(tok) if tok else 'none (token ids only)'}")
    print(f"growth     {'none' if not info['growth'] else ''}")
    for step in info["growth"]:
        print(f"  {json.dumps(step)}")
    return 0


def cmd_logits(args) -> int:
    model = Path(args.model)
    if args.tokens is not None:
        tokens = _parse_tokens(args.tokens)
    else:
        from metastate_core.tokenizers import load_tokenizer
        from weights import load_config

        tokenizer = load_tokenizer(model, load_config(model).tokenizer)
        if tokenizer is None:
            raise CLIError(f"{model} has no tokenizer: pass token ids with --tokens")
        tokens = tokenizer.encode(args.text)
        if not tokens:
            raise CLIError("--text encodes to no tokens")
    logits = compute_logits(model, tokens, args.backend, args.kernels, args.dtype)
    from weights import atomic_write

    out = Path(args.out)

    def write(tmp):  # through a file object: np.save would add .npy to a name without it;
        with open(tmp, "wb") as f:  # and not a real file one, which np.save would seek in (a FIFO cannot)
            np.save(SimpleNamespace(write=f.write), logits.astype(np.float32))

    try:
        atomic_write(out, write)
    except OSError as e:
        raise CLIError(f"cannot write {out}: {e.strerror or e}") from None
    print(f"wrote logits {list(logits.shape)} float32 ({args.backend}) to {out}")
    return 0


def _load_source(src: Path, tokenizer_file: str | None, dtype: str | None):
    """(cfg, tensors, tokenizer files to copy {name: bytes}) of a .pth or a model directory,
    tensors in `dtype` (None: as stored)."""
    from weights import convert_dtype, import_hf, import_official_pth, is_hf_dir
    from weights.quantized import load_dequantized

    extra: dict[str, bytes] = {}
    if src.is_dir() or src.suffix == ".safetensors":  # a model directory or one self-describing file
        if is_hf_dir(src):  # Hugging Face / fla RWKV-7 (safetensors only)
            cfg, tensors = import_hf(src)
            if dtype is not None:
                tensors = convert_dtype(tensors, dtype)
        else:
            cfg, tensors = load_dequantized(src, dtype=dtype)  # an MLX-quantized model: dequantized
        tok = cfg.tokenizer
        if tokenizer_file is None and tok and tok.get("file"):
            root = src if src.is_dir() else src.parent
            path = root / tok["file"]
            if os.path.lexists(path):
                extra[tok["file"]] = _tokenizer_bytes(tok, path, cfg.vocab_size, inside=root)
            elif src.is_dir():
                raise CLIError(f"tokenizer file {path} named in {src / 'config.json'} is missing")
            else:  # a lone file: the output would name a tokenizer it does not hold
                print(f"note: {src.name} names tokenizer {tok['file']}, which is not beside it: the output has no "
                      "tokenizer (give --tokenizer FILE to add one)", file=sys.stderr)
                cfg = cfg.replace(tokenizer=None)
    elif src.suffix in PTH_SUFFIXES:
        if src.exists():
            require_extra("torch", "torch", "reading an official .pth checkpoint")
        cfg, tensors = import_official_pth(src)
        if dtype is not None:
            tensors = convert_dtype(tensors, dtype)
        beside = src.parent / "rwkv_vocab_v20230424.txt"
        if tokenizer_file is None and beside.is_file():
            tokenizer_file = str(beside)
    elif not src.exists() and HUB_ID.fullmatch(str(src)):
        raise CLIError(f"{src} is not a local path, and metastate never downloads: fetch it first with "
                       f"`hf download {src} --local-dir DIR` (`huggingface-cli download` with an older "
                       "huggingface_hub), then run `metastate convert DIR --out DST`")
    elif not src.exists():
        raise FileNotFoundError(2, "No such file or directory", str(src))
    else:
        raise CLIError(f"{src} is neither an official RWKV-7 .pth checkpoint nor a model directory")
    if tokenizer_file is not None:
        file = Path(tokenizer_file)
        spec, name = _tokenizer_spec(file)
        extra = {name: _tokenizer_bytes(spec, file, cfg.vocab_size)}
        cfg = cfg.replace(tokenizer=spec)
    return cfg, tensors, extra


def _tokenizer_bytes(spec: dict, file: Path, vocab_size: int, inside: Path | None = None) -> bytes:
    """The bytes of a tokenizer file to copy into a model: a regular file (within `inside`,
    symlinks resolved, when given) that parses as `spec` says and has no id past vocab_size."""
    from metastate_core.tokenizers import tokenizer_type
    from weights.files import open_regular

    real = os.path.realpath(file)
    if inside is not None and not Path(real).is_relative_to(os.path.realpath(inside)):
        raise CLIError(f"tokenizer file {file} leads outside {inside} (to {real}): not copied")
    with open_regular(file, "tokenizer file") as f:
        data = f.read()
    tokenizer = tokenizer_type(spec)[0](file, data)
    if tokenizer.max_id >= vocab_size:
        raise CLIError(f"tokenizer {file} has token ids up to {tokenizer.max_id}, but the model's vocab_size is "
                       f"{vocab_size}")
    return data


def cmd_convert(args) -> int:
    from weights import export_hf, export_official_pth, hf_caveats, is_hf_dir, official_runtime_caveats, save_model

    src = Path(args.src)
    out = Path(args.to_pth or args.to_hf or args.out)
    to_pth = args.to_pth is not None or (args.to_hf is None and out.suffix in PTH_SUFFIXES)
    to_hf = args.to_hf is not None
    if out.resolve() == src.resolve():
        raise CLIError("--out must differ from the source")
    _check_out(out, args.force)
    if args.quantize:
        return _convert_quantized(src, out, args)
    notes = []
    with _progress("convert", 2) as bar:
        cfg, tensors, extra = _load_source(src, args.tokenizer, args.dtype)
        bar.update()
        if to_pth:
            _require_torch_for_pth(cfg, tensors)
            export_official_pth(cfg, tensors, out)
        elif to_hf:
            extra, notes = _hf_tokenizer_files(cfg, extra)
            export_hf(cfg, tensors, out, extra)
        else:
            save_model(out, cfg, tensors, extra_files=extra or None)
        bar.update()
    kind = "official .pth" if to_pth else "Hugging Face / fla directory" if to_hf else "model directory"
    what = f"{kind}, {_disk_dtype(tensors) or 'mixed dtypes'}"
    print(f"converted {src} -> {out} [{what}]")
    if to_pth and cfg.tokenizer:
        print("note: the .pth format holds no tokenizer; keep the vocab file beside it")
    if to_pth or src.suffix in PTH_SUFFIXES:
        notes += official_runtime_caveats(cfg)
    if to_hf or is_hf_dir(src):
        notes += hf_caveats(cfg)
    for note in notes:
        print(f"note: {note}")
    return 0


def _require_torch_for_pth(cfg, tensors) -> None:
    """torch, which writes .pth files; without it, the format's own refusals (SSE, product keys)
    still come first: installing torch would not help those models."""
    try:
        require_extra("torch", "torch", "writing an official .pth checkpoint")
    except ExtraUnavailable:
        from weights.official import to_official

        to_official(cfg, tensors)
        raise


def _hf_tokenizer_files(cfg, extra: dict[str, bytes]) -> tuple[dict[str, bytes], list[str]]:
    """The tokenizer files of a Hugging Face export (those AutoTokenizer reads), and notes."""
    from weights.hf import tokenizer_files

    tok = cfg.tokenizer
    if not tok or tok.get("file") not in extra:
        return {}, ["the model has no tokenizer: mlx_lm.load and AutoTokenizer need one (give --tokenizer FILE)"]
    return tokenizer_files(tok, extra[tok["file"]])


def _convert_quantized(src: Path, out: Path, args) -> int:
    """MLX quantization (mx.quantize of the large matrices), recorded in config.json as mlx-lm does."""
    if out.suffix in PTH_SUFFIXES or args.to_pth or args.to_hf or args.tokenizer:
        raise CLIError("--quantize writes an MLX model directory: use it with --out DIR, without "
                       "--to-pth/--to-hf/--tokenizer")
    if not src.is_dir():
        raise CLIError("--quantize needs a model directory as the source (convert a .pth first)")
    try:
        from backends.mlx import convert as mlx_convert
    except ImportError as e:
        raise BackendUnavailable(f"--quantize needs the mlx backend ({e}): {install_hint('mlx')}") from None
    mlx_convert(src, out, bits=args.quantize, group_size=args.group_size, dtype=args.dtype)
    print(f"converted {src} -> {out} [MLX, {args.quantize}-bit, group size {args.group_size}]")
    return 0


def cmd_merge(args) -> int:
    """A LoRA adapter folded into a copy of its base: a new ordinary model directory."""
    from metastate.train.tune import merged_weights
    from weights import save_model

    require_extra("torch", "torch", "metastate merge")
    base, out = Path(args.base), Path(args.out)
    if not base.is_dir():
        raise CLIError(f"base model {base} is not a model directory")
    if out.resolve() == base.resolve():
        raise CLIError("--out must differ from the base model")
    _check_out(out, args.force)
    cfg, weights, extra = _load_source(base, None, None)
    merged = merged_weights(base, weights, args.adapter)
    save_model(out, cfg, merged, dtype=args.dtype or _disk_dtype(weights) or "float32", extra_files=extra or None)
    print(f"merged {args.adapter} into {base} -> {out}")
    return 0


def cmd_grow(args) -> int:
    from metastate_core.growth import grow
    from weights import save_model

    steps = {"param_tokens": args.param_tokens, "heads": args.heads, "layers": args.layers,
             "sse_heads": args.sse_heads, "sub_keys": args.sub_keys}
    if all(v is None for v in steps.values()):
        raise CLIError("nothing to grow: give at least one of --param-tokens, --sub-keys, --heads, --layers, "
                       "--sse-heads")
    src, out = Path(args.src), Path(args.out)
    if out.resolve() == src.resolve():
        raise CLIError("--out must differ from the source")
    _check_out(out, args.force)
    with _progress("grow", 3) as bar:
        cfg, tensors, extra = _load_source(src, None, None)
        dtype = _disk_dtype(tensors)
        _check_grow_memory(cfg, tensors, steps)
        bar.update()
        old = cfg, tensors
        cfg, tensors = grow(cfg, tensors, **steps, layer_position=args.layer_position, rng=args.seed)
        record = next((r for r in cfg.growth[len(old[0].growth):] if r["rule"] == "sub_keys"), None)
        if record:  # a warm start, not exact (SPEC section 5): measure and record the change
            record.update(logits_rel_rms=_logits_change(*old, cfg, tensors), sample=SUB_KEYS_SAMPLE)
        bar.update()
        save_model(out, cfg, tensors, dtype=dtype, extra_files=extra or None)
        bar.update()
    print(f"grew {src} -> {out}: d_att {cfg.d_att} ({cfg.n_head} heads), {cfg.n_layer} layers, "
          f"{cfg.n_param_tokens:,} parameter tokens, SSE {cfg.sse_heads} heads")
    if record:
        print(f"note: --sub-keys {record['from']} -> {record['to']} is a warm start, not exact: the logits changed by "
              f"rel_rms {record['logits_rel_rms']:.3g} on {SUB_KEYS_SAMPLE}")
    return 0


def _check_memory(cfg, bytes_per_param: int, what: str, held: int = 0) -> None:
    """Refuse in one line, before it is built, a model this machine cannot hold (beside `held` bytes)."""
    from weights.files import check_memory
    from weights.format import n_params

    check_memory(held + n_params(cfg) * bytes_per_param, what)


def _check_grow_memory(cfg, tensors: dict, steps: dict) -> None:
    sizes = {"n_param_tokens": steps["param_tokens"], "n_layer": steps["layers"], "sse_heads": steps["sse_heads"],
             "d_att": None if steps["heads"] is None else steps["heads"] * cfg.head_size}
    if steps["sub_keys"] is not None:
        sizes.update(n_sub_keys=steps["sub_keys"], n_param_tokens=steps["sub_keys"] ** 2)
    try:
        target = cfg.replace(**{k: v for k, v in sizes.items() if v is not None})
    except (MetaStateError, TypeError, ValueError):
        return  # grow() says what is wrong with the request
    _check_memory(target, max(t.dtype.itemsize for t in tensors.values()),
                  f"growing to {target.n_layer:,} layers, {target.n_head:,} heads and {target.n_param_tokens:,} "
                  "parameter tokens", held=sum(t.nbytes for t in tensors.values()))


SUB_KEYS_SAMPLE = "4 x 64 token ids drawn uniformly with seed 0 (float32 NumPy reference, from the zero state)"


def _logits_change(cfg, tensors, new_cfg, new_tensors) -> float:
    from metastate_core.reference import forward, rel_rms

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 64))
    before = forward(tensors, cfg, tokens, dtype=np.float32, wkv="chunked")[0]
    return float(rel_rms(forward(new_tensors, new_cfg, tokens, dtype=np.float32, wkv="chunked")[0], before))


# -- parser ---------------------------------------------------------------------------------
def seed_arg(text: str) -> int:
    """argparse type of a random seed: what numpy's and torch's generators both take."""
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2^32), got {text!r}")
    return seed


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="metastate", description="Meta-State: RWKV-7 with a Self-State Encoder.")
    parser.add_argument("--version", action="version", version=f"metastate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="write a freshly initialised model")
    p.add_argument("--out", required=True, help="model directory to create")
    p.add_argument("--vocab-size", type=int, required=True)
    for flag in ("--d-model", "--n-layer", "--head-size", "--d-att", "--n-param-tokens", "--sse-heads"):
        p.add_argument(flag, type=int, help="default: SPEC section 1")
    p.add_argument("--param-mode", choices=("dense", "product"), default="dense",
                   help="product: product-key parameter tokens (SPEC section 7)")
    p.add_argument("--n-sub-keys", type=int, metavar="M", help="product: M^2 parameter tokens per layer")
    p.add_argument("--param-heads", type=int, metavar="P", help="product: heads, each reading its own top-k")
    p.add_argument("--param-topk", type=int, metavar="K", help="product: tokens each head reads")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default="float32")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("inspect", help="show config, sizes, dtypes, growth history")
    p.add_argument("model", help="model directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("logits", help="compute logits [T, V] of a sequence, saved with np.save")
    p.add_argument("--model", required=True, help="model directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", help="token ids, e.g. 1,2,3")
    src.add_argument("--text", help="text, encoded with the model's tokenizer")
    p.add_argument("--backend", choices=BACKENDS, default="numpy")
    p.add_argument("--kernels", choices=KERNELS, default="auto")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype (numpy: float64 by default; bfloat16 rounds the weights)")
    p.add_argument("--out", required=True, help="output .npy file (float32 [T, V])")
    p.set_defaults(func=cmd_logits)

    p = sub.add_parser("convert", help="import an official .pth or a Hugging Face / fla directory, re-save a "
                       "model, or export to .pth or Hugging Face")
    p.add_argument("src", help="official RWKV-7 .pth checkpoint, Hugging Face / fla RWKV-7 directory, model "
                   "directory or .safetensors file")
    p.add_argument("--out", help="model directory, or a .pth file to export to")
    p.add_argument("--to-pth", metavar="OUT.pth", help="export to the official .pth format")
    p.add_argument("--to-hf", metavar="OUT", help="export to a Hugging Face / fla directory (RWKV7ForCausalLM; "
                   "mlx_lm.load reads it too)")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, help="dtype on disk (default: keep)")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="tokenizer to bundle: RWKV World vocab .txt or sentencepiece .model")
    p.add_argument("--quantize", type=int, choices=(4, 8), help="MLX: quantize the large matrices to 4 or 8 bits")
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128), help="quantization group size")
    p.add_argument("--force", action="store_true", help="replace the output if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("grow", help="grow a model without changing its logits (SPEC section 5)")
    p.add_argument("src", help="model directory (or anything convert reads)")
    p.add_argument("--out", required=True, help="model directory to create")
    p.add_argument("--param-tokens", type=int, help="new number of parameter tokens per layer (dense models)")
    p.add_argument("--sub-keys", type=int, metavar="M", help="product models: new n_sub_keys (a warm start, not "
                   "exact: prints the measured change of the logits)")
    p.add_argument("--heads", type=int, help="new number of WKV heads")
    p.add_argument("--layers", type=int, help="new number of layers")
    p.add_argument("--sse-heads", type=int, help="new number of heads the SSE reads")
    p.add_argument("--layer-position", choices=("end", "after0"), default="end")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_grow)

    p = sub.add_parser("merge", help="fold a LoRA adapter (train --tune lora) into its base model")
    p.add_argument("base", help="the base model directory the adapter was trained on")
    p.add_argument("adapter", help="the adapter: a --tune lora checkpoint directory, or its adapter.safetensors")
    p.add_argument("--out", required=True, help="model directory to create")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, help="weight dtype of the merged model (default: the base's)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_merge)

    from metastate.chat import add_parsers as add_chat_parsers  # generate, chat

    add_chat_parsers(sub)
    from metastate.train_cmd import add_parsers as add_train_parsers  # prepare-data, train

    add_train_parsers(sub)
    from metastate.bench import add_parsers as add_bench_parsers

    add_bench_parsers(sub)
    from metastate.serve import add_parsers as add_serve_parsers  # serve (starlette loads only when it runs)

    add_serve_parsers(sub)
    from metastate.evaluate import add_parsers as add_eval_parsers  # eval, lm-eval

    add_eval_parsers(sub)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    if sys.stdout is None:  # started with it closed (`>&-`): every command reports there
        print("error: standard output is closed", file=sys.stderr)
        return 1
    if hasattr(sys.stdout, "reconfigure"):  # a path that is not UTF-8 is printed as the bytes it is
        sys.stdout.reconfigure(errors="surrogateescape")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: already printed
        return e.code if isinstance(e.code, int) else 0
    if args.command == "convert" and [args.out, args.to_pth, args.to_hf].count(None) != 2:
        print("error: convert needs exactly one of --out, --to-pth and --to-hf", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except MetaStateError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    except OSError as e:  # FileNotFoundError, PermissionError, IsADirectoryError, disk full, ...
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {_one_line(e.strerror or e)}{where}", file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of memory (is the model, or the growth target, far larger than meant?)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
