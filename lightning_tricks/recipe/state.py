"""The recipe's state file: which steps are done, with their results, so a re-run resumes after the last one.

``OUT/recipe.json`` holds the settings that define the recipe (checked on every re-run: another config,
search space, budget or ensemble choice in the same folder is refused in one line) and, per step,
``{"done": true, "result": {...}}``. It is rewritten atomically (a temporary file renamed over it), so a
process killed while writing leaves the previous state, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lightning_tricks.core.validation import ConfigError

STATE_FILE = "recipe.json"


class RecipeState:
    """The state file of one output folder."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / STATE_FILE
        self.data: dict[str, Any] = {"settings": None, "steps": {}}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError as err:
                raise ConfigError(f"the recipe state {str(self.path)!r} is not valid JSON ({err.msg}): delete it to "
                                  "start the recipe again, or use another --out.") from None

    def check_settings(self, identity: dict[str, Any]) -> None:
        """Record ``identity`` on the first run; refuse a re-run in the same folder with other settings."""
        identity = json.loads(json.dumps(identity))
        recorded = self.data.get("settings")
        if recorded is None:
            self.data["settings"] = identity
            self.save()
            return
        differ = sorted(k for k in set(identity) | set(recorded) if identity.get(k) != recorded.get(k))
        if differ:
            raise ConfigError(f"{self.path.parent} holds a recipe started with other settings ({', '.join(differ)} "
                              "differ): run the same command to resume it, or pass another --out.")

    def done(self, step: str) -> bool:
        return bool(self.data["steps"].get(step, {}).get("done"))

    def result(self, step: str) -> dict[str, Any]:
        return dict(self.data["steps"].get(step, {}).get("result") or {})

    def finish(self, step: str, result: dict[str, Any]) -> None:
        self.data["steps"][step] = {"done": True, "result": result}
        self.save()

    def seconds_spent(self) -> float:
        return sum(float((s.get("result") or {}).get("seconds") or 0.0) for s in self.data["steps"].values())

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=False))
        os.replace(tmp, self.path)


__all__ = ["STATE_FILE", "RecipeState"]
