"""``python -m sample "a red circle above a blue square"``: prompts to PNG files.

Draws --n candidates per prompt, keeps the best --keep by the CLIP-style scorer (its best --shortlist
re-ordered by the decoder's likelihood of each picture given the prompt), and writes the kept
pictures (``<prompt>-seed<seed>.png``, with the prompt, seed, rank, settings and score in PNG text
chunks), a labelled grid of the candidates with the kept ones framed, and samples.jsonl, under --out;
each kept picture's path, seed, rank and score go to stdout. Prompts of --prompts-file are drawn
--batch-size at a time, each prompt's files written as soon as its batch is done. Bad input ends with
one line and exit status 2.

Edits: ``--init PICTURE --keep-rows R`` keeps its first R rows of tokens and draws the rest (completion);
``--init PICTURE --mask MASK`` (white = redraw) or ``--box x0,y0,x1,y1`` redraws what it marks (inpainting).
``--preview K`` writes an animated WebP of the decoding, a frame every K tokens, beside each kept picture.
``--width W --height H`` (pixels, multiples of the token size) draw a larger canvas with a sliding window.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from tqdm import tqdm

from cli import ArgumentParser, UserError, add_threads_argument, run_command, set_threads
from sample.output import prepare_out_dir, write_prompt_results
from sample.pipeline import MAX_CANDIDATES, Pipeline, SamplingSettings, make_edit, resolve_run

BATCH_CANDIDATES = 64  # the default --batch-size keeps a batch's candidates near this: one pass of the pipeline
MAX_PROMPTS_BYTES = 64 << 20  # a --prompts-file larger than this is not a list of prompts (or never ends)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m sample", description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", help="what to draw")
    parser.add_argument("--prompts-file", help="one prompt a line")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"prompts drawn together (default: {BATCH_CANDIDATES} // --n, at least 1); each "
                             "prompt's pictures are written when its batch is done")
    parser.add_argument("--checkpoint", help="a run directory, or a shipped run's name: shapes (the default) or "
                                             "openmoji")
    parser.add_argument("--n", type=int, default=16, help="candidates per prompt (default 16)")
    parser.add_argument("--keep", type=int, default=None,
                        help="pictures kept per prompt, best by the scorer (default: 4, or --n if fewer)")
    defaults = SamplingSettings
    parser.add_argument("--top-k", type=int, default=defaults.top_k,
                        help=f"sample among the K likeliest tokens (default {defaults.top_k or 'off'})")
    parser.add_argument("--top-p", type=float, default=defaults.top_p,
                        help=f"sample among the smallest set with mass P (default {defaults.top_p or 'off'}; "
                             f"1 turns it off)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help=f"divides the logits (default {defaults.temperature:g})")
    parser.add_argument("--cfg", type=float, default=defaults.cfg,
                        help=f"classifier-free guidance scale, 1 = off (default {defaults.cfg:g})")
    parser.add_argument("--seed", type=int, default=0, help="candidate j has seed SEED+j")
    parser.add_argument("--speculative", type=int, default=defaults.speculative, metavar="W",
                        help="verify a window of W drafted tokens per decoder pass (speculative Jacobi decoding, "
                             "2 to the picture's tokens): the same distribution in fewer passes, other pictures "
                             "for a seed than without; 0 = off (default)")
    parser.add_argument("--out", default="samples", help="output directory (default ./samples)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to sample; auto (default): CUDA when one is visible, else the CPU")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="precision the models run in; auto (default): fp32 on a CPU, where half precision "
                             "measured 2.6x (bf16) and 4.3x (fp16) slower, bf16 (else fp16) on CUDA")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                        help="compile the decode step; auto (default): when the passes left would save more than "
                             "compiling costs, by timings measured on this machine (a one-prompt job on a CPU "
                             "stays eager); on: always (the first compile takes about a minute, later runs load it)")
    parser.add_argument("--no-rerank", action="store_true", help="keep the first candidates, no scorer")
    parser.add_argument("--reranker", help="a local directory holding a transformers CLIPModel to rerank with")
    parser.add_argument("--shortlist", type=int, default=defaults.shortlist, metavar="K",
                        help="re-order the scorer's best K candidates by the decoder's likelihood of each picture "
                             f"given the prompt (default {defaults.shortlist}; 1 = the scorer alone; new pictures "
                             "only, edits and wider canvases rank as before)")
    edit = parser.add_argument_group("edit a picture")
    edit.add_argument("--init", metavar="PICTURE", help="start from this picture (the run's size, e.g. 64x64)")
    edit.add_argument("--keep-rows", type=int, metavar="R", help="keep its first R rows of tokens, draw the rest")
    edit.add_argument("--mask", metavar="MASK", help="a picture of --init's size: white = redraw, black = keep")
    edit.add_argument("--box", metavar="x0,y0,x1,y1", help="redraw this box, in pixels (x1, y1 excluded)")
    edit.add_argument("--likelihood-weight", type=float, default=defaults.likelihood_weight,
                      help="inpainting: weight of the likelihood of what follows the hole beside the scorer "
                           f"(default {defaults.likelihood_weight:g}; 0 = scorer only)")
    parser.add_argument("--width", type=int, help="canvas width in pixels, a multiple of the token size (default: the "
                                                  "run's size; larger draws with a sliding window)")
    parser.add_argument("--height", type=int, help="canvas height in pixels, likewise")
    parser.add_argument("--preview", type=int, metavar="K",
                        help="write an animated WebP of the decoding beside each kept picture, a frame every K tokens")
    add_threads_argument(parser)
    return parser


def batch_size(args: argparse.Namespace, n: int) -> int:
    """Prompts per batch: --batch-size, else as many as keep a batch near BATCH_CANDIDATES candidates."""

    if args.batch_size is None:
        return max(1, BATCH_CANDIDATES // n)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.batch_size * n > MAX_CANDIDATES:
        raise UserError(f"--batch-size {args.batch_size} x --n {n} is {args.batch_size * n} candidates held at once, "
                        f"more than {MAX_CANDIDATES}; lower --batch-size")
    return args.batch_size


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = [args.prompt] if args.prompt is not None else []
    if args.prompts_file:
        path = Path(args.prompts_file)
        if path.exists() and not path.is_file():  # /dev/zero, a FIFO, a folder: it may never end
            raise UserError(f"--prompts-file {path} is not a regular file; write the prompts to a file, one a line")
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_PROMPTS_BYTES + 1)
            if len(data) > MAX_PROMPTS_BYTES:
                raise UserError(f"--prompts-file {path} is over {MAX_PROMPTS_BYTES >> 20} MB; split it into smaller "
                                "files")
            lines = data.decode("utf-8-sig").splitlines()  # a byte-order mark is not part of the first prompt
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompts-file {path}: {getattr(e, 'strerror', None) or e}") from None
        prompts += [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise UserError(f"--prompts-file {path} has no prompts; write one prompt a line")
    if not prompts:
        raise UserError('no prompt given; run e.g. python -m sample "a large red circle"')
    return prompts


def run(args: argparse.Namespace) -> list[dict]:


    set_threads(args.threads)
    prompts = read_prompts(args)
    keep = args.keep if args.keep is not None else min(4, max(args.n, 1))
    settings = SamplingSettings(n=args.n, keep=keep, top_k=args.top_k, top_p=args.top_p,
                                temperature=args.temperature, cfg=args.cfg, seed=args.seed,
                                rerank=not args.no_rerank, shortlist=args.shortlist,
                                likelihood_weight=args.likelihood_weight,
                                speculative=args.speculative)
    if args.preview is not None and args.preview < 1:
        raise UserError(f"--preview must be >= 1 tokens between frames, got {args.preview}")
    batch = batch_size(args, settings.n)
    out = prepare_out_dir(args.out)
    print(f"loading {resolve_run(args.checkpoint)} (tokenizer, VQGAN, seq2seq"
          + ("" if args.no_rerank else ", scorer") + ")", file=sys.stderr)
    pipeline = Pipeline(args.checkpoint, device=args.device, rerank=not args.no_rerank, reranker=args.reranker,
                        dtype=args.dtype, compile=args.compile)
    edit = make_edit(pipeline, args.init, keep_rows=args.keep_rows, mask=args.mask, box=args.box)
    size = None if args.width is None and args.height is None else (args.width or pipeline.canvas_size,
                                                                    args.height or pipeline.canvas_size)
    pipeline.canvas_tokens(size)  # checked before any drawing
    records = []
    # One prompt: the pipeline's own bar (decoding steps, or candidates); several: a bar over the prompts.
    with tqdm(total=len(prompts), desc="prompts", unit="prompt", file=sys.stderr, disable=len(prompts) == 1) as bar:
        for start in range(0, len(prompts), batch):
            after = max(0, len(prompts) - start - batch) * settings.n
            for candidates in pipeline(prompts[start:start + batch], settings, progress=len(prompts) == 1, edit=edit,
                                       preview_every=args.preview, size=size, candidates_after=after):
                written = write_prompt_results(out, candidates)
                records += written
                for record in written:
                    score = "" if record["score"] is None else f"  score {record['score']:.3f}"
                    if record.get("likelihood") is not None:  # what ordered it: the shortlist's, or an inpainting's
                        score += f"  likelihood {record['likelihood']:.3f}"
                    tqdm.write(f"{out / record['file']}  seed {record['seed']}  rank {record['rank']}{score}",
                               file=sys.stdout)
                bar.update(1)
    return records


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, *rest: f"warning: {message}\n"
    try:
        return run_command(lambda: run(args))
    except BrokenPipeError:
        # stdout closed early (``| head -1``): stop like any Unix tool, quietly, with 128 + SIGPIPE. Python's
        # final flush of stdout would fail again, so it goes to /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


if __name__ == "__main__":
    sys.exit(main())
