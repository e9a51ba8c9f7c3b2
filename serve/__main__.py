"""``python -m serve``: the HTTP service and its page, on 127.0.0.1:8000 by default.

Loads a run (the shipped ``shapes`` demo unless --checkpoint says otherwise) once, then serves the JSON API
(/v1/...), the page (/) and the API docs (/docs) with uvicorn until interrupted. Every request's candidates
are decoded in shared batches (serve/scheduler.py). Bad flags end with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys

from cli import ArgumentParser, UserError, add_threads_argument, run_command, set_threads
from sample.pipeline import Pipeline, resolve_run
from serve.schemas import Limits


def build_parser() -> argparse.ArgumentParser:
    limits = Limits()
    parser = ArgumentParser(prog="python -m serve", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a run directory, or a shipped run's name: shapes (the default) or "
                                             "openmoji")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the "
                             "network, with no authentication)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--no-rerank", action="store_true", help="keep the first candidates, no scorer")
    parser.add_argument("--max-n", type=int, default=limits.max_n,
                        help=f"most candidates one request may ask for (default {limits.max_n})")
    parser.add_argument("--max-rows", type=int, default=limits.max_rows,
                        help=f"decoder rows decoded at once, the KV cache's slots; a guided candidate takes two "
                             f"(default {limits.max_rows})")
    parser.add_argument("--max-queue", type=int, default=limits.max_queue,
                        help=f"requests waiting for rows before more are refused with 429 (default {limits.max_queue})")
    parser.add_argument("--max-body", type=int, default=limits.max_body_bytes,
                        help=f"largest request body in bytes (default {limits.max_body_bytes})")
    parser.add_argument("--timeout", type=float, default=limits.timeout_s,
                        help=f"seconds before an unanswered request is dropped with 408 (default {limits.timeout_s:g})")
    add_threads_argument(parser)
    return parser


def limits_from(args: argparse.Namespace) -> Limits:
    """The flags as Limits; a UserError naming the flag for a value that cannot work."""
    for flag, value in (("--max-n", args.max_n), ("--max-rows", args.max_rows), ("--max-body", args.max_body)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.max_queue < 0:
        raise UserError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not args.timeout > 0:
        raise UserError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.max_n > args.max_rows:
        raise UserError(f"--max-n {args.max_n} does not fit --max-rows {args.max_rows}; raise --max-rows")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be from 0 to 65535, got {args.port}")
    try:
        ipaddress.ip_address(args.host)
    except ValueError:
        if args.host != "localhost":
            raise UserError(f"--host {args.host} is not an IP address; use 127.0.0.1 (this machine) or 0.0.0.0") from None
    return Limits(max_n=args.max_n, max_rows=args.max_rows, max_queue=args.max_queue, max_body_bytes=args.max_body,
                  timeout_s=args.timeout)


def run(args: argparse.Namespace) -> None:
    import uvicorn

    from serve.app import create_app  # FastAPI: the serve extra

    set_threads(args.threads)
    limits = limits_from(args)
    print(f"loading {resolve_run(args.checkpoint)}", file=sys.stderr)
    pipeline = Pipeline(args.checkpoint, device=args.device, rerank=not args.no_rerank)
    app = create_app(pipeline, limits)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((args.host, args.port))
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror}; pick another --port") from None
    host, port = listener.getsockname()[:2]
    url_host = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"serving on http://{url_host}:{port}/ (the page; the API at /docs)", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[listener])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
