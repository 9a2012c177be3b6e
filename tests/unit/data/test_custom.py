import pytest

from fixtures import class_image, write_folder
from normsoftmax.data.records import DatasetError
from normsoftmax.data.registry import load_dataset


def test_folder_without_split_halves_the_sorted_classes(tmp_path):
    write_folder(tmp_path, num_classes=6, images_per_class=2)
    records = load_dataset("folder", tmp_path)
    assert records.train.class_names == ["class_00", "class_01", "class_02"]
    assert records.test.class_names == ["class_03", "class_04", "class_05"]
    assert records.counts()["test"] == {"images": 6, "classes": 3}


def test_folder_with_train_and_test_subfolders(tmp_path):
    write_folder(tmp_path, num_classes=6, images_per_class=2, split_folders=True)
    records = load_dataset("folder", tmp_path)
    assert records.train.class_names == ["class_00", "class_01", "class_02"]
    assert records.test.class_names == ["class_03", "class_04", "class_05"]


def test_empty_class_folder_is_named(tmp_path):
    write_folder(tmp_path, num_classes=6, images_per_class=2)
    (tmp_path / "class_07").mkdir()
    with pytest.raises(DatasetError, match=r"class_07: empty class folder"):
        load_dataset("folder", tmp_path)


def write_images(folder, count, class_index=0):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        class_image(class_index, k).save(folder / f"{k}.jpg")


def test_csv_train_test_relative_paths(tmp_path):
    write_images(tmp_path / "imgs", 4)
    rows = ["path,label,split", "imgs/0.jpg,cat,train", "imgs/1.jpg,dog,train", "imgs/2.jpg,cow,test",
            f"{tmp_path / 'imgs' / '3.jpg'},cow,test"]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    records = load_dataset("csv", tmp_path / "data.csv")
    assert records.train.paths == [str(tmp_path / "imgs" / "0.jpg"), str(tmp_path / "imgs" / "1.jpg")]
    assert records.train.class_names == ["cat", "dog"]
    assert records.test.labels.tolist() == [0, 0]


def test_csv_query_gallery_share_labels(tmp_path):
    write_images(tmp_path, 6)
    rows = ["path,label,split", "0.jpg,a,train", "1.jpg,b,train", "2.jpg,x,query", "3.jpg,y,query",
            "4.jpg,y,gallery", "5.jpg,x,gallery"]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    records = load_dataset("csv", tmp_path / "d.csv")
    assert records.query_gallery
    assert records.query.labels.tolist() == [0, 1] and records.gallery.labels.tolist() == [1, 0]


def test_csv_without_split_column_halves_classes(tmp_path):
    write_images(tmp_path, 4)
    rows = ["path,label"] + [f"{k}.jpg,{k}" for k in range(4)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    records = load_dataset("csv", tmp_path / "d.csv")
    assert records.train.class_names == ["0", "1"] and records.test.class_names == ["2", "3"]


@pytest.mark.parametrize("rows, message", [
    (["file,label", "0.jpg,a"], "line 1: the header must name"),
    (["path,label,split", "0.jpg,a,train", "1.jpg,b"], "line 3: expected 3 fields, found 2"),
    (["path,label,split", "0.jpg,a,train", "1.jpg,b,validation"], "line 3: split 'validation'"),
    (["path,label,split", "0.jpg,a,train", "1.jpg,a,test"], "1 class"),
    (["path,label,split", "0.jpg,a,train", "1.jpg,b,train", "2.jpg,b,query"], "splits"),
])
def test_csv_errors_name_file_and_line(tmp_path, rows, message):
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetError, match=message):
        load_dataset("csv", tmp_path / "d.csv")


def test_csv_with_a_byte_order_mark_and_a_quoted_newline(tmp_path):
    write_images(tmp_path, 4)
    text = '\ufeffpath,label,split\n0.jpg,"a\nb",train\n1.jpg,c,train\n2.jpg,d,test\n3.jpg\n'
    (tmp_path / "d.csv").write_text(text, encoding="utf-8")
    with pytest.raises(DatasetError, match="line 6: expected 3 fields, found 1"):
        load_dataset("csv", tmp_path / "d.csv")
    (tmp_path / "d.csv").write_bytes(b"path,label\n\xff\xfe.jpg,a\n")
    with pytest.raises(DatasetError, match="d.csv: not UTF-8"):
        load_dataset("csv", tmp_path / "d.csv")
