"""Continuous batching: every request's candidates decoded together, one image token a step.

One thread owns the model. The decoder's key/value caches are preallocated for ``max_rows`` rows and handed
out as slots: a request of n candidates takes n rows, 2n with classifier-free guidance (a conditional and
an unconditional row per candidate, as in :func:`seq2seq.generate.generate`). At every step boundary the
scheduler admits waiting requests whose rows fit (:meth:`Seq2Seq.prefill_slots` encodes the prompt into
the new rows, which then read ``bos`` at position 0), runs one :meth:`Seq2Seq.decode_one_token` over all
rows with per-row positions (rows of different requests are at different steps), and draws every
candidate's token with the same :class:`seq2seq.generate.Sampler` and seed scheme as ``generate``: the
draw of candidate j at step t depends on its seed and t only. Finished requests leave; the last rows move
into their slots, so the batch is always the caches' first rows (Orca, Yu et al. 2022; vLLM's scheduler).

Edits (sample/edit.py: completion, inpainting) share the batch with plain requests: an edited job's rows
carry its picture's ids and keep mask, and at every step a kept position takes the given id instead of the
one drawn (the draw is made and discarded, as :class:`seq2seq.generate.Forcing` does), while the
log-likelihood of the kept ids after the hole is summed for the ranking. ``generate`` reads the leading run
of kept ids in its prefill; here they are read one a step like any other, which gives the same logits.

A picture served for (prompt, seed, settings, edit) is therefore the picture ``sample.generate_images``
draws for them, whoever else is being served. A second thread draws the pictures while decoding goes on:
finished ids go through the same :meth:`Pipeline.render` (VQGAN, scorer) and ranking as ``python -m
sample`` (the ranking's teacher-forced likelihood reads the model's weights, never the decoding caches, so
it runs beside the decoding thread); previews decode the ids known so far (drawn or kept) with the VQGAN,
the others painted grey.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from data.images import to_pil
from sample.edit import Edit, preview_images
from sample.pipeline import Picture, Pipeline, SamplingSettings
from seq2seq.generate import EMPTY_TEXT_IDS, Sampler, with_unconditional

__all__ = ["Job", "QueueFull", "Scheduler"]


class QueueFull(Exception):
    """More requests are waiting than the queue holds."""


@dataclass(eq=False)
class Job:
    """One request: a prompt's n candidates, from waiting to finished.

    ``on_event(kind, payload)`` is called from the scheduler's thread: ``("started", {})``,
    ``("preview", {"step", "of", "images"})`` every ``preview_every`` tokens when set, then ``("done",
    {"pictures"})`` (every candidate, best first) or ``("error", {"message"})``. ``edit`` starts every
    candidate from its picture (completion or inpainting).
    """

    prompt: str
    settings: SamplingSettings
    on_event: Callable[[str, dict], None]
    preview_every: int | None = None
    edit: Edit | None = None
    text_ids: torch.Tensor | None = None  # (1, L), set by the scheduler
    text_mask: torch.Tensor | None = None
    step: int = 0  # the image token drawn next
    cancelled: bool = False
    truncated: bool = False  # the prompt was longer than the model reads
    created: float = field(default_factory=time.monotonic)

    @property
    def guided(self) -> bool:
        return self.settings.cfg != 1.0

    @property
    def rows_needed(self) -> int:
        return self.settings.n * (2 if self.guided else 1)

    @property
    def group_key(self) -> tuple:
        s = self.settings
        return s.temperature, s.top_k, s.top_p, s.cfg


@dataclass
class _Group:
    """Candidates that share sampling settings: one Sampler call a step over their rows."""

    sampler: Sampler
    cond_rows: torch.Tensor  # (C,)
    uncond_rows: torch.Tensor | None  # (C,) when guided
    forced: bool  # some of its jobs are edits: kept ids replace the draws


class Scheduler:
    """The decode loop of a service: see the module docstring. ``start()`` it, ``submit`` jobs, ``close()``."""

    def __init__(self, pipeline: Pipeline, max_rows: int = 256, max_queue: int = 64):
        model = pipeline.model
        self.pipeline = pipeline
        self.model = model
        self.max_rows = max_rows
        self.max_queue = max_queue
        self.image_len = model.config.image_len
        self.grid_size = model.config.grid_size
        device = model.decoder.head.weight.device
        self.device = device
        self.row_ids = torch.zeros(max_rows, dtype=torch.long, device=device)  # each row's input this step
        self.row_pos = torch.zeros(max_rows, dtype=torch.long, device=device)  # its decoder position
        self.drawn = torch.zeros(max_rows, self.image_len, dtype=torch.long, device=device)  # ids drawn so far
        # Edits, per row and position: the given id, whether it is kept, whether it is kept after the hole
        # (its likelihood counts), and the sum of those likelihoods so far (seq2seq.generate.Forcing's fields).
        self.given = torch.zeros(max_rows, self.image_len, dtype=torch.long, device=device)
        self.kept = torch.zeros(max_rows, self.image_len, dtype=torch.bool, device=device)
        self.after_hole = torch.zeros(max_rows, self.image_len, dtype=torch.bool, device=device)
        self.log_likelihood = torch.zeros(max_rows, device=device)
        self.rows: list[tuple[Job, int]] = []  # row r holds (job, i): candidate i's row, or n + i's uncond row
        self.active: list[Job] = []
        self.job_rows: dict[Job, torch.Tensor] = {}  # the job's rows: (n,) or (2n,) cond then uncond
        self.groups: list[_Group] = []
        self.waiting: deque[Job] = deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.render_thread: threading.Thread | None = None
        # Pictures to draw: (self._preview, job, ids, undrawn, step) or (self._finish, job, ids, likelihood).
        # Another thread draws them (VQGAN, scorer, ranking), so decoding goes on meanwhile.
        self.renders: queue.Queue = queue.Queue()
        self.stopping = False
        self.ready = False
        self.steps = 0  # decode steps run, rows decoded and seconds spent: for /readyz and the benchmarks
        self.rows_decoded = 0
        self.busy_s = 0.0
        self.render_busy_s = 0.0  # seconds the render thread spent drawing
        self.thread_ids: dict[str, int] = {}  # the threads' native ids: /readyz reads their CPU time by them

    # ------------------------------------------------------------------------------ the caller's side

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="decode", daemon=True)
        self.render_thread = threading.Thread(target=self._render_loop, name="render", daemon=True)
        self.thread.start()
        self.render_thread.start()

    def close(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()
            self.renders.put(None)
            self.render_thread.join()

    def submit(self, job: Job) -> None:
        """Queue ``job``; raise QueueFull when ``max_queue`` jobs are waiting already, ValueError if it cannot fit."""
        if job.rows_needed > self.max_rows:
            raise ValueError(f"a request of {job.rows_needed} rows never fits the {self.max_rows} the caches hold")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            job.text_ids, job.text_mask = self.pipeline.encode_prompts([job.prompt])
        job.truncated = bool(caught)
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting, the most the queue holds")
            self.waiting.append(job)
            self.cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Stop ``job`` at the next step boundary (a client gone, a timeout); its rows are freed, no event sent."""
        with self.cond:
            job.cancelled = True
            if job in self.waiting:
                self.waiting.remove(job)

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def busy_rows(self) -> int:
        return len(self.rows)

    # ------------------------------------------------------------------------------ the decode thread

    def _run(self) -> None:
        self.thread_ids["decode"] = threading.get_native_id()
        with torch.inference_mode():
            self.setup()
            while True:
                with self.cond:
                    while not self.stopping and not self.waiting and not self.rows:
                        self.cond.wait()
                    if self.stopping:
                        break
                self.run_once()
        self.ready = False
        for job in list(self.waiting) + self.active:
            job.on_event("error", {"message": "the service is shutting down"})

    def setup(self) -> None:
        """Allocate the caches (in the thread that decodes: inference mode is per thread)."""
        self.model.eval()
        self.model.setup_caches(self.max_rows)
        self.ready = True

    def run_once(self) -> None:
        """One step boundary: admit what fits, decode one token for every row, hand out what finished."""
        with self.cond:
            admitted = self._take_admissible()
        start = time.perf_counter()
        try:
            self._admit(admitted)
            self._step()
            self.busy_s += time.perf_counter() - start
        except Exception:  # a bug, not a request's fault: fail the jobs at hand, keep serving
            traceback.print_exc(file=sys.stderr)
            failed = set(self.active) | set(admitted)
            self._remove(list(self.active))
            for job in failed:
                job.on_event("error", {"message": "internal error while decoding; see the server's log"})

    def _take_admissible(self) -> list[Job]:
        """Waiting jobs, first come first served, while their rows fit beside the ones decoding."""
        admitted, free = [], self.max_rows - len(self.rows)
        while self.waiting and self.waiting[0].rows_needed <= free:
            job = self.waiting.popleft()
            free -= job.rows_needed
            admitted.append(job)
        return admitted

    def _admit(self, jobs: list[Job]) -> None:
        """Encode each job's prompt into new rows at the end of the batch; they start at position 0 with bos."""
        for job in jobs:
            n, first = job.settings.n, len(self.rows)
            text_ids = job.text_ids.repeat(n, 1)  # (n, L): one row per candidate, as generate builds them
            text_mask = job.text_mask.repeat(n, 1)
            if job.guided:
                text_ids, text_mask = with_unconditional(text_ids, text_mask, EMPTY_TEXT_IDS)  # (2n, L')
            slots = torch.arange(first, first + text_ids.shape[0], device=self.device)
            self.model.prefill_slots(text_ids, text_mask.bool(), slots)
            self._set_edit(job, slots)
            self.row_ids[slots] = self.model.config.bos_id
            self.row_pos[slots] = 0
            self.rows += [(job, index) for index in range(text_ids.shape[0])]
            self.active.append(job)
            job.on_event("started", {})
        if jobs:
            self._regroup()

    def _set_edit(self, job: Job, slots: torch.Tensor) -> None:
        """The job's given ids and keep mask in its rows (nothing kept for a plain job)."""
        self.log_likelihood[slots] = 0.0
        if job.edit is None:
            self.kept[slots] = False
            self.after_hole[slots] = False
            return
        keep = job.edit.keep.flatten().to(self.device)  # (S,)
        self.given[slots] = self.pipeline.encode_init(job.edit).flatten().masked_fill(~keep, 0)
        self.kept[slots] = keep
        self.after_hole[slots] = keep & (torch.cumsum((~keep).long(), 0) > 0)

    def _regroup(self) -> None:
        """Rebuild every job's rows and the Samplers after rows came or went."""
        rows_of: dict[Job, list[tuple[int, int]]] = {}
        for r, (job, index) in enumerate(self.rows):
            rows_of.setdefault(job, []).append((index, r))
        self.job_rows = {job: torch.tensor([r for _, r in sorted(rows)], device=self.device)
                         for job, rows in rows_of.items()}
        by_key: dict[tuple, list[Job]] = {}
        for job in self.active:
            by_key.setdefault(job.group_key, []).append(job)
        self.groups = []
        for (temperature, top_k, top_p, cfg), jobs in by_key.items():
            seeds = torch.cat([torch.arange(j.settings.seed, j.settings.seed + j.settings.n) for j in jobs])
            n_of = [j.settings.n for j in jobs]
            cond = torch.cat([self.job_rows[j][:n] for j, n in zip(jobs, n_of)])
            uncond = torch.cat([self.job_rows[j][n:] for j, n in zip(jobs, n_of)]) if cfg != 1.0 else None
            sampler = Sampler(seeds.to(self.device), temperature, top_k, top_p, float(cfg))
            self.groups.append(_Group(sampler, cond, uncond, any(j.edit is not None for j in jobs)))

    def _step(self) -> None:
        """One token for every row; then previews, finished jobs out, cancelled jobs dropped."""
        dropped = [job for job in self.active if job.cancelled]
        if dropped:
            self._remove(dropped)
        batch = len(self.rows)
        if batch == 0:
            return
        positions = self.row_pos[:batch]
        kv_len = self.model.decode_length(int(positions.max()) + 1)  # attend over the filled cache only
        logits = self.model.decode_one_token(self.row_ids[:batch, None], positions, kv_len)  # (R, V)
        for group in self.groups:
            rows = group.cond_rows
            cond_logits = logits[rows]  # (C, V)
            if group.uncond_rows is not None:
                ids = group.sampler(torch.cat([cond_logits, logits[group.uncond_rows]]), positions[rows])
            else:
                ids = group.sampler(cond_logits, positions[rows])
            if group.forced:
                ids = self._force(ids, cond_logits, rows, positions[rows])
            self.row_ids[rows] = ids
            if group.uncond_rows is not None:
                self.row_ids[group.uncond_rows] = ids
        every = torch.arange(batch, device=self.device)
        self.drawn[every, positions] = self.row_ids[:batch]
        positions += 1
        self.steps += 1
        self.rows_decoded += batch
        finished = []
        for job in self.active:
            job.step += 1
            if job.step == self.image_len:
                finished.append(job)
            elif job.preview_every and job.step % job.preview_every == 0:
                self.renders.put((self._preview, job, *self._known(job)))
        if finished:
            for job in finished:
                cond = self.job_rows[job][: job.settings.n]
                likelihood = self.log_likelihood[cond] / self.after_hole[cond].sum(1).clamp(min=1)  # (n,)
                self.renders.put((self._finish, job, self.drawn[cond].clone(), likelihood))
            self._remove(finished)

    def _force(self, ids: torch.Tensor, cond_logits: torch.Tensor, rows: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
        """The ids (C,) of rows ``rows`` at their ``positions`` (C,): the given id where kept, else the one
        drawn; the log-probability of a kept id after the hole is added to its row's likelihood."""
        given = self.given[rows, positions]  # (C,)
        log_probs = cond_logits.float().log_softmax(-1).gather(1, given[:, None])[:, 0]  # (C,)
        self.log_likelihood[rows] += torch.where(self.after_hole[rows, positions], log_probs, 0.0)
        return torch.where(self.kept[rows, positions], given, ids)

    def _known(self, job: Job) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A preview's grid: the job's ids (n, S) drawn so far or kept, which positions are neither, its step."""
        cond = self.job_rows[job][: job.settings.n]
        ahead = torch.arange(self.image_len, device=self.device) >= job.step  # (S,)
        kept = self.kept[cond] & ahead  # (n, S)
        ids = torch.where(kept, self.given[cond], self.drawn[cond])
        return ids, ahead & ~kept, job.step

    def _remove(self, jobs: list[Job]) -> None:
        """Free the jobs' rows; the last rows move into the holes so the batch stays the first rows."""
        gone = set(jobs)
        keep = [r for r, (job, _) in enumerate(self.rows) if job not in gone]
        size = len(keep)
        holes = [r for r in range(size) if self.rows[r][0] in gone]
        movers = [r for r in keep if r >= size]
        if movers:
            source = torch.tensor(movers, device=self.device)
            target = torch.tensor(holes, device=self.device)
            self.model.move_slots(source, target)
            for buffer in (self.row_ids, self.row_pos, self.drawn, self.given, self.kept, self.after_hole,
                           self.log_likelihood):
                buffer[target] = buffer[source]
        rows = self.rows[:size]
        for hole, mover in zip(holes, movers):
            rows[hole] = self.rows[mover]
        self.rows = rows
        self.active = [job for job in self.active if job not in gone]
        self._regroup()

    # ------------------------------------------------------------------------------ the render thread

    def _render_loop(self) -> None:
        self.thread_ids["render"] = threading.get_native_id()
        with torch.inference_mode():
            while (item := self.renders.get()) is not None:
                start = time.perf_counter()
                self._render(*item)
                self.render_busy_s += time.perf_counter() - start

    def render_pending(self) -> None:
        """Draw every queued preview and result in this thread (what the render thread does; for tests)."""
        while not self.renders.empty():
            self._render(*self.renders.get_nowait())

    def _render(self, draw: Callable, job: Job, *args) -> None:
        if job.cancelled:
            return
        try:
            draw(job, *args)
        except Exception:  # a bug: this job fails, the service goes on
            traceback.print_exc(file=sys.stderr)
            job.on_event("error", {"message": "internal error while drawing the pictures; see the server's log"})

    def _preview(self, job: Job, image_ids: torch.Tensor, undrawn: torch.Tensor, step: int) -> None:
        """The candidates' ids known so far (n, S), decoded by the VQGAN, the ``undrawn`` (n, S) cells grey."""
        grid = (-1, self.grid_size, self.grid_size)
        decoded = self.pipeline.vqgan.decode(image_ids.masked_fill(undrawn, 0).view(grid)).float()
        images = [to_pil(image) for image in preview_images(decoded, undrawn.view(grid)).cpu()]
        job.on_event("preview", {"step": step, "of": self.image_len, "images": images})

    def _finish(self, job: Job, image_ids: torch.Tensor, likelihood: torch.Tensor) -> None:
        """Render, score and rank the job's pictures (n, S) as the sampling pipeline does; hand them over. An
        inpainting's likelihoods (n,) of the kept ids after the hole join the ranking, as they do there; a new
        picture's scorer shortlist is re-ordered by the decoder's teacher-forced likelihood (a pass of its own,
        which leaves the decoding caches alone)."""
        n, edit = job.settings.n, job.edit
        image_ids = image_ids.view(n, self.grid_size, self.grid_size)
        images, scores = self.pipeline.render(image_ids, [job.prompt] * n)
        if job.preview_every:  # the finished candidates, unranked, on the preview grid
            job.on_event("preview", {"step": self.image_len, "of": self.image_len, "images": list(images)})
        likelihoods = likelihood.float().cpu() if edit is not None and edit.keeps_after_hole else None
        pictures: list[Picture] = self.pipeline._rank(job.prompt, images, scores, likelihoods, job.settings,
                                                      self.pipeline.settings_record(job.settings, edit),
                                                      tokens=image_ids if edit is None else None)  # the shortlist's
        job.on_event("done", {"pictures": pictures})

