"""The service: continuous batching gives the pictures `generate_images` gives, every endpoint answers as
documented, every bad request gets a 4xx JSON error naming its field, and the command line refuses bad
flags with one line.

Everything runs on the session's tiny run (a 4x4 grid, 16 tokens a picture) in this process: the API
through FastAPI's TestClient, the decode thread for real.
"""

import base64
import importlib
import io
import json
import struct
import sys
import threading
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install -e '.[serve]'")

from fastapi.testclient import TestClient

import serve.__main__ as serve_cli
from data.images import to_pil
from sample.pipeline import Pipeline, SamplingSettings, generate_images, make_edit
from serve.app import create_app
from serve.scheduler import Job, Scheduler
from serve.schemas import Limits
from serve.stepbench import step_costs

LIMITS = Limits(max_n=6, max_rows=24, max_queue=8, max_body_bytes=16384, timeout_s=60.0, preview_every=4)


@pytest.fixture(scope="module")
def pipeline(tiny_run):
    return Pipeline(tiny_run, device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_run):
    """A second copy of the run for generate_images: the service's model and caches are its own."""
    return Pipeline(tiny_run, device="cpu")


@pytest.fixture(scope="module")
def client(pipeline):
    with TestClient(create_app(pipeline, LIMITS)) as client:
        yield client


def _pixels(image: Image.Image) -> bytes:
    return image.convert("RGB").tobytes()


def _expected(reference: Pipeline, prompt: str, settings: SamplingSettings) -> list:
    """What python -m sample draws: every candidate, best first."""
    return reference([prompt], settings)[0]


# ---------------------------------------------------------------------------------------------- batching

REQUESTS = [  # (prompt, settings, steps run before the next one arrives)
    ("a large red circle", dict(n=3, keep=2, seed=3), 3),
    ("a small blue square", dict(n=2, keep=1, seed=10, cfg=1.0, top_k=5), 5),
    ("two green triangles", dict(n=4, keep=4, seed=7, top_p=0.9, temperature=0.8, cfg=3.0), 2),
    ("a large red circle", dict(n=1, keep=1, seed=100), 0),
]


def test_continuous_batching_draws_the_pictures_generate_images_draws(pipeline, reference):
    """Requests join at different steps, with their own settings and guidance rows, one leaves mid-way
    (cancelled): every finished picture, seed and score is the one python -m sample gives alone."""
    scheduler = Scheduler(pipeline, max_rows=24)
    events: dict[int, list] = {}
    jobs = []
    with torch.inference_mode():
        scheduler.setup()
        for i, (prompt, options, steps) in enumerate(REQUESTS):
            job = Job(prompt, SamplingSettings(**options), lambda kind, data, i=i: events.setdefault(i, []).append(
                (kind, data)), preview_every=4)
            jobs.append(job)
            scheduler.submit(job)
            for _ in range(steps):
                scheduler.run_once()
        leaving = Job("a leaving request", SamplingSettings(n=3, keep=1, seed=5), lambda *a: None)
        scheduler.submit(leaving)
        scheduler.run_once()
        scheduler.run_once()
        assert scheduler.busy_rows == sum(j.rows_needed for j in jobs + [leaving] if j.step < 16)
        scheduler.cancel(leaving)
        while scheduler.busy_rows:
            scheduler.run_once()
        scheduler.render_pending()
    assert leaving.step < 16 and scheduler.busy_rows == 0
    for i, (prompt, options, _) in enumerate(REQUESTS):
        kinds = [kind for kind, _ in events[i]]
        assert kinds[0] == "started" and kinds[-1] == "done" and kinds.count("preview") == 4  # steps 4, 8, 12, 16
        served = events[i][-1][1]["pictures"]
        expected = _expected(reference, prompt, SamplingSettings(**options))
        assert [(p.seed, p.rank, p.kept, p.score) for p in served] == [(p.seed, p.rank, p.kept, p.score)
                                                                        for p in expected]
        assert [_pixels(p.image) for p in served] == [_pixels(p.image) for p in expected]


def _init_picture(size: int = 32, seed: int = 0) -> Image.Image:
    """A picture of the tiny run's size to edit: coloured noise, so every token of its grid differs."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def _mask_picture(size: int = 32) -> Image.Image:
    """White (redraw) on the right half of the middle rows, black (keep) elsewhere."""
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 2, 8, size, 20))
    return mask


def _png64(image: Image.Image, format: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode()


def _huge_png64(side: int = 30000) -> str:
    """A PNG whose header says side x side pixels (2.7 GB decoded) in a few bytes: refused unread."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
    png = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


