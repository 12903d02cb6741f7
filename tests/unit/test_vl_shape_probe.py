"""benchmarks/experiments/vl_shape_probe.py: a scene cell's example is the cell its object is drawn in, and
the probe separates what is separable and not what is not."""

from __future__ import annotations

import pytest
import torch

from tests.scripts import load_script


@pytest.fixture(scope="module")
def probe_module():
    return load_script("benchmarks/experiments/vl_shape_probe.py")


def test_each_example_is_the_cell_its_object_is_drawn_in(probe_module) -> None:
    from tasks.data.vldata import PNG_DATA_URL
    from tasks.data.vlgen import generate_vqa, to_record
    from tasks.training.vl_pipeline import _image

    items = generate_vqa(40, 3, "train", tasks=["scene_count", "scene_colour"], size=32)
    # the validated rows' form: the image as a PNG data URL
    rows = [{**r, "image": PNG_DATA_URL + r.pop("image_png_b64")} for r in map(to_record, items)]
    rows.append(dict(rows[0]))  # the same image twice counts once
    examples = probe_module.cell_examples(rows, grid=2)
    assert len(examples) == len({r["image"] for r in rows}) and len(examples) > 10
    images = [_image(row) for row, _ in examples]
    pixels = probe_module.pixel_features(images, side=32, grid=2)
    assert pixels.shape == (len(images), 4, 16 * 16 * 3)
    for i, (_, cells) in enumerate(examples):
        occupied = {token for token, _, _ in cells}
        for token in range(4):
            drawn = bool((pixels[i, token] < 1.0).any())
            assert drawn == (token in occupied), (examples[i][0]["spec"], token)


def test_the_probe_reads_a_separable_label_and_not_noise(probe_module) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(-1)  # linearly separable, 3 classes
    assert probe_module.probe(x[:400], y[:400], x[400:], y[400:], 3) > 0.95
    noise = torch.randint(0, 3, (600,), generator=g)
    assert probe_module.probe(x[:400], noise[:400], x[400:], noise[400:], 3) < 0.5
