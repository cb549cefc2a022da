"""An lm-evaluation-harness model: `--model metastate --model_args model=DIR[,backend=...]`.

lm-eval finds a model by name in its registry, which only its own models enter by themselves
(lm-eval 0.4 reads no plugin entry points); importing this module adds "metastate", and
`metastate lm-eval` registers it as a lazy placeholder to this class. So run lm-eval through
either of:

    metastate lm-eval --model metastate --model_args model=DIR --tasks TASK   # `lm_eval`'s arguments
    import metastate.lm_eval_adapter; lm_eval.simple_evaluate(model="metastate", ...)

Texts are scored as `metastate eval` scores them: each request's context starts a document
after the end-of-text token, so the first token of an empty context's continuation is
predicted too; a rolling log-likelihood is the whole document's, any length, in chunks that
carry the recurrent state (no window: RWKV has no context limit). Requests that share a
context, one after another (the choices of a question), reuse its state.

model_args: model (directory; default the shipped model), backend, kernels, dtype, threads
(as `metastate eval`), chunk (tokens per model call), device (torch: lm-eval's --device, whose
default cuda:0 means the GPU when there is one).
"""

from __future__ import annotations

import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from metastate.api import generate, load
from metastate.evaluate import EvalError, document_start, score
from metastate_core.constants import PREFILL_STEP

GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "seed")
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default for generation tasks


def _torch_device(device, backend: str):
    """lm-eval always passes --device (default cuda:0): it picks the torch backend's device, and
    a CUDA device where there is none means "the default" (the CPU)."""
    if device is None or backend != "torch":
        return None
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
    return str(device)


@register_model("metastate")
class MetaStateLM(LM):
    """A Meta-State model for lm-eval: loglikelihood, loglikelihood_rolling, generate_until."""

    def __init__(self, model=None, backend: str = "auto", kernels: str = "auto", dtype=None, threads="auto",
                 chunk: int = PREFILL_STEP, device=None, batch_size=1, max_batch_size=None, **unknown):
        super().__init__()  # batch_size, max_batch_size: requests go one at a time (sequences of any length)
        if unknown:
            raise EvalError(f"unknown model_args {', '.join(sorted(unknown))}: metastate takes model, backend, "
                            "kernels, dtype, threads, chunk and device")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise EvalError(f"chunk must be a positive number of tokens, got {chunk!r}")
        self.engine, self.tokenizer = load(None if model is None else str(model), backend, kernels=kernels,
                                           dtype=dtype, device=_torch_device(device, backend), threads=threads)
        if self.tokenizer is None:
            raise EvalError(f"{model} has no tokenizer, so lm-eval cannot use it")
        self.start = document_start(self.engine, self.tokenizer)
        if self.start is None:
            raise EvalError(f"the tokenizer of {model} has no end-of-text token to start a document with")
        self.chunk = chunk
        self._context = ((), *self.start)  # the last context scored: its ids, state and logits

    # -- helpers ----------------------------------------------------------------------------
    def _after(self, ids: list[int]):
        """(state, logits) after the end-of-text token and `ids`; the last context is kept."""
        if tuple(ids) != self._context[0]:
            state, logits = self.start
            if ids:
                logits, state = self.engine.prefill(ids, state, self.chunk)
            self._context = (tuple(ids), state, logits)
        return self._context[1:]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation), split where the context's tokens end in the
        tokens of the whole text, so the pair reads as the model reads the text. Spaces at the
        end of the context go to the continuation (lm-eval's convention: " Paris" is a word)."""
        n = len(context) - len(context.rstrip(" "))
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        n_context = len(self.tokenizer.encode(context)) if context else 0
        return whole[:n_context], whole[n_context:]

    # -- the LM interface -------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether greedy decoding gives it) per request."""
        out = []
        for req in tqdm(requests, desc="loglikelihood", disable=disable_tqdm or None, file=sys.stderr):
            context, continuation = req.args
            ctx, cont = self.encode_pair(context, continuation)
            if not cont:
                result = (0.0, True)
            else:
                scored = score(self.engine, cont, *self._after(ctx), chunk=self.chunk)
                result = (float(scored.log_probs.sum()), bool(scored.greedy.all()))
            self.cache_hook.add_partial("loglikelihood", req.args, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-probability of each whole text, as one document (the sum `metastate eval` takes)."""
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm or None, file=sys.stderr):
            (text,) = req.args
            ids = self.tokenizer.encode(text)
            result = float(score(self.engine, ids, *self.start, chunk=self.chunk).log_probs.sum()) if ids else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, result)
            out.append(result)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The continuation of each context up to the first stop string of `until` (not included),
        the end-of-text token or max_gen_toks tokens; greedy unless do_sample."""
        out = []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm or None, file=sys.stderr):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            unknown = sorted(set(kwargs) - set(GEN_KWARGS))
            if unknown:
                raise EvalError(f"generation option(s) {', '.join(unknown)} are not supported "
                                f"(metastate takes {', '.join(GEN_KWARGS)})")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sampling = {"temperature": 0.0}
            if kwargs.get("do_sample"):
                sampling = {"temperature": float(kwargs.get("temperature", 1.0)),
                            "top_p": float(kwargs.get("top_p", 1.0)), "top_k": int(kwargs.get("top_k") or 0),
                            "seed": kwargs.get("seed")}
            # the document's start token, then the context: as the loglikelihoods read it
            ids = [self.tokenizer.eos_id, *(self.tokenizer.encode(context) if context else [])]
            text = generate(self.engine, self.tokenizer, ids, int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)),
                            stop=until, prefill_step=self.chunk, **sampling)
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

