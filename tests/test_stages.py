"""The build stage joined end to end on the FakeEngine: a real lock, wheels fetched and verified
from local files, a real build context, a replayed build whose layers are real tars, a real
normalisation and relabelling through archives; only the engine and the in-image self-check's
answers are faked. Reused, failed, and unproven for want of a GPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeEngine, context
from test_render import fake_lock

from reprobox import cli
from reprobox.build import BuildOptions, BuildResult, ReuseIndex, build
from reprobox.context import Context
from reprobox.engine import RunResult
from reprobox.errors import EXIT_CHECK_FAILED, EXIT_MISSING, GpuUnavailableError
from reprobox.labels import CONTENT_ID, fingerprint_label, trace_label
from reprobox.lockfile import default_lock_path, read_lockfile, write_lockfile
from reprobox.normalize import NormalizedImage, held_chains, normalize_image
from reprobox.spec_load import load_spec

BASE = "registry.example/team/base:1@sha256:" + "b" * 64
SPEC = f"""\
version: 1
name: demo-fake
base:
  image: "{BASE}"
python: "3.11"
torch:
  version: "{{torch}}"
  cuda: {{cuda}}
packages:
  - numpy==2.4.6
selfcheck:
  steps: 2
"""
FINGERPRINT = "a" * 64
RUN = {"losses": ["0x1.8p-1", "0x1p-1"], "state_sha256": "5" * 64}


def project(
    folder: Path, *, cuda: str = "cpu", numpy: str = "2.4.6", apt: tuple[str, ...] = ()
) -> Path:
    """A spec on a digest-pinned base, and its lock, whose wheels are small local files."""
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / "spec.yaml"
    torch = "2.13.0" if cuda == "cpu" else "2.5.1"
    text = SPEC.format(torch=torch, cuda=cuda if cuda == "cpu" else f'"{cuda}"')
    text += "".join(f"apt:\n  - {name}\n" for name in apt[:1])
    spec_path.write_text(text.replace("numpy==2.4.6", f"numpy=={numpy}"))
    lock = fake_lock(load_spec(spec_path))
    served = folder / "served"
    served.mkdir()
    wheels = []
    for wheel in lock.wheels:
        data = f"{wheel.filename} stands in for a wheel".encode()
        (served / wheel.filename).write_bytes(data)
        url, digest = (served / wheel.filename).as_uri(), hashlib.sha256(data).hexdigest()
        wheels.append(dataclasses.replace(wheel, url=url, sha256=digest, size=len(data)))
    write_lockfile(default_lock_path(spec_path), dataclasses.replace(lock, wheels=tuple(wheels)))
    return spec_path


def engine_with_base(**kwargs: object) -> FakeEngine:
    """A FakeEngine that holds the spec's base image, as a pull would have left it."""
    engine = FakeEngine(**kwargs)  # type: ignore[arg-type]
    engine.add_image({"config": {"Env": ["PATH=/usr/bin:/bin"], "Labels": {}}}, BASE)
    return engine


def selfcheck(*, passed: bool = True) -> RunResult:
    """What the in-image self-check prints: runs that agree, or that part at step 2."""
    runs = [RUN, RUN if passed else {**RUN, "losses": ["0x1.8p-1", "0x1.2p-1"]}]
    difference = None if passed else {"step": 2, "what": "loss", "a": "0x1p-1", "b": "0x1.2p-1"}
    report = {
        "passed": passed,
        "fingerprint": FINGERPRINT,
        "device_class": "cpu-x86_64",
        "first_difference": difference,
        "failures": [] if passed else ["the runs differ at step 2: loss"],
        "runs": runs,
    }
    return RunResult(0 if passed else 1, json.dumps(report), "")


def answering(result: RunResult) -> FakeEngine:
    def handler(image: str, argv: Sequence[str], env: Mapping[str, str]) -> RunResult:
        return result

    return engine_with_base(run_handler=handler)


def _calls(engine: FakeEngine, since: int = 0) -> list[str]:
    return [call for call, _ in engine.calls[since:]]


def _build(ctx: Context, spec_path: Path, **options: bool) -> BuildResult:
    return build(ctx, spec_path, BuildOptions(**options))  # type: ignore[arg-type]


