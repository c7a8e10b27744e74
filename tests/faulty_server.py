"""A front end whose sampler fails for one temperature, for the server's tests of a turn failing on its own (run under
torchrun in place of `-m MODULE`): `torchrun ... tests/faulty_server.py tp_infer.serve [options]`.

A turn sampled at FAULT_TEMPERATURE raises inside the engine, as a sampler bug would; every other turn is sampled as
usual."""

import runpy
import sys

from tp_infer.engine import engine

FAULT_TEMPERATURE = 1.25
sample = engine.sample


def faulty_sample(logits, params, generator=None, *history):
    if params.temperature == FAULT_TEMPERATURE:
        raise RuntimeError("injected fault in sampling")
    return sample(logits, params, generator, *history)


if __name__ == "__main__":
    engine.sample = faulty_sample
    runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
