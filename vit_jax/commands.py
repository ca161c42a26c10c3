"""The commands this package installs, listed by `python -m vit_jax` (`python -m vit_jax NAME ...` runs one),
and the helpers they share."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import re
import secrets
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

# Console script -> (module, what it does). The same table as [project.scripts] in pyproject.toml
# (a test keeps them equal); each script is the module's `main`, so `vit-X ...` == `python -m MODULE ...`.
COMMANDS: dict[str, tuple[str, str]] = {
    "vit-train": ("vit_jax.train", "fine-tune or train on TFDS, an image folder or the digits"),
    "vit-predict": ("vit_jax.predict", "top-k labels for images"),
    "vit-evaluate": ("vit_jax.evaluate", "test accuracy of a checkpoint on a labelled dataset"),
    "vit-visualize": (
        "vit_jax.visualize",
        "attention rollout maps; `figures`: the paper's figures",
    ),
    "vit-checkpoint": ("vit_jax.checkpoint", "inspect and convert .npz / orbax checkpoints"),
    "vit-benchmark": ("vit_jax.benchmark", "img/s and % of the matmul peak on this machine"),
    "vit-summary": ("vit_jax.summary", "per-module parameter table and GFLOPs of a model"),
}


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the error into a one-line usage error)."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
    return value


def user_path(text: str) -> str:
    """argparse type for paths: '~' expanded, which the shell leaves alone in `--flag=~/x`."""
    return os.path.expanduser(text)


def interruptible(main: F) -> F:
    """Wraps a command's `main` so that Ctrl-C ends it with one line and status 130 (the shell's
    code for SIGINT) instead of a KeyboardInterrupt traceback. The commands write their files
    atomically, so an interrupted one leaves no partial output."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started()
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            exit_interrupted()

    return wrapper  # type: ignore[return-value]


def exit_interrupted(message: str = "interrupted") -> NoReturn:
    """Ends the process after Ctrl-C: `message` on stderr, status 130 (the shell's code for SIGINT).

    In a command's own process it leaves at once (os._exit): the interpreter's teardown can crash
    (SIGSEGV) while XLA or TensorFlow threads still run, and the commands' files are complete by
    then (atomic writes, synchronous checkpoints). Elsewhere (a notebook, tests) SystemExit(130).
    """
    print(message, file=sys.stderr, flush=True)
    if launched_as_command():
        with contextlib.suppress(OSError, ValueError):  # a closed pipe
            sys.stdout.flush()
        os._exit(130)
    raise SystemExit(130)


def _interrupted_while_starting(signum: int, frame: Any) -> None:
    exit_interrupted()


def _interpreter_module() -> tuple[str, list[str]] | None:
    """(module, its arguments) when this interpreter was started with `-m module`, else None (a
    script, `-c`, stdin; an `-m` among a script's own arguments is the script's)."""
    argv = list(getattr(sys, "orig_argv", []))[1:]
    while argv and argv[0].startswith("-") and argv[0] not in ("-m", "-c", "-"):
        argv = argv[2:] if argv[0] in ("-X", "-W", "--check-hash-based-pycs") else argv[1:]
    return (argv[1], argv[2:]) if len(argv) >= 2 and argv[0] == "-m" else None


def launched_as_command() -> bool:
    """Whether this process is one of the package's commands (`python -m vit_jax...`, `vit-X`)."""
    module = _interpreter_module()
    if module and (module[0] == "vit_jax" or module[0].startswith("vit_jax.")):
        return True
    return bool(sys.argv) and os.path.basename(sys.argv[0]) in COMMANDS


