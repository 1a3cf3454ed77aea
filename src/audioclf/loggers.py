"""Experiment tracking beside ``metrics.csv``: ``train.logger`` (``--logger``) sends each epoch's metrics row
and the run's config to TensorBoard or MLflow as well. ``metrics.csv`` is always written; ``csv`` (the
default) adds nothing to it.

``tensorboard``: event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_DIR``), through
``torch.utils.tensorboard``; the config as text, each metric as a scalar by epoch.

``mlflow``: one MLflow run in MLflow's local file store ``RUN_DIR/mlruns`` (``mlflow ui --backend-store-uri
RUN_DIR/mlruns``), no server needed; or where ``MLFLOW_TRACKING_URI`` points, when it is set (a shared
store, a tracking server). The config's settings are the run's parameters (``train.lr``, ...), the metrics
rows its metrics by epoch, and a ``--resume`` continues the same MLflow run.

Both are optional dependencies, imported when chosen: ``pip install "audioclf[tensorboard]"`` or
``"audioclf[mlflow]"``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

from .errors import AudioclfError
from .rundir import RunDir

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
MLRUNS_DIR = "mlruns"
EXPERIMENT = "audioclf"


def _flat(d: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1e-3}}`` as ``{"train.lr": 1e-3}``."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


class Tracker:
    """Where the metrics go beside ``metrics.csv``: nowhere (the ``csv`` logger). Subclasses send them on.

    ``start(config)`` once the config is resolved, ``log(row)`` after each epoch (a metrics.csv row, with its
    ``epoch``), ``close(failed)`` when the run ends, however it ends.
    """

    def start(self, config: dict) -> None:
        pass

    def log(self, row: dict) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, out: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch imports it lazily: the missing package is tensorboard itself
            raise AudioclfError('--logger tensorboard needs the tensorboard package: '
                                'pip install "audioclf[tensorboard]"') from None
        self.writer = SummaryWriter(str(out / TENSORBOARD_DIR))

    def start(self, config: dict) -> None:
        # two spaces before each line break: TensorBoard's text tab renders Markdown
        self.writer.add_text("config", "  \n".join(f"{k}: {v}" for k, v in _flat(config).items()))

    def log(self, row: dict) -> None:
        for k, v in row.items():
            if k != "epoch":
                self.writer.add_scalar(k, v, row["epoch"])
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    def __init__(self, out: Path):
        try:
            import mlflow  # noqa: F401 (mlflow-skinny provides it too)
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise AudioclfError('--logger mlflow needs MLflow: pip install "audioclf[mlflow]"') from None
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (out / MLRUNS_DIR).resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode and refuses it unless asked: it is still the
            # one store that needs neither a server nor a database
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client, self.out, self.uri = MlflowClient(tracking_uri=uri), out, uri
        self.run_id: Optional[str] = None

    def start(self, config: dict) -> None:
        saved = RunDir(self.out).mlflow_run
        if saved.is_file():  # a --resume: the same MLflow run, if this store holds it
            run_id = json.loads(saved.read_text()).get("run_id")
            try:
                self.client.get_run(run_id)
                self.run_id = run_id
                return
            except Exception:  # another store, or the run was deleted: start one
                log.warning("%s: MLflow run %s is not in %s; starting a new one", saved, run_id, self.uri)
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)
        run = self.client.create_run(experiment_id, run_name=self.out.resolve().name,
                                     tags={"audioclf.run_dir": str(self.out.resolve())})
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)[:500]) for k, v in _flat(config).items()]  # MLflow's limit on a value
        for i in range(0, len(params), 100):  # MLflow's limit on one batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        saved.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.uri}) + "\n")
        log.info("MLflow run %s in %s", self.run_id, self.uri)

    def log(self, row: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, int(row["epoch"]))
                                                    for k, v in row.items() if k != "epoch"])

    def close(self, failed: bool = False) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


_TRACKERS = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker}


def open_tracker(name: str, out: Path) -> Tracker:
    """The tracker ``train.logger`` names (``csv``, ``tensorboard`` or ``mlflow``), writing under the run
    directory ``out``."""
    if name == "csv":
        return Tracker()
    if name not in _TRACKERS:
        raise AudioclfError(f"Unsupported logger={name!r}; choose csv, {', '.join(_TRACKERS)}")
    return _TRACKERS[name](Path(out))
