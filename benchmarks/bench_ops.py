"""Time the operation layouts `mola.layer` chooses against the ones autograd or the obvious code would use.

    python benchmarks/bench_ops.py                  # bf16, 2048 tokens (16x128), SmolLM2's widths, 1 thread
    python benchmarks/bench_ops.py --threads 2 --json ops.json

Each row is one choice made in `mola.layer`, timed both ways on the same random tensors (median of `--repeats`
runs of `--inner` calls each, interleaved):
- weight gradient of a thin matmul: x^T g with the large x transposed (what autograd forms) vs g^T x with the
  thin g^T made contiguous (`_Adapters`);
- gating: hidden (tokens, experts, rank) times gates broadcast over the rank vs gates expanded to hidden's
  shape first (`_Adapters`);
- routing softmax and top-k over a last dimension of `--experts` vs over the first, tokens contiguous
  (`_route`);
- dropout on an input: a multiply by keep-multipliers (0 or 1/(1-p), the input's dtype) vs an AND of keep-bits
  (`DropoutPool`, `keep`);
- the adapter's thin A matmul vs a base projection of the same input to `--base-out` columns (what the adapters cost
  against their FLOPs);
- with `--compile-routing`: the routing of a block of 3 members (q/k/v), forward and backward (`_route`,
  `_route_backward`), eager vs `torch.compile`d (inductor, static shapes; needs a C compiler; compiling is not timed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def _time(fn: Callable[[], object], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048, help="rows of every activation (batch x sequence)")
    ap.add_argument("--widths", default="576,1536", help="input widths d_in (SmolLM2: hidden 576, MLP 1536)")
    ap.add_argument("--base-out", type=int, default=576,
                    help="the base projection's output width (SmolLM2's o and down: 576)")
    ap.add_argument("--experts", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=20, help="calls per timed run")
    ap.add_argument("--compile-routing", action="store_true",
                    help="also time the routing eager vs torch.compile'd (compiles first, which takes a while)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    t, e, r, k = args.tokens, args.experts, args.rank, args.top_k

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    pairs: dict[str, tuple[str, Callable[[], object], str, Callable[[], object]]] = {}
    for d in (int(w) for w in args.widths.split(",")):
        x, g, a, w = rand(t, d), rand(t, e * r), rand(e * r, d), rand(args.base_out, d)
        pairs[f"weight gradient, d_in {d}"] = ("x^T g", lambda x=x, g=g: x.t() @ g,
                                               "g^T x, g^T contiguous", lambda x=x, g=g: g.t().contiguous() @ x)
        multipliers = (torch.rand(t, d, generator=gen) >= 0.05).to(dtype) / 0.95
        bits = (torch.rand(t, d, generator=gen) >= 0.05).to({2: torch.int16, 4: torch.int32}[x.element_size()]).neg()
        pairs[f"dropout, d_in {d}"] = ("x * keep-multipliers", lambda x=x, m=multipliers: x * m,
                                       "keep-bits AND", lambda x=x, b=bits: torch.bitwise_and(x.view(b.dtype), b))
        pairs[f"A matmul vs base projection, d_in {d}"] = (
            f"x A^T ({e * r} columns)", lambda x=x, a=a: torch.nn.functional.linear(x, a),
            f"x W^T ({args.base_out} columns)", lambda x=x, w=w: torch.nn.functional.linear(x, w))
    hidden, gates = rand(t, e * r), rand(t, e)
    pairs["gating"] = ("broadcast over rank", lambda: hidden.view(t, e, r) * gates.unsqueeze(-1),
                       "gates expanded first",
                       lambda: hidden * gates.unsqueeze(-1).expand(t, e, r).reshape(t, e * r))
    logits = torch.randn(t, e, generator=gen)
    logits_t = logits.t().contiguous()
    pairs["routing softmax"] = ("(tokens, experts), last dim", lambda: logits.softmax(-1),
                                "(experts, tokens), first dim", lambda: logits_t.softmax(0))
    pairs["routing top-k"] = ("(tokens, experts), last dim", lambda: logits.topk(k, dim=-1),
                              "(experts, tokens), first dim", lambda: logits_t.topk(k, dim=0))
    if args.compile_routing:
        from mola_search.mola.layer import _route, _route_backward

        block_logits, g_gates, g_sum = rand(t, 3 * e), rand(t, 3 * e), torch.randn(3, e, 1, generator=gen)

        def routing(route: Callable, backward: Callable) -> Callable[[], object]:
            def step() -> object:
                probs, top_i, top_w, total, _ = route(block_logits, 3, k, torch.float32)
                return backward(g_gates, g_sum, None, probs, top_i, top_w, total, 2.0)
            return step

        compiled = routing(torch.compile(_route, dynamic=False), torch.compile(_route_backward, dynamic=False))
        compiled()  # compiles
        pairs["routing, 3 members, forward and backward"] = ("eager", routing(_route, _route_backward),
                                                             "torch.compile", compiled)

    results = {}
    print(f"{args.dtype}, {t} tokens, {args.threads} thread(s), median of {args.repeats} x {args.inner} calls")
    for name, (a_name, a_fn, b_name, b_fn) in pairs.items():
        a_fn(), b_fn()  # warm-up: kernels and oneDNN primitives
        times_a, times_b = [], []
        for _ in range(args.repeats):
            times_a.append(_time(a_fn, args.inner))
            times_b.append(_time(b_fn, args.inner))
        ma, mb = statistics.median(times_a), statistics.median(times_b)
        results[name] = {a_name: ma * 1e3, b_name: mb * 1e3, "ratio": ma / mb}
        print(f"{name:<40} {a_name:<28} {ma * 1e3:8.3f} ms   {b_name:<28} {mb * 1e3:8.3f} ms   ratio {ma / mb:5.2f}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