def command_module() -> str | None:
    """The module of the command this process runs, e.g. "vit_jax.train" for `python -m
    vit_jax.train`, `python -m vit_jax train` or the `vit-train` script; None when it runs none
    (`python -m vit_jax` alone or with an unknown name, any other module, script or `-c`)."""
    module = _interpreter_module()
    if module and module[0] == "vit_jax":
        name = module[1][0] if module[1] else ""
        command = COMMANDS.get(name if name.startswith("vit-") else f"vit-{name}")
        return command[0] if command else None
    if module:
        return module[0] if module[0].startswith("vit_jax.") else None
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    return COMMANDS[name][0] if name in COMMANDS else None


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
# The commands that run training steps, whose temporaries XLA:CPU maps afresh at every step.
HUGE_PAGES_COMMANDS = ("vit_jax.train", "vit_jax.benchmark")
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_environment(
    environ: Mapping[str, str], thp_mode: str | None, libc_version: str | None
) -> dict[str, str] | None:
    """The environment to restart a command's process with so that glibc asks the kernel for
    transparent huge pages (`glibc.malloc.hugetlb=1` added to GLIBC_TUNABLES), or None where that
    would change nothing or is not wanted.

    `thp_mode`: the kernel's setting (the bracketed word of `THP_MODE_FILE`): only "madvise" gives
    huge pages to memory that asks and to no other ("always" already gives them, "never" never
    does). `libc_version`: `os.confstr("CS_GNU_LIBC_VERSION")`, e.g. "glibc 2.36"; the tunable
    exists from glibc 2.35 on. A GLIBC_TUNABLES that already names the tunable is the user's
    choice (`glibc.malloc.hugetlb=0` keeps huge pages off) and is left alone.
    """
    tunables = environ.get("GLIBC_TUNABLES", "")
    if thp_mode != "madvise" or huge_pages_setting(environ) is not None:
        return None
    name, _, version = (libc_version or "").partition(" ")
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return None
    if name != "glibc" or (major, minor) < (2, 35):
        return None
    setting = f"{HUGE_PAGES_TUNABLE}=1"
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{setting}" if tunables else setting}


def huge_pages_setting(environ: Mapping[str, str] | None = None) -> str | None:
    """The value GLIBC_TUNABLES gives `glibc.malloc.hugetlb` in `environ` (default: this process's
    environment), e.g. "1" after `use_huge_pages`; None when it is not set."""
    tunables = (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "")
    pairs = [t.partition("=") for t in tunables.split(":")]
    values = [value for name, _, value in pairs if name == HUGE_PAGES_TUNABLE]
    return values[-1] if values else None


def _thp_mode() -> str | None:
    try:
        with open(THP_MODE_FILE) as f:
            text = f.read()
    except OSError:
        return None
    selected = re.search(r"\[(\w+)\]", text)
    return selected.group(1) if selected else None


def use_huge_pages() -> None:
    """Restarts this process (`os.execve`: the same PID, interpreter, arguments and environment)
    with glibc's transparent huge pages on (`huge_pages_environment`), before anything else has
    run. Only in the process of a command that trains (`HUGE_PAGES_COMMANDS`) on Linux, never where
    the package is imported by other code; where the restart cannot happen, the command runs as
    it is.

    XLA:CPU maps every execution's temporary buffers afresh and unmaps them afterwards, so each
    training step faults all of them in again, 4 KiB at a time: 374k page faults and about 0.8 s of
    kernel time per ViT-B/16 bfloat16 training step at batch 8 (1.4 GiB of temporaries) on 2 cores.
    With huge pages glibc asks for 2 MiB pages for such buffers (madvise), about 1,000 faults a step.
    glibc reads the tunable once, when the process starts, hence the restart. Inference gains
    nothing from them and pays for the process's new memory: on a cloud VM a 2 MiB page not used
    before took 5-12 ms to fault in, 15-40x one freed a step earlier (`vit_jax.evaluate` of 256
    images with ViT-B/16: 42.9-43.9 s against 41.6-41.7 s without).
    """
    orig_argv = getattr(sys, "orig_argv", [])
    if sys.platform != "linux" or not sys.executable or command_module() not in HUGE_PAGES_COMMANDS:
        return
    # The command must be this process's own command line: a multiprocessing child that was given
    # its parent's sys.argv would start over without the data its parent already sent it.
    if _interpreter_module() is None and (not sys.argv or sys.argv[0] not in orig_argv):
        return
    with contextlib.suppress(ValueError, OSError):
        environ = huge_pages_environment(os.environ, _thp_mode(), os.confstr("CS_GNU_LIBC_VERSION"))
        if environ is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, [sys.executable, *orig_argv[1:]], environ)


