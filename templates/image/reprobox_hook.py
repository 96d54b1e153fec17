"""reprobox seed-on-import hook: every Python process starts seeded and deterministic.

Imported at interpreter start-up (from a sitecustomize or a .pth line). Start-up work is a
few environment reads and one ``sys.meta_path`` entry, so ``python -c pass`` stays fast;
``random``, ``numpy.random`` and ``torch`` are seeded (and torch put in deterministic mode)
the moment each finishes importing. Standard library only, and no module is imported here
at start-up that the interpreter has not already loaded: ``importlib.abc``, ``typing`` and
``types`` alone would cost more than the whole hook.

Settings (environment): REPROBOX_SEED (0..2**32-1, default 0), REPROBOX_DISABLE=1,
REPROBOX_DETERMINISTIC (default 1), REPROBOX_WARN_ONLY (default 0),
REPROBOX_FILL_UNINITIALIZED_MEMORY (default 1), REPROBOX_HOOK_VERBOSE=1, REPROBOX_CPU
(portable or native: see reprobox_cpu.py).

Hosts smaller or older than the image's settings: at start-up a GOMP_CPU_AFFINITY naming CPUs
this process may not use is mapped onto the ones it may (libgomp would abort); just before
torch or numpy first load, portable ISA pins this CPU cannot run are lowered (ATen and
OpenBLAS would die of SIGILL); once torch loads, its thread count is set to OMP_NUM_THREADS
(with MKL_DYNAMIC left on, torch lowers it to the number of cores). Placement and code paths
adapt; the thread count never does, since it decides the bits. state() reports all three.

Commands: ``python -m reprobox_hook --report [--import MODULE ...]`` prints the hook's state
as JSON; ``python reprobox_hook.py install [--mode sitecustomize|pth]
[--python-stdlib DIR | --site DIR]`` installs it.
"""

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from importlib.machinery import ModuleSpec
    from pathlib import Path
    from types import ModuleType

__all__ = ["main", "spare_cpus", "state"]

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_CHAINED = "reprobox_chained_sitecustomize"
_MARKER = "reprobox-sitecustomize"

_settings: "dict[str, bool]" = {}
_seeded: "dict[str, int | None]" = {"random": None, "numpy": None, "torch": None}
_torch_flags: "dict[str, bool]" = {}  # what torch reported back once the hook had set it
_lineage: "list[str]" = []  # how this process came from the root one: "fork:0", "spawn:2"...
_errors: "list[str]" = []
# What the hook adapted to this host: affinity at start-up, ISA pins before torch/numpy load.
_host: "dict[str, object]" = {"affinity": None, "cpu": None, "threads": None}
_BEFORE_CPU = frozenset({"numpy", "torch", "scipy"})
_AFFINITY_ASKED = "REPROBOX_GOMP_CPU_AFFINITY_ASKED"


class _Process:
    """Where this process stands: its seed, and what its children derive theirs from."""

    active = False
    disabled = False
    root_seed: "int | None" = None
    seed = 0
    forks = 0  # os.fork() calls made here; the nth child derives its seed from n
    forked = False  # this process came from os.fork(), so its seed is already its own


_process = _Process()


def state() -> "dict[str, object]":
    """What the hook has done in this process, as plain JSON values."""
    return {
        "active": _process.active,
        "disabled": _process.disabled,
        "seed": _process.root_seed,
        "effective_seed": _process.seed if _process.active else None,
        "lineage": list(_lineage),
        "settings": dict(_settings),
        "seeded": dict(_seeded),
        "torch": dict(_torch_flags) or None,
        "host": dict(_host),
        "errors": list(_errors),
    }


def _warn(message: str) -> None:
    # One line, never a traceback: the program the hook runs under must go on undisturbed.
    text = " ".join(str(message).split())
    _errors.append(text)
    try:
        sys.stderr.write(f"reprobox_hook: warning: {text}\n")
        sys.stderr.flush()
    except Exception:  # noqa: S110 - no stderr (pythonw, closed fd): nowhere left to warn
        pass


def _flag(env: "os._Environ[str]", name: str, default: bool) -> bool:
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={value!r} is not 1 or 0")


