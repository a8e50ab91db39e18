"""The sandbox for generated visual programs: a static check, then a limited child process.

Threat model. A program is untrusted text written by a model (or by whoever controls its prompt). It must not
read or write the host's files, open network connections, start processes, reach the host process's memory
(the model, the image store, credentials in its environment), or exhaust the host's CPU, memory or disk. The
defences, each enough on its own against the common escapes and layered so one slip is not fatal:

1. **Static check** (`check_program`, in the parent, before anything runs): the source is parsed (length and
   nesting capped) and walked. Refused: ``import`` in any form, ``global``/``nonlocal``, classes, ``with``,
   ``async``, ``yield``, ``match``, decorators, bare ``except``; any name or attribute that starts with ``_``;
   any name that is neither a safe builtin (a whitelist: `program_api.SAFE_BUILTIN_NAMES`), an API name nor
   assigned by the program (so ``open``, ``eval``, ``exec``, ``compile``, ``getattr``, ``globals``, ``vars``,
   ``type``, ``object``, ``__import__``, ``breakpoint``… are unknown names); any attribute that is not on a
   whitelist of `ImagePatch` members and plain ``str``/``list``/``dict``/``set`` methods (so ``gi_frame``,
   ``f_globals``, ``mro``, ``format`` and ``format_map`` — whose ``'{0.__class__}'`` fields read attributes
   at run time — are refused).
2. **Restricted run time** (in the child): the program runs with ``__builtins__`` holding only those safe
   builtins (``import`` fails there too: no ``__import__``), a line budget counted by ``sys.settrace`` on the
   program's own frames, a recursion limit, and a capped ``print``. The child is a fresh interpreter started
   with ``-I -S -B`` that imports only the standard library (`program_api`), holds no pixels, no model and no
   parent memory (spawned, never forked: forking a process with torch threads is unsafe), runs with an
   empty environment and ``/`` as its working directory.
3. **Kernel limits** set on the child by the parent (``resource.prlimit`` once it is ready, before it sees the
   program): address space (``memory_mb``), CPU seconds, no file growth (``RLIMIT_FSIZE`` 0), no new file
   descriptors (``RLIMIT_NOFILE`` 0: the pipes it has keep working, no file or socket can be opened), no core files,
   no new processes (``RLIMIT_NPROC`` 0; the kernel does not apply it to root).
4. **Parent-side enforcement**: a wall-clock timeout (the child is killed; time the parent spends answering
   model calls does not count), a cap on model-backed calls, on each message's size and on the value and
   output reported; every request is validated (method name, argument types, boxes clipped to the image).

Not defended: a bug in CPython or the kernel that a whitelisted construct reaches (run untrusted programs from
strangers inside a container or VM as well); CPU and memory the program burns up to its limits.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foveate.tools import program_api

CHILD = Path(program_api.__file__).resolve()
MAX_SOURCE_CHARS = 20_000
MAX_MESSAGE_BYTES = 1 << 20

_STR_METHODS = [
    "capitalize",
    "casefold",
    "center",
    "endswith",
    "find",
    "index",
    "isalnum",
    "isalpha",
    "isdigit",
    "islower",
    "isnumeric",
    "isspace",
    "isupper",
    "join",
    "ljust",
    "lower",
    "lstrip",
    "partition",
    "removeprefix",
    "removesuffix",
    "replace",
    "rfind",
    "rindex",
    "rjust",
    "rpartition",
    "rsplit",
    "rstrip",
    "split",
    "splitlines",
    "startswith",
    "strip",
    "swapcase",
    "title",
    "upper",
    "zfill",
    "count",
]
_CONTAINER_METHODS = [
    "append",
    "extend",
    "insert",
    "pop",
    "remove",
    "sort",
    "reverse",
    "copy",
    "clear",
    "get",
    "items",
    "keys",
    "values",
    "update",
    "setdefault",
    "add",
    "discard",
    "union",
    "intersection",
    "difference",
    "symmetric_difference",
    "issubset",
    "issuperset",
    "index",
    "count",
    "is_integer",
    "real",
    "imag",
]
SAFE_ATTRIBUTES = frozenset(program_api.PATCH_ATTRIBUTES + _STR_METHODS + _CONTAINER_METHODS)
ALLOWED_NAMES = frozenset(program_api.SAFE_BUILTIN_NAMES + ["print"] + list(program_api.API_NAMES))
_REFUSED_NODES: dict[type, str] = {
    ast.Import: "import statements are not allowed",
    ast.ImportFrom: "import statements are not allowed",
    ast.Global: "global is not allowed",
    ast.Nonlocal: "nonlocal is not allowed",
    ast.ClassDef: "class definitions are not allowed",
    ast.With: "with statements are not allowed",
    ast.AsyncWith: "async code is not allowed",
    ast.AsyncFor: "async code is not allowed",
    ast.AsyncFunctionDef: "async code is not allowed",
    ast.Await: "async code is not allowed",
    ast.Yield: "generator functions (yield) are not allowed",
    ast.YieldFrom: "generator functions (yield) are not allowed",
    ast.Match: "match statements are not allowed",
}


class ProgramRefused(ValueError):
    """The static check refused a program; the message is the one-line reason (with the line)."""


def _where(node: ast.AST) -> str:
    line = getattr(node, "lineno", None)
    return f" (line {line})" if line else ""


def _assigned_names(tree: ast.AST) -> set[str]:
    """Every name the program binds: assignments, loop and comprehension targets, functions, parameters."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.Lambda)):
            if isinstance(node, ast.FunctionDef):
                names.add(node.name)
            arguments = node.args
            for arg in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]:
                names.add(arg.arg)
            names.update(a.arg for a in (arguments.vararg, arguments.kwarg) if a is not None)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def check_program(source: str) -> ast.Module:
    """Parse and check ``source`` (see the module docstring); the tree, or `ProgramRefused` with the reason."""
    if not isinstance(source, str):
        raise ProgramRefused(f"the program must be text, got {type(source).__name__}")
    if len(source) > MAX_SOURCE_CHARS:
        raise ProgramRefused(f"the program is longer than {MAX_SOURCE_CHARS} characters")
    try:
        tree = ast.parse(source, filename="<program>")
    except SyntaxError as error:
        raise ProgramRefused(f"syntax error: {error.msg} (line {error.lineno})") from None
    except (RecursionError, MemoryError, ValueError) as error:
        raise ProgramRefused(f"the program cannot be parsed: {type(error).__name__}") from None
    bound = _assigned_names(tree)
    for node in ast.walk(tree):
        reason = _REFUSED_NODES.get(type(node))
        if reason:
            raise ProgramRefused(reason + _where(node))
        if isinstance(node, ast.Name):
            if node.id.startswith("_"):
                raise ProgramRefused(f"names starting with '_' are not allowed: {node.id}{_where(node)}")
            if node.id not in ALLOWED_NAMES and node.id not in bound:
                raise ProgramRefused(f"name {node.id!r} is not available to programs{_where(node)}")
        elif isinstance(node, ast.Attribute):
            if node.attr.startswith("_"):
                raise ProgramRefused(f"attributes starting with '_' are not allowed: .{node.attr}{_where(node)}")
            if node.attr not in SAFE_ATTRIBUTES:
                raise ProgramRefused(f"attribute .{node.attr} is not available to programs{_where(node)}")
        elif isinstance(node, ast.FunctionDef) and node.decorator_list:
            raise ProgramRefused("decorators are not allowed" + _where(node))
        elif isinstance(node, ast.ExceptHandler) and node.type is None:
            raise ProgramRefused("a bare except is not allowed; name the exception" + _where(node))
        elif isinstance(node, (ast.arg, ast.keyword)) and (node.arg or "").startswith("_"):
            raise ProgramRefused(f"names starting with '_' are not allowed: {node.arg}{_where(node)}")
    if not any(isinstance(node, ast.FunctionDef) and node.name == "execute_command" for node in tree.body):
        raise ProgramRefused("the program defines no function execute_command(image_patch)")
    return tree


