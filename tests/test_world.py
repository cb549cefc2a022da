"""Fine-tuning official checkpoints (issue 20 item 4): `prepare-data` with an RWKV World
vocabulary, and `train --init-from` a World-vocabulary model imported from a .pth."""

import random
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from metastate.cli import main  # noqa: E402
from metastate.train.config import TrainConfig, TrainError  # noqa: E402
from metastate.train.data import _token_stream, prepare_data, read_meta  # noqa: E402
from metastate.train.loop import Trainer, train  # noqa: E402
from metastate_core.config import ModelConfig  # noqa: E402
from metastate_core.params import random_params  # noqa: E402
from metastate_core.tokenizers import WorldTokenizer  # noqa: E402
from weights import export_official_pth, load_model  # noqa: E402

VOCAB = "rwkv_vocab_v20230424.txt"
WORDS = ["the ", "king ", "queen ", "sword ", "crown ", "night ", "love ", "speak "]


def world_vocab(path: Path) -> None:
    """A World vocabulary: every single byte (ids 1..256), then whole words at high ids."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(256):
            f.write(f"{i + 1} {bytes([i])!r} 1\n")
        for k, w in enumerate(WORDS):
            f.write(f"{65000 + k} {w!r} {len(w.encode())}\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(an imported random World-vocabulary model, data prepared with its vocabulary)."""
    root = tmp_path_factory.mktemp("world")
    (root / "official").mkdir()
    world_vocab(root / "official" / VOCAB)
    cfg = ModelConfig(vocab_size=65536, d_model=32, n_layer=1, head_size=16)
    export_official_pth(cfg, random_params(cfg, 0, np.float32, sse=False), root / "official" / "model.pth")
    assert main(["convert", str(root / "official" / "model.pth"), "--out", str(root / "model")]) == 0
    rng = random.Random(0)
    (root / "text.txt").write_text("\n".join("".join(rng.choice(WORDS) for _ in range(12)) for _ in range(60)))
    meta = prepare_data([root / "text.txt"], root / "data", tokenizer=root / "official" / VOCAB, val_fraction=0.2)
    return root, meta


def test_prepare_data_with_a_world_vocabulary(world):
    root, meta = world
    assert meta["tokenizer"] == VOCAB and meta["tokenizer_type"] == "rwkv_world"
    assert meta["vocab_size"] == 65536 and meta["eos_id"] == 0
    assert meta["dtype"] == "uint16"  # ids 0..65535 fit: uint32 only past 65536 ids (below)
    assert (root / "data" / VOCAB).read_bytes() == (root / "official" / VOCAB).read_bytes()
    ids = np.concatenate([np.fromfile(root / "data" / s["file"], dtype=np.uint16)
                          for split in ("train", "val") for s in meta["splits"][split]])
    assert ids.max() >= 65000  # the word tokens, at ids a uint8 or int16 would have broken
    # one document: its tokens, then end-of-text (id 0)
    assert ids[-1] == 0 and 0 not in ids[:-1]
    assert WorldTokenizer(root / "official" / VOCAB).decode(ids[:-1].tolist()) == (root / "text.txt").read_text()
    assert read_meta(root / "data") == meta


def test_a_vocabulary_past_65536_ids_is_stored_as_uint32():
    class Big:
        vocab_size, eos_id = 70_000, 0

        def encode(self, text):
            return [69_999, 65_536, len(text)]
    ids, dtype = _token_stream(["ab"], Big(), 0)
    assert dtype == np.uint32 and ids.tolist() == [69_999, 65_536, 2, 0]


def test_train_init_from_an_imported_world_model(world, tmp_path):
    root, _ = world
    cfg, _ = load_model(root / "model")
    assert cfg.tokenizer == {"type": "rwkv_world", "file": VOCAB}
    result = train(TrainConfig(data=str(root / "data"), out=str(tmp_path / "run"), init_from=str(root / "model"),
                               seq_len=16, batch_size=2, max_steps=3, warmup_steps=1, lr=1e-2, eval_interval=3,
                               save_interval=3, eval_sequences=1, progress=False, plot=False))
    assert result["step"] == 3 and all(np.isfinite(result["losses"]))
    ckpt = Path(result["checkpoint"])
    tuned_cfg, tuned = load_model(ckpt)
    assert tuned_cfg.tokenizer == {"type": "rwkv_world", "file": VOCAB}
    assert (ckpt / VOCAB).read_bytes() == (root / "official" / VOCAB).read_bytes()
    start = load_model(root / "model")[1]
    assert not np.array_equal(tuned["emb.weight"], start["emb.weight"])  # it trained
    # and it resumes
    more = train(TrainConfig(data=str(root / "data"), out=str(tmp_path / "run"), resume="auto", seq_len=16,
                             batch_size=2, max_steps=3, warmup_steps=1, lr=1e-2, eval_interval=3, save_interval=3,
                             eval_sequences=1, progress=False, plot=False))
    assert more["step"] == 3


def test_init_from_refuses_a_world_model_on_sentencepiece_data(world, tmp_path):
    root, _ = world
    prepare_data([root / "text.txt"], tmp_path / "sp", vocab_size=300)
    with pytest.raises(TrainError, match="tokenizer is 'rwkv_world' and .* prepared with 'sentencepiece'"):
        Trainer(TrainConfig(data=str(tmp_path / "sp"), out=str(tmp_path / "run"), init_from=str(root / "model"),
                            seq_len=16, batch_size=2, progress=False, plot=False))
