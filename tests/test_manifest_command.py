"""``python -m jobs.manifest DIR``: a manifest from a folder of concept folders, kohya/A1111 caption files."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
from PIL import Image

from jobs.manifest import main
from tinv.manifest import read_manifest


def png(path, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def test_one_concept_per_folder_with_sidecar_captions(tmp_path, capsys):
    photos = tmp_path / "photos"
    png(photos / "my-cat" / "1.png")
    png(photos / "my-cat" / "2.jpg")
    (photos / "my-cat" / "1.txt").write_text("a photo of {} on a sofa\n")
    (photos / "my-cat" / "2.txt").write_text("sleeping,   in the sun")
    (photos / "my-cat" / "notes.md").write_text("not an image")
    png(photos / "Van Gogh" / "b.png")
    png(photos / "Van Gogh" / "a.png")
    (photos / "empty").mkdir()
    (photos / "empty" / "readme.txt").write_text("no images here")
    out = photos / "manifest.parquet"
    assert main([str(photos), "--output", str(out), "--property", "style", "--initializer-token", "painting"]) == 0
    specs = {s.concept_id: s for s in read_manifest(str(out))}
    assert sorted(specs) == ["Van-Gogh", "my-cat"]
    cat, gogh = specs["my-cat"], specs["Van-Gogh"]
    assert cat.images == (f"{photos}/my-cat/1.png", f"{photos}/my-cat/2.jpg")
    assert cat.captions == ("a photo of {} on a sofa", "{}, sleeping, in the sun")
    assert gogh.images == (f"{photos}/Van Gogh/a.png", f"{photos}/Van Gogh/b.png") and gogh.captions == ()
    assert {s.learnable_property for s in specs.values()} == {"style"}
    assert {s.initializer_token for s in specs.values()} == {"painting"}
    assert cat.placeholder_token == "<my-cat>"
    # stored relative to the manifest's folder, so the folder can move (or be uploaded) as a whole
    assert pq.read_table(out).to_pylist()[1]["images"] == ["my-cat/1.png", "my-cat/2.jpg"]
    assert "2 concepts (1 captioned), 4 images" in capsys.readouterr().err


def test_every_problem_is_named_and_nothing_is_written(tmp_path, capsys):
    photos = tmp_path / "photos"
    png(photos / "half" / "1.png")
    png(photos / "half" / "2.png")
    (photos / "half" / "1.txt").write_text("a {} dog")
    png(photos / "a b" / "1.png")
    png(photos / "a-b" / "1.png")
    png(photos / "braces" / "1.png")
    (photos / "braces" / "1.txt").write_text("a {} in {font}")
    out = tmp_path / "m.parquet"
    assert main([str(photos), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'half': 1 of 2 images have no caption file (2.png" in err
    assert "'a-b' and 'a b' both make the concept id 'a-b'" in err
    assert not out.exists()
    (photos / "a b" / "1.png").unlink()
    (photos / "half" / "2.png").unlink()
    assert main([str(photos), "--output", str(out)]) == 2  # the manifest's own checks run before writing
    assert "no other brace" in capsys.readouterr().err and not out.exists()
    assert main([str(tmp_path / "nothing"), "--output", str(out)]) == 2