@dataclass
class Limits:
    """What one program may use. Times in seconds, memory in MiB, sizes in characters."""

    timeout_s: float = 10.0  # wall clock of the child's own work (model calls answered by the parent excluded)
    memory_mb: int = 256  # address space of the child (RLIMIT_AS)
    max_steps: int = 100_000  # lines of the program executed
    max_calls: int = 32  # model-backed calls (find, simple_query, …)
    max_output: int = 10_000  # characters of print output kept
    max_value: int = 10_000  # characters (about) of the returned value
    max_log: int = 200  # geometry calls logged
    recursion_limit: int = 200


@dataclass
class Execution:
    """What happened: ``ok`` and ``value`` or ``error`` (one line), the call log, output and counts."""

    ok: bool
    value: Any = None
    error: str = ""
    log: list[dict[str, Any]] = field(default_factory=list)
    stdout: str = ""
    steps: int = 0
    calls: int = 0
    elapsed_s: float = 0.0


Handler = Callable[[str, list[float] | None, dict[str, Any]], tuple[Any, dict[str, Any]]]


def kernel_limits(limits: Limits) -> dict[str, int]:
    """The ``resource`` limits of a child, by name (set from the parent with prlimit, or by the child itself)."""
    return {
        "RLIMIT_AS": limits.memory_mb * 1024 * 1024,
        "RLIMIT_CPU": int(limits.timeout_s) + 2,
        "RLIMIT_FSIZE": 0,
        "RLIMIT_NOFILE": 0,  # no new descriptor at all, even after closing one; the pipes it has keep working
        "RLIMIT_CORE": 0,
        "RLIMIT_NPROC": 0,
    }


