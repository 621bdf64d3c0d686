"""Run the MNIST example under ``torchrun`` and record what each rank did (test helper).

    PYTHONPATH=examples python -m torch.distributed.run --nproc_per_node=2 \
        --master_addr 127.0.0.1 --master_port PORT tests/examples/_dist_worker.py RECORD_DIR \
        [example arguments ...]

Imports ``mnist_capsnet`` (and its siblings ``engine``, ``train``) plainly, found through the
``PYTHONPATH`` the test sets for torchrun (nothing here changes the import path). Calls
``mnist_capsnet.run`` unchanged, then writes, per rank ``r``: ``RECORD_DIR/rank{r}.pt`` (the
rank's final model ``state_dict``), ``RECORD_DIR/history{r}.json`` (the metrics ``run`` returned
on that rank) and ``RECORD_DIR/saves{r}.txt`` (one line per checkpoint that rank wrote through
``atomic_save``). Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

import engine
import mnist_capsnet
import train


def main() -> None:
    record = Path(sys.argv[1])
    argv = sys.argv[2:]
    rank = int(os.environ.get("RANK", "0"))

    trainers: list[Any] = []
    init = engine.Trainer.__init__

    def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        trainers.append(self)

    # train.py calls the atomic_save it imported from runtime: patch it where it is looked up.
    save = train.atomic_save
    saves = record / f"saves{rank}.txt"

    def recording_save(obj: Any, path: Path) -> None:
        with open(saves, "a") as f:
            f.write(f"{path}\n")
        save(obj, path)

    engine.Trainer.__init__ = recording_init  # type: ignore[method-assign]
    train.atomic_save = recording_save
    record.mkdir(parents=True, exist_ok=True)
    saves.write_text("")
    history = mnist_capsnet.run(argv, log=lambda *a, **k: None)
    state = {k: v.detach().cpu().clone() for k, v in trainers[0].model.state_dict().items()}
    torch.save(state, record / f"rank{rank}.pt")
    (record / f"history{rank}.json").write_text(json.dumps(history))


if __name__ == "__main__":
    main()
