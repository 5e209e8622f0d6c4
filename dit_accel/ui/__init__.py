"""The Gradio UI: `dit-accel ui` or `python -m dit_accel.ui` (see `app.py`)."""

from __future__ import annotations

import argparse

import torch

from ..cli_options import DTYPES
from ..loading import UsageError, default_model
from .app import DEFAULT_MODELS, Limits, build_app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dit-accel ui", description="Serve the side-by-side comparison page.")
    parser.add_argument("--model", help="model shown first: hub id, local folder, tiny:<family>, "
                        "medium:sd3|wan|pixart or reference:image|detail|video (default: the embedded reference image model)")
    parser.add_argument("--models", nargs="+", help="the only models served (required with a --host beyond "
                        "localhost; weights from safetensors only)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    models = args.models or None
    if args.model:
        models = [args.model, *[m for m in (models or DEFAULT_MODELS) if m != args.model]]
    elif models is None:
        first = default_model()
        models = [first, *[m for m in DEFAULT_MODELS if m != first]] if args.host in ("127.0.0.1", "localhost") \
            else None
    try:
        app = build_app(models, host=args.host, device=args.device, dtype=DTYPES[args.dtype])
    except UsageError as error:
        parser.exit(2, f"dit-accel ui: error: {error}\n")
    app.launch(server_name=args.host, server_port=args.port)
    return 0


__all__ = ["Limits", "build_app", "main"]