class _Child:
    """The parent's view of one child process: line-buffered reads against a deadline."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", str(CHILD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
            close_fds=True,
            start_new_session=True,  # its own process group: a signal to ours never reaches it, and vice versa
        )
        self.buffer = b""
        self.deadline = time.monotonic() + limits.timeout_s + 5  # start-up gets its own grace

    def restrict(self) -> None:
        """Kernel limits on the ready child (before it receives the program)."""
        for limit, value in kernel_limits(self.limits).items():
            resource.prlimit(self.proc.pid, getattr(resource, limit), (value, value))

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def receive(self) -> dict[str, Any]:
        """The next message; raises TimeoutError past the deadline, EOFError when the child is gone."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk
            if len(self.buffer) > MAX_MESSAGE_BYTES and b"\n" not in self.buffer:
                raise OverflowError
        line, _, self.buffer = self.buffer.partition(b"\n")
        if len(line) > MAX_MESSAGE_BYTES:
            raise OverflowError
        return json.loads(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def death_reason(self) -> str:
        code = self.proc.returncode
        if code < 0:
            name = signal.Signals(-code).name
            if -code == signal.SIGXCPU:
                return f"CPU time limit reached ({int(self.limits.timeout_s) + 2} s)"
            return f"the program's process died ({name})"
        return f"the program's process exited with status {code} without reporting"


def execute(source: str, image_size: tuple[int, int], handler: Handler, limits: Limits | None = None) -> Execution:
    """Check ``source``, run it in a child and answer its model calls with ``handler``.

    ``handler(method, box, args)`` returns ``(result, log_entry)``; it raises `program_api.ProgramCallError`
    (or any `Exception`) to fail the call, which the program sees as a `ProgramCallError`.
    """
    limits = limits or Limits()
    started = time.monotonic()
    try:
        check_program(source)
    except ProgramRefused as refused:
        return Execution(ok=False, error=f"refused: {refused}", elapsed_s=time.monotonic() - started)
    log: list[dict[str, Any]] = []
    calls = 0
    child = _Child(limits)
    try:
        if child.receive().get("type") != "ready":
            return Execution(ok=False, error="the sandbox child did not start", elapsed_s=time.monotonic() - started)
        job = {"source": source, "image_size": list(image_size), **vars(limits)}
        if hasattr(resource, "prlimit"):  # Linux: set from outside, before the child sees the program
            child.restrict()
        else:  # elsewhere the child limits itself before compiling the program
            job["self_limits"] = kernel_limits(limits)
        child.deadline = time.monotonic() + limits.timeout_s
        child.send(job)
        while True:
            message = child.receive()
            kind = message.get("type")
            if kind == "log":
                log.append(message.get("entry", {}))
            elif kind == "call":
                calls += 1
                served = time.monotonic()
                reply = _serve(message, handler, calls, limits, log)
                child.deadline += time.monotonic() - served  # the parent's model time is not the program's
                child.send(reply)
            elif kind == "done":
                return Execution(
                    ok=bool(message.get("ok")),
                    value=message.get("value"),
                    error=str(message.get("error", "")),
                    log=log,
                    stdout=str(message.get("stdout", "")),
                    steps=int(message.get("steps", 0)),
                    calls=calls,
                    elapsed_s=time.monotonic() - started,
                )
            else:
                raise ValueError(f"unknown message type {kind!r}")
    except TimeoutError:
        error = f"timeout: the program ran longer than {limits.timeout_s:g} s"
    except OverflowError:
        error = f"the program sent a message larger than {MAX_MESSAGE_BYTES} bytes"
    except (EOFError, BrokenPipeError):
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(timeout=2)  # it closed its end: let it finish dying before asking how
        error = child.death_reason() if child.proc.poll() is not None else "the program closed the channel"
    except (ValueError, KeyError, TypeError) as problem:  # a malformed message: the child is not trusted
        error = f"the program broke the sandbox protocol: {problem}"
    finally:
        child.kill()
    return Execution(ok=False, error=error, log=log, calls=calls, elapsed_s=time.monotonic() - started)


def _serve(message: dict[str, Any], handler: Handler, calls: int, limits: Limits, log: list) -> dict[str, Any]:
    method, box, args = message.get("method"), message.get("box"), message.get("args") or {}
    entry: dict[str, Any] = {"name": method, "args": args}
    if calls > limits.max_calls:
        error = f"{method}: more than {limits.max_calls} model-backed calls"
        log.append({**entry, "error": error})
        return {"ok": False, "error": error}
    try:
        if not isinstance(args, dict) or (box is not None and not isinstance(box, list)):
            raise ValueError("malformed call")
        result, entry = handler(str(method), box, args)
    except Exception as problem:  # noqa: BLE001 — a failed call is reported to the program, which goes on
        error = str(problem).splitlines()[0] if str(problem) else type(problem).__name__
        error = error if error.startswith(str(method)) else f"{method}: {error}"
        log.append({**entry, "boxes": [box] if box else [], "error": error})
        return {"ok": False, "error": error}
    log.append(entry)
    return {"ok": True, "result": result}
