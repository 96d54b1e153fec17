"""argv -> one context and one call into the library -> text or JSON -> an exit code."""

from __future__ import annotations

import argparse
import errno
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from reprobox import __version__
from reprobox.errors import (
    EXIT_CHECK_FAILED,
    EXIT_INTERNAL,
    EXIT_OK,
    MissingError,
    ReproboxError,
)

__all__ = ["entrypoint", "main"]

if TYPE_CHECKING:
    from reprobox.context import Context
    from reprobox.engine import Engine

Command = Callable[[argparse.Namespace, "Context"], int]


def _cmd_init(args: argparse.Namespace, ctx: Context) -> int:
    if args.from_file is None:
        from reprobox.render import starter_spec

        text = starter_spec(torch=args.torch or "2.13.0", cuda=args.cuda or "cpu", name=args.name)
    else:
        from reprobox.init_from import spec_from_project

        text = spec_from_project(
            Path(args.from_file),
            groups=args.group,
            python=args.python,
            cuda=args.cuda,
            torch=args.torch,
            name=args.name if args.name != "my-env" else None,
            base_image=args.base_image,
        )
    if args.output is None:
        sys.stdout.write(text)
    else:
        from reprobox.init_from import write_spec

        write_spec(Path(args.output), text)
    return 0


def _cmd_lock(args: argparse.Namespace, ctx: Context) -> int:
    from reprobox.lock import lock_spec

    result = lock_spec(ctx, Path(args.spec), output=_opt_path(args.output), relock=args.relock)
    return _emit(args, result)


def _cmd_render(args: argparse.Namespace, ctx: Context) -> int:
    from reprobox.render import render_spec

    result = render_spec(
        ctx,
        Path(args.spec),
        Path(args.output),
        lock_path=_opt_path(args.lock),
        relock=args.relock,
        wheels=not args.no_wheels,
        refetch=args.refetch,
    )
    return _emit(args, result)


def _cmd_build(args: argparse.Namespace, ctx: Context) -> int:
    from reprobox.build import BuildOptions, build

    options = BuildOptions(
        lock_path=_opt_path(args.lock),
        tag=args.tag,
        relock=args.relock,
        nocache=args.no_cache,
        check=not args.no_check,
        refetch=args.refetch,
        assemble=args.assemble,
    )
    result = build(ctx, Path(args.spec), options)
    return _emit(args, result, EXIT_OK if result.passed else EXIT_CHECK_FAILED)


def _cmd_check(args: argparse.Namespace, ctx: Context) -> int:
    from reprobox.check import check_image

    result = check_image(
        ctx, args.image, emulate_cpu=args.emulate_cpu, cpuset_cpus=args.cpuset_cpus
    )
    return _emit(args, result, result.exit_code)


def _cmd_diff(args: argparse.Namespace, ctx: Context) -> int:
    from reprobox.diff import diff_images

    diff = diff_images(args.image_a, args.image_b, engine=ctx.engine)
    return _emit(args, diff, EXIT_OK if diff.identical else EXIT_CHECK_FAILED)


def _cmd_publish(args: argparse.Namespace, ctx: Context) -> int:
    from reprobox.build import BuildOptions
    from reprobox.publish import publish

    result = publish(
        ctx,
        Path(args.spec),
        args.to,
        tags=args.tag,
        options=BuildOptions(
            lock_path=_opt_path(args.lock),
            relock=args.relock,
            refetch=args.refetch,
            assemble=args.assemble,
        ),
        allow_unverified=args.allow_unverified,
    )
    return _emit(args, result, result.exit_code)


def _cmd_export(args: argparse.Namespace, ctx: Context) -> int:
    from reprobox.export_import import export_image

    return _emit(args, export_image(ctx, args.image, Path(args.output)))


def _cmd_import(args: argparse.Namespace, ctx: Context) -> int:
    from reprobox.export_import import import_image

    result = import_image(
        ctx, Path(args.archive), allow_foreign=args.allow_foreign, force=args.force
    )
    return _emit(args, result)


def _cmd_doctor(args: argparse.Namespace, ctx: Context) -> int:
    from reprobox.doctor import doctor

    result = doctor(ctx, _opt_path(args.spec))
    return _emit(args, result, result.exit_code)


