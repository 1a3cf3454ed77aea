"""HTTP serving: a FastAPI app over :meth:`audioclf.predict.Classifier.classify`, run with uvicorn.

``POST /predict``  multipart field ``file`` -> ``{label, confidence, probs, top_k, duration_s[, tags, windows][,
score, threshold]}``: ``label`` is ``unknown`` when the model's rule rejects the sound (``score`` below ``threshold``)
``POST /predict_batch``  multipart fields ``files`` (several) -> ``{results: [{file, result | error}, ...]}``
``POST /embed``  multipart field ``file`` -> ``{embedding, dim, duration_s}``
``POST /explain``  multipart field ``file`` (and ``?label=``) -> a PNG: where the model's evidence lies
``POST /detect``   multipart field ``file`` -> ``{duration_s, events: [{onset, offset, label, score}]}``
``WS /listen``  a live stream of PCM -> the top classes and the events as they open and close, every hop
``GET /health`` (status and model metadata), ``GET /labels``, ``GET /`` (a web page), ``/docs`` (OpenAPI).

The model is loaded once, when the app is made. Requests are classified in worker threads, so the event
loop keeps accepting connections while the model works. The model runs one step at a time (a lock),
because torch already spreads one forward pass over every core; a step is a few windows, so a long file
takes its turns between short requests instead of holding the model for its whole length, and a request
whose client has gone stops at the next step.

Every request's work and memory are bounded by the server's limits, never by the client's parameters:
upload size, decoded duration (read from the header before decoding, counted again while decoding),
window and hop ranges, number of windows, and time to send headers and body. A batch is one request: its
files together stay within the limits of one upload, one duration and one count of windows, and they are
classified one after another, a model step at a time like any other request. Uploads are copied into a
fresh temporary directory under a generated name (the client's file name is never part of a path), and
deleted once answered.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import logging
import math
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Optional

from ._version import __version__
from .audio import AUDIO_EXTENSIONS, audio_duration_s, decoding_bytes, default_hop
from .errors import AudioclfError
from .fileio import sha256
from .options import PredictOptions, ServeLimits, check_origin  # noqa: F401 (check_origin: serve's API)

try:
    import uvicorn
    from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import HTMLResponse, Response

    from .schemas import Batch, BatchItem, DetectedEvent, Detection, Embedding, Health, Labels, Prediction
except ImportError as e:
    raise AudioclfError(f"serving needs {e.name}, which is not installed: pip install 'audioclf[serve]'") from None

if importlib.util.find_spec("python_multipart") is None and importlib.util.find_spec("multipart") is None:
    raise AudioclfError("serving needs python-multipart for file uploads: pip install 'audioclf[serve]'")

# the guards below the app (serve's API too: tests and benchmarks reach them through this module)
from .serve_guards import MIB, BodyLimits, DecodingBudget, HeaderDeadlineProtocol, uvicorn_options  # noqa: E402,F401
from .serve_listen import add_listen, max_message_bytes  # noqa: E402

log = logging.getLogger(__name__)

# Room for the multipart boundary and part headers around a file of exactly the size limit.
MULTIPART_SLACK = 64 * 1024
# window_s a client may ask for: from this, up to this or the model's own window if longer
MIN_WINDOW_S, MAX_WINDOW_S = 0.1, 60.0
# hop_s >= this fraction of window_s: each sample is in at most 1 / fraction windows, so the model's work
# is at most that many times the audio's length
MIN_HOP_FRACTION = 0.25
# Audio per model step, in the model's windows: small, so that short requests get the model between
# the steps of a long one, and memory holds a few windows whatever window_s the client asks for.
# benchmarks/serve.py, 2 CPU cores: 1-s clips during a 10-min file wait p50 190 ms with 2, 280 ms with 4;
# 1 is no better, and a GPU gains from the pair
STEP_WINDOWS = 2
# Client disconnected before its answer was ready (nginx's code; nothing reads it)
CLIENT_CLOSED = 499
# Seconds a client may stay silent: before its request's headers are complete, between parts of its
# body, and idle between requests
TIMEOUT_S = ServeLimits.timeout_s
# Open connections (requests included) before new requests get 503
MAX_CONNECTIONS = ServeLimits.max_connections
MAX_CLIENT_CONNECTIONS = ServeLimits.max_client_connections
# Decoded audio the whole server may hold in flight, in MiB of float32 samples (a request holds one
# decoding block of its file, at the file's own rate and channels: 30 s of 384 kHz is 44 MiB): past it a
# request waits for others to finish (up to --timeout-s, then 503); a request alone is always served
MAX_DECODING_MB = ServeLimits.max_decoding_mb
# seconds a client may ask for as hop_s at most (past the end of any audio the server accepts)
MAX_HOP_S = 3600.0
# What the page may load: itself, its inline style and script (and /listen-worklet.js), and the blob: URL of the
# chosen file.
PAGE_CSP = ("default-src 'self'; style-src 'unsafe-inline'; script-src 'self' 'unsafe-inline'; "
            "media-src blob:; img-src data:; object-src 'none'; base-uri 'none'")


class OverLimit(HTTPException):
    """A request over one of the server's limits (413 or 422): in a batch, the whole request is refused."""


