"""A seeded corpus of hostile inputs for `metastate` (issue 22), each case with its verdict.

`make_base(root)` writes what every case starts from: a small model with a tokenizer, the same
model sharded in bfloat16, a state file of it, its logits, and (with torch) its official .pth.
`corpus(root, base, seed)` builds the cases, one folder each, across the categories:

    header    forged safetensors headers: dtypes, shapes, offsets, lengths, metadata, huge
              declared tensors in sparse files, other names
    flip      flipped bytes in a weight file (a flip may be harmless: then the logits must be exact)
    truncate  weight files, config.json, shard index, state files cut short
    json      config.json, the shard index, a header nested deeply, NaN / Infinity, not UTF-8
    special   FIFOs, directories, devices, dangling or escaping symlinks where files are read,
              and as output targets
    pth       .pth files: garbage, pickles of code, views and sparse tensors, wrong contents
    state     /load of state files: NaN, wrong shapes, another model's, forged, special
    ckpt      `train --resume` of damaged training checkpoints (issue 22 items 4 and 5): every
              value of trainer_state.json of the wrong type or range, RNG arrays of the wrong
              size or dtype, no optimizer moments, forged .npy sizes, cut and special files
    data      `prepare-data` of hostile inputs and over what is not a data directory
    args      arguments: penalties, growth and init sizes, closed stdin and stdout

A case is refused (exit 1 or 2, one `error:` line), or for a chat command one `error:` line
and the chat going on (exit 0), or accepted with a check of its output. The files of its folder
must be as they were before, unless the case names the ones it writes.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from metastate_core.config import ModelConfig
from metastate_core.params import random_params

DEFAULT = Path(__file__).resolve().parents[2] / "weights" / "default"
TOKENS = "1,2,3"
CHAT = ["--backend", "numpy", "--threads", "1", "--temperature", "0", "--max-tokens", "1"]


@dataclass
class Case:
    name: str
    argv: list
    dir: Path
    stdin: bytes = b""
    close: str | None = None
    expect: str = "refused"          # "refused" | "chat" (one error line, exit 0) | "ok"
    writes: tuple = ()               # files of the folder the case may change
    check: Callable | None = None    # extra check of an accepted case: raises AssertionError
    ok_if: Callable | None = None    # a refusal is not required when this holds after the run


@dataclass
class Base:
    model: Path
    other: Path                      # another model of the same shapes
    sharded: Path
    state: Path
    other_state: Path                # a state of another model with the same shapes
    logits: bytes                    # `logits --tokens 1,2,3` of `model`, as written
    pth: Path | None
    cfg: ModelConfig = field(repr=False)
    data: Path | None = None         # a prepared data directory (default tokenizer), and its text
    text: Path | None = None
    run: Path | None = None          # (with torch) a training run of 2 steps on `data`: checkpoints/step-000002


# the settings of the base training run, as `train` flags take them
RUN = dict(d_model=32, n_layer=1, head_size=16, seq_len=16, batch_size=2, max_steps=2, warmup_steps=1,
           eval_interval=2, save_interval=2, eval_sequences=1)
WORDS = "the king queen lord sword crown night day love death speak hear my thou art".split()


def words(seed: int, lines: int) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, 12)) for _ in range(lines))


def train_argv(data: Path, out: Path) -> list:
    return ["train", "--data", data, "--out", out, "--resume", "--no-progress", "--no-plot",
            *[f"--{k.replace('_', '-')}={v}" for k, v in RUN.items()]]


def make_base(root: Path) -> Base:
    from metastate.api import load, save_state
    from metastate.cli import main
    from weights import save_model

    cfg = ModelConfig(vocab_size=2048, d_model=32, n_layer=1, head_size=16, n_param_tokens=16, sse_heads=1,
                      tokenizer={"type": "sentencepiece", "file": "tokenizer.model"})
    tok = {"tokenizer.model": DEFAULT / "tokenizer.model"}
    tensors = random_params(cfg, 0, np.float32, sse=False)  # exact RWKV-7: it has a .pth form
    save_model(root / "model", cfg, tensors, extra_files=tok)
    save_model(root / "sharded", cfg, tensors, dtype="bfloat16", max_shard_bytes=60_000, extra_files=tok)
    save_model(root / "other", cfg, random_params(cfg, 1, np.float32, sse=False), extra_files=tok)
    states = []
    for name in ("model", "other"):
        engine, _ = load(root / name, "numpy", threads=1)
        logits, state = engine.prefill([1, 2, 3])
        save_state(root / f"{name}.state", engine, state, logits, n_tokens=3)
        states.append(root / f"{name}.state")
    assert main(["logits", "--model", str(root / "model"), "--tokens", TOKENS, "--out", str(root / "ref.npy")]) == 0
    (root / "text.txt").write_text(words(0, 60))
    assert main(["prepare-data", str(root / "text.txt"), "--out", str(root / "data"), "--tokenizer",
                 str(DEFAULT / "tokenizer.model"), "--val-fraction", "0.2"]) == 0
    pth = run = None
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        pth = root / "model.pth"
        assert main(["convert", str(root / "model"), "--to-pth", str(pth)]) == 0
        from metastate.train.config import TrainConfig
        from metastate.train.loop import train

        run = root / "run"
        train(TrainConfig(data=str(root / "data"), out=str(run), progress=False, plot=False, **RUN))
    return Base(root / "model", root / "other", root / "sharded", states[0], states[1], (root / "ref.npy").read_bytes(),
                pth, cfg, root / "data", root / "text.txt", run)


# -- file surgery ----------------------------------------------------------------------------

def split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header, data: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def sparse_tail(file: Path, extra: int) -> bool:
    """Extend `file` by `extra` bytes of hole; False (and undone) where holes are not sparse."""
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(size + extra)
    if file.stat().st_blocks * 512 > size + (1 << 20):
        with open(file, "r+b") as f:
            f.truncate(size)
        return False
    return True


# -- the corpus ------------------------------------------------------------------------------

class Builder:
    def __init__(self, root: Path, base: Base, seed: int):
        self.root, self.base, self.rng = root, base, np.random.default_rng(seed)
        self.cases: list[Case] = []

    def folder(self, name: str) -> Path:
        d = self.root / f"{len(self.cases):03d}-{name.replace('/', '-')}"
        d.mkdir()
        return d

    def choice(self, options):
        return options[int(self.rng.integers(len(options)))]

    def model_case(self, name: str, mutate: Callable[[Path], object], src: Path | None = None,
                   commands=("inspect", "logits", "convert", "generate", "chat"), **kw) -> None:
        """A copy of a model, mutated, then read by one of `commands` (chosen at random)."""
        d = self.folder(name)
        m = d / "m"
        shutil.copytree(src or self.base.model, m, symlinks=True)
        if mutate(m) is False:
            shutil.rmtree(d)
            return
        command = self.choice(commands)
        stdin = b""
        if command == "inspect":
            argv = ["inspect", m, *self.choice([[], ["--json"]])]
        elif command == "logits":
            (d / "x.npy").write_bytes(b"previous")
            argv = ["logits", "--model", m, "--tokens", TOKENS, "--out", d / "x.npy"]
        elif command == "convert":
            shutil.copytree(self.base.model, d / "out")
            argv = ["convert", m, "--out", d / "out", "--force"]
        elif command == "generate":
            argv = ["generate", "--model", m, "--prompt", "To be", *CHAT]
        else:
            argv, stdin = ["chat", "--model", m, *CHAT], b"To be\n/quit\n"
        self.cases.append(Case(name, argv, d, stdin, **kw))

    def add(self, name: str, argv_of: Callable[[Path], list], **kw) -> None:
        d = self.folder(name)
        self.cases.append(Case(name, argv_of(d), d, **kw))

    # header forgeries -----------------------------------------------------------------------
    def header(self, n: int) -> None:
        huge = 0
        for _ in range(n):
            kind = self.choice(["dtype", "shape", "offsets", "length", "metadata", "raw", "names", "huge"])
            if kind == "huge":
                huge += 1
                if huge > 6:  # a few sparse gigabytes are enough
                    kind = "shape"
            self.model_case(f"header/{kind}", lambda m, kind=kind: self._forge(m / "model.safetensors", kind))

    def _forge(self, file: Path, kind: str):
        h, data = split(file.read_bytes())
        names = [k for k in h if k != "__metadata__"]
        e = h[self.choice(names)]
        length = None
        if kind == "dtype":
            e["dtype"] = self.choice(["F64", "I32", "bf16", "", "F32 ", ["F32"], {"F32": 1}, 5, None, True, "BOOL"])
        elif kind == "shape":
            e["shape"] = self.choice([[-1], [1.5], ["32"], [2**62, 2**62], [[32]], {}, "32", None, e["shape"] + [1],
                                      [2**31, 0, 2**31], [True]])
        elif kind == "offsets":
            b, s = e["data_offsets"]
            e["data_offsets"] = self.choice([[s, b], [0, 2**63], [-1, s], [str(b), str(s)], [b], None, [b, s + 4],
                                             [b + 4, s + 4], 7])
        elif kind == "length":
            raw = json.dumps(h).encode()
            length = self.choice([0, 7, 2**63, 2**64 - 1, len(raw) + 8, 100 * 2**20 + 8, len(raw) - 8])
        elif kind == "metadata":
            h["__metadata__"] = self.choice([[], {"format": 5}, {"config": {"a": 1}}, "x", None,
                                             dict(h["__metadata__"], config="{\"vocab_size\": 2048}")])
        elif kind == "raw":
            raw = self.choice([b"[]", b"null", b"{", b"\xff\xfe{}", nested(100_000).encode(), b'{"a": 1, "a": 2}',
                               b"{}" + b"\0" * 8, json.dumps(dict(h, **{"x": {"y": nested(5000)}})).encode()])
            file.write_bytes(join(raw, data))
            return
        elif kind == "names":
            name = self.choice(names)
            if self.rng.random() < 0.5:
                h["blocks.99.att.w0"] = h.pop(name)
            else:
                del h[name]
        elif kind == "huge":  # an extra tensor of gigabytes, all hole: a small file on disk
            extra = int(self.choice([3 << 30, 2**33, 2**34 + 4]))
            h["extra"] = {"dtype": "F32", "shape": [extra // 4], "data_offsets": [len(data), len(data) + extra]}
            file.write_bytes(join(h, data))
            return sparse_tail(file, extra)
        file.write_bytes(join(h, data, length))

    # flipped bytes and truncations --------------------------------------------------------------
    def flips(self, n: int) -> None:
        ref = self.base.logits
        for _ in range(n):
            def flip(m):
                f = m / "model.safetensors"
                raw = bytearray(f.read_bytes())
                head = 8 + struct.unpack("<Q", raw[:8])[0]
                for _ in range(int(self.rng.integers(1, 5))):
                    lo, hi = self.choice([(0, head), (head, len(raw))])
                    raw[int(self.rng.integers(lo, hi))] ^= int(self.rng.integers(1, 256))
                f.write_bytes(bytes(raw))
            d = self.folder("flip")
            m = d / "m"
            shutil.copytree(self.base.model, m)
            flip(m)
            # a flip in the header's padding may be harmless: then the logits must be the original's
            self.cases.append(Case("flip", ["logits", "--model", m, "--tokens", TOKENS, "--out", d / "x.npy"], d,
                                   writes=("x.npy",), ok_if=lambda d=d: (d / "x.npy").read_bytes() == ref))

    def truncations(self, n: int) -> None:
        for _ in range(n):
            kind = self.choice(["weights", "weights", "config", "index", "shard"])
            if kind in ("weights", "config"):
                name = "model.safetensors" if kind == "weights" else "config.json"
                self.model_case(f"truncate/{kind}", lambda m, name=name: self._cut(m / name))
            else:
                src = self.base.sharded

                def cut(m, kind=kind):
                    shard = sorted(m.glob("model-*.safetensors"))[0]
                    self._cut(m / "model.safetensors.index.json" if kind == "index" else shard)
                self.model_case(f"truncate/{kind}", cut, src=src)

    def _cut(self, f: Path) -> None:
        data = f.read_bytes()
        keep = len(data.rstrip(b"\n")) - 1
        f.write_bytes(data[:int(self.rng.integers(0, keep))])

    # JSON -----------------------------------------------------------------------------------
    def json(self, n: int) -> None:
        for _ in range(n):
            kind = self.choice(["config", "config", "index", "nan", "utf8"])
            depth = int(self.choice([65, 200, 999, 5000, 100_000]))
            if kind == "config":
                def mutate(m, depth=depth):
                    c = (m / "config.json").read_text().rstrip()[:-1]  # the last of a repeated key counts
                    key = self.choice(["notes", "growth", "tokenizer", "vocab_size"])
                    (m / "config.json").write_text(c + f', "{key}": {nested(depth)}}}\n')
                self.model_case("json/config-nested", mutate, commands=("inspect", "logits", "convert", "chat"))
            elif kind == "index":
                self.model_case("json/index-nested", lambda m, depth=depth: (m / "model.safetensors.index.json")
                                .write_text(f'{{"metadata": {{"total_size": 1}}, "weight_map": {nested(depth)}}}'),
                                src=self.base.sharded)
            elif kind == "nan":
                bad = self.choice(["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
                key = self.choice(["train_ctx_len", "ln_x_eps", "notes"])
                self.model_case("json/nan", lambda m, bad=bad, key=key: (m / "config.json").write_text(
                    (m / "config.json").read_text()[:-2] + f', "{key}": {bad}}}\n'), commands=("inspect",))
            else:
                self.model_case("json/not-utf8", lambda m: (m / "config.json").write_bytes(
                    (m / "config.json").read_bytes().replace(b'"growth"', b'"gr\xffowth"')))

    # special files ----------------------------------------------------------------------------
    def special(self, n: int) -> None:
        root = os.geteuid() == 0
        kinds = ["fifo", "dir", "dangling", "loop", "zero"] + (["chardev"] if root else [])
        for i in range(n):
            where = self.choice(["config.json", "model.safetensors", "tokenizer.model", "index", "shard"])
            kind = self.choice(kinds)

            def mutate(m, where=where, kind=kind):
                if where in ("index", "shard"):
                    f = m / "model.safetensors.index.json" if where == "index" else \
                        sorted(m.glob("model-*.safetensors"))[-1]
                else:
                    f = m / where
                f.unlink()
                if kind == "fifo":
                    os.mkfifo(f)
                elif kind == "dir":
                    f.mkdir()
                elif kind == "dangling":
                    f.symlink_to(m / "nowhere")
                elif kind == "loop":
                    f.symlink_to(f.name)
                elif kind == "zero":
                    f.symlink_to("/dev/zero")  # endless: must never be read
                else:
                    os.mknod(f, 0o666 | stat.S_IFCHR, os.makedev(1, 5))  # another /dev/zero
            src = self.base.sharded if where in ("index", "shard") else self.base.model
            commands = ("chat", "generate", "convert") if where == "tokenizer.model" else \
                ("inspect", "logits", "convert", "generate")
            self.model_case(f"special/{where}-{kind}", mutate, src=src, commands=commands)
        # as output targets
        m = self.base.model
        self.add("special/out-dir", lambda d: ["logits", "--model", m, "--tokens", TOKENS, "--out", d])
        self.add("special/out-file-as-model", lambda d: [(d / "f").write_text("keep"), "convert", m, "--out",
                                                         d / "f", "--force"][1:])
        d = self.folder("special/save-to-dir")
        self.cases.append(Case("special/save-to-dir", ["chat", "--model", m, *CHAT], d, f"/save {d}\n".encode(),
                               expect="chat"))
        if root:
            def dev(d):
                os.mknod(d / "nul", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
                return ["logits", "--model", m, "--tokens", TOKENS, "--out", d / "nul"]
            self.add("special/out-chardev", dev, expect="ok",
                     check=lambda c: stat.S_ISCHR(os.lstat(c.dir / "nul").st_mode) or "replaced")

    # .pth ----------------------------------------------------------------------------------
    def pth(self, n: int) -> None:
        if self.base.pth is None:
            return
        import torch

        sd = torch.load(self.base.pth, weights_only=True)

        def save(obj):
            return lambda f: torch.save(obj, f)

        class Evil:
            def __reduce__(self):
                return os.system, ("touch pwned",)

        makers = {
            "garbage": lambda f: f.write_bytes(self.rng.bytes(int(self.rng.integers(0, 4096)))),
            "truncated": lambda f: f.write_bytes(self.base.pth.read_bytes()[:int(self.rng.integers(0, 4000))]),
            "flipped": lambda f: f.write_bytes(self._flip(self.base.pth.read_bytes())),
            "pickle-code": save({"emb.weight": Evil()}),
            "list": save([sd["emb.weight"]]),
            "int-keys": save({1: sd["emb.weight"]}),
            "int-tensor": save(dict(sd, **{"emb.weight": sd["emb.weight"].to(torch.int32)})),
            "expand": save(dict(sd, **{"emb.weight": torch.zeros(1).expand(2**20, 2**20)})),
            "expand-small": save(dict(sd, **{"emb.weight": torch.zeros(32).expand(2048, 32)})),
            "coo": save(dict(sd, **{"emb.weight": sd["emb.weight"].to_sparse()})),
            "csr": save(dict(sd, **{"emb.weight": sd["emb.weight"].to_sparse_csr()})),
            "3d": save(dict(sd, **{"emb.weight": sd["emb.weight"][None]})),
            "missing": save({k: v for k, v in sd.items() if k != "blocks.0.att.r_k"}),
            "unknown": save(dict(sd, **{"blocks.0.att.extra": torch.zeros(3)})),
            "nan": save(dict(sd, **{"head.weight": torch.full_like(sd["head.weight"], float("nan"))})),
            "nested": save({"state_dict": sd}),
            "quantized": save(dict(sd, **{"emb.weight": torch.quantize_per_tensor(sd["emb.weight"], 0.1, 0,
                                                                                  torch.qint8)})),
            "fifo": lambda f: (f.unlink(missing_ok=True), os.mkfifo(f)),
        }
        for kind in map(str, self.rng.permutation(list(makers))[:n]):  # seconds each: torch is slow to import
            d = self.folder(f"pth/{kind}")
            makers[kind](d / "x.pth")
            shutil.copytree(self.base.model, d / "out")
            self.cases.append(Case(f"pth/{kind}", ["convert", d / "x.pth", "--out", d / "out", "--force"], d,
                                   **self._harmless_flip(d) if kind == "flipped" else {}))

    def _harmless_flip(self, d: Path) -> dict:
        """A flip in a .pth's padding (the zip aligns data) changes nothing: then the output must
        hold the model's exact tensors."""
        from weights import load_model

        def exact():
            ref, got = load_model(self.base.model)[1], load_model(d / "out")[1]
            return all(np.array_equal(ref[k], got[k]) for k in ref)
        return {"writes": tuple(f"out/{p.name}" for p in self.base.model.iterdir()), "ok_if": exact}

    def _flip(self, data: bytes) -> bytes:
        raw = bytearray(data)
        for _ in range(int(self.rng.integers(1, 8))):
            raw[int(self.rng.integers(len(raw)))] ^= int(self.rng.integers(1, 256))
        return bytes(raw)

    # state files -----------------------------------------------------------------------------
    def states(self, n: int) -> None:
        from weights.safetensors_io import read_file, write_file

        tensors, meta = read_file(self.base.state)
        kinds = {
            "nan": lambda f: write_file(f, dict(tensors, wkv=np.full_like(tensors["wkv"], np.nan)), meta),
            "inf": lambda f: write_file(f, dict(tensors, att_x=np.full_like(tensors["att_x"], -np.inf)), meta),
            "shape": lambda f: write_file(f, dict(tensors, wkv=tensors["wkv"][:, :1]), meta),
            "extra": lambda f: write_file(f, dict(tensors, extra=np.zeros(3, np.float32)), meta),
            "missing": lambda f: write_file(f, {k: v for k, v in tensors.items() if k != "meta_x"}, meta),
            "other-model": lambda f: shutil.copy(self.base.other_state, f),
            "version": lambda f: write_file(f, tensors, dict(meta, format_version="2")),
            "format": lambda f: write_file(f, tensors, dict(meta, format="metastate")),
            "unsigned": lambda f: write_file(f, tensors, dict(meta, model_fingerprint="0" * 64)),
            "truncated": lambda f: f.write_bytes(self.base.state.read_bytes()[:int(self.rng.integers(0, 200))]),
            "flipped-data": lambda f: f.write_bytes(self._flip_tail(self.base.state.read_bytes())),
            "model-file": lambda f: shutil.copy(self.base.model / "model.safetensors", f),
            "huge": lambda f: self._huge_state(f, tensors, meta),
            "nested": lambda f: f.write_bytes(join(nested(100_000).encode(), b"")),
            "dir": lambda f: f.mkdir(),
            "fifo": lambda f: os.mkfifo(f),
            "missing-file": lambda f: None,
        }
        for i in range(n):
            kind = list(kinds)[i % len(kinds)]
            d = self.folder(f"state/{kind}")
            if kinds[kind](d / "s.state") is False:
                continue
            self.cases.append(Case(f"state/{kind}", ["chat", "--model", self.base.model, *CHAT], d,
                                   stdin=f"/load {d / 's.state'}\n/quit\n".encode(), expect="chat"))

    def _flip_tail(self, data: bytes) -> bytes:
        raw = bytearray(data)
        raw[-1 - int(self.rng.integers(0, 100))] ^= 0x40
        return bytes(raw)

    def _huge_state(self, f: Path, tensors, meta):
        from weights.safetensors_io import write_file

        write_file(f, tensors, meta, checksum=False)
        h, data = split(f.read_bytes())
        h["extra"] = {"dtype": "F32", "shape": [2**31], "data_offsets": [len(data), len(data) + 2**33]}
        f.write_bytes(join(h, data))
        return sparse_tail(f, 2**33)

    # training checkpoints ---------------------------------------------------------------------
    def checkpoints(self, n: int) -> None:
        """`train --resume` of a damaged copy of the base run's checkpoint: refused in one line,
        with nothing written (not even train_config.json or metrics)."""
        if self.base.run is None:
            return

        def state(change):
            def damage(c):
                s = json.loads((c / "trainer_state.json").read_text())
                change(s)
                (c / "trainer_state.json").write_text(json.dumps(s))
            return damage

        def arrays(change):
            def damage(c):
                with np.load(c / "optimizer.npz") as z:
                    a = {k: z[k] for k in z.files}
                change(a)
                np.savez(c / "optimizer.npz", **a)
            return damage

        def huge_member(c):
            header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776,), }"
            header += " " * (-(len(header) + 11) % 64) + "\n"
            with zipfile.ZipFile(c / "optimizer.npz", "a") as z, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a second member of the same name: the one np.load reads
                z.writestr("opt.emb.weight.exp_avg.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header))
                           + header.encode() + b"\0" * 64)

        def cut(name):
            return lambda c: (c / name).write_bytes((c / name).read_bytes()[:int(self.rng.integers(0, 200))])

        def special(name):
            return lambda c: ((c / name).unlink(), os.mkfifo(c / name))

        kinds = {
            "step-string": state(lambda s: s.update(step="abc")),
            "step-negative": state(lambda s: s.update(step=-5)),
            "step-fraction": state(lambda s: s.update(step=3.5)),
            "step-huge": state(lambda s: s.update(step=1e30)),
            "config-string": state(lambda s: s.update(config="x")),
            "rng-missing": state(lambda s: s.pop("rng")),
            "rng-list": state(lambda s: s.update(rng=[1, 2])),
            "rng-python": state(lambda s: s["rng"]["python"][1].__setitem__(0, 2**40)),
            "best-string": state(lambda s: s.update(best_val_loss="low")),
            "scaler": state(lambda s: s.update(grad_scaler=[])),
            "state-nested": lambda c: (c / "trainer_state.json").write_text(nested(100_000)),
            "state-nan": lambda c: (c / "trainer_state.json").write_text('{"step": NaN}'),
            "state-cut": cut("trainer_state.json"),
            "state-fifo": special("trainer_state.json"),
            "rng-torch-size": arrays(lambda a: a.update({"rng.torch": a["rng.torch"][:7]})),
            "rng-torch-dtype": arrays(lambda a: a.update({"rng.torch": a["rng.torch"].view(np.int8)})),
            "rng-numpy-size": arrays(lambda a: a.update({"rng.numpy": a["rng.numpy"][:-1]})),
            "rng-numpy-dtype": arrays(lambda a: a.update({"rng.numpy": a["rng.numpy"].astype(np.int64)})),
            "no-moments": arrays(lambda a: [a.pop(k) for k in list(a) if k.startswith("opt.")]),
            "moment-shape": arrays(lambda a: a.update({"opt.emb.weight.exp_avg": a["opt.emb.weight.exp_avg"][:1]})),
            "npz-huge-member": huge_member,
            "npz-cut": cut("optimizer.npz"),
            "npz-fifo": special("optimizer.npz"),
        }
        for name in map(str, self.rng.permutation(list(kinds))[:n]):  # seconds each: torch is slow to import
            d = self.folder(f"ckpt/{name}")
            shutil.copytree(self.base.run, d / "run")
            kinds[name](d / "run" / "checkpoints" / "step-000002")
            self.cases.append(Case(f"ckpt/{name}", train_argv(self.base.data, d / "run"), d))

    # prepare-data -------------------------------------------------------------------------------
    def data(self) -> None:
        """`prepare-data` of hostile inputs, each setup(d) -> (inputs, tokenizer), writing to d/d."""
        text, tok = self.base.text, DEFAULT / "tokenizer.model"

        def write(name, data):
            return lambda d: ((d / name).write_bytes(data), ([d / name], tok))[1]

        def fifo(d):
            os.mkfifo(d / "x.txt")
            return [d / "x.txt"], tok

        def fifo_tokenizer(d):
            os.mkfifo(d / "t.model")
            return [text], d / "t.model"

        def out_file(d):
            (d / "d").write_text("keep")
            return [text], tok

        def out_not_data(d):  # a folder of the user's: never replaced whole
            (d / "d").mkdir()
            (d / "d" / "notes.txt").write_text("keep")
            return [text], tok

        def over_old(d):  # a bad tokenizer over an existing data directory: refused, the old one kept
            shutil.copytree(self.base.data, d / "d")
            return [text], d / "d" / "meta.json"

        setups = {"nested-jsonl": write("x.jsonl", nested(100_000).encode() + b"\n"),
                  "not-utf8": write("x.txt", b"caf\xe9 " * 50), "too-little": write("x.txt", b"the"),
                  "fifo-input": fifo, "fifo-tokenizer": fifo_tokenizer, "out-file": out_file,
                  "out-not-data": out_not_data, "bad-tokenizer-over-old": over_old}
        for name, setup in setups.items():
            d = self.folder(f"data/{name}")
            inputs, tokenizer = setup(d)
            argv = ["prepare-data", *inputs, "--out", d / "d", "--tokenizer", tokenizer]
            self.cases.append(Case(f"data/{name}", argv, d))

    # arguments --------------------------------------------------------------------------------
    def args(self) -> None:
        m = self.base.model
        for flag in ("--presence-penalty", "--frequency-penalty"):
            for value in ("1e308", "-1e308", "nan"):
                self.add("args/penalty", lambda d, f=flag, v=value: ["generate", "--model", m, "--prompt", "a",
                                                                    f"{f}={v}", *CHAT])
        for flag, value in (("--layers", 10**6), ("--heads", 10**6), ("--param-tokens", 10**9), ("--layers", 2**31)):
            self.add("args/grow", lambda d, f=flag, v=value: ["grow", m, "--out", d / "g", f, v])
        self.add("args/init", lambda d: ["init", "--out", d / "i", "--vocab-size", 65536, "--n-layer", 10**6])
        self.add("args/stdin-closed", lambda d: ["chat", "--model", m, *CHAT], close="stdin")
        self.add("args/prompt-stdin-closed", lambda d: ["generate", "--model", m, "--prompt", "-", *CHAT],
                 close="stdin")
        self.add("args/stdout-closed", lambda d: ["generate", "--model", m, "--prompt", "a", *CHAT], close="stdout")
        self.add("args/tokens", lambda d: ["logits", "--model", m, "--tokens", "1," + "9" * 400, "--out", d / "x"])
        d = self.folder("args/not-utf8-model")
        bad = os.fsdecode(os.fsencode(d) + b"/m\xff")
        shutil.copytree(m, bad)
        self.cases.append(Case("args/not-utf8-model", ["chat", "--model", bad, *CHAT], d, b"To be\n/quit\n",
                               expect="ok"))


def corpus(root: Path, base: Base, seed: int) -> list[Case]:
    b = Builder(root, base, seed)
    b.header(60)
    b.flips(36)
    b.truncations(30)
    b.json(25)
    b.special(24)
    b.pth(10)
    b.states(17)
    b.checkpoints(14)
    b.data()
    b.args()
    return b.cases


def snapshot(d: Path) -> dict[str, object]:
    """What a case's folder holds: file bytes, and the kind of anything else (symlinks not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(d):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            mode = os.lstat(p).st_mode
            if stat.S_ISREG(mode):
                out[str(p.relative_to(d))] = p.read_bytes() if p.stat().st_size < 1 << 24 else p.stat().st_size
            elif not stat.S_ISDIR(mode):
                out[str(p.relative_to(d))] = stat.S_IFMT(mode)
    return out
