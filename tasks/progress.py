"""Progress for long work: a bar in the terminal and, inside a Prefect task run, a progress artifact in the UI."""

import sys
import time

from tqdm.auto import tqdm

UPDATE_EVERY_S = 2.0  # the UI polls; writing more often only loads the API
LOG_EVERY_PERCENT = 10  # without a terminal (a log file, CI) one plain line per this much progress instead of a bar


class Progress:
    """Call it with (done, total, metrics) from a training or generation loop; close it when the loop ends."""

    def __init__(self, step: str, total: int, unit: str = "it"):
        self.step = step
        self.bar = tqdm(total=total, desc=step, unit=unit, file=sys.stderr, dynamic_ncols=True,
                        disable=not sys.stderr.isatty())
        self.artifact_id = None
        self.last_update = 0.0
        self.last_logged_percent = 0
        from prefect.context import TaskRunContext

        if TaskRunContext.get() is not None:
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(0.0, key=None, description=f"{step}: progress")

    def __call__(self, done: int, total: int | None = None, metrics: dict | None = None) -> None:
        if total is not None and total != self.bar.total:
            self.bar.total = total
        self.bar.n = done
        if metrics:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))},
                                 refresh=False)
        self.bar.refresh()
        percent = 100 * done // max(self.bar.total or 1, 1)
        if self.bar.disable and percent >= self.last_logged_percent + LOG_EVERY_PERCENT:
            self.last_logged_percent = percent - percent % LOG_EVERY_PERCENT
            shown = ", ".join(f"{k} {v:.4g}" for k, v in (metrics or {}).items() if isinstance(v, (int, float)))
            print(f"{self.step}: {done}/{self.bar.total} ({percent}%){' ' + shown if shown else ''}", file=sys.stderr,
                  flush=True)
        now = time.monotonic()
        if self.artifact_id is not None and (now - self.last_update >= UPDATE_EVERY_S or done >= (self.bar.total or 0)):
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact_id, 100.0 * done / max(self.bar.total or 1, 1))
            self.last_update = now

    def close(self) -> None:
        self.bar.close()


def trainer_callback(step: str):
    """A TrainerCallback that drives a Progress and keeps the logged history (loss, lr, rewards, ...)."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def __init__(self):
            self.progress = None
            self.history: list[dict] = []

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.progress = Progress(step, state.max_steps, unit="step")

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress(state.global_step, state.max_steps, self.history[-1] if self.history else None)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                self.history.append({"step": state.global_step, **logs})

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress(state.global_step, state.max_steps)
                self.progress.close()

    return ProgressCallback()


def last_complete_checkpoint(folder) -> str | None:
    """The newest Trainer checkpoint that was written to the end, after deleting any that a kill cut short.

    The Trainer writes trainer_state.json last and not atomically: a checkpoint is complete when that file parses.
    """
    import json
    import shutil
    from pathlib import Path

    folder = Path(folder)
    complete = []
    for ckpt in folder.glob("checkpoint-*") if folder.is_dir() else []:
        try:
            json.loads((ckpt / "trainer_state.json").read_text())
            complete.append(ckpt)
        except (FileNotFoundError, json.JSONDecodeError):
            shutil.rmtree(ckpt)
    return str(max(complete, key=lambda p: int(p.name.split("-")[1]))) if complete else None
