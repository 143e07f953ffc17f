"""The receptive field of a prompt: how many of its last tokens the state after it depends on.

The state after a prompt of n tokens (positions 0..n-1) is what a later step reads: the next-token logits,
the output of the last layer at n-1, and each layer's keys and values at the positions the next query (at n,
the one that looks farthest back) can see. Everything else in the cache is never read again.

Which keys a causal query at position p sees (model/attention.py, `blocked_keys` and the window frames; the
cached step in model/step.py masks the same ones), with window W and look_backward lb:
    exact windows     keys p - W*lb .. p              (the exact cut is inside the bucket frame)
    bucketed windows  keys (p // W - lb) * W .. p     (the query's bucket and the lb buckets before it)
Nothing else mixes positions: the embeddings (absolute ones at their true positions), the qk RMS norm, value
gates, feed-forward and the hyper-connection stream mixing are all per token; rotary, xpos and the dynamic
position bias depend only on the distance between query and key. With shared_qk a query's own key only changes
its logit, not which keys are seen.

Derivation. Read the prompt from position s onward (keys before s are masked) and call E_l the positions whose
output after l layers equals that of reading everything; E_0 = [s, n-1]. A position p is in E_l when every key
of layer l it sees (computed from outputs after l-1 layers) is in E_{l-1}:
    exact:     E_l = [s + l*W*lb, n-1]
    bucketed:  for s a multiple of W, (p // W - lb) * W >= s + (l-1)*W*lb holds exactly when
               p >= s + l*W*lb: again E_l = [s + l*W*lb, n-1], starting at a multiple of W (a start between
               two multiples of W is worth no more than the one above it: buckets snap to their boundaries).
The logits need n-1 in E_L: s <= n - 1 - L*W*lb. The keys of layer L that the query at n sees start at
n - W*lb (exact) or (n // W - lb) * W (bucketed) and must lie in E_{L-1}: a weaker condition. So, with
    R = L * W * lb + 1,
any start s <= n - R gives exactly the state of reading everything (for bucketed windows, s a multiple of W).
The reach per layer, D = W * lb, is the same for both kinds of window once the start is window-aligned.
Global attention layers, non-causal or look-forward attention have no such bound: R is None.

Worked example: W = 4, lb = 1, L = 2 layers, so R = 2*4*1 + 1 = 9. A prompt of n = 30 tokens:
    exact:     the logits at 29 read layer-2 keys 25..29, which read layer-1 keys from 21 on: tokens 21..29
               (9 = R of them); reading_start(30, 9, 4, 4) = 20, the multiple of 4 at or below 30 - 9 = 21.
    bucketed:  query 29 (bucket 28..31) reads layer-2 keys 24..29; query 24 reads layer-1 keys 20..24: tokens
               20..29, and reading_start gives 20. With n = 28, query 27 reads 20..27 and query 20 reads
               16..20: start 16 = the multiple of 4 at or below 28 - 9 = 19.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.transformer import LocalTransformer


def prompt_reach(model: LocalTransformer) -> int | None:
    """R: the number of last prompt tokens the state after the prompt depends on (read from a window-aligned
    start, see the module docstring); None when some layer's reach is unbounded or not uniform."""
    if not model.causal or any(layer is not None for layer in model.global_layers):
        return None
    layers = [attention.attn_fn for attention in model.attention_layers]
    shapes = {(layer.window_size, layer.look_backward, layer.look_forward, layer.exact_windowsize) for layer in layers}
    if len(shapes) != 1:  # layers of different windows: the cached step does not run them either
        return None
    ((window, look_backward, look_forward, _),) = shapes
    if look_forward != 0:
        return None
    return len(layers) * window * look_backward + 1


def reading_start(prompt_length: int, reach: int | None, window: int, chunk: int | None = None) -> int:
    """Where to start reading a prompt of `prompt_length` tokens: the largest multiple of the window (and of
    the prefill chunk, so that the chunks read are the very chunks of a whole read) at or below
    prompt_length - reach, never below 0; 0 when the reach is unbounded (None)."""
    if reach is None or prompt_length <= reach:
        return 0
    alignment = math.lcm(window, window if chunk is None else chunk)
    return (prompt_length - reach) // alignment * alignment
