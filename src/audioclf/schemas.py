"""The shapes of the HTTP API's answers (:mod:`audioclf.serve`), from which FastAPI writes the OpenAPI schema
at ``/docs``. Needs pydantic, which the ``serve`` extra installs with FastAPI."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel


class ClassProb(BaseModel):
    label: str
    prob: float


class Window(BaseModel):
    start_s: float
    end_s: float
    label: str
    confidence: float
    tags: Optional[list[ClassProb]] = None  # a multilabel model's


class Prediction(BaseModel):
    label: str
    confidence: float
    probs: dict[str, float]  # every class, in the order of /labels
    top_k: list[ClassProb]
    duration_s: float
    # a multilabel model's: every class whose probability reaches its threshold, most probable first
    tags: Optional[list[ClassProb]] = None
    windows: Optional[list[Window]] = None  # only with ?timeline=1
    score: Optional[float] = None  # known-class score of the model's unknown rule; label "unknown" below threshold
    threshold: Optional[float] = None


class BatchItem(BaseModel):
    file: str  # the uploaded file's name
    result: Optional[Prediction] = None
    error: Optional[str] = None  # why this file could not be classified (the others still are)


class Batch(BaseModel):
    results: list[BatchItem]  # in upload order


class Embedding(BaseModel):
    embedding: list[float]
    dim: int
    duration_s: float


class DetectedEvent(BaseModel):
    onset: float  # s
    offset: float  # s
    label: str
    score: float


class Detection(BaseModel):
    duration_s: float
    events: list[DetectedEvent]


class Health(BaseModel):
    status: str
    audioclf_version: str
    backbone: str
    task: str  # multiclass or multilabel
    classes: list[str]
    n_classes: int
    weights_sha256: Optional[str]  # of the weights file served (None for a model built in Python)
    sample_rate: int  # Hz, uploads are resampled to it
    window_s: float  # seconds of audio the model sees at once
    device: str
    max_upload_mb: float
    max_audio_s: float  # per request, a batch's files together
    max_windows: int  # per request, a batch's files together


class Labels(BaseModel):
    labels: list[str]
