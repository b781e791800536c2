"""``python -m node``: the same CLI as the ``ainode`` console script."""

from node.cli import main

if __name__ == "__main__":
    main()
