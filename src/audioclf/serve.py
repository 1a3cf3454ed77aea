"""HTTP serving: a FastAPI app over :meth:`audioclf.predict.Classifier.classify`, run with uvicorn.

``POST /predict``  multipart field ``file`` -> ``{label, confidence, top_k, duration_s[, windows]}``
``GET /health``, ``GET /labels``, ``GET /`` (a self-contained web page), ``/docs`` (OpenAPI).

The model is loaded once, when the app is made. Each request runs in a worker thread, so the event
loop keeps accepting connections while the model works. The Classifier keeps no per-request state;
inference still takes one request at a time (a lock), because torch already spreads one forward pass
over every core and a long file's batch of windows is large: memory stays bounded however many
clients wait. Uploads are capped while they stream in, copied into a fresh temporary directory under a
generated name (the client's file name is never part of a path), and deleted once answered.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Optional

from . import __version__
from .audio import AUDIO_EXTENSIONS, audio_duration_s
from .config import AudioclfError, _check_range

try:
    import uvicorn
    from fastapi import FastAPI, File, HTTPException, Query, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel
except ImportError as e:
    raise AudioclfError(f"serving needs {e.name}, which is not installed: pip install 'audioclf[serve]'") from None
if importlib.util.find_spec("python_multipart") is None and importlib.util.find_spec("multipart") is None:
    raise AudioclfError("serving needs python-multipart for file uploads: pip install 'audioclf[serve]'")

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# Room for the multipart boundary and part headers around a file of exactly the size limit.
MULTIPART_SLACK = 64 * 1024
# What the page may load: itself, its inline style and script, and the blob: URL of the chosen file.
PAGE_CSP = ("default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
            "media-src blob:; img-src data:; object-src 'none'; base-uri 'none'")


class ClassProb(BaseModel):
    label: str
    prob: float


class Window(BaseModel):
    start_s: float
    end_s: float
    label: str
    confidence: float


class Prediction(BaseModel):
    label: str
    confidence: float
    top_k: list[ClassProb]
    duration_s: float
    windows: Optional[list[Window]] = None  # only with ?timeline=1


class Health(BaseModel):
    status: str
    audioclf_version: str
    n_classes: int
    sample_rate: int  # Hz, uploads are resampled to it
    window_s: float  # seconds of audio the model sees at once
    device: str
    max_upload_mb: float


class Labels(BaseModel):
    labels: list[str]


class UploadLimit:
    """ASGI middleware: answer 413 to a request body over ``max_bytes``.

    A declared ``Content-Length`` over the limit is refused before a byte is read; a body without one
    (chunked) is counted as it streams in and refused as soon as it passes the limit.
    """

    def __init__(self, app, max_bytes: int, max_upload_mb: float):
        self.app, self.max_bytes = app, max_bytes
        self.detail = f"upload too large: the limit is {max_upload_mb:g} MB (audioclf serve --max-upload-mb)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse({"detail": self.detail}, status_code=413)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # Raised inside FastAPI's body parsing, which passes HTTPExceptions through to its handler.
                raise HTTPException(413, self.detail)
            return message

        await self.app(scope, limited_receive, send)


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


def create_app(model, max_upload_mb: float = 50.0, device: str = "auto") -> FastAPI:
    """The serving app for ``model``: a :class:`~audioclf.predict.Classifier`, or anything
    :func:`audioclf.load` reads (run directory, ``.pt``, safetensors export), loaded here, once.

    Args:
        model: a Classifier or a model path.
        max_upload_mb (float): largest accepted upload in MiB; bigger ones get 413. (Default: ``50``)
        device (str): ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, for a model path. (Default: ``"auto"``)
    """
    from .predict import Classifier, load

    _check_range("max_upload_mb", max_upload_mb, 0.0, 1e6, low_open=True)
    clf = model if isinstance(model, Classifier) else load(model, device)
    labels, features = list(clf.labels), clf.config.features
    health = Health(status="ok", audioclf_version=__version__, n_classes=len(labels),
                    sample_rate=features.sample_rate, window_s=features.duration_s,
                    device=str(next(clf.model.parameters()).device), max_upload_mb=max_upload_mb)
    page = importlib.resources.files("audioclf").joinpath("static/index.html").read_text(encoding="utf-8")
    model_lock = threading.Lock()

    def classify_upload(upload: UploadFile, **options) -> dict:
        """Runs in a worker thread: copy the upload to a temp file, check it opens, classify it."""
        shown = Path(upload.filename or "upload").name  # for messages only, never a path
        with tempfile.TemporaryDirectory(prefix="audioclf-upload-") as tmp:
            path = Path(tmp) / f"upload{_upload_suffix(upload.filename)}"
            with open(path, "wb") as f:
                shutil.copyfileobj(upload.file, f)
            if path.stat().st_size == 0:
                raise HTTPException(400, f"{shown}: the uploaded file is empty (0 bytes)")
            try:
                audio_duration_s(path)  # opens it: an undecodable upload is refused before the model's turn
            except AudioclfError as e:
                raise HTTPException(415, str(e).replace(str(path), shown)) from None
            try:
                # classify streams a long file from disk in windows, so memory stays bounded
                with model_lock:
                    return clf.classify(path, **options)
            except AudioclfError as e:
                raise HTTPException(422, str(e).replace(str(path), shown)) from None

    app = FastAPI(title="audioclf", version=__version__, docs_url=None,
                  description=f"Audio classification with {len(labels)} classes: {', '.join(labels)}.")
    _add_offline_docs(app)
    app.add_middleware(UploadLimit, max_bytes=int(max_upload_mb * MIB) + MULTIPART_SLACK,
                       max_upload_mb=max_upload_mb)

    @app.post("/predict", response_model=Prediction, response_model_exclude_none=True,
              responses={400: {"description": "no file, or an empty one"}, 413: {"description": "upload too large"},
                         415: {"description": "the file cannot be decoded as audio"},
                         422: {"description": "invalid parameters, or audio that fails to decode part-way"}})
    async def predict(file: Optional[UploadFile] = File(None, description="audio file: WAV, FLAC, OGG, MP3, ..."),
                      timeline: bool = Query(False, description="add per-window predictions (sliding window)"),
                      top_k: int = Query(3, ge=1, description="classes to return, most probable first"),
                      window_s: Optional[float] = Query(None, gt=0, description="sliding-window length in s "
                                                        "for long files (default: the training duration)"),
                      hop_s: Optional[float] = Query(None, gt=0, description="seconds between window starts "
                                                     "(default: half the window)")):
        """Classify one uploaded audio file."""
        if file is None:
            raise HTTPException(400, "no file uploaded: POST multipart/form-data with the audio in the field 'file'")
        return await run_in_threadpool(classify_upload, file, timeline=timeline, top_k=min(top_k, len(labels)),
                                       window_s=window_s, hop_s=hop_s)

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


def serve(model_path, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 50.0,
          device: str = "auto") -> None:
    """Load the model and serve it with uvicorn on ``host:port`` until interrupted."""
    app = create_app(model_path, max_upload_mb=max_upload_mb, device=device)
    log.info("serving %s on http://%s:%d (web page at /, API docs at /docs)", model_path, host, port)
    uvicorn.run(app, host=host, port=port, log_level="info")
