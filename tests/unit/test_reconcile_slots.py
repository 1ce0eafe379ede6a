"""Reconcile slots: bounded, and jobs still waiting for their Job go first."""

from __future__ import annotations

import asyncio

from finetune_operator.handlers import Slots


def test_slots_bound_concurrency_and_serve_priority_then_order() -> None:
    async def scenario() -> tuple[list[str], int]:
        slots = Slots(2)
        order: list[str] = []
        running = peak = 0

        async def work(name: str, priority: int) -> None:
            nonlocal running, peak
            await slots.acquire(priority)
            try:
                order.append(name)
                running += 1
                peak = max(peak, running)
                await asyncio.sleep(0.01)
                running -= 1
            finally:
                slots.release()

        tasks = [asyncio.create_task(work(f"status-{i}", 1)) for i in range(4)]
        await asyncio.sleep(0)  # two take the free slots, two wait
        tasks += [asyncio.create_task(work(f"new-{i}", 0)) for i in range(2)]
        await asyncio.gather(*tasks)
        return order, peak

    order, peak = asyncio.run(scenario())
    assert peak == 2
    assert order == ["status-0", "status-1", "new-0", "new-1", "status-2", "status-3"]


def test_a_cancelled_waiter_does_not_lose_its_slot() -> None:
    async def scenario() -> int:
        slots = Slots(1)
        await slots.acquire(1)
        waiter = asyncio.create_task(slots.acquire(1))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        slots.release()
        await asyncio.wait_for(slots.acquire(1), 1)  # the slot came back
        return slots.free

    assert asyncio.run(scenario()) == 0
