"""Console scripts: the same table installed (pyproject.toml) and `python -m vit_jax`, equivalent to `python -m`."""

import importlib.metadata
import os
import re
import subprocess
import sys

import jax
import pytest

from vit_jax import commands

BIN = os.path.dirname(sys.executable)


def test_installed_scripts_are_the_listed_commands():
    installed = {
        ep.name: ep.value
        for ep in importlib.metadata.entry_points(group="console_scripts")
        if ep.value.startswith("vit_jax.")
    }
    assert installed == {name: f"{module}:main" for name, (module, _) in commands.COMMANDS.items()}
    for name in ("vit-train", "vit-predict", "vit-visualize", "vit-checkpoint", "vit-benchmark"):
        assert name in installed


def test_python_m_vit_jax_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "vit_jax"], capture_output=True, text=True, check=True
    ).stdout
    for name, (module, _) in commands.COMMANDS.items():
        assert name in out and f"python -m {module}" in out


def _help(cmd):
    result = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("name", ["vit-predict", "vit-evaluate", "vit-checkpoint", "vit-benchmark"])
def test_installed_scripts_equal_the_module_forms(name):
    script = os.path.join(BIN, name)
    assert os.path.exists(script), f"{name} is not installed next to {sys.executable}"
    module = commands.COMMANDS[name][0]
    as_script = _help([script])
    as_module = _help([sys.executable, "-m", module])
    assert as_script.startswith(f"usage: {name} ")
    assert as_module.startswith(f"usage: python -m {module} ")
    # The same options and text once the program name (and the line wrapping it causes) is set aside.
    norm = lambda text, prog: " ".join(text.replace(prog, "PROG").split())
    assert norm(as_script, name) == norm(as_module, f"python -m {module}")
    # And through `python -m vit_jax NAME`.
    assert _help([sys.executable, "-m", "vit_jax", name.removeprefix("vit-")]) == as_script


def test_train_help_lists_its_flags_in_every_form():
    # absl's --help would print the __main__ module's flags: none for the console script.
    forms = [
        [os.path.join(BIN, "vit-train")],
        [sys.executable, "-m", "vit_jax.train"],
        [sys.executable, "-m", "vit_jax", "train"],
    ]
    texts = [_help(cmd) for cmd in forms]
    for text in texts:
        assert text.startswith("Fine-tune a ViT on an image-classification dataset")
        for flag in ("--model", "--dataset", "--config", "--accum_steps", "--coordinator_address"):
            assert f"  {flag}: " in text, flag
    # The same text but for the name of the module the flags are listed under.
    header = re.compile(r"^\S*train(\.py)?:$", re.MULTILINE)
    assert len({header.sub("MODULE:", text) for text in texts}) == 1