EDITS = [  # (prompt, settings, make_edit's arguments, steps run before the next one arrives)
    ("a large red circle", dict(n=3, keep=2, seed=3), dict(keep_rows=2), 2),
    ("a small blue square", dict(n=2, keep=2, seed=10, cfg=1.0, likelihood_weight=0.5), dict(box=(0, 8, 16, 24)), 3),
    ("a large red circle", dict(n=4, keep=3, seed=7), dict(mask=_mask_picture()), 1),
    ("two green triangles", dict(n=2, keep=1, seed=5), {}, 0),  # a plain request beside the edits
]


def test_edits_batch_with_plain_requests_and_draw_what_python_m_sample_draws(pipeline, reference):
    """Completion, a box and a mask, guided and not, joining at different steps beside a plain request: every
    picture, seed, rank, score, likelihood and settings record is the one python -m sample gives alone."""
    scheduler = Scheduler(pipeline, max_rows=24)
    events: dict[int, list] = {}
    edits = [make_edit(pipeline, _init_picture(seed=i), **options) if options else None
             for i, (_, _, options, _) in enumerate(EDITS)]
    with torch.inference_mode():
        scheduler.setup()
        for i, (prompt, options, _, steps) in enumerate(EDITS):
            scheduler.submit(Job(prompt, SamplingSettings(**options), lambda kind, data, i=i: events.setdefault(
                i, []).append((kind, data)), preview_every=4, edit=edits[i]))
            for _ in range(steps):
                scheduler.run_once()
        assert len({group.sampler for group in scheduler.groups}) < len(EDITS)  # edits share samplers
        while scheduler.busy_rows:
            scheduler.run_once()
        scheduler.render_pending()
    for i, (prompt, options, _, _) in enumerate(EDITS):
        assert [kind for kind, _ in events[i]].count("preview") == 4 and events[i][-1][0] == "done"
        served = events[i][-1][1]["pictures"]
        expected = reference([prompt], SamplingSettings(**options), edit=edits[i])[0]
        assert [(p.seed, p.rank, p.kept, p.score, p.settings) for p in served] == [
            (p.seed, p.rank, p.kept, p.score, p.settings) for p in expected]
        assert [_pixels(p.image) for p in served] == [_pixels(p.image) for p in expected]
        if edits[i] is not None and edits[i].keeps_after_hole:
            assert [p.likelihood for p in served] == pytest.approx([p.likelihood for p in expected], abs=1e-5)
            assert all(p.likelihood < 0 for p in served)
        elif edits[i] is not None:  # completion: nothing after a hole, no shortlist
            assert all(p.likelihood is None for p in served)
        else:  # a new picture: the scorer's shortlist re-ordered by the decoder's likelihood, as there
            assert [p.likelihood for p in served] == pytest.approx([p.likelihood for p in expected], abs=1e-5)
            assert all(p.likelihood < 0 for p in served)


def test_an_edits_previews_show_its_kept_tokens_from_the_start(pipeline):
    """Completion keeping 2 of 4 rows: the first preview (step 4) shows rows 1-2 from the picture, not grey."""
    scheduler = Scheduler(pipeline, max_rows=8)
    events = []
    edit = make_edit(pipeline, _init_picture(), keep_rows=2)
    with torch.inference_mode():
        scheduler.setup()
        scheduler.submit(Job("a red circle", SamplingSettings(n=1, keep=1, seed=0),
                             lambda kind, data: events.append((kind, data)), preview_every=4, edit=edit))
        while scheduler.busy_rows or scheduler.queue_length:
            scheduler.run_once()
        scheduler.render_pending()
        known = pipeline.encode_init(edit).clone()  # (1, 4, 4)
        known[:, 2:] = 0  # what a preview decodes where nothing is known yet
        expected = to_pil(pipeline.vqgan.decode(known).float()[0])
    first = next(data for kind, data in events if kind == "preview")
    assert first["step"] == 4  # two rows known: one drawn (forced), one kept ahead
    preview = np.asarray(first["images"][0])
    assert np.array_equal(preview[:16], np.asarray(expected)[:16])  # the kept rows
    assert (preview[16:] == preview[16, 0]).all()  # the rest: one flat grey


