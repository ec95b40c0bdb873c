"""One-line rich progress bars: rows answered with new tokens per second (generation) and training
steps with the last loss (a transformers TrainerCallback). Only rank 0 shows one."""

from __future__ import annotations

import os
import time


def _bar(extra_column: str, disable: bool = False):
    """A bar `label ━━━━ done/total <extra_column> time left`; `extra_column` formats the task's fields."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(extra_column),
                    TimeRemainingColumn(), transient=False, disable=disable)


class GenerationProgress:
    """Rows done and new tokens per second, as a context manager."""

    def __init__(self, total: int, label: str):
        self.bar = _bar("{task.fields[tps]:>7.1f} tok/s", disable=os.environ.get("RANK", "0") != "0")  # rank 0's share
        self.total_tokens = 0
        self.start = time.perf_counter()
        self.task = self.bar.add_task(label, total=total, tps=0.0)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def advance(self, rows: int, tokens: int) -> None:
        self.total_tokens += tokens
        tps = self.total_tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(self.task, advance=rows, tps=tps)


def training_progress(label: str):
    """A TrainerCallback that shows training steps done and the last logged loss."""
    from transformers import TrainerCallback

    class TrainingProgress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kw):
            if not state.is_world_process_zero:
                return
            self.bar = _bar("loss {task.fields[loss]}")
            self.bar.start()
            self.task = self.bar.add_task(label, total=state.max_steps, loss="-")

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.update(self.task, loss=f"{float(logs['loss']):.4f}")

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(self.task, completed=state.global_step)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.stop()

    return TrainingProgress()
