"""The chunked linear cross-entropy (backends/cuda/ops/cross_entropy) against its plain twin, the
memory it keeps for backward, its errors, and the model's `targets=` path built on it."""

import pytest

torch = pytest.importorskip("torch")

from backends.cuda.ops.cross_entropy import chunked, naive  # noqa: E402


def _problem(N=37, d=16, V=50, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=dtype).requires_grad_()
    W = (torch.randn(V, d, generator=g, dtype=dtype) * 0.5).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    return h, W, t


def _value_and_grads(fn, h, W, t, scale=1.0, **kw):
    h.grad = W.grad = None
    loss = fn(h, W, t, **kw)
    (loss * scale).backward()
    return loss.detach(), h.grad.clone(), None if W.grad is None else W.grad.clone()


@pytest.mark.parametrize("rows", [1, 8, 37, 64])  # one row, a tail (37 = 4 * 8 + 5), exact, one chunk
def test_chunked_matches_naive_float64(rows):
    h, W, t = _problem()
    ref = _value_and_grads(naive.linear_cross_entropy, h, W, t, scale=2.5)
    got = _value_and_grads(chunked.linear_cross_entropy, h, W, t, scale=2.5, chunk_rows=rows)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # cuda: scripts/gpu_check.sh


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_within_one_rounding_of_float64(device):
    """float32 master weights under bf16 autocast, as the trainer runs: the chunked loss and
    gradients are as close to the float64 truth as the plain path's."""
    h, W, t = _problem(N=64, d=32, V=300)
    exact = _value_and_grads(naive.linear_cross_entropy, h, W, t)
    exact = tuple(x.to(device) for x in exact)
    h32, W32 = (x.detach().float().to(device).requires_grad_() for x in (h, W))
    t = t.to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        # compute_dtype None, as the model calls it: the matmuls take autocast's dtype in both
        plain = _value_and_grads(naive.linear_cross_entropy, h32, W32, t)
        ours = _value_and_grads(chunked.linear_cross_entropy, h32, W32, t, chunk_rows=16)
    for e, p, o in zip(exact, plain, ours):
        assert o.dtype == torch.float32
        err_plain, err_ours = (float((x.double() - e).abs().max()) for x in (p, o))
        scale = float(e.abs().max())
        assert err_ours <= 2e-2 * scale  # bf16 logits and matmuls: a few roundings of 2^-8
        assert err_ours <= 2 * err_plain + 1e-3 * scale
    # and bf16 really was used: the result is not the float32 one
    f32 = _value_and_grads(chunked.linear_cross_entropy, h32, W32, t, chunk_rows=16)
    assert float((f32[2] - ours[2]).abs().max()) > 1e-5


def test_bf16_weights_get_bf16_gradients():
    h, W, t = _problem(N=20, V=40)
    hf, Wb = h.detach().float().requires_grad_(), W.detach().bfloat16().requires_grad_()
    loss, dh, dW = _value_and_grads(chunked.linear_cross_entropy, hf, Wb, t, chunk_rows=6)
    ref = _value_and_grads(naive.linear_cross_entropy, hf, Wb, t)
    assert loss.dtype == dh.dtype == torch.float32 and dW.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dW.float(), ref[2].float(), rtol=2e-2, atol=2e-3)


def test_frozen_head_and_no_grad(monkeypatch):
    h, W, t = _problem()
    W.requires_grad_(False)
    _, dh, _ = _value_and_grads(naive.linear_cross_entropy, h, W, t)
    h.grad = None
    chunked.linear_cross_entropy(h, W, t, chunk_rows=8).backward()
    torch.testing.assert_close(h.grad, dh, rtol=1e-12, atol=1e-12)
    asked = []
    real = chunked._forward
    monkeypatch.setattr(chunked, "_forward", lambda *a: asked.append(a[-2:]) or real(*a))
    with torch.no_grad():  # evaluation: the loss only, no gradients computed or kept
        loss = chunked.linear_cross_entropy(h, W, t, chunk_rows=8)
    chunked.linear_cross_entropy(h, W, t, chunk_rows=8)  # frozen head: dh only
    assert asked == [(False, False), (True, False)]
    assert not loss.requires_grad
    torch.testing.assert_close(loss, naive.linear_cross_entropy(h, W, t).detach(), rtol=1e-12, atol=1e-12)


def _saved_elements(fn, *args, **kw):
    sizes = []

    def pack(x):
        sizes.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn(*args, **kw)
    return sizes


