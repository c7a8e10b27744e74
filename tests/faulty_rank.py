"""tp_infer.generate with a fault injected on one rank, for the reliability tests (run under torchrun).

FAULT_RANK: the rank whose forward fails; FAULT_AFTER: how many forwards it runs first; FAULT_KIND: `raise` (the
default: an exception) or `hang` (the rank stays alive but never comes back from the forward); FAULT_MARK: a file
written when the fault strikes, whose time the tests measure from."""

import os
import time
from pathlib import Path

from tp_infer import generate
from tp_infer.model.transformer import Transformer

if os.environ.get("RANK") == os.environ["FAULT_RANK"]:
    forward, calls = Transformer.forward, [0]
    hang = os.environ.get("FAULT_KIND", "raise") == "hang"

    def faulty_forward(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] > int(os.environ["FAULT_AFTER"]):
            if "FAULT_MARK" in os.environ:
                Path(os.environ["FAULT_MARK"]).touch()
            if hang:
                time.sleep(3600)
            raise RuntimeError("injected fault in the forward")
        return forward(self, *args, **kwargs)

    Transformer.forward = faulty_forward

generate.cli()
