"""Whether to compile the decode step, decided by what it measures.

Compiling (:func:`seq2seq.generate.compiled`) makes every later step cheaper and costs a first call: a compile
the first time a machine sees a (model, batch size), a load from the kernel cache after that. Whether that
pays depends on the device, the batch and how much decoding is left, so ``auto`` decides pass by pass from
timings measured here and kept beside the kernels (``decode_timings.json`` in the compile cache):

- a pass's eager time for this many rows, measured (the first plain pass of a job runs eagerly, once, when
  no earlier run has measured it);
- its compiled time and the first call's cost (a compile, or a load of the kernels a compile left),
  measured by earlier compiled runs, or until then the priors below, measured on a 2-core CPU without AMX
  (BENCHMARKS.md, "Compiling where it pays");

and compiles when the passes left of that size would save more than the first call costs. Compiled and eager
steps draw the same ids (tests/test_autocompile.py), so switching within a job changes no picture.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import WriteError, read_json_or_empty, write_json
from seq2seq.generate import can_compile, compile_cache

__all__ = ["COMPILE_MODES", "CompileChoice", "LOAD_SHARE", "PRIORS", "prior_ratio"]

COMPILE_MODES = ("auto", "on", "off")

# Before a machine has measured a compiled pass: compiled time over eager time by decoder rows (the entry of
# the most rows not above a pass's), and the first call's cost in seconds. CPU: the shapes demo (64 tokens,
# guided) on a 2-core CPU without AMX, one thread, eager and compiled passes interleaved: 2 rows 0.70, 8 rows
# 0.74, 32 rows 0.87, 128 rows 0.94; a first compile took 29-50 s there, the small preset's 70 s (a load from
# the kernel cache 5-8 s). CUDA: not measured (no GPU lent); a CUDA graph takes out the launch overhead that
# dominates a small step, so the prior ratio is lower, and the cost a guess.
PRIORS = {"cpu": (((1, 0.70), (8, 0.74), (32, 0.87), (128, 0.94)), 60.0),
          "cuda": (((1, 0.5),), 60.0)}
# A later process's first call loads the kernels a compile left in the cache: on that CPU the load took 0.12-0.16
# of the compile (8.2 s against 50.4, 4.6 against 35.5, 8.4 against 70).
LOAD_SHARE = 0.16


def prior_ratio(device: torch.device, rows: int) -> float:
    """The prior compiled-over-eager time of a pass of ``rows`` decoder rows on ``device``'s kind."""
    table = PRIORS.get(device.type, PRIORS["cpu"])[0]
    return [ratio for least, ratio in table if least <= rows or least == table[0][0]][-1]


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{model}:{torch.get_num_threads()} threads"


class CompileChoice:
    """``mode`` (auto, on, off) for one model on one device: :meth:`decide` before a pass, :meth:`record` after.

    ``path`` is the timings file (default: ``decode_timings.json`` in the compile cache); a damaged or
    unwritable file only costs the measurements, never the run.
    """

    def __init__(self, mode: str, device: torch.device, model: torch.nn.Module, dtype: torch.dtype | None = None,
                 path: str | Path | None = None):
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
        self.mode, self.device = mode, device
        self.path = Path(path) if path is not None else compile_cache() / "decode_timings.json"
        config = json.dumps(asdict(model.config), sort_keys=True, default=str)
        digest = hashlib.sha256(config.encode()).hexdigest()[:16]
        self.key = f"{_machine(device)}|torch {torch.__version__}|{dtype or 'fp32'}|model {digest}"
        # Row counts compiled in this process: no first call left to pay. (Other sampling settings in a later
        # call recompile the step: torch.compile's guards see them; such a call is priced as warm.)
        self.warm: set[int] = set()
        self.said: set[int] = set()

    def timings(self, rows: int) -> dict:
        """What was measured for passes of ``rows`` rows: ``eager_s``, ``compiled_s`` and the first compiled
        call of a process, ``compile_s`` (the first one that machine made) and ``load_s`` (the latest after it)."""
        return self._entry(read_json_or_empty(self.path), rows)

    def _entry(self, table: dict, rows: int) -> dict:
        entries = table.get(self.key)
        entry = entries.get(str(rows)) if isinstance(entries, dict) else None
        if not isinstance(entry, dict):
            return {}
        return {k: float(v) for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and v > 0}

    def decide(self, rows: int, passes_left: int) -> bool:
        """Compile the pass of ``rows`` rows, with ``passes_left`` passes of that size to go (this one included)?"""
        if self.mode != "auto":
            return self.mode == "on"
        if not can_compile(self.device):
            return False
        known = self.timings(rows)
        eager = known.get("eager_s")
        if eager is None:
            return False  # this pass measures it
        cost = PRIORS.get(self.device.type, PRIORS["cpu"])[1]
        compiled = known.get("compiled_s", eager * prior_ratio(self.device, rows))
        if rows in self.warm:
            return compiled < eager
        if "load_s" in known:
            cost = known["load_s"] - compiled
        elif "compile_s" in known:
            cost = known["compile_s"] * LOAD_SHARE - compiled
        cost = max(0.0, cost)
        pays = passes_left * (eager - compiled) > cost
        if pays and rows not in self.said:
            self.said.add(rows)
            tqdm.write(f"sample: compiling the decode step for {rows} rows ({passes_left} passes left at {eager:.2f} "
                       f"s eager, about {compiled:.2f} s compiled; the first call costs about {cost:.0f} s, later "
                       "runs load it; --compile off to skip)", file=sys.stderr)  # above any progress bar
        return pays

    def record(self, rows: int, compiled: bool, seconds: float) -> None:
        """Keep a pass's measured time: eager, compiled, or a process's first compiled call (compile or load)."""
        table = read_json_or_empty(self.path)  # once: other processes' entries are kept as they are
        entry = self._entry(table, rows)
        if not compiled:
            entry["eager_s"] = min(seconds, entry.get("eager_s", seconds))
        elif rows not in self.warm:
            self.warm.add(rows)
            entry["load_s" if "compile_s" in entry else "compile_s"] = seconds
        else:
            entry["compiled_s"] = min(seconds, entry.get("compiled_s", seconds))
        if not isinstance(table.get(self.key), dict):
            table[self.key] = {}
        table[self.key][str(rows)] = entry
        try:
            write_json(self.path, table)
        except (OSError, WriteError):
            pass