def test_a_build_is_normalised_checked_labelled_and_tagged(tmp_path: Path) -> None:
    spec_path = project(tmp_path / "p")
    engine = answering(selfcheck())
    result = _build(context(engine, tmp_path / "cache"), spec_path)
    assert result.passed
    assert not result.reused
    assert result.selfcheck is not None
    assert result.selfcheck.fingerprint == FINGERPRINT
    assert result.tags == (f"demo-fake:{result.content_tag}",)
    assert engine.inspect_image(result.tags[0]).id == result.image_id
    labels = engine.inspect_image(result.image_id).labels
    assert labels[fingerprint_label("cpu-x86_64")] == FINGERPRINT
    assert json.loads(labels[trace_label("cpu-x86_64")]) == RUN
    assert labels[CONTENT_ID] == result.content_id != result.image_id
    assert labels["reprobox.cuda"] == "cpu"
    assert result.built_id != result.content_id, "the raw build was normalised"
    (run,) = engine.runs
    assert run.image == result.content_id, "the check ran in the normalised image"
    assert result.reproducible is not None
    assert result.reproducible.matches is None  # nothing recorded yet: now it is
    assert read_lockfile(default_lock_path(spec_path)).image_id == result.content_id
    assert _calls(engine).count("ping") == 1, "one command, one ping"


def test_the_containerd_store_shows_other_ids_and_the_build_records_the_same_one(
    tmp_path: Path,
) -> None:
    """On a store that names images by manifest digest the build checks and tags that image,
    and records the config digest the classic store gives."""
    spec_path = project(tmp_path / "p")
    classic = _build(context(answering(selfcheck()), tmp_path / "cache-a"), spec_path)
    engine = answering(selfcheck())
    engine.containerd_store = True
    modern = _build(context(engine, tmp_path / "cache-b"), spec_path)
    assert modern.passed
    assert modern.content_id == classic.content_id
    assert modern.image_id != classic.image_id
    labels = engine.inspect_image(modern.tags[0]).labels
    assert labels[CONTENT_ID] == modern.content_id
    assert engine.inspect_image(modern.tags[0]).id == modern.image_id
    (run,) = engine.runs
    assert run.image != modern.content_id, "checked by the ID that store shows"
    assert engine.image_exists(run.image)
    assert modern.reproducible is not None
    assert modern.reproducible.matches is True, "the ID the classic build recorded"


def test_an_unchanged_rebuild_reuses_the_record_and_its_proof(tmp_path: Path) -> None:
    spec_path = project(tmp_path / "p")
    engine = answering(selfcheck())
    first = _build(context(engine, tmp_path / "cache"), spec_path)
    since = len(engine.calls)
    again = _build(context(engine, tmp_path / "cache"), spec_path)
    assert again.reused
    assert (again.image_id, again.content_id) == (first.image_id, first.content_id)
    assert again.fingerprints == {"cpu-x86_64": FINGERPRINT}
    assert len(engine.runs) == 1, "no second self-check"
    assert not {"save", "load"} & set(_calls(engine, since)), "no second normalisation"
    assert again.reproducible is not None
    assert again.reproducible.matches is True
    # The control: without the layer cache's record the image is normalised and checked again.
    since = len(engine.calls)
    fresh = _build(context(engine, tmp_path / "cache"), spec_path, nocache=True)
    assert not fresh.reused
    assert {"save", "load"} <= set(_calls(engine, since))
    assert len(engine.runs) == 2