def _opt_path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def _emit(args: argparse.Namespace, result: object, code: int = EXIT_OK) -> int:
    """Print `result` as text, or as JSON with --json; return the command's exit code."""
    from reprobox.cli_format import report, text

    if args.json:
        json.dump(report(result), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text(result).rstrip("\n") + "\n")
    return code


def _init_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--torch",
        metavar="VERSION",
        help="torch version (default 2.13.0; with --from: the file's torch)",
    )
    p.add_argument(
        "--cuda",
        metavar="VERSION|cpu",
        help="CUDA version or cpu (default cpu; with --from: the build the file's torch names, "
        "else PyPI's build of that release)",
    )
    p.add_argument("--name", default="my-env", help="image name (default my-env)")
    p.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE",
        help="requirements.txt, pyproject.toml, uv.lock or pylock.toml to pin the spec from",
    )
    p.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="NAME",
        help="with --from: add an optional-dependency or dependency group (repeatable)",
    )
    p.add_argument(
        "--python", default="3.11", metavar="X.Y", help="with --from: the image's Python (3.11)"
    )
    p.add_argument(
        "--base-image",
        metavar="REF@sha256:DIGEST",
        help="with --from: base.image (needed for a Python no Debian bootstrap base has)",
    )
    p.add_argument("-o", "--output", metavar="SPEC", help="write the spec there, not to stdout")


def _global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"reprobox {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument(
        "--context",
        metavar="NAME",
        help="the Docker context whose engine to use (default: DOCKER_HOST, DOCKER_CONTEXT, "
        "then Docker's current context)",
    )


def _lock_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lock", metavar="LOCK", help="the lock file (default: SPEC with .lock)")
    p.add_argument("--relock", action="store_true", help="resolve again when the spec changed")
    p.add_argument(
        "--refetch", action="store_true", help="fetch again wheels that fail verification"
    )


