"""The Streamlit demo (app.py) and ``vmr demo``, which starts it."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from vmr.errors import UserError

APP = Path(__file__).with_name("app.py")
DEFAULT_MAX_MB = 200.0


def upload_limit_mb(value: str | None = None) -> float:
    """The upload limit in MB: ``value``, else ``VMR_DEMO_MAX_MB``, else 200."""
    raw = value if value is not None else os.environ.get("VMR_DEMO_MAX_MB")
    if raw is None or raw == "":
        return DEFAULT_MAX_MB
    try:
        limit = float(raw)
    except ValueError:
        limit = float("nan")
    if not (limit > 0 and limit < 1e6):
        raise UserError(f"VMR_DEMO_MAX_MB / --max-upload-mb: {raw!r} is not a size in MB (e.g. 200)")
    return limit


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="an inference bundle or a run directory (default: the quickstart's model)")
    p.add_argument("--index", type=Path, help="an index made by 'vmr index': adds a page that searches the collection")
    p.add_argument("--port", type=int, default=8501, help="local port (default 8501)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--max-upload-mb", help="largest upload in MB (default: $VMR_DEMO_MAX_MB, else 200)")


def run(args: argparse.Namespace) -> int:
    limit = upload_limit_mb(args.max_upload_mb)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1-65535, got {args.port}")
    # An empty address makes the server listen on every interface: that must be asked for by name.
    if not args.host.strip() or any(c.isspace() for c in args.host):
        raise UserError(f"--host must be an address or host name (127.0.0.1, or 0.0.0.0 for every interface), "
                        f"got {args.host!r}")
    # Streamlit enforces its own upload cap (whole MB); the app checks the exact limit.
    command = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(args.port),
               "--server.address", args.host, "--server.maxUploadSize", str(max(1, math.ceil(limit))),
               "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    extra = []
    if args.checkpoint:
        from vmr.bundle import resolve_bundle

        extra += ["--checkpoint", str(resolve_bundle(args.checkpoint))]
    if args.index is not None:
        from vmr.search import read_index

        read_index(args.index)  # a missing or damaged index: one line now, not a page later
        extra += ["--index", str(args.index.resolve())]
    if extra:
        command += ["--", *extra]
    os.environ["VMR_DEMO_MAX_MB"] = f"{limit:g}"
    shown = "localhost" if args.host in ("127.0.0.1", "localhost") else args.host
    print(f"vmr demo: open http://{shown}:{args.port}", file=sys.stderr)
    sys.stderr.flush()
    # Become Streamlit (same process): a SIGTERM or Ctrl-C for `vmr demo` reaches the server itself.
    os.execv(sys.executable, command)
    return 0  # not reached