def test_decode_with_positions_per_row_equals_a_shared_position(pipeline):
    """decode_one_token with (B,) positions all equal gives the logits of the (1,) form."""
    model = pipeline.model
    text_ids, text_mask = pipeline.encode_prompts(["a red circle", "a blue square above a green star"])
    with torch.inference_mode():
        model.setup_caches(2)
        shared = [model.prefill(text_ids, text_mask)]
        ids = torch.tensor([[3], [5]])
        for position in (1, 2):
            shared.append(model.decode_one_token(ids, torch.tensor([position])))
        model.setup_caches(4)
        model.prefill_slots(text_ids, text_mask, torch.tensor([2, 0]))  # other rows, other order
        per_row = [model.decode_one_token(torch.full((3, 1), model.config.bos_id), torch.tensor([0, 0, 0]))[[2, 0]]]
        for position in (1, 2):
            logits = model.decode_one_token(torch.tensor([[5], [0], [3]]), torch.tensor([position, 0, position]))
            per_row.append(logits[[2, 0]])
    for a, b in zip(shared, per_row):
        torch.testing.assert_close(a, b)


def test_http_requests_in_flight_together_get_their_own_pictures(client, reference):
    """Three clients at once through HTTP: each response holds generate_images' kept pictures."""
    bodies = [{"prompt": prompt, **options} for prompt, options, _ in REQUESTS[:3]]
    answers = [None] * 3

    def post(i):
        answers[i] = client.post("/v1/pictures", json=bodies[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for body, answer in zip(bodies, answers):
        assert answer.status_code == 200, answer.text
        options = {k: v for k, v in body.items() if k != "prompt"}
        kept = [p for p in _expected(reference, body["prompt"], SamplingSettings(**options)) if p.kept]
        pictures = answer.json()["pictures"]
        assert [(p["seed"], p["rank"], p["score"]) for p in pictures] == [(p.seed, p.rank, p.score) for p in kept]
        served = [Image.open(io.BytesIO(base64.b64decode(p["png_base64"]))) for p in pictures]
        assert [_pixels(image) for image in served] == [_pixels(p.image) for p in kept]


def test_an_edit_over_http_returns_what_generate_images_returns(client, reference):
    """A box inpainting sent with its picture inline (as a data: URL too) and a mask inpainting streamed:
    python -m sample's kept pictures, seeds, scores and likelihoods, and the edit in the settings."""
    init = _init_picture(seed=3)
    box = {"prompt": "a blue square", "n": 3, "keep": 2, "seed": 4, "cfg": 1.0, "init": _png64(init),
           "box": [8, 0, 24, 16], "likelihood_weight": 2.0, "width": 32, "height": 32}
    mask = {"prompt": "a red circle", "n": 2, "keep": 2, "seed": 9, "init": "data:image/png;base64," + _png64(init),
            "mask": _png64(_mask_picture())}
    answer = client.post("/v1/pictures", json=box)
    assert answer.status_code == 200, answer.text
    with client.stream("POST", "/v1/pictures/stream", json=mask) as response:
        assert response.status_code == 200
        response.read()
    events = _read_events(response)
    assert [kind for kind, _ in events].count("preview") == 4 and events[-1][0] == "done"
    for served, options, edit in ((answer.json(), box, dict(box=(8, 0, 24, 16), likelihood_weight=2.0)),
                                  (events[-1][1], mask, dict(mask=_mask_picture()))):
        kept = generate_images(options["prompt"], pipeline=reference, n=options["n"], keep=options["keep"],
                               seed=options["seed"], cfg=options.get("cfg", SamplingSettings.cfg), init=init,
                               **edit)[0]
        pictures = served["pictures"]
        assert [(p["seed"], p["rank"], p["score"]) for p in pictures] == [(p.seed, p.rank, p.score) for p in kept]
        assert [p["likelihood"] for p in pictures] == pytest.approx([p.likelihood for p in kept], abs=1e-5)
        images = [Image.open(io.BytesIO(base64.b64decode(p["png_base64"]))) for p in pictures]
        assert [_pixels(image) for image in images] == [_pixels(p.image) for p in kept]
        assert served["settings"]["edit"] == kept[0].settings["edit"]
        assert json.loads(images[0].text["settings"])["edit"] == kept[0].settings["edit"]


def test_a_completion_over_http_returns_what_generate_images_returns(client, reference):
    init = _init_picture(seed=1)
    answer = client.post("/v1/pictures", json={"prompt": "a green star", "n": 2, "keep": 2, "seed": 0,
                                               "init": _png64(init), "keep_rows": 3})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["settings"]["edit"] == {"keep_rows": 3} and all(p["likelihood"] is None for p in body["pictures"])
    kept = generate_images("a green star", pipeline=reference, n=2, keep=2, seed=0, init=init, keep_rows=3)[0]
    images = [Image.open(io.BytesIO(base64.b64decode(p["png_base64"]))) for p in body["pictures"]]
    assert [_pixels(image) for image in images] == [_pixels(p.image) for p in kept]


# ---------------------------------------------------------------------------------------------- endpoints

def test_health_readiness_info_and_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    info = client.get("/v1/info").json()
    assert info["defaults"] == {"n": 16, "keep": 4, "top_k": None, "top_p": 0.8, "temperature": 1.0, "cfg": 2.0,
                                "shortlist": SamplingSettings.shortlist, "likelihood_weight": 1.0}
    assert info["model"]["canvas"] == 32 and info["model"]["token_size"] == 8
    assert info["limits"]["max_n"] == LIMITS.max_n
    spec = client.get("/openapi.json").json()
    assert {"/v1/pictures", "/v1/pictures/stream", "/v1/pictures/{picture_id}", "/healthz", "/readyz"} <= set(
        spec["paths"])
    assert "seed" in spec["components"]["schemas"]["PictureRequest"]["properties"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text


def test_page_is_served_and_fetches_nothing_from_elsewhere(client):
    for path in ("/", "/docs"):
        page = client.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for marker in ('src="http', "src='http", 'href="http', "url(http", "//cdn", "import("):
            assert marker not in page.text, (path, marker)
    page = client.get("/").text
    assert 'id="prompt"' in page and "/v1/pictures/stream" in page


def test_create_returns_kept_pictures_with_seed_score_and_a_url(client):
    answer = client.post("/v1/pictures", json={"prompt": "a red circle", "n": 3, "keep": 2, "seed": 41})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["settings"]["seed"] == 41 and body["settings"]["n"] == 3
    pictures = body["pictures"]
    # 3 candidates, all on the default shortlist: the decoder's likeliest first.
    assert [p["rank"] for p in pictures] == [1, 2] and pictures[0]["likelihood"] >= pictures[1]["likelihood"]
    assert {p["seed"] for p in pictures} <= {41, 42, 43}
    for picture in pictures:
        png = client.get(picture["url"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content == base64.b64decode(picture["png_base64"])
        image = Image.open(io.BytesIO(png.content))
        assert image.text["prompt"] == "a red circle" and int(image.text["seed"]) == picture["seed"]
        assert json.loads(image.text["settings"])["cfg"] == 2.0
        assert f"seed{picture['seed']}.png" in png.headers["content-disposition"]


def test_without_a_seed_one_is_drawn_and_returned_and_draws_the_picture_again(client):
    first = client.post("/v1/pictures", json={"prompt": "a blue star", "n": 2, "keep": 1,
                                              "response_format": "url"}).json()
    assert first["pictures"][0]["png_base64"] is None
    seed = first["pictures"][0]["seed"]
    again = client.post("/v1/pictures", json={"prompt": "a blue star", "n": 1, "keep": 1, "seed": seed}).json()
    assert client.get(first["pictures"][0]["url"]).content != b""
    assert _pixels(Image.open(io.BytesIO(client.get(first["pictures"][0]["url"]).content))) == _pixels(
        Image.open(io.BytesIO(base64.b64decode(again["pictures"][0]["png_base64"]))))


def _read_events(response) -> list[tuple[str, dict]]:
    events = []
    for block in response.text.split("\n\n"):
        if block.strip():
            lines = dict(line.split(": ", 1) for line in block.splitlines())
            events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_stream_sends_previews_while_decoding_then_the_pictures(client):
    with client.stream("POST", "/v1/pictures/stream", json={"prompt": "a green square", "n": 3, "keep": 1,
                                                            "seed": 2}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        response.read()
    events = _read_events(response)
    kinds = [kind for kind, _ in events]
    assert kinds == ["queued", "started", "preview", "preview", "preview", "preview", "done"]
    previews = [data for kind, data in events if kind == "preview"]
    assert [p["step"] for p in previews] == [4, 8, 12, 16] and all(p["of"] == 16 for p in previews)
    for preview in previews:
        assert len(preview["images"]) == 3
        for data in preview["images"]:
            Image.open(io.BytesIO(base64.b64decode(data))).verify()
    done = events[-1][1]
    assert done["settings"]["seed"] == 2 and len(done["pictures"]) == 1
    post = client.post("/v1/pictures", json={"prompt": "a green square", "n": 3, "keep": 1, "seed": 2}).json()
    assert post["pictures"][0]["png_base64"] == done["pictures"][0]["png_base64"]


def test_a_long_prompt_is_cut_and_says_so(client):
    answer = client.post("/v1/pictures", json={"prompt": "red circle " * 90, "n": 1, "keep": 1, "seed": 0})
    assert answer.status_code == 200 and answer.json()["truncated"] is True


# ---------------------------------------------------------------------------------------------- bad input

BAD_BODIES = [  # (body, the field named)
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   \n"}, "prompt"),
    ({"prompt": "x" * 1001}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "n": LIMITS.max_n + 1}, "n"),
    ({"prompt": "a", "n": "4"}, "n"),
    ({"prompt": "a", "n": 2.5}, "n"),
    ({"prompt": "a", "n": True}, "n"),
    ({"prompt": "a", "n": 10**30}, "n"),
    ({"prompt": "a", "n": 2, "keep": 3}, "keep"),
    ({"prompt": "a", "keep": 0}, "keep"),
    ({"prompt": "a", "top_k": 0}, "top_k"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "temperature": 0}, "temperature"),
    ({"prompt": "a", "temperature": 1e6}, "temperature"),
    ({"prompt": "a", "cfg": -1}, "cfg"),
    ({"prompt": "a", "cfg": 1e300}, "cfg"),
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "seed": 2**63}, "seed"),
    ({"prompt": "a", "n": 4, "keep": 1, "seed": 2**63 - 2}, "seed"),
    ({"prompt": "a", "response_format": "file"}, "response_format"),
    ({"prompt": "a", "checkpoint": "/etc/passwd"}, "checkpoint"),
    ({"prompt": "a", "out": "../../tmp"}, "out"),
    # edits
    ({"prompt": "a", "n": 2, "keep": 1, "keep_rows": 2}, "keep_rows"),
    ({"prompt": "a", "n": 2, "keep": 1, "box": [0, 0, 8, 8]}, "box"),
    ({"prompt": "a", "n": 2, "keep": 1, "mask": _png64(_mask_picture())}, "mask"),
    ({"prompt": "a", "n": 2, "keep": 1, "init": _png64(_init_picture())}, "init"),
    ({"prompt": "a", "n": 2, "keep": 1, "init": _png64(_init_picture()), "keep_rows": 2, "box": [0, 0, 8, 8]}, "box"),
    ({"prompt": "a", "n": 2, "keep": 1, "init": "/etc/passwd", "keep_rows": 2}, "init"),
    ({"prompt": "a", "n": 2, "keep": 1, "init": "not base64!", "keep_rows": 2}, "init"),
    ({"prompt": "a", "n": 2, "keep": 1, "init": base64.b64encode(b"hello, not a picture").decode(), "keep_rows": 2}, "init"),
    ({"prompt": "a", "n": 2, "keep": 1, "init": _png64(_init_picture(), "JPEG"), "keep_rows": 2}, "init"),
    ({"prompt": "a", "n": 2, "keep": 1, "init": _png64(_init_picture())[:200], "keep_rows": 2}, "init"),
    ({"prompt": "a", "n": 2, "keep": 1, "init": _png64(_init_picture(16)), "keep_rows": 2}, "init"),
    ({"prompt": "a", "n": 2, "keep": 1, "init": _huge_png64(), "keep_rows": 2}, "init"),
    ({"prompt": "a", "n": 2, "keep": 1, "init": 5, "keep_rows": 2}, "init"),
    ({"prompt": "a", "n": 2, "keep": 1, "init": _png64(_init_picture()), "keep_rows": 0}, "keep_rows"),
    ({"prompt": "a", "n": 2, "keep": 1, "init": _png64(_init_picture()), "keep_rows": 4}, "keep_rows"),
    ({"prompt": "a", "n": 2, "keep": 1, "init": _png64(_init_picture()), "keep_rows": "2"}, "keep_rows"),
    ({"prompt": "a", "n": 2, "keep": 1, "init": _png64(_init_picture()), "box": [0, 0, 40, 8]}, "box"),
    ({"prompt": "a", "n": 2, "keep": 1, "init": _png64(_init_picture()), "box": [8, 8, 8, 16]}, "box"),
    ({"prompt": "a", "n": 2, "keep": 1, "init": _png64(_init_picture()), "box": [0, 0, 8]}, "box"),
    ({"prompt": "a", "n": 2, "keep": 1, "init": _png64(_init_picture()), "box": [-1, 0, 8, 8]}, "box"),
    ({"prompt": "a", "n": 2, "keep": 1, "init": _png64(_init_picture()), "box": "0,0,8,8"}, "box"),
    ({"prompt": "a", "n": 2, "keep": 1, "init": _png64(_init_picture()), "mask": _png64(_mask_picture(16))}, "mask"),
    ({"prompt": "a", "n": 2, "keep": 1, "init": _png64(_init_picture()), "mask": _png64(Image.new("L", (32, 32), 0))}, "mask"),
    ({"prompt": "a", "n": 2, "keep": 1, "init": _png64(_init_picture()), "mask": "////"}, "mask"),
    ({"prompt": "a", "n": 2, "keep": 1, "shortlist": 0}, "shortlist"),
    ({"prompt": "a", "n": 2, "keep": 1, "likelihood_weight": -1}, "likelihood_weight"),
    ({"prompt": "a", "n": 2, "keep": 1, "likelihood_weight": 1000}, "likelihood_weight"),
    ({"prompt": "a", "n": 2, "keep": 1, "likelihood_weight": "1"}, "likelihood_weight"),
    ({"prompt": "a", "n": 2, "keep": 1, "width": 64}, "width"),
    ({"prompt": "a", "n": 2, "keep": 1, "height": 16}, "height"),
]


@pytest.mark.parametrize("path", ["/v1/pictures", "/v1/pictures/stream"])
@pytest.mark.parametrize("body, field", BAD_BODIES, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_BODIES)])
def test_every_bad_field_is_a_422_naming_it(client, path, body, field):
    answer = client.post(path, json=body)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["field"] in (field, f"{field}.0") and error["message"] and field in error["message"]