def test_a_recipe_whose_inputs_did_not_change_is_not_built_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's build is skipped where the context's inputs (Dockerfile, files, wheels by
    sha256; not the umask) and the build's labels are those of a checked image it still holds; any
    change, a missing image, `--no-cache` or a record without a check builds it again."""
    spec_path = project(tmp_path / "p")
    engine = answering(selfcheck())
    first = _build(context(engine, tmp_path / "cache"), spec_path)
    assert "build" in _calls(engine)

    def built_again(**options: bool) -> BuildResult:
        since = len(engine.calls)
        result = _build(context(engine, tmp_path / "cache"), spec_path, **options)
        assert "build" in _calls(engine, since)
        return result

    since = len(engine.calls)
    again = _build(context(engine, tmp_path / "cache"), spec_path)
    assert "build" not in _calls(engine, since), "the same inputs: no engine build"
    assert again.reused
    assert (again.built_id, again.image_id, again.content_id) == (
        first.built_id,
        first.image_id,
        first.content_id,
    )
    assert again.tags == first.tags
    assert again.reproducible is not None
    assert again.reproducible.matches is True
    assert len(engine.runs) == 1, "no second self-check"
    # A `--no-check` build after a checked one keeps the proof: a checked build after it still
    # needs no engine build.
    (tmp_path / "cache" / "builds" / "recipe-inputs").rename(tmp_path / "inputs-kept")
    since = len(engine.calls)
    _build(context(engine, tmp_path / "cache"), spec_path, check=False)
    assert "build" in _calls(engine, since), "no inputs record: the engine answers from cache"
    since = len(engine.calls)
    _build(context(engine, tmp_path / "cache"), spec_path)
    assert "build" not in _calls(engine, since), "recorded as checked, as the image is"
    assert len(engine.runs) == 1
    # The controls: each builds again.
    assert built_again(nocache=True).image_id == first.image_id
    mask = os.umask(0o077)  # the context is written with the same modes under any umask
    try:
        since = len(engine.calls)
        _build(context(engine, tmp_path / "cache"), spec_path)
        assert "build" not in _calls(engine, since)
    finally:
        os.umask(mask)
    engine.remove_image(first.image_id, force=True)
    assert built_again().image_id == first.image_id, "the image is gone: made again"
    engine.remove_image(first.built_id, force=True)
    assert built_again().built_id == first.built_id, "the raw build (its cached steps) is gone"
    monkeypatch.setattr("reprobox.render.__version__", "0.0.0+other")
    built_again()  # another reprobox: its version heads the Dockerfile
    monkeypatch.undo()
    # Another project (its lock names its own wheel files): recorded without a check first.
    unchecked = project(tmp_path / "q")
    _build(context(engine, tmp_path / "cache"), unchecked, check=False)
    since = len(engine.calls)
    _build(context(engine, tmp_path / "cache"), unchecked, check=False)
    assert "build" not in _calls(engine, since), "--no-check again: its record will do"
    since = len(engine.calls)
    checked = _build(context(engine, tmp_path / "cache"), unchecked)
    assert "build" in _calls(engine, since), "a check is asked for: the build decides"
    assert checked.selfcheck is not None


def test_a_layer_an_earlier_build_normalised_is_neither_rewritten_nor_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a pin change torch's layer is the same raw layer: its normalised form is on
    record and the engine holds its chain, so it is not rewritten and not in the archive. The
    image is the one a `--no-cache` build (every layer rewritten and sent) gives."""
    normalised: list[NormalizedImage] = []

    def spy(*args: Any, **kwargs: Any) -> NormalizedImage:
        normalised.append(normalize_image(*args, **kwargs))
        return normalised[-1]

    monkeypatch.setattr("reprobox.build.normalize_image", spy)
    engine = answering(selfcheck())
    _build(context(engine, tmp_path / "cache"), project(tmp_path / "p"))
    assert normalised[-1].layers_not_sent == 0, "nothing on record yet"
    pinned = project(tmp_path / "q", numpy="2.4.5")
    changed = _build(context(engine, tmp_path / "cache"), pinned)
    # The fake's layers follow each step's text, not the files it copies: every layer is the
    # same raw layer as before (a real engine changes those above torch's; tests/test_build.py).
    assert normalised[-1].layers_not_sent == len(normalised[-1].diff_ids) > 0
    again = _build(context(engine, tmp_path / "cache"), pinned, nocache=True)
    assert normalised[-1].layers_not_sent == 0
    assert (again.content_id, again.image_id) == (changed.content_id, changed.image_id)
    assert list((tmp_path / "cache" / "normalised-layers").iterdir()), "the records"
    # On record, but the engine no longer holds the chains: every layer rewritten and sent.
    held = {image_id for image_id, image in engine.images.items() if BASE in image.tags}
    stale = held_chains(engine, list(engine.images))
    for image_id in set(engine.images) - held:
        del engine.images[image_id]
    rebuilt = _build(context(engine, tmp_path / "cache"), pinned)
    assert normalised[-1].layers_not_sent == 0
    assert rebuilt.content_id == changed.content_id
    # Held when looked at, gone by the load (an image removed meanwhile): the load fails, and
    # every layer is rewritten and sent instead, with the same result.
    for image_id in set(engine.images) - held:
        del engine.images[image_id]
    monkeypatch.setattr("reprobox.build.held_chains", lambda engine, images: stale)
    raced = _build(context(engine, tmp_path / "cache"), pinned)
    assert normalised[-1].layers_not_sent == 0
    assert raced.content_id == changed.content_id
    monkeypatch.undo()
    monkeypatch.setattr("reprobox.build.normalize_image", spy)
    # The containerd store takes no layer from what it holds: every layer goes.
    modern = answering(selfcheck())
    modern.containerd_store = True
    _build(context(modern, tmp_path / "cache-b"), project(tmp_path / "r"))
    _build(context(modern, tmp_path / "cache-b"), project(tmp_path / "s", numpy="2.4.5"))
    assert normalised[-1].layers_not_sent == 0


