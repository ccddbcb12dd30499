"""The trainer's ZMQ server and the API server's client, talking over a real ipc socket."""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio

from onlinemodel_protocol.api import Job, TrainAccepted, TrainStatus
from onlinemodel_protocol.rpc import TrainerOp, TrainJob
from onlinemodel_runtime.server.trainer_client import TrainerClient, TrainerRequestError, TrainerUnavailable
from onlinemodel_runtime.trainer.server import serve
from onlinemodel_runtime.trainer.service import TrainerError

EXAMPLE = {"input_ids": [1, 2], "labels": [-100, 2]}


class FakeService:
    """Stands in for TrainerService: the server only routes requests (the service has its own tests)."""

    class cfg:
        debug_ops = False

    def __init__(self):
        self.jobs: list[TrainJob] = []

    def status(self):
        return TrainStatus(state="idle", weight_version=7, last_loss=float("nan"))

    def submit(self, job: TrainJob):
        if job.epochs > 3:
            raise TrainerError("too many epochs", code=400)
        self.jobs.append(job)
        return TrainAccepted(job_id="job-1", state="queued", examples=len(job.examples), tokens=2)

    def cancel(self, job_id: str):
        if job_id != "job-1":
            raise TrainerError(f"no job {job_id!r}", code=404)
        return Job(id=job_id, state="cancelled", examples=1, epochs=2, learning_rate=1e-5, created_at="t")

    def checkpoint(self):
        raise TrainerError("a checkpoint is already being written", code=409)


async def _raw(endpoint: str, body: bytes) -> bytes:
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        await sock.send_multipart([b"1", body])
        return (await asyncio.wait_for(sock.recv_multipart(), 5))[1]
    finally:
        sock.close()


async def test_requests_round_trip_and_errors_keep_their_codes(tmp_path):
    endpoint = f"ipc://{tmp_path / 'trainer.sock'}"
    service = FakeService()
    server = asyncio.create_task(serve(service, endpoint))
    client = TrainerClient(endpoint)
    try:
        status = await client.request(TrainerOp.STATUS)
        assert isinstance(status, TrainStatus) and status.weight_version == 7 and status.last_loss is None
        accepted = await client.request(TrainerOp.TRAIN, examples=[EXAMPLE], epochs=2, learning_rate=1e-5)
        assert accepted == TrainAccepted(job_id="job-1", state="queued", examples=1, tokens=2)
        assert service.jobs == [TrainJob(examples=[EXAMPLE], epochs=2, learning_rate=1e-5)]
        with pytest.raises(TrainerRequestError) as exc:
            await client.request(TrainerOp.TRAIN, examples=[EXAMPLE], epochs=4, learning_rate=1e-5)
        assert exc.value.code == 400
        # Arguments are checked against the protocol before the service sees them.
        with pytest.raises(TrainerRequestError, match="bad arguments for 'train'") as exc:
            await client.request(TrainerOp.TRAIN, examples=[], epochs=1, learning_rate=1e-5)
        assert exc.value.code == 400 and len(service.jobs) == 1
        cancelled = await client.request(TrainerOp.CANCEL, job_id="job-1")
        assert isinstance(cancelled, Job) and cancelled.state == "cancelled"
        with pytest.raises(TrainerRequestError) as exc:
            await client.request(TrainerOp.CANCEL, job_id="job-2")
        assert exc.value.code == 404
        with pytest.raises(TrainerRequestError) as exc:
            await client.request(TrainerOp.CHECKPOINT)
        assert exc.value.code == 409
        with pytest.raises(TrainerRequestError) as exc:
            await client.request("debug_scale", name="x", factor=2.0)
        assert exc.value.code == 403
        assert b"unknown operation 'bogus'" in await _raw(endpoint, b'{"op": "bogus"}')
        assert b'"code":400' in await _raw(endpoint, b"[1, 2]")
        # Concurrent requests on one connection are matched to their answers.
        answers = await asyncio.gather(*(client.request(TrainerOp.STATUS) for _ in range(20)))
        assert [a.weight_version for a in answers] == [7] * 20
        await client.request(TrainerOp.SHUTDOWN)
        await asyncio.wait_for(server, 5)
    finally:
        client.reset()
        server.cancel()


async def test_no_trainer_means_unavailable(tmp_path):
    client = TrainerClient(f"ipc://{tmp_path / 'nobody.sock'}")
    try:
        with pytest.raises(TrainerUnavailable):
            await client.request(TrainerOp.STATUS, timeout=0.5)
    finally:
        client.reset()