def _upload_suffix(filename: Optional[str]) -> str:
    """The client's extension when it is a known audio one (a hint for the decoder), else none."""
    suffix = Path(filename or "").suffix.lower()
    return suffix if suffix in AUDIO_EXTENSIONS else ""


def _add_offline_docs(app: "FastAPI") -> None:
    """Swagger UI at /docs from the swagger-ui-bundle package: FastAPI's default loads it from a CDN,
    which leaves the page blank on an offline machine."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    try:
        from swagger_ui_bundle import swagger_ui_path
        app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")
        assets = {"swagger_js_url": "/docs-assets/swagger-ui-bundle.js", "swagger_css_url": "/docs-assets/swagger-ui.css",
                  "swagger_favicon_url": "/docs-assets/favicon-32x32.png"}
    except ImportError:  # still works online, from the CDN
        assets = {}

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="audioclf API", **assets)


def create_app(model, max_upload_mb: float = ServeLimits.max_upload_mb, device: str = PredictOptions.device, *,
               max_audio_s: float = ServeLimits.max_audio_s, max_windows: int = ServeLimits.max_windows,
               timeout_s: float = TIMEOUT_S, cors_origin: Optional[str] = ServeLimits.cors_origin,
               max_decoding_mb: float = MAX_DECODING_MB, reject: bool = PredictOptions.reject,
               **listen_limits) -> FastAPI:
    """The serving app for ``model``: a :class:`~audioclf.predict.Classifier`, or anything
    :func:`audioclf.load` reads (run directory, ``.pt``, safetensors export), loaded here, once.

    Args:
        model: a Classifier or a model path.
        max_upload_mb (float): largest accepted upload in MiB; bigger ones get 413. (Default: ``50``)
        device (str): ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, for a model path. (Default: ``"auto"``)
        max_audio_s (float): longest decoded audio in seconds; longer gets 413. (Default: ``600``)
        max_windows (int): most sliding windows one request may ask for; more gets 422. (Default: ``2000``)
        timeout_s (float): seconds a request body may stall before it gets 408. (Default: ``TIMEOUT_S``, 10)
        cors_origin (str, optional): the one origin whose pages may call the API from a browser.
            (Default: none, same-origin only)
        max_decoding_mb (float): decoded audio in flight across all requests, in MiB; past it requests
            wait (503 after ``timeout_s``). (Default: ``MAX_DECODING_MB``, 256)
        reject (bool): answer ``unknown`` below the model's rule, for a model path. (Default: ``True``)
        listen_limits: the bounds of ``/listen`` streams, :class:`~audioclf.options.ServeLimits`' fields
            (``max_listeners``, ``max_listen_s``, ``listen_idle_s``, ``max_chunk_s``, ``max_listen_speed``,
            ``listen_hop_s``; :mod:`audioclf.serve_listen`).
    """
    from .predict import Classifier, LimitError, count_windows, load

    limits = ServeLimits(max_upload_mb=max_upload_mb, max_audio_s=max_audio_s, max_windows=max_windows,
                         timeout_s=timeout_s, cors_origin=cors_origin, max_decoding_mb=max_decoding_mb,
                         **listen_limits)  # refuses a value out of its range
    budget = DecodingBudget(int(max_decoding_mb * MIB), timeout_s)
    clf = model if isinstance(model, Classifier) else load(model, device, reject=reject)
    labels, features = list(clf.labels), clf.config.features
    sr, max_window_s = features.sample_rate, max(MAX_WINDOW_S, features.duration_s)
    step_samples = STEP_WINDOWS * features.n_samples
    health = Health(status="ok", audioclf_version=__version__, backbone=clf.config.model.backbone,
                    task=clf.config.train.task, classes=labels, n_classes=len(labels),
                    weights_sha256=sha256(clf.weights_file) if clf.weights_file else None,
                    sample_rate=features.sample_rate, window_s=features.duration_s,
                    device=str(next(clf.model.parameters()).device), max_upload_mb=max_upload_mb,
                    max_audio_s=max_audio_s, max_windows=max_windows)
    page = importlib.resources.files("audioclf").joinpath("static/index.html").read_text(encoding="utf-8")
    model_lock = threading.Lock()

    def check_window(window_s: Optional[float], hop_s: Optional[float]) -> tuple[float, int, int]:
        """The client's window and hop checked against the server's ranges: (window_s, window, hop), in
        seconds and samples; a hop left out is the Classifier's default."""
        window_s = features.duration_s if window_s is None else window_s
        for name, value in (("window_s", window_s), ("hop_s", hop_s)):
            if value is not None and not math.isfinite(value):
                raise HTTPException(422, f"{name}={value} must be a finite number of seconds")
        if hop_s is not None and hop_s > MAX_HOP_S:
            raise HTTPException(422, f"hop_s={hop_s:g} is out of range: this server allows at most {MAX_HOP_S:g} s")
        if not MIN_WINDOW_S <= window_s <= max_window_s:
            raise HTTPException(422, f"window_s={window_s:g} is out of range: this server allows "
                                     f"{MIN_WINDOW_S:g} to {max_window_s:g} s")
        if hop_s is not None and hop_s < MIN_HOP_FRACTION * window_s:
            raise HTTPException(422, f"hop_s={hop_s:g} is out of range: with window_s={window_s:g} this server "
                                     f"allows hop_s >= {MIN_HOP_FRACTION * window_s:g} s ({MIN_HOP_FRACTION:g} x window_s)")
        window = round(window_s * sr)
        return window_s, window, default_hop(window) if hop_s is None else max(1, round(hop_s * sr))

    def open_upload(upload: UploadFile, shown: str, path: Path, window: int, hop: int,
                    used: tuple[float, int] = (0.0, 0)) -> tuple[float, int, int]:
        """In a worker thread: copy the upload to ``path``, check from its header that it opens and fits the
        limits (less ``used``: the seconds and windows of a batch's files before it), before the model's turn.
        ``shown`` names it in messages. Returns its duration in seconds, its number of windows and the bytes
        its decoding holds."""
        with open(path, "wb") as f:
            shutil.copyfileobj(upload.file, f)
        if path.stat().st_size == 0:
            raise HTTPException(400, f"{shown}: the uploaded file is empty (0 bytes)")
        try:
            duration_s = audio_duration_s(path)
        except AudioclfError as e:
            raise HTTPException(415, str(e).replace(str(path), shown)) from None
        others = f" after {used[0]:.1f} s in the batch's other files" if used[0] else ""
        if used[0] + duration_s > max_audio_s:
            raise OverLimit(413, f"{shown}: {duration_s:.1f} s of audio{others}; the limit is {max_audio_s:g} s "
                                     f"a request (audioclf serve --max-audio-s)")
        n = count_windows(math.ceil(duration_s * sr), window, hop)
        if used[1] + n > max_windows:
            others = f" after {used[1]} in the batch's other files" if used[1] else ""
            raise OverLimit(422, f"{shown}: window_s={window / sr:g} and hop_s={hop / sr:g} give {n} windows over "
                                     f"{duration_s:.1f} s{others}; the limit is {max_windows} a request (audioclf serve "
                                     f"--max-windows): use a longer hop_s")
        return duration_s, n, decoding_bytes(path)

    def step(steps):
        """In a worker thread: one model step of a request, holding the model for that step only."""
        with model_lock:
            return next(steps)

    async def finish(request: Request, steps, shown: str, path: Path, decoded: int):
        """Run ``steps`` (a Classifier's ``*_steps``) to its result, a model step at a time, holding ``decoded``
        bytes of the decoding budget; ``None`` when the client has gone (the work stops at the next step).
        Errors name the upload, never its path."""
        try:
            async with budget.hold(decoded, shown):
                while (result := await run_in_threadpool(step, steps)) is None:
                    if await request.is_disconnected():
                        log.info("%s: the client disconnected; classification cancelled", shown)
                        return None
            return result
        except LimitError as e:
            raise OverLimit(413, str(e).replace(str(path), shown)) from None
        except AudioclfError as e:
            raise HTTPException(422, str(e).replace(str(path), shown)) from None
        finally:
            steps.close()  # closes the file before its folder is removed

    def limits_left(used: tuple[float, int] = (0.0, 0)) -> dict:
        """What a file may still decode to, counted as it decodes: the request's limits less ``used``, the
        seconds and windows of a batch's files before it."""
        return {"max_duration_s": max_audio_s - used[0], "max_windows": max_windows - used[1]}

    def prediction(result: dict) -> dict:
        return {**result, "probs": dict(zip(labels, result["probs"]))}

    def no_file() -> HTTPException:
        return HTTPException(400, "no file uploaded: POST multipart/form-data with the audio in the field 'file'")

    def upload_path(tmp: str, upload: UploadFile, number: str = "") -> Path:
        """A generated name in ``tmp``: the client's name is never part of a path."""
        return Path(tmp) / f"upload{number}{_upload_suffix(upload.filename)}"

    app = FastAPI(title="audioclf", version=__version__, docs_url=None,
                  description=f"Audio classification with {len(labels)} classes: {', '.join(labels)}.")
    _add_offline_docs(app)
    app.add_middleware(BodyLimits, max_bytes=int(max_upload_mb * MIB) + MULTIPART_SLACK,
                       max_upload_mb=max_upload_mb, timeout_s=timeout_s)
    if cors_origin:  # off by default: a page from another site cannot read the answers
        app.add_middleware(CORSMiddleware, allow_origins=[cors_origin], allow_methods=["GET", "POST"])

    @app.post("/predict", response_model=Prediction, response_model_exclude_none=True,
              responses={400: {"description": "no file, or an empty one"}, 408: {"description": "the body stalled"},
                         413: {"description": "upload or audio over the server's limits"},
                         415: {"description": "the file cannot be decoded as audio"},
                         422: {"description": "invalid parameters, too many windows, or audio that fails to "
                                              "decode part-way"}})
    async def predict(request: Request,
                      file: Optional[UploadFile] = File(None, description="audio file: WAV, FLAC, OGG, MP3, ..."),
                      timeline: bool = Query(False, description="add per-window predictions (sliding window)"),
                      top_k: int = Query(3, ge=1, description="classes to return, most probable first"),
                      window_s: Optional[float] = Query(None, gt=0, allow_inf_nan=False,
                                                        description="sliding-window length in s "
                                                        "for long files (default: the training duration)"),
                      hop_s: Optional[float] = Query(None, gt=0, allow_inf_nan=False,
                                                     description="seconds between window starts "
                                                     "(default: half the window)")):
        """Classify one uploaded audio file."""
        if file is None:
            raise no_file()
        window_s, window, hop = check_window(window_s, hop_s)
        shown = Path(file.filename or "upload").name  # for messages only, never a path
        with tempfile.TemporaryDirectory(prefix="audioclf-upload-") as tmp:
            path = upload_path(tmp, file)
            *_, decoded = await run_in_threadpool(open_upload, file, shown, path, window, hop)
            steps = clf.classify_steps(path, timeline=timeline, top_k=min(top_k, len(labels)), window_s=window_s,
                                       hop_s=hop_s, batch_size=max(1, step_samples // window), **limits_left())
            result = await finish(request, steps, shown, path, decoded)
            return Response(status_code=CLIENT_CLOSED) if result is None else prediction(result)

    @app.post("/predict_batch", response_model=Batch, response_model_exclude_none=True,
              responses={400: {"description": "no files, or an empty one"}, 408: {"description": "the body stalled"},
                         413: {"description": "the uploads or their audio together over the server's limits"},
                         422: {"description": "invalid parameters, or too many windows in all"}})
    async def predict_batch(request: Request,
                            files: list[UploadFile] = File(default_factory=list, description="audio files: repeat "
                                                           "the field 'files' once per file"),
                            timeline: bool = Query(False, description="add per-window predictions"),
                            top_k: int = Query(3, ge=1, description="classes to return, most probable first"),
                            window_s: Optional[float] = Query(None, gt=0, description="sliding-window length in s"),
                            hop_s: Optional[float] = Query(None, gt=0, description="seconds between window starts")):
        """Classify several uploaded files in one request: one result per file, in upload order. A file that
        cannot be decoded gets an ``error`` and the others are still classified; the server's limits hold for
        the files together."""
        if not files:
            raise HTTPException(400, "no files uploaded: POST multipart/form-data with each audio file in a field "
                                     "named 'files'")
        window_s, window, hop = check_window(window_s, hop_s)
        items, used = [], (0.0, 0)
        with tempfile.TemporaryDirectory(prefix="audioclf-upload-") as tmp:
            for i, upload in enumerate(files):
                shown = Path(upload.filename or f"upload{i}").name
                path = upload_path(tmp, upload, str(i))
                try:
                    before = used
                    duration_s, n, decoded = await run_in_threadpool(open_upload, upload, shown, path, window, hop, used)
                    used = (used[0] + duration_s, used[1] + n)  # counted whether it decodes to the end or not
                    steps = clf.classify_steps(path, timeline=timeline, top_k=min(top_k, len(labels)),
                                               window_s=window_s, hop_s=hop_s, batch_size=max(1, step_samples // window),
                                               **limits_left(before))
                    result = await finish(request, steps, shown, path, decoded)
                except OverLimit:
                    raise  # the limits are the request's: the batch as a whole is over them
                except HTTPException as e:  # this file only: empty, undecodable, failing part-way
                    items.append(BatchItem(file=shown, error=e.detail))
                    continue
                finally:
                    path.unlink(missing_ok=True)  # its disk back before the next file
                if result is None:
                    return Response(status_code=CLIENT_CLOSED)
                items.append(BatchItem(file=shown, result=prediction(result)))
        return Batch(results=items)

    @app.post("/embed", response_model=Embedding,
              responses={400: {"description": "no file, or an empty one"}, 408: {"description": "the body stalled"},
                         413: {"description": "upload or audio over the server's limits"},
                         415: {"description": "the file cannot be decoded as audio"},
                         422: {"description": "too many windows, or audio that fails to decode part-way"}})
    async def embed(request: Request, file: Optional[UploadFile] = File(None, description="audio file")):
        """The embedding of one uploaded file: the network's pooled features before its classifier layer,
        averaged over a long file's windows (for search and clustering)."""
        if file is None:
            raise no_file()
        window = features.n_samples
        shown = Path(file.filename or "upload").name
        with tempfile.TemporaryDirectory(prefix="audioclf-upload-") as tmp:
            path = upload_path(tmp, file)
            duration_s, _, decoded = await run_in_threadpool(open_upload, file, shown, path, window, default_hop(window))
            vector = await finish(request, clf.embed_steps(path, batch_size=STEP_WINDOWS, **limits_left()), shown, path,
                                  decoded)
            if vector is None:
                return Response(status_code=CLIENT_CLOSED)
            return Embedding(embedding=vector.tolist(), dim=len(vector), duration_s=duration_s)

    def draw_explanation(path: Path, shown: str, label: Optional[str]) -> bytes:
        """In a worker thread: the PNG of :func:`audioclf.explain.explain`, holding the model throughout (one
        forward pass per occluded patch: seconds, not a few windows)."""
        from .explain import explain, plot_explanation

        with model_lock:
            result = explain(clf, path, label=label)
        result["path"] = shown
        return plot_explanation(result, path.with_suffix(".png")).read_bytes()

    @app.post("/explain", response_class=Response,
              responses={200: {"content": {"image/png": {}}, "description": "the explanation, drawn"},
                         400: {"description": "no file, or an empty one"},
                         413: {"description": "upload or audio over the server's limits"},
                         415: {"description": "the file cannot be decoded as audio"},
                         422: {"description": "a label the model does not have, or audio that fails to decode"}})
    async def explain_upload(file: Optional[UploadFile] = File(None, description="audio file: WAV, FLAC, OGG, MP3, ..."),
                             label: Optional[str] = Query(None, description="class to explain (default: the "
                                                          "predicted one)")):
        """Where in time and frequency the model's evidence for a class lies: occlusion over the log-mel,
        drawn over the spectrogram as a PNG (``audioclf explain``)."""
        if file is None:
            raise HTTPException(400, "no file uploaded: POST multipart/form-data with the audio in the field 'file'")
        if label is not None and label not in labels:
            raise HTTPException(422, f"label={label!r} is not one of the model's classes: {', '.join(labels)}")
        shown = Path(file.filename or "upload").name
        _, window, hop = check_window(None, None)
        with tempfile.TemporaryDirectory(prefix="audioclf-upload-") as tmp:
            path = upload_path(tmp, file)
            *_, decoded = await run_in_threadpool(open_upload, file, shown, path, window, hop)
            try:
                async with budget.hold(decoded, shown):  # explain decodes the whole file
                    png = await run_in_threadpool(draw_explanation, path, shown, label)
            except AudioclfError as e:
                raise HTTPException(422, str(e).replace(str(path), shown)) from None
        return Response(png, media_type="image/png")
    detect_config = _detect_config(model, clf)

    @app.post("/detect", response_model=Detection,
              responses={400: {"description": "no file, or an empty one"}, 413: {"description": "over the limits"},
                         415: {"description": "the file cannot be decoded as audio"},
                         422: {"description": "an unknown class in ignore, or too many windows"}})
    async def detect(request: Request,
                     file: Optional[UploadFile] = File(None, description="audio file: WAV, FLAC, OGG, MP3, ..."),
                     ignore: str = Query("", description="classes never reported, comma-separated (e.g. rain,wind)")):
        """Sound events in one uploaded file: onsets, offsets (s), labels and scores, with the detect settings
        saved with the model (``audioclf detect --tune``)."""
        from .events import check_ignore, find_events, track_steps

        if file is None:
            raise no_file()
        try:
            ignored = check_ignore([x.strip() for x in ignore.split(",") if x.strip()], labels)
        except AudioclfError as e:
            raise HTTPException(422, str(e).replace("--ignore", "ignore=")) from None
        frames = detect_config.source == "frames"
        window_s = features.duration_s if frames else detect_config.window_s
        window = round(window_s * sr)
        hop = round((window_s / 2 if frames else detect_config.hop_s) * sr)
        shown = Path(file.filename or "upload").name
        with tempfile.TemporaryDirectory(prefix="audioclf-upload-") as tmp:
            path = upload_path(tmp, file)
            *_, decoded = await run_in_threadpool(open_upload, file, shown, path, window, hop)
            steps = track_steps(clf, path, detect_config, batch_size=max(1, step_samples // window), **limits_left())
            result = await finish(request, steps, shown, path, decoded)
            if result is None:
                return Response(status_code=CLIENT_CLOSED)
        _, duration_s, track = result
        events = find_events(track, labels, detect_config, filename=shown, duration_s=duration_s, ignore=ignored)
        return Detection(duration_s=duration_s, events=[DetectedEvent(onset=e.onset, offset=e.offset, label=e.event_label,
                                                                      score=e.score) for e in events])

    add_listen(app, clf, detect_config, model_lock, limits)

    @app.get("/health", response_model=Health)
    def get_health():
        return health

    @app.get("/labels", response_model=Labels)
    def get_labels():
        """Class names, in the order of the model's outputs."""
        return Labels(labels=labels)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index():
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP})

    return app


def _detect_config(model, clf):
    """The detect settings of ``model`` (:func:`audioclf.events.model_settings`)."""
    from .events import DetectConfig, model_settings

    return DetectConfig.from_dict(model_settings(model, clf.config.train.task))


def serve(model_path, host: str = ServeLimits.host, port: int = ServeLimits.port, device: str = PredictOptions.device,
          max_connections: int = MAX_CONNECTIONS, max_client_connections: int = MAX_CLIENT_CONNECTIONS,
          reject: bool = PredictOptions.reject, **limits) -> None:
    """Load the model and serve it with uvicorn on ``host:port`` until interrupted; ``limits`` are
    :func:`create_app`'s keyword arguments. ``timeout_s`` also bounds how long a connection may wait
    for a request's headers and stay idle between requests; past ``max_connections`` open connections,
    a new one displaces the one idle longest (requests get 503 only when none is idle); one client address
    may hold ``max_client_connections``."""
    checked = ServeLimits(host=host, port=port, max_connections=max_connections,
                          max_client_connections=max_client_connections, **limits)
    app = create_app(model_path, device=device, reject=reject, **limits)
    log.info("serving %s on http://%s:%d (web page at /, API docs at /docs)", model_path, host, port)
    uvicorn.run(app, host=host, port=port, log_level="info", ws_max_size=max_message_bytes(checked),
                **uvicorn_options(limits.get("timeout_s", TIMEOUT_S), max_connections, max_client_connections))