@pytest.mark.parametrize("content, headers, status, field", [
    (b"{", {"content-type": "application/json"}, 422, "body"),
    (b"[]", {"content-type": "application/json"}, 422, "body"),
    (b"null", {"content-type": "application/json"}, 422, "body"),
    (b'{"prompt": "a", "temperature": NaN}', {"content-type": "application/json"}, 422, "temperature"),
    (b'{"prompt": "a", "cfg": Infinity}', {"content-type": "application/json"}, 422, "cfg"),
    (b'{"prompt": "a"}', {"content-type": "text/plain"}, 422, "body"),
    (b"\xff\xfe not utf-8", {"content-type": "application/json"}, 422, "body"),
    (b'{"prompt": "' + b"a" * 17000 + b'"}', {"content-type": "application/json"}, 413, "body"),
])
def test_bodies_that_are_not_a_request_are_4xx_json(client, content, headers, status, field):
    answer = client.post("/v1/pictures", content=content, headers=headers)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["field"] == field


FIELDS = ["prompt", "n", "keep", "top_k", "top_p", "temperature", "cfg", "seed", "response_format", "init",
          "keep_rows", "box", "mask", "shortlist", "likelihood_weight", "width", "height"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), JSON_VALUES, max_size=6)
       | JSON_VALUES)
