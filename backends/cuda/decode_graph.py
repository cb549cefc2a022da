"""Single-token decoding replayed from a CUDA graph.

One decoded token through the Triton path is a few hundred small kernel launches (`python
bench/profile_model.py --decode-ops` counts them), each costing the CPU more time than the GPU
spends on it, so decoding a small model is bound by launches (docs/benchmarks.md). Captured once
into a CUDA graph, a token is one replay plus the copies in and out.
"""

from __future__ import annotations

from dataclasses import fields

import torch

from .model import Model, ModelError, State, _check_state, _check_tokens

# Whether a torch engine on a CUDA device decodes from a graph when its caller does not say
# (`metastate.api.load(cuda_graphs=None)`, once the API reads this). Off until a GPU has run
# tests/test_decode_graph.py and bench/gpu_model.py (scripts/gpu_check.sh parts 1 and 2): where
# graphs pass and decode faster, making them the default is this one line.
DEFAULT_ON_CUDA = False


class DecodeGraph:
    """`Model.forward` for one token per sequence at a fixed batch, captured on first call.

    Calls look like the model's: `graph(tokens [B, 1], state) -> (logits [B, 1, V], State)`, and
    the input state is not modified. Inside, the tokens and state are copied into static buffers,
    the graph replays, and the outputs are cloned out of its memory pool. The graph reads the
    model's parameters where they are: update them in place (as optimizers and
    `load_state_dict` do), not by replacing tensors. It runs the model's kernels (`model.kernels`,
    "triton" where there is a GPU) and layout as they are at its capture; after `set_kernels` or
    `set_layout` the next call captures again.
    """

    def __init__(self, model: Model, batch: int = 1, warmup: int = 2):
        device = model.head.weight.device
        if device.type != "cuda":
            raise ModelError(f"CUDA graphs need the model on a CUDA device, and it is on {device}")
        if batch < 1 or warmup < 1:  # warm-up compiles the kernels: nothing may compile under capture
            raise ModelError(f"batch and warmup must be at least 1, got {batch} and {warmup}")
        self.model, self.warmup, self.captured_with = model, warmup, None
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.state = State.zeros(model.cfg, batch, device)
        self.graph = None

    def _capture(self) -> None:
        device = self.tokens.device
        with torch.no_grad():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # compile the kernels, warm cuBLAS, off the capture
                for _ in range(self.warmup):
                    self.model(self.tokens, self.state)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(device)):
                self.logits, self.next_state = self.model(self.tokens, self.state)
        self.graph, self.captured_with = graph, self._setup()

    def _setup(self):
        """What a capture depends on beyond parameter values: the kernels and the layout."""
        return self.model.blocks[0].att.kern, self.model.layout

    def __call__(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        B = self.tokens.shape[0]
        # the model's own checks: replays never run its forward (an id past the vocabulary would
        # be a device-side assert; copy_ would convert a float token or state silently)
        if tokens.dtype not in (torch.int64, torch.int32) or tokens.numel() != B:
            raise ModelError(f"this graph decodes one int64/int32 token for each of {B} sequences, got "
                             f"{tokens.dtype} {list(tokens.shape)}")
        _check_tokens(tokens, self.model.cfg.vocab_size)
        _check_state(self.model.cfg, state, B, self.tokens.device)
        with torch.cuda.device(self.tokens.device):  # streams and capture on the model's GPU
            if self.graph is None or self._setup() != self.captured_with:
                self._capture()
            self.tokens.copy_(tokens.reshape(B, 1))
            for f in fields(State):
                getattr(self.state, f.name).copy_(getattr(state, f.name))
            self.graph.replay()
            return self.logits.clone(), State(*(getattr(self.next_state, f.name).clone() for f in fields(State)))
