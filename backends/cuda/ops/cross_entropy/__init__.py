"""The language-model head and its loss together: mean next-token cross-entropy of h @ W^T.
naive.py materialises the logits [N, V] (the test twin); chunked.py never holds more than one
chunk of them, which at a 65536-token vocabulary is most of a small model's training memory.
Same signature."""

from . import chunked, naive

__all__ = ["chunked", "naive"]
