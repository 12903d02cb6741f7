"""The rendered surveillance clips (tasks/data/camgen.py): determinism, splits, labels match pixels."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

import numpy as np
import pytest

from tasks.data.camgen import (
    BEHAVIOURS,
    CamData,
    CamSplit,
    check_splits,
    generate_split,
    make_identities,
    make_splits,
    questions_for,
    render_background,
    render_clip,
)


@pytest.fixture(scope="module")
def data() -> CamData:
    return make_splits(140, 56, n_identities=20, n_frames=3, size=64, seed=3)


def foreground(clip, t: int) -> np.ndarray:
    """Pixels of frame t that differ from the empty scene: the people."""
    bg = np.asarray(render_background(clip.frames.shape[1], clip.background, clip.floor))
    return (clip.frames[t] != bg).any(-1)


def bbox(mask: np.ndarray) -> tuple[float, float, int, int]:
    ys, xs = np.nonzero(mask)
    return xs.mean(), ys.mean(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1


def test_deterministic_and_seeded(data: CamData) -> None:
    again = make_splits(140, 56, n_identities=20, n_frames=3, size=64, seed=3)
    assert np.array_equal(again.train.frames, data.train.frames)
    assert np.array_equal(again.test.frames, data.test.frames)
    assert [c.questions for c in again.test.clips] == [c.questions for c in data.test.clips]
    other = make_splits(140, 56, n_identities=20, n_frames=3, size=64, seed=4)
    assert not np.array_equal(other.train.frames, data.train.frames)


def test_shapes_and_balance(data: CamData) -> None:
    assert data.train.frames.shape == (140, 3, 64, 64, 3) and data.train.frames.dtype == np.uint8
    assert len(data.identities) == 20
    counts = Counter(data.train.identity.tolist())
    assert set(counts) == set(range(20)) and set(counts.values()) == {7}
    assert set(Counter(data.train.behaviour.tolist()).values()) == {20}  # 140 clips / 7 behaviours


def test_identities_are_distinct() -> None:
    ids = make_identities(24, seed=0)
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            assert sum(x != y for x, y in zip(a.attributes(), b.attributes(), strict=True)) >= 2
    assert make_identities(24, seed=0) == ids


def test_splits_disjoint_and_identities_shared(data: CamData) -> None:
    check_splits(data)
    assert set(data.test.identity.tolist()) <= set(data.train.identity.tolist())
    train_frames = {h for c in data.train.clips for h in c.frame_hashes()}
    assert not train_frames.intersection(h for c in data.test.clips for h in c.frame_hashes())


def test_check_splits_rejects_a_leaked_clip(data: CamData) -> None:
    leaked = dataclasses.replace(data.train.clips[5], clip_id="test-999999")
    bad = CamData(data.identities, data.train, CamSplit("test", [*data.test.clips, leaked]))
    with pytest.raises(ValueError, match="equals training clip train-000005"):
        check_splits(bad)
    frames = data.test.clips[0].frames.copy()
    frames[1] = data.train.clips[7].frames[1]
    one_frame = dataclasses.replace(data.test.clips[0], frames=frames)
    with pytest.raises(ValueError, match="frame 1 of test clip test-000000 equals a frame of training clip"):
        check_splits(CamData(data.identities, data.train, CamSplit("test", [one_frame])))


def test_check_splits_rejects_an_unseen_identity(data: CamData) -> None:
    identities = make_identities(20, seed=3)
    train = generate_split("train", 30, identities[:10], n_frames=2, size=32)
    test = generate_split("test", 20, identities, n_frames=2, size=32)
    with pytest.raises(ValueError, match="never appear in the training split"):
        check_splits(CamData(identities, train, test))


def test_motion_in_pixels_matches_behaviour_labels(data: CamData) -> None:
    seen = Counter()
    for clip in data.train.clips + data.test.clips:
        first, last = bbox(foreground(clip, 0)), bbox(foreground(clip, 2))
        if clip.behaviour == "walk_left":
            assert last[0] < first[0] - 6, clip.clip_id
        elif clip.behaviour == "walk_right":
            assert last[0] > first[0] + 6, clip.clip_id
        elif clip.behaviour == "fall":
            assert first[3] > first[2] and last[2] > last[3], clip.clip_id  # upright, then lying
        elif clip.behaviour == "sit":
            assert last[3] < first[3] - 2, clip.clip_id
        elif clip.behaviour in ("loiter", "wave"):
            assert abs(last[0] - first[0]) < 5, clip.clip_id  # jitter only
        elif clip.behaviour == "fight":
            assert len(clip.people) == 2 and clip.people[0].identity != clip.people[1].identity
            bg = np.asarray(render_background(64, clip.background, clip.floor))
            sizes = [
                (render_clip((p,), data.identities, 3, 64, clip.background, clip.floor)[0] != bg)
                .any(-1)
                .sum()
                for p in clip.people
            ]
            # both people are visible: far more pixels than either alone
            assert foreground(clip, 0).sum() > max(sizes) + 0.5 * min(sizes), clip.clip_id
        seen[clip.behaviour] += 1
    assert set(seen) == set(BEHAVIOURS)


def test_questions_have_exact_answers() -> None:
    data = make_splits(70, 28, n_identities=20, n_frames=2, size=48, seed=1, max_extra_people=2)
    assert any(len(c.people) > 1 and c.behaviour != "fight" for c in data.train.clips)
    for clip in data.train.clips + data.test.clips:
        qa = dict(clip.questions)
        behaviours = [p.behaviour for p in clip.people]
        assert qa["Did anyone fall?"] == ("yes" if "fall" in behaviours else "no")
        assert qa["Is anyone fighting?"] == ("yes" if "fight" in behaviours else "no")
        assert qa["Is anyone sitting down?"] == ("yes" if "sit" in behaviours else "no")
        assert qa["How many people are walking left?"] == str(behaviours.count("walk_left"))
        assert qa["How many people are walking right?"] == str(behaviours.count("walk_right"))
        assert qa["How many people are in the scene?"] == str(len(clip.people))
        assert clip.people[0].behaviour == clip.behaviour and clip.people[0].identity == clip.identity
    # a hand-built scene
    from tasks.data.camgen import Person

    people = (
        Person(0, "walk_left", 0.8, 0.1, -1),
        Person(1, "walk_left", 0.7, 0.1, -1),
        Person(2, "fall", 0.5, 0, 1),
    )
    assert dict(questions_for(people)) == {
        "Did anyone fall?": "yes",
        "Is anyone fighting?": "no",
        "Is anyone sitting down?": "no",
        "How many people are walking left?": "2",
        "How many people are walking right?": "0",
        "How many people are in the scene?": "3",
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 60}, "multiple of 16"),
        ({"n_frames": 5}, "n_frames must be 2..4"),
        ({"n_identities": 1}, "n_identities must be >= 2"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_splits(10, 5, **kwargs)


def test_fast_enough() -> None:
    start = time.perf_counter()
    split = generate_split("train", 400, make_identities(24), n_frames=4, size=64)
    elapsed = time.perf_counter() - start
    assert split.frames.shape[:2] == (400, 4)
    assert elapsed < 20, f"1600 frames took {elapsed:.1f} s"
