"""What the checkpoint-loading engines (vllm.py, transformers.py) share: finding the checkpoint
folder, reading its model type, the output-token budget that decides ``too_long``, and which
requests of a batch run at all (:func:`admit`).

Plain Python only (no torch, no pydantic at import): the transformers engine's GPU benchmark runs
where little else is installed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..constants import Status
from .base import EngineRequest, EngineResult, EngineUnavailable
from .prompts import PromptBuilder, normalize_language


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the Hugging Face hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model(name: str, engine: str = "vllm") -> Path:
    """A local checkpoint folder for ``name``: the folder itself, or a hub snapshot.

    No silent fallback: when ``name`` is not a folder and the hub is forbidden
    (``HF_HUB_OFFLINE=1``) or unreachable, the error names the engine and the model and says the
    hub is needed.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if hub_offline():
        raise EngineUnavailable(
            f"{engine} model {name!r} is not a local folder, and fetching it needs the Hugging Face hub, "
            "which HF_HUB_OFFLINE=1 forbids; give a local checkpoint folder"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name))
    except Exception as e:  # noqa: BLE001 - network, auth or missing repo: all mean "cannot get it"
        raise EngineUnavailable(
            f"{engine} model {name!r} is not a local folder and the Hugging Face hub, which it needs, "
            f"did not provide it: {e}"
        ) from e


def model_type(checkpoint: Path) -> str | None:
    """``model_type`` from the checkpoint's config.json."""
    try:
        return json.loads((checkpoint / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise EngineUnavailable(f"cannot read {checkpoint / 'config.json'}: {e}") from e


def machine_threads() -> int:
    """The cores this process may run on: what an engine on CPU uses for its model's threads (a
    Ray CPU reservation schedules work; it does not size a model's thread pool)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def output_budget(duration_s: float, prompt_tokens: int, *, max_model_len: int,
                  max_output_tokens_per_s: float, min_output_tokens: int) -> int | str:
    """Output tokens a clip may generate, or the reason it is too long.

    The clip wants ``max(min_output_tokens, ceil(duration_s * max_output_tokens_per_s))``; the
    context has ``max_model_len - prompt_tokens`` left. Less room than the smaller of the two
    means the clip does not fit (status ``too_long``); else the budget is the smaller of want and
    room.
    """
    wanted = max(min_output_tokens, math.ceil(duration_s * max_output_tokens_per_s))
    room = max_model_len - prompt_tokens
    if room < min(wanted, min_output_tokens):
        return (f"{duration_s:.1f} s of audio needs {prompt_tokens} prompt tokens; "
                f"max_model_len {max_model_len} leaves no room for output")
    return min(wanted, room)


def admit(requests: Sequence[EngineRequest], prompts: PromptBuilder,
          max_tokens: Callable[[EngineRequest, str], int | str]
          ) -> tuple[list[EngineResult | None], list[tuple[int, EngineRequest, str, int]]]:
    """A batch's results, pre-filled for requests that cannot run (a task the model cannot do:
    ``unsupported_task``; longer than the model holds: ``too_long``, ``max_tokens`` giving the
    reason as text), and the rest as (index, request, prompt, output budget) to run."""
    results: list[EngineResult | None] = [None] * len(requests)
    admitted = []
    for i, req in enumerate(requests):
        language = normalize_language(req.language)
        reason = prompts.unsupported(req)
        if reason:
            results[i] = EngineResult(None, Status.UNSUPPORTED_TASK.value, reason, language=language)
            continue
        prompt = prompts.build(req)
        budget = max_tokens(req, prompt)
        if isinstance(budget, str):
            results[i] = EngineResult(None, Status.TOO_LONG.value, budget, language=language)
            continue
        admitted.append((i, req, prompt, budget))
    return results, admitted
