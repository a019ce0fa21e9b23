"""The Streamlit demo (app.py) and ``vmr demo``, which starts it."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

APP = Path(__file__).with_name("app.py")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="an inference bundle or a run directory (default: the quickstart's model)")
    p.add_argument("--port", type=int, default=8501, help="local port (default 8501)")


def run(args: argparse.Namespace) -> int:
    command = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(args.port),
               "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    if args.checkpoint:
        from vmr.eval.predict import resolve_bundle

        command += ["--", "--checkpoint", str(resolve_bundle(args.checkpoint))]
    print(f"vmr demo: open http://localhost:{args.port}", file=sys.stderr)
    return subprocess.call(command)
