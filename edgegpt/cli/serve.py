"""`edgegpt serve`: a model package behind an OpenAI-compatible HTTP API (edgegpt/server, the [serve] extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgegpt.cli.errors import user_errors
from edgegpt.cli.options import (
    DraftOption,
    LookupOption,
    MaxLengthOption,
    NoSpeculationOption,
    Provider,
    ProviderOption,
    speculation,
)
from edgegpt.core import workspace


def serve(
    model: Optional[Path] = typer.Argument(None, help="Model package. Default: $EDGEGPT_HOME/model."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on. The default is reachable from this "
                             "machine only; anything else should have an --api-key."),
    port: int = typer.Option(8080, help="TCP port (0: any free one; the address is printed when ready)."),
    parallel: int = typer.Option(4, help="Requests generated at the same time, each with its own cache, "
                                 "decoded together in one batch (a fused CPU package) on the one loaded model."),
    max_queue: int = typer.Option(8, help="Requests that may wait for a free slot; beyond that: 503."),
    api_key: Optional[str] = typer.Option(None, envvar="EDGEGPT_API_KEY", show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' on the API."),
    model_name: Optional[str] = typer.Option(None, help="The model's id in the API (default: the package "
                                             "folder's name)."),
    max_body_bytes: int = typer.Option(1 << 20, help="Largest request body accepted (413 beyond)."),
    shutdown_timeout: float = typer.Option(10.0, help="Seconds running requests get to finish on SIGTERM "
                                           "or Ctrl-C before they are cancelled."),
    provider: ProviderOption = Provider.auto,
    threads: Optional[int] = typer.Option(None, help="onnxruntime threads (default: physical cores)."),
    max_length: MaxLengthOption = None,
    draft: DraftOption = None,
    lookup: LookupOption = False,
    no_speculation: NoSpeculationOption = False,
) -> None:
    """Serve a model package over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /v1/models, /health), for apps in any language. Needs the \\[serve] extra. With a draft (or --lookup) each
    slot guesses ahead on its own instead of the slots sharing a batch: speculation speeds up one request
    at a time, batching many at once."""
    with user_errors("serve", needs=("starlette", "uvicorn")):
        from edgegpt.server import serve as run_server

        draft, lookup = speculation(draft, lookup, no_speculation)
        run_server(model or workspace.model_dir(), host=host, port=port, parallel=parallel, max_queue=max_queue,
                   api_key=api_key, model_name=model_name, max_body_bytes=max_body_bytes,
                   shutdown_timeout=shutdown_timeout, provider=provider.value, threads=threads, max_length=max_length,
                   draft=draft, lookup=lookup)
