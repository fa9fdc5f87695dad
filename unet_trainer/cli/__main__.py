"""``python -m unet_trainer.cli train|data|eval|predict|cv|export ...`` (handy under torchrun).

The commands are the package's console scripts (``unet-NAME``, ``[project.scripts]`` of pyproject.toml), read
from the installed distribution's entry points: that list is the only one, and only the command asked for is
imported.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from importlib.metadata import EntryPoint, PackageNotFoundError, distribution

# The distribution whose console scripts are the commands (``name`` of [project] in pyproject.toml).
DISTRIBUTION = "unet-trainer"
SCRIPT_PREFIX = "unet-"
# The order the usage line lists the commands in, the order of a project's life; a command missing here is
# listed after these, in name order.
USAGE_ORDER = ("train", "data", "eval", "predict", "cv", "export")


class NotInstalledError(RuntimeError):
    """The distribution's metadata (its console scripts) cannot be found: the package is not installed."""


def commands() -> dict[str, EntryPoint]:
    """Each command name (its console script without ``unet-``) and the entry point of its ``main(argv)``.

    Raises:
        NotInstalledError: the distribution is not installed, so its console scripts are unknown.
    """
    try:
        entry_points = distribution(DISTRIBUTION).entry_points
    except PackageNotFoundError:
        raise NotInstalledError(
            f"the {DISTRIBUTION} distribution is not installed, so its commands are unknown: "
            "install it (pip install -e . in the source folder)"
        ) from None
    scripts = entry_points.select(group="console_scripts")
    return {ep.name.removeprefix(SCRIPT_PREFIX): ep for ep in scripts if ep.name.startswith(SCRIPT_PREFIX)}


def usage_names(names: Iterable[str]) -> list[str]:
    """The command names in the usage line's order (:data:`USAGE_ORDER`, then the others by name)."""
    names = set(names)
    return [n for n in USAGE_ORDER if n in names] + sorted(names - set(USAGE_ORDER))


def main(argv: list[str] | None = None) -> int:
    """Run the command named by the first argument on the rest; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        known = commands()
    except NotInstalledError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args or args[0] not in known:
        print(f"usage: python -m unet_trainer.cli {{{','.join(usage_names(known))}}} ...", file=sys.stderr)
        return 2
    return known[args[0]].load()(args[1:])


if __name__ == "__main__":
    sys.exit(main())
