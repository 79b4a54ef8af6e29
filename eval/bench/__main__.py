"""Entry point of `python -m eval.bench`, and of its worker subprocesses (worker.spawn_worker runs it again)."""
from .cli import main

if __name__ == "__main__":
    main()
