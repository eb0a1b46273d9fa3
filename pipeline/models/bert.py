"""A BERT-style encoder (post-LayerNorm, GELU, additive attention mask), built as an ONNX graph.

It uses the op patterns that transformer exports produce (MatMul + Add, Reshape/Transpose per head,
Erf-based GELU, LayerNormalization, a Cast/Unsqueeze/Sub/Mul mask), so it exercises the same frontend
paths as a real exported BERT.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from pipeline.models.graph import GraphBuilder
from pipeline.models.registry import register_model


def _layer_norm(g: GraphBuilder, x: str, hidden: int) -> str:
    scale = g.const(np.ones(hidden, np.float32), "ln_gamma")
    bias = g.const(np.zeros(hidden, np.float32), "ln_beta")
    return g.op("LayerNormalization", [x, scale, bias], "layernorm", axis=-1, epsilon=1e-12)


def _gelu(g: GraphBuilder, x: str) -> str:
    inv_sqrt2 = g.const(np.array(1 / math.sqrt(2), np.float32), "gelu_c")
    one = g.const(np.array(1.0, np.float32), "one")
    half = g.const(np.array(0.5, np.float32), "half")
    erf = g.op("Erf", [g.op("Mul", [x, inv_sqrt2], "mul")], "erf")
    return g.op("Mul", [g.op("Mul", [x, half], "mul"), g.op("Add", [erf, one], "add")], "gelu")


def _attention(g: GraphBuilder, x: str, mask_bias: str, batch: int, seq: int, hidden: int,
               heads: int) -> str:
    head_dim = hidden // heads
    split = g.const(np.array([batch, seq, heads, head_dim], np.int64), "shape")
    merge = g.const(np.array([batch, seq, hidden], np.int64), "shape")

    def heads_of(t: str, perm: list[int]) -> str:
        return g.op("Transpose", [g.op("Reshape", [t, split], "reshape")], "transpose", perm=perm)

    q = heads_of(g.linear(x, hidden, hidden), [0, 2, 1, 3])
    k = heads_of(g.linear(x, hidden, hidden), [0, 2, 3, 1])
    v = heads_of(g.linear(x, hidden, hidden), [0, 2, 1, 3])
    scores = g.op("Div", [g.op("MatMul", [q, k], "matmul"),
                          g.const(np.array(math.sqrt(head_dim), np.float32), "scale")], "div")
    probs = g.op("Softmax", [g.op("Add", [scores, mask_bias], "add")], "softmax", axis=-1)
    ctx = g.op("Transpose", [g.op("MatMul", [probs, v], "matmul")], "transpose", perm=[0, 2, 1, 3])
    return g.linear(g.op("Reshape", [ctx, merge], "reshape"), hidden, hidden)


@register_model("bert-mini", "BERT-style encoder (4 layers, hidden 256, seq 128; all options)",
                task="text")
def bert_mini(batch: int = 1, seq: int = 128, hidden: int = 256, layers: int = 4, heads: int = 4,
              intermediate: int | None = None, vocab: int = 30522, seed: int = 0) -> onnx.ModelProto:
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    intermediate = intermediate or 4 * hidden
    g = GraphBuilder("bert_mini", seed)
    word = g.const((0.02 * g.rng.standard_normal((vocab, hidden))).astype(np.float32), "word_emb")
    pos = g.const((0.02 * g.rng.standard_normal((1, seq, hidden))).astype(np.float32), "pos_emb")
    x = _layer_norm(g, g.op("Add", [g.op("Gather", [word, "input_ids"], "embed"), pos], "add"), hidden)

    # (1 - mask) * -10000, broadcast over heads and query positions
    mask = g.op("Cast", ["attention_mask"], "cast", to=onnx.TensorProto.FLOAT)
    mask = g.op("Unsqueeze", [mask, g.const(np.array([1, 2], np.int64), "axes")], "unsqueeze")
    one = g.const(np.array(1.0, np.float32), "one")
    mask_bias = g.op("Mul", [g.op("Sub", [one, mask], "sub"),
                             g.const(np.array(-10000.0, np.float32), "neg")], "mask_bias")

    for _ in range(layers):
        attn = _attention(g, x, mask_bias, batch, seq, hidden, heads)
        x = _layer_norm(g, g.op("Add", [x, attn], "residual"), hidden)
        ffn = g.linear(_gelu(g, g.linear(x, hidden, intermediate, gain=2.0)), intermediate, hidden)
        x = _layer_norm(g, g.op("Add", [x, ffn], "residual"), hidden)
    out = g.op("Identity", [x], "last_hidden_state")
    return g.build([("input_ids", "int64", [batch, seq]), ("attention_mask", "int64", [batch, seq])],
                   [(out, "float32", [batch, seq, hidden])])
