"""``python -m cluster``: the same as the ``cluster`` command."""

from cluster.entry import main

if __name__ == "__main__":
    main()