def quiet_start() -> None:
    """Makes Ctrl-C before a command's `main` runs (importing jax and TensorFlow takes seconds)
    end the process with one line and status 130, not an import traceback. Only in a command's
    own process, and only where Ctrl-C has its default handler; `main` puts that back
    (`interruptible`, train's main)."""
    if (
        launched_as_command()
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ):
        signal.signal(signal.SIGINT, _interrupted_while_starting)


def started() -> None:
    """A command's `main` has begun: Ctrl-C raises KeyboardInterrupt again (see `quiet_start`)."""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A path beside `path` to write to; it becomes `path` when the block ends without an error
    and is removed otherwise (an error, Ctrl-C), so no half-written file is left and an existing
    `path` stays whole until the new file is complete. The name keeps `path`'s extension (writers
    that pick the format from it still do); the writer creates the file, so it gets the usual
    permissions (umask), not tempfile's owner-only ones."""
    directory, base = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    stem, ext = os.path.splitext(base)
    tmp = os.path.join(directory, f".{stem}.{secrets.token_hex(4)}.partial{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cache_dir() -> str:
    """Where vit_jax keeps what it can fetch or compute again (downloaded checkpoints, image-folder
    checks): $VIT_JAX_CACHE, else ~/.cache/vit_jax."""
    return os.environ.get(
        "VIT_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "vit_jax")
    )


# Files `vit_jax.train` writes into a run directory besides config.json; any one of them, with
# config.json, marks a folder as a run (`is_run_directory`).
RUN_FILES = ("labels.txt", "metrics.jsonl", "checkpoints", "model.npz")


def is_run_directory(path: str) -> bool:
    """Whether `path` is a `vit_jax.train` run directory: config.json and one of `RUN_FILES`."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.exists(os.path.join(path, name)) for name in RUN_FILES
    )


def first_line(error: BaseException) -> str:
    """The first line of an exception's text, for one-line error messages ('' when it has none)."""
    return next(iter(str(error).strip().splitlines()), "")


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is XLA running out of memory: RESOURCE_EXHAUSTED from a run (a buffer the
    device could not allocate; on CPU, memory the kernel refused) or, on TPU, from a compile."""
    text = str(error)
    return (
        isinstance(error, RuntimeError)
        and "RESOURCE_EXHAUSTED" in text
        and re.search(r"memory|allocat", text, re.IGNORECASE) is not None
    )


# A container's memory: cgroup v2's files, then v1's, each as (limit, use, stats, the stats' key of the
# reclaimable file cache). The limit reads "max" (v2), or a huge number (v1), when there is none.
CGROUP_MEMORY_FILES = (
    (
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory.current",
        "/sys/fs/cgroup/memory.stat",
        "file",
    ),
    (
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        "/sys/fs/cgroup/memory/memory.stat",
        "total_cache",
    ),
)


def _cgroup_memory() -> tuple[int | None, tuple[str, str, str, str] | None]:
    """The memory limit of this process's cgroup (None: "max", no limit) and its files (an entry of
    `CGROUP_MEMORY_FILES`, the first whose limit file exists; None when neither does)."""
    for files in CGROUP_MEMORY_FILES:
        with contextlib.suppress(OSError), open(files[0]) as f:
            text = f.read().strip()
            return (int(text) if text.isdigit() else None), files
    return None, None


def device_memory_gib(device: Any) -> float | None:
    """GiB that `device`'s buffers can use: its allocator's limit on GPU and TPU; for a CPU device
    (all CPU devices share it) the machine's RAM, or the container's memory limit where that is
    lower; None when neither is known."""
    stats = None
    with contextlib.suppress(Exception):  # not every backend implements memory_stats
        stats = device.memory_stats()
    if stats and stats.get("bytes_limit"):
        return stats["bytes_limit"] / 2**30
    if device.platform != "cpu" or not hasattr(os, "sysconf"):
        return None
    try:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    cgroup_limit, _ = _cgroup_memory()
    if cgroup_limit is not None:
        limit = min(limit, cgroup_limit)
    return limit / 2**30


def byte_size(n: int) -> str:
    """`n` bytes for people: '1.25 GiB' from a tenth of a GiB on, '61.2 MiB', '3.0 KiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale / 10:
            return f"{n / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n / 2**10:.1f} KiB"


