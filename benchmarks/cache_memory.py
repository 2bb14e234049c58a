"""What a sequence's KV cache holds after N tokens, measured on the runtime's own buffers: a package with
sliding-window layers (Gemma 3) keeps window-sized buffers for those (runtime/kv_cache.py), against the bytes a
full cache of every layer would take.

    python benchmarks/cache_memory.py PACKAGE [--tokens 8192] [--chunk 512]
    python benchmarks/cache_memory.py --smoke      (a tiny random sliding model it makes itself)

The tokens are fed in chunks (a long prompt), random ids: what the cache holds does not depend on them. Prints
a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def cache_bytes(cache, dtype: str) -> int:
    """Bytes of the buffers a static-layout cache of `dtype` holds (every layer's K and V, at their capacity)."""
    return sum(int(np.prod(value.shape())) for value in cache.tensors.values()) * np.dtype(dtype).itemsize


def measure(package: Path, tokens: int, chunk: int) -> dict:
    from edgegpt.runtime import Generator

    generator = Generator.load(package, "cpu", max_length=None, draft=None)
    spec, graph = generator.package.model, generator.package.graph
    if tokens > generator.max_length:
        raise SystemExit(f"{package} holds at most {generator.max_length} tokens")
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, tokens).tolist()
    cache = generator.empty_cache()
    start = time.perf_counter()
    for begin in range(0, tokens, chunk):
        _, cache = generator.forward(ids[begin : begin + chunk], cache)
    seconds = time.perf_counter() - start
    itemsize = np.dtype(graph.dtype).itemsize
    # A full cache as the runtime would hold it: every layer at the capacity its full layers grew to.
    sliding = set(graph.kv_cache.get("sliding_layers", ()))
    grown = [cache.tensors[graph.past_names(layer)[0]].shape()[2] for layer in range(spec.n_layers)
             if layer not in sliding]
    full = spec.n_layers * 2 * spec.n_kv_heads * max(grown, default=tokens) * spec.head_dim * itemsize
    held = cache_bytes(cache, graph.dtype)
    window = graph.kv_cache.get("sliding_window")
    return {"package": str(package), "tokens": tokens, "cache_dtype": graph.dtype, "n_layers": spec.n_layers,
            "sliding_layers": len(graph.kv_cache.get("sliding_layers", ())), "sliding_window": window,
            "held_bytes": held, "full_cache_bytes": full, "ratio": held / full, "seconds": round(seconds, 1),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def smoke_package(directory: Path) -> Path:
    """A tiny random Gemma-shaped fused package (sliding layers with a window of 16)."""
    import torch

    from edgegpt.core.config import ModelConfig
    from edgegpt.export.fused import build_fused_graph, fused_graph_contract
    from edgegpt.export.writer import write_package_metadata
    from edgegpt.model import GPT
    from edgegpt.tokenizer import train_tokenizer

    cfg = ModelConfig(vocab_size=300, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=128, max_len=1024,
                      sliding_window=16, layer_types=("sliding_attention", "full_attention", "sliding_attention"))
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    tokenizer = train_tokenizer(["a small text to learn a few merges from " * 50], 300)
    build_fused_graph(model, directory / "model.onnx")
    write_package_metadata(directory, cfg=cfg, tokenizer=tokenizer, graph=fused_graph_contract(cfg))
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", type=Path)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--smoke", action="store_true", help="a tiny random sliding model, 600 tokens")
    args = parser.parse_args(argv)
    if args.smoke:
        with tempfile.TemporaryDirectory() as work:
            row = measure(smoke_package(Path(work)), 600, 128)
            assert row["held_bytes"] < row["full_cache_bytes"], row
    elif args.package is None:
        parser.error("give a package directory, or --smoke")
    else:
        row = measure(args.package, args.tokens, args.chunk)
    print(f"{row['tokens']} tokens, {row['sliding_layers']} of {row['n_layers']} layers sliding "
          f"(window {row['sliding_window']}): cache {row['held_bytes'] / 2**20:.1f} MiB held, "
          f"{row['full_cache_bytes'] / 2**20:.1f} MiB for a full cache ({row['ratio']:.2f}x); "
          f"{row['seconds']} s, peak RSS {row['peak_rss_mib']} MiB", file=sys.stderr)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