def test_any_json_body_is_answered_200_or_a_4xx_naming_a_field(client, body):
    if isinstance(body, dict) and isinstance(body.get("n"), int) and body.get("n", 0) > 2:
        body["n"] = 2  # keep valid requests quick; bad values of n are in the catalogue
    answer = client.post("/v1/pictures", json=body)
    assert answer.status_code == 200 or 400 <= answer.status_code < 500, answer.text
    if answer.status_code != 200:
        error = answer.json()["error"]
        assert error["message"] and error["field"] is not None


def test_json_nested_past_the_parsers_depth_is_a_4xx_naming_the_body(client):
    answer = client.post("/v1/pictures", content=b"[" * 1000 + b"]" * 1000,
                         headers={"content-type": "application/json"})
    assert 400 <= answer.status_code < 500 and answer.json()["error"]["field"] == "body"


def test_the_service_listens_on_this_machine_only_by_default():
    assert serve_cli.build_parser().parse_args([]).host == "127.0.0.1"


def test_a_body_streamed_past_the_limit_is_refused_while_it_arrives(client):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"a" * 1000
        yield b'"}'

    answer = client.post("/v1/pictures", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413 and answer.json()["error"]["field"] == "body"


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/v1/pictures/../../etc/passwd", 404),
    ("GET", "/v1/pictures/%2e%2e%2fserve%2fapp.py", 404),
    ("GET", "/v1/pictures/" + "0" * 32, 404),
    ("GET", "/v1/pictures/sample/demo_run/all.json", 404),
    ("GET", "/static/index.html", 404),
    ("GET", "/nothing-here", 404),
    ("DELETE", "/v1/pictures", 405),
    ("GET", "/v1/pictures", 405),
    ("PUT", "/healthz", 405),
])
def test_unknown_addresses_and_methods_are_json_errors(client, method, path, status):
    answer = client.request(method, path)
    assert answer.status_code == status
    assert answer.json()["error"]["message"]


