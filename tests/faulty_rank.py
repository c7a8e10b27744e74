"""tp_infer.generate with a fault injected on one rank, for the reliability tests (run under torchrun).

FAULT_RANK: the rank whose forward raises; FAULT_AFTER: how many forwards it runs first."""

import os

from tp_infer import generate
from tp_infer.model import Transformer

if os.environ.get("RANK") == os.environ["FAULT_RANK"]:
    forward, calls = Transformer.forward, [0]

    def faulty_forward(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] > int(os.environ["FAULT_AFTER"]):
            raise RuntimeError("injected fault in the forward")
        return forward(self, *args, **kwargs)

    Transformer.forward = faulty_forward

generate.cli()
