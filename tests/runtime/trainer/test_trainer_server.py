"""The trainer's ZMQ server and the API server's client, talking over a real ipc socket."""

from __future__ import annotations

import asyncio

import pytest

from onlinemodel_runtime.trainer.server import serve
from onlinemodel_runtime.trainer.service import TrainerError
from onlinemodel_runtime.server.trainer_client import TrainerClient, TrainerRequestError, TrainerUnavailable


class FakeService:
    """Stands in for TrainerService: the server only routes requests (the service has its own tests)."""

    class cfg:
        debug_ops = False

    def status(self):
        return {"state": "idle", "weight_version": 7}

    def submit(self, request):
        if not request["examples"]:
            raise TrainerError("nothing to train", code=400)
        return {"job_id": "job-1", "state": "queued"}

    def checkpoint(self):
        raise TrainerError("a checkpoint is already being written", code=409)


async def test_requests_round_trip_and_errors_keep_their_codes(tmp_path):
    endpoint = f"ipc://{tmp_path / 'trainer.sock'}"
    server = asyncio.create_task(serve(FakeService(), endpoint))
    client = TrainerClient(endpoint)
    try:
        assert (await client.request("status"))["weight_version"] == 7
        assert (await client.request("train", examples=[{"input_ids": [1]}]))["job_id"] == "job-1"
        with pytest.raises(TrainerRequestError) as exc:
            await client.request("train", examples=[])
        assert exc.value.code == 400
        with pytest.raises(TrainerRequestError) as exc:
            await client.request("checkpoint")
        assert exc.value.code == 409
        with pytest.raises(TrainerRequestError) as exc:
            await client.request("debug_scale", name="x", factor=2.0)
        assert exc.value.code == 403
        with pytest.raises(TrainerRequestError, match="unknown operation"):
            await client.request("bogus")
        # Concurrent requests on one connection are matched to their answers.
        answers = await asyncio.gather(*(client.request("status") for _ in range(20)))
        assert all(a["weight_version"] == 7 for a in answers)
        await client.request("shutdown")
        await asyncio.wait_for(server, 5)
    finally:
        client.reset()
        server.cancel()


async def test_no_trainer_means_unavailable(tmp_path):
    client = TrainerClient(f"ipc://{tmp_path / 'nobody.sock'}")
    try:
        with pytest.raises(TrainerUnavailable):
            await client.request("status", timeout=0.5)
    finally:
        client.reset()
