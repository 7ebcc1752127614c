from pathlib import Path

import pytest

from csearch.data import read_catalogue
from csearch.errors import CatalogueError


def test_folder_two_and_three_levels(tmp_path, tiny_catalogue):
    (tiny_catalogue / "flat").mkdir()
    (tiny_catalogue / "flat" / "solo.png").write_bytes((next(tiny_catalogue.rglob("*.png"))).read_bytes())
    (tiny_catalogue / "notes.txt").write_text("x")
    catalogue = read_catalogue(tiny_catalogue)
    assert len(catalogue.records) == 2 * 2 * 3 + 1
    solo = [r for r in catalogue.records if r.category == "flat"][0]
    assert solo.product == "solo" and Path(solo.path).is_absolute()
    assert any("notes.txt" in path for path, _ in catalogue.skipped)
    assert catalogue.categories == ["bottle", "flat", "jar"]


def test_manifest_relative_paths_unlabelled_and_missing(tmp_path, tiny_catalogue):
    image = next(tiny_catalogue.rglob("*.png"))
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        f"path,category,product\n{image},bottle,b1\n{image.relative_to(tmp_path)},,\nmissing.png,jar,j1\n"
    )
    catalogue = read_catalogue(manifest)
    assert [(r.category, r.product) for r in catalogue.records] == [("bottle", "b1"), (None, None)]
    assert catalogue.skipped[0][1] == "file not found"


def test_manifest_without_path_column(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\na.png,x\n")
    with pytest.raises(CatalogueError, match="header with 'path'"):
        read_catalogue(tmp_path / "m.csv")


def test_empty_and_missing_catalogues(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(CatalogueError, match="no images"):
        read_catalogue(tmp_path / "empty")
    with pytest.raises(CatalogueError, match="not found"):
        read_catalogue(tmp_path / "nope")


def test_grocery_list_and_classes(tmp_path, tiny_catalogue):
    root = tmp_path / "gs"
    (root / "train").mkdir(parents=True)
    (root / "iconic").mkdir()
    image = next(tiny_catalogue.rglob("*.png")).read_bytes()
    (root / "train" / "a.png").write_bytes(image)
    (root / "iconic" / "A_Iconic.png").write_bytes(image)
    (root / "classes.csv").write_text(
        "Class Name (str),Class ID (int),Coarse Class Name (str),Coarse Class ID (int),"
        "Iconic Image Path (str),Product Description Path (str)\n"
        "Arla-Milk,0,Milk,0,/iconic/A_Iconic.png,/d.txt\n"
    )
    (root / "train.txt").write_text("train/a.png, 0, 0\ntrain/b.png, 0, 0\nbroken line\n")
    catalogue = read_catalogue(root / "train.txt")
    assert [(r.category, r.product) for r in catalogue.records] == [("Milk", "Arla-Milk")]
    reasons = dict(catalogue.skipped)
    assert any("malformed" in v for v in reasons.values()) and any("not found" in v for v in reasons.values())
    iconic = read_catalogue(root / "classes.csv")
    assert iconic.records[0].path.endswith("A_Iconic.png")


@pytest.mark.shared_data
def test_real_grocery_store_lists(grocery):
    train = read_catalogue(grocery / "train.txt")
    assert len(train.records) == 2640 and len(train.categories) == 43 and len(train.products) == 81
    assert not train.skipped