def _assemble_option(p: argparse.ArgumentParser) -> None:
    route = p.add_mutually_exclusive_group()
    route.add_argument(
        "--assemble",
        dest="assemble",
        action="store_const",
        const=True,
        help="write the image from the verified wheels, no `docker build` (the default wherever "
        "it gives the recipe's image ID; here also where it does not)",
    )
    route.add_argument(
        "--recipe",
        dest="assemble",
        action="store_const",
        const=False,
        help="`docker build` the rendered Dockerfile and normalise the result (the same image "
        "ID; slower)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reprobox",
        description="Build container images in which PyTorch training is bit-for-bit reproducible, and prove it.",
    )
    _global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, func: Command, help_text: str, *, spec: bool = True, json_out: bool = True
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        if spec:
            p.add_argument("spec", metavar="SPEC", help="the spec file (YAML)")
        if json_out:
            p.add_argument("--json", action="store_true", help="print a JSON report on stdout")
        return p

    p = command(
        "init",
        _cmd_init,
        "print a commented starter spec, or one pinned from a project's file (--from)",
        spec=False,
        json_out=False,
    )
    _init_options(p)

    p = command("lock", _cmd_lock, "resolve every wheel for the image's platform, pinned by sha256")
    p.add_argument(
        "-o", "--output", metavar="LOCK", help="where to write (default: SPEC with .lock)"
    )
    p.add_argument("--relock", action="store_true", help="rewrite a lock whose spec changed")

    p = command(
        "render", _cmd_render, "write the build context (Dockerfile, hook, self-check, lock)"
    )
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="an empty or new directory")
    p.add_argument(
        "--no-wheels", action="store_true", help="leave the wheel folders empty (for review)"
    )
    _lock_options(p)

    p = command("build", _cmd_build, "lock, fetch, render, build and self-check an image")
    p.add_argument(
        "--tag", metavar="NAME:TAG", help="tag (default: the spec's name and a content tag)"
    )
    p.add_argument("--no-cache", action="store_true", help="build every layer again")
    p.add_argument(
        "--no-check", action="store_true", help="skip the self-check (the image is not proven)"
    )
    _assemble_option(p)
    _lock_options(p)

    p = command(
        "check",
        _cmd_check,
        "rerun the self-check in IMAGE and compare with its recorded fingerprint",
        spec=False,
    )
    p.add_argument("image", metavar="IMAGE", help="image ID or name:tag")
    p.add_argument(
        "--emulate-cpu",
        metavar="MODEL",
        help="run it on an emulated x86-64 CPU (qemu-user model: Haswell, EPYC-Rome, Nehalem...)",
    )
    p.add_argument(
        "--cpuset-cpus", metavar="LIST", help="run it on these CPUs only (e.g. 0 or 0-1)"
    )

    p = command(
        "diff",
        _cmd_diff,
        "why two images differ: config, layers, files (exit 1 if they do)",
        spec=False,
    )
    p.add_argument(
        "image_a", metavar="IMAGE_A", help="image ID, name:tag, or a saved archive (.tar)"
    )
    p.add_argument(
        "image_b", metavar="IMAGE_B", help="image ID, name:tag, or a saved archive (.tar)"
    )

    p = command("publish", _cmd_publish, "build, gate on the self-check, push, verify the digest")
    p.add_argument("--to", required=True, metavar="REGISTRY/REPO", help="where to push")
    p.add_argument(
        "--tag", action="append", default=[], metavar="TAG", help="another tag (repeatable)"
    )
    p.add_argument(
        "--allow-unverified",
        action="store_true",
        help="push even when no self-check can prove the image here (a CUDA image on a host "
        "without a GPU); the report says it is unverified. A failed self-check still stops it",
    )
    _assemble_option(p)
    _lock_options(p)

    p = command("export", _cmd_export, "write IMAGE, its spec and lock to one archive", spec=False)
    p.add_argument("image", metavar="IMAGE", help="image ID or name:tag")
    p.add_argument("-o", "--output", required=True, metavar="FILE.tar", help="the archive")

    p = command("import", _cmd_import, "verify and load an archive that export wrote", spec=False)
    p.add_argument("archive", metavar="FILE.tar", help="the archive")
    p.add_argument(
        "--allow-foreign",
        action="store_true",
        help="load an archive that is not a reprobox export (no spec and lock matching its labels)",
    )
    p.add_argument(
        "--force", action="store_true", help="move a tag this engine has to the imported image"
    )

    p = command("doctor", _cmd_doctor, "can this host build (and run) the spec?", spec=False)
    p.add_argument("spec", nargs="?", metavar="SPEC", help="the spec to check the host against")
    return parser


def main(argv: Sequence[str] | None = None, *, engine: Engine | None = None) -> int:
    """Run reprobox with `argv`; the one place where errors become exit codes.

    `engine` is the engine the commands use (tests pass a fake one); by default the Docker
    Engine at DOCKER_HOST, connected to only when a command needs it.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad arguments, 0 for --help
        return int(exc.code or 0)
    func: Command = args.func
    try:
        from reprobox.context import Context

        return func(args, Context.for_command(engine, docker_context=args.context))
    except KeyboardInterrupt:
        sys.stderr.write("reprobox: interrupted\n")
        return 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        error = _reported(exc)
        if error is not None:
            sys.stderr.write(f"reprobox: error: {error.render()}\n")
            return error.exit_code
        if not args.debug:
            sys.stderr.write(
                f"reprobox: internal error: {type(exc).__name__}: {exc}\n"
                "  hint: this is a bug in reprobox; run again with --debug and report the traceback\n"
            )
        return EXIT_INTERNAL


#: A full disk or an exhausted quota: the host lacks room (exit 3), not a bug in reprobox.
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def _reported(exc: Exception) -> ReproboxError | None:
    """The error a user is told about, with its exit code; None for a bug in reprobox."""
    if isinstance(exc, ReproboxError):
        return exc
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        where = f" writing {exc.filename}" if exc.filename else ""
        return MissingError(
            f"no space left on the device{where} ({exc.strerror})",
            hint="free space there (`docker system prune` drops unused images; "
            "REPROBOX_ASSEMBLE_CACHE_GB bounds the layer cache), or point REPROBOX_CACHE_DIR "
            "at a roomier disk; `reprobox doctor` says how much a build needs",
        )
    return None


def entrypoint() -> None:
    """The console script."""
    raise SystemExit(main())