def test_a_full_queue_is_429_and_a_late_answer_408_never_a_500(pipeline):
    """The decode thread not started (as while the service loads): requests wait in the queue."""
    app = create_app(pipeline, Limits(max_n=4, max_rows=8, max_queue=1, timeout_s=0.5))
    client = TestClient(app)  # not entered: no lifespan, so no decode thread
    assert client.get("/readyz").status_code == 503
    with client.stream("POST", "/v1/pictures/stream", json={"prompt": "a", "n": 1, "keep": 1}) as waiting:
        assert waiting.status_code == 200
        refused = client.post("/v1/pictures", json={"prompt": "b", "n": 1, "keep": 1})
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "queue_full"
        waiting.read()
    kinds = [kind for kind, _ in _read_events(waiting)]
    assert kinds == ["queued", "error"] and _read_events(waiting)[-1][1]["error"]["type"] == "timeout"
    late = client.post("/v1/pictures", json={"prompt": "c", "n": 1, "keep": 1})  # the timed-out one left the queue
    assert late.status_code == 408 and late.json()["error"]["type"] == "timeout"
    assert app.state.service.scheduler.queue_length == 0


# ---------------------------------------------------------------------------------------------- command line

@pytest.mark.parametrize("argv, says", [
    (["--port", "70000"], "--port"),
    (["--max-n", "0"], "--max-n"),
    (["--max-n", "40", "--max-rows", "8"], "--max-rows"),
    (["--timeout", "0"], "--timeout"),
    (["--host", "not a host"], "--host"),
    (["--checkpoint", "/nonexistent/run"], "--checkpoint"),
    (["--port", "eighty"], "--port"),
])
def test_bad_flags_are_one_line_and_status_2(argv, says, capsys):
    try:
        status = serve_cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        status = e.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and says in err[-1] and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("module, argv, says", [
    ("serve.loadtest", ["--edit-every", "-1"], "--edit-every"),
    ("serve.loadtest", ["--keep", "5", "--n", "4"], "--keep"),
    ("serve.stepbench", ["--rounds", "0"], "--rounds"),
    ("serve.stepbench", ["--steps", "5000"], "--steps"),
])
def test_the_benchmarks_refuse_bad_flags_with_one_line(module, argv, says, capsys):
    status = importlib.import_module(module).main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1].startswith("error: ") and says in err[-1]


def test_the_step_benchmark_times_few_rows_and_many(reference):
    report = step_costs(reference, (1, 3), rounds=1, steps=2, n=1)
    assert report["1_requests"]["rows"] == 2 and report["3_requests"]["rows"] == 6  # guided: two rows a candidate
    for size in ("1_requests", "3_requests"):
        figures = report[size]
        assert 0 < figures["model_ms_per_step"] <= figures["ms_per_step"] and figures["cpu_ms_per_step"] > 0
    assert report["row_cost_ratio"] > 0
    assert "decode_one_token" not in vars(reference.model)  # the timing wrapper is gone


def test_readiness_reports_each_threads_time_on_a_core(client):
    ready = client.get("/readyz").json()
    assert ready["process_cpu_s"] > 0
    if sys.platform == "linux":
        assert {"decode", "render", "event_loop"} <= set(ready["threads"])
        assert all(times["cpu_s"] >= 0 and times["runqueue_s"] >= 0 for times in ready["threads"].values())
