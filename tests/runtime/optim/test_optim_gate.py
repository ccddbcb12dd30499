"""StepGate, the step's device-side all-or-nothing verdict, on its own."""

import torch

from onlinemodel_runtime.optim.gate import StepGate
from onlinemodel_runtime.optim.streams import SideStreams

CPU = torch.device("cpu")


def test_a_gated_off_bucket_gates_off_every_later_one_until_reset():
    gate = StepGate(SideStreams())
    gate.reset()
    buf = gate.for_device(CPU)
    assert bool(buf) and gate.last_device == CPU and gate.for_device(CPU) is buf  # one persistent flag
    a, b, c = (torch.zeros(1) for _ in range(3))
    gate.record([a], buf.clone())
    buf.copy_(buf & torch.tensor(False))  # a bucket with a non-finite gradient writes False
    gate.record([b, c], buf.clone())
    assert not bool(gate.for_device(CPU))  # every later bucket of the step reads False
    applied, gated_off = gate.settle()
    assert applied == 1 and gated_off == [b, c]
    assert gate.settle() == (0, [])  # settled flags are gone
    gate.reset()
    assert bool(buf) and gate.last_device is None


def test_side_streams_do_nothing_on_cpu():
    streams = SideStreams()
    with streams.updating(CPU):
        streams.await_producer()
        streams.mark_used([torch.zeros(1)])
        assert streams.for_capture(CPU) is None
    assert streams.for_replay(CPU) is None
    streams.join()
