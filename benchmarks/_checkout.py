"""Run `moxkit` from another checkout of this repository with this venv, for benchmarks that
measure two commits side by side:

    python benchmarks/_checkout.py TREE extrapolate REF MEM --alpha 4 -o OUT

TREE is a git worktree with its C loop built in place (`python setup.py build_ext --inplace`);
its moxkit package is imported in place of the installed one. Trees from before the move of
cli/ and kernels/ into moxkit/ kept them at the top (mapped by pyproject.toml): those are found
there too."""

from __future__ import annotations

import sys
from importlib.machinery import ModuleSpec, PathFinder

PACKAGES = ("moxkit", "moxkit.cli", "moxkit.kernels")  # TREE/moxkit, then TREE/cli, TREE/kernels


class TreeFinder:
    """Finds moxkit in TREE, and cli/ and kernels/ at TREE's top where an old tree has them
    (otherwise moxkit's own __path__ finds them; submodules follow from their __path__)."""

    def __init__(self, tree: str) -> None:
        self.tree = tree

    def find_spec(self, fullname: str, path=None, target=None) -> ModuleSpec | None:
        if fullname not in PACKAGES:
            return None
        return PathFinder.find_spec(fullname, [self.tree])


def main() -> None:
    tree = sys.argv.pop(1)
    sys.meta_path.insert(0, TreeFinder(tree))
    from moxkit.cli.main import main as moxkit_main

    sys.exit(moxkit_main())


if __name__ == "__main__":
    main()
