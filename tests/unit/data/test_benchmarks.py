import numpy as np
import pytest

from fixtures import write_cars196, write_cub200, write_inshop, write_sop
from normsoftmax.data.records import DatasetError
from normsoftmax.data.registry import compare_with_reference, dataset_spec, load_dataset


def assert_labels_dense(split):
    assert split.labels.min() == 0 and split.labels.max() == split.num_classes - 1
    assert len(np.unique(split.labels)) == split.num_classes


def test_cub200_splits_classes_in_half_and_accepts_either_root(tmp_path):
    base = write_cub200(tmp_path, num_classes=8, images_per_class=3)
    for root in (tmp_path, base):
        records = load_dataset("Cub200", root)
        assert records.counts() == {"train": {"images": 12, "classes": 4}, "test": {"images": 12, "classes": 4}}
        assert records.train.class_names[0] == "001.Bird_1" and records.test.class_names[0] == "005.Bird_5"
        assert all("/images/00" in p for p in records.train.paths)
        assert_labels_dense(records.train)
        assert_labels_dense(records.test)
    assert not records.query_gallery


def test_cars196_reads_the_matlab_struct_array(tmp_path):
    write_cars196(tmp_path, num_classes=6, images_per_class=2)
    records = load_dataset("Cars196", tmp_path)
    assert records.counts() == {"train": {"images": 6, "classes": 3}, "test": {"images": 6, "classes": 3}}
    assert records.train.paths[0].endswith("car_ims/000001.jpg")
    assert records.train.class_names == ["Make Model 1 2012", "Make Model 2 2012", "Make Model 3 2012"]
    assert records.test.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_sop_uses_the_ebay_files(tmp_path):
    write_sop(tmp_path, train_classes=5, test_classes=4, images_per_class=2)
    records = load_dataset("StanfordOnlineProducts", tmp_path)
    assert records.counts() == {"train": {"images": 10, "classes": 5}, "test": {"images": 8, "classes": 4}}
    assert records.test.class_names == ["6", "7", "8", "9"]
    assert records.train.paths[0].endswith(".JPG")


def test_inshop_query_and_gallery_share_one_label_space(tmp_path):
    write_inshop(tmp_path, train_items=3, test_items=4, images_per_item=4)
    records = load_dataset("InShop", tmp_path)
    assert records.query_gallery and records.test is None
    assert records.query.class_names == records.gallery.class_names
    assert len(records.query) == 8 and len(records.gallery) == 8
    for q, g in zip(records.query.labels, records.gallery.labels, strict=True):
        assert records.query.class_names[q] == records.gallery.class_names[g]
    assert records.counts()["train"] == {"images": 12, "classes": 3}


def test_reference_count_differences_are_reported(tmp_path):
    write_cub200(tmp_path)
    records = load_dataset("cub200", tmp_path)
    assert any("5864" in note for note in records.notes)
    assert compare_with_reference("cub200", records) == records.notes
    assert dataset_spec("sop").reference_counts["test"] == {"images": 60502, "classes": 11316}


def test_metadata_line_with_wrong_field_count_names_file_and_line(tmp_path):
    base = write_cub200(tmp_path)
    lines = (base / "images.txt").read_text().splitlines()
    lines[4] = lines[4] + " extra"
    (base / "images.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"images\.txt, line 5: expected 2 fields, found 3"):
        load_dataset("Cub200", tmp_path)


def test_sop_bad_header_and_inshop_bad_status(tmp_path):
    base = write_sop(tmp_path / "sop")
    text = (base / "Ebay_test.txt").read_text().replace("image_id class_id", "id class", 1)
    (base / "Ebay_test.txt").write_text(text)
    with pytest.raises(DatasetError, match="Ebay_test.txt, line 1"):
        load_dataset("sop", base)
    root = write_inshop(tmp_path / "inshop")
    partition = root / "Eval" / "list_eval_partition.txt"
    partition.write_text(partition.read_text().replace(" query\n", " probe\n", 1))
    with pytest.raises(DatasetError, match=r"list_eval_partition.txt, line \d+: evaluation_status 'probe'"):
        load_dataset("inshop", root)


def test_label_file_with_fewer_than_two_classes(tmp_path):
    write_sop(tmp_path, train_classes=1, test_classes=2)
    with pytest.raises(DatasetError, match="1 class"):
        load_dataset("sop", tmp_path)


def test_missing_metadata_and_unknown_dataset(tmp_path):
    with pytest.raises(DatasetError, match="images.txt not found"):
        load_dataset("Cub200", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet", tmp_path)
