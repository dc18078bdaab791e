"""What every trick shares: the task contract (what the model outputs, what the targets are)."""

from lightning_tricks.core.task import (
    TASK_KINDS,
    Task,
    TaskNotSupportedError,
    aligned_with_inputs,
    check_task_kind,
    infer_target_task,
    infer_task,
    require_task,
)

__all__ = ["TASK_KINDS", "Task", "TaskNotSupportedError", "aligned_with_inputs", "check_task_kind", "infer_target_task",
           "infer_task", "require_task"]
