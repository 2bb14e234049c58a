"""llama.cpp's llama-server for `serving.py load`: where its binary is (setup.py builds it beside
llama-bench), the GGUF it serves (Q8_0 made from a checkpoint exactly as `runtimes.py compare` makes it), and
its command line for N slots."""

from __future__ import annotations

from pathlib import Path

from .setup import llama_bin


def binary(work: Path) -> Path:
    return llama_bin(work) / "llama-server"


def gguf_from_checkpoint(checkpoint: Path, work: Path, threads: int, precision: str = "int8") -> Path:
    """The checkpoint as a llama.cpp GGUF (Q8_0 for int8), cached under WORK/models/ and shared with
    `runtimes.py compare`: `edgegpt convert`, convert_hf_to_gguf.py to F32, then llama-quantize."""
    from . import llamacpp
    from .models import Models

    path, _ = Models(checkpoint, work, threads).prepare("llamacpp", precision, llamacpp.prepare)
    return path


def command(server: Path, gguf: Path, slots: int, threads: int, context_per_slot: int) -> list[str]:
    """llama-server on a free loopback port (`--port 0`; it logs `listening on http://127.0.0.1:PORT`).

    `-c` is the KV cache of all slots together (each of the `-np` slots gets c ÷ np unless the cache is
    unified), so it grows with the slot count to give every slot `context_per_slot` positions. Everything
    else is left at llama-server's defaults (continuous batching on; prompt cache on, which the benchmark's
    distinct prompts give nothing to reuse); `-tb` is set with `-t` so prompt batches use the same threads."""
    return [str(server), "-m", str(gguf), "--host", "127.0.0.1", "--port", "0", "-np", str(slots),
            "-c", str(slots * context_per_slot), "-t", str(threads), "-tb", str(threads), "--no-webui"]
