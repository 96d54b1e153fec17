"""The seed-on-import hook, in fresh interpreters of a venv that has it installed.

Each claim has its negative control: with REPROBOX_DISABLE=1 the same programs stop
reproducing, which shows the tests can see the difference the hook makes.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy
import pytest
from hooked_venv import HOOK, clean_env, make_venv

# One program that draws from every RNG the hook looks after: at start, in DataLoader
# workers, and in os.fork() children.
PROBE = textwrap.dedent(
    """
    import json, os, random, sys
    import numpy, torch
    from torch.utils.data import DataLoader, get_worker_info

    class Augmented:
        def __len__(self):
            return 16

        def __getitem__(self, index):
            info = get_worker_info()
            return [info.id, info.seed, random.random(), torch.rand(1).item(),
                    float(numpy.random.rand())]

    def forked_draws():
        draws = []
        for _ in range(2):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                values = [random.random(), float(numpy.random.rand()), torch.rand(1).item()]
                os.write(write, json.dumps(values).encode())
                os._exit(0)
            os.close(write)
            draws.append(json.loads(os.read(read, 4096)))
            os.waitpid(pid, 0)
        return draws

    if __name__ == "__main__":
        report = {
            "random": random.random(),
            "numpy": float(numpy.random.rand()),
            "torch": torch.rand(3).tolist(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn": [torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark],
        }
        loader = DataLoader(Augmented(), batch_size=4, shuffle=True, num_workers=2)
        report["batches"] = [[[x.item() for x in item] for item in zip(*batch)] for batch in loader]
        report["forked"] = forked_draws()
        report["after_fork"] = random.random()
        print(json.dumps(report))
    """
)

CHILDREN = textwrap.dedent(
    """
    import json, multiprocessing, random, sys

    def draw(queue):
        import numpy
        name = multiprocessing.current_process().name
        queue.put((name, random.random(), float(numpy.random.rand())))

    if __name__ == "__main__":
        context = multiprocessing.get_context(sys.argv[1])
        queue = context.Queue()
        children = [context.Process(target=draw, args=(queue,), name=f"child-{n}")
                    for n in range(2)]
        for child in children:
            child.start()
        draws = sorted(queue.get(timeout=60) for _ in children)
        for child in children:
            child.join()
        print(json.dumps(draws))
    """
)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_venv(tmp_path_factory.mktemp("hooked") / "venv")


def run(python: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    command = [str(python), *args]
    env_ = clean_env(**env)
    return subprocess.run(
        command, capture_output=True, text=True, env=env_, timeout=180, check=False
    )


def run_json(python: Path, *args: str, **env: str) -> Any:
    done = run(python, *args, **env)
    assert done.returncode == 0, done.stderr
    assert "reprobox_hook: warning" not in done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def probes(venv: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Any]]:
    """The probe twice with the hook on and twice with it off: one torch start-up each."""
    script = tmp_path_factory.mktemp("probe") / "probe.py"
    script.write_text(PROBE)
    return {
        "on": [run_json(venv, str(script)) for _ in range(2)],
        "off": [run_json(venv, str(script), REPROBOX_DISABLE="1") for _ in range(2)],
    }


def test_fresh_interpreters_draw_the_same_numbers(probes: dict[str, list[Any]]) -> None:
    first, second = probes["on"]
    assert first == second
    # Seeded with REPROBOX_SEED's default, 0, exactly as random.seed(0) and np.random.seed(0).
    assert first["random"] == random.Random(0).random()
    assert first["numpy"] == numpy.random.RandomState(0).rand()


def test_disabled_hook_draws_differ(probes: dict[str, list[Any]]) -> None:
    first, second = probes["off"]
    for key in ("random", "numpy", "torch", "batches", "forked"):
        assert first[key] != second[key], key


def test_torch_is_deterministic_in_a_fresh_interpreter(probes: dict[str, list[Any]]) -> None:
    on, off = probes["on"][0], probes["off"][0]
    assert (on["deterministic"], on["warn_only"], on["cudnn"]) == (True, False, [True, False])
    assert (off["deterministic"], off["cudnn"]) == (False, [False, False])


def test_dataloader_workers_keep_their_own_seeds(probes: dict[str, list[Any]]) -> None:
    batches = probes["on"][0]["batches"]
    # In-order loading: batch k comes from worker k % 2, its items in order. Each worker's
    # random.random() stream must be the one DataLoader seeded it with (base_seed + id).
    streams: dict[int, list[float]] = {0: [], 1: []}
    seeds = {}
    for batch in batches:
        for worker, seed, draw, *_ in batch:
            streams[int(worker)].append(draw)
            seeds[int(worker)] = int(seed)
    assert seeds[1] == seeds[0] + 1
    for worker, stream in streams.items():
        expected = random.Random(seeds[worker])
        assert stream == [expected.random() for _ in stream]


def test_forked_children_are_seeded_apart_and_reproducibly(probes: dict[str, list[Any]]) -> None:
    on = probes["on"][0]
    first_child, second_child = on["forked"]
    assert first_child != second_child
    assert first_child[0] != on["after_fork"]  # nor on the parent's stream
    # Across runs they match (the whole probe does); without the hook they do not.
    assert probes["off"][0]["forked"] != probes["off"][1]["forked"]


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_spawned_children_are_seeded_apart_and_reproducibly(
    venv: Path, tmp_path: Path, method: str
) -> None:
    script = tmp_path / "children.py"
    script.write_text(CHILDREN)
    first, second = (run_json(venv, str(script), method) for _ in range(2))
    assert first == second
    assert first[0][1:] != first[1][1:]  # siblings do not share one stream
    off = [run_json(venv, str(script), method, REPROBOX_DISABLE="1") for _ in range(2)]
    assert off[0] != off[1]


def test_seed_comes_from_reprobox_seed(venv: Path) -> None:
    code = "import random; print(random.random())"
    assert float(run(venv, "-c", code, REPROBOX_SEED="7").stdout) == random.Random(7).random()
    assert float(run(venv, "-c", code).stdout) != random.Random(7).random()


def test_a_broken_setting_warns_once_and_the_program_runs(venv: Path) -> None:
    done = run(venv, "-c", "print('still here')", REPROBOX_SEED="abc")
    assert done.returncode == 0
    assert done.stdout == "still here\n"
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("reprobox_hook: warning: REPROBOX_SEED='abc'")
    assert run(venv, "-c", "print('still here')", REPROBOX_SEED="7").stderr == ""


def test_an_error_while_seeding_warns_once_and_the_program_runs(venv: Path, tmp_path: Path) -> None:
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "def manual_seed(seed):\n    raise RuntimeError('no generator here')\n"
    )
    code = "import torch; print('imported')"
    done = run(venv, "-c", code, PYTHONPATH=str(fake.parent))
    assert (done.returncode, done.stdout) == (0, "imported\n")
    assert done.stderr.count("\n") == 1
    assert "could not set up torch" in done.stderr
    assert "no generator here" in done.stderr


def test_verbose_prints_one_line(venv: Path) -> None:
    done = run(venv, "-c", "import random", REPROBOX_HOOK_VERBOSE="1", REPROBOX_SEED="5")
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("reprobox_hook: seed 5 (root)")
    assert "random=5" in done.stderr
    assert run(venv, "-c", "import random").stderr == ""


def test_report_shows_the_settings_applied_to_torch(venv: Path) -> None:
    # Inductor too: the hook sets its deterministic flag as use_deterministic_algorithms would.
    args = ("-m", "reprobox_hook", "--report", "--import", "torch._inductor.config")
    relaxed = run_json(venv, *args, REPROBOX_WARN_ONLY="1", REPROBOX_FILL_UNINITIALIZED_MEMORY="0")
    assert relaxed["active"]
    assert relaxed["loaded_at_startup"]
    assert relaxed["torch"]["warn_only"]
    assert relaxed["torch_now"]["warn_only"]
    assert relaxed["torch_now"]["inductor_deterministic"] is True
    assert relaxed["torch"]["fill_uninitialized_memory"] is False
    off = run_json(venv, *args, REPROBOX_DETERMINISTIC="0")
    assert off["active"]
    assert off["seeded"]["torch"] == 0
    assert off["torch_now"]["deterministic_algorithms"] is False
    assert off["torch_now"]["inductor_deterministic"] is False
    disabled = run_json(venv, "-m", "reprobox_hook", "--report", REPROBOX_DISABLE="1")
    assert (disabled["active"], disabled["disabled"]) == (False, True)


def test_startup_loads_nothing_but_the_hook(tmp_path: Path, venv: Path) -> None:
    plain = make_venv(tmp_path / "plain", hook=False)
    code = "import sys; print(' '.join(sorted(sys.modules)))"
    with_hook = set(run(venv, "-c", code).stdout.split())
    without = set(run(plain, "-c", code).stdout.split())
    assert with_hook - without == {"reprobox_hook"}


# --------------------------------------------------------------------------- installer


def install(stdlib: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(HOOK), "install", "--python-stdlib", str(stdlib)]
    return subprocess.run(command, capture_output=True, text=True, check=True, env=clean_env())


def fake_distro(root: Path) -> Path:
    """A stdlib dir whose sitecustomize.py is a link into an /etc, as on Debian and Ubuntu."""
    etc, stdlib = root / "etc", root / "stdlib"
    etc.mkdir()
    stdlib.mkdir()
    (etc / "sitecustomize.py").write_text(
        "import sys\nsys.stderr.write('distro sitecustomize ran\\n')\n"
    )
    (stdlib / "sitecustomize.py").symlink_to(etc / "sitecustomize.py")
    return stdlib


def start(*path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """A plain interpreter whose sys.path starts with `path`, as a stdlib dir would."""
    code = (
        "import random, sys; print(random.random()); "
        "print(sum(type(f).__name__ == '_Finder' for f in sys.meta_path))"
    )
    pythonpath = os.pathsep.join(map(str, path))
    base = getattr(sys, "_base_executable", sys.executable)
    return subprocess.run(
        [base, "-c", code],
        capture_output=True,
        text=True,
        env=clean_env(PYTHONPATH=pythonpath, **env),
        check=True,
    )


def test_installer_chains_to_the_distribution_sitecustomize(tmp_path: Path) -> None:
    stdlib = fake_distro(tmp_path)
    install(stdlib)
    install(stdlib)  # twice: still one hook, and the distro's file is not lost
    chained = stdlib / "reprobox_chained_sitecustomize.py"
    assert chained.is_symlink()
    assert chained.resolve() == tmp_path / "etc" / "sitecustomize.py"
    cache = stdlib / "__pycache__"
    compiled = {path.name: path.read_bytes() for path in cache.iterdir()}
    done = start(stdlib)
    assert done.stderr == "distro sitecustomize ran\n"
    assert done.stdout.split() == [str(random.Random(0).random()), "1"]
    # Compiled at install with checked hashes: starting Python writes no pyc of its own
    # (a timestamped one would make an image layer irreproducible).
    assert {name.split(".")[0] for name in compiled} == {
        "reprobox_hook",
        "reprobox_cpu",
        "sitecustomize",
        "reprobox_chained_sitecustomize",
    }
    assert all(int.from_bytes(pyc[4:8], "little") == 0b11 for pyc in compiled.values())
    assert {path.name: path.read_bytes() for path in cache.iterdir()} == compiled


def test_a_plain_sitecustomize_would_have_shadowed_the_distro_one(tmp_path: Path) -> None:
    # The control for the test above: without chaining, only the first one found runs.
    stdlib = fake_distro(tmp_path)
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "sitecustomize.py").write_text("import reprobox_hook\n")
    (shadow / "reprobox_hook.py").write_bytes(HOOK.read_bytes())
    assert start(shadow, stdlib).stderr == ""


def test_installer_chains_to_a_later_sitecustomize_on_the_path(tmp_path: Path) -> None:
    ours, later = tmp_path / "stdlib", tmp_path / "site-packages"
    ours.mkdir()
    later.mkdir()
    (later / "sitecustomize.py").write_text("import sys; sys.stderr.write('later ran\\n')\n")
    install(ours)
    assert start(ours, later).stderr == "later ran\n"


def test_sitecustomize_and_pth_together_hook_once(tmp_path: Path, venv: Path) -> None:
    stdlib = tmp_path / "stdlib"
    stdlib.mkdir()
    install(stdlib)
    code = (
        "import sys, reprobox_hook; "
        "print(sum(type(f).__name__ == '_Finder' for f in sys.meta_path), "
        "len(reprobox_hook.state()['errors']))"
    )
    done = run(venv, "-c", code, PYTHONPATH=str(stdlib))
    assert done.stdout.split() == ["1", "0"]


# --------------------------------------------------------------------------- Debian's Python

DEBIAN_CHECK = textwrap.dedent(
    """
    set -eu
    printf '%s' "$HOOK_SOURCE" > /tmp/reprobox_hook.py
    # Debian's own sitecustomize is a link into /etc; make it say when it runs.
    etc=$(readlink -f /usr/lib/python3*/sitecustomize.py)
    echo 'import sys; sys.stderr.write("debian sitecustomize ran\\\\n")' >> "$etc"
    python3 /tmp/reprobox_hook.py install > /dev/null 2>&1
    python3 /tmp/reprobox_hook.py install > /dev/null 2>&1
    python3 -m venv --without-pip /opt/venv 2> /dev/null
    code='import random, sys; print(random.random(), sum(type(f).__name__ == "_Finder" for f in sys.meta_path))'
    for python in python3 /opt/venv/bin/python "python3 -I"; do
        echo "== $python"
        $python -c "$code" 2>&1
    done
    echo "== diversions"
    dpkg-divert --list '*sitecustomize*'
    """
)


@pytest.mark.docker
def test_debian_system_python_and_its_venvs_are_hooked(
    docker_engine: Any, debian_base: Any
) -> None:
    result = docker_engine.run(
        debian_base.image_id,
        ["sh", "-c", DEBIAN_CHECK],
        env={"HOOK_SOURCE": HOOK.read_text()},
        timeout_s=120,
    )
    assert result.exit_code == 0, result.stderr
    sections: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        if line.startswith("== "):
            current = sections.setdefault(line[3:], [])
        else:
            current.append(line)
    seeded = f"{random.Random(0).random()} 1"
    for python in ("python3", "/opt/venv/bin/python", "python3 -I"):
        assert sections[python] == ["debian sitecustomize ran", seeded], python
    [diversion] = sections["diversions"]
    assert diversion.startswith("local diversion of /usr/lib/python3")
    assert diversion.endswith("/reprobox_chained_sitecustomize.py")