def test_a_failed_self_check_leaves_no_tag_and_no_record(tmp_path: Path) -> None:
    spec_path = project(tmp_path / "p")
    engine = answering(selfcheck(passed=False))
    ctx = context(engine, tmp_path / "cache")
    since = len(engine.calls)
    result = _build(ctx, spec_path)
    assert not result.passed
    assert result.tags == ()
    assert result.reproducible is None
    assert result.selfcheck is not None
    assert result.selfcheck.first_difference == {
        "step": 2,
        "what": "loss",
        "a": "0x1p-1",
        "b": "0x1.2p-1",
    }
    assert "tag" not in _calls(engine, since)
    assert [image.tags for image in engine.images.values() if image.tags] == [{BASE}]
    assert ReuseIndex(ctx.cache.builds).get(result.built_id) is None, "a failure is not reused"
    assert read_lockfile(default_lock_path(spec_path)).image_id is None


def test_the_cli_builds_the_recipe_where_assembling_would_not_give_its_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default route assembles; `apt:` on a pinned base.image needs the recipe's RUN step,
    so there the CLI builds the recipe, and says why."""
    spec_path = project(tmp_path / "p", apt=("curl",))
    monkeypatch.setenv("REPROBOX_CACHE_DIR", str(tmp_path / "cache"))
    engine = answering(selfcheck())
    assert cli.main(["build", str(spec_path), "--json"], engine=engine) == 0
    err = capsys.readouterr().err
    assert "route: the recipe (`docker build`): `apt:` packages on a pinned `base.image`" in err
    assert "build" in _calls(engine)


def test_the_cli_says_a_failed_check_with_exit_1_and_tags_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec_path = project(tmp_path / "p")
    monkeypatch.setenv("REPROBOX_CACHE_DIR", str(tmp_path / "cache"))
    engine = answering(selfcheck(passed=False))
    assert (
        cli.main(["build", str(spec_path), "--recipe", "--json"], engine=engine)
        == EXIT_CHECK_FAILED
    )
    report = json.loads(capsys.readouterr().out)
    assert (report["passed"], report["tags"]) == (False, [])
    assert "self-check FAILED" in report["summary"]
    assert "the image was not tagged" in report["summary"]
    assert report["selfcheck"]["first_difference"]["step"] == 2


def test_a_cuda_image_without_a_gpu_is_built_then_exit_3_then_reused_unproven(
    tmp_path: Path,
) -> None:
    spec_path = project(tmp_path / "p", cuda="12.4")
    engine = answering(selfcheck())  # no nvidia runtime: a GPU request is refused
    ctx = context(engine, tmp_path / "cache")
    with pytest.raises(GpuUnavailableError) as caught:
        _build(ctx, spec_path)
    assert caught.value.exit_code == EXIT_MISSING
    assert "needs a GPU" in caught.value.message
    assert "--no-check" in (caught.value.hint or "")
    (run,) = engine.runs
    assert run.gpus is True
    assert run.argv[-2:] == ("--device", "cuda")
    since = len(engine.calls)
    unproven = _build(context(engine, tmp_path / "cache"), spec_path, check=False)
    assert unproven.passed
    assert unproven.reused, "--no-check reuses the image the refused build normalised"
    assert unproven.selfcheck is None
    assert not {"build", "save", "load"} & set(_calls(engine, since)), "nor sends the context"
    assert engine.inspect_image(unproven.tags[0]).id == unproven.image_id
    # Asked to prove it again on this host: a one-step probe says no before any normalising.
    since = len(engine.calls)
    with pytest.raises(GpuUnavailableError):
        _build(context(engine, tmp_path / "cache"), spec_path)
    assert engine.runs[-1].argv[-4:] == ("--steps", "1", "--device", "cuda")
    assert not {"save", "load"} & set(_calls(engine, since))


def test_reuse_index_round_trip_and_corrupt_files(tmp_path: Path) -> None:
    index = ReuseIndex(tmp_path / "builds")
    built = "sha256:" + "a" * 64
    assert index.get(built) is None
    image = "sha256:" + "1" * 64
    index.put(built, {"image_id": image, "content_id": image, "checked": "yes"})
    assert index.get(built) == {"image_id": image, "content_id": image, "checked": "yes"}
    (tmp_path / "builds" / ("a" * 64 + ".json")).write_text("{not json")
    assert index.get(built) is None, "a corrupt record is a cache miss, not a crash"
    (tmp_path / "builds" / ("a" * 64 + ".json")).write_text('{"image_id": 3}')
    assert index.get(built) is None
