"""What every trick shares: the task contract (what the model outputs, what the targets are)."""

from lightning_tricks.core.task import (
    TASK_KINDS,
    Task,
    TaskNotSupportedError,
    check_task_kind,
    infer_task,
    require_task,
)

__all__ = ["TASK_KINDS", "Task", "TaskNotSupportedError", "check_task_kind", "infer_task", "require_task"]