def test_nothing_of_size_n_by_v_is_kept():
    N, d, V = 64, 8, 512
    h, W, t = _problem(N=N, d=d, V=V)
    assert max(_saved_elements(naive.linear_cross_entropy, h, W, t)) >= N * V  # the test can tell
    saved = _saved_elements(chunked.linear_cross_entropy, h, W, t, chunk_rows=16)
    assert sorted(saved) == sorted([N * d, V * d])  # the two gradients, nothing else


@pytest.mark.parametrize("bad, match", [
    (lambda h, W, t: (h, W, t[:-1]), "targets must be"),
    (lambda h, W, t: (h, W[:, :-1], t), "hidden states"),
    (lambda h, W, t: (h, W, t.float()), "integer token ids"),
    (lambda h, W, t: (h, W, t.clone().fill_(W.shape[0])), r"lie in \[0, 50\)"),
    (lambda h, W, t: (h, W, t - t.max() - 1), "lie in"),
    (lambda h, W, t: (h[:0], W, t[:0]), "no targets"),
    (lambda h, W, t: (h, W, t.to("meta")), "one device"),
])
def test_bad_input_is_a_clear_error(bad, match):
    h, W, t = _problem()
    with pytest.raises(chunked.CrossEntropyInputError, match=match):
        chunked.linear_cross_entropy(*bad(h, W, t))


def test_model_targets_path_equals_loss_of_logits():
    """Model(tokens, targets=...) is the cross-entropy of Model(tokens)'s logits, with the same
    gradient for every parameter, under bf16 autocast as in training too."""
    from backends.cuda.model import Model, ModelError
    from metastate_core.config import ModelConfig
    from metastate_core.params import init_params

    cfg = ModelConfig(vocab_size=97, d_model=32, n_layer=2, head_size=16, d_att=32)
    model = Model.from_tensors(cfg, init_params(cfg, 3), dtype="float32")
    toks = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))

    def grads(use_targets, autocast):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if use_targets:
                loss, state = model(toks[:, :-1], targets=toks[:, 1:])
            else:
                logits, state = model(toks[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), toks[:, 1:].flatten())
        loss.backward()
        return loss.detach(), state.wkv, {n: p.grad.clone() for n, p in model.named_parameters()}

    for autocast, tol in ((False, 1e-5), (True, 2e-2)):
        (l0, s0, g0), (l1, s1, g1) = grads(False, autocast), grads(True, autocast)
        # the same bf16 logits either way under autocast, so the loss agrees closely
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s1, s0, rtol=0, atol=0)
        assert g0.keys() == g1.keys()
        for n in g0:
            scale = float(g0[n].abs().max()) + 1e-6
            assert float((g1[n] - g0[n]).abs().max()) <= tol * scale, n
    l32, l16 = grads(True, False)[0], grads(True, True)[0]
    assert abs(float(l32 - l16)) > 1e-5  # and autocast's dtype was used for the head
    with pytest.raises(ModelError, match="targets must have the tokens' shape"):
        model(toks[:, :-1], targets=toks)


def test_fp16_gradients_take_the_loss_scale_before_rounding():
    """Under fp16 with GradScaler the incoming gradient is the loss scale; softmax / N is mostly
    below float16's range, so the logits' gradient must be scaled before it is rounded, as autograd
    through the plain twin does. Rounded first, the gradients lose about a digit here."""
    h, W, t = _problem(N=1024, d=32, V=4096, seed=3)
    exact = _value_and_grads(naive.linear_cross_entropy, h, W, t)
    h32, W32 = (x.detach().float().requires_grad_() for x in (h, W))
    scale = 2.0**16
    plain = _value_and_grads(naive.linear_cross_entropy, h32, W32, t, scale=scale, compute_dtype=torch.float16)
    ours = _value_and_grads(chunked.linear_cross_entropy, h32, W32, t, scale=scale, compute_dtype=torch.float16,
                            chunk_rows=300)
    for e, p, o in zip(exact[1:], plain[1:], ours[1:]):
        err = lambda x: float((x.double() / scale - e).norm() / e.norm())  # noqa: E731
        assert err(p) < 1e-3 and err(o) < 1.5 * err(p) + 1e-5
    torch.testing.assert_close(ours[0], plain[0], rtol=1e-6, atol=1e-6)


def test_double_backward_raises():
    h, W, t = _problem()
    loss = chunked.linear_cross_entropy(h, W, t, chunk_rows=8)
    with pytest.raises(NotImplementedError, match="no second derivative"):
        torch.autograd.grad(loss, (h, W), create_graph=True)