MEMINFO_FILE = "/proc/meminfo"


def host_memory_left_bytes() -> int | None:
    """Bytes this process can still take before Linux's OOM killer ends it: MemAvailable plus
    SwapFree (`/proc/meminfo`), or, in a container with a lower limit, the limit less its use plus
    its reclaimable file cache. None where `/proc/meminfo` cannot be read (not Linux)."""
    try:
        with open(MEMINFO_FILE) as f:
            info = dict(line.split(":", 1) for line in f if ":" in line)
        left = (int(info["MemAvailable"].split()[0]) + int(info["SwapFree"].split()[0])) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return None
    limit, files = _cgroup_memory()
    if limit is None or files is None:  # no limit (v1's huge number for none loses the min)
        return left
    _, usage_path, stat_path, cache_key = files
    with contextlib.suppress(OSError, ValueError):
        with open(usage_path) as f:
            used = int(f.read().strip())
        with open(stat_path) as f:
            stat = dict(line.split()[:2] for line in f if len(line.split()) >= 2)
        left = min(left, limit - used + int(stat.get(cache_key, 0)))
    return left


def host_memory_shortfall(memory: Any, device: Any) -> str | None:
    """Why a compiled XLA:CPU program will not fit the host's memory left, from its
    `compiled.memory_analysis()` (its temporaries and the outputs that do not reuse donated inputs),
    e.g. 'XLA's buffers for it need 27.54 GiB more, 19.23 GiB of host memory is left'; None when
    they fit, on other devices, or when either figure is unknown.

    XLA:CPU takes those buffers from the host as the program runs, and Linux ends a process that
    touches more memory than there is (the OOM killer: exit status 137, no error to catch); checked
    before the first run, a command can say what to change instead."""
    if device.platform != "cpu" or memory is None:
        return None
    need = memory.temp_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
    left = host_memory_left_bytes()
    if left is None or need <= left:
        return None
    return (
        f"XLA's buffers for it need {byte_size(need)} more, {byte_size(max(left, 0))} of host "
        "memory is left"
    )


def device_memory_note(device: Any) -> str:
    """'; a gpu device has 79.1 GiB' (`device_memory_gib`), or '' when that is unknown."""
    limit = device_memory_gib(device)
    return f"; a {device.platform} device has {limit:.1f} GiB" if limit is not None else ""


def exit_out_of_memory(error: BaseException, doing: str) -> NoReturn:
    """Ends a command whose `error` is XLA running out of memory while `doing` (e.g. 'predicting
    batches of 32 images'): one line with XLA's reason and the device's memory that asks for a
    smaller --batch, status 2. Any other error is raised again."""
    if not out_of_memory(error):
        raise error
    import jax

    print(
        f"error: out of memory {doing} ({first_line(error)[:200]})"
        f"{device_memory_note(jax.devices()[0])}; use a smaller --batch",
        file=sys.stderr,
    )
    sys.exit(2)


def prog(module: str) -> str:
    """The command name for usage lines: `vit-X` when run as that script, else `python -m MODULE`."""
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    return name if name in COMMANDS and COMMANDS[name][0] == module else f"python -m {module}"


def usage() -> str:
    width = max(len(n) for n in COMMANDS) + 2
    lines = [
        "vit-jax commands (each also runs as `python -m MODULE` or `python -m vit_jax NAME`):",
        "",
    ]
    for name, (module, what) in COMMANDS.items():
        lines.append(f"  {name:<{width}}{what}  [python -m {module}]")
    lines += ["", "`COMMAND --help` explains each one's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name = argv[0] if argv[0].startswith("vit-") else f"vit-{argv[0]}"
    if name not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [name, *argv[1:]]  # every command parses sys.argv (absl needs the program name)
    importlib.import_module(COMMANDS[name][0]).main()
