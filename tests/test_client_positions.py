"""broker.client.positions: what a subscription resumes from, what it
delivers, and when it must resync. Pure: no broker, no I/O."""

from __future__ import annotations

from broker.client import Message, Resync
from broker.client.positions import Positions
from broker.core.protocol import Msg, Ok, Position, Resume


def msg(topic: str, seq: int, *, epoch: str | None = None, snapshot: bool = False) -> Msg:
    return Msg(topic, seq, f"{topic}#{seq}", None, epoch, snapshot)


def feed(positions: Positions, *messages: Msg) -> list[tuple[bool, Resync | None]]:
    return [positions.accept(m) for m in messages]


# -- exact topics -------------------------------------------------------------------


def test_topic_resumes_from_the_last_seq_seen() -> None:
    p = Positions("trades.BTC")
    p.started(Ok(1, seq=40, epoch="E1"))
    assert p.since() == Position("E1", 40)
    assert feed(p, msg("trades.BTC", 41), msg("trades.BTC", 42)) == [(True, None)] * 2
    assert p.since() == Position("E1", 42)


def test_topic_without_history_has_nothing_to_resume_from() -> None:
    p = Positions("t")
    p.started(Ok(1))
    assert not p.resumable
    feed(p, msg("t", 5))
    assert p.since() is None
    resync = p.resumed(Ok(2), None)
    assert resync == Resync("t", None, None, (), False, "no_history")
    # Positions were forgotten: a restarted broker's seq 1 is not a duplicate.
    assert p.accept(msg("t", 1)) == (True, None)


def test_duplicates_are_not_delivered() -> None:
    p = Positions("t")
    p.started(Ok(1, seq=10, epoch="E"))
    assert feed(p, msg("t", 11), msg("t", 11), msg("t", 9), msg("t", 12)) == [
        (True, None),
        (False, None),
        (False, None),
        (True, None),
    ]


def test_history_replay_after_the_ok_is_not_taken_for_duplicates() -> None:
    # ok says seq 47; history=10 replays 38..47 after it.
    p = Positions("t")
    p.started(Ok(1, seq=47, epoch="E"), history=10)
    assert all(deliver for deliver, _ in feed(p, *(msg("t", s) for s in range(38, 48))))
    assert p.since() == Position("E", 47)
    assert p.accept(msg("t", 47)) == (False, None)


def test_snapshot_messages_are_always_delivered() -> None:
    p = Positions("t")
    p.started(Ok(1, seq=47, epoch="E"))
    # Latest per key: not in seq order, all at or below the ok's seq.
    assert feed(p, msg("t", 45, snapshot=True), msg("t", 30, snapshot=True)) == [(True, None)] * 2
    assert p.since() == Position("E", 47)
    assert p.accept(msg("t", 48)) == (True, None)


def test_recovered_resume_keeps_the_position_for_the_replay() -> None:
    p = Positions("t")
    p.started(Ok(1, seq=41, epoch="E"))
    since = p.since()
    assert p.resumed(Ok(2, seq=47, epoch="E", recovered=True), since) is None
    # 42..47 follow the ok: delivered, in order, once.
    assert all(deliver for deliver, _ in feed(p, *(msg("t", s) for s in range(42, 48))))
    assert p.accept(msg("t", 45)) == (False, None)


def test_unrecovered_resume_resyncs_at_the_new_position() -> None:
    p = Positions("t")
    p.started(Ok(1, seq=41, epoch="E1"))
    resync = p.resumed(Ok(2, seq=3, epoch="E2", recovered=False), p.since())
    assert resync == Resync("t", "E2", 3, (), False, "not_recovered")
    assert p.since() == Position("E2", 3)
    assert p.accept(msg("t", 4)) == (True, None)  # not below 41: a new numbering


def test_a_live_message_with_another_epoch_resyncs() -> None:
    p = Positions("t")
    p.started(Ok(1, seq=5, epoch="E1"))
    deliver, resync = p.accept(msg("t", 1, epoch="E2"))
    assert deliver
    assert resync == Resync("t", "E2", 0, (), False, "epoch_changed")
    assert p.since() == Position("E2", 1)
    # The same seq-1 message again (a replay) is a duplicate, not another change.
    assert p.accept(msg("t", 1, epoch="E2")) == (False, None)


# -- patterns --------------------------------------------------------------------------


def test_pattern_resumes_with_cursor_and_per_topic_positions() -> None:
    p = Positions("trades.*")
    p.started(Ok(1, cursor="C1"))
    feed(p, msg("trades.a", 1, epoch="Ea"), msg("trades.a", 2), msg("trades.b", 7))
    # The epoch only where the client saw it on a seq-1 message.
    assert p.since() == Resume("C1", {"trades.a": Position("Ea", 2), "trades.b": Position(None, 7)})
    assert p.resumed(Ok(2, cursor="C2", recovered=True), p.since()) is None
    assert p.cursor == "C2"


def test_pattern_with_lost_topics_forgets_them() -> None:
    p = Positions("trades.*")
    p.started(Ok(1, cursor="C1"))
    feed(p, msg("trades.a", 3), msg("trades.b", 7))
    resync = p.resumed(Ok(2, cursor="C2", recovered=False, lost=("trades.b",)), p.since())
    assert resync == Resync("trades.*", None, None, ("trades.b",), False, "not_recovered")
    assert p.get("trades.a") == (None, 3)
    assert p.get("trades.b") is None


def test_pattern_unknown_resync_and_no_replay_forget_everything() -> None:
    p = Positions("trades.*")
    p.started(Ok(1, cursor="C1"))
    feed(p, msg("trades.a", 3))
    resync = p.resumed(Ok(2, cursor="C2", recovered=False, unknown=True), p.since())
    assert resync is not None and resync.unknown
    assert len(p) == 0


def test_pattern_learns_an_epoch_from_a_seq_1_message() -> None:
    p = Positions("a.*")
    p.started(Ok(1, cursor="C"))
    # First seen mid-stream (epoch unknown), then a seq 1 with an epoch: the
    # numbering restarted.
    feed(p, msg("a.x", 40))
    deliver, resync = p.accept(msg("a.x", 1, epoch="E2"))
    assert deliver and resync is not None and resync.reason == "epoch_changed"


def test_too_many_topics_forgets_the_oldest_and_cannot_vouch() -> None:
    p = Positions("a.*", max_topics=3)
    p.started(Ok(1, cursor="C"))
    feed(p, *(msg(f"a.t{i}", 1) for i in range(3)))
    feed(p, msg("a.t0", 2))  # a.t0 is now the most recently updated
    assert not p.overflowed
    feed(p, msg("a.t3", 1))
    assert p.overflowed
    since = p.since()
    assert isinstance(since, Resume)
    assert set(since.topics) == {"a.t0", "a.t2", "a.t3"}  # a.t1 was forgotten
    # Even if the broker recovered what it was asked for, the client forgot a topic.
    resync = p.resumed(Ok(2, cursor="C2", recovered=True), since)
    assert resync == Resync("a.*", None, None, (), False, "too_many_topics")
    assert not p.overflowed
    assert p.resumed(Ok(3, cursor="C3", recovered=True), p.since()) is None


def test_message_equality_leaves_the_epoch_out() -> None:
    assert Message("t", 1, "x", epoch="E1") == Message("t", 1, "x")
    assert Message("t", 1, "x", snapshot=True) != Message("t", 1, "x")