def _derive(seed: int, tag: int, numbers: "tuple[int, ...]") -> int:
    """A child's seed from its parent's: splitmix64 over (seed, kind, position), 32 bits."""
    x = (seed * 0x9E3779B97F4A7C15 + tag) & _MASK64
    for n in numbers:
        x = (x + (n + 1) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    # 32 bits because numpy's legacy seeding takes no more; random and torch take any.
    return x & _MASK32


def _seed_random(module: "ModuleType") -> None:
    module.seed(_process.seed)
    if _seeded["random"] is None:
        # random.py reseeds itself from os.urandom in every forked child (its own
        # register_at_fork). Handlers run in registration order, so one registered now runs
        # after it and puts the child back on its derived seed.
        os.register_at_fork(after_in_child=_reseed_random_in_child)
    _seeded["random"] = _process.seed


def _reseed_random_in_child() -> None:
    module = sys.modules.get("random")
    if module is not None:
        _guard(_seed_random, module)


def _seed_numpy(module: "ModuleType") -> None:
    module.seed(_process.seed)  # numpy.random's legacy global RandomState, what np.random.* use
    _seeded["numpy"] = _process.seed


def _configure_torch(torch: "ModuleType") -> None:
    torch.manual_seed(_process.seed)  # CPU and every CUDA device (lazily, if CUDA is not up yet)
    _seeded["torch"] = _process.seed
    if _torch_flags:
        return  # a reseed in a child process: the flags came with the fork
    if _settings["deterministic"]:
        # Not use_deterministic_algorithms(): it imports torch._inductor.config, which pulls in
        # dynamo and doubles the cost of `import torch` (1.5 s measured on torch 2.13). This
        # public twin sets the same switch; Inductor's own flag is set when Inductor loads.
        torch.set_deterministic_debug_mode("warn" if _settings["warn_only"] else "error")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.utils.deterministic.fill_uninitialized_memory = _settings["fill_uninitialized_memory"]
    _keep_thread_count(torch)
    _torch_flags.update(
        deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
        warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn_deterministic=torch.backends.cudnn.deterministic,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        fill_uninitialized_memory=torch.utils.deterministic.fill_uninitialized_memory,
    )


def _keep_thread_count(torch: "ModuleType") -> None:
    # Where MKL_DYNAMIC is not FALSE (MKL's default; images set FALSE, a venv may not), torch
    # 2.13 started with 2 threads for OMP_NUM_THREADS=4 on a 2-CPU host (measured). The count
    # decides the bits, so it is put back.
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not raw.isdigit() or int(raw) < 1:
        return
    found = torch.get_num_threads()
    if found != int(raw):
        torch.set_num_threads(int(raw))
        _host["threads"] = {"asked": int(raw), "torch_chose": found, "set": torch.get_num_threads()}


def _cpu_list(text: str) -> "list[int] | None":
    """GOMP_CPU_AFFINITY's CPUs in order: '0 3 1-2 4-15:2' style; None if it is not that."""
    cpus: list[int] = []
    for item in text.replace(",", " ").split():
        span, _, stride = item.partition(":")
        first, _, last = span.partition("-")
        if not (
            first.isdigit() and (not last or last.isdigit()) and (not stride or stride.isdigit())
        ):
            return None
        low, high, step = int(first), int(last or first), int(stride or 1)
        if high < low or step < 1 or len(cpus) + (high - low) // step > 4096:
            return None
        cpus.extend(range(low, high + 1, step))
    return cpus or None


def _adapt_affinity() -> None:
    """Map GOMP_CPU_AFFINITY onto the CPUs this process may use, keeping its length."""
    asked = os.environ.get("GOMP_CPU_AFFINITY", "")
    cpus = _cpu_list(asked)
    if cpus is None:
        return
    if not hasattr(os, "sched_getaffinity"):
        return  # not Linux (a venv on macOS): libgomp's own rules apply
    allowed = sorted(os.sched_getaffinity(0))
    # A parent's hook may have mapped it already; children report what was asked all the same.
    first = os.environ.get(_AFFINITY_ASKED)
    if not allowed or set(cpus) <= set(allowed):
        if first:
            _host["affinity"] = {"asked": first, "allowed": allowed, "set": asked}
        return
    placed = ",".join(str(allowed[n % len(allowed)]) for n in range(len(cpus)))
    os.environ["GOMP_CPU_AFFINITY"] = placed
    os.environ.setdefault(_AFFINITY_ASKED, asked)
    _host["affinity"] = {"asked": os.environ[_AFFINITY_ASKED], "allowed": allowed, "set": placed}


def spare_cpus() -> "list[int]":
    """The CPUs this process may use that GOMP_CPU_AFFINITY leaves out, at least as many as it
    names, so that a child started on them alone runs as fast (the hook in the child maps its
    GOMP_CPU_AFFINITY onto them, as on any host); [] where the hook is off or could not map the
    list here (libgomp would then abort on CPUs it may not use), where nothing is pinned, where
    too few are left, or where OMP_NUM_THREADS does not fix the thread count (MKL would then
    size it from the CPUs it may use, and the thread count decides the bits)."""
    if not _process.active or not hasattr(os, "sched_getaffinity"):
        return []
    if any("GOMP_CPU_AFFINITY" in error for error in _errors):
        return []
    threads = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not threads.isdigit() or int(threads) < 1:
        return []
    cpus = _cpu_list(os.environ.get("GOMP_CPU_AFFINITY", ""))
    if cpus is None:
        return []
    spare = sorted(os.sched_getaffinity(0) - set(cpus))
    return spare if len(spare) >= len(set(cpus)) else []


def _adapt_cpu() -> None:
    """Lower portable ISA pins this CPU cannot run; only where the image asked for portable."""
    if _host["cpu"] is not None or os.environ.get("REPROBOX_CPU", "").strip() != "portable":
        return
    _host["cpu"] = {}
    # Installed beside this file (mypy checks it on its own); ~3 ms, once, before torch or numpy.
    import reprobox_cpu  # type: ignore[import-not-found]

    changed = reprobox_cpu.adapt_pins(os.environ)
    facts = reprobox_cpu.cpu_facts(approximations=False)
    _host["cpu"] = {"level": facts.get("level"), "vendor": facts.get("vendor"), "lowered": changed}


def _configure_inductor(config: "ModuleType") -> None:
    # What use_deterministic_algorithms(True) would have set: no autotuning or benchmarking
    # that changes numerics in code that torch.compile generates. Only releases that have the
    # setting (2.5's Inductor has none, and its config refuses unknown names); older ones read
    # torch's deterministic flag, which the torch callback set, where they read any.
    if _settings["deterministic"] and hasattr(config, "deterministic"):
        config.deterministic = True  # type: ignore[attr-defined]


def _watch_multiprocessing(context: "ModuleType") -> None:
    # A spawned child is a fresh interpreter and starts on the root seed like any program, so
    # a Pool of them would share one stream. multiprocessing gives each child a deterministic
    # identity ((1,), (2,), (1, 3)...) and calls SpawnProcess._after_fork in the child before
    # the target runs (a no-op there); wrapping it lets each child derive its own seed.
    spawn_process = getattr(context, "SpawnProcess", None)
    original = getattr(spawn_process, "_after_fork", None)
    if spawn_process is None or original is None:
        return  # a Python without spawn on this platform: nothing to distinguish

    def after_spawn() -> None:
        original()
        _guard(_after_spawn, context)

    spawn_process._after_fork = staticmethod(after_spawn)


def _after_spawn(_: "ModuleType") -> None:
    process = sys.modules.get("multiprocessing.process")
    identity = getattr(getattr(process, "_current_process", None), "_identity", ())
    if identity:
        step = "spawn:" + ".".join(map(str, identity))
        _move_to(_derive(_process.seed, 2, tuple(identity)), step)


def _after_fork_in_parent() -> None:
    _process.forks += 1


def _after_fork_in_child() -> None:
    n, _process.forks, _process.forked = _process.forks, 0, True
    _move_to(_derive(_process.seed, 1, (n,)), f"fork:{n}")


def _move_to(seed: int, step: str) -> None:
    """Put this process on its own seed and reseed whatever is loaded already."""
    _process.seed = seed
    _lineage.append(step)
    for name, apply in (("numpy.random", _seed_numpy), ("torch", _configure_torch)):
        module = sys.modules.get(name)
        if module is not None and name not in _callbacks:  # not loaded halfway
            _guard(apply, module)
    # random: in a forked child its own at-fork handler runs after this one and ours after
    # that (see _seed_random); a spawned child has no such handler, so it is reseeded here.
    random = sys.modules.get("random")
    if random is not None and not _process.forked:
        _guard(_seed_random, random)


# What a failed callback leaves undone, for its warning (seeding is the rest's job).
_UNDONE = {
    "torch._inductor.config": "code that torch.compile generates may not be deterministic",
    "multiprocessing.context": "spawned children start on the root seed",
}


def _guard(apply: "Callable[[ModuleType], None]", module: "ModuleType") -> None:
    try:
        apply(module)
    except Exception as error:  # a hook error must never break the program
        undone = _UNDONE.get(module.__name__, "it runs unseeded")
        _warn(f"could not set up {module.__name__}: {error!r}; {undone}")


class _Finder:
    """A sys.meta_path entry that runs a callback once a watched module has executed.

    It finds nothing itself: it asks the finders after it, and wraps the loader's
    exec_module on that one loader instance, so modules keep their real loader and spec.
    """

    def find_spec(
        self, name: str, path: "Sequence[str] | None" = None, target: "ModuleType | None" = None
    ) -> "ModuleSpec | None":
        if name in _BEFORE_CPU and _host["cpu"] is None:
            try:
                _adapt_cpu()
            except Exception as error:
                _warn(f"could not check this CPU against the image's pins: {error!r}")
        callback = _callbacks.get(name)
        if callback is None:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if isinstance(finder, _Finder) or find_spec is None:
                continue
            spec: ModuleSpec | None = find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        try:
            _wrap(spec.loader, name, callback)
        except Exception as error:
            _warn(f"cannot watch the import of {name}: {error!r}; it runs unseeded")
        return spec


def _wrap(loader: "object", name: str, callback: "Callable[[ModuleType], None]") -> None:
    if isinstance(loader, type) or not hasattr(loader, "exec_module"):
        raise TypeError(f"loader {loader!r} cannot be wrapped")
    exec_module = loader.exec_module

    def exec_then_configure(module: "ModuleType") -> None:
        try:
            exec_module(module)
        finally:
            # Only this one load is wrapped; the loader is left as it was found.
            vars(loader).pop("exec_module", None)
        if _callbacks.pop(name, None) is not None:
            _guard(callback, module)

    loader.exec_module = exec_then_configure


_callbacks: "dict[str, Callable[[ModuleType], None]]" = {}


def _read_settings() -> None:
    env = os.environ
    raw = env.get("REPROBOX_SEED", "0").strip()
    if not raw.isdigit() or int(raw) > _MASK32:
        raise ValueError(f"REPROBOX_SEED={raw!r} is not an integer from 0 to 4294967295")
    _process.seed = int(raw)
    _settings["deterministic"] = _flag(env, "REPROBOX_DETERMINISTIC", True)
    _settings["warn_only"] = _flag(env, "REPROBOX_WARN_ONLY", False)
    _settings["fill_uninitialized_memory"] = _flag(env, "REPROBOX_FILL_UNINITIALIZED_MEMORY", True)
    _settings["verbose"] = _flag(env, "REPROBOX_HOOK_VERBOSE", False)


def _activate() -> None:
    if os.environ.get("REPROBOX_DISABLE", "").strip().lower() in _TRUE:
        _process.disabled = True
        return
    try:
        _read_settings()
    except ValueError as error:
        _warn(f"{error}; the hook is off, nothing is seeded")
        return
    _process.active, _process.root_seed = True, _process.seed
    try:
        _adapt_affinity()
    except Exception as error:
        _warn(f"could not adapt GOMP_CPU_AFFINITY to this host: {error!r}")
    if _settings["deterministic"]:
        # cuBLAS reads this once, when it starts; images set it in ENV, venvs may not.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    _callbacks.update(
        {
            "random": _seed_random,
            "numpy.random": _seed_numpy,
            "torch": _configure_torch,
            "torch._inductor.config": _configure_inductor,
            "multiprocessing.context": _watch_multiprocessing,
        }
    )
    os.register_at_fork(after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
    for name in list(_callbacks):  # already imported (by an earlier .pth line, say)
        module = sys.modules.get(name)
        if module is not None:
            _guard(_callbacks.pop(name), module)
    sys.meta_path.insert(0, _Finder())
    if _settings["verbose"]:
        import atexit  # built in, and only wanted when asked for

        atexit.register(_print_summary)


def _print_summary() -> None:
    done = ", ".join(f"{name}={seed}" for name, seed in _seeded.items() if seed is not None)
    flags = " ".join(f"{key}={int(value)}" for key, value in _settings.items() if key != "verbose")
    adapted = "; ".join(f"{key} {value}" for key, value in _host.items() if value)
    sys.stderr.write(
        f"reprobox_hook: seed {_process.root_seed} ({'/'.join(_lineage) or 'root'}); {flags}; "
        f"seeded: {done or 'nothing imported'}{'; adapted: ' + adapted if adapted else ''}\n"
    )


def _sitecustomize_source() -> str:
    return f'''\
# {_MARKER}: written by `reprobox_hook.py install`. It seeds every interpreter at start-up,
# then runs the sitecustomize this file displaced (Debian's and Ubuntu's, for one), because
# Python imports only the first sitecustomize it finds and theirs must still run.
try:
    import reprobox_hook
except Exception as error:  # a missing or broken hook must never stop Python from starting
    import sys
    sys.stderr.write(f"reprobox_hook: warning: not loaded ({{error!r}}); nothing is seeded\\n")


def _chain():
    import os
    import sys

    try:
        import {_CHAINED}  # the distribution's sitecustomize, moved aside at install
        return
    except ModuleNotFoundError as error:
        if error.name != "{_CHAINED}":
            raise
    # Otherwise the next sitecustomize on sys.path: the one Python would have run without us.
    here = os.path.dirname(os.path.abspath(__file__))
    after_here = False
    for entry in sys.path:
        directory = os.path.abspath(entry or os.curdir)
        if directory == here:
            after_here = True
            continue
        candidate = os.path.join(directory, "sitecustomize.py")
        if after_here and os.path.isfile(candidate):
            with open(candidate, "rb") as file:
                source = file.read()
            if b"{_MARKER}" not in source:
                namespace = {{"__name__": "sitecustomize", "__file__": candidate}}
                exec(compile(source, candidate, "exec"), namespace)
                return


_chain()
del _chain
'''


def _install(mode: str, directory: str | None) -> list[str]:
    """Copy this file into place and arrange for it to run; return what was done."""
    # Install-time imports stay here: pathlib alone would double the hook's start-up cost.
    import py_compile
    import shutil
    import sysconfig
    from pathlib import Path

    default = sysconfig.get_paths()["stdlib" if mode == "sitecustomize" else "purelib"]
    target = Path(directory or default)
    hook = target / "reprobox_hook.py"
    if Path(__file__).resolve() != hook.resolve():
        shutil.copyfile(__file__, hook)
    written = [hook]
    done = [f"hook: {hook}"]
    # Its CPU facts module travels beside it (imported only before torch or numpy load).
    cpu_module = Path(__file__).resolve().with_name("reprobox_cpu.py")
    if cpu_module.is_file():
        if cpu_module != (target / cpu_module.name).resolve():
            shutil.copyfile(cpu_module, target / cpu_module.name)
        written.append(target / cpu_module.name)
        done.append(f"cpu facts: {target / cpu_module.name}")
    if mode == "pth":
        pth = target / "reprobox_hook.pth"
        pth.write_text("import reprobox_hook\n", encoding="utf-8")
        done.append(f"pth: {pth}")
    else:
        site = target / "sitecustomize.py"
        if (site.exists() or site.is_symlink()) and not _is_ours(site):
            done.append(_move_aside(site, target / f"{_CHAINED}.py"))
        site.write_text(_sitecustomize_source(), encoding="utf-8")
        written.append(site)
        done.append(f"sitecustomize: {site}")
        chained = target / f"{_CHAINED}.py"
        if chained.exists():
            written.append(chained)
    for path in written:
        # A checked-hash pyc: no timestamp in it, and Python need not write one at run time
        # (where the directory may be read-only, every start would compile these again; and
        # where it is writable, a later build step would leave a timestamped pyc in a layer).
        py_compile.compile(
            str(path), doraise=True, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH
        )
    return done


def _is_ours(path: "Path") -> bool:
    try:
        return _MARKER in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False  # a dangling link: not ours, so it is kept (moved aside) as it is


def _move_aside(site: "Path", chained: "Path") -> str:
    import shutil
    import subprocess

    # A file a Debian package owns is diverted, so a package upgrade updates the moved copy
    # instead of putting its own back over ours.
    if shutil.which("dpkg-divert") and shutil.which("dpkg-query"):
        owned = subprocess.run(["dpkg-query", "-S", str(site)], capture_output=True, check=False)
        if owned.returncode == 0:
            subprocess.run(
                [
                    "dpkg-divert",
                    "--local",
                    "--rename",
                    "--divert",
                    str(chained),
                    "--add",
                    str(site),
                ],
                capture_output=True,
                check=True,
            )
            return f"diverted: {site} -> {chained}"
    site.replace(chained)  # a symlink moves as the link it is (Debian's points into /etc)
    return f"moved: {site} -> {chained}"


def _report(imports: "list[str]") -> "dict[str, object]":
    import importlib

    loaded_at_startup = "reprobox_hook" in sys.modules
    # Not installed: load it now, as a .pth line would have, so the report still means something.
    hook = importlib.import_module("reprobox_hook")
    for name in imports:
        importlib.import_module(name)
    report: dict[str, object] = dict(hook.state())
    report["loaded_at_startup"] = loaded_at_startup
    report["hook_file"] = getattr(hook, "__file__", None)
    report["sitecustomize"] = getattr(sys.modules.get("sitecustomize"), "__file__", None)
    torch = sys.modules.get("torch")
    if torch is not None:
        report["torch_now"] = {
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            # Only once something loaded Inductor (torch.compile does): None until then.
            "inductor_deterministic": getattr(
                sys.modules.get("torch._inductor.config"), "deterministic", None
            ),
        }
    return report


def main(argv: "list[str] | None" = None) -> int:
    """Command line: --report, or install."""
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="reprobox_hook", description="reprobox seed-on-import hook"
    )
    parser.add_argument("--report", action="store_true", help="print the hook's state as JSON")
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (torch, numpy...) so the report shows what the hook did to it",
    )
    commands = parser.add_subparsers(dest="command")
    install = commands.add_parser("install", help="install into this interpreter or a venv")
    install.add_argument("--mode", choices=["sitecustomize", "pth"], default="sitecustomize")
    where = install.add_mutually_exclusive_group()
    where.add_argument("--python-stdlib", metavar="DIR", help="stdlib dir (sitecustomize mode)")
    where.add_argument("--site", metavar="DIR", help="site-packages dir (pth mode)")
    args = parser.parse_args(argv)
    if args.command == "install":
        if (args.mode == "pth" and args.python_stdlib) or (args.mode != "pth" and args.site):
            parser.error("--python-stdlib goes with --mode sitecustomize, --site with --mode pth")
        try:
            done = _install(args.mode, args.python_stdlib or args.site)
        except Exception as error:  # permissions, dpkg-divert, py_compile: one line each
            sys.stderr.write(f"reprobox_hook: install failed: {error}\n")
            return 1
        for line in done:
            print(line)
        return 0
    if args.report:
        print(json.dumps(_report(args.imports), indent=2, sort_keys=True))
        return 0
    parser.print_usage(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
else:
    try:
        _activate()
    except Exception as error:  # whatever happens, the program itself must still start
        _warn(f"failed to start ({error!r}); nothing is seeded")