def test_unknown_command_is_one_clear_error():
    result = subprocess.run(
        [sys.executable, "-m", "vit_jax", "trian"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown command 'trian'") and "Traceback" not in (
        result.stderr
    )


@pytest.mark.parametrize("name", [n for n in commands.COMMANDS if n != "vit-train"])
def test_ctrl_c_ends_a_command_with_one_line_and_status_130(name, monkeypatch, capsys):
    # (vit-train has its own: it names the checkpoint a rerun resumes from; see test_train.)
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    module = importlib.import_module(commands.COMMANDS[name][0])
    monkeypatch.setattr("argparse.ArgumentParser.parse_args", interrupted)
    try:
        module.main(["--help"])
    except KeyboardInterrupt:  # caught here: it would stop pytest itself
        pytest.fail(f"{name}: Ctrl-C ended in a KeyboardInterrupt traceback")
    except SystemExit as e:
        assert e.code == 130
    else:
        pytest.fail(f"{name} returned after Ctrl-C")
    assert capsys.readouterr().err == "interrupted\n"


def test_atomic_path_keeps_the_old_file_whole_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "report.txt"
    target.write_text("old\n")
    with (
        pytest.raises(KeyboardInterrupt),
        commands.atomic_path(str(target)) as tmp,
        open(tmp, "w") as f,
    ):
        assert tmp.endswith(".txt") and os.path.dirname(tmp) == str(tmp_path)
        f.write("half of the new")
        raise KeyboardInterrupt
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["report.txt"]  # the partial file is gone
    with commands.atomic_path(str(target)) as tmp, open(tmp, "w") as f:
        f.write("new\n")
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["report.txt"]


@pytest.mark.parametrize(
    "orig_argv, argv0, expected",
    [
        (["python", "-m", "vit_jax.train", "--model", "x"], "/x/train.py", True),
        (["python", "-X", "dev", "-m", "vit_jax", "predict"], "/x/__main__.py", True),
        (["python", "-m", "pytest", "tests"], "/x/pytest/__main__.py", False),
        (["python", "-m", "vit_jax_extras.tool"], "/x/tool.py", False),
        (["/venv/bin/python", "/venv/bin/vit-predict", "a.png"], "/venv/bin/vit-predict", True),
        (["/venv/bin/python", "/venv/bin/vit-predict", "-m", "x"], "/venv/bin/vit-predict", True),
        (["python", "notebook.py"], "notebook.py", False),
    ],
)
def test_launched_as_command(monkeypatch, orig_argv, argv0, expected):
    # Only then may Ctrl-C end the process at once (commands.exit_interrupted).
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    monkeypatch.setattr(sys, "argv", [argv0])
    assert commands.launched_as_command() is expected


@pytest.mark.parametrize(
    "orig_argv, argv0, expected",
    [
        (["python", "-m", "vit_jax.train", "--model", "x"], "/x/train.py", "vit_jax.train"),
        (["python", "-X", "dev", "-u", "-m", "vit_jax", "benchmark"], "/x/m.py", "vit_jax.benchmark"),
        (["python", "-m", "vit_jax", "vit-predict", "a.png"], "/x/m.py", "vit_jax.predict"),
        (["python", "-m", "vit_jax"], "/x/__main__.py", None),  # the list of commands
        (["python", "-m", "vit_jax", "nope"], "/x/__main__.py", None),
        (["python", "-m", "pytest", "tests"], "/x/pytest/__main__.py", None),
        (["/venv/bin/python", "/venv/bin/vit-evaluate", "-m", "vit_jax.train"],
         "/venv/bin/vit-evaluate", "vit_jax.evaluate"),  # a script's own -m
        (["python", "-c", "...", "--multiprocessing-fork"], "-c", None),
        (["python", "notebook.py"], "notebook.py", None),
    ],
)  # fmt: skip
def test_command_module(monkeypatch, orig_argv, argv0, expected):
    # Which command runs decides whether it restarts with huge pages (commands.use_huge_pages).
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    monkeypatch.setattr(sys, "argv", [argv0])
    assert commands.command_module() == expected


@pytest.mark.parametrize(
    "environ, thp_mode, libc, expected",
    [
        ({}, "madvise", "glibc 2.36", "glibc.malloc.hugetlb=1"),
        (
            {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
            "madvise",
            "glibc 2.35",
            "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
        ),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", "glibc 2.36", None),  # opted out
        ({}, "always", "glibc 2.36", None),  # the kernel gives huge pages already
        ({}, "never", "glibc 2.36", None),
        ({}, None, "glibc 2.36", None),  # no THP setting to read
        ({}, "madvise", "glibc 2.34", None),  # before the tunable
        ({}, "madvise", None, None),  # not glibc (musl)
        ({}, "madvise", "glibc unknown", None),
    ],
)
def test_huge_pages_environment(environ, thp_mode, libc, expected):
    env = commands.huge_pages_environment({"PATH": "/bin", **environ}, thp_mode, libc)
    if expected is None:
        assert env is None
    else:
        assert env == {"PATH": "/bin", **environ, "GLIBC_TUNABLES": expected}
        assert commands.huge_pages_setting(env) == "1"


def test_use_huge_pages_restarts_only_a_command_process(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda *args: calls.append(args))
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(commands, "_thp_mode", lambda: "madvise")
    monkeypatch.setattr(os, "confstr", lambda name: "glibc 2.36")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    orig_argv = [sys.executable, "-X", "dev", "-m", "vit_jax.train", "--model", "ViT-B_16"]
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    commands.use_huge_pages()
    assert len(calls) == 1
    path, argv, env = calls[0]
    assert path == sys.executable and argv == orig_argv
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and env["PATH"] == os.environ["PATH"]
    # Not where vit_jax is imported by other code (here, pytest), nor once the tunable is set.
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "pytest"])
    commands.use_huge_pages()
    # Nor in a command that only runs inference: huge pages would cost it more than they save.
    for inference in (["-m", "vit_jax.predict", "a.png"], ["-m", "vit_jax", "evaluate"]):
        monkeypatch.setattr(sys, "orig_argv", [sys.executable, *inference])
        commands.use_huge_pages()
    # Nor in a multiprocessing child given the command's sys.argv, whose own command line is not it.
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-c", "...", "--multiprocessing-fork"])
    monkeypatch.setattr(sys, "argv", ["/venv/bin/vit-train", "--model", "ViT-B_16"])
    commands.use_huge_pages()
    # The console script itself does restart.
    script = [sys.executable, "/venv/bin/vit-train", "--model", "ViT-B_16"]
    monkeypatch.setattr(sys, "orig_argv", script)
    commands.use_huge_pages()
    assert len(calls) == 2 and calls[1][1] == script
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    commands.use_huge_pages()
    assert len(calls) == 2


