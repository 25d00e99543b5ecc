"""The profile: where a gunicorn worker's CPU goes under load, by layer and by concern.

py-spy samples the worker's stacks; each sample is attributed to the functions that
server/hot_path.py names (function objects, so a rename breaks the import) and to the
app's framework entry. A layer every request passes through that no sample reaches means
the names no longer match the code: that is an error, never a row of zeros.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI

from bench.load import wrk
from server.hot_path import CONCERNS, LAYERS

if TYPE_CHECKING:
    from collections.abc import Callable

    from bench.configs import Started
    from bench.settings import Settings

APP_LAYER = ("the app: FastAPI + Starlette, incl. writing the response", FastAPI.__call__)

Stacks = list[tuple[list[tuple[str, str]], int]]  # (frames (function, file), samples)


class ProfileError(RuntimeError):
    """The profile does not find the functions it attributes time to."""


@dataclass(frozen=True)
class Frame:
    """How a function shows in py-spy's output: its name (py-spy prints the bare name or
    the qualified one) and its file, relative to its top-level package."""

    qualname: str
    file: str

    @classmethod
    def of(cls, function: Callable[..., object]) -> Frame:
        target = inspect.unwrap(function)
        module = inspect.getmodule(target)
        if module is None or not module.__name__:
            raise ProfileError(f"{function!r}: no module to find it by")
        suffix = module.__name__.replace(".", "/")
        source = Path(inspect.getsourcefile(target) or "")
        file = f"{suffix}/__init__.py" if source.name == "__init__.py" else f"{suffix}.py"
        return cls(target.__qualname__, file)

    def matches(self, func: str, file: str) -> bool:
        name = self.qualname.rsplit(".", 1)[-1]
        return (func in (self.qualname, name) or func.endswith(f".{name}")) and (
            file == self.file or file.endswith(f"/{self.file}")
        )


_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def parse_collapsed(raw: str) -> Stacks:
    """py-spy's raw (collapsed) format: `frame;frame;... count` per line."""
    stacks: Stacks = []
    for line in raw.splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        frames = []
        for frame in stack.split(";"):
            match = _FRAME.match(frame.strip())
            frames.append((match["func"], match["file"]) if match else (frame, ""))
        stacks.append((frames, int(samples)))
    return stacks


def _share(stacks: Stacks, targets: tuple[Frame, ...]) -> int:
    """Samples with a frame of one of `targets` anywhere on the stack."""
    return sum(
        count
        for frames, count in stacks
        if any(t.matches(func, file) for func, file in frames for t in targets)
    )


def analyse_profile(raw: str) -> str:
    """Each layer's own share of the worker's CPU, the middleware's concerns, top self time.

    Raises ProfileError when no sample reaches a layer (every request passes through each).
    """
    stacks = parse_collapsed(raw)
    total = sum(c for _, c in stacks)
    if total == 0:
        raise ProfileError("the profile holds no samples")
    layers = [(label, (Frame.of(fn),)) for label, fn in (*LAYERS, APP_LAYER)]
    inclusive = [_share(stacks, frames) for _, frames in layers]
    missing = [
        f"{label} ({frames[0].qualname} in {frames[0].file})"
        for (label, frames), n in zip(layers, inclusive, strict=True)
        if n == 0
    ]
    if missing:
        raise ProfileError(
            "no sample in " + "; ".join(missing) + ": every request passes through these, so "
            "their names no longer match the code (server/hot_path.py, bench/profile.py)"
        )
    rows = [
        f"| uvicorn: HTTP parsing, event loop, transport (outside the ASGI app) "
        f"| {(total - inclusive[0]) / total:.1%} |"
    ]
    for index, (label, _) in enumerate(layers):
        inner = inclusive[index + 1] if index + 1 < len(inclusive) else 0
        own = max(0, inclusive[index] - inner)  # sampling can make it dip below 0
        rows.append(f"| {label} | {own / total:.1%} |")
    concern_rows = [
        f"| {label} | {_share(stacks, tuple(Frame.of(fn) for fn in fns)) / total:.1%} |"
        for label, fns in CONCERNS
    ]
    self_time: Counter[str] = Counter()
    for frames, count in stacks:
        func, file = frames[-1]
        self_time[f"{func} ({Path(file).name})"] += count
    top = [f"| {name} | {count / total:.1%} |" for name, count in self_time.most_common(15)]
    return "\n".join(
        [
            "## Profile: gunicorn worker under wrk load (py-spy, on-CPU samples)",
            "",
            f"{total} samples. Own share of the worker's CPU time, outermost layer first:",
            "",
            "| layer | share |",
            "|---|---:|",
            *rows,
            "",
            "Inside ObservabilityMiddleware, by concern (inclusive):",
            "",
            "| concern | share |",
            "|---|---:|",
            *concern_rows,
            "",
            "Top self time (the frame on top of the stack):",
            "",
            "| function | share |",
            "|---|---:|",
            *top,
        ]
    )


def profile_worker(
    started: Started, lua: Path, py_spy: Path, reports: Path, settings: Settings
) -> str:
    """py-spy on the worker of a started gunicorn while wrk loads it."""
    server = started.parts["server"]
    workers = [p for p in server.pids() if p != server.root_pid()]
    if not workers:
        raise ProfileError(f"{server.name}: no gunicorn worker found to profile")
    out = reports / f"profile-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.txt"
    seconds = min(settings.seconds, 10)
    record = subprocess.Popen(
        [
            *("taskset", "-c", str(settings.client_cpu), str(py_spy), "record"),
            *("--pid", str(workers[-1])),
            # Blocking (the default): py-spy pauses the worker for each sample. Slower, but
            # --nonblocking reads torn stacks out of a running asyncio worker.
            *("--rate", "200", "--duration", str(max(1, seconds - 2))),
            *("--format", "raw", "--output", str(out)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wrk(started.url, seconds, lua=lua, parts=started.parts, settings=settings)
    _, err = record.communicate(timeout=60)
    if record.returncode != 0 or not out.exists():
        raise ProfileError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
    print(f"bench: raw profile in {out}", file=sys.stderr)
    return analyse_profile(out.read_text())
