"""The output lease: one live writer per output, on local paths and on S3 (moto's server, real HTTP)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import threading
import time
from typing import Any

import pytest

from farm import storage
from farm.lease import LeaseError, LeaseHeld, LeaseLost, OutputLease
from farm.storage import OutputLayout

Out = tuple[str, "dict[str, Any] | None"]


class Clock:
    """A settable wall clock (Unix seconds)."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["local", "s3"])
def out(request: pytest.FixtureRequest, tmp_path: Any) -> Out:
    """An output root and its storage options, once local and once on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "out"), None
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/out", request.getfixturevalue("s3_endpoint")["storage_options"]


def lease(out: Out, run_id: str, **kwargs: Any) -> OutputLease:
    kwargs.setdefault("ttl_s", 60.0)
    kwargs.setdefault("renew_every_s", 15.0)
    return OutputLease(out[0], out[1], run_id, **kwargs)


def on_disk(out: Out) -> dict[str, Any] | None:
    layout = OutputLayout(out[0], out[1])
    return json.loads(storage.read_bytes(layout.lease, out[1])) if storage.exists(layout.lease, out[1]) else None


def test_second_acquire_refuses_with_holder_info(out: Out) -> None:
    first = lease(out, "run-a").acquire()
    record = on_disk(out)
    assert record is not None and record["run_id"] == "run-a" and record["token"] == first.token
    assert set(record) == {"run_id", "host", "pid", "acquired_at", "renewed_at", "expires_at", "ttl_s", "token"}
    assert record["expires_at"] == pytest.approx(record["renewed_at"] + 60.0)

    with pytest.raises(LeaseHeld) as caught:
        lease(out, "run-b").acquire()
    message = str(caught.value)
    for part in (
        "run-a",
        socket.gethostname(),
        f"pid {os.getpid()}",
        "expires",
        "Wait for that run to finish",
        "stop it",
        "takes the output over automatically",
    ):
        assert part in message
    assert caught.value.holder["run_id"] == "run-a"
    assert on_disk(out)["token"] == first.token  # the refused run changed nothing


def test_stale_lease_is_taken_over_and_the_old_holder_finds_out(out: Out) -> None:
    clock = Clock()
    old = lease(out, "run-old", ttl_s=10, renew_every_s=2, clock=clock).acquire()
    new = lease(out, "run-new", ttl_s=10, renew_every_s=2, clock=clock)
    clock.t += 9
    with pytest.raises(LeaseHeld):
        new.acquire()
    clock.t += 2  # run-old has not renewed for longer than its ttl
    new.acquire()
    assert on_disk(out)["run_id"] == "run-new"

    with pytest.raises(LeaseLost, match="run-new") as caught:
        old.renew()
    assert caught.value.holder["run_id"] == "run-new"
    assert old.lost is caught.value and not old.held
    with pytest.raises(LeaseLost):
        old.check()
    assert old.release() is False
    assert on_disk(out)["run_id"] == "run-new"


def test_release_deletes_only_our_own_lease(out: Out) -> None:
    clock = Clock()
    mine = lease(out, "run-mine", clock=clock).acquire()
    other = lease(out, "run-other", clock=clock)
    assert other.release() is False  # never acquired
    assert on_disk(out)["run_id"] == "run-mine"

    clock.t += 61  # mine went stale and is taken over: mine's release must leave other's lease alone
    other.acquire()
    assert mine.release() is False
    assert on_disk(out)["run_id"] == "run-other"
    assert other.release() is True
    assert on_disk(out) is None
    lease(out, "run-next", clock=clock).acquire()  # a fresh run then gets the output at once


def test_renewal_thread_keeps_the_lease_alive_past_its_ttl(out: Out) -> None:
    holder = lease(out, "run-a", ttl_s=0.6, renew_every_s=0.1)
    with holder:
        time.sleep(1.3)
        with pytest.raises(LeaseHeld):
            lease(out, "run-b", ttl_s=0.6, renew_every_s=0.1).acquire()
        holder.check()
        assert holder.held and holder.expires_at is not None and holder.expires_at > time.time()
    assert on_disk(out) is None  # leaving the block released it


def test_renewal_thread_records_a_takeover(out: Out) -> None:
    seen: list[LeaseLost] = []
    holder = lease(out, "run-a", ttl_s=5, renew_every_s=0.1, on_lost=seen.append).acquire()
    holder.start_renewing()
    # a run whose clock is far ahead judges run-a's lease stale and takes it over (clock skew > ttl)
    lease(out, "run-b", ttl_s=5, renew_every_s=1, clock=lambda: time.time() + 100).acquire()
    deadline = time.time() + 5
    while not seen and time.time() < deadline:  # on_lost runs on the renewal thread
        time.sleep(0.02)
    assert isinstance(holder.lost, LeaseLost) and seen == [holder.lost]
    assert "run-b" in str(holder.lost) and "Stop committing" in str(holder.lost)
    with pytest.raises(LeaseLost):
        holder.check()
    holder.stop()
    assert on_disk(out)["run_id"] == "run-b"


def test_check_renews_when_the_renewal_thread_fell_behind(out: Out) -> None:
    clock = Clock()
    holder = lease(out, "run-a", ttl_s=100, renew_every_s=25, clock=clock).acquire()
    clock.t += 50
    holder.check()  # plenty left: nothing written
    assert on_disk(out)["expires_at"] == pytest.approx(1_000_100)
    clock.t += 30  # 20 s left < ttl/4
    holder.check()
    assert on_disk(out)["expires_at"] == pytest.approx(1_000_180)
    clock.t += 500  # expired, but nobody took it: still ours
    holder.check()
    assert on_disk(out)["expires_at"] == pytest.approx(1_000_680) and holder.held


def _race_once(leases: list[OutputLease]) -> list[OutputLease]:
    """All ``leases`` call acquire() at once (threads behind a barrier); the ones that got the output."""
    barrier = threading.Barrier(len(leases))
    results: list[Any] = [None] * len(leases)

    def go(i: int) -> None:
        barrier.wait()
        try:
            leases[i].acquire()
            results[i] = "won"
        except LeaseHeld:
            results[i] = "held"
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(leases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert all(result in ("won", "held") for result in results), results
    return [held for held, result in zip(leases, results) if result == "won"]


def _race(out: Out, trials: int, racers: int, **kwargs: Any) -> list[list[OutputLease]]:
    """``trials`` races of ``racers`` threads, each on its own output; every other one over a stale lease."""
    clock = Clock()
    winners: list[list[OutputLease]] = []
    for trial in range(trials):
        target = (storage.join(out[0], f"race-{trial}"), out[1])
        if trial % 2 == 1:
            lease(target, "run-dead", clock=clock, **kwargs).acquire()
        clock.t += 61  # any dead lease is now stale
        winners.append(_race_once([lease(target, f"run-{i}", clock=clock, **kwargs) for i in range(racers)]))
    return winners


def test_racing_acquires_have_exactly_one_winner(out: Out) -> None:
    racers = 6 if out[1] is None else 4  # S3: every racer costs a few requests to the loopback server
    for trial, winners in enumerate(_race(out, trials=20, racers=racers)):
        assert len(winners) == 1, f"trial {trial}: {[w.run_id for w in winners]} all won"
        record = on_disk((storage.join(out[0], f"race-{trial}"), out[1]))
        assert record is not None and record["token"] == winners[0].token


def _process_racer(root: str, trials: int, barrier: Any, results: Any, index: int) -> None:
    for trial in range(trials):
        barrier.wait()
        try:
            OutputLease(os.path.join(root, f"race-{trial}"), None, f"proc-{index}").acquire()
            results.put((trial, index))
        except LeaseHeld:
            pass


def test_racing_processes_have_exactly_one_winner_on_a_local_path(tmp_path: Any) -> None:
    ctx = mp.get_context("spawn")
    trials, racers = 10, 3
    barrier, results = ctx.Barrier(racers), ctx.Queue()
    procs = [
        ctx.Process(target=_process_racer, args=(str(tmp_path), trials, barrier, results, i)) for i in range(racers)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    wins: dict[int, list[int]] = {}
    while not results.empty():
        trial, index = results.get()
        wins.setdefault(trial, []).append(index)
    assert {trial: len(who) for trial, who in wins.items()} == dict.fromkeys(range(trials), 1)


def test_without_conditional_writes_one_racer_survives_its_first_renewal(
    s3_bucket: str, s3_endpoint: dict[str, Any]
) -> None:
    """Write-then-verify (stores without conditional writes): racers may briefly both win; one renew sorts it out."""
    out = (f"{s3_bucket}/out", s3_endpoint["storage_options"])
    first = lease(out, "run-a", conditional_writes=False, settle_s=0.05).acquire()
    with pytest.raises(LeaseHeld, match="run-a"):
        lease(out, "run-b", conditional_writes=False, settle_s=0.05).acquire()
    assert first.release() is True
    for trial, winners in enumerate(_race(out, trials=3, racers=4, conditional_writes=False, settle_s=0.1)):
        survivors = []
        for winner in winners:
            try:
                winner.renew()
                survivors.append(winner)
            except LeaseLost:
                pass
        assert len(survivors) == 1, f"trial {trial}: {[w.run_id for w in survivors]} survived"


def test_a_store_without_conditional_requests_falls_back_to_verify(
    s3_bucket: str, s3_endpoint: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.exceptions import ClientError

    out = (f"{s3_bucket}/out", s3_endpoint["storage_options"])
    fs, _ = storage.get_fs(out[0], out[1])
    real = fs.call_s3

    def no_conditionals(method: str, *args: Any, **kwargs: Any) -> Any:
        if "IfNoneMatch" in kwargs or "IfMatch" in kwargs:
            err = OSError(38, "not implemented")
            err.__cause__ = ClientError({"Error": {"Code": "NotImplemented", "Message": "no"}}, method)
            raise err
        return real(method, *args, **kwargs)

    monkeypatch.setattr(fs, "call_s3", no_conditionals)
    first = lease(out, "run-a", settle_s=0.05).acquire()
    with pytest.raises(LeaseHeld, match="run-a"):
        lease(out, "run-b", settle_s=0.05).acquire()
    first.renew()
    assert first.release() is True and on_disk(out) is None


def test_layout_and_root_name_the_same_lease(tmp_path: Any) -> None:
    layout = OutputLayout(str(tmp_path / "out"))
    assert layout.lease == os.path.join(str(tmp_path), "out", "_lease.json")
    assert OutputLease(layout, None, "r").uri == OutputLease(str(tmp_path / "out"), None, "r").uri == layout.lease
    with OutputLease(layout, None, "r", ttl_s=5, renew_every_s=1) as held:
        assert held.read()["run_id"] == "r" and os.path.exists(layout.lease)
    assert not os.path.exists(layout.lease)


def test_bad_timings_and_a_foreign_lease_file_are_refused_with_the_fix(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=r"renew_every_s=120 with ttl_s=60.*less than ttl_s"):
        OutputLease(str(tmp_path), None, "r", ttl_s=60, renew_every_s=120)
    with pytest.raises(ValueError, match=r"ttl_s=0"):
        OutputLease(str(tmp_path), None, "r", ttl_s=0)
    with pytest.raises(LeaseError, match="before acquire"):
        OutputLease(str(tmp_path), None, "r").renew()
    (tmp_path / "_lease.json").write_text("not json")
    with pytest.raises(LeaseError, match="_lease.json is not a lease this farm wrote.*delete that file"):
        OutputLease(str(tmp_path), None, "r").acquire()


def test_check_refuses_commits_while_an_expiring_lease_cannot_be_renewed(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    holder = OutputLease(str(tmp_path), None, "run-a", ttl_s=100, renew_every_s=25, clock=clock).acquire()
    clock.t += 90

    def unreachable() -> None:
        raise ConnectionError("storage unreachable")

    with monkeypatch.context() as patch:
        patch.setattr(holder._store, "read", unreachable)
        with pytest.raises(LeaseLost, match="could not be renewed: ConnectionError"):
            holder.check()
    assert holder.lost is None  # not final: once the storage answers, a renewal puts things right
    holder.check()
    assert holder.expires_at == pytest.approx(clock.t + 100)


def test_lease_module_stays_below_the_runtime() -> None:
    import subprocess
    import sys

    code = "import sys, farm.lease; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert "ray" not in loaded and "torch" not in loaded


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path) -> None:
    """A driver killed with SIGKILL and rerun on the same machine does not wait out the ttl."""
    import subprocess
    import sys

    from farm.lease import OutputLease

    out = str(tmp_path / "out")
    code = (
        f"from farm.lease import OutputLease; OutputLease({out!r}, run_id='dead', ttl_s=600).acquire(); "
        "import os; os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    holder = OutputLease(out, run_id="probe").read()
    assert holder["run_id"] == "dead" and holder["expires_at"] > holder["acquired_at"] + 500
    lease = OutputLease(out, run_id="next", ttl_s=600).acquire()
    assert lease.read()["run_id"] == "next"
    lease.release()


def test_farm_status_names_the_run_holding_the_output(tmp_path) -> None:
    from farm.lease import OutputLease
    from farm.report import status_text

    out = str(tmp_path / "out")
    assert "lease:" not in status_text(out)
    lease = OutputLease(out, run_id="run-42", ttl_s=300).acquire()
    try:
        text = status_text(out)
        assert f"lease: run run-42 on host {lease.host}" in text and "(in " in text
    finally:
        lease.release()
