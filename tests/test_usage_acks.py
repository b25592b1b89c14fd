"""The request log's acknowledgements (locopilot.gateway.usage): a reply waits for its own row's commit.

Rows finished in one turn of the loop share one write; each reply awaits a future of its own,
so a client that goes away (its task cancelled) ends only its own wait.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from locopilot.gateway.usage import Outcome, UsageRecorder
from locopilot.store import logs
from locopilot.store.db import Database


@pytest.mark.anyio
async def test_a_cancelled_wait_leaves_the_batch_and_the_other_replies_alone(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "locopilot.db")
    try:
        recorder = UsageRecorder(db)
        gone = asyncio.ensure_future(recorder.settle(Outcome("req-gone", "chat.completions", "m")))
        kept = asyncio.ensure_future(recorder.settle(Outcome("req-kept", "chat.completions", "m")))
        await asyncio.sleep(0)  # both rows are queued in this turn: one batch
        assert recorder._batch is not None and len(recorder._batch.rows) == 2
        gone.cancel()
        await asyncio.wait_for(kept, 30)
        # Once a reply's wait is over, its row is committed: readable from another connection.
        assert [row.request_id for row in logs.recent(db, request_id="req-kept")] == ["req-kept"]
        assert gone.cancelled()
        assert [row.request_id for row in logs.recent(db, request_id="req-gone")] == ["req-gone"]
    finally:
        db.close()