# A command's process as the restart sees it: a script named `vit-train` that imports vit_jax
# (which restarts it, running the script again), then has glibc's malloc map 64 MiB and touches it,
# as XLA:CPU does with its temporaries (NumPy would ask for huge pages for its arrays itself).
_SCRIPT = """
import ctypes, os
print("pid", os.getpid(), os.environ.get("GLIBC_TUNABLES"), flush=True)
import vit_jax
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
buffer = libc.malloc(64 << 20)
ctypes.memset(buffer, 1, 64 << 20)
rollup = open("/proc/self/smaps_rollup").read()
print("huge", int(rollup.split("AnonHugePages:")[1].split()[0]) // 1024, flush=True)
"""


def test_a_command_process_restarts_with_huge_pages(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    thp, libc = commands._thp_mode(), os.confstr("CS_GNU_LIBC_VERSION")
    if commands.huge_pages_environment(env, thp, libc) is None:
        pytest.skip(f"no restart on this machine: {libc}, transparent huge pages {thp}")
    (tmp_path / "vit-train").write_text(_SCRIPT)
    (tmp_path / "vit-summary").write_text(_SCRIPT)

    def child(extra, name="vit-train"):
        out = subprocess.run(
            [sys.executable, str(tmp_path / name)], env={**env, **extra}, capture_output=True,
            text=True, check=True, timeout=120,
        ).stdout.split("\n")  # fmt: skip
        return [line.split() for line in out if line]

    restarted = child({})
    # One process (the same PID) ran the code twice: first as started, then with the tunable.
    assert [r[0] for r in restarted] == ["pid", "pid", "huge"]
    assert restarted[0][1] == restarted[1][1]
    assert restarted[0][2] == "None" and restarted[1][2] == "glibc.malloc.hugetlb=1"
    assert int(restarted[2][1]) >= 32  # MiB of the array on 2 MiB pages
    # The user's own setting is kept: no restart, no huge pages.
    kept = child({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert [r[0] for r in kept] == ["pid", "huge"] and int(kept[1][1]) < 32
    # A command that does not train runs as it started.
    summary = child({}, "vit-summary")
    assert [r[0] for r in summary] == ["pid", "huge"] and summary[0][2] == "None"
    assert int(summary[1][1]) < 32


def test_device_memory_is_the_allocators_limit_or_the_ram_a_container_allows(tmp_path, monkeypatch):
    class Gpu:
        platform = "gpu"

        def memory_stats(self):
            return {"bytes_limit": 12 * 2**30, "bytes_in_use": 2**30}

    class Plugin:
        platform = "metal"

        def memory_stats(self):
            raise NotImplementedError

    assert commands.device_memory_gib(Gpu()) == 12.0
    assert commands.device_memory_gib(Plugin()) is None
    cpu = jax.devices("cpu")[0]
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    others = ("current", "stat", "file")  # (host_memory_left_bytes reads these)
    monkeypatch.setattr(commands, "CGROUP_MEMORY_FILES", ((str(v2), *others), (str(v1), *others)))
    assert commands.device_memory_gib(cpu) == ram  # no cgroup files
    v1.write_text("9223372036854771712\n")  # cgroup v1 without a limit
    assert commands.device_memory_gib(cpu) == ram
    v1.write_text(f"{2**30}\n")
    assert commands.device_memory_gib(cpu) == 1.0
    v2.write_text("max\n")  # cgroup v2 without a limit: v1's file is not read
    assert commands.device_memory_gib(cpu) == ram
    v2.write_text(f"{3 * 2**30}\n")
    assert commands.device_memory_gib(cpu) == 3.0
    assert commands.device_memory_note(cpu) == "; a cpu device has 3.0 GiB"


def test_host_memory_left_is_the_kernels_estimate_or_what_a_container_leaves(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 24000000 kB\nMemAvailable: 2000000 kB\nSwapFree: 48576 kB\n")
    v2 = [tmp_path / f"v2.{n}" for n in ("max", "current", "stat")]
    v1 = [tmp_path / f"v1.{n}" for n in ("limit", "usage", "stat")]
    monkeypatch.setattr(commands, "MEMINFO_FILE", str(meminfo))
    monkeypatch.setattr(
        commands, "CGROUP_MEMORY_FILES", ((*map(str, v2), "file"), (*map(str, v1), "total_cache"))
    )
    assert commands.host_memory_left_bytes() == (2000000 + 48576) * 1024  # no cgroup files
    v1[0].write_text("9223372036854771712\n")  # cgroup v1 without a limit
    v1[1].write_text(f"{2**30}\n")
    v1[2].write_text("cache 1\ntotal_cache 1\n")
    assert commands.host_memory_left_bytes() == (2000000 + 48576) * 1024
    v1[0].write_text(f"{2**31}\n")  # 2 GiB, 1 GiB used, of which 0.25 GiB reclaimable cache
    v1[2].write_text(f"cache {2**28}\ntotal_cache {2**28}\n")
    assert commands.host_memory_left_bytes() == 2**30 + 2**28
    v2[0].write_text("max\n")  # cgroup v2 without a limit: v1's files are not read
    assert commands.host_memory_left_bytes() == (2000000 + 48576) * 1024
    v2[0].write_text(f"{3 * 2**30}\n")
    v2[1].write_text(f"{3 * 2**30 - 5}\n")
    v2[2].write_text("anon 7\nfile 5\n")
    assert commands.host_memory_left_bytes() == 10
    meminfo.write_text("MemTotal: 24000000 kB\n")  # a kernel without MemAvailable
    assert commands.host_memory_left_bytes() is None


def test_host_memory_shortfall_compares_xlas_new_buffers_with_what_is_left(monkeypatch):
    class Memory:  # compiled.memory_analysis(): a step whose new state reuses the donated one
        temp_size_in_bytes, output_size_in_bytes, alias_size_in_bytes = 3 * 2**30, 2**30, 2**30

    class Gpu:
        platform = "gpu"

    cpu = jax.devices("cpu")[0]
    monkeypatch.setattr(commands, "host_memory_left_bytes", lambda: 3 * 2**30)
    assert commands.host_memory_shortfall(Memory(), cpu) is None  # 3 GiB needed, 3 left
    monkeypatch.setattr(commands, "host_memory_left_bytes", lambda: 2**30)
    assert commands.host_memory_shortfall(Memory(), cpu) == (
        "XLA's buffers for it need 3.00 GiB more, 1.00 GiB of host memory is left"
    )
    assert commands.host_memory_shortfall(Memory(), Gpu()) is None  # XLA raises there itself
    assert commands.host_memory_shortfall(None, cpu) is None  # no memory analysis
    monkeypatch.setattr(commands, "host_memory_left_bytes", lambda: None)  # not Linux
    assert commands.host_memory_shortfall(Memory(), cpu) is None
    # The real figures of a compiled program: its new buffers against this machine's memory.
    f = jax.jit(lambda x: x @ x)
    memory = f.lower(jax.numpy.ones((64, 64))).compile().memory_analysis()
    monkeypatch.undo()
    assert commands.host_memory_shortfall(memory, cpu) is None
    monkeypatch.setattr(commands, "host_memory_left_bytes", lambda: 64 * 64 * 4 - 1)  # < result
    assert re.fullmatch(
        r"XLA's buffers for it need \d+\.\d KiB more, 16\.0 KiB of host memory is left",
        commands.host_memory_shortfall(memory, cpu),
    )
    assert [commands.byte_size(n) for n in (0, 3 * 2**10, 2**26, 2**29, 5 * 2**30)] == [
        "0.0 KiB", "3.0 KiB", "64.0 MiB", "0.50 GiB", "5.00 GiB",
    ]  # fmt: skip
